"""Shared test fixtures: a synthetic indexed dataset and a launcher for real engine runs.

Multi-rank tests start the real CLI under ``torch.distributed.run`` (several CPU processes
over gloo on a free port) and read the per-step metrics the engine wrote; tests of rank logic
that need no CLI run functions on spawned gloo ranks instead (``run_distributed``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")


def write_synthetic_dataset(prefix: Path, num_docs: int = 400, seed: int = 0, vocab: int = 250) -> Path:
    """Documents of arithmetic token sequences (learnable) + EOS 0, via megatron-core's builder."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for _ in range(num_docs):
        length = int(rng.integers(20, 200))
        start, step = rng.integers(1, vocab), rng.integers(1, 5)
        tokens = (start + step * np.arange(length)) % vocab + 1
        builder.add_item(torch.tensor(np.append(tokens, 0).astype(np.int64)))
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")
    return prefix


@pytest.fixture(scope="session")
def megatron_single_rank():
    """Initialise torch.distributed (gloo, world size 1) and megatron's groups at TP=PP=1."""
    from engine.run_config import load_run_config
    from parallel.setup import init_distributed, init_model_parallel, shutdown

    cfg = load_run_config(None, ["model.preset=tiny-llama"])
    init_distributed(cfg.parallel)
    init_model_parallel(cfg.parallel, seed=1234)
    yield
    shutdown()


@pytest.fixture(scope="session")
def run_distributed():
    """``run_distributed(fn, world_size, *args, tensor=1, pipeline=1, virtual_pipeline=None,
    expert=1)``: ``fn(rank, *args)`` on that many spawned gloo ranks at that megatron-core layout,
    results in rank order (tests/distributed.py). The ranks are kept for the session."""
    from tests.distributed import RankPools

    pools = RankPools()
    yield pools
    pools.close()


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> str:
    """Prefix of a 400-document synthetic dataset shared by the session."""
    d = tmp_path_factory.mktemp("data")
    return str(write_synthetic_dataset(d / "synthetic"))


def base_config(data_prefix: str, run_dir: Path, preset: str = "tiny-llama") -> Dict:
    """A small, fast config all engine-run tests start from."""
    return {
        "model": {"preset": preset},
        "data": {
            "paths": [data_prefix],
            "seq_length": 64,
            "split": "90,5,5",
            "cache_dir": str(run_dir.parent / "data_cache"),
        },
        "training": {"steps": 5, "global_batch_size": 8, "micro_batch_size": 1},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4},
        "schedule": {"warmup_steps": 1},
        "precision": {"dtype": "fp32"},
        "logging": {"interval": 1, "tensorboard": False},
        "checkpoint": {"dir": str(run_dir)},
    }


def torchrun_train_cmd(cfg_path: Path, nproc: int = 2, *args: str) -> List[str]:
    """``python -m engine train CFG ARGS`` under torchrun on ``nproc`` CPU processes
    (``--standalone``: torchrun picks a free rendezvous port itself, no race with other runs)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, "-m", "engine", "train", str(cfg_path), *args]


def run_engine(
    config: Dict, nproc: int = 1, overrides: Sequence[str] = (), timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``python -m engine train`` on ``nproc`` CPU processes; returns the finished process."""
    run_dir = Path(config["checkpoint"]["dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    if nproc == 1:
        cmd = [sys.executable, "-m", "engine", "train", str(cfg_path), *overrides]
    else:
        cmd = torchrun_train_cmd(cfg_path, nproc, *overrides)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"engine run failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def step_metrics(run_dir: Path, split: str = "train") -> List[Dict]:
    """Per-step metric records the engine wrote to ``<run_dir>/logs/metrics.jsonl``."""
    path = Path(run_dir) / "logs" / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == split]


def losses(run_dir: Path) -> List[float]:
    """Per-step training losses of a run."""
    return [r["loss"] for r in step_metrics(run_dir)]


def build_post_training_data(out: Path, seq_length: int = 128, max_chars: int = 48) -> Dict[str, str]:
    """Tokenizer, pretraining data and SFT/preference data from the constitution articles of the
    bundled sample (examples/make_post_training_data.py); returns their paths."""
    from engine.data.preprocess import preprocess
    from engine.data.tokenizer_train import train_tokenizer

    sys.path.insert(0, str(REPO / "examples"))
    import make_post_training_data as mk

    out.mkdir(parents=True, exist_ok=True)
    sample = REPO / "examples" / "data" / "sample.jsonl"
    train_tokenizer([str(sample)], str(out / "tok"), vocab_size=1000)
    mk.main(["--out-dir", str(out / "raw"), "--max-chars", str(max_chars)])
    paths = {"tokenizer": str(out / "tok")}
    for kind, src, name in (
        ("pretrain", sample, "pretrain"),
        ("sft", out / "raw" / "sft.jsonl", "sft"),
        ("preference", out / "raw" / "preference.jsonl", "pref"),
    ):
        preprocess(
            [str(src)], str(out / "tok"), str(out / "data" / name), kind=kind, seq_length=seq_length, progress=False
        )
        paths[name] = str(out / "data" / name)
    return paths


@pytest.fixture(scope="session")
def post_training_data(tmp_path_factory) -> Dict[str, str]:
    """Session-wide tokenizer (1000 pieces, vocab 1024) and pretrain/sft/preference datasets."""
    return build_post_training_data(tmp_path_factory.mktemp("post_training"))


def post_training_config(paths: Dict[str, str], run_dir: Path, objective: str, data_key: str) -> Dict:
    """base_config for tiny-llama on the post-training data with ``objective``."""
    cfg = base_config(paths[data_key], run_dir)
    cfg["model"]["vocab_size"] = 1024
    cfg["data"].update(tokenizer=paths["tokenizer"], seq_length=128, split="80,20,0")
    cfg["objective"] = {"name": objective}
    return cfg


@pytest.fixture(scope="session")
def trained_checkpoint(post_training_data, tmp_path_factory):
    """``get(preset, nproc=1, **parallel) -> run_dir``: a run of ``preset`` trained 3 steps on the
    session's tokenized sample (tokenizer attached, vocab 1024) at that layout, e.g.
    ``get("tiny-llama", 4, tensor=2, pipeline=2)``. Cached per (preset, nproc, layout) for the
    session, so export, generation and evaluation tests share the few runs they need."""
    cache: Dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("trained")

    def get(preset: str, nproc: int = 1, **parallel) -> Path:
        key = (preset, nproc, tuple(sorted(parallel.items())))
        if key not in cache:
            name = preset + "".join(f"_{k}{v}" for k, v in key[2]) + f"_n{nproc}"
            cfg = post_training_config(post_training_data, root / name, "pretrain", "pretrain")
            cfg["model"]["preset"] = preset
            cfg["training"]["steps"] = 3
            cfg["parallel"] = dict(parallel)
            run_engine(cfg, nproc=nproc)
            cache[key] = root / name
        return cache[key]

    return get
