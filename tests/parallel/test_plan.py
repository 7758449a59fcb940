"""Layout planner: parameter counts against the built model, memory against a measured CPU run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engine.run_config import load_run_config
from parallel.plan import GIB, gpu_memory, make_plan, parameter_counts
from tests.conftest import REPO

# Runs in a fresh process: imports everything first, then takes the RSS baseline, trains,
# and reports the baseline and the process's peak RSS.
_PROBE = r"""
import json, resource, sys
import psutil
import engine.trainer
from engine.config import from_dict
from models.presets import get_preset
from megatron.core.optimizer import get_megatron_optimizer  # noqa: F401 (imported before the baseline)
from parallel.setup import init_distributed
cfg = from_dict(json.loads(sys.argv[1]), presets=get_preset)
init_distributed(cfg.parallel)
base = psutil.Process().memory_info().rss
engine.trainer.Trainer(cfg).fit()
print("RSS", json.dumps({"base": base, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


@pytest.mark.parametrize("preset", ["frankenstallm-3b", "ff-2b", "keural-moe-15b", "tiny-llama", "tiny-moe"])
def test_parameter_counts_equal_the_built_model(preset, megatron_single_rank):
    from engine.commands.info import model_info

    cfg = load_run_config(None, [f"model.preset={preset}"])
    built = model_info(cfg)
    counts = parameter_counts(cfg.model)
    assert (counts.total, counts.active, counts.embedding) == (built["total"], built["active"], built["embedding"])


def test_plan_cli_layout_errors_and_suggestion(capsys):
    # The CLI's own entry point, in-process (a subprocess per call would only add start-up time).
    from types import SimpleNamespace

    from engine.cli import main

    def plan(*args):
        code = main(["plan", *args])
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    bad = plan("frankenstallm-3b", "parallel.tensor=16", "--gpus-per-node", "16")
    assert bad.returncode == 2 and "num_attention_heads (24) is not divisible by parallel.tensor (16)" in bad.stderr
    big = plan("frankenstallm-3b", "training.global_batch_size=256", "training.micro_batch_size=32", "--gpu", "h100")
    assert big.returncode == 0, big.stderr
    assert "DOES NOT FIT" in big.stdout and "suggestion: training.micro_batch_size=" in big.stdout
    ok = plan(
        "frankenstallm-3b",
        "training.global_batch_size=256",
        "training.micro_batch_size=2",
        "precision.dtype=fp8",
        "--gpu",
        "b200",
        "--json",
    )
    p = json.loads(ok.stdout)
    assert p["fits"] and p["precision"] == "mxfp8" and p["data"] == 8 and p["micro_batches"] == 16
    # Step time = FLOPs / (GPUs x peak x MFU).
    assert p["step_time_s"] == pytest.approx(p["flops_per_step"] / (8 * 4500e12 * 0.4))


def test_distributed_optimizer_and_parallel_sizes_shrink_per_gpu_state():
    cfg = load_run_config(
        None,
        [
            "model.preset=frankenstallm-3b",
            "data.mock=true",
            "data.seq_length=4096",
            "training.global_batch_size=64",
            "precision.dtype=bf16",
        ],
    )
    counts = parameter_counts(cfg.model)
    one = gpu_memory(cfg, counts, 8)
    assert one.optimizer_no_do == counts.total * 12 and one.optimizer_do == pytest.approx(counts.total * 12 / 8)
    cfg.parallel.tensor, cfg.parallel.pipeline = 2, 2
    split = gpu_memory(cfg, counts, 8)
    assert split.params < counts.total / 3  # a quarter of the layers' weights plus one vocab shard


def test_plan_memory_matches_a_measured_cpu_run(tmp_path, synthetic_data):
    """Plan total vs measured peak RSS increase of a real single-process fp32 training run.

    Measured: ``ru_maxrss`` at the end of ``Trainer(cfg).fit()`` minus the process RSS just
    before ``Trainer`` is constructed (after every import and the process-group set-up, so
    library code is not counted). Planned: weights + gradients + optimizer state +
    activations of ``make_plan`` for the same config on one "GPU". The model is tiny-llama's
    architecture widened to hidden 1024 (45M parameters, 0.7 GB of fp32 model state) so
    that model state, which the plan predicts, dominates the few tens of MB a process
    allocates for data indices and Python objects. ``MALLOC_MMAP_THRESHOLD_`` makes glibc
    return every freed tensor to the OS; otherwise RSS would keep the initialisation's
    freed temporaries and measure allocator history rather than live tensors. The
    distributed optimizer is off: with one rank it shards nothing, and gloo's parameter
    all-gather stages a copy of the buffer that NCCL does not (a CPU-only transient).
    Checkpoints are off: saving is not part of the training-step peak the plan describes.
    """
    cfg = {
        "model": {
            "preset": "tiny-llama",
            "hidden_size": 1024,
            "ffn_hidden_size": 2816,
            "num_attention_heads": 16,
            "num_query_groups": 4,
        },
        "data": {"paths": [synthetic_data], "seq_length": 64, "split": "90,5,5", "cache_dir": str(tmp_path / "cache")},
        "training": {"steps": 2, "global_batch_size": 2, "micro_batch_size": 1},
        "parallel": {"distributed_optimizer": False},
        "precision": {"dtype": "fp32"},
        "logging": {"interval": 1, "tensorboard": False},
        "checkpoint": {"dir": str(tmp_path / "run"), "enabled": False, "lock": False},
    }
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(cfg)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rss = json.loads(proc.stdout.split("RSS ", 1)[1].splitlines()[0])
    measured = rss["peak"] - rss["base"]
    from engine.config import from_dict
    from models.presets import get_preset

    planned = make_plan(from_dict(cfg, presets=get_preset), 1, 1, "cpu", on_cpu=True).gpu.total
    assert planned > 0.6 * GIB
    assert abs(measured - planned) / measured < 0.15, (measured / 2**20, planned / 2**20)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpus-per-node", "0"], "argument --gpus-per-node: must be >= 1, got 0"),
        (["--nodes", "0"], "argument --nodes: must be >= 1, got 0"),
        (["--nodes", "-2"], "argument --nodes: must be >= 1, got -2"),
        (["--mfu", "0"], "argument --mfu: must be in (0, 1], got 0"),
        (["--mfu", "-0.4"], "argument --mfu: must be in (0, 1], got -0.4"),
        (["--mfu", "1.5"], "argument --mfu: must be in (0, 1], got 1.5"),
        (["--reserve", "1"], "argument --reserve: must be in [0, 1), got 1"),
        (["--reserve", "-0.1"], "argument --reserve: must be in [0, 1), got -0.1"),
    ],
)
def test_plan_cli_rejects_out_of_range_numbers_in_one_line(args, message, capsys):
    from engine.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["plan", "tiny-llama", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_make_plan_checks_its_numbers_too():
    from engine.config import ConfigError

    cfg = load_run_config(None, ["model.preset=tiny-llama", "data.mock=true"])
    with pytest.raises(ConfigError, match=r"plan: gpus_per_node must be >= 1, got 0"):
        make_plan(cfg, 1, 0, "b200")
    with pytest.raises(ConfigError, match=r"plan: mfu must be in \(0, 1\], got 0"):
        make_plan(cfg, 1, 1, "b200", mfu=0)
