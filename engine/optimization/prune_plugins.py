"""Make the engine's torch-native layers prunable by modelopt's Minitron (``mcore_minitron``).

modelopt 0.42's megatron-core plugin (``modelopt.torch.nas.plugins.megatron``) knows TE's and
megatron's own layers only. On the torch-native spec (no TransformerEngine, no apex) three of
our layers fall outside it:

- core attention is ``models.attention.SDPAAttention``: modelopt's ``_DynamicSelfAttention``
  asserts it is megatron's ``DotProductAttention`` or TE's. SDPA reads the head count from its
  input shapes, so it needs no dynamic attribute: only to be a dynamic module, so the
  attention's ``export`` can export it.
- the norms are plain ``torch.nn.RMSNorm`` / ``torch.nn.LayerNorm`` (megatron's
  ``WrappedTorchNorm``): RMSNorm is not registered at all, and modelopt's ``nn.LayerNorm``
  module takes no shared ``num_features`` hparam, which the transformer layer passes.

``register()`` adds exactly these to modelopt's dynamic-module registry (``DMRegistry``), as
its own plugins register FusedLayerNorm and TE's attention. It is idempotent, and every
replacement keeps modelopt's behaviour for the modules it already handled.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.attention import SelfAttention
from modelopt.torch.nas.modules.norm import _DynamicLayerNorm
from modelopt.torch.nas.plugins import megatron as mo_megatron
from modelopt.torch.nas.registry import DMRegistry
from modelopt.torch.nas.traced_hp import TracedHp
from modelopt.torch.opt.dynamic import DynamicModule

from models.attention import SDPAAttention

_SELF_ATTENTION_KEY = "megatron.core.transformer.attention.SelfAttention"


class _DynamicTorchNorm(_DynamicLayerNorm):
    """``nn.LayerNorm`` / ``nn.RMSNorm`` sharing the model's ``hidden_size`` hparam.

    Without ``num_features`` (modelopt's generic FastNAS path) it registers its own hparam,
    exactly as modelopt's ``_DynamicLayerNorm``."""

    def _setup(self, *, num_features: Optional[TracedHp] = None):
        if num_features is None:
            num_features = TracedHp(list(range(1, self.normalized_shape[-1] + 1)))
        self._register_hparam("num_features", num_features)
        # RMSNorm has no bias attribute; LayerNorm may have weight/bias set to None.
        for attr in ("weight", "bias"):
            if hasattr(self, attr):
                self._register_dynamic_attribute(attr, self._cut_to_active_features)
        self._register_dynamic_attribute("normalized_shape", self._get_normalized_shape)


class _DynamicSDPAAttention(DynamicModule):
    """``SDPAAttention`` as a dynamic module: nothing to slice (heads come from its inputs)."""

    def _setup(self):
        pass


class _DynamicSelfAttentionSDPA(mo_megatron._DynamicSelfAttention):
    """modelopt's ``_DynamicSelfAttention``, also accepting ``SDPAAttention`` as core attention.

    A subclass, so modelopt's Minitron importance estimators (keyed on
    ``_DynamicSelfAttention``) still rank the heads."""

    def _setup(self, *, hidden_size: TracedHp):
        if not isinstance(self.core_attention, SDPAAttention):
            super()._setup(hidden_size=hidden_size)
            return
        # modelopt's own _setup minus the core-attention branch (which asserts TE's class).
        heads = mo_megatron.NumAttentionHeadsHp(
            self.num_attention_heads_per_partition, self.num_query_groups_per_partition
        )
        self._register_hparam("num_attention_heads", heads)
        self._register_dynamic_attribute(
            "num_attention_heads_per_partition", lambda mod, _value: mod.num_attention_heads
        )
        DMRegistry.convert(self.core_attention)
        mo_megatron._DynamicQKVColumnParallelLinear.convert(
            self.linear_qkv, num_attention_heads=heads, hidden_size=hidden_size
        )
        mo_megatron._DynamicProjRowParallelLinear.convert(
            self.linear_proj, num_attention_heads=heads, hidden_size=hidden_size
        )


def register() -> None:
    """Register the engine's torch-native layers with modelopt's ``DMRegistry`` (idempotent)."""
    if DMRegistry.get(SDPAAttention) is None:
        DMRegistry.register({SDPAAttention: "models.attention.SDPAAttention"})(_DynamicSDPAAttention)
    if DMRegistry.get(torch.nn.RMSNorm) is None:
        DMRegistry.register({torch.nn.RMSNorm: "nn.RMSNorm"})(_DynamicTorchNorm)
    if not issubclass(DMRegistry[torch.nn.LayerNorm], _DynamicTorchNorm):
        DMRegistry.unregister(torch.nn.LayerNorm)
        DMRegistry.register({torch.nn.LayerNorm: "nn.LayerNorm"})(_DynamicTorchNorm)
    if not issubclass(DMRegistry[SelfAttention], _DynamicSelfAttentionSDPA):
        DMRegistry.unregister(SelfAttention)
        DMRegistry.register({SelfAttention: _SELF_ATTENTION_KEY})(_DynamicSelfAttentionSDPA)
