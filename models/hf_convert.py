"""Strict weight mapping between a full megatron-core ``GPTModel`` state dict and Hugging Face.

Three families are mapped, chosen from the ``ModelConfig``:

* ``llama``   -> ``transformers.LlamaForCausalLM`` (RMSNorm, RoPE, GQA, SwiGLU);
* ``gpt2``    -> ``transformers.GPT2LMHeadModel`` (LayerNorm, learned positions, biases,
  tanh-GELU, ``Conv1D`` weights stored ``[in, out]``, fused ``c_attn`` = ``[q | k | v]``);
* ``mixtral`` -> ``transformers.MixtralForCausalLM`` (the LLaMA attention plus top-k MoE).

The megatron side is one unsharded (TP = PP = EP = 1) model: either ``model.state_dict()`` of
a single chunk or an equivalent merged dict. Both megatron-core layer specs are accepted on
input and normalised to the local-spec names:

==============================================  =========================================
TransformerEngine spec name                     local spec name
==============================================  =========================================
``self_attention.linear_qkv.layer_norm_weight``  ``input_layernorm.weight``
``self_attention.linear_qkv.layer_norm_bias``    ``input_layernorm.bias``
``mlp.linear_fc1.layer_norm_weight``             ``pre_mlp_layernorm.weight``
``mlp.linear_fc1.layer_norm_bias``               ``pre_mlp_layernorm.bias``
``mlp.experts.linear_fc1.weight<e>`` (grouped)   ``mlp.experts.local_experts.<e>.linear_fc1.weight``
==============================================  =========================================

Entries that carry no weights are dropped explicitly, never silently: ``*._extra_state``
(TE FP8 metadata, and the ``None`` placeholders every megatron linear layer writes), the
non-persistent buffers megatron may register (RoPE ``inv_freq`` / ``cos_cached`` /
``sin_cached``, the router's ``local_tokens_per_expert``, ``global_tokens_per_expert``,
``ga_steps``) and a router ``expert_bias`` that is all zeros (a non-zero one changes routing
and has no Hugging Face equivalent, so it is an error).

Strictness is the point of this module: every source key must be consumed and every target
key produced exactly once, and the produced Hugging Face keys and shapes are checked against
the transformers model class itself (instantiated on the ``meta`` device). A mapping that
forgets a tensor, or leaves a target tensor to random initialisation, raises
``ConversionError`` listing the offending keys.

In-memory vs on-disk Hugging Face layouts: ``megatron_to_hf`` produces the transformers
model's in-memory ``state_dict()`` (transformers 5: Mixtral experts fused into
``mlp.experts.gate_up_proj`` / ``down_proj``; a tied ``lm_head.weight`` listed). To publish,
load it into the model and call ``save_pretrained``, which writes the hub layout (tied head
dropped, Mixtral experts as ``block_sparse_moe.experts.<e>.w1/w2/w3``).
``hf_to_megatron`` accepts both layouts.

Vocabulary padding: megatron's embedding (and untied output layer) has
``model_cfg.padded_vocab_size`` rows; Hugging Face gets the first ``model_cfg.vocab_size``
rows, and the import pads back with zero rows.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from engine.config import ModelConfig

if TYPE_CHECKING:  # transformers is a dev extra, imported lazily by the functions that need it
    from transformers import PretrainedConfig

__all__ = [
    "ConversionError",
    "IGNORED_SUFFIXES",
    "IGNORED_BUFFER_SUFFIXES",
    "hf_family",
    "hf_config",
    "hf_config_family",
    "model_config_from_hf",
    "architecture_differences",
    "hf_model_class",
    "megatron_to_hf",
    "hf_to_megatron",
    "normalize_megatron_keys",
    "expected_megatron_shapes",
    "expected_hf_shapes",
    "load_megatron_state_dict",
]


class ConversionError(ValueError):
    """A state dict that does not match the layout the mapping expects (keys or shapes)."""


# Keys with these suffixes hold no weights: TE's FP8 metadata, and the ``None`` extra state
# megatron's own linear layers write so that TE and local checkpoints share key sets.
IGNORED_SUFFIXES: Tuple[str, ...] = ("._extra_state",)

# Buffers megatron-core 0.16 may register that are derived or runtime-only state. Only the
# router's ``expert_bias`` is persistent; it is handled separately (see _drop_ignored).
IGNORED_BUFFER_SUFFIXES: Tuple[str, ...] = (
    "rotary_pos_emb.inv_freq",  # RoPE frequencies, recomputed from rotary_base
    "rotary_pos_emb.cos_cached",  # YaRN caches (non-persistent)
    "rotary_pos_emb.sin_cached",
    "mlp.router.local_tokens_per_expert",  # expert-bias load statistics (non-persistent)
    "mlp.router.global_tokens_per_expert",  # global aux-loss statistics (non-persistent)
    "mlp.router.ga_steps",
)

_EXPERT_BIAS_SUFFIX = "mlp.router.expert_bias"

# TE-spec parameter names -> local-spec names (suffix within one layer).
_TE_RENAMES: Tuple[Tuple[str, str], ...] = (
    ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    ("self_attention.linear_qkv.layer_norm_bias", "input_layernorm.bias"),
    ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
    ("mlp.linear_fc1.layer_norm_bias", "pre_mlp_layernorm.bias"),
)
# TEGroupedMLP stores expert e's weights as ``linear_fc1.weight<e>`` (and ``bias<e>``).
_TE_GROUPED = re.compile(r"^(.*\.mlp\.experts)\.(linear_fc[12])\.(weight|bias)(\d+)$")


# --------------------------------------------------------------------------------------
# Family and config
# --------------------------------------------------------------------------------------


def _heads(cfg: ModelConfig) -> Tuple[int, int, int]:
    """(query heads, key/value heads, head dim) as megatron builds them."""
    return cfg.num_attention_heads, cfg.query_groups, cfg.head_dim


def hf_family(model_cfg: ModelConfig) -> str:
    """Name the Hugging Face family (``llama``, ``gpt2``, ``mixtral``) ``model_cfg`` maps to.

    Raises ``ConversionError`` for architectures none of them can express exactly."""
    c = model_cfg
    features = (c.normalization, c.position_embedding, c.activation)
    if c.num_experts:
        if features != ("RMSNorm", "rope", "swiglu") or c.add_bias:
            raise ConversionError(
                f"MoE models map to Mixtral, which needs RMSNorm + rope + swiglu without biases; "
                f"got normalization={c.normalization}, position_embedding={c.position_embedding}, "
                f"activation={c.activation}, add_bias={c.add_bias}"
            )
        return "mixtral"
    if features == ("RMSNorm", "rope", "swiglu"):
        return "llama"
    if features == ("LayerNorm", "learned_absolute", "gelu"):
        heads, groups, head_dim = _heads(c)
        problems = []
        if not c.add_bias:
            problems.append("GPT-2 always has biases (add_bias must be true)")
        if groups != heads:
            problems.append(f"GPT-2 has no GQA (num_query_groups={groups} != heads={heads})")
        if head_dim * heads != c.hidden_size:
            problems.append(f"GPT-2 needs kv_channels*heads == hidden ({head_dim}*{heads} != {c.hidden_size})")
        if problems:
            raise ConversionError("cannot map to GPT-2: " + "; ".join(problems))
        return "gpt2"
    raise ConversionError(
        "no Hugging Face family matches normalization/position_embedding/activation = "
        f"{features}; supported: (RMSNorm, rope, swiglu) -> LLaMA/Mixtral, "
        "(LayerNorm, learned_absolute, gelu) -> GPT-2"
    )


def _check_window(model_cfg: ModelConfig, family: str, allow_mismatch: bool) -> Optional[int]:
    """Sliding window for the HF config, or an error when HF cannot express the model's."""
    if not model_cfg.sliding_window:
        return None
    # Mixtral applies one window to every layer; LLaMA and GPT-2 have none.
    if family == "mixtral" and model_cfg.sliding_window_layers == "all":
        # megatron window_size = (sliding_window - 1, 0): a query sees itself and the
        # sliding_window - 1 keys before it, the same span as HF's ``sliding_window``.
        return model_cfg.sliding_window
    if allow_mismatch:
        return None
    where = f"on {model_cfg.sliding_window_layers} layers only" if family == "mixtral" else "at all"
    raise ConversionError(
        f"the model uses sliding-window attention (window {model_cfg.sliding_window}, layers "
        f"'{model_cfg.sliding_window_layers}') which {family} cannot express {where}; the exported "
        "model would attend differently. Pass allow_sliding_window_mismatch=True to export it "
        "with full causal attention anyway."
    )


def hf_model_class(model_cfg: ModelConfig):
    """The transformers causal-LM class for ``model_cfg``'s family."""
    import transformers

    return {
        "llama": transformers.LlamaForCausalLM,
        "gpt2": transformers.GPT2LMHeadModel,
        "mixtral": transformers.MixtralForCausalLM,
    }[hf_family(model_cfg)]


def hf_config(model_cfg: ModelConfig, allow_sliding_window_mismatch: bool = False, **extra: Any) -> PretrainedConfig:
    """Build the transformers ``PretrainedConfig`` describing the same network as ``model_cfg``.

    ``extra`` keyword arguments (e.g. ``bos_token_id``, ``eos_token_id`` from the tokenizer)
    are passed to the config constructor and override the derived values. Token ids default
    to None because they belong to the tokenizer, not the architecture."""
    import transformers

    c = model_cfg
    family = hf_family(c)
    window = _check_window(c, family, allow_sliding_window_mismatch)
    heads, groups, head_dim = _heads(c)
    tokens: Dict[str, Optional[int]] = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    # Keyword arguments of the transformers config constructor: values of many types.
    kwargs: Dict[str, Any]
    if family == "gpt2":
        kwargs = dict(
            vocab_size=c.vocab_size,
            n_positions=c.max_seq_length,
            n_embd=c.hidden_size,
            n_layer=c.num_layers,
            n_head=heads,
            n_inner=c.ffn_hidden_size,
            activation_function="gelu_new",  # tanh approximation, as models.build.gelu_tanh
            resid_pdrop=c.hidden_dropout,
            embd_pdrop=c.hidden_dropout,
            attn_pdrop=c.attention_dropout,
            layer_norm_epsilon=c.norm_epsilon,
            initializer_range=c.init_std,
            scale_attn_weights=True,  # 1/sqrt(head_dim), as megatron's softmax_scale
            scale_attn_by_inverse_layer_idx=False,
            reorder_and_upcast_attn=False,
            tie_word_embeddings=c.tie_embeddings,
            **tokens,
        )
        kwargs.update(extra)
        return transformers.GPT2Config(**kwargs)
    kwargs = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.ffn_hidden_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=groups,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=c.max_seq_length,
        initializer_range=c.init_std,
        rms_norm_eps=c.norm_epsilon,
        # megatron's RoPE is the non-interleaved rotate-half form over the whole head, which
        # is HF's "default" rope: no q/k row permutation is needed (unlike Meta checkpoints).
        rope_parameters={"rope_type": "default", "rope_theta": float(c.rotary_base)},
        attention_dropout=c.attention_dropout,
        tie_word_embeddings=c.tie_embeddings,
        **tokens,
    )
    if family == "llama":
        kwargs.update(attention_bias=c.add_bias, mlp_bias=c.add_bias)
        kwargs.update(extra)
        return _with_v4_rope_keys(transformers.LlamaConfig(**kwargs), c)
    kwargs.update(
        intermediate_size=c.expert_ffn_hidden_size,
        num_local_experts=c.num_experts,
        num_experts_per_tok=c.moe_router_topk,
        router_aux_loss_coef=c.moe_aux_loss_coeff,
        router_jitter_noise=0.0,
        sliding_window=window,
    )
    kwargs.update(extra)
    return _with_v4_rope_keys(transformers.MixtralConfig(**kwargs), c)


def _with_v4_rope_keys(config: PretrainedConfig, model_cfg: ModelConfig) -> PretrainedConfig:
    """Add the transformers 4.x RoPE keys next to transformers 5's ``rope_parameters``.

    transformers 4.x (and TRL, vLLM, llama.cpp's converter, which read 4.x-style configs)
    take the theta from ``rope_theta`` and scaling from ``rope_scaling``; without them 4.57
    silently uses theta 10000. transformers 5 drops a ``rope_theta`` constructor argument,
    so the key is set as an attribute, which ``save_pretrained`` writes out. The engine has
    no RoPE scaling, so ``rope_scaling`` stays absent (4.x reads that as no scaling)."""
    config.rope_theta = float(model_cfg.rotary_base)
    return config


# --------------------------------------------------------------------------------------
# Hugging Face config -> ModelConfig (the inverse of hf_config)
# --------------------------------------------------------------------------------------

# Hugging Face architecture (``config.json`` ``architectures[0]``, else ``model_type``) -> family.
HF_ARCHITECTURES: Dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "GPT2LMHeadModel": "gpt2",
    "MixtralForCausalLM": "mixtral",
}
_MODEL_TYPES = {"llama": "llama", "gpt2": "gpt2", "mixtral": "mixtral"}
# GPT-2 activations that are the tanh approximation the engine's gelu computes.
_GPT2_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def hf_config_family(config: Mapping[str, Any]) -> str:
    """The family of a ``config.json`` dict, or ``ConversionError`` naming its architecture
    and the supported ones."""
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[arch]
    if not archs and config.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[config["model_type"]]
    name = ", ".join(archs) or f"model_type {config.get('model_type')!r}"
    raise ConversionError(f"unsupported Hugging Face architecture {name}; supported: {', '.join(HF_ARCHITECTURES)}")


def _rope_theta(config) -> float:
    """RoPE theta of a transformers 4.x (``rope_theta`` + ``rope_scaling``) or 5.x
    (``rope_parameters``) config; scaled RoPE variants have no engine equivalent."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ConversionError(f"RoPE type {kind!r} is not supported (the engine has unscaled RoPE only)")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ConversionError("the config has no rope_theta")
    return float(theta)


def model_config_from_hf(config) -> ModelConfig:
    """The ``ModelConfig`` of the network a transformers config (``AutoConfig`` of a LLaMA,
    GPT-2 or Mixtral checkpoint) describes: the inverse of ``hf_config``. Features the
    engine cannot build (scaled RoPE, another activation, biases on only some layers) raise
    ``ConversionError`` naming them. Training-only settings (dropout, init) are copied."""
    family = hf_config_family(config.to_dict())
    c = config
    if family == "gpt2":
        if c.activation_function not in _GPT2_TANH_GELU:
            raise ConversionError(f"GPT-2 activation {c.activation_function!r} is not the tanh GELU the engine uses")
        if not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx:
            raise ConversionError("GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported")
        return ModelConfig(
            num_layers=c.n_layer,
            hidden_size=c.n_embd,
            num_attention_heads=c.n_head,
            ffn_hidden_size=c.n_inner or 4 * c.n_embd,
            vocab_size=c.vocab_size,
            max_seq_length=c.n_positions,
            position_embedding="learned_absolute",
            normalization="LayerNorm",
            norm_epsilon=c.layer_norm_epsilon,
            activation="gelu",
            add_bias=True,
            tie_embeddings=bool(c.tie_word_embeddings),
            init_std=c.initializer_range,
            hidden_dropout=c.resid_pdrop,
            attention_dropout=c.attn_pdrop,
        )
    if c.hidden_act != "silu":
        raise ConversionError(f"{family} activation {c.hidden_act!r} is not supported (the engine's SwiGLU uses silu)")
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    groups = getattr(c, "num_key_value_heads", None) or heads
    attn_bias, mlp_bias = bool(getattr(c, "attention_bias", False)), bool(getattr(c, "mlp_bias", False))
    if attn_bias != mlp_bias:
        raise ConversionError(
            f"attention_bias={attn_bias} with mlp_bias={mlp_bias}: the engine has biases everywhere or nowhere"
        )
    fields: Dict[str, Any] = dict(
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        num_attention_heads=heads,
        num_query_groups=groups if groups != heads else None,
        kv_channels=head_dim if head_dim * heads != c.hidden_size else None,
        ffn_hidden_size=c.intermediate_size,
        vocab_size=c.vocab_size,
        max_seq_length=c.max_position_embeddings,
        position_embedding="rope",
        rotary_base=_rope_theta(c),
        normalization="RMSNorm",
        norm_epsilon=c.rms_norm_eps,
        activation="swiglu",
        add_bias=attn_bias,
        tie_embeddings=bool(c.tie_word_embeddings),
        init_std=c.initializer_range,
        attention_dropout=c.attention_dropout,
    )
    if family == "mixtral":
        fields.update(
            num_experts=c.num_local_experts,
            moe_router_topk=c.num_experts_per_tok,
            moe_ffn_hidden_size=c.intermediate_size,
            moe_aux_loss_coeff=c.router_aux_loss_coef,
            # Mixtral's one window applies to every layer.
            sliding_window=c.sliding_window or 0,
            sliding_window_layers="all",
        )
    return ModelConfig(**fields)


ARCHITECTURE_FIELDS: Tuple[str, ...] = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "query_groups",
    "head_dim",
    "ffn_hidden_size",
    "vocab_size",
    "position_embedding",
    "rotary_base",
    "normalization",
    "norm_epsilon",
    "activation",
    "add_bias",
    "tie_embeddings",
    "num_experts",
    "moe_router_topk",
    "expert_ffn_hidden_size",
    "window_layers",
    "sliding_window",
)
"""The facts that make two ModelConfigs the same network (what a Hugging Face import checks)."""


def architecture_differences(a: ModelConfig, b: ModelConfig) -> List[str]:
    """``name: a != b`` for every architecture fact (``ARCHITECTURE_FIELDS``, plus the
    positions table of learned positions) on which ``a`` and ``b`` differ."""
    names = list(ARCHITECTURE_FIELDS)
    if "learned_absolute" in (a.position_embedding, b.position_embedding):
        names.append("max_seq_length")
    out = []
    for name in names:
        va, vb = getattr(a, name), getattr(b, name)
        va, vb = (va() if callable(va) else va), (vb() if callable(vb) else vb)
        if name == "ffn_hidden_size" and a.num_experts and b.num_experts:
            continue  # every layer is an MoE layer: the dense width builds nothing
        if va != vb:
            out.append(f"{name}: {va} != {vb}")
    return out


# --------------------------------------------------------------------------------------
# Expected key sets
# --------------------------------------------------------------------------------------


def expected_megatron_shapes(model_cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Parameter names (local spec) and shapes of a full megatron GPTModel for ``model_cfg``.

    With tied embeddings a single-chunk model has no ``output_layer.weight`` entry."""
    c = model_cfg
    heads, groups, head_dim = _heads(c)
    h = c.hidden_size
    vocab = c.padded_vocab_size
    qkv_rows = (heads + 2 * groups) * head_dim
    fc1_mult = 2 if c.activation == "swiglu" else 1
    norm_bias = c.normalization == "LayerNorm"
    out: Dict[str, Tuple[int, ...]] = {"embedding.word_embeddings.weight": (vocab, h)}
    if c.position_embedding == "learned_absolute":
        out["embedding.position_embeddings.weight"] = (c.max_seq_length, h)

    def linear(name: str, rows: int, cols: int) -> None:
        out[f"{name}.weight"] = (rows, cols)
        if c.add_bias:
            out[f"{name}.bias"] = (rows,)

    def norm(name: str) -> None:
        out[f"{name}.weight"] = (h,)
        if norm_bias:
            out[f"{name}.bias"] = (h,)

    for i in range(c.num_layers):
        p = f"decoder.layers.{i}."
        norm(p + "input_layernorm")
        linear(p + "self_attention.linear_qkv", qkv_rows, h)
        linear(p + "self_attention.linear_proj", h, heads * head_dim)
        norm(p + "pre_mlp_layernorm")
        if c.num_experts:
            ffn = c.expert_ffn_hidden_size
            out[p + "mlp.router.weight"] = (c.num_experts, h)
            for e in range(c.num_experts):
                linear(p + f"mlp.experts.local_experts.{e}.linear_fc1", fc1_mult * ffn, h)
                linear(p + f"mlp.experts.local_experts.{e}.linear_fc2", h, ffn)
        else:
            linear(p + "mlp.linear_fc1", fc1_mult * c.ffn_hidden_size, h)
            linear(p + "mlp.linear_fc2", h, c.ffn_hidden_size)
    norm("decoder.final_layernorm")
    if not c.tie_embeddings:
        out["output_layer.weight"] = (vocab, h)
    return out


def expected_hf_shapes(model_cfg: ModelConfig, config=None) -> Dict[str, Tuple[int, ...]]:
    """Keys and shapes of the transformers model's ``state_dict()``, from the class itself.

    The model is built on the ``meta`` device, so this costs no memory; using the real class
    (rather than a hand-written list) is what makes a forgotten tensor impossible."""
    config = config if config is not None else hf_config(model_cfg, allow_sliding_window_mismatch=True)
    cls = hf_model_class(model_cfg)
    with torch.device("meta"):
        model = cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------
# Strict bookkeeping
# --------------------------------------------------------------------------------------


def _fmt(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


class _Source:
    """A read-once view of a state dict: ``take`` consumes a key, ``finish`` reports leftovers."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], what: str):
        self.tensors = dict(tensors)
        self.what = what
        self.used: set = set()

    def has(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str) -> torch.Tensor:
        if key in self.used:
            raise ConversionError(f"{self.what} key '{key}' consumed twice (mapping bug)")
        if key not in self.tensors:
            raise ConversionError(f"{self.what} state dict lacks '{key}'")
        self.used.add(key)
        return self.tensors[key]

    def missing(self, keys: Iterable[str]) -> List[str]:
        return [k for k in keys if k not in self.tensors]

    def finish(self) -> None:
        left = set(self.tensors) - self.used
        if left:
            raise ConversionError(f"{len(left)} unexpected {self.what} keys were not mapped: {_fmt(left)}")


class _Target(dict):
    """A write-once dict: producing a key twice is a mapping bug."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def put(self, key: str, value: torch.Tensor) -> None:
        if key in self:
            raise ConversionError(f"{self.what} key '{key}' produced twice (mapping bug)")
        self[key] = value


def _check_keys_and_shapes(
    tensors: Mapping[str, torch.Tensor], expected: Mapping[str, Tuple[int, ...]], what: str
) -> None:
    """Raise listing missing/unexpected keys and wrong shapes of ``tensors`` vs ``expected``."""
    missing = set(expected) - set(tensors)
    unexpected = set(tensors) - set(expected)
    wrong = [
        f"{k}: {tuple(tensors[k].shape)} != expected {tuple(expected[k])}"
        for k in sorted(set(expected) & set(tensors))
        if tuple(tensors[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys: {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys: {_fmt(unexpected)}")
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong[:20]))
    if problems:
        raise ConversionError(f"{what} state dict does not match the model config: " + " | ".join(problems))


# --------------------------------------------------------------------------------------
# Megatron key normalisation
# --------------------------------------------------------------------------------------


def _drop_ignored(state_dict: Mapping[str, object]) -> Dict[str, torch.Tensor]:
    """Remove the entries that hold no weights (see module docstring); reject the rest."""
    kept: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(IGNORED_SUFFIXES) or key.endswith(IGNORED_BUFFER_SUFFIXES):
            continue
        if key.endswith(_EXPERT_BIAS_SUFFIX):
            if torch.is_tensor(value) and not torch.any(value != 0):
                continue  # a zero bias leaves routing unchanged
            raise ConversionError(
                f"'{key}' is a non-zero router expert bias (aux-loss-free balancing); it changes "
                "which experts are chosen and no Hugging Face MoE class can express it"
            )
        if not torch.is_tensor(value):
            raise ConversionError(f"'{key}' is a {type(value).__name__}, not a tensor")
        kept[key] = value
    return kept


def normalize_megatron_keys(state_dict: Mapping[str, object]) -> Dict[str, torch.Tensor]:
    """Local-spec names for a megatron state dict in either spec, with non-weights dropped.

    Also strips wrapper prefixes (``module.`` from DDP / Float16Module). Raises when two
    source names normalise to the same key (e.g. both a TE fused norm and a separate norm)."""
    out: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    for key, value in _drop_ignored(state_dict).items():
        name = key
        while name.startswith("module."):
            name = name[len("module.") :]
        for te_name, local_name in _TE_RENAMES:
            if name.endswith("." + te_name):
                name = name[: -len(te_name)] + local_name
                break
        m = _TE_GROUPED.match(name)
        if m:
            prefix, layer, kind, expert = m.groups()
            name = f"{prefix}.local_experts.{int(expert)}.{layer}.{kind}"
        if name in out:
            raise ConversionError(f"'{key}' and '{origin[name]}' both map to '{name}'")
        out[name] = value
        origin[name] = key
    return out


def _tied_output(src: _Source, model_cfg: ModelConfig, embedding: torch.Tensor) -> None:
    """Consume a tied model's output weight if the dict carries one (e.g. a last pipeline
    stage merged in); it must equal the embedding, or the tie is not a tie."""
    if model_cfg.tie_embeddings and src.has("output_layer.weight"):
        out = src.take("output_layer.weight")
        if out.shape != embedding.shape or not torch.equal(out, embedding):
            raise ConversionError("tie_embeddings is set but output_layer.weight differs from the word embedding")


# --------------------------------------------------------------------------------------
# Tensor layout helpers
# --------------------------------------------------------------------------------------


def _split_qkv(t: torch.Tensor, heads: int, groups: int, head_dim: int):
    """Split megatron's fused QKV (weight or bias) into separate q, k, v.

    megatron orders the output rows per query group: the group's ``heads // groups`` query
    heads, then its key head, then its value head (``q1 q2 k1 v1 | q3 q4 k2 v2 | ...``).
    Query head ``g * per + i`` belongs to group ``g``, as in HF's ``repeat_kv``."""
    per = heads // groups
    rest = tuple(t.shape[1:])
    t = t.reshape(groups, per + 2, head_dim, *rest)
    q = t[:, :per].reshape(heads * head_dim, *rest)
    k = t[:, per].reshape(groups * head_dim, *rest)
    v = t[:, per + 1].reshape(groups * head_dim, *rest)
    return q.clone(), k.clone(), v.clone()


def _merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, head_dim: int):
    """Inverse of ``_split_qkv``."""
    per = heads // groups
    rest = tuple(q.shape[1:])
    q = q.reshape(groups, per, head_dim, *rest)
    k = k.reshape(groups, 1, head_dim, *rest)
    v = v.reshape(groups, 1, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(groups * (per + 2) * head_dim, *rest)


def _unpad(t: torch.Tensor, vocab: int) -> torch.Tensor:
    return t[:vocab].clone()


def _pad(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] > rows:
        raise ConversionError(f"vocabulary has {t.shape[0]} rows, more than the padded {rows}")
    out = t.new_zeros((rows,) + tuple(t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def _c(t: torch.Tensor) -> torch.Tensor:
    """A fresh contiguous copy: outputs never alias the input (safetensors refuses views)."""
    return t.detach().clone().contiguous()


# --------------------------------------------------------------------------------------
# megatron -> HF
# --------------------------------------------------------------------------------------


def _llama_attention_to_hf(src: _Source, dst: _Target, p: str, hp: str, cfg: ModelConfig) -> None:
    heads, groups, head_dim = _heads(cfg)
    kinds = ("weight", "bias") if cfg.add_bias else ("weight",)
    for kind in kinds:
        q, k, v = _split_qkv(src.take(f"{p}self_attention.linear_qkv.{kind}"), heads, groups, head_dim)
        dst.put(f"{hp}self_attn.q_proj.{kind}", q)
        dst.put(f"{hp}self_attn.k_proj.{kind}", k)
        dst.put(f"{hp}self_attn.v_proj.{kind}", v)
        dst.put(f"{hp}self_attn.o_proj.{kind}", _c(src.take(f"{p}self_attention.linear_proj.{kind}")))
    dst.put(f"{hp}input_layernorm.weight", _c(src.take(f"{p}input_layernorm.weight")))
    dst.put(f"{hp}post_attention_layernorm.weight", _c(src.take(f"{p}pre_mlp_layernorm.weight")))


def _llama_to_hf(src: _Source, cfg: ModelConfig, moe: bool) -> _Target:
    dst = _Target("Hugging Face")
    emb = src.take("embedding.word_embeddings.weight")
    dst.put("model.embed_tokens.weight", _unpad(emb, cfg.vocab_size))
    kinds = ("weight", "bias") if cfg.add_bias else ("weight",)
    for i in range(cfg.num_layers):
        p, hp = f"decoder.layers.{i}.", f"model.layers.{i}."
        _llama_attention_to_hf(src, dst, p, hp, cfg)
        if moe:
            dst.put(f"{hp}mlp.gate.weight", _c(src.take(f"{p}mlp.router.weight")))
            fc1 = [src.take(f"{p}mlp.experts.local_experts.{e}.linear_fc1.weight") for e in range(cfg.num_experts)]
            fc2 = [src.take(f"{p}mlp.experts.local_experts.{e}.linear_fc2.weight") for e in range(cfg.num_experts)]
            # transformers 5 fuses experts: gate_up_proj[e] = [gate; up], exactly megatron's
            # SwiGLU linear_fc1 (gate rows first), and down_proj[e] = linear_fc2.
            dst.put(f"{hp}mlp.experts.gate_up_proj", torch.stack(fc1).contiguous())
            dst.put(f"{hp}mlp.experts.down_proj", torch.stack(fc2).contiguous())
            continue
        for kind in kinds:
            # megatron's glu: x_glu, x_linear = chunk(fc1(x), 2) -> silu(gate) * up.
            gate, up = torch.chunk(src.take(f"{p}mlp.linear_fc1.{kind}"), 2, dim=0)
            dst.put(f"{hp}mlp.gate_proj.{kind}", _c(gate))
            dst.put(f"{hp}mlp.up_proj.{kind}", _c(up))
            dst.put(f"{hp}mlp.down_proj.{kind}", _c(src.take(f"{p}mlp.linear_fc2.{kind}")))
    dst.put("model.norm.weight", _c(src.take("decoder.final_layernorm.weight")))
    _lm_head_to_hf(src, dst, cfg, emb, "model.embed_tokens.weight")
    return dst


def _lm_head_to_hf(src: _Source, dst: _Target, cfg: ModelConfig, emb: torch.Tensor, emb_key: str) -> None:
    if cfg.tie_embeddings:
        _tied_output(src, cfg, emb)
        # HF's in-memory state_dict lists the tied head too (same tensor as the embedding);
        # save_pretrained drops it again.
        dst.put("lm_head.weight", dst[emb_key])
    else:
        dst.put("lm_head.weight", _unpad(src.take("output_layer.weight"), cfg.vocab_size))


def _gpt2_to_hf(src: _Source, cfg: ModelConfig) -> _Target:
    dst = _Target("Hugging Face")
    heads, groups, head_dim = _heads(cfg)
    emb = src.take("embedding.word_embeddings.weight")
    dst.put("transformer.wte.weight", _unpad(emb, cfg.vocab_size))
    dst.put("transformer.wpe.weight", _c(src.take("embedding.position_embeddings.weight")))
    for i in range(cfg.num_layers):
        p, hp = f"decoder.layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            dst.put(f"{hp}ln_1.{kind}", _c(src.take(f"{p}input_layernorm.{kind}")))
            dst.put(f"{hp}ln_2.{kind}", _c(src.take(f"{p}pre_mlp_layernorm.{kind}")))
            # c_attn is [q | k | v] (each all heads, head-major); megatron interleaves per head.
            q, k, v = _split_qkv(src.take(f"{p}self_attention.linear_qkv.{kind}"), heads, groups, head_dim)
            qkv = torch.cat([q, k, v], dim=0)
            # Conv1D stores weights [in, out]: the transpose of torch Linear's [out, in].
            tr = (lambda t: t.t().contiguous()) if kind == "weight" else _c
            dst.put(f"{hp}attn.c_attn.{kind}", tr(qkv))
            dst.put(f"{hp}attn.c_proj.{kind}", tr(src.take(f"{p}self_attention.linear_proj.{kind}")))
            dst.put(f"{hp}mlp.c_fc.{kind}", tr(src.take(f"{p}mlp.linear_fc1.{kind}")))
            dst.put(f"{hp}mlp.c_proj.{kind}", tr(src.take(f"{p}mlp.linear_fc2.{kind}")))
    for kind in ("weight", "bias"):
        dst.put(f"transformer.ln_f.{kind}", _c(src.take(f"decoder.final_layernorm.{kind}")))
    _lm_head_to_hf(src, dst, cfg, emb, "transformer.wte.weight")
    return dst


def megatron_to_hf(
    state_dict: Mapping[str, object],
    model_cfg: ModelConfig,
    allow_sliding_window_mismatch: bool = False,
) -> Dict[str, torch.Tensor]:
    """Convert a full (TP=PP=EP=1) megatron GPTModel state dict to the HF model's state dict.

    The result loads with ``load_state_dict(strict=True)`` into ``hf_model_class(model_cfg)``
    built from ``hf_config(model_cfg)``. Tensors keep their dtype and are fresh copies; with
    tied embeddings ``lm_head.weight`` is the same tensor object as the input embedding.
    Raises ``ConversionError`` on any missing, unexpected or mis-shaped key."""
    family = hf_family(model_cfg)
    config = hf_config(model_cfg, allow_sliding_window_mismatch=allow_sliding_window_mismatch)
    tensors = normalize_megatron_keys(state_dict)
    expected = expected_megatron_shapes(model_cfg)
    if model_cfg.tie_embeddings and "output_layer.weight" in tensors:
        expected = dict(expected, **{"output_layer.weight": expected["embedding.word_embeddings.weight"]})
    _check_keys_and_shapes(tensors, expected, "megatron")
    src = _Source(tensors, "megatron")
    if family == "gpt2":
        out = _gpt2_to_hf(src, model_cfg)
    else:
        out = _llama_to_hf(src, model_cfg, moe=family == "mixtral")
    src.finish()
    _check_keys_and_shapes(out, expected_hf_shapes(model_cfg, config), "produced Hugging Face")
    return dict(out)


# --------------------------------------------------------------------------------------
# HF -> megatron
# --------------------------------------------------------------------------------------


_LEGACY_MIXTRAL = re.compile(
    r"^(model\.layers\.\d+)\.block_sparse_moe\.(gate\.weight|experts\.(\d+)\.(w[123])\.weight)$"
)


def _normalize_hf_keys(hf_state_dict: Mapping[str, torch.Tensor], model_cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """Accept the on-disk checkpoint forms too: a tied ``lm_head.weight`` may be absent (as
    ``save_pretrained`` writes it), and Mixtral's per-expert ``block_sparse_moe`` layout
    (hub checkpoints, and what transformers 5's ``save_pretrained`` writes) is fused into transformers 5's ``gate_up_proj``."""
    tensors = {k: v for k, v in hf_state_dict.items()}
    if hf_family(model_cfg) != "mixtral" or not any(".block_sparse_moe." in k for k in tensors):
        return tensors
    out: Dict[str, torch.Tensor] = {}
    experts: Dict[str, Dict[int, Dict[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        m = _LEGACY_MIXTRAL.match(key)
        if not m:
            out[key] = value
        elif m.group(3) is None:
            out[f"{m.group(1)}.mlp.gate.weight"] = value
        else:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(3)), {})[m.group(4)] = value
    for layer, per_expert in experts.items():
        ids = sorted(per_expert)
        if ids != list(range(model_cfg.num_experts)) or any(set(w) != {"w1", "w2", "w3"} for w in per_expert.values()):
            raise ConversionError(f"{layer}: incomplete legacy Mixtral experts {ids}")
        # w1 = gate, w3 = up, w2 = down.
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([per_expert[e]["w1"], per_expert[e]["w3"]], dim=0) for e in ids]
        )
        out[f"{layer}.mlp.experts.down_proj"] = torch.stack([per_expert[e]["w2"] for e in ids])
    return out


def _hf_tied_head(src: _Source, cfg: ModelConfig, emb_key: str) -> None:
    if cfg.tie_embeddings and src.has("lm_head.weight"):
        head, emb = src.take("lm_head.weight"), src.tensors[emb_key]
        if head.shape != emb.shape or not torch.equal(head, emb):
            raise ConversionError("tie_word_embeddings is set but lm_head.weight differs from the embedding")


def _llama_to_megatron(src: _Source, cfg: ModelConfig, moe: bool) -> _Target:
    dst = _Target("megatron")
    heads, groups, head_dim = _heads(cfg)
    rows = cfg.padded_vocab_size
    dst.put("embedding.word_embeddings.weight", _pad(src.take("model.embed_tokens.weight"), rows))
    kinds = ("weight", "bias") if cfg.add_bias else ("weight",)
    for i in range(cfg.num_layers):
        p, hp = f"decoder.layers.{i}.", f"model.layers.{i}."
        dst.put(f"{p}input_layernorm.weight", _c(src.take(f"{hp}input_layernorm.weight")))
        dst.put(f"{p}pre_mlp_layernorm.weight", _c(src.take(f"{hp}post_attention_layernorm.weight")))
        for kind in kinds:
            q, k, v = (src.take(f"{hp}self_attn.{n}_proj.{kind}") for n in "qkv")
            dst.put(f"{p}self_attention.linear_qkv.{kind}", _merge_qkv(q, k, v, heads, groups, head_dim))
            dst.put(f"{p}self_attention.linear_proj.{kind}", _c(src.take(f"{hp}self_attn.o_proj.{kind}")))
        if moe:
            dst.put(f"{p}mlp.router.weight", _c(src.take(f"{hp}mlp.gate.weight")))
            gate_up = src.take(f"{hp}mlp.experts.gate_up_proj")
            down = src.take(f"{hp}mlp.experts.down_proj")
            for e in range(cfg.num_experts):
                dst.put(f"{p}mlp.experts.local_experts.{e}.linear_fc1.weight", _c(gate_up[e]))
                dst.put(f"{p}mlp.experts.local_experts.{e}.linear_fc2.weight", _c(down[e]))
            continue
        for kind in kinds:
            gate, up = src.take(f"{hp}mlp.gate_proj.{kind}"), src.take(f"{hp}mlp.up_proj.{kind}")
            dst.put(f"{p}mlp.linear_fc1.{kind}", torch.cat([gate, up], dim=0))
            dst.put(f"{p}mlp.linear_fc2.{kind}", _c(src.take(f"{hp}mlp.down_proj.{kind}")))
    dst.put("decoder.final_layernorm.weight", _c(src.take("model.norm.weight")))
    if cfg.tie_embeddings:
        _hf_tied_head(src, cfg, "model.embed_tokens.weight")
    else:
        dst.put("output_layer.weight", _pad(src.take("lm_head.weight"), rows))
    return dst


def _gpt2_to_megatron(src: _Source, cfg: ModelConfig) -> _Target:
    dst = _Target("megatron")
    heads, groups, head_dim = _heads(cfg)
    rows = cfg.padded_vocab_size
    h = cfg.hidden_size
    dst.put("embedding.word_embeddings.weight", _pad(src.take("transformer.wte.weight"), rows))
    dst.put("embedding.position_embeddings.weight", _c(src.take("transformer.wpe.weight")))
    for i in range(cfg.num_layers):
        p, hp = f"decoder.layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            dst.put(f"{p}input_layernorm.{kind}", _c(src.take(f"{hp}ln_1.{kind}")))
            dst.put(f"{p}pre_mlp_layernorm.{kind}", _c(src.take(f"{hp}ln_2.{kind}")))
            tr = (lambda t: t.t().contiguous()) if kind == "weight" else _c
            qkv = tr(src.take(f"{hp}attn.c_attn.{kind}"))
            q, k, v = torch.split(qkv, [h, h, h], dim=0)
            dst.put(f"{p}self_attention.linear_qkv.{kind}", _merge_qkv(q, k, v, heads, groups, head_dim))
            dst.put(f"{p}self_attention.linear_proj.{kind}", tr(src.take(f"{hp}attn.c_proj.{kind}")))
            dst.put(f"{p}mlp.linear_fc1.{kind}", tr(src.take(f"{hp}mlp.c_fc.{kind}")))
            dst.put(f"{p}mlp.linear_fc2.{kind}", tr(src.take(f"{hp}mlp.c_proj.{kind}")))
    for kind in ("weight", "bias"):
        dst.put(f"decoder.final_layernorm.{kind}", _c(src.take(f"transformer.ln_f.{kind}")))
    if cfg.tie_embeddings:
        _hf_tied_head(src, cfg, "transformer.wte.weight")
    else:
        dst.put("output_layer.weight", _pad(src.take("lm_head.weight"), rows))
    return dst


def hf_to_megatron(
    hf_state_dict: Mapping[str, torch.Tensor],
    model_cfg: ModelConfig,
    allow_sliding_window_mismatch: bool = False,
) -> Dict[str, torch.Tensor]:
    """Convert a Hugging Face state dict to a full megatron GPTModel state dict (local spec).

    The vocabulary is re-padded to ``model_cfg.padded_vocab_size`` with zero rows. The
    result has exactly the parameter keys of ``expected_megatron_shapes(model_cfg)`` and no
    ``_extra_state`` entries; load it with ``load_megatron_state_dict``. With tied
    embeddings ``lm_head.weight`` may be present (it must equal the embedding) or absent.
    Raises ``ConversionError`` on any missing, unexpected or mis-shaped key."""
    family = hf_family(model_cfg)
    config = hf_config(model_cfg, allow_sliding_window_mismatch=allow_sliding_window_mismatch)
    tensors = _normalize_hf_keys(hf_state_dict, model_cfg)
    expected = expected_hf_shapes(model_cfg, config)
    if model_cfg.tie_embeddings and "lm_head.weight" not in tensors:
        expected.pop("lm_head.weight", None)
    _check_keys_and_shapes(tensors, expected, "Hugging Face")
    src = _Source(tensors, "Hugging Face")
    if family == "gpt2":
        out = _gpt2_to_megatron(src, model_cfg)
    else:
        out = _llama_to_megatron(src, model_cfg, moe=family == "mixtral")
    src.finish()
    _check_keys_and_shapes(out, expected_megatron_shapes(model_cfg), "produced megatron")
    return dict(out)


def load_megatron_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load ``state_dict`` into a megatron GPTModel strictly, except for ``_extra_state``.

    ``hf_to_megatron`` produces no ``_extra_state`` entries; megatron's linear layers expect
    one each (``None`` for the local spec), so a plain ``strict=True`` load would refuse."""
    result = model.load_state_dict(dict(state_dict), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(IGNORED_SUFFIXES)]
    if missing or result.unexpected_keys:
        raise ConversionError(f"megatron load: missing {_fmt(missing)}; unexpected {_fmt(result.unexpected_keys)}")
