"""Sizes in bytes written as Kubernetes quantities (`500Gi`, `40G`, `81920Mi`, `1000000`).

One parser for every size a person types outside the CRD: the operator's flags, the model cache's
budget and the preflight's `--gpu-memory`.
"""

from __future__ import annotations

import re
from decimal import Decimal

_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}
_BYTES = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?\s*")


def parse_bytes(value: str) -> int:
    """A positive size in bytes; ValueError (with an example of what is meant) otherwise."""
    m = _BYTES.fullmatch(value)
    if m is None or Decimal(m.group(1)) <= 0:
        raise ValueError(f"{value!r} is not a size in bytes (e.g. 500Gi, 40G, 1000000)")
    return int(Decimal(m.group(1)) * _UNITS[m.group(2) or ""])
