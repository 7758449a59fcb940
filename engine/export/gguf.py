"""`python -m engine export gguf SOURCE OUT.gguf --type f16|q8_0|f32`: a llama.cpp / Ollama file.

SOURCE is a Hugging Face directory exported by the engine (``python -m engine export hf``)
or an engine checkpoint / run directory, which is first exported to Hugging Face in a
temporary directory next to OUT. The Hugging Face directory is then converted with the
``gguf`` package following llama.cpp's ``convert_hf_to_gguf.py`` for its ``llama``
architecture (LLaMA, and Mixtral's MoE as ``ffn_*_exps`` expert tensors):

* tensor names ``token_embd``, ``blk.N.attn_norm|attn_q|attn_k|attn_v|attn_output|ffn_norm|
  ffn_gate|ffn_up|ffn_down`` (MoE: ``ffn_gate_inp`` and ``ffn_gate_exps|ffn_up_exps|
  ffn_down_exps``), ``output_norm``, ``output`` (absent with tied embeddings: llama.cpp then
  reads ``token_embd``);
* the q/k row permutation: Hugging Face's (and megatron's) RoPE rotates the two halves of
  each head (``rotate_half``), llama.cpp's ``llama`` rotates adjacent pairs, so the rows of
  each q and k head are reordered from ``[x0..x(d/2-1), y0..]`` to ``[x0, y0, x1, y1, ...]``;
* tensor types: 1-D tensors and the MoE router in F32 (as llama.cpp), the rest in the
  requested type; a Q8_0 tensor whose rows are not a multiple of 32 falls back to F16, as
  in llama.cpp's converter;
* the SentencePiece tokenizer (``tokenizer.model``) with its scores and piece types
  (normal, unknown, control, user-defined, unused, byte), padded with ``[PADn]`` unused
  pieces to the model's vocabulary rows; BOS/EOS/UNK/PAD and end-of-turn ids, no BOS added
  (the engine trains without one), no dummy-prefix space (the engine's tokenizers have none),
  the chat template, and the card's sampling defaults as ``general.sampling.*``.

An Ollama ``Modelfile`` is written next to OUT (see ``engine.export.ollama``). The GGUF is
written to ``OUT.tmp`` and renamed at the end. Unsupported inputs (GPT-2, sliding-window
attention, biases, RoPE scaling, a missing ``tokenizer.model``, a tokenizer larger than the
vocabulary) are one ``ConfigError`` line each.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from engine.config import ConfigError

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType

OUT_TYPES = ("f16", "q8_0", "f32")
ARCH = "llama"
# Hugging Face architectures llama.cpp's ``llama`` covers, and whether they are MoE.
SUPPORTED = {"LlamaForCausalLM": False, "MixtralForCausalLM": True}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}
# Score and type llama.cpp's converter gives the rows past the tokenizer's pieces.
PAD_SCORE = -10000.0


class GGUFExportError(ConfigError):
    """A source that cannot be written as a llama.cpp ``llama`` GGUF file."""


# --------------------------------------------------------------------------------------
# Hyper-parameters
# --------------------------------------------------------------------------------------


@dataclass
class LlamaHParams:
    """What llama.cpp's ``llama`` architecture needs to know, read from ``config.json``."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx: int
    rope_theta: float
    rms_eps: float
    tied: bool
    n_expert: int = 0
    n_expert_used: int = 0

    @classmethod
    def from_config(cls, config: Dict, where: str) -> "LlamaHParams":
        """Validate a transformers ``config.json`` dict; GGUFExportError naming what llama.cpp
        would compute differently."""
        model_type = str(config.get("model_type"))
        # A config written by a bare ``PretrainedConfig.save_pretrained`` has no architectures.
        arch = (config.get("architectures") or [_MODEL_TYPES.get(model_type, model_type)])[0]
        if arch == "GPT2LMHeadModel" or model_type == "gpt2":
            raise GGUFExportError(
                f"{where}: GPT-2 models are not exported to GGUF; the engine writes llama.cpp's "
                "llama architecture only (the LLaMA and Mixtral presets)"
            )
        if arch not in SUPPORTED:
            raise GGUFExportError(
                f"{where}: unsupported architecture {arch}; GGUF export supports {', '.join(SUPPORTED)}"
            )
        problems = []
        if config.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act {config.get('hidden_act')} (llama.cpp uses SiLU)")
        if config.get("attention_bias") or config.get("mlp_bias"):
            problems.append("attention/MLP biases")
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            problems.append(f"RoPE scaling {rope.get('rope_type', rope.get('type'))}")
        n_ctx = int(config["max_position_embeddings"])
        window = config.get("sliding_window")
        if window is not None and int(window) < n_ctx:
            problems.append(f"sliding-window attention (window {window} < context {n_ctx})")
        if problems:
            raise GGUFExportError(
                f"{where}: llama.cpp's llama architecture cannot express {'; '.join(problems)}; "
                "the GGUF would compute a different model"
            )
        theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        if "rope_theta" in config and "rope_theta" in rope and float(config["rope_theta"]) != float(rope["rope_theta"]):
            raise GGUFExportError(f"{where}: rope_theta {config['rope_theta']} != rope_parameters {rope['rope_theta']}")
        n_head = int(config["num_attention_heads"])
        moe = SUPPORTED[arch]
        return cls(
            n_layer=int(config["num_hidden_layers"]),
            n_embd=int(config["hidden_size"]),
            n_ff=int(config["intermediate_size"]),
            n_head=n_head,
            n_head_kv=int(config.get("num_key_value_heads") or n_head),
            head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // n_head),
            n_vocab=int(config["vocab_size"]),
            n_ctx=n_ctx,
            rope_theta=float(theta),
            rms_eps=float(config.get("rms_norm_eps", 1e-6)),
            tied=bool(config.get("tie_word_embeddings", False)),
            n_expert=int(config["num_local_experts"]) if moe else 0,
            n_expert_used=int(config["num_experts_per_tok"]) if moe else 0,
        )


def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from rotate-half order to llama.cpp's interleaved pairs.

    The same reshape as llama.cpp's ``LlamaModel.permute``: rows ``[x0..x(d/2-1), y0..]``
    of a head become ``[x0, y0, x1, y1, ...]``, so that llama.cpp's RoPE on adjacent pairs
    rotates the same (x_i, y_i) pairs as Hugging Face's ``rotate_half``."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


@dataclass
class Vocab:
    """The GGUF tokenizer arrays and special ids of a SentencePiece model."""

    tokens: List[str]
    scores: List[float]
    types: List[int]
    unk: Optional[int]
    bos: Optional[int]
    eos: Optional[int]
    pad: Optional[int]
    add_space_prefix: bool
    tokenization_caveats: List[str]
    """Why llama.cpp may split raw text differently from SentencePiece (empty: it does not)."""

    def piece_id(self, piece: str) -> Optional[int]:
        """Id of ``piece``, or None."""
        try:
            return self.tokens.index(piece)
        except ValueError:
            return None


def sentencepiece_vocab(model_bytes: bytes, n_vocab: int, where: str) -> Vocab:
    """Pieces, scores and types of the SentencePiece model, padded to ``n_vocab`` rows."""
    import gguf

    from engine.data.tokenizer_hf import _model_proto

    proto = _model_proto(model_bytes)
    pieces = list(proto.pieces)
    if len(pieces) > n_vocab:
        raise GGUFExportError(
            f"{where}: tokenizer.model has {len(pieces)} pieces but the model's vocabulary has {n_vocab} rows"
        )
    # sentencepiece_model.proto's piece types have llama.cpp's token-type numbers.
    kinds = {t.value: t for t in gguf.TokenType}
    tokens = [p.piece for p in pieces]
    scores = [float(p.score) for p in pieces]
    types = [int(kinds[p.type]) for p in pieces]
    for i in range(len(pieces), n_vocab):
        tokens.append(f"[PAD{i}]")
        scores.append(PAD_SCORE)
        types.append(int(gguf.TokenType.UNUSED))
    spec = proto.trainer_spec

    def special(i: int) -> Optional[int]:
        return i if 0 <= i < len(pieces) else None

    return Vocab(
        tokens=tokens,
        scores=scores,
        types=types,
        unk=special(spec.unk_id),
        bos=special(spec.bos_id),
        eos=special(spec.eos_id),
        pad=special(spec.pad_id),
        add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix),
        tokenization_caveats=_llama_cpp_caveats(proto),
    )


def _llama_cpp_caveats(proto) -> List[str]:
    """llama.cpp's ``llama`` tokenizer merges adjacent pieces by score (SentencePiece's BPE
    algorithm) on the raw text: exact for a BPE model without a normaliser, not otherwise."""
    from engine.data.tokenizer_hf import BPE

    caveats = []
    if proto.trainer_spec.model_type != BPE:
        caveats.append("it is a Unigram model, which llama.cpp segments by BPE-style merges")
    if proto.normalizer_spec.precompiled_charsmap:
        caveats.append(f"llama.cpp does not apply the tokenizer's normaliser ({proto.normalizer_spec.name})")
    return caveats


# --------------------------------------------------------------------------------------
# Hugging Face directory
# --------------------------------------------------------------------------------------


def _read_json(path: Path) -> Dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise GGUFExportError(f"{path}: not valid JSON ({exc})") from None


def chat_template_of(hf_dir: Path) -> Optional[str]:
    """The Jinja chat template: ``chat_template.jinja`` (transformers 5) or the
    ``chat_template`` entry of ``tokenizer_config.json``."""
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = _read_json(hf_dir / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template


class _Weights:
    """Lazy access to the tensors of a directory's safetensors file(s), as float32 numpy."""

    def __init__(self, hf_dir: Path, stack: contextlib.ExitStack):
        from safetensors import safe_open

        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map") or {}
            files = sorted(set(weight_map.values()))
        elif (hf_dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise GGUFExportError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
        self.where: Dict[str, object] = {}
        for name in files:
            path = hf_dir / name
            if not path.is_file():
                raise GGUFExportError(f"{hf_dir}: the index names {name}, which is missing")
            try:
                handle = stack.enter_context(safe_open(str(path), framework="pt"))
            except Exception as exc:  # safetensors raises its own error types for truncated files
                raise GGUFExportError(f"{path}: unreadable safetensors file ({exc})") from None
            for key in handle.keys():
                self.where[key] = handle
        self.used: set = set()

    def has(self, key: str) -> bool:
        return key in self.where

    def shape(self, key: str) -> Tuple[int, ...]:
        if key not in self.where:
            raise GGUFExportError(f"the Hugging Face weights lack '{key}'")
        return tuple(self.where[key].get_slice(key).get_shape())  # type: ignore[attr-defined]

    def take(self, key: str) -> Callable[[], np.ndarray]:
        """Mark ``key`` consumed; return a loader of its float32 values."""
        self.shape(key)
        self.used.add(key)
        handle = self.where[key]
        return lambda: handle.get_tensor(key).float().numpy()  # type: ignore[attr-defined]

    def unused(self) -> List[str]:
        return sorted(set(self.where) - self.used)


@dataclass
class _Tensor:
    """One GGUF tensor to write: its name, numpy shape, type and how to compute it."""

    name: str
    shape: Tuple[int, ...]
    qtype: "GGMLQuantizationType"
    load: Callable[[], np.ndarray]


def _tensor_name(kind: str, bid: Optional[int] = None, suffix: str = "weight") -> str:
    import gguf

    return gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, kind)].format(bid=bid) + "." + suffix


def _qtype(name: str, shape: Tuple[int, ...], out_type: str) -> "GGMLQuantizationType":
    """llama.cpp's converter's choice: F32 for 1-D tensors and the MoE router, else the
    requested type, with F16 for Q8_0 tensors whose rows are not whole blocks."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) == 1 or ".ffn_gate_inp." in name or out_type == "f32":
        return Q.F32
    if out_type == "f16":
        return Q.F16
    block, _ = gguf.GGML_QUANT_SIZES[Q.Q8_0]
    return Q.Q8_0 if shape[-1] % block == 0 else Q.F16


def _stack(loads: List[Callable[[], np.ndarray]]) -> np.ndarray:
    return np.stack([f() for f in loads])


def _rows(load: Callable[[], np.ndarray], start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of every expert of a fused ``[experts, rows, cols]`` tensor."""
    return np.ascontiguousarray(load()[:, start:stop])


def _plan_tensors(w: _Weights, hp: LlamaHParams, out_type: str, where: str) -> List[_Tensor]:
    """Every GGUF tensor, mapped strictly from the Hugging Face keys (each used once)."""

    planned: List[_Tensor] = []

    def add(kind: str, bid: Optional[int], shape: Tuple[int, ...], load: Callable[[], np.ndarray]) -> None:
        name = _tensor_name(kind, bid)
        planned.append(_Tensor(name, shape, _qtype(name, shape, out_type), load))

    def direct(kind: str, bid: Optional[int], key: str, shape: Tuple[int, ...], heads: int = 0) -> None:
        got = w.shape(key)
        if got != shape:
            raise GGUFExportError(f"{where}: '{key}' has shape {got}, the config implies {shape}")
        load = w.take(key)
        if heads:
            add(kind, bid, shape, lambda: permute_rope_rows(load(), heads))
        else:
            add(kind, bid, shape, load)

    E, H, F, D = hp.n_embd, hp.n_head, hp.n_ff, hp.head_dim
    direct("TOKEN_EMBD", None, "model.embed_tokens.weight", (hp.n_vocab, E))
    for i in range(hp.n_layer):
        p = f"model.layers.{i}."
        direct("ATTN_NORM", i, p + "input_layernorm.weight", (E,))
        direct("ATTN_Q", i, p + "self_attn.q_proj.weight", (H * D, E), heads=H)
        direct("ATTN_K", i, p + "self_attn.k_proj.weight", (hp.n_head_kv * D, E), heads=hp.n_head_kv)
        direct("ATTN_V", i, p + "self_attn.v_proj.weight", (hp.n_head_kv * D, E))
        direct("ATTN_OUT", i, p + "self_attn.o_proj.weight", (E, H * D))
        direct("FFN_NORM", i, p + "post_attention_layernorm.weight", (E,))
        if not hp.n_expert:
            direct("FFN_GATE", i, p + "mlp.gate_proj.weight", (F, E))
            direct("FFN_UP", i, p + "mlp.up_proj.weight", (F, E))
            direct("FFN_DOWN", i, p + "mlp.down_proj.weight", (E, F))
            continue
        n = hp.n_expert
        if w.has(p + "block_sparse_moe.gate.weight"):  # the hub layout: one tensor per expert
            direct("FFN_GATE_INP", i, p + "block_sparse_moe.gate.weight", (n, E))
            for kind, wid, shape in (
                ("FFN_GATE_EXP", "w1", (F, E)),
                ("FFN_UP_EXP", "w3", (F, E)),
                ("FFN_DOWN_EXP", "w2", (E, F)),
            ):
                keys = [f"{p}block_sparse_moe.experts.{e}.{wid}.weight" for e in range(n)]
                for k in keys:
                    if w.shape(k) != shape:
                        raise GGUFExportError(f"{where}: '{k}' has shape {w.shape(k)}, the config implies {shape}")
                loads = [w.take(k) for k in keys]
                add(kind, i, (n, *shape), functools.partial(_stack, loads))
        else:  # transformers 5's fused in-memory layout: gate_up_proj[e] = [gate; up]
            direct("FFN_GATE_INP", i, p + "mlp.gate.weight", (n, E))
            key = p + "mlp.experts.gate_up_proj"
            if w.shape(key) != (n, 2 * F, E):
                raise GGUFExportError(f"{where}: '{key}' has shape {w.shape(key)}, the config implies {(n, 2 * F, E)}")
            gate_up = w.take(key)
            add("FFN_GATE_EXP", i, (n, F, E), functools.partial(_rows, gate_up, 0, F))
            add("FFN_UP_EXP", i, (n, F, E), functools.partial(_rows, gate_up, F, 2 * F))
            direct("FFN_DOWN_EXP", i, p + "mlp.experts.down_proj", (n, E, F))
    direct("OUTPUT_NORM", None, "model.norm.weight", (E,))
    if not hp.tied:
        direct("OUTPUT", None, "lm_head.weight", (hp.n_vocab, E))
    elif w.has("lm_head.weight"):
        w.take("lm_head.weight")  # a tied head is the embedding; llama.cpp reads token_embd
    left = w.unused()
    if left:
        raise GGUFExportError(
            f"{where}: {len(left)} Hugging Face tensors have no GGUF counterpart: {', '.join(left[:5])}"
        )
    return planned


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


@dataclass
class GGUFResult:
    """What ``export_gguf`` wrote."""

    path: Path
    modelfile: Path
    out_type: str
    tensors: int
    bytes: int
    chat_format: str
    tokenization_caveats: List[str]


def _file_type(out_type: str):
    import gguf

    return {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[out_type]


def convert_hf_dir(
    hf_dir: Path, out: Path, out_type: str = "f16", name: Optional[str] = None, progress: bool = True
) -> GGUFResult:
    """Write the engine-exported Hugging Face directory ``hf_dir`` as the GGUF file ``out``
    (through ``out.tmp``) and an Ollama ``Modelfile`` next to it."""
    import gguf

    from engine.export import ollama

    if out_type not in OUT_TYPES:
        raise GGUFExportError(f"unknown GGUF type {out_type!r}; choose one of {', '.join(OUT_TYPES)}")
    where = str(hf_dir)
    config = _read_json(hf_dir / "config.json")
    if not config:
        raise GGUFExportError(f"{where}: no config.json; not a Hugging Face model directory")
    try:
        hp = LlamaHParams.from_config(config, where)
    except KeyError as exc:
        raise GGUFExportError(f"{where}: config.json lacks {exc}") from None
    approximation = _read_json(hf_dir / "engine_export.json").get("approximation")
    if approximation:
        # `export hf --allow-sliding-window-mismatch`: config.json no longer shows the window.
        raise GGUFExportError(
            f"{where}: this Hugging Face export approximates the trained model ({approximation}); "
            "GGUF export takes exact exports only"
        )
    sp_model = hf_dir / "tokenizer.model"
    if not sp_model.is_file():
        raise GGUFExportError(
            f"{where}: no tokenizer.model; the GGUF tokenizer is written from the SentencePiece model"
        )
    vocab = sentencepiece_vocab(sp_model.read_bytes(), hp.n_vocab, where)
    tok_config = _read_json(hf_dir / "tokenizer_config.json")
    gen_config = _read_json(hf_dir / "generation_config.json")
    template = chat_template_of(hf_dir)
    eos_piece = vocab.tokens[vocab.eos] if vocab.eos is not None else ""
    fmt = ollama.chat_format(template, eos_piece)
    eot = _end_of_turn(gen_config, vocab, fmt)
    sampling = ollama.sampling_parameters(gen_config)
    modelfile_text = ollama.modelfile_text(out.name, fmt, eos_piece, sampling, hp.n_ctx)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with contextlib.ExitStack() as stack:
        weights = _Weights(hf_dir, stack)
        planned = _plan_tensors(weights, hp, out_type, where)
        writer = gguf.GGUFWriter(path=None, arch=ARCH)
        _add_metadata(writer, hp, vocab, name or hf_dir.name, out_type, tok_config, template, eot, sampling)
        total = 0
        for t in planned:
            block, size = gguf.GGML_QUANT_SIZES[t.qtype]
            count = 1
            for d in t.shape:
                count *= d
            nbytes = count // block * size
            total += nbytes
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes, raw_dtype=t.qtype)
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in _progress(planned, progress):
                # One tensor in memory at a time: the working set is the largest tensor in f32
                # and its converted copy (the source shards are memory-mapped).
                writer.write_tensor_data(gguf.quants.quantize(t.load(), t.qtype))
            writer.close()
            tmp.replace(out)
        except BaseException:
            writer.close()
            tmp.unlink(missing_ok=True)
            raise
    modelfile = out.parent / "Modelfile"
    ollama.write_modelfile(modelfile, modelfile_text)
    return GGUFResult(out, modelfile, out_type, len(planned), total, fmt.name, vocab.tokenization_caveats)


def _progress(items: List[_Tensor], enabled: bool) -> Iterator[_Tensor]:
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc="gguf", unit="tensor", mininterval=1.0, file=sys.stderr)


def _end_of_turn(gen_config: Dict, vocab: Vocab, fmt) -> Optional[int]:
    """The id that ends an assistant turn: an EOS id of ``generation_config.json`` other
    than the tokenizer's EOS, else the template's end-of-turn piece; None when EOS does it."""
    ids = gen_config.get("eos_token_id")
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    others = [int(i) for i in ids if int(i) != vocab.eos]
    if others:
        return others[0]
    return vocab.piece_id(fmt.end_of_turn) if fmt.end_of_turn else None


def _add_metadata(
    writer, hp: LlamaHParams, vocab: Vocab, name: str, out_type: str, tok_config: Dict, template, eot, sampling
) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(_file_type(out_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(hp.n_vocab)
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_key_length(hp.head_dim)
    writer.add_value_length(hp.head_dim)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    if hp.n_expert:
        writer.add_expert_count(hp.n_expert)
        writer.add_expert_used_count(hp.n_expert_used)

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    for value, add in (
        (vocab.bos, writer.add_bos_token_id),
        (vocab.eos, writer.add_eos_token_id),
        (vocab.unk, writer.add_unk_token_id),
        (vocab.pad, writer.add_pad_token_id),
        (eot, writer.add_eot_token_id),
    ):
        if value is not None:
            add(value)
    # The engine never prepends BOS (pretraining documents and chat records start without
    # one); llama.cpp's default for SentencePiece vocabularies is to add it.
    writer.add_add_bos_token(bool(tok_config.get("add_bos_token", False)))
    writer.add_add_eos_token(bool(tok_config.get("add_eos_token", False)))
    writer.add_add_space_prefix(vocab.add_space_prefix)
    if template:
        writer.add_chat_template(template)
    writer.add_sampling_temp(float(sampling["temperature"]))
    writer.add_sampling_top_p(float(sampling["top_p"]))
    writer.add_sampling_top_k(int(sampling["top_k"]))
    writer.add_sampling_penalty_repeat(float(sampling["repeat_penalty"]))


# --------------------------------------------------------------------------------------
# Engine checkpoints
# --------------------------------------------------------------------------------------


def _check_model_config(model_cfg, where: str) -> None:
    """Refuse, before the Hugging Face export, what the GGUF cannot express."""
    from models.hf_convert import ConversionError, hf_family

    try:
        family = hf_family(model_cfg)
    except ConversionError as exc:
        raise GGUFExportError(f"{where}: {exc}") from None
    if family == "gpt2":
        raise GGUFExportError(
            f"{where}: GPT-2 models are not exported to GGUF; the engine writes llama.cpp's "
            "llama architecture only (the LLaMA and Mixtral presets)"
        )
    if model_cfg.sliding_window:
        raise GGUFExportError(
            f"{where}: llama.cpp's llama architecture has no sliding-window attention (window "
            f"{model_cfg.sliding_window} on {model_cfg.sliding_window_layers} layers); the GGUF would attend differently"
        )


@contextlib.contextmanager
def hf_source(source: Path, scratch: Path) -> Iterator[Tuple[Path, str]]:
    """(Hugging Face directory, model name) for ``source``: itself when it holds a
    ``config.json``, else the engine checkpoint it names exported into ``scratch``."""
    if (source / "config.json").is_file():
        yield source, source.name
        return
    from engine.model_io import checkpoint_config, resolve_checkpoint

    ckpt = resolve_checkpoint(source)
    cfg = checkpoint_config(ckpt)
    _check_model_config(cfg.model, str(ckpt))
    from engine.export.hf import export_hf

    # The checkpoint's own precision: bf16 weights are exported exactly, fp32 ones are not
    # rounded twice on the way to f16.
    dtype = "fp32" if cfg.precision.dtype == "fp32" else "bf16"
    with tempfile.TemporaryDirectory(prefix=".gguf-hf-", dir=scratch) as tmp:
        hf_dir = Path(tmp) / "hf"
        export_hf(ckpt, hf_dir, dtype=dtype)
        run = ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else ckpt.name
        yield hf_dir, f"{run}-{ckpt.name}"


def export_gguf(source: str | Path, out: str | Path, out_type: str = "f16", progress: bool = True) -> GGUFResult:
    """Write ``source`` (engine checkpoint or run directory, or a Hugging Face directory the
    engine exported) as the GGUF file ``out`` plus an Ollama ``Modelfile`` next to it."""
    if out_type not in OUT_TYPES:
        raise GGUFExportError(f"unknown GGUF type {out_type!r}; choose one of {', '.join(OUT_TYPES)}")
    source, out = Path(source), Path(out)
    if not source.exists():
        raise GGUFExportError(f"{source}: no such checkpoint, run or Hugging Face directory")
    if out.suffix != ".gguf":
        raise GGUFExportError(f"{out}: the output file name must end in .gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    with hf_source(source, out.parent) as (hf_dir, name):
        return convert_hf_dir(hf_dir, out, out_type, name=name, progress=progress)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def register(formats) -> None:
    """Add ``export gguf``."""
    p = formats.add_parser(
        "gguf", help="llama.cpp / Ollama GGUF file (+ Modelfile) from a checkpoint or exported HF directory"
    )
    p.add_argument("source", help="engine checkpoint or run directory, or a Hugging Face directory the engine exported")
    p.add_argument("out", help="output file, e.g. model-q8_0.gguf (a Modelfile is written next to it)")
    # Not argparse choices: an unknown type is a one-line config error like every other bad input.
    p.add_argument("--type", dest="out_type", default="f16", help=f"tensor type: {' | '.join(OUT_TYPES)} (default f16)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export and print what was written."""
    result = export_gguf(args.source, args.out, args.out_type)
    print(
        f"wrote {result.path} ({result.out_type}, {result.tensors} tensors, {result.bytes / 2**20:.1f} MiB of "
        f"tensor data) and {result.modelfile} (chat template: {result.chat_format})"
    )
    if result.tokenization_caveats:
        print(
            "warning: llama.cpp/Ollama may tokenize some texts differently from the engine: "
            + "; ".join(result.tokenization_caveats)
            + " (exact: a tokenizer trained with --model-type bpe --normalization identity)",
            file=sys.stderr,
        )
    return 0
