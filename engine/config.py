"""One config tree of typed dataclasses, loaded from YAML plus dotted command-line overrides.

Every key a user writes must land in a field: an unknown or misspelt key is an error that
names the key and the closest valid ones (the seed runs lost weeks to keys a script silently
ignored). Invalid combinations of sizes are reported with the numbers that disagree, before
any process group exists. The resolved tree is printed at start and saved in every
checkpoint (``to_dict`` / ``to_yaml``).

This module is the ground floor of the project: it imports nothing from engine/, models/ or
parallel/, so every layer may import it. What needs the rest of the project is passed in by
the caller: preset resolution (``load_config(..., presets=...)``) and the subsystems' own
checks (``validate(cfg, world, checks=...)``); ``engine.run_config`` assembles both.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import signal
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Dict, List, Literal, Optional, Sequence

import yaml


class ConfigError(ValueError):
    """A config that cannot be run: unknown key, wrong type or inconsistent sizes."""


class ConfigWarning(UserWarning):
    """A config that runs but probably not as meant (e.g. warmup longer than the run)."""


@dataclass(frozen=True)
class Range:
    """Allowed interval of a numeric field, written in its type:
    ``steps: Annotated[int, Range(ge=0)]``. The loader enforces it for YAML keys and
    overrides (``_coerce``); the reference shows it. Bounds left at None are open."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies inside every bound (NaN and infinities never do)."""
        if not math.isfinite(value):
            return False
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def __str__(self) -> str:
        """``>= 1``, ``> 0``, ``in [0, 1)``: how messages and the reference show the range."""

        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else repr(x)

        low = f"[{num(self.ge)}" if self.ge is not None else f"({num(self.gt)}" if self.gt is not None else None
        high = f"{num(self.le)}]" if self.le is not None else f"{num(self.lt)})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        # At most one side is bounded from here on.
        if self.ge is not None:
            return f">= {num(self.ge)}"
        if self.gt is not None:
            return f"> {num(self.gt)}"
        if self.le is not None:
            return f"<= {num(self.le)}"
        if self.lt is not None:
            return f"< {num(self.lt)}"
        return "any finite number"


def field_choices(typ: Any) -> Optional[tuple]:
    """The values a ``Literal[...]`` field allows (looking through Optional and List), or None."""
    if typing.get_origin(typ) is Literal:
        return typing.get_args(typ)
    for arg in typing.get_args(typ):
        if isinstance(arg, type) or typing.get_origin(arg) is not None:
            found = field_choices(arg)
            if found is not None:
                return found
    return None


def field_range(typ: Any) -> Optional[Range]:
    """The Range written in a field's type (looking through Optional and List), or None."""
    if typing.get_origin(typ) is Annotated:
        return next((m for m in typ.__metadata__ if isinstance(m, Range)), None)
    for arg in typing.get_args(typ):
        found = field_range(arg)
        if found is not None:
            return found
    return None


# --------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Architecture of the GPT model. ``preset`` fills every field; keys given next to it
    override the preset's values."""

    preset: Optional[str] = None
    """Name of a preset in ``models.presets`` (e.g. ``tiny-llama``, ``frankenstallm-3b``)."""
    num_layers: Annotated[int, Range(ge=1)] = 2
    """Number of transformer layers."""
    hidden_size: Annotated[int, Range(ge=1)] = 64
    """Model (residual stream) width."""
    num_attention_heads: Annotated[int, Range(ge=1)] = 4
    """Query heads."""
    num_query_groups: Optional[Annotated[int, Range(ge=1)]] = None
    """Key/value heads for grouped-query attention; None means one per query head (MHA)."""
    kv_channels: Optional[Annotated[int, Range(ge=1)]] = None
    """Head dimension; None means hidden_size / num_attention_heads."""
    ffn_hidden_size: Annotated[int, Range(ge=1)] = 256
    """Width of the dense MLP (per gate/up projection for SwiGLU)."""
    vocab_size: Annotated[int, Range(ge=1)] = 256
    """Tokenizer vocabulary size; the embedding is padded to ``make_vocab_size_divisible_by``."""
    make_vocab_size_divisible_by: Annotated[int, Range(ge=1)] = 128
    """Padding multiple for the embedding rows. Independent of TP (it must be divisible by TP)
    so a checkpoint keeps its shapes when it is loaded at another tensor-parallel size."""
    max_seq_length: Annotated[int, Range(ge=1)] = 128
    """Longest sequence the model supports (learned positions table size, RoPE range)."""
    position_embedding: Literal["rope", "learned_absolute"] = "rope"
    """``rope`` or ``learned_absolute``."""
    rotary_base: Annotated[float, Range(gt=0)] = 10000.0
    """RoPE theta."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """``RMSNorm`` or ``LayerNorm`` (pre-norm in both cases)."""
    norm_epsilon: Annotated[float, Range(gt=0)] = 1e-5
    """Epsilon of the normalisation layers."""
    activation: Literal["swiglu", "gelu"] = "swiglu"
    """MLP activation: ``swiglu`` (gated SiLU) or ``gelu``."""
    add_bias: bool = False
    """Biases on linear layers (GPT-2 style) or not (LLaMA style)."""
    tie_embeddings: bool = True
    """Share the input embedding and the output projection."""
    init_std: Annotated[float, Range(gt=0)] = 0.02
    """Standard deviation of the normal weight initialisation."""
    hidden_dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """Dropout on the residual branches."""
    attention_dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """Dropout on the attention probabilities."""
    num_experts: Annotated[int, Range(ge=0)] = 0
    """Experts per MoE layer; 0 means a dense model."""
    moe_router_topk: Annotated[int, Range(ge=1)] = 2
    """Experts each token is routed to."""
    moe_ffn_hidden_size: Optional[Annotated[int, Range(ge=1)]] = None
    """FFN width of one expert; None means ffn_hidden_size."""
    moe_aux_loss_coeff: Annotated[float, Range(ge=0)] = 1e-2
    """Weight of the load-balancing auxiliary loss."""
    moe_token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    """megatron-core token dispatcher: ``alltoall`` or ``allgather``."""
    moe_grouped_gemm: bool = False
    """Use grouped GEMM experts (needs TransformerEngine)."""
    sliding_window: Annotated[int, Range(ge=0)] = 0
    """Sliding-window attention span in tokens; 0 means full causal attention everywhere."""
    sliding_window_layers: Literal["all", "even", "odd"] = "all"
    """Which layers use the window: ``all``, ``even`` or ``odd`` (0-based layer index)."""

    # Derived sizes: computed here only, every other module reads them.
    @property
    def head_dim(self) -> int:
        """Channels per attention head: ``kv_channels``, else hidden_size / num_attention_heads."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        """Key/value heads: ``num_query_groups``, else one per query head (MHA)."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows: vocab padded to a multiple of ``make_vocab_size_divisible_by``."""
        multiple = self.make_vocab_size_divisible_by
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    @property
    def expert_ffn_hidden_size(self) -> int:
        """FFN width of one expert: ``moe_ffn_hidden_size``, else ``ffn_hidden_size``."""
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    def window_layers(self) -> Optional[List[int]]:
        """Per-layer 0/1 list (megatron's ``window_attn_skip_freq``) of sliding-window layers;
        None without a window."""
        if not self.sliding_window:
            return None
        pattern = self.sliding_window_layers
        return [int(pattern == "all" or (pattern == "even") == (i % 2 == 0)) for i in range(self.num_layers)]

    def flops_per_token(self, seq_length: int, training: bool = True) -> float:
        """Model FLOPs per token (matmuls only, 2 per multiply-add; x3 for training).

        Counts projections, MLP (top-k experts for MoE, plus the router), the causal
        (and sliding-window) attention score and value products, and the LM head."""
        h = self.hidden_size
        q_dim, kv_dim = self.num_attention_heads * self.head_dim, self.query_groups * self.head_dim
        proj = 2 * (h * (q_dim + 2 * kv_dim) + q_dim * h)
        mats = 3 if self.activation == "swiglu" else 2
        if self.num_experts:
            mlp = 2 * self.moe_router_topk * mats * h * self.expert_ffn_hidden_size + 2 * h * self.num_experts
        else:
            mlp = 2 * mats * h * self.ffn_hidden_size
        attn = 0.0
        for windowed in self.window_layers() or [0] * self.num_layers:
            keys = attention_keys_per_query(seq_length, self.sliding_window if windowed else 0)
            attn += 2 * 2 * keys * q_dim
        head = 2 * h * self.padded_vocab_size
        forward = self.num_layers * (proj + mlp) + attn + head
        return forward * (3 if training else 1)


def attention_keys_per_query(seq: int, window: int) -> float:
    """Average keys a query attends to under a causal mask, optionally windowed."""
    if window and window < seq:
        # First `window` queries see 1..window keys, the rest see `window`.
        return (window * (window + 1) / 2 + (seq - window) * window) / seq
    return (seq + 1) / 2


@dataclass
class ParallelConfig:
    """How the model and data are split over ranks. Data parallel = world / (TP x PP x CP)."""

    tensor: Annotated[int, Range(ge=1)] = 1
    """Tensor-parallel size (splits heads and FFN columns)."""
    pipeline: Annotated[int, Range(ge=1)] = 1
    """Pipeline-parallel stages."""
    virtual_pipeline: Optional[Annotated[int, Range(ge=1)]] = None
    """Model chunks per pipeline rank (interleaved 1F1B); None for plain 1F1B."""
    context: Annotated[int, Range(ge=1)] = 1
    """Context-parallel size (splits the sequence; needs TransformerEngine)."""
    expert: Annotated[int, Range(ge=1)] = 1
    """Expert-parallel size (splits the experts of each MoE layer)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism with TP (needs TransformerEngine or apex norms; refused
    with a clear error on megatron-core's torch-norm fallback)."""
    distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (megatron-core distributed optimizer)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the forward pass."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend: ``auto`` (NCCL with CUDA, gloo otherwise), ``nccl`` or ``gloo``."""

    @property
    def model_parallel(self) -> int:
        """Ranks holding one model replica: tensor x pipeline x context."""
        return self.tensor * self.pipeline * self.context

    def data_parallel(self, world_size: int) -> int:
        """Data-parallel size implied by ``world_size`` and the model-parallel sizes."""
        return world_size // self.model_parallel

    def expert_data_parallel(self, world_size: int) -> int:
        """Replicas of each expert: ``world_size`` / (expert x tensor x pipeline), at least 1."""
        return max(world_size // (self.expert * self.tensor * self.pipeline), 1)


@dataclass
class BlendEntry:
    """One named dataset of a pretraining blend."""

    name: str = ""
    """Name shown in the logs (realised token share); empty means the file name."""
    path: str = ""
    """Dataset prefix (``path.bin``/``path.idx``)."""
    weight: Annotated[float, Range(gt=0)] = 1.0
    """Relative weight of this dataset in the blend."""


@dataclass
class DataConfig:
    """Where the training tokens come from (indexed ``.bin/.idx`` datasets)."""

    paths: List[str] = field(default_factory=list)
    """Dataset prefixes (``name`` for ``name.bin``/``name.idx``)."""
    weights: Optional[List[Annotated[float, Range(gt=0)]]] = None
    """Blend weights, one per path; None means proportional to size."""
    blend: List[BlendEntry] = field(default_factory=list)
    """Named alternative to ``paths``/``weights``: a list of ``{name, path, weight}`` (weight > 0);
    it fills ``paths`` and ``weights``, and its names label the logged shares."""
    split: str = "98,1,1"
    """Train/valid/test split of every dataset, in parts."""
    tokenizer: Optional[str] = None
    """Tokenizer directory or ``.model`` file; its EOS id ends documents, its size sizes the vocab."""
    eod_id: Annotated[int, Range(ge=0)] = 0
    """End-of-document id of the data when ``tokenizer`` is not given (else the tokenizer's)."""
    seq_length: Annotated[int, Range(ge=1)] = 128
    """Training sequence length."""
    cache_dir: Optional[str] = None
    """Where megatron-core writes its index caches; None means ``<checkpoint.dir>/data_cache``."""
    mock: bool = False
    """Random tokens instead of files (benchmarks only)."""
    seed: Annotated[int, Range(ge=0, le=2**32 - 1)] = 1234
    """Seed of the dataset shuffles (independent of the model seed)."""
    num_workers: Annotated[int, Range(ge=0)] = 0
    """DataLoader worker processes per rank."""
    chat_template: str = "chatml"
    """Chat template of SFT/preference data and generation: ``chatml``, ``alpaca`` or a path to a
    ``.jinja`` file; must be the one the data was preprocessed with (checked against its sidecar)."""
    packing: bool = True
    """SFT: pack several conversations into one sequence; micro-batches run in megatron-core's
    THD layout (``PackedSeqParams``), so attention and positions stay within each conversation
    (TransformerEngine or the torch-native spec). Not combinable with ``parallel.context`` > 1."""
    replay_paths: List[str] = field(default_factory=list)
    """SFT: pretraining dataset prefixes replayed next to the SFT data (full loss mask)."""
    replay_weights: Optional[List[Annotated[float, Range(gt=0)]]] = None
    """SFT: blend weights of ``replay_paths``; None means proportional to size."""
    replay_ratio: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """SFT: target share of replayed data in training, e.g. 0.3; realised share is logged."""
    replay_by: Literal["tokens", "samples"] = "tokens"
    """SFT: what the replay ratio counts: ``tokens`` (loss tokens) or ``samples``."""


@dataclass
class OptimizerConfig:
    """AdamW through megatron-core's optimizer (fp32 master weights and state)."""

    lr: Annotated[float, Range(ge=0)] = 3e-4
    """Peak learning rate (0 freezes the weights: an evaluation-only baseline run)."""
    min_lr: Annotated[float, Range(ge=0)] = 3e-5
    """Learning rate at the end of the decay."""
    weight_decay: Annotated[float, Range(ge=0)] = 0.1
    """Decoupled weight decay; never applied to norms, biases and embeddings."""
    beta1: Annotated[float, Range(ge=0, lt=1)] = 0.9
    """Adam beta1."""
    beta2: Annotated[float, Range(ge=0, lt=1)] = 0.95
    """Adam beta2."""
    eps: Annotated[float, Range(gt=0)] = 1e-8
    """Adam epsilon."""
    clip_grad: Annotated[float, Range(ge=0)] = 1.0
    """Global gradient-norm clipping threshold (0 disables)."""


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup then decay to ``optimizer.min_lr``."""

    warmup_steps: Annotated[int, Range(ge=0)] = 0
    """Steps of linear warmup from 0 to the peak LR."""
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """``cosine``, ``linear`` or ``constant``."""
    decay_steps: Optional[Annotated[int, Range(ge=1)]] = None
    """Steps from the start to the end of the decay; None means ``training.steps``."""


@dataclass
class TrainingConfig:
    """Batch sizes, length of the run, evaluation and the objective."""

    steps: Annotated[int, Range(ge=0)] = 100
    """Optimizer steps to train for (0 writes the freshly initialised model as a checkpoint)."""
    global_batch_size: Annotated[int, Range(ge=1)] = 8
    """Sequences per optimizer step, over all data-parallel ranks."""
    micro_batch_size: Annotated[int, Range(ge=1)] = 1
    """Sequences per forward pass on one rank."""
    seed: Annotated[int, Range(ge=0, le=2**32 - 1)] = 1234
    """Seed of weight initialisation and dropout."""
    eval_interval: Annotated[int, Range(ge=0)] = 0
    """Steps between validation runs; 0 disables validation."""
    eval_steps: Annotated[int, Range(ge=1)] = 2
    """Global batches per validation run."""
    eval_at_start: bool = False
    """Also validate before the first step of a fresh run (logged as step 0): the baseline a
    fine-tuning stage's validation metrics are compared with (e.g. ORPO's held-out accuracy)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: ``none``, ``selective`` (attention core) or ``full``."""
    exit_on_nonfinite: bool = True
    """A step whose loss or gradient norm is NaN/Inf is always skipped (no update, no scheduler
    step; iteration and data position advance). True: more than ``max_skipped_steps`` such
    steps in a row stop the run with exit code 3 after checkpointing the unchanged, finite
    state. False: the run continues and counts them (``skipped_total`` in the log). Either
    way no checkpoint with non-finite weights is written."""
    max_skipped_steps: Annotated[int, Range(ge=0)] = 0
    """Consecutive non-finite (skipped) steps tolerated before ``exit_on_nonfinite`` stops the
    run; 0 stops at the first."""


@dataclass
class OrpoConfig:
    """ORPO settings (``objective.orpo``), read when ``objective.name`` is ``orpo``."""

    weight: Annotated[float, Range(ge=0)] = 0.25
    """Weight of the odds-ratio term (the paper's lambda, TRL's ``beta``); rewards are reported
    as weight x mean log-prob."""
    nll_includes_prompt: bool = False
    """The NLL term also covers the prompt tokens of the chosen sequence (TRL's behaviour)."""


@dataclass
class DpoConfig:
    """DPO settings (``objective.dpo``), read when ``objective.name`` is ``dpo``."""

    beta: Annotated[float, Range(gt=0)] = 0.1
    """Inverse temperature of the implicit reward."""
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """Loss: ``sigmoid`` (with ``label_smoothing``), ``ipo`` or ``hinge``."""
    label_smoothing: Annotated[float, Range(ge=0, lt=0.5)] = 0.0
    """Sigmoid loss: assumed probability that a preference label is flipped (conservative DPO)."""
    reference: Optional[str] = None
    """Reference checkpoint whose log-probabilities are computed once (forward only) and
    stored (see ``reference_cache_dir``); None means ``checkpoint.init_from``."""
    reference_cache_dir: Optional[str] = None
    """Directory of the stored reference log-probabilities (keyed on the data's bytes, the
    reference weights, sequence length, chat template, pad id and dtype); None means next to
    the dataset when that directory is writable, else ``<checkpoint.dir>/reference_cache``."""


@dataclass
class DistillLayerPair:
    """One intermediate-layer pair of ``objective.distill.intermediate_layer_pairs``."""

    student: str = ""
    """Module name in the student ``GPTModel`` whose output is matched, e.g.
    ``decoder.final_layernorm`` or ``decoder.layers.3.pre_mlp_layernorm`` (global layer
    number; under pipeline parallelism it must lie on the last stage)."""
    teacher: str = ""
    """Module name in the teacher whose output is the target."""
    loss: Literal["cosine", "mse"] = "cosine"
    """modelopt's loss between the two outputs: ``cosine`` (HiddenStateCosineLoss; use it on
    norm outputs, which have the full hidden size under tensor parallelism) or ``mse``."""


@dataclass
class DistillConfig:
    """Knowledge distillation (``objective.distill``), read when ``objective.name`` is
    ``distill``: the fields of modelopt's Megatron KD config (``DistillationConfig`` of
    ``modelopt.torch.distill.plugins.megatron``, Megatron-LM's ``--export-kd-cfg`` YAML)."""

    teacher: Optional[str] = None
    """Teacher checkpoint, or a run directory (its newest complete checkpoint), saved by the
    engine at any TP/PP layout. Its architecture is read from its ``config.yaml``; it is
    built at the student's parallel layout and dtype, loaded, frozen (no gradient, eval
    mode) and never saved with the student. Its vocabulary must be the student's."""
    logit_kl_temperature: Annotated[float, Range(gt=0)] = 1.0
    """Both models' logits are divided by it before the KL divergence KL(teacher || student)
    per token (modelopt's LogitsKLLoss; no T^2 factor)."""
    logit_kl_topk: Optional[Annotated[int, Range(ge=1)]] = None
    """When set, the KL divergence is taken over the teacher's top-k vocabulary entries only
    (modelopt's TopKLogitsKLLoss)."""
    intermediate_layer_pairs: List[DistillLayerPair] = field(default_factory=list)
    """Extra losses between intermediate outputs (``{student, teacher, loss}`` entries);
    modelopt scales their mean to the logit loss's magnitude. Student and teacher must have
    the same hidden size (modelopt's projection layer for unequal sizes is not supported)."""
    skip_lm_loss: bool = True
    """True: train on the distillation loss alone. False: train on LM loss + kd_loss_scale x
    distillation loss, the distillation loss first rescaled to the LM loss's magnitude per
    micro-batch (modelopt's LogitsAndIntermediatesLossBalancer). The LM loss is logged either way."""
    kd_loss_scale: Annotated[float, Range(gt=0)] = 1.0
    """Weight of the (rescaled) distillation loss next to the LM loss; used when
    ``skip_lm_loss`` is false."""


@dataclass
class ObjectiveConfig:
    """What the model is trained to do; each name is one object in ``engine/objectives``, and
    an objective with settings reads them from its own sub-section (``objective.orpo``,
    ``objective.dpo``, ``objective.distill``)."""

    name: Literal["pretrain", "sft", "orpo", "dpo", "distill"] = "pretrain"
    """Objective: ``pretrain`` (next-token loss on every token), ``sft`` (loss on assistant
    tokens, optional replay), ``orpo`` or ``dpo`` (preference pairs), ``distill`` (knowledge
    distillation from a teacher checkpoint on pretraining data, through nvidia-modelopt)."""
    orpo: OrpoConfig = field(default_factory=OrpoConfig)
    """ORPO settings (used when ``name`` is ``orpo``)."""
    dpo: DpoConfig = field(default_factory=DpoConfig)
    """DPO settings (used when ``name`` is ``dpo``)."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Knowledge-distillation settings (used when ``name`` is ``distill``)."""


# Keys that moved: an old config names the new place instead of "unknown key".
MOVED_KEYS = {
    "objective.orpo_lambda": "objective.orpo.weight",
    "objective.nll_includes_prompt": "objective.orpo.nll_includes_prompt",
    "objective.beta": "objective.dpo.beta",
    "objective.dpo_loss": "objective.dpo.loss",
    "objective.label_smoothing": "objective.dpo.label_smoothing",
    "objective.reference": "objective.dpo.reference",
    "objective.reference_cache_dir": "objective.dpo.reference_cache_dir",
}


QuantFormat = Literal["fp8", "int8", "int8_sq", "int4_awq", "w4a8_awq", "nvfp4"]
"""Quantization formats of ``python -m engine quantize`` and ``precision.qat`` (modelopt configs
in ``engine/optimization/quantize.py``)."""


LoraTarget = Literal["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
"""Linear layers of a transformer layer that can carry a LoRA adapter (megatron-core names)."""


@dataclass
class LoraConfig:
    """LoRA adapters (``finetune.lora``) through nvidia-modelopt (``pip install -e .[opt]``):
    every targeted linear ``W`` gets ``W x + (alpha / rank) * B A dropout(x)`` with ``A``
    random and ``B`` zero, so training starts exactly at the base model. Only ``A`` and ``B``
    train and are checkpointed; the base weights come from ``checkpoint.init_from``."""

    rank: Annotated[int, Range(ge=1)] = 16
    """Inner dimension r of the adapters (A: r x in, B: out x r)."""
    alpha: Annotated[float, Range(gt=0)] = 32.0
    """Scale numerator: the adapter output is multiplied by ``alpha / rank``."""
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """Dropout on the adapters' input (training only; the base path sees no dropout)."""
    target_modules: List[LoraTarget] = field(
        default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    )
    """Which linears of every transformer layer get adapters (megatron-core's names: attention
    QKV and output projections, MLP up/gate and down projections)."""


@dataclass
class FinetuneConfig:
    """Parameter-efficient fine-tuning of a base checkpoint (``checkpoint.init_from``)."""

    lora: Optional[LoraConfig] = None
    """LoRA adapters (rank, alpha, dropout, target_modules); None trains all weights. With
    LoRA the base weights are frozen, the optimizer and checkpoints hold only the adapters
    plus a reference to the base checkpoint, and ``python -m engine merge-lora`` folds them
    into a normal checkpoint."""


@dataclass
class PrecisionConfig:
    """Numeric formats of parameters, activations and gradient reductions."""

    dtype: Literal["auto", "bf16", "fp16", "fp32", "fp8"] = "auto"
    """``auto`` (bf16 on CUDA, fp32 on CPU), ``bf16``, ``fp16``, ``fp32``, or ``fp8`` (bf16
    parameters and activations, transformer-layer GEMMs in FP8 through TransformerEngine; see
    ``engine/precision.py``)."""
    grad_reduce_in_fp32: bool = True
    """Accumulate and reduce gradients in fp32."""
    fp8_recipe: Literal["auto", "mxfp8", "tensorwise", "delayed", "blockwise"] = "auto"
    """FP8 scaling recipe with ``dtype: fp8``: ``auto`` (``mxfp8`` on Blackwell, compute
    capability 10.x; ``tensorwise`` on Hopper with TE >= 2.2, else ``delayed``), ``mxfp8``
    (32-value block scales, Blackwell only), ``tensorwise`` (per-tensor current scaling),
    ``delayed`` (per-tensor amax history) or ``blockwise`` (1x128/128x128 block scales)."""
    fp8_format: Literal["auto", "e4m3", "hybrid"] = "auto"
    """FP8 formats: ``e4m3`` everywhere, ``hybrid`` (E5M2 for gradients) or ``auto`` (e4m3
    for mxfp8/blockwise, hybrid for the per-tensor recipes)."""
    fp8_param: bool = False
    """Keep the GEMM weights themselves in FP8 (megatron-core ``fp8_param``: saves memory;
    the optimizer still holds fp32 master weights)."""
    first_last_layers_bf16: bool = False
    """Run the first ``num_layers_at_start_in_bf16`` and last ``num_layers_at_end_in_bf16``
    transformer layers in bf16 instead of FP8 (not with the delayed recipe)."""
    num_layers_at_start_in_bf16: Annotated[int, Range(ge=0)] = 1
    """Layers at the start kept in bf16 when ``first_last_layers_bf16`` is set."""
    num_layers_at_end_in_bf16: Annotated[int, Range(ge=0)] = 1
    """Layers at the end kept in bf16 when ``first_last_layers_bf16`` is set."""
    qat: Optional[QuantFormat] = None
    """Quantization format of the model's nvidia-modelopt fake quantizers; None: not quantized.
    ``python -m engine quantize`` writes it into the checkpoints it makes; training with it
    set is quantization-aware training (QAT): ``checkpoint.init_from`` (or the resumed
    checkpoint) must be a checkpoint quantized to this format, whose quantizer state is
    restored before the optimizer is built (see ``engine/optimization/quantize.py``)."""


@dataclass
class PerformanceConfig:
    """Kernel choices of the torch-native path (no TransformerEngine). Each is a switch whose
    results match the unoptimised path within rounding (``tests/models/test_performance.py``);
    ``auto`` is what is expected fastest on a GPU and keeps CPU runs (tests) on plain eager
    kernels. The defaults are provisional until ``examples/bench_gpu.py`` has measured them.
    A fusion switch left at None (``auto``) is on with CUDA and off on CPU."""

    bias_activation_fusion: Optional[bool] = None
    """megatron-core's jit-fused (``torch.compile``) bias + SwiGLU / GeLU of the MLP
    (TransformerConfig ``bias_activation_fusion``). None: on with CUDA; off on CPU, where the
    per-shape C++ compile costs more than the tiny models gain."""
    bias_dropout_fusion: Optional[bool] = None
    """megatron-core's jit-fused bias-dropout-add on the residual branches (``bias_dropout_fusion``)."""
    cross_entropy_fusion: Optional[bool] = None
    """megatron-core's fused vocab-parallel cross entropy, its ``native`` (torch, jit-fused)
    implementation (``cross_entropy_loss_fusion`` with ``cross_entropy_fusion_impl: native``):
    fewer passes over the [tokens, vocab] logits than the unfused one. It rounds the logits'
    gradient to bf16, so it is used with bf16 only (None: on for bf16 with CUDA)."""
    sdpa_backend: Literal["auto", "cudnn", "flash", "efficient", "math", "default"] = "auto"
    """Kernel of ``scaled_dot_product_attention`` (torch-native spec): ``auto`` tries cuDNN
    attention first on Hopper/Blackwell (compute capability >= 9.0) and torch's own order
    elsewhere; a named backend is tried first, torch's others follow for shapes it rejects
    (``torch.nn.attention.sdpa_kernel`` with priority); ``default`` leaves torch's choice.
    The choice is probed once at build and logged. CPU: torch's fused CPU kernel whatever is set."""
    adam: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
    """Implementation of torch's AdamW (what megatron-core uses without TE/apex): ``fused``
    (one kernel per parameter group), ``foreach`` (multi-tensor ops), ``for_loop`` (one
    parameter at a time). ``auto``: ``fused`` on CUDA, torch's default on CPU (``for_loop``)."""
    rmsnorm: Literal["torch", "liger"] = "torch"
    """RMSNorm kernel: ``torch`` (``torch.nn.RMSNorm``, megatron-core's fallback without
    apex; torch >= 2.8 runs it as one fused CUDA kernel) or ``liger`` (liger-kernel's Triton
    RMSNorm; needs ``pip install liger-kernel`` and CUDA)."""
    compile_layers: bool = False
    """``torch.compile`` each transformer layer (inductor). Off until measured faster: the
    first steps compile for tens of seconds, and a new sequence length recompiles."""


@dataclass
class ProfileConfig:
    """Profiling windows (Nsight Systems, torch.profiler) and out-of-memory snapshots."""

    start_step: Annotated[int, Range(ge=0)] = 0
    """First step inside the profiling window (``cudaProfilerStart`` before it); 0 means no window."""
    end_step: Annotated[int, Range(ge=0)] = 0
    """Last step inside the window (``cudaProfilerStop`` after it); 0 means ``start_step``."""
    ranks: List[Annotated[int, Range(ge=0)]] = field(default_factory=lambda: [0])
    """Global ranks that open the window (an empty list means every rank)."""
    nvtx: bool = True
    """Emit NVTX ranges (forward-backward, optimizer, data, checkpoint) on CUDA for Nsight."""
    torch_profiler: bool = False
    """Also record the window with ``torch.profiler``: a Chrome trace and a table of the top
    kernels/ops in ``<profile.dir>``."""
    top_ops: Annotated[int, Range(ge=1)] = 25
    """Rows of the top kernels/ops table printed and written by ``torch_profiler``."""
    dir: Optional[str] = None
    """Where traces, tables and memory snapshots go; None means ``<checkpoint.dir>/profile``."""
    memory_snapshot_on_oom: bool = False
    """Record CUDA allocator history and write a memory snapshot (``.pickle``, for
    pytorch.org/memory_viz) when a step runs out of GPU memory."""


@dataclass
class PreemptionConfig:
    """Stopping cleanly when the scheduler asks (SLURM preemption, time limit warnings)."""

    signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that make the run finish the current step, checkpoint and exit with ``exit_code``."""
    exit_code: Annotated[int, Range(ge=0, le=255)] = 75
    """Exit code of a run stopped by a signal (75 = EX_TEMPFAIL: try again later); the SLURM
    scripts requeue the job when they see it."""


@dataclass
class LoggingConfig:
    """What is reported and where."""

    interval: Annotated[int, Range(ge=1)] = 10
    """Steps between log lines."""
    dir: Optional[str] = None
    """TensorBoard/metrics directory; None means ``<checkpoint.dir>/logs``."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    wandb_project: Optional[str] = None
    """Also log to this Weights & Biases project (needs ``wandb``)."""
    gpu: Optional[str] = None
    """GPU model for the MFU peak table (``h100``, ``b200``...); None means detect."""


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (megatron-core dist_checkpointing)."""

    dir: str = "runs/default"
    """Run directory; checkpoints go to ``<dir>/checkpoints/iter_NNNNNNN``."""
    enabled: bool = True
    """Write checkpoints at all (turn off only for throughput benchmarks)."""
    save_interval: Annotated[int, Range(ge=0)] = 0
    """Steps between checkpoints; 0 saves only at the end."""
    keep: Annotated[int, Range(ge=0)] = 3
    """Most recent checkpoints kept (older ones deleted); 0 keeps all."""
    resume: bool = False
    """Resume from the newest complete checkpoint in ``dir`` if there is one."""
    load: Optional[str] = None
    """Resume from this checkpoint directory instead of the newest in ``dir``."""
    init_from: Optional[str] = None
    """Start from the weights of this checkpoint (any layout) with a fresh optimizer, schedule
    and data position; recorded in the lineage of the new checkpoints. Ignored when resuming."""
    init_from_hf: Optional[str] = None
    """Start from the weights of this Hugging Face directory (LLaMA, GPT-2 or Mixtral
    safetensors), like ``init_from``: converted once into ``<dir>/hf_import/`` and loaded at the
    run's layout. ``model`` must describe the same network (checked; ``python -m engine import
    hf`` prints it). Not combinable with ``init_from`` or ``load``."""
    save_optimizer: bool = True
    """Include optimizer state (needed for exact resume)."""
    fallback_on_corrupt: bool = False
    """On resume, when the newest checkpoint fails verification against its manifest (missing,
    truncated or altered file), rename it ``iter_N.corrupt`` and resume from the previous
    complete one, logging why; False stops with the error."""
    lock: bool = True
    """Hold an exclusive lock (``<dir>/.engine.lock``, flock by rank 0) for the whole run, so
    two jobs never write the same run directory."""


@dataclass
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW settings."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Batch sizes and run length."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """Training objective and its settings."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Parameter-efficient fine-tuning (LoRA)."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Numeric formats."""
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    """Kernel choices of the torch-native path (fusions, attention backend, AdamW, RMSNorm)."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """Profiling windows."""
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    """Clean stops on signals."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Reporting."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""

    def to_dict(self) -> Dict[str, Any]:
        """Plain nested dict of the resolved config."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """YAML text of the resolved config (what is printed and saved)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _field_types(cls) -> Dict[str, Any]:
    """Field name -> annotated type, keeping ``Annotated[..., Range]`` for ``_coerce``."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, valid: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(
        f"unknown key '{where}{key}'.{hint} Valid keys in '{where.rstrip('.') or 'config'}': {', '.join(sorted(valid))}"
    )


def _coerce(value: Any, typ: Any, path: str) -> Any:
    """Check/convert one leaf value against its annotated type."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is Literal:  # a choice: the message names key, value and every choice
        if value not in args or isinstance(value, bool):
            raise ConfigError(f"{path} is {value!r}; choose one of {', '.join(map(str, args))}")
        return value
    if origin is Annotated:  # a numeric field with its Range
        value = _coerce(value, args[0], path)
        for rng in typ.__metadata__:
            if isinstance(rng, Range) and not rng.contains(value):
                raise ConfigError(f"'{path}' must be {rng}, got {value!r}")
        return value
    if isinstance(typ, type) and dataclasses.is_dataclass(typ):  # e.g. the entries of data.blend
        if not isinstance(value, dict):
            raise ConfigError(f"'{path}' must be a mapping, got {value!r}")
        obj = typ()
        _apply(obj, value, f"{path}.")
        return obj
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], path)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{path}' must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{path}' must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"'{path}' must be an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"'{path}' must be a number, got {value!r}")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"'{path}' must be a string, got {value!r}")
    return value


def _apply(obj: Any, values: Dict[str, Any], where: str) -> None:
    """Set the fields of dataclass ``obj`` from ``values``, recursing into sub-configs."""
    types = _field_types(type(obj))
    for key, value in values.items():
        if key not in types:
            moved = MOVED_KEYS.get(f"{where}{key}")
            if moved:
                raise ConfigError(f"'{where}{key}' moved to '{moved}'")
            raise _unknown_key(str(key), list(types), where)
        typ = types[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"'{where}{key}' must be a mapping, got {value!r}")
            _apply(getattr(obj, key), value, f"{where}{key}.")
        else:
            setattr(obj, key, _coerce(value, typ, f"{where}{key}"))


def apply_mapping(obj: Any, values: Dict[str, Any], where: str = "") -> None:
    """Set the fields of any config dataclass ``obj`` from a nested mapping, with the same key
    and type checks as the run config (other config trees, e.g. the pipeline's, load through
    it); ``where`` prefixes the key names in errors."""
    _apply(obj, values, where)


def parse_overrides(overrides: Sequence[str]) -> Dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict; values are parsed as YAML scalars."""
    nested: Dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    return nested


def _deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


PresetResolver = Callable[[str], ModelConfig]
"""Preset name -> a fresh ModelConfig (``models.presets.get_preset``); raises ConfigError."""


def from_dict(values: Dict[str, Any], presets: Optional[PresetResolver] = None) -> Config:
    """Build a Config from a nested dict. A ``model.preset`` is resolved by ``presets`` and
    applied first, then the other ``model`` keys override it (a preset without a resolver is
    an error: this module knows no presets)."""
    if not isinstance(values, dict):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(values).__name__}")
    cfg = Config()
    model_values = dict(values.get("model") or {})
    preset = model_values.get("preset")
    if preset is not None:
        if presets is None:
            raise ConfigError(
                f"model.preset is {preset!r} but no preset resolver was given; load the "
                f"config with engine.run_config.load_run_config"
            )
        cfg.model = presets(str(preset))
    rest = {k: v for k, v in values.items()}
    rest["model"] = model_values
    _apply(cfg, rest, "")
    if cfg.data.blend:
        if cfg.data.paths or cfg.data.weights:
            raise ConfigError("give data.blend or data.paths/data.weights, not both")
        cfg.data.paths = [entry.path for entry in cfg.data.blend]
        cfg.data.weights = [entry.weight for entry in cfg.data.blend]
    return cfg


def load_config(
    path: Optional[str | Path] = None, overrides: Sequence[str] = (), presets: Optional[PresetResolver] = None
) -> Config:
    """Read a YAML file (optional) and apply dotted ``key=value`` overrides; ``presets``
    resolves ``model.preset`` (see ``from_dict``)."""
    values: Dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file '{p}' does not exist")
        values = yaml.safe_load(p.read_text()) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"'{p}' must hold a mapping at the top level")
    values = _deep_merge(values, parse_overrides(overrides))
    return from_dict(values, presets)


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------

ConfigCheck = Callable[["Config"], List[str]]
"""A subsystem's own check of the config: the problems it finds, as messages (empty: fine)."""


def _choice_errors(obj: Any, where: str) -> List[str]:
    """``Literal`` fields holding a value outside their choices (a config built or changed in
    code, which the loader never saw)."""
    errors = []
    for name, typ in _field_types(type(obj)).items():
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            errors.extend(_choice_errors(value, f"{where}{name}."))
            continue
        choices = field_choices(typ)
        values = value if isinstance(value, list) else [value]  # List[Literal]: each entry
        for v in values:
            if choices is not None and v is not None and v not in choices:
                errors.append(f"{where}{name} is {v!r}; choose one of {', '.join(map(str, choices))}")
    return errors


def validate(cfg: Config, world_size: int, checks: Sequence[ConfigCheck] = ()) -> None:
    """Raise ConfigError listing every inconsistency between sizes, naming the numbers.

    Only rules across sections live here; ``checks`` are the subsystems' own (objective names,
    FP8 alignment: ``engine.run_config.RUN_CHECKS``), their messages are reported with these."""
    errors: List[str] = []
    m, p, t = cfg.model, cfg.parallel, cfg.training

    for check in checks:
        errors.extend(check(cfg))
    errors.extend(_choice_errors(cfg, ""))

    for name in ("tensor", "pipeline", "context", "expert"):
        if getattr(p, name) < 1:
            errors.append(f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    if errors:
        raise ConfigError("; ".join(errors))

    groups = m.query_groups
    if m.num_attention_heads % p.tensor:
        errors.append(
            f"model.num_attention_heads ({m.num_attention_heads}) is not divisible by parallel.tensor ({p.tensor})"
        )
    if groups % p.tensor:
        errors.append(f"model.num_query_groups ({groups}) is not divisible by parallel.tensor ({p.tensor})")
    if m.num_attention_heads % groups:
        errors.append(
            f"model.num_attention_heads ({m.num_attention_heads}) is not divisible by model.num_query_groups ({groups})"
        )
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        errors.append(
            f"model.hidden_size ({m.hidden_size}) is not divisible by model.num_attention_heads "
            f"({m.num_attention_heads}); set model.kv_channels"
        )
    stages = p.pipeline * (p.virtual_pipeline or 1)
    if m.num_layers % stages:
        errors.append(
            f"model.num_layers ({m.num_layers}) is not divisible by parallel.pipeline x "
            f"parallel.virtual_pipeline ({p.pipeline} x {p.virtual_pipeline or 1} = {stages})"
        )
    if p.virtual_pipeline is not None and p.pipeline < 2:
        errors.append(f"parallel.virtual_pipeline ({p.virtual_pipeline}) needs parallel.pipeline >= 2")
    mp = p.model_parallel
    if world_size % mp:
        errors.append(
            f"world size ({world_size}) is not divisible by parallel.tensor x parallel.pipeline x "
            f"parallel.context ({p.tensor} x {p.pipeline} x {p.context} = {mp})"
        )
    if m.num_experts:
        if m.num_experts % p.expert:
            errors.append(f"model.num_experts ({m.num_experts}) is not divisible by parallel.expert ({p.expert})")
        if m.moe_router_topk > m.num_experts:
            errors.append(f"model.moe_router_topk ({m.moe_router_topk}) exceeds model.num_experts ({m.num_experts})")
    elif p.expert > 1:
        errors.append(f"parallel.expert is {p.expert} but the model is dense (model.num_experts = 0)")
    if p.expert > 1 and world_size % mp == 0:
        # Expert-data parallel group: EP x expert-TP must divide the DP x CP x TP ranks of a stage.
        stage_ranks = world_size // p.pipeline
        if stage_ranks % (p.expert * p.tensor):
            errors.append(
                f"parallel.expert x parallel.tensor ({p.expert} x {p.tensor}) does not divide the "
                f"ranks of one pipeline stage ({world_size} / {p.pipeline} = {stage_ranks})"
            )
    if world_size % mp == 0:
        dp = p.data_parallel(world_size)
        if t.global_batch_size % (t.micro_batch_size * dp):
            errors.append(
                f"training.global_batch_size ({t.global_batch_size}) is not divisible by "
                f"training.micro_batch_size x data-parallel size ({t.micro_batch_size} x {dp} = "
                f"{t.micro_batch_size * dp})"
            )
        elif p.virtual_pipeline is not None:
            micro = t.global_batch_size // (t.micro_batch_size * dp)
            if micro % p.pipeline:
                errors.append(
                    f"interleaved pipelining needs micro-batches per step ({micro}) divisible by "
                    f"parallel.pipeline ({p.pipeline})"
                )
    if m.padded_vocab_size % p.tensor:
        errors.append(
            f"padded vocab ({m.padded_vocab_size}) is not divisible by parallel.tensor ({p.tensor}); "
            f"raise model.make_vocab_size_divisible_by ({m.make_vocab_size_divisible_by})"
        )
    if cfg.data.seq_length > m.max_seq_length:
        errors.append(f"data.seq_length ({cfg.data.seq_length}) exceeds model.max_seq_length ({m.max_seq_length})")
    if m.sliding_window < 0:
        errors.append(f"model.sliding_window must be >= 0, got {m.sliding_window}")
    if cfg.precision.qat and p.virtual_pipeline is not None:
        errors.append("precision.qat needs parallel.virtual_pipeline unset (modelopt keeps one model chunk per rank)")
    if cfg.precision.qat and cfg.finetune.lora is not None:
        errors.append("precision.qat does not combine with finetune.lora (LoRA on a quantized model is not supported)")
    if cfg.precision.qat and cfg.precision.dtype == "fp8":
        errors.append(
            f"precision.qat ({cfg.precision.qat}) trains through modelopt's fake quantizers; "
            "it does not combine with precision.dtype fp8 (TransformerEngine FP8 GEMMs)"
        )
    if p.sequence_parallel and p.tensor == 1:
        errors.append("parallel.sequence_parallel needs parallel.tensor > 1")
    lora = cfg.finetune.lora
    if lora is not None:
        if not cfg.checkpoint.init_from:
            errors.append("finetune.lora needs the base model: set checkpoint.init_from to its checkpoint")
        if not lora.target_modules:
            errors.append("finetune.lora.target_modules is empty: name at least one of linear_qkv, linear_proj, ...")
        if p.sequence_parallel:
            # modelopt's replicated adapter halves (nn.Linear) would see only a sequence shard.
            errors.append("finetune.lora does not support parallel.sequence_parallel; set it to false")
        ref = cfg.objective.dpo.reference
        if cfg.objective.name == "dpo" and ref and cfg.checkpoint.init_from and ref != cfg.checkpoint.init_from:
            errors.append(
                f"with finetune.lora the DPO reference is the frozen base (checkpoint.init_from); "
                f"objective.dpo.reference ({ref}) must be unset or equal to it"
            )
    if cfg.data.weights is not None and len(cfg.data.weights) != len(cfg.data.paths):
        errors.append(f"data.weights has {len(cfg.data.weights)} entries but data.paths has {len(cfg.data.paths)}")
    if not cfg.data.mock and not cfg.data.paths:
        errors.append("data.paths is empty (give dataset prefixes, or data.mock=true for benchmarks)")
    if t.steps < 0:
        errors.append(f"training.steps must be >= 0, got {t.steps}")
    if cfg.objective.name == "sft" and cfg.data.packing and p.context > 1:
        errors.append(
            f"data.packing needs parallel.context = 1 (got {p.context}): context-parallel THD "
            f"attention needs segments padded to 2 x parallel.context; set data.packing=false"
        )
    if not 0.0 <= cfg.data.replay_ratio < 1.0:
        errors.append(f"data.replay_ratio must be in [0, 1), got {cfg.data.replay_ratio}")
    if cfg.data.replay_ratio > 0 and not cfg.data.replay_paths:
        errors.append(f"data.replay_ratio is {cfg.data.replay_ratio} but data.replay_paths is empty")
    if cfg.data.replay_weights is not None and len(cfg.data.replay_weights) != len(cfg.data.replay_paths):
        errors.append(
            f"data.replay_weights has {len(cfg.data.replay_weights)} entries but data.replay_paths "
            f"has {len(cfg.data.replay_paths)}"
        )
    if not (0 <= cfg.optimizer.min_lr <= cfg.optimizer.lr):
        errors.append(f"optimizer.min_lr ({cfg.optimizer.min_lr}) must be in [0, optimizer.lr ({cfg.optimizer.lr})]")
    ck = cfg.checkpoint
    if ck.init_from_hf and (ck.init_from or ck.load):
        other = "checkpoint.init_from" if ck.init_from else "checkpoint.load"
        errors.append(f"checkpoint.init_from_hf and {other} both name the starting weights; give one")
    pf = cfg.profile
    if pf.start_step < 0 or (pf.end_step and pf.end_step < pf.start_step):
        errors.append(
            f"profile.start_step ({pf.start_step}) and profile.end_step ({pf.end_step}) must "
            f"satisfy 0 <= start_step <= end_step"
        )
    if pf.torch_profiler and not pf.start_step:
        errors.append("profile.torch_profiler needs a window: set profile.start_step (and profile.end_step)")
    for name in cfg.preemption.signals:
        if not isinstance(getattr(signal, name, None), signal.Signals):
            errors.append(f"preemption.signals: {name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)")
    if errors:
        raise ConfigError("; ".join(errors))
    # Printed once, by rank 0 (or a plain process), when the trainer, `engine config` or
    # `engine plan` validates the config; the run goes on.
    if os.environ.get("RANK", "0") == "0":
        for message in config_warnings(cfg):
            warnings.warn(message, ConfigWarning, stacklevel=2)


def config_warnings(cfg: Config) -> List[str]:
    """Settings that run but probably not as meant; ``validate`` issues them as ConfigWarning."""
    found: List[str] = []
    s, steps = cfg.schedule, cfg.training.steps
    if steps and s.warmup_steps > steps:
        found.append(
            f"schedule.warmup_steps ({s.warmup_steps}) exceeds training.steps ({steps}): the "
            f"learning rate never reaches optimizer.lr ({cfg.optimizer.lr})"
        )
    if s.decay_steps is not None and s.warmup_steps >= s.decay_steps:
        found.append(
            f"schedule.warmup_steps ({s.warmup_steps}) is not below schedule.decay_steps "
            f"({s.decay_steps}): the decay is stretched to end at step {s.warmup_steps + 1}"
        )
    return found
