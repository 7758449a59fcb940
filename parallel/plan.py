"""Layout planning: per-GPU memory, FLOPs and step time of a config on N GPUs, from formulas.

Everything here is arithmetic on the config; nothing is allocated. The formulas, per GPU
(the most loaded pipeline stage is reported; ``t, p, v, c, e`` = tensor, pipeline,
virtual-pipeline, context, expert parallel sizes; ``d = world / (t p c)`` data parallel;
``d_e = world / (e t p)`` expert data parallel):

Parameters (``models.params.parameter_counts``), exactly as megatron-core's GPTModel lays them out:
  per layer: norms ``h`` (``2h`` with LayerNorm biases) x 2; QKV ``(q + 2 kv) h``;
  output projection ``q h``; MLP ``(2f if SwiGLU else f) h + f h`` (+ biases); MoE layers:
  router ``E h`` and ``E`` expert MLPs of width ``f_e``. Plus the word embedding
  ``V_pad h``, learned positions ``S_max h``, the final norm and, untied, the output layer.
  The per-GPU share divides matrices and column-parallel biases by ``t`` (norms and
  row-parallel biases are replicated), experts by ``e t``, and gives the first stage the
  embedding and the last stage the final norm and the output layer (a copy of the
  embedding when tied and ``p > 1``, as megatron-core does).

Model state bytes per parameter:
  weights ``w`` = 2 (bf16/fp16/fp8 runs; 1 for the FP8 GEMM weights with ``fp8_param``)
  or 4 (fp32); gradients 4 (``grad_reduce_in_fp32`` or fp32 training) else 2;
  Adam state 8 (fp32 exp_avg + exp_avg_sq) + 4 for fp32 master weights when ``w`` < 4.
  With the distributed optimizer the Adam state (and master weights) is divided by ``d``
  (experts: ``d_e``).

Activations saved for backward, per layer and micro-batch, ``T = s b / c`` tokens,
``a`` = 2 bytes (bf16, also counted so under FP8) or 4 (fp32); ``[h]`` terms are divided
by ``t`` with sequence parallelism:
  ``a T ( 4[h] + (3 q + 2 kv)/t + mlp )`` where the four ``[h]`` are the inputs of the two
  norms, of the QKV projection and of the first MLP GEMM; ``3q + 2kv`` are what flash/SDPA
  attention keeps (q, k, v, its output) plus the output projection's input copy (kernels
  that never materialise the ``s x s`` scores are assumed); ``mlp`` = ``4 f/t`` for SwiGLU
  (fc1 output ``2f``, SiLU output, product), ``2 f/t`` for GELU; MoE: ``k (2h + mlp_e)``
  for the ``k`` dispatched copies of every token plus fp32 router logits/probabilities.
  Hidden dropout adds 2 one-byte masks of ``[h]``.
  Recompute: ``selective`` (core attention) drops the attention output ``q/t``; ``full``
  keeps only each layer's input ``a T [h]`` plus one layer's full activations during its
  recomputation.
  Micro-batches in flight on the first stage: ``min(m, p)`` (1F1B), times
  ``1 + (p - 1)/(p v)`` with interleaving; each holds ``L / p`` layers.
  Logits on the last stage, once: ``T V_pad / t (a + 8)`` bytes (the logits, the fp32
  softmax kept by the cross entropy, and its fp32 gradient).

FLOPs per step: ``ModelConfig.flops_per_token`` x tokens per step. Estimated step time =
FLOPs per step / (GPUs x dense peak of the GPU and precision x MFU), at the MFU the user
states (model FLOPs: the extra forward of recompute is not counted as useful work).

Fit: total against the GPU's memory minus a reserve (default 10%) for the CUDA context,
NCCL buffers and allocator fragmentation. GPU memory (vendor figures): H100 SXM 80 GB,
H200 141 GB, B200 180 GB (NVIDIA DGX B200 / HGX B200: 1,440 GB over 8 GPUs).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from engine.config import Config, ConfigCheck, ConfigError, validate
from models.params import ParameterCounts, attention_dims, norm_params, parameter_counts
from parallel.hardware import GPU_MEMORY_GB, PEAK_TFLOPS

__all__ = ["GIB", "GPU_MEMORY_GB", "ParameterCounts", "parameter_counts", "make_plan", "gpu_memory", "suggest"]

GIB = 2**30


@dataclass
class GpuPlan:
    """Per-GPU figures of the most loaded pipeline stage, in bytes unless named otherwise."""

    params: int
    params_dense: int
    params_expert: int
    weights: float
    grads: float
    optimizer: float
    optimizer_no_do: float
    optimizer_do: float
    activations: float
    activations_by_recompute: Dict[str, float]
    total: float
    stage: str


@dataclass
class Plan:
    """Everything ``python -m engine plan`` prints."""

    world: int
    tensor: int
    pipeline: int
    virtual: int
    context: int
    expert: int
    data: int
    expert_data: int
    micro_batches: int
    counts: ParameterCounts
    gpu: GpuPlan
    gpu_name: str
    capacity_gib: float
    usable_gib: float
    fits: bool
    flops_per_step: float
    tokens_per_step: int
    precision: str
    peak_tflops: Optional[float]
    mfu: float
    step_time_s: Optional[float]
    suggestion: Optional[Dict[str, object]] = None
    notes: List[str] = field(default_factory=list)


def _dtype_bytes(cfg: Config, auto: str = "bf16") -> int:
    dtype: str = cfg.precision.dtype
    if dtype == "auto":
        dtype = auto
    return 4 if dtype == "fp32" else 2


def stage_parameters(cfg: Config, counts: ParameterCounts, stage: str) -> Dict[str, int]:
    """Parameters one GPU of pipeline stage ``stage`` (first/middle/last/only) holds."""
    m, p = cfg.model, cfg.parallel
    t, e = p.tensor, p.expert
    h = m.hidden_size
    layers = m.num_layers // p.pipeline
    # Replicated across TP: norms and row-parallel biases; everything else is split by t.
    replicated_per_layer = 2 * norm_params(m) + (h if m.add_bias else 0) * (1 if m.num_experts else 2)
    dense_layer = (counts.per_layer_dense - replicated_per_layer) // t + replicated_per_layer
    dense_layer += counts.per_layer_router  # the router is replicated
    expert_layer = counts.per_layer_expert // (e * t)
    dense = layers * dense_layer
    vocab_rows = m.padded_vocab_size * h // t
    if stage in ("first", "only"):
        dense += vocab_rows + (m.max_seq_length * h if m.position_embedding == "learned_absolute" else 0)
    if stage in ("last", "only"):
        dense += counts.final_norm
        if not m.tie_embeddings or stage == "last":
            dense += vocab_rows  # untied output layer, or the tied copy on the last stage
    return {"dense": dense, "expert": layers * expert_layer}


def activation_bytes(
    cfg: Config,
    dp: int,
    recompute: Optional[str] = None,
    micro_batch: Optional[int] = None,
    act_bytes: Optional[int] = None,
) -> Dict[str, float]:
    """Activation bytes per GPU: ``first`` stage (most micro-batches in flight) and ``last``
    stage (one micro-batch in flight, plus the logits); equal when there is one stage."""
    m, p, t_cfg = cfg.model, cfg.parallel, cfg.training
    recompute = recompute or t_cfg.recompute
    b = micro_batch or t_cfg.micro_batch_size
    a = act_bytes or _dtype_bytes(cfg)
    t, h = p.tensor, m.hidden_size
    tokens = cfg.data.seq_length * b / p.context
    q, kv = attention_dims(m)
    hs = h / t if p.sequence_parallel else h  # [h]-sized tensors: split by TP only with SP
    mats = 4 if m.activation == "swiglu" else 2
    if m.num_experts:
        fe = m.expert_ffn_hidden_size
        mlp = m.moe_router_topk * (2 * h + mats * fe / t) + 2 * m.num_experts * 4 / a
    else:
        mlp = mats * m.ffn_hidden_size / t
    dropout_masks = 2 * hs / a if m.hidden_dropout > 0 else 0.0
    full_layer = a * tokens * (4 * hs + (3 * q + 2 * kv) / t + mlp + dropout_masks)
    if recompute == "full":
        saved, extra = a * tokens * hs, full_layer  # layer inputs + one layer being recomputed
    elif recompute == "selective":
        saved, extra = full_layer - a * tokens * q / t, 0.0
    else:
        saved, extra = full_layer, 0.0
    layers = m.num_layers // p.pipeline
    micro = max(t_cfg.global_batch_size // (b * max(dp, 1)), 1)
    in_flight: float = min(micro, p.pipeline)
    if p.virtual_pipeline:
        in_flight *= 1 + (p.pipeline - 1) / (p.pipeline * p.virtual_pipeline)
    logits = tokens * m.padded_vocab_size / t * (a + 8)
    if p.pipeline == 1:
        one = layers * saved + extra + logits
        return {"first": one, "last": one}
    return {"first": in_flight * layers * saved + extra, "last": layers * saved + extra + logits}


def gpu_memory(
    cfg: Config,
    counts: ParameterCounts,
    world: int,
    recompute: Optional[str] = None,
    micro_batch: Optional[int] = None,
    on_cpu: bool = False,
) -> GpuPlan:
    """Per-GPU memory of the most loaded stage (bytes), with the formulas of the module docstring.

    ``on_cpu``: ``precision.dtype: auto`` means fp32 (as the engine does on CPU), not bf16."""
    p = cfg.parallel
    d = p.data_parallel(world)
    de = p.expert_data_parallel(world)
    w = _dtype_bytes(cfg, "fp32" if on_cpu else "bf16")
    fp32_training = w == 4
    g = 4 if (cfg.precision.grad_reduce_in_fp32 or fp32_training) else 2
    o = 8 + (0 if fp32_training else 4)
    acts_all = {r: activation_bytes(cfg, d, r, micro_batch, w) for r in ("none", "selective", "full")}
    plans: List[GpuPlan] = []
    for stage in ["only"] if p.pipeline == 1 else ["first", "last"]:
        sp = stage_parameters(cfg, counts, stage)
        n = sp["dense"] + sp["expert"]
        weight_bytes = n * w
        if cfg.precision.dtype == "fp8" and cfg.precision.fp8_param:
            weight_bytes = n * 1  # GEMM weights in FP8 (norms/biases are a negligible rest)
        opt_no_do = n * o
        opt_do = sp["dense"] * o / d + sp["expert"] * o / de
        opt = opt_do if p.distributed_optimizer else opt_no_do
        key = "last" if stage == "last" else "first"
        by_recompute = {r: v[key] for r, v in acts_all.items()}
        acts = by_recompute[recompute or cfg.training.recompute]
        total = weight_bytes + n * g + opt + acts
        plan = GpuPlan(
            n, sp["dense"], sp["expert"], weight_bytes, n * g, opt, opt_no_do, opt_do, acts, by_recompute, total, stage
        )
        plans.append(plan)
    return max(plans, key=lambda candidate: candidate.total)  # the first of equals, as before


def _precision_key(cfg: Config, gpu: str) -> str:
    dtype = cfg.precision.dtype
    if dtype == "fp8":
        recipe = cfg.precision.fp8_recipe
        if recipe == "mxfp8" or (recipe == "auto" and gpu in ("b200", "gb200")):
            return "mxfp8"
        return "fp8"
    return {"fp16": "fp16", "fp32": "fp32"}.get(dtype, "bf16")


def make_plan(
    cfg: Config,
    nodes: int,
    gpus_per_node: int,
    gpu: str,
    mfu: float = 0.4,
    reserve: float = 0.10,
    on_cpu: bool = False,
    checks: Sequence[ConfigCheck] = (),
) -> Plan:
    """Plan ``cfg`` on ``nodes x gpus_per_node`` GPUs of kind ``gpu``; validates the layout first
    (``validate`` with the subsystems' ``checks``: ``engine.run_config.RUN_CHECKS`` from the CLI)."""
    # The CLI checks these in argparse; callers of the function get the same words.
    for name, value, ok, shown in (
        ("nodes", nodes, nodes >= 1, ">= 1"),
        ("gpus_per_node", gpus_per_node, gpus_per_node >= 1, ">= 1"),
        ("mfu", mfu, 0 < mfu <= 1, "in (0, 1]"),
        ("reserve", reserve, 0 <= reserve < 1, "in [0, 1)"),
    ):
        if not ok:
            raise ConfigError(f"plan: {name} must be {shown}, got {value}")
    world = nodes * gpus_per_node
    validate(cfg, world, checks)
    p, t = cfg.parallel, cfg.training
    d = p.data_parallel(world)
    counts = parameter_counts(cfg.model)
    mem = gpu_memory(cfg, counts, world, on_cpu=on_cpu)
    capacity = GPU_MEMORY_GB.get(gpu, 0.0)
    usable = capacity * (1 - reserve)
    fits = mem.total / GIB <= usable if capacity else True
    tokens = t.global_batch_size * cfg.data.seq_length
    flops = cfg.model.flops_per_token(cfg.data.seq_length) * tokens
    precision = _precision_key(cfg, gpu)
    peak = PEAK_TFLOPS.get(gpu, {}).get(precision)
    step = flops / (world * peak * 1e12 * mfu) if peak else None
    plan = Plan(
        world=world,
        tensor=p.tensor,
        pipeline=p.pipeline,
        virtual=p.virtual_pipeline or 1,
        context=p.context,
        expert=p.expert,
        data=d,
        expert_data=p.expert_data_parallel(world),
        micro_batches=t.global_batch_size // (t.micro_batch_size * d),
        counts=counts,
        gpu=mem,
        gpu_name=gpu,
        capacity_gib=capacity,
        usable_gib=usable,
        fits=fits,
        flops_per_step=flops,
        tokens_per_step=tokens,
        precision=precision,
        peak_tflops=peak,
        mfu=mfu,
        step_time_s=step,
    )
    if cfg.precision.dtype == "fp8":
        plan.notes.append(
            "activations are counted at bf16 width; TransformerEngine keeps some FP8 "
            "GEMM inputs in 8 bits, so an FP8 run needs somewhat less"
        )
    if capacity and not fits:
        plan.suggestion = suggest(cfg, counts, world, usable)
    return plan


def suggest(cfg: Config, counts: ParameterCounts, world: int, usable_gib: float) -> Dict[str, object]:
    """The first (recompute, micro-batch) that fits, cheapest recompute first, largest batch first."""
    p, t = cfg.parallel, cfg.training
    d = p.data_parallel(world)
    options = [cfg]
    if not p.distributed_optimizer:
        do = copy.deepcopy(cfg)
        do.parallel.distributed_optimizer = True
        options.append(do)
    for c in options:
        for recompute in ("none", "selective", "full"):
            mbs = t.micro_batch_size
            while mbs >= 1:
                if t.global_batch_size % (mbs * d) == 0:
                    mem = gpu_memory(c, counts, world, recompute=recompute, micro_batch=mbs)
                    if mem.total / GIB <= usable_gib:
                        return {
                            "training.micro_batch_size": mbs,
                            "training.recompute": recompute,
                            "parallel.distributed_optimizer": c.parallel.distributed_optimizer,
                            "total_gib": mem.total / GIB,
                        }
                mbs //= 2
    return {"none": "no micro-batch size / recompute fits: add GPUs, raise parallel.tensor or parallel.pipeline"}
