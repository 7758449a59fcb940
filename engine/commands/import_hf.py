"""`python -m engine import hf HF_DIR OUT_RUN_DIR [overrides]`: a Hugging Face model as an
engine checkpoint (see ``engine.hf_import``)."""

from __future__ import annotations

import argparse

import yaml


def register(subparsers) -> None:
    """Add ``import`` with its ``hf`` format."""
    p = subparsers.add_parser("import", help="read a Hugging Face model into an engine checkpoint")
    formats = p.add_subparsers(dest="format", metavar="FORMAT")
    formats.required = True
    hf = formats.add_parser(
        "hf",
        help="LLaMA, GPT-2 or Mixtral safetensors directory -> weights-only engine checkpoint",
        description="Convert a transformers LLaMA/GPT-2/Mixtral directory into OUT_RUN_DIR/checkpoints/"
        "iter_0000000 (and OUT_RUN_DIR/tokenizer), usable as checkpoint.init_from at any layout.",
    )
    hf.add_argument("hf_dir", help="Hugging Face model directory (config.json + safetensors)")
    hf.add_argument("out_run_dir", help="new run directory to write")
    hf.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the derived config")
    hf.add_argument(
        "--config", help="build with this run config (its model must be the HF network) instead of deriving one"
    )
    hf.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Import, then print the checkpoint and the model section a training config needs."""
    from engine.hf_import import import_hf
    from engine.model_io import checkpoint_config
    from engine.run_config import load_run_config

    cfg = load_run_config(args.config, args.overrides) if args.config else None
    ckpt = import_hf(args.hf_dir, args.out_run_dir, args.overrides, cfg=cfg)
    model = checkpoint_config(ckpt).to_dict()["model"]
    print(f"imported {args.hf_dir} -> {ckpt}")
    print("model section (for a run with checkpoint.init_from or init_from_hf):")
    print(yaml.safe_dump({"model": model}, sort_keys=False), end="")
    return 0
