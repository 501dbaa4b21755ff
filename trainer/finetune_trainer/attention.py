"""Attention for padding-free packed batches without a variable-length kernel.

With `dataset.packing`, TRL's collator flattens a batch into one row of concatenated examples and
resets `position_ids` at each example. Flash-attention's variable-length kernels attend within
each example only; plain SDPA (CPU, and GPUs without flash-attn) gets a block-diagonal mask over
the whole row instead and computes every score of it: for a row of n examples that is about n
times the work, nearly all of it masked out (bench/FINDINGS.md, packing).

`PACKED_SDPA` ("sdpa_packed") is SDPA run once per example of such a row, causal, without a mask:
the same numbers as the masked computation, on the examples' own lengths. Rows that are not
packed (a batch dimension above one, or a single example) go to transformers' SDPA unchanged,
and so does generation.
"""

from __future__ import annotations

import itertools
from typing import Any

PACKED_SDPA = "sdpa_packed"

# Every layer of one forward pass gets the same position_ids tensor: split it once, not per layer
# (each split reads the positions back to the host, a device sync on GPUs). The tensor's version
# counter changes on any in-place write, so a reused tensor with new values is split again.
_last: tuple[Any, int, list[tuple[int, int]] | None] | None = None


def _segments_once(position_ids: Any) -> list[tuple[int, int]] | None:
    global _last
    version = getattr(position_ids, "_version", 0)
    if _last is None or _last[0] is not position_ids or _last[1] != version:
        _last = (position_ids, version, segments(position_ids))
    return _last[2]


def segments(position_ids: Any) -> list[tuple[int, int]] | None:
    """[start, end) of each example in a flattened packed row (positions restart at each one);
    None unless the row holds more than one example."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    pos = position_ids[0]
    if pos.numel() < 2:
        return None
    starts = ((pos[1:] - pos[:-1]) != 1).nonzero().flatten().add(1).tolist()
    if not starts:
        return None
    bounds = [0, *starts, int(pos.numel())]
    return list(itertools.pairwise(bounds))


def packed_sdpa_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' attention-function signature; (batch, seq, heads, head_dim) like SDPA's."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = _segments_once(kwargs.get("position_ids"))
    # Only a training/prefill pass over the whole row (queries = keys) can be split per example.
    if bounds is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rest = {k: v for k, v in kwargs.items() if k != "is_causal"}
    outputs = []
    for start, end in bounds:
        out, _ = sdpa_attention_forward(
            module,
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            None,
            dropout=dropout,
            scaling=scaling,
            is_causal=True,
            **rest,
        )
        outputs.append(out)
    return torch.cat(outputs, dim=1), None


def register() -> str:
    """Make "sdpa_packed" a known attention implementation (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    # Same masks as SDPA: used as is for rows that are not packed, ignored for packed ones.
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)
    return PACKED_SDPA
