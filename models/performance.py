"""Kernel choices of the torch-native path (``performance`` config section), resolved once.

megatron-core picks its fusions from ``TransformerConfig`` flags and its AdamW from what is
installed (TE or apex FusedAdam, else ``torch.optim.AdamW`` with torch's default
implementation); this module turns the engine's switches into those flags, the SDPA
backend order, the RMSNorm class and the optional ``torch.compile`` of the layers. What
needs CUDA is decided here, so the rest of the engine reads plain values.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Dict, List, Optional, Tuple

import torch

from engine.config import ConfigError, PerformanceConfig

log = logging.getLogger(__name__)


def switch_on(value: Optional[bool], on_cpu: bool) -> bool:
    """A fusion switch resolved for the device: None (auto) is on with CUDA, off on CPU."""
    return (not on_cpu) if value is None else value


def fusion_kwargs(
    perf: PerformanceConfig, on_cpu: bool, bias_activation_possible: bool, dtype: torch.dtype
) -> Dict[str, Any]:
    """megatron-core ``TransformerConfig`` fields of the fusion switches.

    ``bias_activation_possible``: the MLP's activation is one megatron-core fuses (SwiGLU, or
    GeLU with a bias); otherwise its config check refuses the flag, so it stays off. The
    native fused cross entropy casts the logits' gradient to bf16 (megatron-core 0.16.1,
    ``fused_cross_entropy.calculate_gradients``), exact only for bf16 logits: None turns it
    on for bf16 on CUDA, and asking for it with another dtype is refused."""
    ce = perf.cross_entropy_fusion
    if ce and dtype != torch.bfloat16:
        raise ConfigError(
            f"performance.cross_entropy_fusion needs bf16 (megatron-core's native fused cross entropy "
            f"rounds the logits' gradient to bf16); the model dtype is {dtype}"
        )
    return dict(
        bias_activation_fusion=bias_activation_possible and switch_on(perf.bias_activation_fusion, on_cpu),
        bias_dropout_fusion=switch_on(perf.bias_dropout_fusion, on_cpu),
        cross_entropy_loss_fusion=switch_on(ce, on_cpu) and dtype == torch.bfloat16,
        cross_entropy_fusion_impl="native",
    )


# --------------------------------------------------------------------------------- attention

_BACKENDS = {
    "cudnn": "CUDNN_ATTENTION",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}
# torch's own fallback order after the preferred backend.
_FALLBACK = ("flash", "efficient", "cudnn", "math")


def _probe(backend: str, head_dim: int, heads: int, groups: int, dtype: torch.dtype) -> Optional[str]:
    """Run one causal SDPA forward+backward on CUDA with only ``backend`` allowed; the error text
    when the kernel refuses the shape/dtype (or computes a non-finite result), else None."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device="cuda").manual_seed(0)

    def make(h: int) -> torch.Tensor:
        # megatron's [s, b, h, d] viewed as [b, h, s, d], the strides SDPAAttention passes
        x = torch.randn(256, 2, h, head_dim, device="cuda", dtype=dtype, generator=gen, requires_grad=True)
        return x.permute(1, 2, 0, 3)

    q, k, v = make(heads), make(groups), make(groups)
    try:
        with sdpa_kernel([getattr(SDPBackend, _BACKENDS[backend])]):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups != heads)
            out.float().sum().backward()
        torch.cuda.synchronize()
    except RuntimeError as exc:  # "No available kernel" and kernel-specific refusals
        return str(exc).splitlines()[0][:200]
    if not bool(torch.isfinite(out).all()):
        return "non-finite output"
    return None


def sdpa_backend_order(
    perf: PerformanceConfig, head_dim: int, heads: int, groups: int, dtype: torch.dtype
) -> Tuple[Optional[List[str]], str]:
    """``(order, description)``: SDPA backend names in priority order for ``SDPAAttention``,
    or None for torch's default choice (CPU, ``sdpa_backend: default``, fp32).

    The preferred backend (``auto``: cuDNN on compute capability >= 9.0) is probed once with
    the model's head sizes; when it refuses, the next that works leads. The others follow it,
    so a call it rejects (e.g. a sliding-window mask) still runs."""
    choice = perf.sdpa_backend
    if not torch.cuda.is_available():
        return None, "torch SDPA, CPU kernel"
    if choice == "default":
        return None, "torch SDPA, torch's default backend order"
    if choice == "auto":
        major, _ = torch.cuda.get_device_capability()
        if major < 9:
            return None, "torch SDPA, torch's default backend order (sdpa_backend auto, before Hopper)"
        choice = "cudnn"
    candidates = [choice] + [b for b in _FALLBACK if b != choice]
    refused: List[str] = []
    for name in candidates:
        why = _probe(name, head_dim, heads, groups, dtype)
        if why is None:
            order = [name] + [b for b in _FALLBACK if b != name]
            note = f" ({'; '.join(refused)})" if refused else ""
            return order, f"torch SDPA, backend {name} first{note}"
        refused.append(f"{name} refused: {why}")
    raise ConfigError(f"no SDPA backend runs head_dim {head_dim} in {dtype}: {'; '.join(refused)}")


def sdpa_context(order: Optional[List[str]]):
    """The ``sdpa_kernel`` context of ``order`` (priority list), or None for torch's default."""
    if not order:
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, _BACKENDS[b]) for b in order], set_priority=True)


# ------------------------------------------------------------------------------------ norms


def liger_available() -> bool:
    """liger-kernel importable (it needs triton, hence CUDA)."""
    return importlib.util.find_spec("liger_kernel") is not None


def rms_norm_class(perf: PerformanceConfig):
    """The RMSNorm module class of ``performance.rmsnorm`` for the torch-native spec, or None
    for megatron-core's own choice (``torch.nn.RMSNorm``)."""
    if perf.rmsnorm == "torch":
        return None
    if not liger_available():
        raise ConfigError("performance.rmsnorm is liger but liger-kernel is not installed (pip install liger-kernel)")
    if not torch.cuda.is_available():
        raise ConfigError("performance.rmsnorm is liger, which needs CUDA (Triton kernels); use torch on CPU")
    return LigerNorm


class LigerNorm(torch.nn.Module):
    """liger-kernel's RMSNorm with megatron-core's norm constructor ``(config, hidden_size, eps)``;
    the weight keeps the name ``weight`` so checkpoints load across both kernels."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5):
        from liger_kernel.transformers.rms_norm import LigerRMSNorm

        # offset 0, casting "llama" (fp32 inside, as torch.nn.RMSNorm's fused kernel) and ones init.
        return LigerRMSNorm(hidden_size, eps=eps)


# ---------------------------------------------------------------------------------- compile


def compile_layers(chunks: List[torch.nn.Module]) -> int:
    """``torch.compile`` every transformer layer of ``chunks`` in place (module-level
    ``compile()``, so parameter names and checkpoints are unchanged); returns how many."""
    count = 0
    for chunk in chunks:
        decoder = getattr(chunk, "decoder", None)
        for layer in getattr(decoder, "layers", []):
            layer.compile()
            count += 1
    return count


# ------------------------------------------------------------------------------- optimizer


def adam_implementation(perf: PerformanceConfig, on_cuda: bool) -> str:
    """``fused``, ``foreach`` or ``for_loop`` for torch's AdamW; ``auto`` is fused on CUDA and
    torch's default on CPU (for_loop for CPU tensors)."""
    if perf.adam != "auto":
        return perf.adam
    return "fused" if on_cuda else "for_loop"


def select_adam(optimizer, implementation: str) -> int:
    """Set torch's AdamW implementation on every torch optimizer inside megatron-core's
    ``optimizer`` (chained / mixed-precision / distributed wrappers); returns how many groups.

    megatron-core 0.16.1 builds ``torch.optim.AdamW(params, lr, weight_decay, betas, eps)``
    when neither TE nor apex is installed, so torch's default applies (foreach on CUDA); its
    ``step`` reads ``fused``/``foreach`` from each param group, which is where they are set.
    A TE/apex FusedAdam (no such keys) is left alone."""
    groups = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.AdamW, torch.optim.Adam)):
            continue
        flags = {"fused": implementation == "fused", "foreach": implementation == "foreach"}
        inner.defaults.update(flags)
        for group in inner.param_groups:
            group.update(flags)
            groups += 1
    return groups
