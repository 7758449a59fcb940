"""FP8 / MXFP8 training through TransformerEngine: recipe choice, checks, megatron-core settings.

``precision.dtype: fp8`` keeps parameters and activations in bf16 (fp32 master weights in
the optimizer, as always) and runs the GEMMs of the transformer layers in FP8 through
TransformerEngine, configured by megatron-core's ``TransformerConfig`` fields ``fp8``
(format), ``fp8_recipe``, ``fp8_param``, ``first_last_layers_bf16``,
``num_layers_at_start_in_bf16`` and ``num_layers_at_end_in_bf16``.

Recipes (``precision.fp8_recipe``):

* ``mxfp8`` -- one E8M0 scale per 32 consecutive values, in hardware on Blackwell
  (compute capability 10.x) only;
* ``tensorwise`` -- one scale per tensor computed from the current amax ("current
  scaling", TransformerEngine >= 2.2);
* ``delayed`` -- one scale per tensor from an amax history (any FP8 GPU, any TE);
* ``blockwise`` -- 1x128 / 128x128 block scales (TransformerEngine >= 2.3, Hopper);
* ``auto`` -- ``mxfp8`` on compute capability 10.x, otherwise ``tensorwise`` when the
  installed TE has it, else ``delayed``.

Two kinds of checks, so that a bad request never reaches a training step:

* ``check_fp8_config`` (config time, no GPU needed; called by ``engine.config.validate``):
  option consistency and the GEMM dimension alignment FP8 kernels need. TransformerEngine's
  ``assert_dim_for_fp8_exec`` requires, for per-tensor scaling, the last dimension of every
  GEMM operand divisible by 16 and the product of the others by 8; MXFP8 scales blocks of
  32 along both dimensions (the backward pass uses column-wise scales), so every GEMM
  dimension must be a multiple of 32. The engine checks each per-rank GEMM width (hidden,
  QKV and FFN shards after tensor parallelism, the expert FFN) against 16 (or 32 for
  MXFP8) and the tokens per micro-batch against 8 (or 32).
* ``resolve_fp8`` (run time, before the model is built): TransformerEngine must import and
  the GPU must support the recipe. The GPU's compute capability and the TE version are
  arguments, so the selection logic is tested on machines without either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from engine.config import Config, ConfigError
from models.te import transformer_engine_available


class PrecisionError(ConfigError):
    """A precision the run cannot have on this machine (no TE, GPU lacks the recipe)."""


@dataclass
class Fp8Settings:
    """The resolved FP8 choice and the ``TransformerConfig`` fields it sets."""

    recipe: str
    format: str
    param: bool
    first_last_layers_bf16: bool
    num_layers_at_start_in_bf16: int
    num_layers_at_end_in_bf16: int

    def transformer_kwargs(self) -> dict:
        """Keyword arguments for megatron-core's ``TransformerConfig``."""
        return dict(
            fp8=self.format,
            fp8_recipe=self.recipe,
            fp8_param=self.param,
            first_last_layers_bf16=self.first_last_layers_bf16,
            num_layers_at_start_in_bf16=self.num_layers_at_start_in_bf16,
            num_layers_at_end_in_bf16=self.num_layers_at_end_in_bf16,
        )

    def describe(self) -> str:
        """One line for the log."""
        keep = (
            f", first {self.num_layers_at_start_in_bf16} / last {self.num_layers_at_end_in_bf16} layers in bf16"
            if self.first_last_layers_bf16
            else ""
        )
        return f"FP8 {self.recipe} ({self.format}{', fp8 params' if self.param else ''}{keep})"


def _version_tuple(version: Optional[str]) -> Tuple[int, ...]:
    parts = []
    for piece in (version or "0").split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def alignment(recipe: str) -> Tuple[int, int]:
    """(GEMM width multiple, token-count multiple) the recipe's kernels need."""
    return (32, 32) if recipe == "mxfp8" else (16, 8)


def gemm_widths(cfg: Config) -> List[Tuple[str, int]]:
    """Per-rank widths of every GEMM dimension of a transformer layer, with their names."""
    m, p = cfg.model, cfg.parallel
    heads, head_dim, groups = m.num_attention_heads, m.head_dim, m.query_groups
    tp = p.tensor
    widths = [
        ("model.hidden_size", m.hidden_size),
        ("QKV projection per tensor-parallel rank", (heads + 2 * groups) * head_dim // tp),
        ("attention output per tensor-parallel rank", heads * head_dim // tp),
    ]
    if m.num_experts:
        ffn = m.expert_ffn_hidden_size
        widths.append(("expert FFN per tensor-parallel rank (model.moe_ffn_hidden_size / parallel.tensor)", ffn // tp))
    else:
        widths.append(
            ("FFN per tensor-parallel rank (model.ffn_hidden_size / parallel.tensor)", m.ffn_hidden_size // tp)
        )
    return widths


def check_fp8_config(cfg: Config, recipe: Optional[str] = None) -> List[str]:
    """Config-time problems of an FP8 request (empty when fine or when FP8 is off).

    ``recipe`` is the recipe to check alignment for; by default the configured one
    (``auto`` is checked against the per-tensor rule here and again, with the chosen
    recipe, by ``resolve_fp8``)."""
    pr = cfg.precision
    # The recipe and format names are Literal choices, checked by the loader and ``validate``.
    errors: List[str] = []
    if pr.dtype != "fp8":
        if pr.fp8_param or pr.first_last_layers_bf16:
            errors.append(
                f"precision.fp8_param / precision.first_last_layers_bf16 need precision.dtype=fp8 (it is {pr.dtype!r})"
            )
        return errors
    recipe = recipe or pr.fp8_recipe
    if pr.first_last_layers_bf16:
        if recipe == "delayed":
            errors.append(
                "precision.first_last_layers_bf16 does not work with the delayed recipe "
                "(megatron-core refuses it); use tensorwise, blockwise or mxfp8"
            )
        per_stage = cfg.model.num_layers // max(cfg.parallel.pipeline, 1)
        for key in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
            n = getattr(pr, key)
            if not 0 <= n <= per_stage:
                errors.append(f"precision.{key} ({n}) must be in [0, layers per pipeline stage ({per_stage})]")
    width_multiple, token_multiple = alignment(recipe if recipe != "auto" else "tensorwise")
    name = recipe if recipe != "auto" else "per-tensor FP8"
    for what, width in gemm_widths(cfg):
        if width % width_multiple:
            errors.append(f"{name} GEMMs need dimensions divisible by {width_multiple}: {what} is {width}")
    tokens = cfg.data.seq_length * cfg.training.micro_batch_size // max(cfg.parallel.context, 1)
    if tokens % token_multiple:
        errors.append(
            f"{name} GEMMs need the tokens per micro-batch (data.seq_length x training.micro_batch_size / "
            f"parallel.context = {tokens}) divisible by {token_multiple}"
        )
    return errors


def select_recipe(requested: str, capability: Optional[Tuple[int, int]], te_version: Optional[str]) -> str:
    """The recipe to run for ``requested`` on a GPU of ``capability`` with TE ``te_version``.

    Raises PrecisionError for a GPU without FP8 (capability < 8.9), MXFP8 off Blackwell, or
    a recipe the installed TransformerEngine lacks."""
    if te_version is None:
        raise PrecisionError(
            "precision.dtype=fp8 needs TransformerEngine, which is not installed (or does not import); "
            "use precision.dtype=bf16, or run in a container with transformer_engine"
        )
    if capability is None:
        raise PrecisionError("precision.dtype=fp8 needs a CUDA GPU; none is visible")
    major, minor = capability
    cc = f"{major}.{minor}"
    if (major, minor) < (8, 9):
        raise PrecisionError(f"FP8 needs compute capability >= 8.9 (Ada/Hopper/Blackwell); this GPU is {cc}")
    te = _version_tuple(te_version)
    if requested == "auto":
        if major == 10:
            requested = "mxfp8"
        else:
            requested = "tensorwise" if te >= (2, 2) else "delayed"
    if requested == "mxfp8" and major != 10:
        raise PrecisionError(
            f"precision.fp8_recipe=mxfp8 needs a Blackwell data-center GPU (compute capability 10.x); "
            f"this GPU is {cc}. Use tensorwise, delayed or blockwise (or auto)"
        )
    needs = {"mxfp8": (2, 1), "tensorwise": (2, 2), "blockwise": (2, 3), "delayed": (1, 0)}[requested]
    if te < needs:
        raise PrecisionError(
            f"precision.fp8_recipe={requested} needs TransformerEngine >= {'.'.join(map(str, needs))}; "
            f"installed is {te_version}"
        )
    return requested


def _detect() -> Tuple[Optional[Tuple[int, int]], Optional[str]]:
    """(compute capability of the current GPU, TE version) of this machine; None where absent."""
    import torch  # only here and in mfu_precision: config checks never import torch

    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    te_version = None
    if transformer_engine_available():
        import transformer_engine

        te_version = getattr(transformer_engine, "__version__", "0")
    return capability, te_version


def resolve_fp8(
    cfg: Config, capability: Optional[Tuple[int, int]] = None, te_version: Optional[str] = None, detect: bool = True
) -> Optional[Fp8Settings]:
    """FP8 settings for the run, or None when ``precision.dtype`` is not ``fp8``.

    With ``detect`` the GPU capability and TE version of this machine are used where not
    given. Raises PrecisionError (a ConfigError) before any layer is built."""
    pr = cfg.precision
    if pr.dtype != "fp8":
        return None
    if detect and (capability is None or te_version is None):
        found_cc, found_te = _detect()
        capability = capability or found_cc
        te_version = te_version or found_te
    recipe = select_recipe(pr.fp8_recipe, capability, te_version)
    errors = check_fp8_config(cfg, recipe)
    if errors:
        raise PrecisionError("; ".join(errors))
    fmt = pr.fp8_format
    if fmt == "auto":
        # Block-scaled recipes keep E4M3 everywhere (their scales absorb the range); per-tensor
        # recipes use E5M2 for gradients, whose range E4M3 cannot hold with a single scale.
        fmt = "e4m3" if recipe in ("mxfp8", "blockwise") else "hybrid"
    return Fp8Settings(
        recipe=recipe,
        format=fmt,
        param=pr.fp8_param,
        first_last_layers_bf16=pr.first_last_layers_bf16,
        num_layers_at_start_in_bf16=pr.num_layers_at_start_in_bf16,
        num_layers_at_end_in_bf16=pr.num_layers_at_end_in_bf16,
    )


def mfu_precision(tf_config, dtype) -> str:
    """Key of ``parallel.hardware.PEAK_TFLOPS`` for the run's GEMM precision."""
    fp8 = getattr(tf_config, "fp8", None)
    if fp8:
        return "mxfp8" if str(getattr(tf_config, "fp8_recipe", "")).endswith("mxfp8") else "fp8"
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
