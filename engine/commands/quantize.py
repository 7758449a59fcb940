"""`python -m engine quantize CHECKPOINT OUT --format F --calib-data PREFIX --calib-samples N`:
post-training quantization through nvidia-modelopt (engine/optimization/quantize.py)."""

from __future__ import annotations

import argparse

# The format names, without importing torch or modelopt (`--help` imports every command).
FORMAT_CHOICES = ("fp8", "int8", "int8_sq", "int4_awq", "w4a8_awq", "nvfp4")


def register(subparsers) -> None:
    """Add the ``quantize`` sub-command."""
    p = subparsers.add_parser(
        "quantize",
        help="post-training quantization (modelopt): calibrate, report perplexity, save, export to HF",
        description=(
            "Quantize a checkpoint with nvidia-modelopt, calibrating on an indexed dataset; writes "
            "OUT/checkpoints/iter_N (an engine checkpoint carrying modelopt's state), OUT/hf (where "
            "modelopt can export the format) and OUT/quantize_report.json."
        ),
    )
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("out", help="new output run directory")
    p.add_argument("--format", required=True, choices=FORMAT_CHOICES, help="quantization format")
    p.add_argument("--calib-data", required=True, metavar="PREFIX", help="indexed dataset (PREFIX.bin/.idx)")
    p.add_argument("--calib-samples", type=int, default=128, metavar="N", help="calibration windows (default 128)")
    p.add_argument(
        "--eval-data", metavar="PREFIX", help="indexed dataset of the perplexity report (default: --calib-data)"
    )
    p.add_argument(
        "--eval-split",
        choices=("valid", "test", "all"),
        default="valid",
        help="part of --eval-data scored, cut by the checkpoint's data.split (default valid: held out from training)",
    )
    p.add_argument("--eval-samples", type=int, default=32, metavar="N", help="perplexity windows (default 32)")
    p.add_argument("--seq-length", type=int, help="tokens per window (default: the checkpoint's data.seq_length)")
    p.add_argument("--micro-batch", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="parameter dtype (default fp32)")
    p.add_argument("--no-hf", action="store_true", help="do not write the Hugging Face export")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Quantize, print the perplexity change and where the outputs are."""
    import torch

    from engine.optimization.quantize import describe, quantize_checkpoint

    result = quantize_checkpoint(
        args.checkpoint,
        args.out,
        args.format,
        args.calib_data,
        args.calib_samples,
        eval_data=args.eval_data,
        eval_split=args.eval_split,
        eval_samples=args.eval_samples,
        seq_length=args.seq_length,
        micro_batch=args.micro_batch,
        dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype],
        export=not args.no_hf,
    )
    for line in describe(result):
        print(line)
    return 0
