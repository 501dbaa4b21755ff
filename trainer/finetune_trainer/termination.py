"""The termination message: what the operator copies into status when the pod ends.

Written to $FINETUNE_TERMINATION_LOG if set, else /dev/termination-log (when it exists), as a
TerminationMessage JSON of at most TERMINATION_MESSAGE_MAX_BYTES; the free-text message is cut
first, then the metrics, so that the JSON always fits and parses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from finetune_api.constants import TERMINATION_LOG_PATH, TERMINATION_MESSAGE_MAX_BYTES, Env
from finetune_api.status import TerminationMessage


def encode(msg: TerminationMessage, limit: int = TERMINATION_MESSAGE_MAX_BYTES) -> bytes:
    """The message as JSON bytes within `limit`."""
    doc = msg.wire()
    data = json.dumps(doc, separators=(",", ":")).encode()
    if len(data) <= limit:
        return data
    text = doc.get("message", "")
    overflow = len(data) - limit
    doc["message"] = text[: max(0, len(text) - overflow - 3)] + "..."
    data = json.dumps(doc, separators=(",", ":")).encode()
    while len(data) > limit and doc.get("metrics"):
        doc["metrics"].popitem()
        data = json.dumps(doc, separators=(",", ":")).encode()
    if len(data) > limit:  # only a pathological reason could still overflow
        doc = {"outcome": doc["outcome"], "reason": doc.get("reason", "")[:200]}
        data = json.dumps(doc, separators=(",", ":")).encode()
    return data


def path() -> Path | None:
    env = os.environ.get(Env.TERMINATION_LOG)
    if env:
        return Path(env)
    default = Path(TERMINATION_LOG_PATH)
    return default if default.exists() else None


def write(msg: TerminationMessage) -> Path | None:
    """Write the message where Kubernetes reads it; returns the path, or None when there is none."""
    target = path()
    if target is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(encode(msg))
    return target
