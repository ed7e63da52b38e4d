"""Recall: of the positive examples, the fraction predicted positive."""

from kubetune_job.metric_modules import base


class Recall(base.ClassificationMetric):
    key = "recall"
    summary = __doc__

    def score(self, references: list[int], predictions: list[int], average: str) -> float:
        from sklearn.metrics import recall_score

        return recall_score(references, predictions, average=average, zero_division=0)
