"""Top GPU kernels of a torch.profiler Chrome trace and the share of GPU time outside GEMMs and attention.

    python examples/kernel_breakdown.py runs/<run>/profile/trace_rank0.json [--top 15]

Kernels are classified by name: GEMM (cuBLAS/cuBLASLt/CUTLASS/nvjet matrix kernels),
attention (flash / fused multi-head / cuDNN SDPA kernels), everything else (norms,
activations, elementwise, reductions, copies, optimizer, communication). GPU time is the
sum of kernel durations; the wall time of the window comes from the profiler's step
annotations when present, else from the first to the last kernel.
"""

import argparse
import json
import re
from collections import defaultdict

GEMM = re.compile(r"gemm|cutlass|nvjet|xmma|cublas|sm\d+_.*_(tn|nt|nn|tt)\b", re.I)
ATTENTION = re.compile(r"flash|fmha|attention|attn|sdpa|cudnn.*(mha|flash)", re.I)


def classify(name: str) -> str:
    """GEMM, attention or other, by kernel name."""
    if ATTENTION.search(name):
        return "attention"
    if GEMM.search(name):
        return "gemm"
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    events = json.load(open(args.trace))["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        raise SystemExit(f"no GPU kernels in {args.trace}")
    by_name = defaultdict(lambda: [0.0, 0])
    by_class = defaultdict(float)
    for k in kernels:
        by_name[k["name"]][0] += k["dur"]
        by_name[k["name"]][1] += 1
        by_class[classify(k["name"])] += k["dur"]
    total = sum(by_class.values())
    steps = [e for e in events if e.get("name", "").startswith("ProfilerStep#") and "dur" in e]
    if steps:
        wall = sum(e["dur"] for e in steps)
    else:
        wall = max(k["ts"] + k["dur"] for k in kernels) - min(k["ts"] for k in kernels)
    print(
        f"kernels: {len(kernels)}, GPU kernel time {total / 1e3:.1f} ms, window wall time {wall / 1e3:.1f} ms "
        f"(GPU busy {100 * total / wall:.1f}%)"
    )
    for cls in ("gemm", "attention", "other"):
        print(
            f"  {cls:9s} {by_class[cls] / 1e3:9.1f} ms  {100 * by_class[cls] / total:5.1f}% of kernel time  "
            f"{100 * by_class[cls] / wall:5.1f}% of wall time"
        )
    idle = max(wall - total, 0.0)
    print(
        f"  outside GEMM and attention (other kernels + GPU idle): "
        f"{100 * (by_class['other'] + idle) / wall:.1f}% of wall time"
    )
    print(f"top {args.top} kernels by total time:")
    for name, (dur, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"  {dur / 1e3:9.2f} ms {100 * dur / total:5.1f}%  x{n:<5d} [{classify(name)}] {name[:110]}")


if __name__ == "__main__":
    main()
