"""Command-line interface: `python -m engine <command> ...`.

Each command lives in its own module exposing ``register(subparsers)``; the module adds
its sub-parser and sets ``func`` (a callable taking the parsed args and returning an exit
code). This keeps the CLI a thin index of what the engine can do.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import List, Optional

# Modules that contribute sub-commands, in the order they appear in --help.
COMMAND_MODULES = [
    "engine.commands.train",
    "engine.commands.info",
    "engine.commands.config",
    "engine.commands.plan",
    "engine.data.commands",
    "engine.commands.export",
    "engine.commands.import_hf",
    "engine.commands.generate",
    "engine.commands.eval",
    "engine.commands.merge",
    "engine.commands.quantize",
    "engine.commands.prune",
    "engine.commands.merge_lora",
    "engine.commands.pipeline",
]


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every registered sub-command."""
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a command module not written yet
            if exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Parse ``argv`` and run the chosen command; returns the process exit code."""
    # megatron-core warns at every import that TE/apex are absent (the engine logs once which
    # layer implementation it uses instead), and its internals trip torch deprecation notices
    # a user cannot act on.
    for notice in (
        ".*Transformer Engine and Apex are not installed.*",
        "Apex is not installed.*",
        "The .grad attribute of a Tensor that is not a leaf Tensor.*",
        ".*torch.distributed.(reduce_scatter_tensor|all_gather_into_tensor). is deprecated.*",
        "Please use DTensor instead and we are deprecating ShardedTensor.*",
        ".*`load_state_dict` is deprecated.*",
        "full scope is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=notice)
    if not sys.stderr.isatty():
        # transformers' and huggingface_hub's bars (weight loading, shard writing) redraw with
        # carriage returns: noise in a log file. Read when transformers is first imported.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from engine.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
