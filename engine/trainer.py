"""The training loop: megatron-core model, DDP, optimizer and schedule, driven by an objective.

``Trainer(cfg).fit()`` is the whole run: the step, the counters (iteration, consumed samples,
skipped steps, tokens per source) and the hooks of the callbacks (:mod:`engine.callbacks`),
which do everything else: throughput and MFU, the log line, metric files, validation,
checkpoint cadence and the final checkpoint, signals, profiling. A user's own callbacks are
passed to ``Trainer(cfg, callbacks=[...])``. One step is readable in ``train_step``: zero the
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
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from engine import checkpoint as ckpt_lib
from engine.callbacks import Callback, build_callbacks
from engine.config import Config, ConfigError
from engine.data import gpt_data
from engine.data.builders import build_training_data
from engine.metrics import print_rank0
from engine.objectives import build_objective
from engine.optim import apply_adam_implementation, build_optimizer, build_scheduler
from engine.optimization import modelopt_state
from engine.optimization.lora import LoraWeights, is_base_key
from engine.precision import resolve_fp8
from engine.profiling import NvtxIterator, nvtx_range
from engine.run_config import validate_run
from engine.run_lock import acquire_for_run
from models.build import build_gpt_chunks, resolve_dtype
from parallel.setup import describe_layout, init_distributed, init_model_parallel, world_size_from_env

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


@dataclass
class StepOutput:
    """What one ``Trainer.train_step`` produced."""

    metrics: Dict[str, Optional[float]]
    """Flat: the objective's finalized metrics (``loss``, ...), ``grad_norm`` and ``lr``."""
    sums: Dict[str, float]
    """The globally reduced metric sums they were finalized from, with ``tokens_ds<i>`` (the
    tokens of data source i in this batch)."""
    skip: Optional[str]
    """Why the update was not applied: None (applied), ``"nonfinite"`` (loss or gradient norm
    NaN/Inf) or ``"loss_scale"`` (fp16 dynamic loss scaling found Inf and lowered the scale:
    routine, not counted against the non-finite policy)."""


class Trainer:
    """Builds every component from the config, then trains (``fit``).

    ``callbacks``: the caller's own :class:`~engine.callbacks.Callback` objects, called after
    the built-in ones at every hook."""

    def __init__(self, cfg: Config, callbacks: Sequence[Callback] = ()):
        self.cfg = cfg
        # Sizes are checked against the launcher's world size before any group exists.
        validate_run(cfg, world_size_from_env())
        self.env = init_distributed(cfg.parallel)
        # Before anything is written to the run directory: one job per directory.
        self.run_lock = acquire_for_run(cfg.checkpoint.dir, cfg.checkpoint.lock)
        init_model_parallel(cfg.parallel, cfg.training.seed)
        self._build()
        self.callbacks: List[Callback] = build_callbacks(cfg, callbacks)

    # ----------------------------------------------------------------------------- setup
    def _build(self) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )

        cfg = self.cfg
        self.dtype = resolve_dtype(cfg.precision.dtype)
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.num_micro = cfg.training.global_batch_size // (cfg.training.micro_batch_size * self.dp_size)

        print_rank0("resolved config:\n" + cfg.to_yaml())
        # Before the model: an objective may wrap the chunks (distillation adds its teacher).
        self.objective = build_objective(cfg)
        built = build_gpt_chunks(cfg, self.dtype, fp8=resolve_fp8(cfg))
        self.tf_config = built.config
        print_rank0(f"layers: {built.spec_description}; dtype {self.dtype}; device {self.env.device}")
        # LoRA: adapters before DDP, so its buffers and the optimizer hold only them.
        self.lora: Optional[LoraWeights] = None
        if cfg.finetune.lora is not None:
            self.lora = LoraWeights(cfg)
            print_rank0(self.lora.apply(built.chunks))
        print_rank0(
            f"layout: {describe_layout()} (world {self.env.world_size}, dp {self.dp_size}, micro-batches/step {self.num_micro})"
        )

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=cfg.precision.grad_reduce_in_fp32,
            overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
            overlap_param_gather=cfg.parallel.overlap_param_gather,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
            # Per-token loss: gradients are summed, then divided by the global token count.
            average_in_collective=False,
        )
        source = self._select_source()
        chunks = self._restore_quantizers(built.chunks, source[0])
        self.model: List[DistributedDataParallel] = []
        for i, chunk in enumerate(self.objective.wrap_model(chunks)):
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
        self._maybe_load(*source)
        adam = apply_adam_implementation(cfg, self.optimizer)  # a loaded state brings the saved flags
        print_rank0(f"optimizer: torch AdamW ({adam}) unless TE/apex FusedAdam is installed")

        self._build_data()
        self._stop: Optional[Tuple[int, str]] = None  # (exit code, reason) of a requested stop
        self._saved_path: Optional[Path] = None
        self._consecutive_skips = 0
        self.callbacks = []  # set by __init__ after the build (prepare runs without hooks)
        self.objective.prepare(self)

    def _select_source(self) -> Tuple[Optional[Path], bool, bool]:
        """The checkpoint this run starts from: (path or None, whether it is resumed in full
        rather than weights only, whether it was verified already). Chosen before the model is
        wrapped, since a quantized checkpoint changes the model the optimizer is built for."""
        cfg = self.cfg.checkpoint
        source: Optional[Path] = None
        full = verified = False
        if cfg.load:
            source, full = Path(cfg.load), True
        elif cfg.resume:
            source, full = ckpt_lib.select_resume_checkpoint(cfg.dir, cfg.fallback_on_corrupt), True
            verified = source is not None
            if source is None:
                print_rank0(f"resume: no complete checkpoint in {cfg.dir}; starting from scratch")
        if source is None and cfg.init_from:
            source, full = Path(cfg.init_from), False
        if source is None and cfg.init_from_hf:
            from engine.hf_import import init_from_hf_checkpoint

            source, full = init_from_hf_checkpoint(self.cfg), False
        return source, full, verified

    def _restore_quantizers(self, chunks: List[torch.nn.Module], source: Optional[Path]) -> List[torch.nn.Module]:
        """Quantization-aware training (``precision.qat``): the starting checkpoint must be
        quantized to that format, and its modelopt quantizers are restored into the bare
        chunks here, before DDP and the optimizer see them. Any mismatch between the run's
        ``precision.qat`` and the checkpoint's is refused in one line (ConfigError)."""
        wanted = self.cfg.precision.qat
        if source is not None and not (source / ckpt_lib.META).is_file():
            return chunks  # not a complete checkpoint: _maybe_load says so
        saved = modelopt_state.quantization_format(source) if source is not None else None
        if wanted != saved:
            if source is None:
                raise ConfigError(
                    f"precision.qat={wanted} fine-tunes a quantized model: set checkpoint.init_from to a "
                    f"checkpoint written by `python -m engine quantize --format {wanted}`"
                )
            if saved is None:
                raise ConfigError(
                    f"precision.qat={wanted} but {source} is not quantized; quantize it first "
                    f"(python -m engine quantize {source} OUT --format {wanted} ...)"
                )
            if wanted is None:
                raise ConfigError(
                    f"{source} is a quantized ({saved}) model: set precision.qat={saved} to train it "
                    "through its quantizers"
                )
            raise ConfigError(f"precision.qat={wanted} but {source} is quantized as {saved}")
        if wanted is None or source is None:
            return chunks
        chunks = modelopt_state.restore(chunks, source)
        print_rank0(f"quantization-aware training: {wanted} quantizers restored from {source}")
        return chunks

    def _maybe_load(self, source: Optional[Path], full: bool, verified: bool) -> None:
        """Resume, load or initialise from ``source`` (``_select_source``), after the timeline checks.

        Refused (CheckpointError, before anything is written): resuming/loading a checkpoint
        whose iteration is beyond ``training.steps``, and any run whose ``checkpoint.dir``
        holds complete checkpoints newer than the iteration it starts from (they belong to
        another timeline that this run would interleave with and prune)."""
        self.start_ckpt: Optional[Path] = None
        start = 0
        if source is not None and full and (source / ckpt_lib.META).is_file():
            start = ckpt_lib.read_meta(source)["iteration"]
            if self.cfg.training.steps < start:
                raise ckpt_lib.CheckpointError(
                    f"training.steps={self.cfg.training.steps} is behind the checkpoint {source} (iteration "
                    f"{start}): resuming would rewrite its timeline. Set training.steps >= {start}, or start "
                    "a new run (another checkpoint.dir, with checkpoint.init_from for its weights)"
                )
        self._check_timeline(start)
        if source is None:
            return
        self.start_ckpt = source if full else None
        if self.lora is not None:
            self.state = self.lora.load(source, full, self.model, self.optimizer, self.scheduler, verify=not verified)
        else:
            self.state = ckpt_lib.load_checkpoint(
                source, self.model, self.optimizer, self.scheduler, load_optimizer=full, verify=not verified
            )
        if not full:
            self.state.lineage = ckpt_lib.read_meta(source).get("lineage", []) + [
                {
                    "init_from": str(source),
                    "iteration": ckpt_lib.read_meta(source)["iteration"],
                    "objective": ckpt_lib.checkpoint_objective(source),
                }
            ]
        what = "resumed" if full else "initialised weights"
        print_rank0(
            f"{what} from {source} (iteration {self.state.iteration}, "
            f"consumed samples {self.state.consumed_train_samples})"
        )

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
                "(checkpoint.resume=true), or delete them"
            )

    def _build_data(self) -> None:
        cfg, t = self.cfg, self.cfg.training
        train_samples = max(t.steps, 1) * t.global_batch_size
        valid_samples = t.eval_steps * t.global_batch_size if t.eval_interval > 0 else 0
        data = build_training_data(self.objective.data_kind, cfg, train_samples, valid_samples)
        self.train_ds, self.valid_ds, self.dataset_names = data.train, data.valid, data.source_names
        self.train_iters = self._iterators(self.train_ds, train_samples, self.state.consumed_train_samples)

    def _iterators(self, dataset, total: int, consumed: int):
        """One iterator per model chunk (interleaved pipelining reads data per chunk)."""
        sampler = gpt_data.MicroBatchSampler(
            total, consumed, self.cfg.training.micro_batch_size, self.dp_rank, self.dp_size
        )
        its = [
            NvtxIterator(gpt_data.micro_batches(dataset, sampler, self.cfg.data.num_workers, self.env.device))
            for _ in self.model
        ]
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
            **self.objective.schedule_kwargs(self.model, seq, mbs),
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

    def train_step(self) -> StepOutput:
        """One optimizer step over one global batch (step ``state.iteration + 1``): the
        forward-backward pass, the callbacks' ``pre_optim_step``, the optimizer step. The
        counters are not advanced here (``fit`` does that)."""
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        with nvtx_range("forward-backward"):
            sums = self._forward_backward(self.train_iters, forward_only=False)
        metrics = self.objective.finalize_metrics(sums)
        self._hook("pre_optim_step", self.state.iteration + 1, metrics)
        with nvtx_range("optimizer-step"):
            skip, grad_norm = self._optimizer_step(metrics["loss"])
        # grad_norm is None when fp16 loss scaling skipped the step.
        step_metrics: Dict[str, Optional[float]] = {
            **metrics,
            "grad_norm": grad_norm,
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        return StepOutput(step_metrics, sums, skip)

    def _optimizer_step(self, loss: float) -> Tuple[Optional[str], Optional[float]]:
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
                clip_grad_by_total_norm_fp32(
                    params,
                    max_norm=o.config.clip_grad,
                    total_norm=grad_norm,
                    use_decoupled_grad=o.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
                )
        if not opt.step_with_ready_grads():
            return "nonfinite", grad_norm
        self.scheduler.step(increment=1)
        return None, grad_norm

    def forward_only(self, dataset, num_samples: int) -> Dict[str, float]:
        """Forward passes without gradients (model in eval mode, back in train mode after)
        over samples ``0 .. num_samples-1`` of ``dataset`` in order, in global batches
        (``num_samples`` a multiple of ``training.global_batch_size``; data-parallel ranks
        take interleaved micro-batches). Returns the objective's metric sums over all of
        them, reduced over ranks (every rank gets them). The objective's loss functions run
        as in training, so an objective can collect per-sample values there (DPO's reference
        pass does)."""
        gbs = self.cfg.training.global_batch_size
        if num_samples % gbs:
            raise ValueError(f"forward_only: {num_samples} samples is not a whole number of global batches of {gbs}")
        its = self._iterators(dataset, num_samples, 0)
        total: Dict[str, float] = {}
        for m in self.model:
            m.eval()
        try:
            with torch.no_grad():
                for _ in range(num_samples // gbs):
                    for key, value in self._forward_backward(its, forward_only=True).items():
                        total[key] = total.get(key, 0.0) + value
        finally:
            for m in self.model:
                m.train()
        return total

    def evaluate(self, dataset=None, steps: Optional[int] = None) -> Dict[str, float]:
        """The objective's finalized metrics over ``steps`` (default ``training.eval_steps``)
        global batches of ``dataset`` (default: the validation data; the same batches every
        time): loss, and e.g. held-out preference accuracy."""
        t = self.cfg.training
        steps = t.eval_steps if steps is None else steps
        sums = self.forward_only(self.valid_ds if dataset is None else dataset, steps * t.global_batch_size)
        return self.objective.finalize_metrics(sums)

    def load_weights(self, path) -> None:
        """Load the model weights of the complete checkpoint ``path`` (any TP/PP layout,
        verified against its manifest) into this run's model; the optimizer's master copies
        follow them. Optimizer state, scheduler and progress are not touched. With LoRA only
        the base weights are read (the adapters keep their values)."""
        keys = is_base_key if self.lora is not None else None
        ckpt_lib.load_checkpoint(Path(path), self.model, self.optimizer, load_optimizer=False, model_keys=keys)

    # -------------------------------------------------------------------------- callbacks
    def request_stop(self, exit_code: int, reason: str) -> None:
        """Ask the loop to checkpoint and stop after the current step (for callbacks)."""
        self._stop = (exit_code, reason)

    @property
    def stop_requested(self) -> bool:
        """Whether a callback asked the run to stop after the current step."""
        return self._stop is not None

    def log_metrics(self, step: int, metrics: Mapping[str, Optional[float]], split: str = "train") -> None:
        """Hand ``metrics`` of ``step`` to every callback's ``log_metrics`` (console, files, ...)."""
        self._hook("log_metrics", step, metrics, split)

    def _hook(self, name: str, *args) -> None:
        """Call hook ``name`` on every callback, in order."""
        for cb in self.callbacks:
            getattr(cb, name)(self, *args)

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
        if (final / ckpt_lib.META).is_file() and any(
            p is not None and Path(p).resolve() == final.resolve() for p in ours
        ):
            return final
        # Before the first step the optimizer holds no state: such a checkpoint is weights only.
        with_optimizer = c.save_optimizer and self.state.iteration > 0
        try:
            with nvtx_range("checkpoint"):
                path = ckpt_lib.save_checkpoint(
                    c.dir,
                    self.state,
                    self.model,
                    self.optimizer,
                    self.scheduler,
                    self.cfg.to_yaml(),
                    save_optimizer=with_optimizer,
                    keep=c.keep,
                    protect=[self.start_ckpt],
                    **(self.lora.save_options() if self.lora is not None else {}),
                )
        except ckpt_lib.NonFiniteStateError as exc:
            newest = ckpt_lib.latest_checkpoint(c.dir)
            raise NonFiniteLossError(f"{exc}; the newest complete checkpoint is {newest}") from None
        self._saved_path = path
        print_rank0(f"saved checkpoint {path}")
        return path

    def fit(self) -> ckpt_lib.TrainState:
        """Train until ``training.steps``: the step, the counters and the hooks (their order is
        in :mod:`engine.callbacks.base`). A stop asked for by a callback ends the run after the
        step, with the final checkpoint and ``on_train_end``, by raising StopTraining."""
        t = self.cfg.training
        if len(self.state.source_tokens) != len(self.dataset_names):
            self.state.source_tokens = [0.0] * len(self.dataset_names)
        for m in self.model:
            m.train()
        try:
            self._hook("on_train_start")
            while self.state.iteration < t.steps:
                step = self.state.iteration + 1
                self._hook("on_step_start", step)
                out = self.train_step()
                metrics = self._advance(out)
                self._hook("record_metrics", step, metrics)
                self.log_metrics(step, metrics)
                if out.skip == "nonfinite":  # after the log: the skipped step is recorded before a stop
                    self._on_nonfinite(metrics)
                self._hook("on_step_end", step, metrics)
                if self._stop is not None and step != t.steps:
                    self._finish()
                    raise StopTraining(*self._stop)
            self._finish()
        except StopTraining:
            raise
        except Exception as exc:  # e.g. torch.OutOfMemoryError: let callbacks record it
            self._on_error(exc)
            raise
        return self.state

    def _advance(self, out: StepOutput) -> Dict[str, Optional[float]]:
        """Advance the counters after a step; returns the step's flat metrics with them.

        A skipped step still consumes its batch: the data position advances, as in Megatron-LM.
        ``state.source_tokens`` (tokens per data source) is saved with the checkpoint."""
        s = self.state
        s.iteration += 1
        s.consumed_train_samples += self.cfg.training.global_batch_size
        if out.skip is not None:
            s.skipped_steps += 1
        self._consecutive_skips = self._consecutive_skips + 1 if out.skip == "nonfinite" else 0
        for i in range(len(s.source_tokens)):
            s.source_tokens[i] += out.sums.get(f"tokens_ds{i}", 0.0)
        return {
            **out.metrics,
            "skipped": int(out.skip is not None),
            "skipped_total": s.skipped_steps,
            "consumed_samples": s.consumed_train_samples,
        }

    def _finish(self) -> None:
        """End of the run: ``pre_train_end`` (the final checkpoint), ``on_train_end`` (metric
        sinks closed, signal handlers restored, ...), then the run directory is unlocked."""
        self._hook("pre_train_end")
        self._hook("on_train_end")
        self.run_lock.release()

    def _on_error(self, exc: BaseException) -> None:
        """Every callback's ``on_error``; one that fails itself is logged, so ``exc`` is what propagates."""
        for cb in self.callbacks:
            try:
                cb.on_error(self, exc)
            except Exception:  # noqa: BLE001 - the run's own error matters more
                log.exception("callback %s failed in on_error", type(cb).__name__)

    def _on_nonfinite(self, metrics: Dict[str, Optional[float]]) -> None:
        """Apply the non-finite policy after a skipped step (see the module docstring).

        Part of the step rather than a callback: it decides whether the run may go on, and
        a callback list without it would silently train through NaNs."""
        t = self.cfg.training
        consecutive = self._consecutive_skips
        what = f"loss is {metrics['loss']}, grad_norm {metrics['grad_norm']} at step {self.state.iteration}"
        if consecutive <= t.max_skipped_steps or not t.exit_on_nonfinite:
            print_rank0(
                f"warning: {what}: update skipped ({consecutive} in a row, "
                f"{self.state.skipped_steps} in all; training.max_skipped_steps={t.max_skipped_steps}, "
                f"exit_on_nonfinite={t.exit_on_nonfinite})"
            )
            return
        path = self.save()
        raise NonFiniteLossError(
            f"{what}; {consecutive} consecutive step(s) skipped, more than training.max_skipped_steps="
            f"{t.max_skipped_steps}. The update was not applied"
            + (f" and the state (finite, data position after the skipped batch) saved to {path}" if path else "")
            + ". Lower optimizer.lr, check the data, or resume from an earlier checkpoint."
        )
