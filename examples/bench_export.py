"""Time `python -m engine export hf` and measure its peak memory on a randomly initialised preset.

    python examples/bench_export.py                          # frankenstallm-3b, bf16 (~6 GiB of files)
    python examples/bench_export.py --preset tiny-llama      # seconds, to try the script

Step 1 (its own process, not measured): build the preset with random weights in bf16 and
save it as an engine checkpoint (``model_io.save_model_checkpoint``). Step 2 (measured): the
export command in a fresh process, its wall time and its peak resident memory (the
process's own ``ru_maxrss``, read when it ends). Prints one JSON line with the figures.
The random weights have no tokenizer, so the parity prompt is token ids 0..31.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_checkpoint(preset: str, run_dir: str) -> None:
    """Child 1: a random ``preset`` model saved as ``run_dir/checkpoints/iter_0000000``."""
    import torch

    from engine import model_io
    from engine.run_config import load_run_config

    cfg = load_run_config(None, [f"model.preset={preset}", "precision.dtype=bf16", f"checkpoint.dir={run_dir}"])
    cfg = model_io.single_process_layout(cfg)
    chunks = model_io.build_model(cfg, torch.bfloat16)
    model_io.save_model_checkpoint(run_dir, cfg, chunks)


def export_and_report(run_dir: str, out_dir: str, dtype: str) -> None:
    """Child 2: the export command in this process; then its peak RSS on stdout."""
    from engine.cli import main

    rc = main(["export", "hf", run_dir, out_dir, "--dtype", dtype])
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print("PEAK_RSS_KIB", peak_kib, flush=True)
    sys.exit(rc)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="frankenstallm-3b")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--work", help="directory for the checkpoint and the export (default: a temporary one, removed)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if args.child[0] == "build":
            build_checkpoint(args.child[1], args.child[2])
        else:
            export_and_report(args.child[1], args.child[2], args.child[3])
        return 0

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_export_"))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    me = [sys.executable, str(Path(__file__).resolve()), "--child"]
    try:
        run_dir, out_dir = work / "run", work / "hf"
        t0 = time.perf_counter()
        subprocess.run([*me, "build", args.preset, str(run_dir)], env=env, cwd=REPO, check=True)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        proc = subprocess.run(
            [*me, "export", str(run_dir), str(out_dir), args.dtype],
            env=env, cwd=REPO, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        export_s = time.perf_counter() - t0
        print(proc.stdout, end="")
        if proc.returncode != 0:
            return proc.returncode
        peak_kib = int(proc.stdout.split("PEAK_RSS_KIB", 1)[1].split()[0])
        info = json.loads((out_dir / "engine_export.json").read_text())
        files = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
        result = {
            "preset": args.preset,
            "dtype": args.dtype,
            "parameters": info["parameters"],
            "export_s": round(export_s, 1),
            "peak_rss_gib": round(peak_kib / 2**20, 2),
            "safetensors_gib": round(files / 2**30, 2),
            "parity_max_abs_logit_diff": info["parity"]["max_abs_logit_diff"],
            "build_and_save_s": round(build_s, 1),
            "cpus": os.cpu_count(),
        }
        print(json.dumps(result))
        return 0
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
