"""Fixtures for model tests: one single-rank gloo process group per pytest session.

megatron-core's process groups cannot be re-created cheaply inside one process, so the
group is started once; tests that build models only re-create the (TP=PP=1) model-parallel
layout, which also re-seeds megatron's RNG tracker so every build is reproducible.
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

import pytest
import torch


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter away from its initial value.

    At init all norm weights are 1 and all biases 0, so a mapping that swaps two norms or
    two biases would still give identical logits; small weights also make attention nearly
    uniform, hiding position (RoPE) mistakes. Random norms/biases and larger weights make
    each tensor's placement observable in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
            if param.dim() == 1 and "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif param.dim() == 1:
                param.copy_(0.1 * noise)
            else:
                param.mul_(4.0)  # std 0.02 -> 0.08: peaked attention, varied routing


@pytest.fixture(scope="session")
def build_megatron(megatron_single_rank) -> Callable[[Sequence[str]], Tuple[object, torch.nn.Module]]:
    """Return ``build(overrides) -> (cfg, model)``: a fp32 CPU GPTModel in eval mode.

    Models are cached per override list: tests must not modify their parameters in place."""
    from engine.run_config import load_run_config
    from models.build import build_gpt_chunks
    from parallel.setup import init_model_parallel

    cache: Dict[Tuple[str, ...], Tuple[object, torch.nn.Module]] = {}

    def build(overrides: Sequence[str]):
        key = tuple(overrides)
        if key not in cache:
            cfg = load_run_config(None, list(overrides))
            assert cfg.parallel.tensor == cfg.parallel.pipeline == 1
            init_model_parallel(cfg.parallel, seed=cfg.training.seed)
            model = build_gpt_chunks(cfg, torch.float32).chunks[0].eval()
            _perturb(model, seed=cfg.training.seed)
            cache[key] = (cfg, model)
        return cache[key]

    return build
