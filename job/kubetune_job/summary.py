"""The run's JSON summary: what the operator copies into status and `kubetune run` prints."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Kubernetes keeps at most 4096 bytes of a termination message.
LIMIT = 4096


def encode(summary: dict[str, Any], limit: int = LIMIT) -> str:
    """Compact JSON within `limit` bytes: long messages and warning lists are shortened first."""
    text = json.dumps(summary, separators=(",", ":"), default=str)
    if len(text.encode()) <= limit:
        return text
    trimmed = dict(summary)
    if trimmed.get("warnings"):
        trimmed["warnings"] = trimmed["warnings"][:2]
    if "message" in trimmed:
        trimmed["message"] = ""
    budget = limit - len(json.dumps(trimmed, separators=(",", ":"), default=str).encode()) - 8
    if "message" in summary and budget > 0:
        trimmed["message"] = summary["message"].encode()[:budget].decode(errors="ignore") + "…"
    text = json.dumps(trimmed, separators=(",", ":"), default=str)
    if len(text.encode()) > limit:  # still too long: keep only what status needs
        keep = {k: trimmed[k] for k in ("phase", "exitCode", "reason", "finalStep", "outputUri") if k in trimmed}
        text = json.dumps(keep, separators=(",", ":"), default=str)
    return text


def write(path: Path, summary: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(encode(summary))
    except OSError as e:  # never hide the run's outcome behind a summary problem
        log.warning("cannot write the summary to %s: %s", path, e)
