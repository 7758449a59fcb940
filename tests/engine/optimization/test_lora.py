"""LoRA through modelopt (engine/optimization/lora.py): adapters, training, checkpoints, merge.

Oracles: the base model's own logits (zero-initialised adapters change nothing), a float64
``W x + scale * B A x`` per adapted linear, the checkpoint's own dist_checkpointing
metadata, and the adapter model's logits for the merged checkpoint."""

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

from engine.config import ConfigError, LoraConfig
from tests.conftest import REPO, losses, post_training_config, run_engine

TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]

# A LoRA SFT run through the public Trainer, with a callback that snapshots every parameter at
# the start and compares at the end, and reports what the optimizer and DDP buffers hold.
SCRIPT = r"""
import json, sys
import torch
from engine import process_guard
from engine.callbacks import Callback
from engine.run_config import load_run_config
from engine.trainer import Trainer

cfg_path, out = sys.argv[1], sys.argv[2]

class Snapshot(Callback):
    def on_train_start(self, trainer):
        self.before = {n: p.detach().clone() for m in trainer.model for n, p in m.module.named_parameters()}

    def on_train_end(self, trainer):
        after = {n: p.detach() for m in trainer.model for n, p in m.module.named_parameters()}
        opt = [p for o in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
               for g in o.optimizer.param_groups for p in g["params"]]
        buffers = sum(b.numel_unpadded for m in trainer.model for b in m.buffers)
        self.report = {
            "changed": sorted(n for n in after if not torch.equal(after[n], self.before[n])),
            "trainable": sorted(n for m in trainer.model for n, p in m.module.named_parameters() if p.requires_grad),
            "all": sorted(after),
            "optimizer_numel": sum(p.numel() for p in opt),
            "trainable_numel": sum(p.numel() for m in trainer.model for p in m.module.parameters() if p.requires_grad),
            "ddp_buffer_numel": buffers,
        }

cb = Snapshot()
with process_guard.in_process_write_results():  # as `python -m engine train` saves
    Trainer(load_run_config(cfg_path), callbacks=[cb]).fit()
open(out, "w").write(json.dumps(cb.report))
"""


def _logits(model, tokens):
    pos = torch.arange(tokens.shape[1]).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids=tokens, position_ids=pos, attention_mask=None).double()


def test_zero_adapters_change_nothing_and_adapters_compute_the_lora_formula(megatron_single_rank):
    from engine.model_io import build_model
    from engine.optimization import lora as lora_lib
    from engine.run_config import load_run_config
    from tests.models.conftest import _perturb

    cfg = load_run_config(None, ["model.preset=tiny-llama", "precision.dtype=fp32"])
    model = build_model(cfg, torch.float32)[0].eval()
    _perturb(model, seed=3)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    before = _logits(model, tokens)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}

    n = lora_lib.add_adapters([model], LoraConfig(rank=4, alpha=8.0, target_modules=TARGETS))
    assert n == len(TARGETS) * cfg.model.num_layers  # every entry enabled: none skipped silently
    assert torch.equal(_logits(model, tokens), before)  # B = 0: bitwise the base model
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(lora_lib.is_adapter_key(name) for name in trainable)
    assert {name for name in base} == {name for name, _ in model.named_parameters()} - trainable

    # Non-zero B: each adapted linear computes W x + (alpha / rank) B A x (float64 oracle).
    gen = torch.Generator().manual_seed(1)
    mods = list(lora_lib.lora_modules(model))
    with torch.no_grad():
        for _, _, ad in mods:
            ad["lora_b"].weight.copy_(0.05 * torch.randn(ad["lora_b"].weight.shape, generator=gen))
    name, module, ad = mods[0]
    x = torch.randn(16, 2, module.input_size, generator=gen)
    with torch.no_grad():
        y = module(x)[0].double()
    xd = x.double()
    want = xd @ module.weight.double().T + 2.0 * (xd @ ad["lora_a"].weight.double().T) @ ad["lora_b"].weight.double().T
    assert torch.allclose(y, want, atol=1e-5), name
    adapted = _logits(model, tokens)
    assert (adapted - before).abs().max() > 1e-3
    with lora_lib.adapters_disabled([model]):  # the frozen base, e.g. DPO's reference
        assert torch.equal(_logits(model, tokens), before)

    # Merged: W += scale B A per weight, adapters bypassed: same logits, base weights changed.
    assert lora_lib.merge_adapters([model]) == n
    assert torch.allclose(_logits(model, tokens), adapted, atol=1e-5, rtol=0)
    assert any(not torch.equal(p, base[name]) for name, p in model.named_parameters() if name in base)


def test_peft_config_enables_every_entry_and_modelopt_missing_is_one_line(monkeypatch):
    from engine.optimization import lora as lora_lib

    pc = lora_lib.peft_config(LoraConfig(rank=8, alpha=4.0, target_modules=["linear_qkv", "linear_fc2"]))
    assert set(pc["adapter_cfg"]) == {"*.linear_qkv", "*.linear_fc2"}
    assert all(e == {"rank": 8, "scale": 0.5, "enable": True} for e in pc["adapter_cfg"].values())
    monkeypatch.setitem(sys.modules, "modelopt.torch.peft", None)  # as if the [opt] extra were absent
    with pytest.raises(
        ConfigError, match=r"^finetune.lora and merge-lora need nvidia-modelopt: pip install -e .\[opt\]$"
    ):
        lora_lib.add_adapters([], LoraConfig())


def test_lora_config_checks():
    from engine.run_config import load_run_config, validate_run

    def check(*overrides):
        validate_run(load_run_config(None, ["model.preset=tiny-llama", "data.mock=true", *overrides]), 1)

    check("finetune.lora.rank=4", "checkpoint.init_from=/base")
    with pytest.raises(ConfigError, match=r"finetune.lora needs the base model: set checkpoint.init_from"):
        check("finetune.lora.rank=4")
    with pytest.raises(ConfigError, match=r"finetune.lora.target_modules\[0\] is 'linear_out'; choose one of"):
        check("finetune.lora.target_modules=[linear_out]", "checkpoint.init_from=/base")
    with pytest.raises(ConfigError, match=r"the DPO reference is the frozen base"):
        check("finetune.lora.rank=4", "checkpoint.init_from=/base", "objective.name=dpo", "objective.dpo.reference=/x")
    with pytest.raises(ConfigError, match=r"'finetune.lora.dropout' must be in \[0, 1\)"):
        check("finetune.lora.dropout=1.0", "checkpoint.init_from=/base")


def _lora_cfg(post_training_data, run_dir: Path, base: Path) -> dict:
    cfg = post_training_config(post_training_data, run_dir, "sft", "sft")
    cfg["training"]["steps"] = 4
    cfg["checkpoint"].update(init_from=str(base), save_interval=2, keep=0)
    cfg["finetune"] = {"lora": {"rank": 4, "alpha": 8.0, "target_modules": TARGETS}}
    return cfg


@pytest.fixture(scope="module")
def lora_run(trained_checkpoint, post_training_data, tmp_path_factory):
    """A 4-step LoRA SFT run (checkpoints at 2 and 4) on the session's tiny-llama base, through
    the Trainer with the snapshot callback; returns (run_dir, base checkpoint, cfg, report)."""
    base = trained_checkpoint("tiny-llama") / "checkpoints" / "iter_0000003"
    root = tmp_path_factory.mktemp("lora")
    cfg = _lora_cfg(post_training_data, root / "run", base)
    (root / "run").mkdir()
    (root / "run" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (root / "script.py").write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(root / "script.py"), str(root / "run" / "config.yaml"), str(root / "report.json")],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "run", base, cfg, json.loads((root / "report.json").read_text())


def test_training_moves_only_adapters_which_alone_are_saved(lora_run):
    from torch.distributed.checkpoint import FileSystemReader

    from engine.optimization.lora import is_adapter_key

    run_dir, base, _, report = lora_run
    adapters = [n for n in report["all"] if is_adapter_key(n)]
    assert len(adapters) == 2 * len(TARGETS) * 4  # A and B on 4 linears of 4 layers
    assert report["trainable"] == sorted(adapters)
    assert report["changed"] and set(report["changed"]) <= set(adapters)  # base bitwise unchanged
    assert any(".lora_b_" in n for n in report["changed"])  # B left zero: the update reached it
    assert report["optimizer_numel"] == report["trainable_numel"] == report["ddp_buffer_numel"]

    ckpt = run_dir / "checkpoints" / "iter_0000004"
    keys = list(FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
    model_keys = [k for k in keys if not k.startswith(("optimizer.", "rng_state"))]
    assert model_keys and all(is_adapter_key(k) for k in model_keys), model_keys[:5]
    assert {k.split(".lora_")[0] for k in model_keys} == {
        f"decoder.layers.{part}.{t}"
        for t, part in (
            ("linear_qkv", "self_attention"),
            ("linear_proj", "self_attention"),
            ("linear_fc1", "mlp"),
            ("linear_fc2", "mlp"),
        )
    }
    opt_keys = [k for k in keys if k.startswith("optimizer.state.")]
    assert opt_keys and all(is_adapter_key(k) for k in opt_keys)
    meta = json.loads((ckpt / "engine_meta.json").read_text())
    assert meta["lora_base"]["path"] == str(base.resolve())


def test_merged_checkpoint_equals_adapter_model(lora_run, tmp_path, capsys):
    from engine import checkpoint as ckpt_lib
    from engine.cli import main
    from engine.model_io import load_model
    from engine.optimization import lora as lora_lib

    run_dir, base, _, _ = lora_run
    ckpt = run_dir / "checkpoints" / "iter_0000004"
    tokens = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    _, chunks = lora_lib.load_adapter_model(ckpt)
    adapted = _logits(chunks[0], tokens)
    assert main(["merge-lora", str(run_dir), str(tmp_path / "merged")]) == 0  # the command, in process
    merged_ckpt = tmp_path / "merged" / "checkpoints" / "iter_0000004"
    assert f"into {merged_ckpt}" in capsys.readouterr().out
    merged = load_model(merged_ckpt)  # a normal checkpoint: the plain loader takes it
    assert merged.cfg.finetune.lora is None
    assert torch.allclose(_logits(merged.model, tokens), adapted, atol=1e-5, rtol=0)
    plain = _logits(load_model(base).model, tokens)
    assert (plain - adapted).abs().max() > 1e-4  # the adapters trained: the check can fail
    lineage = ckpt_lib.read_meta(merged_ckpt)["lineage"]
    assert [e["init_from"] for e in lineage] == [
        *[e["init_from"] for e in ckpt_lib.read_meta(ckpt)["lineage"]],
        str(ckpt),
    ]

    # An adapter checkpoint read as a normal one: one line saying to merge it.
    with pytest.raises(ConfigError, match=r"holds only LoRA adapters .* python -m engine merge-lora"):
        load_model(ckpt)


def test_missing_or_other_base_is_refused_in_one_line(lora_run, tmp_path, capsys):
    from engine.cli import main
    from engine.optimization import lora as lora_lib

    run_dir, base, _, _ = lora_run
    ckpt = run_dir / "checkpoints" / "iter_0000004"
    assert lora_lib.check_base(ckpt) == base.resolve()
    other = tmp_path / "other"  # the same architecture, other weights (as its manifest says)
    shutil.copytree(base, other)
    manifest = json.loads((other / "manifest.json").read_text())
    name = next(iter(manifest["files"]))
    manifest["files"][name]["crc32"] ^= 1
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        lora_lib.LoraBaseError, match=r"is not the base the adapters in .* were trained on: its weights differ"
    ):
        lora_lib.check_base(ckpt, other)
    with pytest.raises(lora_lib.LoraBaseError, match=r"^the LoRA base checkpoint .*/gone of .* is missing$"):
        lora_lib.check_base(ckpt, tmp_path / "gone")
    with pytest.raises(ConfigError, match=r"is not a LoRA adapter checkpoint"):
        lora_lib.check_base(base)
    assert main(["merge-lora", str(ckpt), str(tmp_path / "out"), "--base", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error: ") and "its weights differ" in err and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.slow
def test_resume_is_exact_and_tensor_parallel_equals_single_rank(lora_run, tmp_path):
    run_dir, base, cfg, _ = lora_run
    ref = losses(run_dir)
    # Resume from iteration 2: steps 3 and 4 bitwise as in the uninterrupted run.
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir / "checkpoints" / "iter_0000002", resumed / "checkpoints" / "iter_0000002")
    run_engine(dict(cfg, checkpoint=dict(cfg["checkpoint"], dir=str(resumed), resume=True)))
    assert losses(resumed) == ref[2:]
    # TP=2 from the same base: the same losses within the engine's layout tolerance.
    tp2 = tmp_path / "tp2"
    run_engine(dict(cfg, checkpoint=dict(cfg["checkpoint"], dir=str(tp2))), nproc=2, overrides=["parallel.tensor=2"])
    got = losses(tp2)
    assert len(got) == len(ref) == 4
    for a, b in zip(ref, got):
        assert abs(a - b) <= 1e-5 * a
