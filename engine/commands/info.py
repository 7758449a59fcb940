"""`python -m engine info PRESET_OR_CONFIG`: parameter counts and FLOPs from the built model."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
from pathlib import Path

from engine.config import Config, ConfigError, ParallelConfig
from models.presets import PRESETS


def register(subparsers) -> None:
    """Add the ``info`` sub-command."""
    p = subparsers.add_parser("info", help="parameter counts of a preset or config (built on the meta device)")
    p.add_argument("target", help="preset name (e.g. frankenstallm-3b) or YAML config")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.set_defaults(func=run)


def check_target(target: str) -> None:
    """A target that is neither a preset nor an existing file: one ConfigError listing the
    presets, with the closest ones first (``tiny-lama`` -> ``tiny-llama``)."""
    if target in PRESETS or Path(target).exists():
        return
    close = difflib.get_close_matches(target, list(PRESETS), n=2, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"'{target}' is neither a model preset nor a config file.{hint} Presets: {', '.join(PRESETS)}")


def model_info(cfg: Config) -> dict:
    """Build ``cfg.model`` at TP=PP=1 on the meta device and count its parameters."""
    # Here, not at the top: torch and megatron-core take seconds to import, and
    # `python -m engine --help` imports every command module.
    import torch

    from engine.precision import resolve_fp8
    from models.build import build_gpt_chunks, count_parameters
    from parallel.setup import init_distributed, init_model_parallel

    single = dataclasses.replace(
        cfg, parallel=ParallelConfig(), training=dataclasses.replace(cfg.training, recompute="none")
    )
    init_distributed(single.parallel)
    init_model_parallel(single.parallel, seed=0)
    with torch.device("meta"):
        built = build_gpt_chunks(single, torch.float32, fp8=resolve_fp8(single))
    counts = count_parameters(built.chunks, cfg.model)
    return {
        "total": counts.total,
        "active": counts.active,
        "embedding": counts.embedding,
        "flops_per_token_train": cfg.model.flops_per_token(cfg.model.max_seq_length),
    }


def run(args: argparse.Namespace) -> int:
    """Print the counts."""
    from engine.run_config import load_run_config
    from parallel.setup import shutdown

    logging.basicConfig(level=logging.WARNING)
    check_target(args.target)
    if args.target in PRESETS:
        cfg = load_run_config(None, [f"model.preset={args.target}", *args.overrides])
    else:
        cfg = load_run_config(args.target, args.overrides)
    try:
        info = model_info(cfg)
    finally:
        shutdown()
    m = cfg.model
    print(
        f"model {m.preset or '(custom)'}: {m.num_layers} layers, hidden {m.hidden_size}, "
        f"{m.num_attention_heads} heads / {m.query_groups} KV, "
        f"vocab {m.vocab_size}" + (f", {m.num_experts} experts top-{m.moe_router_topk}" if m.num_experts else "")
    )
    print(f"parameters: total {info['total']:,} ({info['total'] / 1e9:.3f}B)")
    print(f"parameters: active per token {info['active']:,} ({info['active'] / 1e9:.3f}B)")
    print(f"parameters: embedding/output {info['embedding']:,}")
    print(f"training FLOPs per token at seq {m.max_seq_length}: {info['flops_per_token_train']:.4g}")
    return 0
