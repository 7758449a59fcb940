"""Build megatron-core ``GPTModel`` chunks (one per virtual pipeline stage) from the config."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Protocol

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from engine.config import Config, ConfigError, ModelConfig, ParallelConfig, PerformanceConfig
from models import performance as perf_lib
from models.params import active_parameters
from models.specs import layer_spec

log = logging.getLogger(__name__)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU (tanh approximation, ``gelu_new`` in transformers)."""
    return F.gelu(x, approximate="tanh")


def resolve_dtype(name: str) -> torch.dtype:
    """Map ``precision.dtype`` to a torch dtype; ``auto`` is bf16 on CUDA and fp32 on CPU.

    ``fp8`` keeps parameters and activations in bf16 (TransformerEngine runs the GEMMs in FP8)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.bfloat16}[name]


class Fp8Fields(Protocol):
    """The FP8 settings the builder needs (``engine.precision.Fp8Settings`` is one); the engine
    resolves them against the GPU and TransformerEngine and passes them in."""

    def transformer_kwargs(self) -> Dict[str, Any]:
        """FP8 fields of megatron-core's TransformerConfig."""

    def describe(self) -> str:
        """One line for the log."""


def transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    dtype: torch.dtype = torch.float32,
    recompute: str = "none",
    on_cpu: Optional[bool] = None,
    fp8: Optional[Dict[str, Any]] = None,
    performance: Optional[PerformanceConfig] = None,
) -> TransformerConfig:
    """megatron-core ``TransformerConfig`` for ``model`` under ``parallel``.

    The jit fusions follow ``performance`` (defaults: on with CUDA, off on CPU) and weights
    are initialised on the CPU without CUDA. ``fp8`` holds the FP8 fields
    (``Fp8Fields.transformer_kwargs``), None for no FP8."""
    if on_cpu is None:
        on_cpu = not torch.cuda.is_available()
    if performance is None:
        performance = PerformanceConfig()
    swiglu = model.activation == "swiglu"
    # Keyword arguments of megatron-core's TransformerConfig: values of many types (ints, dtypes,
    # callables, tuples), checked by the dataclass itself.
    kwargs: Dict[str, Any] = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        kv_channels=model.kv_channels,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else gelu_tanh,
        add_bias_linear=model.add_bias,
        add_qkv_bias=model.add_bias,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_std,
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        context_parallel_size=parallel.context,
        expert_model_parallel_size=parallel.expert,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Loss is normalised by the valid tokens of the whole global batch (finalize_model_grads).
        calculate_per_token_loss=True,
        use_cpu_initialization=on_cpu,
        # SDPAAttention replaces megatron's softmax, so masked_softmax_fusion only matters for
        # the TE spec's fallbacks; it needs megatron's CUDA extension.
        masked_softmax_fusion=not on_cpu,
        **perf_lib.fusion_kwargs(performance, on_cpu, swiglu or model.add_bias, dtype),
        apply_rope_fusion=False,  # needs TE or apex kernels; the torch path is exact
        gradient_accumulation_fusion=False,  # needs apex/TE fused wgrad kernels
        persist_layer_norm=False,
        window_size=(model.sliding_window - 1, 0) if model.sliding_window else None,
        window_attn_skip_freq=model.window_layers(),
    )
    if model.num_experts:
        kwargs.update(
            num_moe_experts=model.num_experts,
            moe_router_topk=model.moe_router_topk,
            moe_ffn_hidden_size=model.expert_ffn_hidden_size,
            moe_aux_loss_coeff=model.moe_aux_loss_coeff,
            moe_router_load_balancing_type="aux_loss",
            moe_token_dispatcher_type=model.moe_token_dispatcher,
            moe_grouped_gemm=model.moe_grouped_gemm,
        )
    if recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":
        kwargs.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    if fp8:
        kwargs.update(fp8)
    return TransformerConfig(**kwargs)


def describe_fusions(config: TransformerConfig) -> str:
    """For the log: which of megatron-core's jit fusions are on."""
    names = {
        "bias_activation_fusion": "bias-activation",
        "bias_dropout_fusion": "bias-dropout-add",
        "cross_entropy_loss_fusion": "cross-entropy (native)",
    }
    on = [label for field, label in names.items() if getattr(config, field)]
    return "jit fusions: " + (", ".join(on) if on else "none")


@dataclass
class BuiltModel:
    """Model chunks of this rank and how they were built."""

    chunks: List[torch.nn.Module]
    config: TransformerConfig
    spec_description: str


def build_gpt_chunks(
    cfg: Config, dtype: torch.dtype, use_te: Optional[bool] = None, fp8: Optional[Fp8Fields] = None
) -> BuiltModel:
    """Construct this rank's ``GPTModel`` chunk(s); parallel_state must be initialised.

    ``fp8``: the run's resolved FP8 settings (``engine.precision.resolve_fp8``, which refuses
    FP8 without TE, or a recipe the GPU lacks, before any layer exists); required with
    ``precision.dtype: fp8``, so no caller builds a bf16 model for an FP8 config by omission."""
    if cfg.precision.dtype == "fp8" and fp8 is None:
        raise ConfigError(
            "precision.dtype is fp8 but no FP8 settings were given to the model builder "
            "(pass fp8=engine.precision.resolve_fp8(cfg))"
        )
    tf_config = transformer_config(
        cfg.model,
        cfg.parallel,
        dtype,
        cfg.training.recompute,
        fp8=fp8.transformer_kwargs() if fp8 else None,
        performance=cfg.performance,
    )
    spec, description = layer_spec(
        cfg.model, use_te, cfg.parallel.sequence_parallel, performance=cfg.performance, dtype=dtype
    )
    if fp8:
        description += f"; {fp8.describe()}"
    description += "; " + describe_fusions(tf_config)
    vp = cfg.parallel.virtual_pipeline
    chunks = []
    for stage in range(vp or 1):
        vp_stage = stage if vp else None
        model = GPTModel(
            config=tf_config,
            transformer_layer_spec=spec,
            vocab_size=cfg.model.padded_vocab_size,
            max_sequence_length=cfg.model.max_seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=cfg.model.tie_embeddings,
            position_embedding_type=cfg.model.position_embedding,
            rotary_base=cfg.model.rotary_base,  # a float theta must not be truncated
            vp_stage=vp_stage,
        )
        _cast_parameters(model, dtype)
        chunks.append(model)
    if cfg.performance.compile_layers:
        description += f"; torch.compile on {perf_lib.compile_layers(chunks)} layers"
    return BuiltModel(chunks=chunks, config=tf_config, spec_description=description)


def _cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every floating parameter in ``dtype``, as Megatron-LM's Float16Module makes it.

    Without TE, megatron-core's torch norms (and GPT-2's learned position embeddings) are
    created in fp32 whatever ``params_dtype`` says. A bf16 model with fp32 norms breaks
    megatron-core 0.16.1's distributed optimizer when it gathers its state for a checkpoint:
    its param-to-state map assumes one dtype per parameter group, so a norm's state lands
    on the embedding's slot and the save fails with a size mismatch. Parameters only:
    buffers such as RoPE frequencies keep their precision."""
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)


@dataclass
class ParameterCount:
    """Parameters of a model: all of them, and those one token passes through."""

    total: int
    active: int
    embedding: int


def count_parameters(chunks: List[torch.nn.Module], model: ModelConfig) -> ParameterCount:
    """Count the unique parameters of fully built (TP=PP=1) chunks: what megatron-core really
    allocated, to hold against ``models.params.parameter_counts`` (the formula).

    ``active`` counts, for MoE layers, only ``moe_router_topk`` of ``num_experts`` experts
    (the rule of ``models.params.active_parameters``)."""
    seen = set()
    total = expert = embedding = 0
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            n = param.numel()
            total += n
            if ".experts." in name:
                expert += n
            if "embedding" in name or "output_layer" in name:
                embedding += n
    return ParameterCount(total=total, active=active_parameters(model, total, expert), embedding=embedding)
