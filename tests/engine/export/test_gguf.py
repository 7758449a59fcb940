"""GGUF export (engine/export/gguf.py): read back with gguf's own reader, checked against the
Hugging Face source, the SentencePiece model and an independent numpy forward pass.

The oracle for the q/k permutation is a float64 numpy LLaMA written from llama.cpp's
conventions (RoPE on adjacent pairs, "normal" mode; GQA head h -> kv head h // group; the
Mixtral MoE with softmax routing renormalised over the top-k), run on the GGUF tensors and
metadata only; its logits must match transformers' logits of the source directory. The
same oracle on a file written without the permutation must fail.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from engine.cli import main as cli_main
from engine.data.chat_template import get_chat_template
from engine.export import gguf as G
from engine.export import ollama

VOCAB = 1024  # the session tokenizer has 1000 pieces: 24 padding rows
SEQ = 24


# ------------------------------------------------------------------------------------
# Source directories
# ------------------------------------------------------------------------------------


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random norms and larger weights: every tensor's placement (and RoPE) shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.08 * noise)


def _hf_model(overrides, seed=0):
    from engine.run_config import load_run_config
    from models import hf_convert as hc

    cfg = load_run_config(None, [*overrides, f"model.vocab_size={VOCAB}"])
    config = hc.hf_config(cfg.model, bos_token_id=1, eos_token_id=2, pad_token_id=3, attn_implementation="eager")
    torch.manual_seed(seed)
    model = hc.hf_model_class(cfg.model)(config).eval()
    _perturb(model, seed)
    return model


def _write_hf_dir(model, out: Path, tokenizer_dir: str, template: str = "chatml") -> Path:
    """What `export hf` writes that the GGUF converter reads: weights, config, tokenizer, template."""
    model.save_pretrained(out)
    shutil.copy(Path(tokenizer_dir) / "tokenizer.model", out / "tokenizer.model")
    tok_config = {"chat_template": get_chat_template(template).to_jinja(), "add_bos_token": False}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return out


@pytest.fixture(scope="module")
def llama_dir(post_training_data, tmp_path_factory):
    """(transformers model, HF directory) of a perturbed tiny-llama (GQA 4:2, tied, vocab 1024)."""
    model = _hf_model(["model.preset=tiny-llama"])
    return model, _write_hf_dir(model, tmp_path_factory.mktemp("gguf") / "tiny-llama", post_training_data["tokenizer"])


def _read(path: Path):
    """(metadata, {name: (float32 values, type)}) through gguf's own reader and dequantizer."""
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {
        t.name: (gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32), t.tensor_type)
        for t in reader.tensors
    }
    return meta, tensors


def _source(model) -> dict:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of llama.cpp's interleaved pairs back to rotate-half order: GGUF row 2i of a head
    is HF row i, row 2i+1 is HF row i + d/2 (written independently of the exporter)."""
    d = w.shape[0] // heads
    order = np.empty(w.shape[0], dtype=np.int64)
    for h in range(heads):
        for i in range(d // 2):
            order[h * d + i] = h * d + 2 * i
            order[h * d + d // 2 + i] = h * d + 2 * i + 1
    return w[order]


def _expected_gguf(src: dict, n_head: int, n_kv: int, layers: int) -> dict:
    """GGUF name -> HF tensor (q/k rows in HF order), the llama.cpp llama naming."""
    out = {"token_embd.weight": src["model.embed_tokens.weight"], "output_norm.weight": src["model.norm.weight"]}
    names = {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(layers):
        for g, h in names.items():
            out[f"blk.{i}.{g}.weight"] = src[f"model.layers.{i}.{h}.weight"]
    return out


# ------------------------------------------------------------------------------------
# Tensors
# ------------------------------------------------------------------------------------


def _check_f16(path, model):
    meta, tensors = _read(path)
    src = _source(model)
    expected = _expected_gguf(src, 4, 2, 4)
    assert set(tensors) == set(expected), "tied model: no output.weight, nothing else missing or extra"
    for name, want in expected.items():
        got, kind = tensors[name]
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            got = _unpermute(got, 4 if "attn_q" in name else 2)
        if want.ndim == 1:
            assert kind == gguf.GGMLQuantizationType.F32, name
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            assert kind == gguf.GGMLQuantizationType.F16, name
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=name)
    return meta


def test_f16_tensors_equal_source_rounded(llama_dir, tmp_path):
    model, hf = llama_dir
    G.export_gguf(hf, tmp_path / "m.gguf", "f16", progress=False)
    meta = _check_f16(tmp_path / "m.gguf", model)
    assert meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    assert not (tmp_path / "m.gguf.tmp").exists()


def test_q8_0_within_quantization_error(llama_dir, tmp_path):
    model, hf = llama_dir
    G.export_gguf(hf, tmp_path / "m.gguf", "q8_0", progress=False)
    meta, tensors = _read(tmp_path / "m.gguf")
    assert meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    Q = gguf.GGMLQuantizationType
    for name, want in _expected_gguf(_source(model), 4, 2, 4).items():
        got, kind = tensors[name]
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            got = _unpermute(got, 4 if "attn_q" in name else 2)
        if want.ndim == 1:
            assert kind == Q.F32
            np.testing.assert_array_equal(got, want)
        elif want.shape[1] % 32:  # ffn_down's rows of 176 are not whole blocks: F16, as llama.cpp
            assert kind == Q.F16, name
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32))
        else:
            assert kind == Q.Q8_0, name
            # Per block of 32: scale d = max|x| / 127 stored in f16 (relative error <= 2^-11),
            # q = round(x / d): |x - q * d16| <= d / 2 + 127 |d - d16|.
            blocks = want.reshape(-1, 32)
            d = np.abs(blocks).max(axis=1, keepdims=True) / 127
            bound = d * (0.5 + 127 * 2.0**-11) + 1e-9
            err = np.abs(got.reshape(-1, 32) - blocks)
            assert (err <= bound).all(), f"{name}: max error/bound {(err / bound).max():.3f}"
            assert err.max() > 0  # really quantized


# ------------------------------------------------------------------------------------
# Tokenizer and metadata
# ------------------------------------------------------------------------------------


def test_tokenizer_and_model_metadata(llama_dir, post_training_data, tmp_path):
    import sentencepiece as spm

    _, hf = llama_dir
    G.export_gguf(hf, tmp_path / "m.gguf", "f16", progress=False)
    meta, _ = _read(tmp_path / "m.gguf")
    tok_dir = Path(post_training_data["tokenizer"])
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    user_defined = set(json.loads((tok_dir / "tokenizer_meta.json").read_text())["special_tokens"]["user_defined"])
    n = sp.get_piece_size()
    T = gguf.TokenType

    def kind(i):
        piece = sp.id_to_piece(i)
        if sp.is_unknown(i):
            return T.UNKNOWN
        if sp.is_control(i):
            return T.CONTROL
        if sp.is_byte(i):
            return T.BYTE
        if sp.is_unused(i):
            return T.UNUSED
        return T.USER_DEFINED if piece in user_defined else T.NORMAL

    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(n)] + [
        f"[PAD{i}]" for i in range(n, VOCAB)
    ]
    np.testing.assert_array_equal(
        np.array(meta["tokenizer.ggml.scores"], dtype=np.float32),
        np.array([sp.get_score(i) for i in range(n)] + [-10000.0] * (VOCAB - n), dtype=np.float32),
    )
    assert meta["tokenizer.ggml.token_type"] == [int(kind(i)) for i in range(n)] + [int(T.UNUSED)] * (VOCAB - n)
    # byte fallback: all 256 byte pieces, typed BYTE
    assert all(meta["tokenizer.ggml.token_type"][sp.piece_to_id(f"<0x{b:02X}>")] == T.BYTE for b in range(256))
    assert meta["tokenizer.ggml.bos_token_id"] == sp.bos_id()
    assert meta["tokenizer.ggml.eos_token_id"] == sp.eos_id()
    assert meta["tokenizer.ggml.unknown_token_id"] == sp.unk_id()
    assert meta["tokenizer.ggml.padding_token_id"] == sp.pad_id()
    assert meta["tokenizer.ggml.eot_token_id"] == sp.piece_to_id("<|im_end|>")
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.ggml.add_space_prefix"] is False
    assert meta["tokenizer.chat_template"] == get_chat_template("chatml").to_jinja()
    config = json.loads((hf / "config.json").read_text())
    assert meta["general.architecture"] == "llama"
    assert meta["llama.context_length"] == config["max_position_embeddings"] == 256
    assert meta["llama.vocab_size"] == VOCAB
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (4, 2)
    assert meta["llama.rope.freq_base"] == config["rope_parameters"]["rope_theta"] == 500000.0
    assert meta["llama.rope.dimension_count"] == 16
    assert meta["llama.block_count"] == 4 and meta["llama.feed_forward_length"] == 176
    assert meta["general.sampling.top_k"] == 50
    np.testing.assert_allclose(
        [meta["general.sampling.temp"], meta["general.sampling.top_p"], meta["general.sampling.penalty_repeat"]],
        [0.7, 0.9, 1.2],
        rtol=1e-6,
    )


# ------------------------------------------------------------------------------------
# Independent forward pass (llama.cpp conventions) vs transformers
# ------------------------------------------------------------------------------------


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope_pairs(x, base, n_rot):
    """llama.cpp's LLAMA_ROPE_TYPE_NORM: rotate (x[2i], x[2i+1]) by pos * base^(-2i/n_rot)."""
    t, _, d = x.shape
    theta = np.arange(t)[:, None] * base ** (-np.arange(0, n_rot, 2) / n_rot)[None, :]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
    out = x.copy()
    out[..., 0:n_rot:2] = a * cos - b * sin
    out[..., 1:n_rot:2] = a * sin + b * cos
    return out


def gguf_forward(path: Path, ids: np.ndarray) -> np.ndarray:
    """Logits of ``ids`` computed in float64 from the GGUF file alone."""
    meta, raw = _read(path)
    w = {k: v.astype(np.float64) for k, (v, _) in raw.items()}
    arch = meta["general.architecture"]
    H, KV = meta[f"{arch}.attention.head_count"], meta[f"{arch}.attention.head_count_kv"]
    eps, base = meta[f"{arch}.attention.layer_norm_rms_epsilon"], meta[f"{arch}.rope.freq_base"]
    n_rot, d = meta[f"{arch}.rope.dimension_count"], meta[f"{arch}.attention.key_length"]
    k_used = meta.get(f"{arch}.expert_used_count", 0)
    T = len(ids)
    x = w["token_embd.weight"][ids]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(meta[f"{arch}.block_count"]):
        p = f"blk.{i}."
        h = _rms(x, w[p + "attn_norm.weight"], eps)
        q = _rope_pairs((h @ w[p + "attn_q.weight"].T).reshape(T, H, d), base, n_rot)
        k = _rope_pairs((h @ w[p + "attn_k.weight"].T).reshape(T, KV, d), base, n_rot)
        v = (h @ w[p + "attn_v.weight"].T).reshape(T, KV, d)
        heads = []
        for j in range(H):
            g = j // (H // KV)
            s = q[:, j] @ k[:, g].T / np.sqrt(d) + mask
            a = np.exp(s - s.max(-1, keepdims=True))
            heads.append((a / a.sum(-1, keepdims=True)) @ v[:, g])
        x = x + np.concatenate(heads, -1) @ w[p + "attn_output.weight"].T
        h = _rms(x, w[p + "ffn_norm.weight"], eps)

        def silu(z):
            return z / (1 + np.exp(-z))

        if p + "ffn_gate_inp.weight" in w:
            logits = h @ w[p + "ffn_gate_inp.weight"].T
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            ff = np.zeros_like(x)
            for t in range(T):
                top = np.argsort(-probs[t])[:k_used]
                for e in top:
                    gate, up = w[p + "ffn_gate_exps.weight"][e], w[p + "ffn_up_exps.weight"][e]
                    y = w[p + "ffn_down_exps.weight"][e] @ (silu(gate @ h[t]) * (up @ h[t]))
                    ff[t] += probs[t, e] / probs[t, top].sum() * y
            x = x + ff
        else:
            x = x + (silu(h @ w[p + "ffn_gate.weight"].T) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    head = w.get("output.weight", w["token_embd.weight"])
    return _rms(x, w["output_norm.weight"], eps) @ head.T


def _hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)[None]).logits[0].double().numpy()


def _ids(seed=1):
    return np.random.default_rng(seed).integers(0, 1000, SEQ)


def test_llama_cpp_forward_matches_transformers_and_needs_the_permutation(llama_dir, tmp_path, monkeypatch):
    model, hf = llama_dir
    ids = _ids()
    G.export_gguf(hf, tmp_path / "m.gguf", "f32", progress=False)
    reference = _hf_logits(model, ids)
    diff = np.abs(gguf_forward(tmp_path / "m.gguf", ids) - reference).max()
    print(f"max |llama.cpp-convention forward(GGUF f32) - transformers| = {diff:.2e}")
    assert diff < 1e-4
    # f16 weights: the same model up to the rounding of its weights
    G.export_gguf(hf, tmp_path / "h.gguf", "f16", progress=False)
    assert np.abs(gguf_forward(tmp_path / "h.gguf", ids) - reference).max() < 0.05
    # Without the q/k row permutation llama.cpp's RoPE rotates the wrong pairs.
    monkeypatch.setattr(G, "permute_rope_rows", lambda w, n_head: w)
    G.export_gguf(hf, tmp_path / "bad.gguf", "f32", progress=False)
    bad = np.abs(gguf_forward(tmp_path / "bad.gguf", ids) - reference).max()
    print(f"... without the permutation: {bad:.2e}")
    assert bad > 100 * max(diff, 1e-6) and bad > 1e-2


@pytest.mark.parametrize("layout", ["hub", "fused"])
def test_mixtral_forward_matches_transformers(post_training_data, tmp_path, layout):
    """MoE (tiny-moe without its sliding window) as llama.cpp's llama + ffn_*_exps, from the
    hub layout save_pretrained writes and from transformers 5's fused in-memory layout."""
    from safetensors.torch import save_file

    model = _hf_model(["model.preset=tiny-moe", "model.sliding_window=0"], seed=3)
    hf = _write_hf_dir(model, tmp_path / "moe", post_training_data["tokenizer"])
    if layout == "fused":
        (hf / "model.safetensors").unlink()
        sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        assert any(k.endswith("mlp.experts.gate_up_proj") for k in sd)
        save_file(sd, str(hf / "model.safetensors"))
    G.export_gguf(hf, tmp_path / "moe.gguf", "f32", progress=False)
    meta, tensors = _read(tmp_path / "moe.gguf")
    assert meta["llama.expert_count"] == 8 and meta["llama.expert_used_count"] == 2
    assert tensors["blk.0.ffn_gate_exps.weight"][0].shape == (8, 128, 64)
    ids = _ids(2)
    diff = np.abs(gguf_forward(tmp_path / "moe.gguf", ids) - _hf_logits(model, ids)).max()
    assert diff < 1e-4, diff


# ------------------------------------------------------------------------------------
# Modelfile
# ------------------------------------------------------------------------------------


def test_modelfile_next_to_the_gguf(llama_dir, tmp_path, capsys):
    _, hf = llama_dir
    assert cli_main(["export", "gguf", str(hf), str(tmp_path / "out" / "tiny-q8_0.gguf"), "--type", "q8_0"]) == 0
    # The session tokenizer is a Unigram model with an NFKC-based normaliser: both are named.
    err = capsys.readouterr().err
    assert "warning: llama.cpp/Ollama may tokenize some texts differently" in err
    assert "Unigram" in err and "normaliser" in err
    text = (tmp_path / "out" / "Modelfile").read_text()
    assert text.splitlines()[0] == "FROM ./tiny-q8_0.gguf"
    go = "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    assert f'TEMPLATE """{go}"""' in text
    # The Go template renders exactly what the Jinja template renders with a generation prompt.
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    by_hand = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs) + "<|im_start|>assistant\n"
    assert get_chat_template("chatml").render(msgs, add_generation_prompt=True) == by_hand
    params = [line for line in text.splitlines() if line.startswith("PARAMETER")]
    assert params == [
        'PARAMETER stop "<|im_end|>"',
        'PARAMETER stop "<|im_start|>"',
        'PARAMETER stop "</s>"',
        "PARAMETER temperature 0.7",
        "PARAMETER top_p 0.9",
        "PARAMETER top_k 50",
        "PARAMETER repeat_penalty 1.2",
        "PARAMETER num_ctx 256",
    ]


def test_alpaca_and_custom_templates_in_the_modelfile():
    from engine.data.chat_template import ALPACA_PREAMBLE

    fmt = ollama.chat_format(get_chat_template("alpaca").to_jinja(), "</s>")
    assert fmt.name == "alpaca" and fmt.end_of_turn is None
    assert ALPACA_PREAMBLE in fmt.go_template and "{{ .Content }}</s>\n\n" in fmt.go_template
    text = ollama.modelfile_text("m.gguf", fmt, "</s>", ollama.sampling_parameters({"temperature": 0.5}), 128)
    assert 'PARAMETER stop "### Instruction:"' in text and "PARAMETER temperature 0.5" in text
    custom = ollama.chat_format("{{ messages }}", "</s>")
    assert custom.go_template is None
    assert "TEMPLATE" not in ollama.modelfile_text("m.gguf", custom, "</s>", ollama.CARD_SAMPLING, 128).replace(
        "No TEMPLATE", ""
    )


# ------------------------------------------------------------------------------------
# Bad input: one line, nothing written
# ------------------------------------------------------------------------------------


def _edited_copy(hf: Path, tmp_path: Path, **config) -> Path:
    out = tmp_path / "edited"
    shutil.copytree(hf, out)
    data = json.loads((out / "config.json").read_text())
    data.update(config)
    (out / "config.json").write_text(json.dumps(data))
    return out


def _refused(capsys, tmp_path, source, *extra) -> str:
    out = tmp_path / "o" / "m.gguf"
    assert cli_main(["export", "gguf", str(source), str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error: ") and "\n" not in err, err
    assert not out.exists() and not out.with_name("m.gguf.tmp").exists() and not (out.parent / "Modelfile").exists()
    return err


def test_bad_inputs_are_one_line_errors(llama_dir, tmp_path, capsys):
    _, hf = llama_dir
    assert "unknown GGUF type 'q4_k'" in _refused(capsys, tmp_path, hf, "--type", "q4_k")
    err = _refused(capsys, tmp_path, _edited_copy(hf, tmp_path / "a", architectures=["GPT2LMHeadModel"]))
    assert "GPT-2 models are not exported to GGUF" in err
    err = _refused(capsys, tmp_path, _edited_copy(hf, tmp_path / "b", architectures=["Qwen2ForCausalLM"]))
    assert "unsupported architecture Qwen2ForCausalLM" in err
    err = _refused(capsys, tmp_path, _edited_copy(hf, tmp_path / "c", sliding_window=16))
    assert "sliding-window attention" in err
    err = _refused(capsys, tmp_path, _edited_copy(hf, tmp_path / "d", vocab_size=512))
    assert "tokenizer.model has 1000 pieces but the model's vocabulary has 512 rows" in err
    approx = _edited_copy(hf, tmp_path / "g")
    (approx / "engine_export.json").write_text(json.dumps({"approximation": "full causal attention"}))
    assert "approximates the trained model (full causal attention)" in _refused(capsys, tmp_path, approx)
    no_tok = _edited_copy(hf, tmp_path / "e")
    (no_tok / "tokenizer.model").unlink()
    assert "no tokenizer.model" in _refused(capsys, tmp_path, no_tok)
    truncated = _edited_copy(hf, tmp_path / "f")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "model.safetensors" in _refused(capsys, tmp_path, truncated)
    assert "no such checkpoint" in _refused(capsys, tmp_path, tmp_path / "missing")
    assert "not a complete engine checkpoint" in _refused(capsys, tmp_path, tmp_path / "a")


def test_a_failure_while_writing_leaves_nothing(llama_dir, tmp_path, monkeypatch):
    _, hf = llama_dir
    calls = []
    quantize = gguf.quants.quantize

    def failing(data, qtype):
        calls.append(qtype)
        if len(calls) == 5:
            raise OSError("disk full")
        return quantize(data, qtype)

    monkeypatch.setattr(gguf.quants, "quantize", failing)
    with pytest.raises(OSError, match="disk full"):
        G.export_gguf(hf, tmp_path / "m.gguf", "f16", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_checkpoint_configs_gguf_cannot_express():
    from engine.run_config import load_run_config

    for preset, message in (
        ("tiny-gpt2", "GPT-2 models are not exported"),
        ("tiny-moe", "no sliding-window attention"),
    ):
        cfg = load_run_config(None, [f"model.preset={preset}"])
        with pytest.raises(G.GGUFExportError, match=message):
            G._check_model_config(cfg.model, preset)
    G._check_model_config(load_run_config(None, ["model.preset=tiny-moe", "model.sliding_window=0"]).model, "ok")


# ------------------------------------------------------------------------------------
# From an engine checkpoint (through `export hf`)
# ------------------------------------------------------------------------------------


def test_from_a_checkpoint_matches_the_engine_model(trained_checkpoint, megatron_single_rank, tmp_path, capsys):
    """A run directory -> GGUF: the llama.cpp-convention forward on the file reproduces the
    megatron-core model's logits; the end-of-turn id comes from the exported generation config."""
    import sentencepiece as spm

    from engine.model_io import load_model

    run = trained_checkpoint("tiny-llama")
    out = tmp_path / "out" / "run.gguf"
    G.export_gguf(run, out, "f32", progress=False)
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", "run.gguf"]  # the HF scratch is gone
    loaded = load_model(run)
    ids = _ids(4)
    with torch.no_grad():
        tokens = torch.tensor(ids)[None]
        engine = loaded.model(tokens, torch.arange(len(ids))[None], None)[0, :, :VOCAB].double().numpy()
    diff = np.abs(gguf_forward(out, ids) - engine).max()
    print(f"max |llama.cpp-convention forward(GGUF f32) - megatron| = {diff:.2e}")
    assert diff < 1e-4
    meta, _ = _read(out)
    sp = spm.SentencePieceProcessor(model_file=str(Path(loaded.cfg.data.tokenizer) / "tokenizer.model"))
    assert meta["tokenizer.ggml.eot_token_id"] == sp.piece_to_id("<|im_end|>")
    assert meta["tokenizer.chat_template"] == get_chat_template(loaded.cfg.data.chat_template).to_jinja()
    assert meta["general.name"] == f"{run.name}-iter_0000003"


def test_tokenization_caveats_only_for_what_llama_cpp_does_differently(post_training_data):
    from engine.data.tokenizer_hf import BPE, _model_proto

    proto = _model_proto((Path(post_training_data["tokenizer"]) / "tokenizer.model").read_bytes())
    assert len(G.sentencepiece_vocab(proto.SerializeToString(), VOCAB, "x").tokenization_caveats) == 2
    proto.trainer_spec.model_type = BPE  # llama.cpp's merge-by-score is SentencePiece's BPE
    proto.normalizer_spec.precompiled_charsmap = b""  # what --normalization identity writes
    assert G.sentencepiece_vocab(proto.SerializeToString(), VOCAB, "x").tokenization_caveats == []


def test_config_without_architectures_is_read_by_model_type(llama_dir):
    _, hf = llama_dir
    config = json.loads((hf / "config.json").read_text())
    config.pop("architectures")
    hp = G.LlamaHParams.from_config(config, "x")
    assert (hp.n_head, hp.n_head_kv, hp.head_dim, hp.n_expert, hp.rope_theta) == (4, 2, 16, 0, 500000.0)
    with pytest.raises(G.GGUFExportError, match="GPT-2"):
        G.LlamaHParams.from_config({**config, "model_type": "gpt2"}, "x")
