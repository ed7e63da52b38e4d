"""Exact match: the fraction of generated answers equal to their reference once whitespace runs are
collapsed, the ends stripped and case folded."""

from collections.abc import Sequence

import datasets
import evaluate


def normalize(text: str) -> str:
    return " ".join(text.split()).casefold()


class ExactMatch(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions, references: lists of strings (generated answers and references).",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: Sequence[str], references: Sequence[str]) -> dict:
        hits = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True))
        return {"exact_match": hits / max(len(references), 1)}
