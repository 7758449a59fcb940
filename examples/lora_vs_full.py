"""Memory and step time of LoRA against full fine-tuning, same model, data and steps.

    python examples/lora_vs_full.py OUT_DIR [--steps 8] [--hidden 512] [--layers 8] [--rank 16]

Trains a base checkpoint for one step (tiny-llama's architecture widened to ``--hidden`` and
``--layers``, mock data, fp32), then fine-tunes it twice from that checkpoint with the same
objective, data and batch: all weights, and LoRA adapters (``finetune.lora``) on
linear_qkv/proj/fc1/fc2. Prints the trainable parameters (read from the engine's log), the
median step time (first step left out; wall clock, so it moves with the machine's load), the CPU
time of the whole process (start-up included, the same for both) and the peak memory of each
run (on CPU: the resident-set high-water mark, including ~0.5 GiB of Python/torch runtime).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def train(run_dir: Path, overrides: list) -> tuple:
    """``python -m engine train`` with ``overrides``; returns (stdout, CPU seconds it used)."""
    cpu = _children_cpu()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.yaml").write_text("{}\n")  # everything is in the overrides
    cmd = [sys.executable, "-m", "engine", "train", str(run_dir / "run.yaml"), *overrides, f"checkpoint.dir={run_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout, _children_cpu() - cpu


def summary(run_dir: Path, log: str, cpu: float) -> dict:
    """Median step time (step 1 left out), peak memory and trainable parameters of a run."""
    rows = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"][1:]
    found = re.search(r"; (\d+) trainable parameters", log)
    total = re.search(r"of (\d+)\); base", log)
    return {
        "step_s": statistics.median(r["step_time"] for r in rows),
        "peak_gib": max(r["peak_mem_gib"] for r in rows),
        "trainable": int(found.group(1)) if found else None,
        "total": int(total.group(1)) if total else None,
        "cpu_s": cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    h = args.hidden
    common = [
        "model.preset=tiny-llama",
        f"model.hidden_size={h}",
        f"model.num_layers={args.layers}",
        f"model.num_attention_heads={h // 64}",
        f"model.num_query_groups={h // 128}",
        f"model.ffn_hidden_size={h * 11 // 4}",
        "model.vocab_size=4096",
        "data.mock=true",
        "data.seq_length=128",
        "training.global_batch_size=8",
        "training.micro_batch_size=2",
        "precision.dtype=fp32",
        "logging.interval=1",
        "logging.tensorboard=false",
    ]
    base_dir = args.out / "base"
    train(base_dir, [*common, "training.steps=1"])
    base = base_dir / "checkpoints" / "iter_0000001"
    tune = [*common, f"training.steps={args.steps}", f"checkpoint.init_from={base}", "checkpoint.enabled=false"]
    full = summary(args.out / "full", *train(args.out / "full", tune))
    lora_args = [f"finetune.lora.rank={args.rank}", f"finetune.lora.alpha={2 * args.rank}"]
    lora = summary(args.out / "lora", *train(args.out / "lora", [*tune, *lora_args]))
    full["trainable"] = lora["total"] - (lora["trainable"] or 0) if lora["total"] else None
    print(f"model: hidden {h}, {args.layers} layers; {args.steps} steps of 8 x 128 tokens, fp32, CPU")
    print("| run | trainable parameters | median step (s, wall) | CPU time of the run (s) | peak RSS (GiB) |")
    print("|---|---|---|---|---|")
    for name, r in (("full fine-tuning", full), (f"LoRA rank {args.rank}", lora)):
        print(f"| {name} | {r['trainable']:,} | {r['step_s']:.3f} | {r['cpu_s']:.1f} | {r['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()
