"""`python -m engine eval`: perplexity and generation metrics of checkpoints.

    python -m engine eval CHECKPOINT [--data PREFIX ...] [--prompts FILE] [--out DIR]
    python -m engine eval --compare A B      # per-dataset perplexity change (forgetting)
    python -m engine eval --sweep RUN_DIR    # every checkpoint of a run: table + PNG plot

The Markdown table is printed; JSON and Markdown (and the sweep's PNG) are written to
``--out`` (default: ``eval/`` in the run directory of the checkpoint).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def register(subparsers) -> None:
    """Add the ``eval`` sub-command."""
    p = subparsers.add_parser(
        "eval", help="perplexity, repetition and EOS metrics of a checkpoint; --compare two; --sweep a run"
    )
    p.add_argument("checkpoint", nargs="?", help="checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="evaluate A and B and report B's change against A")
    p.add_argument("--sweep", metavar="RUN_DIR", help="evaluate every complete checkpoint of a run")
    p.add_argument(
        "--data", nargs="+", metavar="PREFIX", help="indexed datasets (default: the checkpoint's data.paths)"
    )
    p.add_argument(
        "--split",
        choices=["valid", "test", "all"],
        help="part of each dataset to score (default: the checkpoint's validation split, cut by its data.split)",
    )
    p.add_argument("--seq-length", type=int, help="window length (default: the checkpoint's data.seq_length)")
    p.add_argument("--max-tokens", type=int, help="score at most this many tokens per dataset (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--prompts", metavar="FILE", help="prompts (one per line, or JSONL 'prompt'): greedy generations")
    p.add_argument("--max-new-tokens", type=int, default=128, help="generation length limit (default 128)")
    p.add_argument("--no-chat-template", action="store_true", help="feed prompts as plain text")
    p.add_argument("--out", metavar="DIR", help="where to write the JSON/Markdown (default: RUN_DIR/eval)")
    p.set_defaults(func=run)


def _run_dir_of(ckpt: Path) -> Path:
    """The run directory holding ``ckpt`` (``RUN/checkpoints/iter_N``), else its parent."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the table, write the files."""
    from engine.config import ConfigError
    from engine.evaluation import report
    from engine.evaluation.evaluate import EvalOptions, compare_checkpoints, evaluate_checkpoint, sweep_run
    from engine.model_io import resolve_checkpoint
    from parallel.setup import shutdown

    logging.basicConfig(level=logging.WARNING)
    modes = [m for m in (args.checkpoint, args.compare, args.sweep) if m]
    if len(modes) != 1:
        raise ConfigError("give exactly one of CHECKPOINT, --compare A B or --sweep RUN_DIR")
    for name in ("seq_length", "max_tokens", "batch_size", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value} must be positive")
    opts = EvalOptions(
        datasets=args.data,
        split=args.split,
        seq_length=args.seq_length,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        prompts=args.prompts,
        max_new_tokens=args.max_new_tokens,
        chat_template=not args.no_chat_template,
    )
    try:
        if args.sweep:
            sweep = sweep_run(args.sweep, opts)
            out = Path(args.out) if args.out else Path(args.sweep) / "eval"
            text = report.sweep_markdown(sweep)
            written = report.write_report(out, "sweep", sweep, text)
            written.append(out / "sweep.png")
            report.sweep_plot(sweep, written[-1])
        elif args.compare:
            a, b = args.compare
            comparison = compare_checkpoints(a, b, opts)
            out = Path(args.out) if args.out else _run_dir_of(resolve_checkpoint(b)) / "eval"
            text = report.compare_markdown(comparison)
            written = report.write_report(out, "compare", comparison, text)
        else:
            ckpt = resolve_checkpoint(args.checkpoint)
            result = evaluate_checkpoint(ckpt, opts)
            out = Path(args.out) if args.out else _run_dir_of(ckpt) / "eval"
            text = report.eval_markdown(result)
            written = report.write_report(out, f"eval_{ckpt.name}", result, text)
    finally:
        shutdown()
    print(text, end="")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
