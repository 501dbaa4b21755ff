"""Sizes people type outside the CRD (operator flags, the cache budget, --gpu-memory): one parser."""

from __future__ import annotations

import pytest
from finetune_api.quantity import parse_bytes


@pytest.mark.parametrize(("text", "expected"), [
    ("1000000", 1_000_000), ("500Gi", 500 * 2**30), ("40G", 40 * 10**9), ("81920Mi", 80 * 2**30),
    ("1.5Gi", 3 * 2**29), (" 2T ", 2 * 10**12), ("1Pi", 2**50), ("64k", 64_000),
])
def test_sizes_in_every_unit(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "0", "0Gi", "-1Gi", "10GB", "10gi", "1e9", "Gi"])
def test_what_is_not_a_size_is_refused_with_an_example(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a size in bytes \(e\.g\. 500Gi"):
        parse_bytes(text)
