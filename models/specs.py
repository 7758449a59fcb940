"""Layer specs: TransformerEngine when it imports, otherwise torch-native with SDPA attention."""

from __future__ import annotations

import copy
import importlib.util
from typing import Optional, Tuple

import torch
from megatron.core.transformer.spec_utils import ModuleSpec

from engine.config import ConfigError, ModelConfig, PerformanceConfig
from models import performance as perf_lib
from models.te import transformer_engine_available


def layer_spec(
    model: ModelConfig,
    use_te: bool | None = None,
    sequence_parallel: bool = False,
    performance: Optional[PerformanceConfig] = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Tuple[ModuleSpec, str]:
    """Return ``(spec, description)`` for one transformer layer of ``model``.

    The description names the layer implementation and attention backend, for the log.
    Sequence parallelism on the torch-native spec is refused here, before any layer exists:
    megatron-core's torch-norm fallback (no apex) cannot shard norms along the sequence.
    ``performance`` picks the torch-native spec's SDPA backend order (probed on the GPU for
    ``dtype``) and RMSNorm kernel; the TE spec has its own kernels."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    num_experts = model.num_experts or None
    if use_te is None:
        use_te = transformer_engine_available()
    if use_te:
        spec = specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=model.moe_grouped_gemm
        )
        return spec, "TransformerEngine layers, TE fused attention (flash/cuDNN)"

    if sequence_parallel and importlib.util.find_spec("apex") is None:
        raise ConfigError(
            "parallel.sequence_parallel needs TransformerEngine (or apex) norms, and neither is "
            "installed; set parallel.sequence_parallel=false"
        )
    from models.attention import SDPAAttention

    spec = specs.get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=False, normalization=model.normalization
    )
    perf = performance or PerformanceConfig()
    spec = copy.deepcopy(spec)
    order, attention = perf_lib.sdpa_backend_order(
        perf, model.head_dim, model.num_attention_heads, model.query_groups, dtype
    )
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=SDPAAttention, params={"sdpa_backends": order}
    )
    norm = perf_lib.rms_norm_class(perf) if model.normalization == "RMSNorm" else None
    if norm is not None:
        spec.submodules.input_layernorm = norm
        spec.submodules.pre_mlp_layernorm = norm
    norm_note = "liger-kernel RMSNorm" if norm is not None else f"torch {model.normalization}"
    return spec, f"torch-native megatron-core layers, attention {attention}, {norm_note}"
