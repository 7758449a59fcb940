"""Packed SFT micro-batches in megatron-core's THD layout (``PackedSeqParams``).

A packed sample holds several conversations; each one restarts its position ids at 0
(``engine/data/sft_data.py``), and so does the padding after the last one. The segment
boundaries are therefore read from the position ids alone: a segment starts wherever the
position is 0, and at the start of every row. A micro-batch ``[b, s]`` is flattened to one
row ``[1, b*s]`` (THD has no batch dimension: megatron-core squeezes it before attention)
with ``cu_seqlens`` marking every segment, so attention and RoPE positions stay inside each
conversation, on TransformerEngine's fused attention and on ``models/attention.py`` alike.
"""

from __future__ import annotations

from typing import Dict

import torch
from megatron.core.packed_seq_params import PackedSeqParams


def segment_cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative segment lengths (int32, starting at 0, ending at ``b*s``) of the flattened
    ``position_ids`` ``[b, s]``."""
    b, s = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True  # a row always starts a segment (replayed pretraining rows included)
    flat = torch.nonzero(starts.reshape(-1), as_tuple=True)[0]
    end = torch.tensor([b * s], dtype=flat.dtype, device=flat.device)
    return torch.cat([flat, end]).to(torch.int32)


def thd_micro_batch(batch: Dict[str, torch.Tensor]):
    """``(tokens, labels, position_ids, packed_seq_params)`` of a packed micro-batch, each
    tensor flattened to ``[1, b*s]``; the caller reshapes the per-token loss back to ``[b, s]``."""
    pos = batch["position_ids"]
    cu = segment_cu_seqlens(pos)
    max_len = int((cu[1:] - cu[:-1]).max())
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len
    )
    flat = (batch[k].reshape(1, -1) for k in ("tokens", "labels", "position_ids"))
    return (*flat, params)
