"""Print median throughput, MFU and peak memory of a run from its metrics.jsonl.

    python examples/summarize_metrics.py RUN_DIR [--skip 1]

The first ``--skip`` steps (warm-up: allocator growth, kernel selection) are left out.
"""

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--skip", type=int, default=1, help="warm-up steps to leave out")
    args = ap.parse_args()
    path = Path(args.run_dir)
    path = path if path.suffix == ".jsonl" else path / "logs" / "metrics.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    # A step recorded twice (a resume by an engine that did not truncate the file): the last
    # record of each step is the one of the surviving timeline.
    by_step = {r["step"]: r for r in rows if r.get("split") == "train"}
    rows = [by_step[s] for s in sorted(by_step)][args.skip :]
    if not rows:
        raise SystemExit(f"no training steps after skipping {args.skip} in {path}")

    def med(key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.median(values) if values else None

    print(f"steps measured: {len(rows)} (steps {rows[0]['step']}..{rows[-1]['step']})")
    print(f"median step time: {med('step_time'):.3f} s")
    print(f"median tokens/s per GPU: {med('tokens_per_s_per_gpu'):,.0f}")
    print(f"median tokens/s total: {med('tokens_per_s'):,.0f}")
    m = med("mfu")
    print(f"median MFU: {'n/a' if m is None else f'{100 * m:.1f}%'}")
    print(f"peak memory: {max(r['peak_mem_gib'] for r in rows):.2f} GiB")
    print(f"loss: first {rows[0]['loss']:.4f}, last {rows[-1]['loss']:.4f}")


if __name__ == "__main__":
    main()
