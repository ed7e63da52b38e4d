"""Evaluation metric modules shipped with the job, loaded with evaluate.load(<path>) so that
evaluation needs no network. Each <name>/<name>.py defines one evaluate.Metric."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent


def module_path(name: str) -> Path:
    """The directory evaluate.load() takes for a shipped metric."""
    return HERE / name
