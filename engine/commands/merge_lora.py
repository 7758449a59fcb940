"""`python -m engine merge-lora ADAPTER_CHECKPOINT OUT`: fold LoRA adapters into a normal checkpoint.

The adapter checkpoint (a run directory: its newest checkpoint, or one ``iter_N``) holds
only the adapters and a reference to its base checkpoint; the base is checked against that
reference (its manifest and model config), the adapters are folded in per weight
(``W += alpha / rank * B @ A``) and the result is written as a normal weights-only checkpoint
under the run directory ``OUT``, which every other command (export, generate, eval) and
``checkpoint.init_from`` accept.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the ``merge-lora`` sub-command."""
    p = subparsers.add_parser("merge-lora", help="fold LoRA adapters into their base: a normal checkpoint")
    p.add_argument("checkpoint", help="LoRA adapter checkpoint, or a LoRA run directory (its newest checkpoint)")
    p.add_argument("out", help="run directory of the merged checkpoint (OUT/checkpoints/iter_N)")
    p.add_argument("--base", default=None, help="base checkpoint if it moved (checked against the recorded one)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Merge and print where the checkpoint went."""
    # Here, not at the top: `python -m engine --help` imports every command module.
    from engine.optimization.lora import merge_checkpoint

    path = merge_checkpoint(args.checkpoint, args.out, base=args.base)
    print(f"merged LoRA adapters of {args.checkpoint} into {path}")
    return 0
