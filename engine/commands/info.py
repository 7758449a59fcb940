"""`python -m engine info PRESET_OR_CONFIG`: parameter counts and FLOPs from the built model."""
from __future__ import annotations

import argparse
import logging


def register(subparsers) -> None:
    """Add the ``info`` sub-command."""
    p = subparsers.add_parser("info", help="parameter counts of a preset or config (built on the meta device)")
    p.add_argument("target", help="preset name (e.g. frankenstallm-3b) or YAML config")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.set_defaults(func=run)


def check_target(target: str) -> None:
    """A target that is neither a preset nor an existing file: one ConfigError listing the
    presets, with the closest ones first (``tiny-lama`` -> ``tiny-llama``)."""
    import difflib
    from pathlib import Path

    from engine.config import ConfigError
    from models.presets import PRESETS

    if target in PRESETS or Path(target).exists():
        return
    close = difflib.get_close_matches(target, list(PRESETS), n=2, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"'{target}' is neither a model preset nor a config file.{hint} "
                      f"Presets: {', '.join(PRESETS)}")


def model_info(cfg) -> dict:
    """Build ``cfg.model`` at TP=PP=1 on the meta device and count its parameters."""
    import dataclasses

    import torch

    from engine.config import ParallelConfig
    from engine.metrics import flops_per_token
    from models.build import build_gpt_chunks, count_parameters
    from parallel.setup import init_distributed, init_model_parallel

    single = dataclasses.replace(cfg, parallel=ParallelConfig(), training=dataclasses.replace(cfg.training, recompute="none"))
    init_distributed(single.parallel)
    init_model_parallel(single.parallel, seed=0)
    with torch.device("meta"):
        built = build_gpt_chunks(single, torch.float32)
    counts = count_parameters(built.chunks, cfg.model)
    return {
        "total": counts.total,
        "active": counts.active,
        "embedding": counts.embedding,
        "flops_per_token_train": flops_per_token(cfg.model, cfg.model.max_seq_length),
    }


def run(args: argparse.Namespace) -> int:
    """Print the counts."""
    from engine.config import load_config
    from models.presets import PRESETS
    from parallel.setup import shutdown

    logging.basicConfig(level=logging.WARNING)
    check_target(args.target)
    if args.target in PRESETS:
        cfg = load_config(None, [f"model.preset={args.target}", *args.overrides])
    else:
        cfg = load_config(args.target, args.overrides)
    try:
        info = model_info(cfg)
    finally:
        shutdown()
    m = cfg.model
    print(f"model {m.preset or '(custom)'}: {m.num_layers} layers, hidden {m.hidden_size}, "
          f"{m.num_attention_heads} heads / {m.num_query_groups or m.num_attention_heads} KV, "
          f"vocab {m.vocab_size}" + (f", {m.num_experts} experts top-{m.moe_router_topk}" if m.num_experts else ""))
    print(f"parameters: total {info['total']:,} ({info['total'] / 1e9:.3f}B)")
    print(f"parameters: active per token {info['active']:,} ({info['active'] / 1e9:.3f}B)")
    print(f"parameters: embedding/output {info['embedding']:,}")
    print(f"training FLOPs per token at seq {m.max_seq_length}: {info['flops_per_token_train']:.4g}")
    return 0
