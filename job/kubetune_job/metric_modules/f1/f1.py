"""F1: the harmonic mean of precision and recall."""

from kubetune_job.metric_modules import base


class F1(base.ClassificationMetric):
    key = "f1"
    summary = __doc__

    def score(self, references: list[int], predictions: list[int], average: str) -> float:
        from sklearn.metrics import f1_score

        return f1_score(references, predictions, average=average, zero_division=0)
