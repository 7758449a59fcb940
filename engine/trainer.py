"""The training loop: megatron-core model, DDP, optimizer and schedule, driven by an objective.

``Trainer(cfg).fit()`` is the whole run. One step is readable in ``train_step``: zero the
gradient buffers, run megatron-core's forward-backward schedule over the micro-batches
(it finalises gradients: DP reduction, tied-embedding sync, division by the global number
of valid tokens), reduce the metrics, then the optimizer step from megatron-core's pieces
(``prepare_grads``, ``get_grad_norm``, clipping, ``step_with_ready_grads``) so that a
non-finite loss or gradient norm skips the update on every rank alike.

Non-finite steps (policy): a step whose loss or gradient norm is NaN/Inf is skipped: no
update, no scheduler step, but the iteration and the data position advance (as Megatron-LM
does), and the step is logged with ``skipped 1``. More than ``training.max_skipped_steps``
consecutive skipped steps stop the run (exit 3, NonFiniteLossError) after checkpointing the
unchanged, finite state when ``training.exit_on_nonfinite``; otherwise the run goes on and
counts them (``skipped_total``). A checkpoint is never written from non-finite state.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from engine import checkpoint as ckpt_lib
from engine.callbacks import build_callbacks
from engine.config import Config, validate
from engine.data import gpt_data
from engine.data.builders import build_training_data
from engine.metrics import (MetricsWriter, detect_gpu, flops_per_token, format_line, mfu,
                            peak_memory_gib, print_rank0)
from engine.objectives import build_objective
from engine.precision import mfu_precision
from engine.profiling import NvtxIterator, nvtx_range

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training met non-finite values it must not go on with: more consecutive non-finite steps
    than ``training.max_skipped_steps`` (the finite state has been checkpointed), or non-finite
    weights at a checkpoint (nothing written). The CLI exits with code 3."""


class StopTraining(Exception):
    """A callback asked the run to stop early (after checkpointing); carries the exit code."""

    def __init__(self, exit_code: int, reason: str):
        super().__init__(reason)
        self.exit_code = exit_code


class Trainer:
    """Builds every component from the config, then trains (``fit``)."""

    def __init__(self, cfg: Config):
        from parallel.setup import init_distributed, init_model_parallel, world_size_from_env

        self.cfg = cfg
        # Sizes are checked against the launcher's world size before any group exists.
        validate(cfg, world_size_from_env())
        self.env = init_distributed(cfg.parallel)
        # Before anything is written to the run directory: one job per directory.
        from engine.run_lock import acquire_for_run

        self.run_lock = acquire_for_run(cfg.checkpoint.dir, cfg.checkpoint.lock)
        init_model_parallel(cfg.parallel, cfg.training.seed)
        self._build()

    # ----------------------------------------------------------------------------- setup
    def _build(self) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

        from engine.optim import build_optimizer, build_scheduler
        from models.build import build_gpt_chunks, resolve_dtype
        from parallel.setup import describe_layout

        cfg = self.cfg
        self.dtype = resolve_dtype(cfg.precision.dtype)
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.num_micro = cfg.training.global_batch_size // (cfg.training.micro_batch_size * self.dp_size)

        print_rank0("resolved config:\n" + cfg.to_yaml())
        built = build_gpt_chunks(cfg, self.dtype)
        self.tf_config = built.config
        print_rank0(f"layers: {built.spec_description}; dtype {self.dtype}; device {self.env.device}")
        print_rank0(f"layout: {describe_layout()} (world {self.env.world_size}, dp {self.dp_size}, micro-batches/step {self.num_micro})")

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=cfg.precision.grad_reduce_in_fp32,
            overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
            overlap_param_gather=cfg.parallel.overlap_param_gather,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
            # Per-token loss: gradients are summed, then divided by the global token count.
            average_in_collective=False,
        )
        self.model: List[torch.nn.Module] = []
        for i, chunk in enumerate(built.chunks):
            if torch.cuda.is_available():
                chunk.cuda(torch.cuda.current_device())
            wrapped = DistributedDataParallel(
                config=self.tf_config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0
            )
            wrapped.broadcast_params()  # identical replicas across data-parallel ranks
            self.model.append(wrapped)

        c = self.tf_config
        c.finalize_model_grads_func = finalize_model_grads
        no_sync = [m.no_sync for m in self.model]
        c.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        if cfg.parallel.overlap_grad_reduce:
            sync = [m.start_grad_sync for m in self.model]
            c.grad_sync_func = sync[0] if len(sync) == 1 else sync
        if cfg.parallel.overlap_param_gather and cfg.parallel.distributed_optimizer:
            psync = [m.start_param_sync for m in self.model]
            c.param_sync_func = psync[0] if len(psync) == 1 else psync

        self.optimizer = build_optimizer(cfg, self.model, self.dtype)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.state = ckpt_lib.TrainState()
        self._maybe_load()

        self.objective = build_objective(cfg)
        self._build_data()
        self.objective.prepare(self)
        self.callbacks = build_callbacks(cfg)
        self._stop = None
        self._saved_path: Optional[Path] = None

        self.gpu = cfg.logging.gpu or detect_gpu()
        self.flops_token = flops_per_token(cfg.model, cfg.data.seq_length)
        self.writer: Optional[MetricsWriter] = None
        if self.env.rank == 0:
            log_dir = cfg.logging.dir or str(Path(cfg.checkpoint.dir) / "logs")
            # Records past the start iteration belong to an abandoned timeline (a crash after
            # the last checkpoint): dropped, so each step is recorded once.
            self.writer = MetricsWriter(log_dir, cfg.logging.tensorboard, cfg.logging.wandb_project, cfg.to_dict(),
                                        truncate_after=self.state.iteration)

    def _maybe_load(self) -> None:
        """Resume, load or initialise from a checkpoint, after the timeline checks.

        Refused (CheckpointError, before anything is written): resuming/loading a checkpoint
        whose iteration is beyond ``training.steps``, and any run whose ``checkpoint.dir``
        holds complete checkpoints newer than the iteration it starts from (they belong to
        another timeline that this run would interleave with and prune)."""
        cfg = self.cfg.checkpoint
        source, verified = None, False
        self.start_ckpt: Optional[Path] = None
        if cfg.load:
            source, full = Path(cfg.load), True
        elif cfg.resume:
            source, full = ckpt_lib.select_resume_checkpoint(cfg.dir, cfg.fallback_on_corrupt), True
            verified = source is not None
            if source is None:
                print_rank0(f"resume: no complete checkpoint in {cfg.dir}; starting from scratch")
        if source is None and cfg.init_from:
            source, full = Path(cfg.init_from), False
        start = 0
        if source is not None and full and (source / ckpt_lib.META).is_file():
            start = ckpt_lib.read_meta(source)["iteration"]
            if self.cfg.training.steps < start:
                raise ckpt_lib.CheckpointError(
                    f"training.steps={self.cfg.training.steps} is behind the checkpoint {source} (iteration "
                    f"{start}): resuming would rewrite its timeline. Set training.steps >= {start}, or start "
                    "a new run (another checkpoint.dir, with checkpoint.init_from for its weights)")
        self._check_timeline(start)
        if source is None:
            return
        self.start_ckpt = source if full else None
        self.state = ckpt_lib.load_checkpoint(source, self.model, self.optimizer, self.scheduler, load_optimizer=full,
                                              verify=not verified)
        if not full:
            self.state.lineage = ckpt_lib.read_meta(source).get("lineage", []) + [
                {"init_from": str(source), "iteration": ckpt_lib.read_meta(source)["iteration"],
                 "objective": ckpt_lib.checkpoint_objective(source)}
            ]
        what = "resumed" if full else "initialised weights"
        print_rank0(f"{what} from {source} (iteration {self.state.iteration}, "
                    f"consumed samples {self.state.consumed_train_samples})")

    def _check_timeline(self, start: int) -> None:
        """Refuse to write into a directory that holds complete checkpoints newer than ``start``."""
        c = self.cfg.checkpoint
        if not c.enabled:
            return
        newer = ckpt_lib.checkpoints_after(c.dir, start)
        if newer:
            names = ", ".join(d.name for d in newer)
            raise ckpt_lib.CheckpointError(
                f"{ckpt_lib.checkpoint_root(c.dir)} holds complete checkpoints newer than iteration {start}, "
                f"where this run starts: {names}. This run would interleave another timeline with them, "
                "overwrite and prune them. Use another checkpoint.dir, resume the newest "
                "(checkpoint.resume=true), or delete them")

    def _build_data(self) -> None:
        cfg, t = self.cfg, self.cfg.training
        train_samples = max(t.steps, 1) * t.global_batch_size
        valid_samples = t.eval_steps * t.global_batch_size if t.eval_interval > 0 else 0
        data = build_training_data(self.objective.data_kind, cfg, train_samples, valid_samples)
        self.train_ds, self.valid_ds, self.dataset_names = data.train, data.valid, data.source_names
        self.train_iters = self._iterators(self.train_ds, train_samples, self.state.consumed_train_samples)

    def _iterators(self, dataset, total: int, consumed: int):
        """One iterator per model chunk (interleaved pipelining reads data per chunk)."""
        sampler = gpt_data.MicroBatchSampler(total, consumed, self.cfg.training.micro_batch_size,
                                             self.dp_rank, self.dp_size)
        its = [NvtxIterator(gpt_data.micro_batches(dataset, sampler, self.cfg.data.num_workers, self.env.device))
               for _ in self.model]
        return its[0] if len(its) == 1 else its

    # ------------------------------------------------------------------------------ steps
    def _forward_backward(self, data_iterator, forward_only: bool) -> Dict[str, float]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        seq, mbs = self.objective.activation_shape(self.cfg.data.seq_length, self.cfg.training.micro_batch_size)
        store = get_forward_backward_func()(
            forward_step_func=self.objective.forward_step,
            data_iterator=data_iterator,
            model=self.model,
            num_microbatches=self.num_micro,
            seq_length=seq,
            micro_batch_size=mbs,
            decoder_seq_length=seq,
            forward_only=forward_only,
        )
        return self._reduce_metrics(store)

    def _reduce_metrics(self, store: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
        """Sum metric tensors over micro-batches and data-parallel ranks; every rank gets them.

        Only the last pipeline stage has losses, and tensor-parallel replicas hold the same
        values, so one rank per replica group contributes."""
        from megatron.core import parallel_state as ps

        keys = sorted({k for d in store for k in d})
        names = list(self.objective.metric_names) + [f"tokens_ds{i}" for i in range(len(self.dataset_names))]
        vec = torch.zeros(len(names), dtype=torch.float64)
        contributes = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
        if contributes:
            for d in store:
                for i, name in enumerate(names):
                    if name in d:
                        vec[i] += float(d[name])
        unknown = [k for k in keys if k not in names]
        if unknown:
            raise RuntimeError(f"objective produced metrics the loop cannot reduce: {unknown}")
        if torch.cuda.is_available():
            vec = vec.cuda()
        dist.all_reduce(vec)
        return dict(zip(names, vec.cpu().tolist()))

    def train_step(self) -> Dict[str, float]:
        """One optimizer step over one global batch; returns the step's metrics.

        ``metrics["skip"]`` says why the update was not applied: None (applied),
        ``"nonfinite"`` (loss or gradient norm NaN/Inf) or ``"loss_scale"`` (fp16 dynamic loss
        scaling found Inf and lowered the scale: routine, not counted against the policy)."""
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        with nvtx_range("forward-backward"):
            sums = self._forward_backward(self.train_iters, forward_only=False)
        metrics = self.objective.finalize_metrics(sums)
        metrics["sums"] = sums
        with nvtx_range("optimizer-step"):
            skip, grad_norm = self._optimizer_step(metrics["loss"])
        metrics["skip"] = skip
        metrics["grad_norm"] = grad_norm
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        return metrics

    def _optimizer_step(self, loss: float):
        """megatron-core's ``optimizer.step()`` split open so the finiteness check sits between
        the gradient norm and the update (megatron-core's own step only reacts to the fp16
        loss scaler's inf check and applies a NaN gradient otherwise).

        Returns (skip reason or None, grad norm). The norm is megatron-core's (reduced over the
        model-parallel / distributed-optimizer ranks); the finite flag combines it with the
        globally reduced loss and is min-reduced over the world (one scalar) so every rank
        takes the same branch. The scheduler steps only with an applied update."""
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        opt = self.optimizer
        if opt.prepare_grads():  # model grads -> fp32 main grads; fp16: unscale, inf check, scaler update
            return "loss_scale", None
        grad_norm = opt.get_grad_norm()
        grad_norm = None if grad_norm is None else float(grad_norm)
        finite = math.isfinite(loss) and grad_norm is not None and math.isfinite(grad_norm)
        flag = torch.tensor([1.0 if finite else 0.0], dtype=torch.float32)
        if torch.cuda.is_available():
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() < 1.0:
            return "nonfinite", grad_norm
        for o in getattr(opt, "chained_optimizers", [opt]):  # as ChainedOptimizer.step clips
            if getattr(o, "is_stub_optimizer", False) or o.config.clip_grad <= 0.0:
                continue
            params = o.get_parameters()
            if params:
                clip_grad_by_total_norm_fp32(params, max_norm=o.config.clip_grad, total_norm=grad_norm,
                                             use_decoupled_grad=o.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        if not opt.step_with_ready_grads():
            return "nonfinite", grad_norm
        self.scheduler.step(increment=1)
        return None, grad_norm

    def evaluate(self) -> Dict[str, float]:
        """The objective's finalized metrics over ``training.eval_steps`` global batches of
        validation data (the same ones every time): loss, and e.g. held-out preference accuracy."""
        t = self.cfg.training
        for m in self.model:
            m.eval()
        its = self._iterators(self.valid_ds, t.eval_steps * t.global_batch_size, 0)
        total: Dict[str, float] = {}
        with torch.no_grad():
            for _ in range(t.eval_steps):
                for key, value in self._forward_backward(its, forward_only=True).items():
                    total[key] = total.get(key, 0.0) + value
        for m in self.model:
            m.train()
        return self.objective.finalize_metrics(total)

    def request_stop(self, exit_code: int, reason: str) -> None:
        """Ask the loop to checkpoint and stop after the current step (for callbacks)."""
        self._stop = (exit_code, reason)

    # -------------------------------------------------------------------------------- run
    def save(self) -> Optional[Path]:
        """Checkpoint the current state (all ranks must call); None when checkpoints are off.

        The checkpoint of this iteration that this run wrote or started from is returned as
        it is (a complete checkpoint is never overwritten). Non-finite state is not written:
        NonFiniteLossError, and every older checkpoint stays (retention did not run)."""
        c = self.cfg.checkpoint
        if not c.enabled:
            return None
        final = ckpt_lib.checkpoint_root(c.dir) / f"iter_{self.state.iteration:07d}"
        ours = {self._saved_path, self.start_ckpt}
        if (final / ckpt_lib.META).is_file() and any(p is not None and Path(p).resolve() == final.resolve()
                                                     for p in ours):
            return final
        # Before the first step the optimizer holds no state: such a checkpoint is weights only.
        with_optimizer = c.save_optimizer and self.state.iteration > 0
        try:
            with nvtx_range("checkpoint"):
                path = ckpt_lib.save_checkpoint(c.dir, self.state, self.model, self.optimizer, self.scheduler,
                                                self.cfg.to_yaml(), save_optimizer=with_optimizer, keep=c.keep,
                                                protect=[self.start_ckpt])
        except ckpt_lib.NonFiniteStateError as exc:
            newest = ckpt_lib.latest_checkpoint(c.dir)
            raise NonFiniteLossError(f"{exc}; the newest complete checkpoint is {newest}") from None
        self._saved_path = path
        print_rank0(f"saved checkpoint {path}")
        return path

    def fit(self) -> ckpt_lib.TrainState:
        """Train until ``training.steps``; checkpoint at the interval and at the end."""
        cfg, t = self.cfg, self.cfg.training
        tokens_per_step = t.global_batch_size * self.objective.sequences_per_sample * cfg.data.seq_length
        if len(self.state.source_tokens) != len(self.dataset_names):
            self.state.source_tokens = [0.0] * len(self.dataset_names)
        ds_tokens = self.state.source_tokens  # updated in place, saved with the checkpoint
        world = self.env.world_size
        precision = mfu_precision(self.tf_config, self.dtype)  # fixed for the run
        for m in self.model:
            m.train()
        for cb in self.callbacks:
            cb.on_train_start(self)
        consecutive_skips = 0
        while self.state.iteration < t.steps:
            for cb in self.callbacks:
                cb.on_step_start(self, self.state.iteration + 1)
            start = time.perf_counter()
            try:
                metrics = self.train_step()
            except Exception as exc:  # e.g. torch.OutOfMemoryError: let callbacks record it
                for cb in self.callbacks:
                    cb.on_exception(self, exc)
                raise
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            sums = metrics.pop("sums")
            skip = metrics.pop("skip")
            # A skipped step still consumes its batch: the data position advances, as in Megatron-LM.
            self.state.iteration += 1
            self.state.consumed_train_samples += t.global_batch_size
            if skip is not None:
                self.state.skipped_steps += 1
            consecutive_skips = consecutive_skips + 1 if skip == "nonfinite" else 0
            metrics.update(skipped=int(skip is not None), skipped_total=self.state.skipped_steps)
            for i in range(len(ds_tokens)):
                ds_tokens[i] += sums.get(f"tokens_ds{i}", 0.0)
            metrics.update(
                step_time=elapsed,
                tokens_per_s=tokens_per_step / elapsed,
                tokens_per_s_per_gpu=tokens_per_step / elapsed / world,
                peak_mem_gib=peak_memory_gib(),
                consumed_samples=self.state.consumed_train_samples,
            )
            metrics["mfu"] = mfu(metrics["tokens_per_s_per_gpu"], self.flops_token, self.gpu, precision)
            if len(ds_tokens) > 1:
                total = sum(ds_tokens) or 1.0
                for i, name in enumerate(self.dataset_names):
                    metrics[f"share/{name}"] = ds_tokens[i] / total
            step = self.state.iteration
            if self.writer is not None:
                self.writer.write(step, metrics)
            if step % cfg.logging.interval == 0 or step == 1 or step == t.steps:
                line = format_line(step, t.steps, metrics)
                line += "".join(f" | {k} {metrics[k]:.4f}" for k in self.objective.log_keys if k in metrics)
                if len(ds_tokens) > 1:
                    line += " | share " + ", ".join(
                        f"{n} {100 * metrics[f'share/{n}']:.1f}%" for n in self.dataset_names)
                print_rank0(line)
            if skip == "nonfinite":
                self._on_nonfinite(metrics, consecutive_skips)
            if t.eval_interval and (step % t.eval_interval == 0 or step == t.steps):
                val = self.evaluate()
                shown = ["loss"] + [k for k in ("ppl",) + tuple(self.objective.log_keys) if k in val]
                print_rank0(f"validation at step {step}: " + " | ".join(f"{k} {val[k]:.4f}" for k in shown))
                if self.writer is not None:
                    self.writer.write(step, val, prefix="valid")
            for cb in self.callbacks:
                cb.on_step_end(self, step, metrics)
            if self._stop is not None and step != t.steps:
                self._finish()
                raise StopTraining(*self._stop)
            if cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0 and step != t.steps:
                self.save()
        self._finish()
        return self.state

    def _finish(self) -> None:
        """Final checkpoint, callbacks' end hooks, close the metric sinks."""
        self.save()
        for cb in self.callbacks:
            cb.on_train_end(self)
        if self.writer is not None:
            self.writer.close()
        self.run_lock.release()

    def _on_nonfinite(self, metrics: Dict[str, float], consecutive: int) -> None:
        """Apply the non-finite policy after a skipped step (see the module docstring)."""
        t = self.cfg.training
        what = f"loss is {metrics['loss']}, grad_norm {metrics['grad_norm']} at step {self.state.iteration}"
        if consecutive <= t.max_skipped_steps or not t.exit_on_nonfinite:
            print_rank0(f"warning: {what}: update skipped ({consecutive} in a row, "
                        f"{self.state.skipped_steps} in all; training.max_skipped_steps={t.max_skipped_steps}, "
                        f"exit_on_nonfinite={t.exit_on_nonfinite})")
            return
        path = self.save()
        raise NonFiniteLossError(
            f"{what}; {consecutive} consecutive step(s) skipped, more than training.max_skipped_steps="
            f"{t.max_skipped_steps}. The update was not applied"
            + (f" and the state (finite, data position after the skipped batch) saved to {path}" if path else "")
            + ". Lower optimizer.lr, check the data, or resume from an earlier checkpoint."
        )
