"""`export hf` on real checkpoints: parity at the training layouts, transformers 4.57 and 5.x
reading the result, the chat template as Jinja, and every bad input as one line with
nothing left at OUT_DIR.

Oracles: transformers' own model classes (the parity figure loads the written directory
back with ``from_pretrained``), a separate transformers 4.57 install in a subprocess, and
transformers' ``apply_chat_template`` against the engine's template objects.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO

TOL = 1e-4
TF4_DIR = REPO / ".venv" / "tf4"
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Sum", "input": "2, 2"},
    {"role": "assistant", "content": "4"},
]

LAYOUTS = {
    "llama-tp2pp2": ("tiny-llama", 4, dict(tensor=2, pipeline=2)),
    "gpt2-tp2pp2": ("tiny-gpt2", 4, dict(tensor=2, pipeline=2)),
    "moe-ep2pp2": ("tiny-moe", 4, dict(expert=2, pipeline=2)),
}


@pytest.fixture(scope="module")
def exported(trained_checkpoint, megatron_single_rank, tmp_path_factory):
    """``get(name) -> (run_dir, out_dir)``: the run of LAYOUTS[name] exported in bf16 (the
    MoE preset's even-layer window with --allow-sliding-window-mismatch), once per module."""
    from engine.export.hf import export_hf

    cache = {}

    def get(name: str):
        if name not in cache:
            preset, nproc, layout = LAYOUTS[name]
            run = trained_checkpoint(preset, nproc, **layout)
            out = tmp_path_factory.mktemp("export") / name
            export_hf(run, out, dtype="bf16", allow_sliding_window_mismatch=preset == "tiny-moe")
            cache[name] = (run, out)
        return cache[name]

    return get


def _engine_logits(run: Path, ids):
    from engine import model_io
    from engine.export.hf import _engine_logits, _round_to

    loaded = model_io.load_model(run, torch.float32)
    _round_to(loaded.model, torch.bfloat16)  # the export's weights
    return _engine_logits(loaded.model, ids, loaded.cfg.model.vocab_size)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_export_at_training_layout_has_parity(exported, name):
    run, out = exported(name)
    info = json.loads((out / "engine_export.json").read_text())
    diff = info["parity"]["max_abs_logit_diff"]
    print(f"{name}: parity {diff:.3e} over {info['parity']['prompt_tokens']} tokens")
    assert 0 <= diff <= TOL
    preset, _, layout = LAYOUTS[name]
    assert info["source"]["layout"]["tensor"] == layout.get("tensor", 1)
    assert info["source"]["layout"]["expert"] == layout.get("expert", 1)
    assert info["source"]["iteration"] == 3 and info["lineage"][-1]["iteration"] == 3
    assert info["dtype"] == "bf16" and len(info["config_hash"]) == 16
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        assert (out / f).is_file(), f
    assert list(out.glob("*.safetensors"))
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 5]  # </s> and ChatML's <|im_end|>
    assert (gen["temperature"], gen["top_p"], gen["top_k"], gen["repetition_penalty"]) == (0.7, 0.9, 50, 1.2)
    # The parameter count is transformers' own count of the loaded directory.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    if preset == "tiny-moe":
        assert "full causal attention" in info["approximation"]
        assert info["parity"]["prompt_tokens"] == 16  # the window: exact up to there


def test_moe_window_on_all_layers_is_exact(megatron_single_rank, tmp_path):
    """A window on every layer is what Mixtral's ``sliding_window`` expresses: exported exactly
    and checked on a prompt twice the window (where windowed and full attention differ);
    fp32, in shards of at most --max-shard-size."""
    from engine import model_io
    from engine.export.hf import PARITY_TOKENS, export_hf
    from engine.run_config import load_run_config
    from tests.models.conftest import _perturb

    cfg = load_run_config(None, ["model.preset=tiny-moe", "model.sliding_window_layers=all"])
    assert PARITY_TOKENS >= 2 * cfg.model.sliding_window
    chunks = model_io.build_model(cfg, torch.float32)
    _perturb(chunks[0], seed=1)
    model_io.save_model_checkpoint(tmp_path / "run", cfg, chunks, iteration=7)
    info = export_hf(tmp_path / "run", tmp_path / "hf", dtype="fp32", max_shard_size="1MB")
    # ~3.6 MB of fp32 weights in 1 MB shards: an index and several files, read back for parity.
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["sliding_window"] == cfg.model.sliding_window and info["approximation"] is None
    assert info["parity"]["prompt_tokens"] == PARITY_TOKENS
    assert info["parity"]["max_abs_logit_diff"] <= TOL


_TF4_SCRIPT = r"""
import json, sys, torch, transformers
args = json.loads(sys.argv[1])
out = {"version": transformers.__version__}
for name, d in args["dirs"].items():
    m = transformers.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        logits = m(input_ids=torch.tensor([args["ids"]])).logits[0, :, : args["vocab"]]
    out[name] = logits.tolist()
tok = transformers.AutoTokenizer.from_pretrained(args["dirs"]["exported"])
out["chat"] = tok.apply_chat_template(args["messages"], tokenize=False)
out["chat_ids"] = tok(out["chat"], add_special_tokens=False)["input_ids"]
out["eos"] = transformers.GenerationConfig.from_pretrained(args["dirs"]["exported"]).eos_token_id
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="session")
def tf4_path():
    """transformers 4.57 installed beside the venv (``pip --target``), reused when present."""
    if not (TF4_DIR / "transformers").is_dir():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(TF4_DIR),
             "transformers==4.57.*", "huggingface-hub==0.36.*", "tokenizers==0.22.*"],
            check=True, timeout=600,
        )  # fmt: skip
    return TF4_DIR


def test_transformers_4_reads_the_export_and_needs_rope_theta(exported, tf4_path, tmp_path):
    """transformers 4.57 loads the exported LLaMA with the engine's logits; with only
    transformers 5's ``rope_parameters`` in config.json (the seed bug) it silently uses
    theta 10000 and the logits move by far more than the bound."""
    from engine.data.chat_template import ChatMLTemplate
    from engine.data.tokenizer import load_tokenizer
    from engine.export.hf import parity_prompt
    from engine.model_io import checkpoint_config, resolve_checkpoint

    run, out = exported("llama-tp2pp2")
    cfg = checkpoint_config(resolve_checkpoint(run))
    tok = load_tokenizer(cfg.data.tokenizer)
    ids = parity_prompt(cfg, tok, 64)
    seed_bug = tmp_path / "rope_parameters_only"
    shutil.copytree(out, seed_bug)
    config = json.loads((seed_bug / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 500000.0
    del config["rope_theta"]
    (seed_bug / "config.json").write_text(json.dumps(config))

    args = {"dirs": {"exported": str(out), "seed_bug": str(seed_bug)}, "ids": ids,
            "vocab": cfg.model.vocab_size, "messages": MESSAGES[:3]}  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(tf4_path), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _TF4_SCRIPT, json.dumps(args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert res["version"].startswith("4.57")
    engine = _engine_logits(run, ids)
    good = (torch.tensor(res["exported"]) - engine).abs().max().item()
    bad = (torch.tensor(res["seed_bug"]) - engine).abs().max().item()
    print(f"transformers 4.57: max |diff| {good:.3e}; with rope_parameters only: {bad:.3e}")
    assert good <= TOL
    assert bad > 10 * TOL
    # The tokenizer and chat template read by 4.x: the engine's rendering and token ids.
    template = ChatMLTemplate()
    assert res["chat"] == template.render(MESSAGES[:3], eos_text="</s>")
    assert res["chat_ids"] == [i for p, _, _ in template.encode(tok, MESSAGES[:3]) for i in p]
    assert res["eos"] == [2, 5]


@pytest.mark.parametrize("template_name", ["chatml", "alpaca"])
def test_hf_chat_template_renders_like_the_engine(exported, tmp_path, template_name):
    """apply_chat_template of the written tokenizer == the engine's template (text and ids),
    multi-turn, with a system message, an ``input`` and with/without generation prompt."""
    from transformers import AutoTokenizer

    from engine.data.chat_template import get_chat_template
    from engine.data.tokenizer import load_tokenizer
    from engine.data.tokenizer_hf import write_tokenizer
    from engine.model_io import checkpoint_config, resolve_checkpoint

    run, _ = exported("llama-tp2pp2")
    tok = load_tokenizer(checkpoint_config(resolve_checkpoint(run)).data.tokenizer)
    template = get_chat_template(template_name)
    write_tokenizer(tok, template.to_jinja(), tmp_path, 256)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    cases = [(MESSAGES, False), (MESSAGES[:4], True), (MESSAGES[1:3], False), (MESSAGES[1:2], True)]
    for messages, gen in cases:
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert text == template.render(messages, gen, eos_text="</s>"), (messages, gen)
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ids == [i for p, _, _ in template.encode(tok, messages, gen) for i in p], (messages, gen)


# --------------------------------------------------------------------------------------
# Bad input: one line, exit 2 from the CLI, nothing at OUT_DIR
# --------------------------------------------------------------------------------------


def _copy_checkpoint(run: Path, dst: Path) -> Path:
    from engine.model_io import resolve_checkpoint

    shutil.copytree(resolve_checkpoint(run), dst)
    return dst


def _assert_refused(ckpt, out: Path, match: str, error=None, **kwargs):
    from engine.config import ConfigError
    from engine.export.hf import export_hf

    with pytest.raises(error or ConfigError, match=match) as err:
        export_hf(ckpt, out, **kwargs)
    assert "\n" not in str(err.value)
    assert not out.exists()
    assert not list(out.parent.glob(out.name + ".tmp-*"))
    return str(err.value)


def test_bad_checkpoints_are_one_line_errors(trained_checkpoint, megatron_single_rank, tmp_path):
    from engine.ckpt_manifest import write_manifest

    llama = trained_checkpoint("tiny-llama", 4, tensor=2, pipeline=2)
    gpt2 = trained_checkpoint("tiny-gpt2", 4, tensor=2, pipeline=2)
    out = tmp_path / "out"
    # Weights of another architecture than the config.yaml describes.
    other = _copy_checkpoint(gpt2, tmp_path / "other_arch")
    shutil.copyfile(_copy_checkpoint(llama, tmp_path / "llama") / "config.yaml", other / "config.yaml")
    write_manifest(other)
    _assert_refused(other, out, "do not fit the model its config.yaml describes")
    # No config.yaml.
    no_cfg = _copy_checkpoint(llama, tmp_path / "no_cfg")
    (no_cfg / "config.yaml").unlink()
    _assert_refused(no_cfg, out, "no config.yaml")
    # A truncated shard.
    trunc = _copy_checkpoint(llama, tmp_path / "trunc")
    shard = sorted(trunc.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _assert_refused(trunc, out, "corrupt.*truncated")
    # A tokenizer of another size than the model's vocabulary.
    wrong_tok = _copy_checkpoint(llama, tmp_path / "wrong_tok")
    cfg = yaml.safe_load((wrong_tok / "config.yaml").read_text())
    shutil.copytree(cfg["data"]["tokenizer"], tmp_path / "tok512")
    meta = json.loads((tmp_path / "tok512" / "tokenizer_meta.json").read_text())
    (tmp_path / "tok512" / "tokenizer_meta.json").write_text(json.dumps(dict(meta, vocab_size=2048)))
    cfg["data"]["tokenizer"] = str(tmp_path / "tok512")
    (wrong_tok / "config.yaml").write_text(yaml.safe_dump(cfg))
    write_manifest(wrong_tok)
    _assert_refused(wrong_tok, out, "1000 pieces \\(padded 2048\\) but model.vocab_size is 1024")
    # An architecture no transformers family expresses (RMSNorm + rope + gelu).
    from engine import model_io
    from engine.run_config import load_run_config

    odd = load_run_config(None, ["model.preset=tiny-llama", "model.activation=gelu"])
    model_io.save_model_checkpoint(tmp_path / "odd", odd, model_io.build_model(odd, torch.float32))
    _assert_refused(tmp_path / "odd", out, "no Hugging Face family matches")
    # The MoE preset's even-layer window, without the option that accepts the approximation.
    moe = trained_checkpoint("tiny-moe", 4, expert=2, pipeline=2)
    msg = _assert_refused(moe, out, "--allow-sliding-window-mismatch")
    assert "even layers" in msg and "different beyond" in msg


def test_parity_failure_leaves_nothing(trained_checkpoint, megatron_single_rank, monkeypatch, tmp_path, capsys):
    """A wrong mapping (key and value heads swapped, the seed's kind of bug) is caught by the
    parity check: ParityError naming the figure, the figure printed, no OUT_DIR."""
    from engine.export.hf import ParityError
    from models import hf_convert

    real = hf_convert.megatron_to_hf

    def swapped(*args, **kwargs):
        sd = real(*args, **kwargs)
        sd["model.layers.1.self_attn.k_proj.weight"], sd["model.layers.1.self_attn.v_proj.weight"] = (
            sd["model.layers.1.self_attn.v_proj.weight"],
            sd["model.layers.1.self_attn.k_proj.weight"],
        )
        return sd

    monkeypatch.setattr(hf_convert, "megatron_to_hf", swapped)
    run = trained_checkpoint("tiny-llama", 4, tensor=2, pipeline=2)
    _assert_refused(run, tmp_path / "out", r"parity failed: .* by \d\.\d+e[+-]\d+ > 1e-04", error=ParityError)
    assert "parity: max |engine - exported| logit difference" in capsys.readouterr().err


def test_cli_bad_input_exit_2_one_line(tmp_path):
    """The command prints one ``config error:`` line and exits 2 (here: not a checkpoint)."""
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "export", "hf", str(tmp_path / "empty"), str(tmp_path / "out")],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("config error:")]
    assert len(errors) == 1 and "not a complete engine checkpoint" in errors[0]
    assert not (tmp_path / "out").exists()
