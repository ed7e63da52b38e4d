"""Matthews correlation coefficient: a balanced score in [-1, 1] for skewed classes."""

from kubetune_job.metric_modules import base


class MatthewsCorrelation(base.ClassificationMetric):
    key = "matthews_correlation"
    summary = __doc__

    def score(self, references: list[int], predictions: list[int], average: str) -> float:
        from sklearn.metrics import matthews_corrcoef

        return matthews_corrcoef(references, predictions)
