"""`python -m engine train CONFIG.yaml [dotted.key=value ...]`."""

from __future__ import annotations

import argparse
import logging
import signal


def register(subparsers) -> None:
    """Add the ``train`` sub-command."""
    p = subparsers.add_parser(
        "train",
        help="train a model (start with torchrun for several ranks)",
        description="Train a megatron-core GPT model from a YAML config.",
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. training.steps=10")
    p.add_argument(
        "--resume", action="store_true", help="resume from the newest complete checkpoint (checkpoint.resume=true)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the config, train, and tear down the process groups."""
    # Here, not at the top: torch, megatron-core and the trainer take seconds to import, and
    # `python -m engine --help` imports every command module.
    from engine import process_guard
    from engine.run_config import load_run_config
    from engine.trainer import NonFiniteLossError, StopTraining, Trainer
    from parallel.setup import shutdown

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # megatron-core logs every bucket and dataset index at INFO; keep its warnings only.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    overrides = list(args.overrides) + (["checkpoint.resume=true"] if args.resume else [])
    cfg = load_run_config(args.config, overrides)
    # A rank whose launcher died (torchrun killed with SIGKILL) stops as if signalled:
    # checkpoint, exit 75, run lock released, instead of training on unsupervised.
    watchdog = process_guard.ParentWatchdog(process_guard.signal_self(signal.SIGTERM)).start()
    code = 1
    try:
        with process_guard.in_process_write_results():
            Trainer(cfg).fit()
        code = 0
    except NonFiniteLossError as exc:
        print(f"error: {exc}", flush=True)
        code = 3
    except StopTraining as exc:
        print(f"stopped: {exc}", flush=True)
        code = exc.exit_code
    finally:
        watchdog.stop()
        shutdown()
        # Nothing this rank started may outlive the run (normal end, stop or exception).
        process_guard.end_helper_processes()
        process_guard.write_exit_code(code)
    return code
