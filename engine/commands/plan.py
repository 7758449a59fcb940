"""`python -m engine plan CONFIG [overrides] --nodes N --gpus-per-node 8 --gpu b200`: will it fit, how fast.

Validates the parallel layout for the world size, then prints per-GPU memory (weights,
gradients, optimizer state with and without the distributed optimizer, activations under
each recompute mode), model FLOPs per step and the step time at a stated MFU, and a
micro-batch/recompute suggestion when the plan does not fit. Formulas: ``parallel/plan.py``.
"""

from __future__ import annotations

import argparse
import json

from engine.commands.info import check_target
from models.presets import PRESETS
from parallel.plan import GIB, GPU_MEMORY_GB, make_plan


def _number(kind, low: float, high: float, closed_low: bool, closed_high: bool, shown: str):
    """An argparse ``type=`` that parses ``kind`` and accepts only ``shown`` (a one-line error otherwise)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        inside = (value >= low if closed_low else value > low) and (value <= high if closed_high else value < high)
        if not inside:  # NaN fails both comparisons
            raise argparse.ArgumentTypeError(f"must be {shown}, got {text}")
        return value

    return parse


_COUNT = _number(int, 1, float("inf"), True, False, ">= 1")
_MFU = _number(float, 0.0, 1.0, False, True, "in (0, 1]")
_RESERVE = _number(float, 0.0, 1.0, True, False, "in [0, 1)")


def register(subparsers) -> None:
    """Add the ``plan`` sub-command."""
    p = subparsers.add_parser("plan", help="per-GPU memory, FLOPs and step time of a layout (no GPU needed)")
    p.add_argument("config", help="YAML config or preset name (e.g. frankenstallm-3b)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.add_argument("--nodes", type=_COUNT, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=_COUNT, default=8, help="GPUs per node (default 8)")
    p.add_argument("--gpu", default="b200", choices=sorted(GPU_MEMORY_GB), help="GPU model (default b200)")
    p.add_argument(
        "--mfu", type=_MFU, default=0.40, help="model FLOPs utilisation assumed for the step time (default 0.40)"
    )
    p.add_argument(
        "--reserve",
        type=_RESERVE,
        default=0.10,
        help="fraction of GPU memory kept free for CUDA context, NCCL buffers and fragmentation (default 0.10)",
    )
    p.add_argument("--cpu", action="store_true", help="plan a CPU run (precision auto = fp32; no capacity check)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def plan_from_args(args: argparse.Namespace):
    """Load the config named on the command line and plan it."""
    # Here, not at the top: it imports torch and megatron-core, and `python -m engine --help`
    # imports every command module.
    from engine.run_config import RUN_CHECKS, load_run_config

    check_target(args.config)
    if args.config in PRESETS:
        overrides = [
            f"model.preset={args.config}",
            f"data.seq_length={PRESETS[args.config]().max_seq_length}",
            "data.mock=true",
            *args.overrides,
        ]
        cfg = load_run_config(None, overrides)
    else:
        cfg = load_run_config(args.config, args.overrides)
    gpu = "cpu" if args.cpu else args.gpu
    return cfg, make_plan(
        cfg, args.nodes, args.gpus_per_node, gpu, args.mfu, args.reserve, on_cpu=args.cpu, checks=RUN_CHECKS
    )


def _gib(x: float) -> str:
    return f"{x / GIB:8.2f} GiB"


def run(args: argparse.Namespace) -> int:
    """Print the plan."""
    import dataclasses

    cfg, plan = plan_from_args(args)
    if args.json:
        print(json.dumps(dataclasses.asdict(plan), indent=1))
        return 0
    m, g = cfg.model, plan.gpu
    c = plan.counts
    print(
        f"model {m.preset or '(custom)'}: {c.total:,} parameters ({c.total / 1e9:.3f}B), {c.active:,} active per token"
    )
    print(
        f"layout: {plan.world} GPUs ({args.nodes} x {args.gpus_per_node} {plan.gpu_name}) = TP {plan.tensor} x "
        f"PP {plan.pipeline} (VP {plan.virtual}) x CP {plan.context} x DP {plan.data}; EP {plan.expert} "
        f"(expert DP {plan.expert_data}); {plan.micro_batches} micro-batches of {cfg.training.micro_batch_size} "
        f"x {cfg.data.seq_length} tokens per step per DP rank"
    )
    print(
        f"per GPU ({g.stage} pipeline stage, the most loaded): {g.params:,} parameters "
        f"({g.params_dense:,} dense, {g.params_expert:,} expert)"
    )
    do = cfg.parallel.distributed_optimizer
    rows = [
        ("weights", g.weights, ""),
        ("gradients", g.grads, ""),
        ("optimizer, distributed", g.optimizer_do, "<- used" if do else ""),
        ("optimizer, not distributed", g.optimizer_no_do, "" if do else "<- used"),
    ]
    rows += [
        (f"activations, recompute {mode}", value, "<- used" if mode == cfg.training.recompute else "")
        for mode, value in g.activations_by_recompute.items()
    ]
    rows.append(("total", g.total, ""))
    for label, value, mark in rows:
        print(f"  {label:<34}{_gib(value)}   {mark}".rstrip())
    if plan.capacity_gib:
        verdict = "fits" if plan.fits else "DOES NOT FIT"
        print(
            f"memory: {verdict} in {plan.usable_gib:.1f} GiB usable of {plan.capacity_gib:.0f} GB "
            f"({args.reserve:.0%} reserve)"
        )
    print(f"model FLOPs per step: {plan.flops_per_step:.4g} ({plan.tokens_per_step:,} tokens)")
    if plan.step_time_s:
        print(
            f"estimated step time at {plan.mfu:.0%} MFU ({plan.precision} dense peak {plan.peak_tflops:g} "
            f"TFLOP/s per GPU): {plan.step_time_s:.3f} s, {plan.tokens_per_step / plan.step_time_s / plan.world:,.0f} "
            f"tokens/s per GPU"
        )
    for note in plan.notes:
        print(f"note: {note}")
    if plan.suggestion:
        s = plan.suggestion
        if "none" in s:
            print(f"suggestion: {s['none']}")
        else:
            print(
                f"suggestion: training.micro_batch_size={s['training.micro_batch_size']} "
                f"training.recompute={s['training.recompute']} "
                f"parallel.distributed_optimizer={str(s['parallel.distributed_optimizer']).lower()} "
                f"(total {s['total_gib']:.1f} GiB)"
            )
    return 0
