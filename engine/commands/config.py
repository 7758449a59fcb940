"""`python -m engine config CONFIG [overrides]`: resolve, validate and print a config.
`python -m engine config --reference`: every key with its type, default and meaning."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the ``config`` sub-command."""
    p = subparsers.add_parser("config", help="print the resolved config, or the reference of all keys")
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.add_argument("--reference", action="store_true", help="print every key, type, default and meaning (Markdown)")
    p.add_argument("--world-size", type=int, default=1, help="validate the layout for this many ranks")
    p.add_argument("--update-readme", metavar="README", help="rewrite the reference between the config-reference markers of this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the reference or the validated resolved config."""
    from engine.config import load_config, validate

    if args.reference or args.update_readme:
        from engine.config_reference import reference_markdown, update_readme

        if args.update_readme:
            update_readme(args.update_readme)
            print(f"updated the config reference in {args.update_readme}")
        else:
            print(reference_markdown(), end="")
        return 0
    cfg = load_config(args.config, args.overrides)
    validate(cfg, args.world_size)
    print(cfg.to_yaml(), end="")
    return 0
