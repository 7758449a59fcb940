"""`python -m engine prune CHECKPOINT OUT --target hidden=..,ffn=..,heads=..,layers=..,experts=..
--calib-data PREFIX`: Minitron width/depth pruning through nvidia-modelopt
(engine/optimization/prune.py)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the ``prune`` sub-command."""
    p = subparsers.add_parser(
        "prune",
        help="Minitron width/depth pruning (modelopt), scored on calibration data",
        description=(
            "Prune a checkpoint to smaller sizes with nvidia-modelopt's Minitron: hidden channels, FFN "
            "channels, attention heads, experts and layers are ranked by their activations on the "
            "calibration windows and the best are kept. Writes OUT/checkpoints/iter_0000000 (a normal "
            "engine checkpoint whose config carries the new sizes; train it with checkpoint.init_from) "
            "and OUT/prune_report.json. Runs on one process."
        ),
    )
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("out", help="new output run directory")
    p.add_argument(
        "--target",
        required=True,
        metavar="KEY=SIZE,...",
        help="sizes to prune to, any of hidden, ffn (expert width for MoE), heads (a multiple of the "
        "key/value groups), layers, experts; e.g. hidden=48,ffn=96,layers=3",
    )
    p.add_argument("--calib-data", required=True, metavar="PREFIX", help="indexed dataset (PREFIX.bin/.idx)")
    p.add_argument("--calib-samples", type=int, default=64, metavar="N", help="calibration windows (default 64)")
    p.add_argument("--seq-length", type=int, help="tokens per window (default: the checkpoint's data.seq_length)")
    p.add_argument("--micro-batch", type=int, default=4, help="windows per forward pass (default 4)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Prune, print what was kept and where the checkpoint is."""
    from engine.optimization.prune import PruneTargets, describe, prune_checkpoint

    result = prune_checkpoint(
        args.checkpoint,
        args.out,
        PruneTargets.parse(args.target),
        args.calib_data,
        calib_samples=args.calib_samples,
        seq_length=args.seq_length,
        micro_batch=args.micro_batch,
    )
    for line in describe(result):
        print(line)
    return 0
