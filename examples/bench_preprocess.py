"""Benchmark `python -m engine preprocess`: throughput and peak memory of the process tree.

Builds a JSONL corpus of at least ``--size-mb`` MB in a temporary directory by repeating
the bundled sample (examples/data/sample.jsonl) with variation (documents shuffled,
numbers changed, paragraphs rotated, a copy marker added), trains a small tokenizer on
the sample, then runs the real CLI once per worker count and corpus size, sampling the
resident memory of the CLI process and all its children every 50 ms.

    python examples/bench_preprocess.py                      # 200 MB, 1 and 2 workers
    python examples/bench_preprocess.py --size-mb 50 --workers 1 2 4

Each setting runs ``--repeat`` times and the median run is reported (all run times are
listed: on a shared 2-core machine other tenants' load moves single runs a lot).
Reported: input MB/s and tokens/s measured inside the run (from the output sidecar, which
excludes interpreter start-up) and end to end (wall clock of the whole command), and the
peak memory of the process tree (summed RSS of the CLI process and its workers, sampled
every 50 ms; shared library pages are counted in every process, so it is an upper bound).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "data" / "sample.jsonl"
_NUMBER = re.compile(r"\d+")


def build_corpus(path: Path, size_mb: float, seed: int = 0) -> int:
    """Write a JSONL corpus of at least ``size_mb`` MB; returns its size in bytes."""
    rng = random.Random(seed)
    docs = [json.loads(line)["text"] for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    target = int(size_mb * 1e6)
    written = copy = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            copy += 1
            order = list(range(len(docs)))
            rng.shuffle(order)
            for i in order:
                paragraphs = docs[i].split("\n")
                k = rng.randrange(len(paragraphs))
                text = "\n".join(paragraphs[k:] + paragraphs[:k])  # rotate paragraphs
                text = _NUMBER.sub(lambda m: str(rng.randrange(10 ** len(m.group()))), text)
                line = json.dumps({"text": f"[copy {copy}] {text}", "source": "bench"}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
    return written


def tree_memory(proc) -> int:
    """Summed RSS of ``proc`` and its descendants (bytes), skipping not-yet-exec'd forks.

    Spawned workers start as a fork of the CLI process and exec a fresh interpreter
    microseconds later; in between, the fork reports the parent's whole RSS although it
    owns none of it (copy-on-write). Such a child still has the parent's command line,
    which is how it is recognised and left out.
    """
    import psutil

    total = 0
    parent_cmd = None
    for i, p in enumerate([proc] + proc.children(recursive=True)):
        try:
            cmd = p.cmdline()
            if i == 0:
                parent_cmd = cmd
            elif cmd == parent_cmd or not cmd:
                continue
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(cmd, env) -> dict:
    """Run ``cmd``; return wall seconds and peak process-tree memory."""
    import psutil

    start = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_memory(ps))
        time.sleep(0.05)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out}")
    return {"wall_s": time.time() - start, "peak_mem_mb": peak / 2**20, "output": out}


def main() -> int:
    """Build corpora, run the CLI for each setting, print a Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, nargs="+", default=[200.0], help="corpus sizes to test (default 200)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument(
        "--vocab-size",
        type=int,
        default=8000,
        help="asked of the tokenizer; the sample supports fewer pieces, which are kept "
        "(--allow-smaller-vocab), as in the measured runs",
    )
    ap.add_argument(
        "--repeat", type=int, default=3, help="runs per setting; the median run is reported (shared machines are noisy)"
    )
    ap.add_argument("--tmpdir", default=None, help="where to build the corpus (default: system temp)")
    args = ap.parse_args()

    env = dict(
        os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    py = sys.executable
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmpdir, prefix="bench_preprocess_") as tmp:
        tmp = Path(tmp)
        tok = tmp / "tok"
        subprocess.run(
            [
                py,
                "-m",
                "engine",
                "tokenizer",
                "train",
                "--input",
                str(SAMPLE),
                "--output-dir",
                str(tok),
                "--vocab-size",
                str(args.vocab_size),
                "--allow-smaller-vocab",
            ],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        meta = json.loads((tok / "tokenizer_meta.json").read_text())
        print(
            f"tokenizer: {meta['model_type']} {meta['trained_vocab_size']} pieces (vocab {meta['vocab_size']})",
            flush=True,
        )
        for size in args.size_mb:
            corpus = tmp / f"corpus_{int(size)}.jsonl"
            t = time.time()
            nbytes = build_corpus(corpus, size)
            print(f"corpus: {nbytes / 1e6:.1f} MB ({time.time() - t:.0f}s to build)", flush=True)
            for w in args.workers:
                prefix = tmp / f"out_{int(size)}_{w}"
                cmd = [
                    py,
                    "-m",
                    "engine",
                    "preprocess",
                    "--input",
                    str(corpus),
                    "--tokenizer",
                    str(tok),
                    "--output-prefix",
                    str(prefix),
                    "--workers",
                    str(w),
                    "--no-progress",
                ]
                runs = []
                for _ in range(args.repeat):
                    load = os.getloadavg()[0]
                    m = run_measured(cmd, env)
                    side = json.loads(prefix.with_suffix(".json").read_text())
                    runs.append((side["run"]["seconds"], m, side, load))
                    for ext in (".bin", ".idx", ".json"):
                        prefix.with_suffix(ext).unlink()
                runs.sort(key=lambda r: r[0])
                run_s, m, side, load = runs[len(runs) // 2]
                row = {
                    "corpus_mb": nbytes / 1e6,
                    "workers": w,
                    "documents": side["documents"],
                    "tokens": side["tokens"],
                    "run_s": run_s,
                    "wall_s": m["wall_s"],
                    "mb_s": nbytes / 1e6 / run_s,
                    "tok_s": side["tokens"] / run_s,
                    "mb_s_wall": nbytes / 1e6 / m["wall_s"],
                    "peak_mem_mb": max(r[1]["peak_mem_mb"] for r in runs),
                    "run_s_all": [r[0] for r in runs],
                    "load_before": [round(r[3], 2) for r in runs],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            corpus.unlink()

    print(f"\nmedian of {args.repeat} runs; peak memory is the maximum over the runs")
    print(
        "| corpus MB | workers | documents | tokens | MB/s (run) | tokens/s (run) | MB/s (end to end) | MB/s per worker | run seconds (all runs) | peak memory, process tree |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['corpus_mb']:.1f} | {r['workers']} | {r['documents']:,} | {r['tokens']:,} | {r['mb_s']:.2f} | "
            f"{r['tok_s']:,.0f} | {r['mb_s_wall']:.2f} | {r['mb_s'] / r['workers']:.2f} | "
            f"{', '.join(f'{x:.1f}' for x in r['run_s_all'])} | {r['peak_mem_mb']:.0f} MiB |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
