"""Accuracy: the fraction of predictions equal to their reference."""

from kubetune_job.metric_modules import base


class Accuracy(base.ClassificationMetric):
    key = "accuracy"
    summary = __doc__

    def score(self, references: list[int], predictions: list[int], average: str) -> float:
        return sum(r == p for r, p in zip(references, predictions, strict=True)) / max(len(references), 1)
