"""Optimizer and learning-rate schedule, both megatron-core's.

AdamW with fp32 master weights and fp32 optimizer state whatever the training dtype
(megatron-core's mixed-precision optimizer), sharded over data-parallel ranks with the
distributed optimizer. Weight decay skips norms, biases and embeddings. Without TE/apex
megatron-core uses ``torch.optim.AdamW``; ``performance.adam`` picks its implementation.
"""

from __future__ import annotations

from typing import List

import torch

from engine.config import Config


def no_weight_decay_overrides(opt_config):
    """megatron-core's standard skips (1-D params, biases) plus every embedding/output weight."""
    from megatron.core.optimizer import (
        ParamGroupOverride,
        ParamKey,
        ParamWithNamePredicate,
        get_standard_config_overrides,
    )

    overrides = get_standard_config_overrides(opt_config)
    embedding = ParamWithNamePredicate(
        name="embeddings",
        fn=lambda param, name: getattr(param, "is_embedding_or_output_parameter", False) or "embedding" in name,
    )
    overrides[ParamKey(with_name_predicate=embedding)] = ParamGroupOverride(wd_mult=0.0)
    return overrides


def build_optimizer(cfg: Config, model_chunks: List[torch.nn.Module], dtype: torch.dtype):
    """megatron-core optimizer (AdamW) over the DDP-wrapped ``model_chunks``."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = cfg.optimizer
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_eps=o.eps,
        clip_grad=o.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(opt_config, model_chunks, config_overrides=no_weight_decay_overrides(opt_config))
    apply_adam_implementation(cfg, optimizer)
    return optimizer


def apply_adam_implementation(cfg: Config, optimizer) -> str:
    """Set ``performance.adam`` on the torch AdamW inside ``optimizer`` (again after a resume:
    a loaded optimizer state brings the saved run's param-group flags); returns it."""
    from models.performance import adam_implementation, select_adam

    impl = adam_implementation(cfg.performance, torch.cuda.is_available())
    select_adam(optimizer, impl)
    return impl


def build_scheduler(cfg: Config, optimizer):
    """megatron-core's OptimizerParamScheduler, stepped once per optimizer step.

    Linear warmup from 0 to ``optimizer.lr`` over ``schedule.warmup_steps``, then
    ``schedule.decay_style`` down to ``optimizer.min_lr`` at ``schedule.decay_steps``."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    s = cfg.schedule
    decay_steps = s.decay_steps or cfg.training.steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.optimizer.lr,
        min_lr=cfg.optimizer.min_lr,
        lr_warmup_steps=s.warmup_steps,
        lr_decay_steps=max(decay_steps, s.warmup_steps + 1),
        lr_decay_style=s.decay_style,
        start_wd=cfg.optimizer.weight_decay,
        end_wd=cfg.optimizer.weight_decay,
        wd_incr_steps=max(decay_steps, 1),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
