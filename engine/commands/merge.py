"""`python -m engine merge A B --method linear|slerp --t 0.1 OUT`: interpolate two checkpoints."""

from __future__ import annotations

import argparse
import logging


def register(subparsers) -> None:
    """Add the ``merge`` sub-command."""
    p = subparsers.add_parser(
        "merge", help="interpolate two checkpoints of the same architecture (linear or SLERP) into a new checkpoint"
    )
    p.add_argument("a", help="checkpoint (or run directory) A: the result at t=0")
    p.add_argument("b", help="checkpoint (or run directory) B: the result at t=1")
    p.add_argument("out", help="run directory to write the merged checkpoint into (OUT/checkpoints/iter_0000000)")
    p.add_argument("--method", choices=["linear", "slerp"], default="slerp", help="interpolation (default slerp)")
    p.add_argument("--t", type=float, default=0.5, help="weight of B, in [0, 1] (default 0.5)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Merge and report the written checkpoint."""
    from engine.evaluation.merge import check_merge, merge_checkpoints
    from parallel.setup import shutdown

    logging.basicConfig(level=logging.WARNING)
    check_merge(args.a, args.b, args.out, args.method, args.t)  # bad input: before any model is built
    try:
        path = merge_checkpoints(args.a, args.b, args.out, args.method, args.t)
    finally:
        shutdown()
    print(f"merged {args.a} and {args.b} ({args.method}, t={args.t}) into {path}")
    return 0
