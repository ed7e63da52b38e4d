"""Precision: of the examples predicted positive, the fraction that are."""

from kubetune_job.metric_modules import base


class Precision(base.ClassificationMetric):
    key = "precision"
    summary = __doc__

    def score(self, references: list[int], predictions: list[int], average: str) -> float:
        from sklearn.metrics import precision_score

        return precision_score(references, predictions, average=average, zero_division=0)
