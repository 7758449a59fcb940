"""Knowledge distillation through nvidia-modelopt: the student learns a frozen teacher's logits.

Wired as Megatron-LM's ``megatron/post_training`` does (``model_builder.py``,
``loss_func.py``), with modelopt's own pieces:

- the teacher (``objective.distill.teacher``: any checkpoint the engine saved, at any layout)
  is built from its ``config.yaml`` at the student's parallel layout and dtype, loaded through
  ``dist_checkpointing`` (resharded), and put next to each student chunk by
  ``mtd.convert(student, mode=[("kd_loss", ...)])`` with the criterion and loss balancer of
  ``setup_distillation_config`` (logit KL at a temperature, optional intermediate-layer
  pairs, ``kd_loss_scale``, ``skip_lm_loss``); ``adjust_distillation_model_for_mcore`` hides
  the teacher from ``sharded_state_dict`` (so it is never in the student's checkpoint), runs
  it without gradient in eval mode, and under pipeline parallelism sends student and teacher
  activations between stages together (``get_tensor_shapes_adjust_fn_for_distillation``
  widens megatron-core's p2p buffers; the interleaved schedule is not supported by modelopt);
- the loss function masks the per-token losses, sums KL over tensor-parallel vocabulary
  shards, and lets ``compute_kd_loss`` and modelopt's balancer combine them with the LM
  loss. The objective logs ``kd_loss`` (logit KL per token), ``lm_loss`` (cross entropy per
  token, also when it is not trained on), ``intermediate_loss`` when pairs are given, and
  ``loss``: what is backpropagated, per token.

The student's own weights come from ``checkpoint.init_from`` (or a fresh initialisation);
resuming restores the student and re-loads the teacher from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from functools import partial
from pathlib import Path
from types import MethodType
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from engine.config import Config, ConfigError, DistillConfig, ObjectiveConfig, validate
from engine.objectives.pretrain import PretrainObjective

INSTALL_HINT = "pip install -e .[opt]"


def import_modelopt_distill():
    """``(mtd, mtd_mcore, mto)``: modelopt's distillation API, its Megatron plugin and its
    state manager; a one-line ConfigError saying what to install when modelopt is missing."""
    try:
        import modelopt.torch.distill as mtd
        import modelopt.torch.distill.plugins.megatron as mtd_mcore
        import modelopt.torch.opt as mto
    except ImportError as exc:
        raise ConfigError(
            f"objective distill needs nvidia-modelopt (the [opt] extra), which cannot be imported "
            f"({exc}): {INSTALL_HINT}"
        ) from None
    return mtd, mtd_mcore, mto


def teacher_run_config(cfg: Config, world_size: int) -> Tuple[Path, Config]:
    """The teacher's checkpoint and the config it is built with: the student's run config
    (layout, dtype, sequence length) with the teacher's ``model`` section from its
    ``config.yaml``. One-line ConfigError for a missing teacher, another vocabulary, or an
    architecture the student's layout cannot split."""
    from engine.model_io import checkpoint_config, resolve_checkpoint

    path = cfg.objective.distill.teacher
    if not path:
        raise ConfigError("objective distill needs objective.distill.teacher (a checkpoint or a run directory)")
    try:
        ckpt = resolve_checkpoint(path)
        model = checkpoint_config(ckpt).model
    except ConfigError as exc:
        raise ConfigError(f"objective.distill.teacher: {exc}") from None
    s = cfg.model
    if (model.vocab_size, model.padded_vocab_size) != (s.vocab_size, s.padded_vocab_size):
        raise ConfigError(
            f"objective.distill.teacher {ckpt} has vocabulary {model.vocab_size} (padded "
            f"{model.padded_vocab_size}), the student {s.vocab_size} (padded {s.padded_vocab_size}): "
            "logits are compared token by token, so both need the same tokenizer and padded vocabulary"
        )
    pairs = cfg.objective.distill.intermediate_layer_pairs
    if pairs and model.hidden_size != s.hidden_size:
        raise ConfigError(
            f"objective.distill.intermediate_layer_pairs need the teacher's hidden size ({model.hidden_size}) "
            f"to equal the student's ({s.hidden_size}); distil the logits only, or pick a teacher of that width"
        )
    teacher = dataclasses.replace(
        cfg,
        model=model,
        objective=ObjectiveConfig(),
        # Forward only, without a graph: nothing to recompute.
        training=dataclasses.replace(cfg.training, recompute="none"),
    )
    try:
        with warnings.catch_warnings():  # the student's run has issued them already
            warnings.simplefilter("ignore")
            validate(teacher, world_size)
    except ConfigError as exc:
        raise ConfigError(f"objective.distill.teacher {ckpt} at the student's layout: {exc}") from None
    return ckpt, teacher


def _student_lm_loss(self, labels: torch.Tensor, logits: torch.Tensor, skip_lm_loss: bool) -> torch.Tensor:
    """The student's per-token LM loss (bound to the distillation model in place of the one
    ``adjust_distillation_model_for_mcore`` sets, which returns zeros when the LM loss is
    skipped: the engine logs it either way).

    megatron-core's vocab-parallel cross entropy works in place on fp32 logits (subtracts the
    max, exponentiates, normalises); modelopt's logit loss reads that same tensor afterwards
    (captured by its hook on ``output_layer``), so fp32 logits are copied first (bf16 ones are
    copied by the cross entropy's own cast to fp32). When the LM loss is not trained on, it is
    computed without a graph."""
    if logits.dtype == torch.float32:
        logits = logits.clone()
    with torch.set_grad_enabled(torch.is_grad_enabled() and not (skip_lm_loss and self.training)):
        return type(self).compute_language_model_loss(self, labels, logits)


def _masked_sum(loss_mask: torch.Tensor, output) -> torch.Tensor:
    """Sum of a modelopt per-token loss over the loss mask (Megatron-LM's ``_mask_loss``):
    ``output`` is ``(loss [b, s], tp_reduce, is_sequence_parallel)``; a loss over vocabulary
    shards (KL) or over a sequence-parallel slice is summed over the tensor-parallel group."""
    from megatron.core import parallel_state as ps

    losses, tp_reduce, sequence_parallel = output
    if sequence_parallel:
        tp = ps.get_tensor_model_parallel_world_size()
        loss_mask = torch.tensor_split(loss_mask, tp, dim=1)[ps.get_tensor_model_parallel_rank()]
    total = torch.sum(losses.reshape(-1).float() * loss_mask.reshape(-1).float())
    if (tp_reduce or sequence_parallel) and ps.get_tensor_model_parallel_world_size() > 1:
        # The value becomes the group's sum, each rank's gradient flows through its own part
        # (as Megatron-LM's in-place all-reduce does; modelopt's KL all-reduces its softmax
        # denominators with autograd itself). Out of place: c10d ops have no autograd kernel.
        reduced = total.detach().clone()
        dist.all_reduce(reduced, group=ps.get_tensor_model_parallel_group())
        total = total + (reduced - total.detach())
    return total


def _agree(error: Optional[str]) -> None:
    """Raise ConfigError on every rank when any rank met ``error`` (the intermediate-layer
    names resolve on the last pipeline stage only; the other ranks must not wait forever)."""
    errors: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    found = next((e for e in errors if e), None)
    if found:
        raise ConfigError(found)


class DistillObjective(PretrainObjective):
    """Logit (and optional intermediate-layer) distillation from a frozen teacher on
    pretraining data, with modelopt's losses and loss balancer."""

    name = "distill"
    metric_names = ("loss_sum", "tokens", "lm_loss_sum", "kd_loss_sum", "intermediate_loss_sum")
    log_keys = ("kd_loss", "lm_loss")

    def __init__(self, cfg: Optional[Config] = None):
        super().__init__(cfg)
        if cfg is None:
            raise ConfigError("objective distill needs a config (objective.distill.teacher)")
        self.settings: DistillConfig = cfg.objective.distill
        import_modelopt_distill()  # before anything is built: the one-line install hint
        if cfg.parallel.virtual_pipeline is not None:
            raise ConfigError(
                "objective distill does not support parallel.virtual_pipeline: modelopt's distillation "
                "runs only under the non-interleaved pipeline schedule"
            )
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.teacher_checkpoint, self.teacher_cfg = teacher_run_config(cfg, world)

    # -- the model ----------------------------------------------------------------------
    def kd_config(self):
        """modelopt's ``DistillationConfig`` from ``objective.distill``."""
        _, mtd_mcore, _ = import_modelopt_distill()
        d = self.settings
        return mtd_mcore.DistillationConfig(
            intermediate_layer_pairs=[(p.student, p.teacher, p.loss) for p in d.intermediate_layer_pairs],
            skip_lm_loss=d.skip_lm_loss,
            kd_loss_scale=d.kd_loss_scale,
            logit_kl_temperature=d.logit_kl_temperature,
            logit_kl_topk=d.logit_kl_topk,
        )

    def build_teacher(self) -> List[torch.nn.Module]:
        """This rank's teacher chunk(s), built at the student's layout and loaded from the
        teacher checkpoint (resharded from whatever layout it was saved at), in eval mode."""
        from engine import checkpoint as ckpt_lib
        from engine.metrics import print_rank0
        from engine.precision import resolve_fp8
        from models.build import build_gpt_chunks, resolve_dtype

        tcfg = self.teacher_cfg
        built = build_gpt_chunks(tcfg, resolve_dtype(tcfg.precision.dtype), fp8=resolve_fp8(tcfg))
        ckpt_lib.load_checkpoint(self.teacher_checkpoint, built.chunks, optimizer=None, load_optimizer=False)
        for chunk in built.chunks:
            chunk.eval()
        m = tcfg.model
        print_rank0(
            f"distill: teacher {self.teacher_checkpoint} ({m.preset or 'custom'}: {m.num_layers} layers, "
            f"hidden {m.hidden_size}) loaded at the student's layout; frozen, not checkpointed"
        )
        return built.chunks

    def wrap_model(self, chunks: List[torch.nn.Module]) -> List[torch.nn.Module]:
        """Each student chunk converted by modelopt into a distillation model holding its teacher."""
        mtd, mtd_mcore, mto = import_modelopt_distill()
        teachers = self.build_teacher()
        wrapped, error = [], None
        for student, teacher in zip(chunks, teachers):
            try:
                kd = mtd_mcore.setup_distillation_config(self.kd_config(), student.config, teacher.config)
                kd_mode = {"teacher_model": teacher, "criterion": kd.criterion, "loss_balancer": kd.loss_balancer}
                model = mtd.convert(student, mode=[("kd_loss", kd_mode)])
            except (AttributeError, ValueError) as exc:  # a layer name that is not in the model
                error = f"objective.distill.intermediate_layer_pairs: {exc}"
                break
            mtd_mcore.adjust_distillation_model_for_mcore(model, kd)
            model.compute_language_model_loss = MethodType(
                partial(_student_lm_loss, skip_lm_loss=self.settings.skip_lm_loss), model
            )
            # As Megatron-LM: drop the kd_loss entry (it holds the teacher module) from the
            # modelopt state, so a saved modelopt state never carries or re-converts it.
            mto.ModeloptStateManager(model).state_dict().pop()
            wrapped.append(model)
        _agree(error)
        return wrapped

    def schedule_kwargs(self, model: List[torch.nn.Module], seq_length: int, micro_batch_size: int) -> Dict[str, Any]:
        """Under pipeline parallelism, the p2p buffers carry student and teacher activations."""
        _, mtd_mcore, _ = import_modelopt_distill()
        adjust = mtd_mcore.get_tensor_shapes_adjust_fn_for_distillation(
            model, seq_length=seq_length, micro_batch_size=micro_batch_size, decoder_seq_length=seq_length
        )
        return {} if adjust is None else {"adjust_tensor_shapes_fn": adjust}

    # -- the loss -----------------------------------------------------------------------
    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        tokens, labels, position_ids, packed = self.model_inputs(batch)
        # Teacher (no grad) then student; on the last stage the output is the student's
        # per-token LM loss, the logits of both having been captured by modelopt's hooks.
        output = model(tokens, position_ids, None, labels=labels, packed_seq_params=packed)
        return output, partial(self.kd_loss_func, model, batch["loss_mask"].float(), batch.get("dataset_id"))

    def kd_loss_func(self, model, loss_mask: torch.Tensor, dataset_id, output: torch.Tensor):
        """(backpropagated loss summed over the micro-batch's tokens, tokens, metric sums)."""
        lm_sum, num_tokens, metrics = self.loss_func(loss_mask, dataset_id, output)
        distill_model = getattr(model, "module", model)  # the DDP wrapper's module
        losses = distill_model.compute_kd_loss(student_loss=lm_sum, loss_reduction_fn=partial(_masked_sum, loss_mask))
        total = losses["kd_loss"]  # modelopt's name for the balanced total
        metrics.update(
            loss_sum=total.detach().clone(),
            lm_loss_sum=lm_sum.detach().clone(),
            kd_loss_sum=losses["logits_loss"].detach().clone(),
            intermediate_loss_sum=torch.as_tensor(losses["intermediate_loss"]).detach().clone(),
        )
        return total, num_tokens, metrics

    def finalize_metrics(self, sums: Dict[str, float]) -> Dict[str, float]:
        tokens = max(sums.get("tokens", 0.0), 1.0)
        lm = sums.get("lm_loss_sum", float("nan")) / tokens
        out = {
            "loss": sums.get("loss_sum", float("nan")) / tokens,
            "kd_loss": sums.get("kd_loss_sum", float("nan")) / tokens,
            "lm_loss": lm,
            "ppl": math.exp(min(lm, 50.0)) if math.isfinite(lm) else float("nan"),
            "tokens": sums.get("tokens", 0.0),
        }
        if self.settings.intermediate_layer_pairs:
            out["intermediate_loss"] = sums.get("intermediate_loss_sum", 0.0) / tokens
        return out
