"""What every shipped classification metric shares: its inputs and how it is averaged."""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate


class ClassificationMetric(evaluate.Metric):
    """Class-id predictions against class-id references. Subclasses set `key` and `score`.

    Binary tasks score the positive class (id 1); tasks with more labels take the macro average.
    """

    key = ""
    summary = ""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=self.summary,
            citation="",
            inputs_description="predictions, references: lists of integer class ids.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions: Sequence[int], references: Sequence[int], average: str = "binary") -> dict:
        return {self.key: float(self.score(list(references), list(predictions), average))}

    def score(self, references: list[int], predictions: list[int], average: str) -> float:
        raise NotImplementedError
