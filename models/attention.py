"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` for the torch-native spec.

A drop-in for megatron-core's ``DotProductAttention`` (same constructor and forward
signature), used when TransformerEngine is absent. Unlike megatron's unfused local
attention it never materialises the full score matrix in Python: on GPUs SDPA picks the
flash or cuDNN kernel (or memory-efficient attention when a sliding-window mask is
needed), on CPU its fused C++ kernel. GQA is passed to SDPA natively (no repeat of K/V).
Packed sequences in megatron-core's THD layout (``PackedSeqParams``, as TE's attention
takes them) are attended segment by segment, so the packing code path is the same with
and without TransformerEngine.
"""

from __future__ import annotations

import contextlib
import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention

from models.performance import sdpa_context


class SDPAAttention(MegatronModule):
    """Causal (optionally sliding-window) attention over one tensor-parallel shard of heads.

    Inputs are megatron's ``[seq, batch, heads, head_dim]``; the output is
    ``[seq, batch, heads * head_dim]``."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        sdpa_backends: Optional[List[str]] = None,
    ):
        super().__init__(config=config)
        # Backend names in priority order (models.performance.sdpa_backend_order); None: torch's choice.
        self.sdpa_backends = sdpa_backends
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs TransformerEngine attention")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        # megatron's window_size is (left, right) in tokens, TE's convention; right is 0 (causal).
        self.window: Optional[int] = (
            config.window_size[0]
            if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, self.layer_number)
            else None
        )

    def _window_mask(self, sq: int, sk: int, device) -> torch.Tensor:
        """Boolean mask, True where query i may attend key j: j <= i and i - j <= left."""
        if self.window is None:
            raise ValueError("_window_mask needs a sliding window (this layer attends without one)")
        i = torch.arange(sq, device=device).unsqueeze(1) + (sk - sq)
        j = torch.arange(sk, device=device).unsqueeze(0)
        return (j <= i) & (i - j <= self.window)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """Attend ``query`` [sq, b, np, hn] to ``key``/``value`` [sk, b, ng, hn]; in the THD
        layout (``packed_seq_params``) ``query`` is [t, np, hn] and the output [t, np * hn]."""
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by SDPAAttention")
        if packed_seq_params is not None:
            return self._forward_thd(query, key, value, packed_seq_params, attn_mask_type)
        return self._attend(query, key, value, attention_mask, attn_mask_type)

    def _forward_thd(self, query, key, value, params, attn_mask_type) -> torch.Tensor:
        """Packed sequences: causal attention within each ``cu_seqlens`` segment only.

        One SDPA call per segment: exact, and memory stays O(sum of squared segment lengths)
        instead of a [t, t] block-diagonal mask."""
        if params.qkv_format != "thd":
            raise ValueError(f"packed_seq_params.qkv_format {params.qkv_format!r} is not supported (only 'thd')")
        if params.cu_seqlens_q_padded is not None or not torch.equal(params.cu_seqlens_q, params.cu_seqlens_kv):
            raise ValueError("SDPAAttention takes THD self-attention with unpadded, equal q/kv cu_seqlens")
        bounds = params.cu_seqlens_q.tolist()
        if bounds[0] != 0 or bounds[-1] != query.shape[0]:
            raise ValueError(f"cu_seqlens {bounds[0]}..{bounds[-1]} do not cover the {query.shape[0]} packed tokens")
        outs = [
            self._attend(query[a:b].unsqueeze(1), key[a:b].unsqueeze(1), value[a:b].unsqueeze(1), None, attn_mask_type)
            for a, b in zip(bounds[:-1], bounds[1:])
            if b > a
        ]
        return torch.cat(outs, dim=0).squeeze(1)

    def _attend(self, query, key, value, attention_mask, attn_mask_type) -> torch.Tensor:
        """SDPA over [s, b, h, d] inputs; returns [s, b, h * d]."""
        sq, b, np_, hn = query.shape
        sk = key.shape[0]
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = None
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        if self.window is not None:
            mask = self._window_mask(sq, sk, q.device)
            causal = False
        if attention_mask is not None:
            # megatron's masks are True where attention is NOT allowed.
            allowed = ~attention_mask.bool()
            mask = allowed if mask is None else (mask & allowed)
            if causal:
                mask = mask & self._causal(sq, sk, q.device)
                causal = False
        dropout = self.dropout_p if self.training else 0.0
        backends = sdpa_context(self.sdpa_backends) or contextlib.nullcontext()
        with tensor_parallel.get_cuda_rng_tracker().fork(), backends:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=causal,
                scale=self.softmax_scale,
                enable_gqa=k.shape[1] != q.shape[1],
            )
        # [b, h, s, d] -> [s, b, h*d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)

    @staticmethod
    def _causal(sq: int, sk: int, device) -> torch.Tensor:
        i = torch.arange(sq, device=device).unsqueeze(1) + (sk - sq)
        j = torch.arange(sk, device=device).unsqueeze(0)
        return j <= i
