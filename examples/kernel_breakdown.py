"""Top GPU kernels of a torch.profiler Chrome trace and the share of GPU time per kernel class.

    python examples/kernel_breakdown.py runs/<run>/profile/trace_rank0.json [--top 15]

Kernels are classified by name (``classify``): communication (NCCL collectives and
send/recv), optimizer (torch's fused/foreach AdamW and the multi-tensor kernels of the
gradient norm and clipping), attention (flash / fused multi-head / cuDNN SDPA kernels), GEMM
(cuBLAS/cuBLASLt/CUTLASS/nvjet matrix kernels), everything else (norms, activations,
elementwise, reductions, copies). GPU time is the sum of kernel durations; the wall time of
the window comes from the profiler's step annotations when present, else from the first to
the last kernel. A CPU-only trace (no kernels) is broken down by its ``cpu_op`` events
instead (nested ops counted in each: a plumbing check, not a profile).
"""

import argparse
import json
import re
from collections import defaultdict
from typing import Dict, List, Tuple

CLASSES = ("gemm", "attention", "optimizer", "communication", "other")
COMMUNICATION = re.compile(r"nccl|all_?reduce|all_?gather|reduce_?scatter|sendrecv|alltoall|c10d::|gloo", re.I)
OPTIMIZER = re.compile(r"multi_tensor|adam|foreach|_fused_sgd|l2norm|optimizer", re.I)
GEMM = re.compile(r"gemm|cutlass|nvjet|xmma|cublas|sm\d+_.*_(tn|nt|nn|tt)\b|aten::(mm|addmm|bmm|baddbmm)$", re.I)
ATTENTION = re.compile(r"flash|fmha|attention|attn|sdpa|cudnn.*(mha|flash)", re.I)


def classify(name: str) -> str:
    """gemm, attention, optimizer, communication or other, by kernel name."""
    if COMMUNICATION.search(name):
        return "communication"
    if OPTIMIZER.search(name):
        return "optimizer"
    if ATTENTION.search(name):
        return "attention"
    if GEMM.search(name):
        return "gemm"
    return "other"


def breakdown(trace_path: str) -> Tuple[Dict[str, float], float, List[Tuple[str, float, int]], str]:
    """``(microseconds per class, window wall time in us, [(kernel, us, calls)] by time, source)``
    of a Chrome trace; ``source`` is ``kernels`` (GPU) or ``cpu_ops`` (a CPU-only trace)."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    source = "kernels"
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        source = "cpu_ops"
        kernels = [e for e in events if e.get("cat") == "cpu_op" and "dur" in e]
    if not kernels:
        raise ValueError(f"no GPU kernels or CPU ops in {trace_path}")
    by_name: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0])
    by_class = {c: 0.0 for c in CLASSES}
    for k in kernels:
        by_name[k["name"]][0] += k["dur"]
        by_name[k["name"]][1] += 1
        by_class[classify(k["name"])] += k["dur"]
    steps = [e for e in events if e.get("name", "").startswith("ProfilerStep#") and "dur" in e]
    if steps:
        wall = sum(e["dur"] for e in steps)
    else:
        wall = max(k["ts"] + k["dur"] for k in kernels) - min(k["ts"] for k in kernels)
    top = sorted(((n, d, int(c)) for n, (d, c) in by_name.items()), key=lambda x: -x[1])
    return by_class, float(wall), top, source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    try:
        by_class, wall, top, source = breakdown(args.trace)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    total = sum(by_class.values())
    label = "GPU kernel" if source == "kernels" else "CPU op"
    print(
        f"{source}: {sum(c for _, _, c in top)}, {label} time {total / 1e3:.1f} ms, window wall time "
        f"{wall / 1e3:.1f} ms (busy {100 * total / wall:.1f}%)"
    )
    for cls in CLASSES:
        print(
            f"  {cls:13s} {by_class[cls] / 1e3:9.1f} ms  {100 * by_class[cls] / total:5.1f}% of kernel time  "
            f"{100 * by_class[cls] / wall:5.1f}% of wall time"
        )
    idle = max(wall - total, 0.0)
    print(
        f"  outside GEMM and attention (other kernels + GPU idle): "
        f"{100 * (total - by_class['gemm'] - by_class['attention'] + idle) / wall:.1f}% of wall time"
    )
    print(f"top {args.top} by total time:")
    for name, dur, n in top[: args.top]:
        print(f"  {dur / 1e3:9.2f} ms {100 * dur / total:5.1f}%  x{n:<5d} [{classify(name)}] {name[:110]}")


if __name__ == "__main__":
    main()
