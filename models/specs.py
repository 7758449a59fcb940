"""Layer specs: TransformerEngine when it imports, otherwise torch-native with SDPA attention."""

from __future__ import annotations

import copy
import importlib.util
from typing import Tuple

from megatron.core.transformer.spec_utils import ModuleSpec

from engine.config import ConfigError, ModelConfig
from models.te import transformer_engine_available


def layer_spec(
    model: ModelConfig, use_te: bool | None = None, sequence_parallel: bool = False
) -> Tuple[ModuleSpec, str]:
    """Return ``(spec, description)`` for one transformer layer of ``model``.

    The description names the layer implementation and attention backend, for the log.
    Sequence parallelism on the torch-native spec is refused here, before any layer exists:
    megatron-core's torch-norm fallback (no apex) cannot shard norms along the sequence."""
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
    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.submodules.core_attention = SDPAAttention
    return spec, "torch-native megatron-core layers, attention torch.nn.functional.scaled_dot_product_attention"
