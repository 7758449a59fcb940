"""`python -m engine config CONFIG [overrides]`: resolve, validate and print a config.
`python -m engine config --reference`: every key with its type, default and meaning."""

from __future__ import annotations

import argparse

from engine.config_reference import reference_markdown, update_readme


def register(subparsers) -> None:
    """Add the ``config`` sub-command."""
    p = subparsers.add_parser("config", help="print the resolved config, or the reference of all keys")
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.add_argument("--reference", action="store_true", help="print every key, type, default and meaning (Markdown)")
    p.add_argument("--world-size", type=int, default=1, help="validate the layout for this many ranks")
    p.add_argument(
        "--update-readme",
        metavar="README",
        help="rewrite the reference between the config-reference markers of this file",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the reference or the validated resolved config."""
    if args.reference or args.update_readme:
        if args.update_readme:
            update_readme(args.update_readme)
            print(f"updated the config reference in {args.update_readme}")
        else:
            print(reference_markdown(), end="")
        return 0
    # Here, not at the top: it imports torch and megatron-core (objectives, FP8 checks), and
    # `python -m engine --help` imports every command module.
    from engine.run_config import load_run_config, validate_run

    cfg = load_run_config(args.config, args.overrides)
    validate_run(cfg, args.world_size)
    print(cfg.to_yaml(), end="")
    return 0
