"""Minitron width and depth pruning through nvidia-modelopt (``mcore_minitron``).

``prune_checkpoint`` loads a checkpoint on one process (TP=PP=1: modelopt's Minitron asserts
it), runs calibration windows through it so modelopt ranks hidden channels, attention heads,
FFN channels, experts and layers by their activations, keeps the best ones at the requested
sizes (``mtp.prune`` with an ``export_config``), and writes the result as a normal engine
checkpoint whose ``config.yaml`` carries the new sizes.

The glue around modelopt:

- the engine's torch-native layers (SDPA attention, torch norms) are registered with
  modelopt (``engine.optimization.prune_plugins``);
- every divisor is 1, so a target is taken exactly (modelopt's defaults, hidden 256 and FFN
  512, turn any target below them into a silent no-op on small models); targets are checked
  here instead, against the layout the checkpoint trains at;
- gloo cannot all-gather the 0-d tensor modelopt's layer dropping gathers;
- the pruned weights are loaded into a model built afresh from the new config (strictly: a
  config that does not describe the weights fails there), which also numbers the MoE
  routers after the kept layers (modelopt renumbers the layers, not their routers) and
  leaves no modelopt state behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from engine.config import Config, ConfigError, ModelConfig, ParallelConfig

INSTALL_HINT = "pruning needs nvidia-modelopt: pip install -e .[opt]"

REPORT = "prune_report.json"

TARGET_HPARAMS = {
    "hidden": "hidden_size",
    "ffn": "ffn_hidden_size",
    "heads": "num_attention_heads",
    "layers": "num_layers",
    "experts": "num_moe_experts",
}
"""``--target`` keys and the modelopt hparam each sets (``ffn`` of an MoE model is the
expert width, ``moe_ffn_hidden_size``)."""


@dataclass(frozen=True)
class PruneTargets:
    """The sizes to prune to; None keeps a dimension as it is."""

    hidden: Optional[int] = None
    """Model width (``hidden_size``)."""
    ffn: Optional[int] = None
    """MLP width: ``ffn_hidden_size``, or each expert's (``moe_ffn_hidden_size``) in an MoE model."""
    heads: Optional[int] = None
    """Query heads (the key/value groups are kept)."""
    layers: Optional[int] = None
    """Transformer layers (the lowest-scoring ones are dropped)."""
    experts: Optional[int] = None
    """Experts per MoE layer."""

    @classmethod
    def parse(cls, text: str) -> "PruneTargets":
        """``hidden=48,ffn=96,...`` -> targets; ConfigError (one line) for anything else."""
        values: Dict[str, int] = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in TARGET_HPARAMS:
                raise ConfigError(f"--target {item!r}: expected KEY=SIZE with KEY one of {', '.join(TARGET_HPARAMS)}")
            if key in values:
                raise ConfigError(f"--target names {key} twice")
            try:
                size = int(value)
            except ValueError:
                raise ConfigError(f"--target {key}={value.strip()!r}: the size must be a whole number") from None
            if size < 1:
                raise ConfigError(f"--target {key}={size}: the size must be at least 1")
            values[key] = size
        if not values:
            raise ConfigError(f"--target names no size; give one or more of {', '.join(TARGET_HPARAMS)} as KEY=SIZE")
        return cls(**values)

    def items(self) -> Dict[str, int]:
        """The dimensions given, by ``--target`` key."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def require_modelopt() -> None:
    """ConfigError naming the extra to install when nvidia-modelopt is absent."""
    try:
        import modelopt.torch.prune  # noqa: F401
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None


def check_targets(model: ModelConfig, parallel: ParallelConfig, targets: PruneTargets) -> None:
    """ConfigError (one line) for a target the model cannot be pruned to, or that the layout
    the checkpoint trains at (``parallel``) could not shard."""
    current = {
        "hidden": model.hidden_size,
        "ffn": model.expert_ffn_hidden_size if model.num_experts else model.ffn_hidden_size,
        "heads": model.num_attention_heads,
        "layers": model.num_layers,
        "experts": model.num_experts,
    }
    if targets.experts is not None and not model.num_experts:
        raise ConfigError("--target experts: the model is dense (model.num_experts = 0)")
    for key, size in targets.items().items():
        if size > current[key]:
            raise ConfigError(f"--target {key}={size}: larger than the model's {current[key]} (pruning only shrinks)")
    groups = model.query_groups
    need = {
        "ffn": (parallel.tensor, "parallel.tensor"),
        "heads": (parallel.tensor, "parallel.tensor"),
        "layers": (parallel.pipeline * (parallel.virtual_pipeline or 1), "parallel.pipeline x virtual_pipeline"),
        "experts": (parallel.expert, "parallel.expert"),
    }
    for key, (divisor, name) in need.items():
        size = getattr(targets, key)
        if size is not None and size % divisor:
            raise ConfigError(
                f"--target {key}={size}: not divisible by {name} ({divisor}), the layout the checkpoint trains at"
            )
    if targets.heads is not None and targets.heads % groups:
        raise ConfigError(
            f"--target heads={targets.heads}: must be a multiple of the model's {groups} key/value groups "
            "(Minitron prunes query heads within each group)"
        )
    if targets.experts is not None and targets.experts < model.moe_router_topk:
        raise ConfigError(
            f"--target experts={targets.experts}: fewer than the {model.moe_router_topk} experts each token is routed to"
        )


def export_config(model: ModelConfig, targets: PruneTargets) -> Dict[str, int]:
    """modelopt's ``export_config`` constraint (hparam name -> size) for ``targets``."""
    names = dict(TARGET_HPARAMS, ffn="moe_ffn_hidden_size" if model.num_experts else "ffn_hidden_size")
    return {names[k]: v for k, v in targets.items().items()}


def pruned_model_config(model: ModelConfig, targets: PruneTargets, kept_layers: List[int]) -> ModelConfig:
    """``model`` at the target sizes after keeping ``kept_layers`` (1-based, in order).

    Head dimension and key/value groups are written out, since their defaults derive from
    the sizes that changed. A sliding-window pattern is re-expressed over the kept layers;
    ConfigError when ``model.sliding_window_layers`` cannot express it."""
    fields: Dict[str, Any] = dict(kv_channels=model.head_dim, num_query_groups=model.query_groups)
    if targets.hidden is not None:
        fields["hidden_size"] = targets.hidden
    if targets.heads is not None:
        fields["num_attention_heads"] = targets.heads
    if targets.ffn is not None:
        fields["moe_ffn_hidden_size" if model.num_experts else "ffn_hidden_size"] = targets.ffn
    if targets.experts is not None:
        fields["num_experts"] = targets.experts
    fields["num_layers"] = len(kept_layers)
    windows = model.window_layers()
    if windows is not None:
        kept = [windows[n - 1] for n in kept_layers]
        if not any(kept):
            fields["sliding_window"] = 0
        else:
            for pattern in ("all", "even", "odd"):
                candidate = dataclasses.replace(model, sliding_window_layers=pattern, num_layers=len(kept))
                if candidate.window_layers() == kept:
                    fields["sliding_window_layers"] = pattern
                    break
            else:
                raise ConfigError(
                    f"keeping layers {kept_layers} leaves sliding-window attention on layers "
                    f"{[i for i, w in enumerate(kept) if w]} of {len(kept)}, which model.sliding_window_layers "
                    "(all/even/odd) cannot express; choose another --target layers"
                )
    return dataclasses.replace(model, **fields)


@contextlib.contextmanager
def _gloo_scalar_all_gather() -> Iterator[None]:
    """While active, ``all_gather_into_tensor`` of a 0-d tensor gathers it as a 1-element one.

    modelopt's ``drop_mcore_language_model_layers`` all-gathers a 0-d layer count over the
    pipeline group, which NCCL accepts and gloo refuses ("invalid tensor size"); the result
    is the same. Restored on exit."""
    import torch.distributed as dist

    original = dist.all_gather_into_tensor

    def gather(output_tensor, input_tensor, group=None, async_op=False):
        flat = input_tensor.reshape(1) if input_tensor.dim() == 0 else input_tensor
        return original(output_tensor, flat, group=group, async_op=async_op)

    dist.all_gather_into_tensor = gather
    try:
        yield
    finally:
        dist.all_gather_into_tensor = original


def minitron_prune(
    model, model_cfg: ModelConfig, targets: PruneTargets, forward_loop: Callable[[Any], None]
) -> List[int]:
    """Prune the ``GPTModel`` ``model`` in place to ``targets`` with modelopt's Minitron,
    scoring on the activations ``forward_loop(model)`` produces. Returns the kept layers
    (1-based numbers in the original model, in order). One process, TP=PP=1."""
    require_modelopt()
    import modelopt.torch.prune as mtp
    from modelopt.torch.prune.plugins.mcore_minitron import get_mcore_minitron_config

    from engine.optimization import prune_plugins

    prune_plugins.register()
    # Divisor 1 everywhere: every size is a choice, so the targets are taken exactly.
    mode_cfg = get_mcore_minitron_config(
        hidden_size_divisor=1, ffn_hidden_size_divisor=1, num_moe_experts_divisor=1, num_layers_divisor=1
    )
    original = model_cfg.num_layers
    with _gloo_scalar_all_gather():
        _, state = mtp.prune(
            model,
            mode=[("mcore_minitron", mode_cfg)],
            constraints={"export_config": export_config(model_cfg, targets)},
            dummy_input=None,
            config={"forward_loop": forward_loop},
        )
    keep = targets.layers or original
    return sorted(state["sorted_layers"][:keep]) if state.get("sorted_layers") else list(range(1, original + 1))


def fresh_model(pruned, cfg: Config, dtype):
    """A ``GPTModel`` built from ``cfg`` (the pruned config) on this process holding the
    weights of ``pruned``, loaded strictly: a config that does not describe the weights fails
    here. Being built afresh, it numbers the MoE routers after the kept layers (modelopt
    renumbers only the layers, so a router would record its auxiliary loss under its old
    layer) and carries no modelopt state."""
    from engine.model_io import single_process_layout
    from models.build import build_gpt_chunks

    (model,) = build_gpt_chunks(single_process_layout(cfg), dtype).chunks
    model.to(next(pruned.parameters()).device)
    model.load_state_dict(pruned.state_dict(), strict=True)
    return model


def parameter_count(model) -> int:
    """Parameters of a single-process ``GPTModel``, a tied output layer counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@dataclass
class PruneResult:
    """What ``prune_checkpoint`` did."""

    checkpoint: Path
    """The pruned checkpoint written."""
    source: Path
    """The checkpoint pruned."""
    targets: Dict[str, int]
    """The ``--target`` sizes."""
    kept_layers: List[int]
    """Layers kept, 1-based numbers in the source model, in order."""
    params_before: int
    """Parameters of the source model."""
    params_after: int
    """Parameters of the pruned model."""
    calib_windows: int
    """Calibration windows scored on."""
    seconds: Dict[str, float]
    """Wall time of loading, scoring + pruning, and saving."""

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready form (the report file)."""
        d = dataclasses.asdict(self)
        d.update(checkpoint=str(self.checkpoint), source=str(self.source))
        return d


def prune_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    targets: PruneTargets,
    calib_data: str,
    calib_samples: int = 64,
    seq_length: Optional[int] = None,
    micro_batch: int = 4,
) -> PruneResult:
    """Prune ``checkpoint`` (or a run directory's newest) to ``targets``, scored on the first
    ``calib_samples`` windows of ``calib_data``, into the run directory ``out``:
    ``out/checkpoints/iter_0000000`` (weights only; its config carries the new sizes and the
    source's training layout) and ``out/prune_report.json``.

    Everything is checked before the model is loaded. Memory: the source model in its
    training dtype plus the pruned one."""
    require_modelopt()

    from engine import checkpoint as ckpt_lib
    from engine import model_io
    from engine.optimization.quantize import calibration_windows, forward_windows
    from engine.process_guard import in_process_write_results
    from engine.run_config import validate_run
    from models.build import resolve_dtype

    if calib_samples < 1 or micro_batch < 1:
        raise ConfigError("--calib-samples and --micro-batch must be at least 1")
    ckpt = model_io.resolve_checkpoint(checkpoint).resolve()  # the lineage names it from anywhere
    out = Path(out)
    if ckpt_lib.list_checkpoints(str(out)):
        raise ConfigError(f"{out} already holds checkpoints; give a new output directory")
    cfg: Config = model_io.checkpoint_config(ckpt)
    check_targets(cfg.model, cfg.parallel, targets)
    seq = seq_length or min(cfg.data.seq_length, cfg.model.max_seq_length)
    if seq > cfg.model.max_seq_length:
        raise ConfigError(f"--seq-length {seq}: longer than the model's max_seq_length {cfg.model.max_seq_length}")
    if cfg.precision.qat:
        raise ConfigError(
            f"{ckpt} is quantized (precision.qat={cfg.precision.qat}): prune the unquantized checkpoint, then quantize"
        )
    # Windows cut as engine.evaluation.perplexity cuts them (quantization calibrates on the same).
    windows = calibration_windows(calib_data, calib_samples, seq)

    seconds: Dict[str, float] = {}
    t = time.perf_counter()
    saved = cfg.precision.dtype
    dtype = resolve_dtype("bf16" if saved == "fp8" else saved)  # FP8 runs keep bf16 weights
    loaded = model_io.load_model(ckpt, dtype)
    model = loaded.model
    params_before = parameter_count(model)
    seconds["load"] = time.perf_counter() - t

    t = time.perf_counter()
    kept = minitron_prune(
        model, cfg.model, targets, lambda m: forward_windows(m, windows, micro_batch, "score for pruning")
    )
    new_cfg = dataclasses.replace(
        cfg,
        model=pruned_model_config(cfg.model, targets, kept),
        checkpoint=dataclasses.replace(cfg.checkpoint, init_from=None, resume=False, load=None),
    )
    validate_run(new_cfg, world_size=new_cfg.parallel.model_parallel)
    plain = [fresh_model(model, new_cfg, dtype)]
    params_after = parameter_count(plain[0])
    del model, loaded
    seconds["prune"] = time.perf_counter() - t

    t = time.perf_counter()
    lineage = ckpt_lib.read_lineage(ckpt) + [
        {
            "init_from": str(ckpt),
            "iteration": 0,
            "objective": "prune",
            "prune": {"targets": targets.items(), "kept_layers": kept, "calib_data": calib_data},
        }
    ]
    with in_process_write_results():  # a synchronous save: no multiprocessing manager left behind
        written = model_io.save_model_checkpoint(out, new_cfg, plain, iteration=0, lineage=lineage)
    seconds["save"] = time.perf_counter() - t
    result = PruneResult(
        checkpoint=written,
        source=ckpt,
        targets=targets.items(),
        kept_layers=kept,
        params_before=params_before,
        params_after=params_after,
        calib_windows=calib_samples,
        seconds=seconds,
    )
    (out / REPORT).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def describe(result: PruneResult) -> List[str]:
    """Lines for the terminal: what was kept, how many parameters, where it went."""
    sizes = ", ".join(f"{k}={v}" for k, v in result.targets.items())
    return [
        f"pruned {result.source} to {sizes} (scored on {result.calib_windows} calibration windows)",
        f"kept layers {result.kept_layers} of the source",
        f"parameters {result.params_before:,} -> {result.params_after:,} "
        f"({100.0 * result.params_after / result.params_before:.1f}%)",
        f"checkpoint {result.checkpoint}",
        f"report {result.checkpoint.parents[1] / REPORT}",
    ]
