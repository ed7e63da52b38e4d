"""The JSON summary fits a Kubernetes termination message."""

from __future__ import annotations

import json

from kubetune_job.summary import LIMIT, encode


def test_long_failure_message_is_cut_to_fit() -> None:
    """A huge error message is shortened so the summary stays within 4096 bytes and valid JSON."""
    text = encode({"phase": "Failed", "exitCode": 1, "reason": "Error", "message": "é" * 10_000})
    assert len(text.encode()) <= LIMIT
    assert json.loads(text)["reason"] == "Error"


def test_small_summary_is_unchanged() -> None:
    """A normal summary passes through whole."""
    summary = {"phase": "Succeeded", "finalStep": 10, "metrics": {"evalF1": 0.9}}
    assert json.loads(encode(summary)) == summary
