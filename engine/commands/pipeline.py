"""`python -m engine pipeline CONFIG.yaml`: corpus -> tokenizer -> data -> pretrain -> SFT ->
ORPO -> Hugging Face export -> GGUF -> sample generations -> evaluation, then a report.

Each stage runs the engine's own command (its log in ``OUT/logs/<stage>.log``) and is skipped
on a re-run when its inputs have not changed; ``--force`` redoes every stage.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the ``pipeline`` sub-command."""
    p = subparsers.add_parser("pipeline", help="run every stage from corpus to chat model, with a report")
    p.add_argument("config", help="pipeline YAML (e.g. examples/configs/quickstart.yaml)")
    p.add_argument("--out", default=None, help="output directory (default: run.out of the config)")
    p.add_argument("--corpus", default=None, metavar="FILE.jsonl", help="pretraining corpus (default: run.corpus)")
    p.add_argument("--preset", default=None, help="model preset of the training stages (default: run.preset)")
    p.add_argument(
        "--steps-scale",
        type=float,
        default=None,
        metavar="F",
        help="multiply every stage's steps (default: run.steps_scale)",
    )
    p.add_argument("--force", action="store_true", help="rerun every stage, finished or not")
    p.add_argument("--plan", action="store_true", help="print the stages and the time estimate, run nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the config and run the pipeline; exit 1 naming the stage that failed."""
    from engine.pipeline.config import load_pipeline_config
    from engine.pipeline.driver import run_pipeline

    cfg = load_pipeline_config(
        args.config, out=args.out, corpus=args.corpus, preset=args.preset, steps_scale=args.steps_scale
    )
    return run_pipeline(cfg, force=args.force, plan_only=args.plan, config_path=args.config)
