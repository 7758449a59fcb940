"""LoRA fine-tuning through nvidia-modelopt's PEFT mode (``modelopt.torch.peft``).

``finetune.lora`` puts a low-rank adapter on the targeted linears of every transformer
layer: ``y = W x + (alpha / rank) * B A dropout(x)``, ``A`` random (Kaiming), ``B`` zero, so
the adapted model starts exactly at the base model. modelopt wraps megatron-core's
Column/RowParallelLinear and shards the adapters the way the base layer is sharded:

- ColumnParallelLinear (``linear_qkv``, ``linear_fc1``): ``A`` replicated over TP ranks,
  ``B`` split along its output rows like ``W``;
- RowParallelLinear (``linear_proj``, ``linear_fc2``): ``A`` split along its input columns
  like ``W`` (its partial outputs are all-reduced), ``B`` replicated.

So on each TP rank the shard of ``B @ A`` has exactly the shape of the local shard of
``W``, which is what ``merge_adapters`` folds in (``W_shard += scale * B_shard @ A_shard``).

The base weights are frozen (modelopt sets ``requires_grad=False``), so megatron-core's DDP
buffers and optimizer only see the adapters; checkpoints hold the adapter tensors only
(``is_adapter_key``) plus ``lora_base`` in ``engine_meta.json``: the base checkpoint's path,
a hash of its manifest (size and CRC-32 of every file) and of its model config. Loading
adapters checks that reference (``check_base``): a missing or different base is refused in
one line. modelopt has no merge/export for PEFT models (``export_peft_model`` raises), hence
``merge_adapters`` here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import zlib
from pathlib import Path
from typing import Any, Dict, Iterator, Sequence

import torch

from engine.ckpt_manifest import MANIFEST
from engine.config import Config, ConfigError, LoraConfig

ADAPTER = "default"
"""Name of the one adapter the engine trains (modelopt's default)."""
META_KEY = "lora_base"
"""Key of the base reference in an adapter checkpoint's ``engine_meta.json``."""
INSTALL_HINT = "finetune.lora and merge-lora need nvidia-modelopt: pip install -e .[opt]"


class LoraBaseError(ConfigError):
    """The base checkpoint of a LoRA adapter checkpoint is missing or is not the one the
    adapters were trained on (one line, the CLI exits 2)."""


def _peft():
    """``modelopt.torch.peft``, or a one-line ConfigError saying what to install."""
    try:
        import modelopt.torch.peft as mtpeft
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return mtpeft


def peft_config(lora: LoraConfig) -> Dict[str, Any]:
    """modelopt's PEFT config for ``lora``: one ``adapter_cfg`` entry per target module.

    Every entry carries ``"enable": True``: modelopt adds no adapter for an entry without it,
    silently (``add_adapter`` skips it)."""
    entry = {"rank": lora.rank, "scale": lora.alpha / lora.rank, "enable": True}
    return {
        "adapter_name": ADAPTER,
        "adapter_type": "lora",
        "adapter_cfg": {f"*.{name}": dict(entry) for name in lora.target_modules},
        "freeze_base_model": True,
        "freeze_lora_weights": False,
    }


def is_adapter_key(key: str) -> bool:
    """Whether a model state key (parameter or extra state) belongs to a LoRA adapter."""
    return any(part.startswith(("lora_a_", "lora_b_")) for part in key.split("."))


def is_base_key(key: str) -> bool:
    """Whether a model state key belongs to the base model (everything but the adapters)."""
    return not is_adapter_key(key)


def lora_modules(chunk: torch.nn.Module) -> Iterator[tuple]:
    """``(name, module, adapter)`` for every linear of ``chunk`` (DDP-wrapped or not) that
    carries the engine's adapter; ``adapter`` is modelopt's dict (lora_a, lora_b, scale...)."""
    for name, module in chunk.named_modules():
        adapters = getattr(module, "_lora_adapters", None)
        if adapters and ADAPTER in adapters:
            yield name, module, adapters[ADAPTER]


def _add_dropout(module: torch.nn.Module, p: float) -> None:
    """Dropout on the input of ``A`` while training (modelopt's LoRA has no dropout)."""

    def hook(mod, args):
        return (torch.nn.functional.dropout(args[0], p=p, training=mod.training), *args[1:])

    module.register_forward_pre_hook(hook)


def _init_a(chunk: torch.nn.Module, seed: int) -> None:
    """Draw every ``A`` from a generator keyed on ``seed``, the global layer number and the
    module's name, as the whole (unsharded) matrix, and keep this rank's shard: the same
    adapters at every TP/PP layout (modelopt draws them from the global RNG stream, whose
    position depends on which layers a pipeline stage builds). Kaiming-uniform over the full
    input width, as modelopt's default ``lora_a_init``."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    for layer in chunk.modules():
        number = getattr(layer, "layer_number", None)
        if not isinstance(number, int) or not hasattr(layer, "mlp"):  # a TransformerLayer
            continue
        for name, module, adapter in lora_modules(layer):
            a = adapter["lora_a"].weight
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{number}.{name}".encode()))
            full = torch.empty(a.shape[0], module.input_size, dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(full, generator=gen)
            width = a.shape[1]  # the full width (replicated A) or this rank's columns (row-parallel)
            start = 0 if width == module.input_size else tp_rank * width
            with torch.no_grad():
                a.copy_(full[:, start : start + width])


def add_adapters(chunks: Sequence[torch.nn.Module], lora: LoraConfig, seed: int = 0) -> int:
    """Put ``lora``'s adapters on every model chunk (before DDP wraps them); returns how many
    linears got one. ``A`` is drawn from ``seed`` independently of the layout, ``B`` is zero.
    Freezes everything else. Raises when a chunk got no adapter (modelopt adds none silently
    when nothing matches) or when anything but the adapters is trainable."""
    mtpeft = _peft()
    count = 0
    for i, chunk in enumerate(chunks):
        configs: Dict[int, Any] = {id(m.config): m.config for m in chunk.modules() if hasattr(m, "config")}
        hetero = {k: getattr(c, "hetereogenous_dist_checkpoint", None) for k, c in configs.items()}
        mtpeft.update_model(chunk, peft_config(lora))
        # modelopt switches megatron's checkpoints to per-layer keys (for models whose layers
        # differ); every layer here gets the same adapters, so the stacked keys of the base
        # checkpoint (and of every other engine checkpoint) stay valid: switch it back.
        for k, c in configs.items():
            if hetero[k] is not None:
                c.hetereogenous_dist_checkpoint = hetero[k]
        found = list(lora_modules(chunk))
        if not found:
            raise RuntimeError(f"modelopt added no LoRA adapter to model chunk {i} (targets {lora.target_modules})")
        _init_a(chunk, seed)
        if lora.dropout > 0:
            for _, _, adapter in found:
                _add_dropout(adapter["lora_a"], lora.dropout)
        wrong = [n for n, p in chunk.named_parameters() if p.requires_grad != is_adapter_key(n)]
        if wrong:
            raise RuntimeError(f"LoRA: trainable parameters other than the adapters (or frozen adapters): {wrong[:3]}")
        count += len(found)
    return count


@contextlib.contextmanager
def adapters_disabled(chunks: Sequence[torch.nn.Module]):
    """Run the frozen base model inside the block (adapters bypassed), e.g. for a reference pass."""
    mtpeft = _peft()
    for chunk in chunks:
        mtpeft.disable_adapters(chunk, adapters_to_disable=[ADAPTER])
    try:
        yield
    finally:
        for chunk in chunks:
            mtpeft.enable_adapters(chunk, adapters_to_enable=[ADAPTER])


@torch.no_grad()
def merge_adapters(chunks: Sequence[torch.nn.Module]) -> int:
    """Fold every adapter into its base weight, per TP shard: ``W += scale * B @ A``
    (computed in float64, then cast to ``W``'s dtype), and bypass the adapter so the module
    computes the same function. Returns how many linears were merged."""
    merged = 0
    for chunk in chunks:
        for _, module, adapter in lora_modules(chunk):
            a = adapter["lora_a"].weight.to(torch.float64)
            b = adapter["lora_b"].weight.to(torch.float64)
            w = module.weight
            delta = adapter["scale"] * (b @ a)
            if delta.shape != w.shape:
                raise RuntimeError(
                    f"LoRA merge: B @ A is {tuple(delta.shape)} but the weight shard is {tuple(w.shape)}"
                )
            w.copy_((w.to(torch.float64) + delta).to(w.dtype))
            adapter["enable"] = False
            merged += 1
    return merged


# ------------------------------------------------------------------------ base reference
def _manifest_digest(ckpt: Path) -> str:
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        raise LoraBaseError(f"LoRA base {ckpt} has no {MANIFEST}: its weights cannot be identified")
    files = json.loads(manifest.read_text())["files"]
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def base_reference(base: str | Path) -> Dict[str, str]:
    """What identifies the base checkpoint ``base``: its resolved path, a hash of its manifest
    (its weights) and of its model config (its architecture)."""
    from engine import checkpoint as ckpt_lib
    from engine.model_io import checkpoint_config, config_hash

    ckpt = Path(base)
    if not (ckpt / ckpt_lib.META).is_file():
        raise LoraBaseError(f"LoRA base checkpoint {ckpt} does not exist or is not a complete checkpoint")
    if ckpt_lib.read_meta(ckpt).get(META_KEY):
        raise LoraBaseError(
            f"LoRA base {ckpt} is itself a LoRA adapter checkpoint; merge it first (python -m engine merge-lora)"
        )
    return {
        "path": str(ckpt.resolve()),
        "manifest_sha256": _manifest_digest(ckpt),
        "config_hash": config_hash(checkpoint_config(ckpt)),
    }


def recorded_base(adapter_ckpt: str | Path) -> Dict[str, str]:
    """The base reference an adapter checkpoint was saved with (ConfigError if it has none)."""
    from engine import checkpoint as ckpt_lib

    ref = ckpt_lib.read_meta(Path(adapter_ckpt)).get(META_KEY)
    if not ref:
        raise ConfigError(f"{adapter_ckpt} is not a LoRA adapter checkpoint (no {META_KEY} in its metadata)")
    return ref


def check_base(adapter_ckpt: str | Path, base: str | Path | None = None) -> Path:
    """The base checkpoint of ``adapter_ckpt`` (``base``, default: the recorded path), after
    checking it is the one the adapters were trained on: LoraBaseError in one line when it is
    missing or its weights or architecture differ."""
    ref = recorded_base(adapter_ckpt)
    path = Path(base) if base is not None else Path(ref["path"])
    if not path.exists():
        raise LoraBaseError(f"the LoRA base checkpoint {path} of {adapter_ckpt} is missing")
    now = base_reference(path)
    for key, what in (("manifest_sha256", "weights"), ("config_hash", "model config")):
        if now[key] != ref[key]:
            raise LoraBaseError(
                f"{path} is not the base the adapters in {adapter_ckpt} were trained on: its {what} differ "
                f"({key} {now[key]}, recorded {ref[key]} for {ref['path']})"
            )
    return path


def trainable_summary(chunks: Sequence[torch.nn.Module]) -> str:
    """``N trainable parameters (x% of M)`` on this rank, for the log."""
    trainable = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
    total = sum(p.numel() for c in chunks for p in c.parameters())
    return f"{trainable} trainable parameters ({100.0 * trainable / max(total, 1):.2f}% of {total})"


class LoraWeights:
    """How a LoRA run builds, loads and saves its weights (the trainer holds one when
    ``finetune.lora`` is set): adapters on the freshly built chunks; the base weights read
    from ``checkpoint.init_from``; adapters, optimizer and progress from (and to) the run's
    own checkpoints, which carry the base reference and are checked against it."""

    def __init__(self, cfg: Config):
        if cfg.finetune.lora is None or not cfg.checkpoint.init_from:
            raise ConfigError("LoraWeights needs finetune.lora and checkpoint.init_from")
        _peft()  # the install hint before anything is built
        self.lora = cfg.finetune.lora
        self.seed = cfg.training.seed
        self.base = Path(cfg.checkpoint.init_from)
        self.reference = base_reference(self.base)

    def apply(self, chunks: Sequence[torch.nn.Module]) -> str:
        """Add the adapters to ``chunks`` (before DDP); returns a line for the log."""
        n = add_adapters(chunks, self.lora, self.seed)
        lo = self.lora
        return (
            f"LoRA: rank {lo.rank}, alpha {lo.alpha}, dropout {lo.dropout} on {n} linears "
            f"({', '.join(lo.target_modules)}); {trainable_summary(chunks)}; base {self.base}"
        )

    def load(self, source: Path, full: bool, chunks, optimizer, scheduler, verify: bool = True):
        """Base weights from the base checkpoint, then, when ``full`` (resume/load of this
        run's own checkpoint ``source``), the adapters, optimizer, scheduler and progress
        from ``source`` after checking its base reference. Returns the TrainState."""
        from engine import checkpoint as ckpt_lib

        if full:
            check_base(source, self.base)
        ckpt_lib.load_checkpoint(self.base, chunks, optimizer, load_optimizer=False, model_keys=is_base_key)
        if not full:
            return ckpt_lib.TrainState()
        return ckpt_lib.load_checkpoint(
            source, chunks, optimizer, scheduler, load_optimizer=True, verify=verify, model_keys=is_adapter_key
        )

    def save_options(self) -> Dict[str, Any]:
        """``save_checkpoint`` keywords: only the adapters, with the base reference."""
        return {"model_keys": is_adapter_key, "extra_meta": {META_KEY: self.reference}}


def load_adapter_model(adapter_ckpt: str | Path, dtype: torch.dtype = torch.float32, base: str | Path | None = None):
    """An adapter checkpoint as a model on this process (TP=PP=1): its base (``base``, default
    the recorded one, checked) with the adapters on top. Returns ``(cfg, chunks)``, eval mode."""
    from engine import checkpoint as ckpt_lib
    from engine.model_io import build_model, checkpoint_config, resolve_checkpoint, single_process_layout

    ckpt = resolve_checkpoint(adapter_ckpt)
    base_path = check_base(ckpt, base)
    cfg = single_process_layout(checkpoint_config(ckpt))
    if cfg.finetune.lora is None:
        raise ConfigError(f"{ckpt}: its config.yaml has no finetune.lora section")
    chunks = build_model(cfg, dtype)
    add_adapters(chunks, cfg.finetune.lora)
    ckpt_lib.load_checkpoint(base_path, chunks, load_optimizer=False, model_keys=is_base_key)
    ckpt_lib.load_checkpoint(ckpt, chunks, load_optimizer=False, model_keys=is_adapter_key)
    for c in chunks:
        c.eval()
    return cfg, chunks


def merge_checkpoint(adapter_ckpt: str | Path, out_dir: str | Path, base: str | Path | None = None) -> Path:
    """Fold the adapters of ``adapter_ckpt`` into its base and write a normal weights-only
    checkpoint under the run directory ``out_dir`` (same iteration; ``finetune.lora`` off,
    lineage: the adapter checkpoint's, then itself). Returns the new checkpoint's path.

    Memory: the model twice in its training dtype (the adapted model and the plain one the
    merged weights are copied into) plus dist_checkpointing's read buffers."""
    import dataclasses

    from engine import checkpoint as ckpt_lib
    from engine.config import FinetuneConfig
    from engine.model_io import checkpoint_config, resolve_checkpoint, save_model_checkpoint
    from engine.precision import resolve_fp8
    from engine.process_guard import in_process_write_results
    from models.build import build_gpt_chunks, resolve_dtype

    ckpt = resolve_checkpoint(adapter_ckpt)
    out = Path(out_dir)
    if ckpt_lib.list_checkpoints(str(out)):
        raise ConfigError(f"{out} already holds checkpoints; give a new output directory")
    saved = checkpoint_config(ckpt).precision.dtype
    dtype = resolve_dtype("bf16" if saved == "fp8" else saved)  # FP8 runs keep bf16 weights
    cfg, chunks = load_adapter_model(ckpt, dtype, base)
    merge_adapters(chunks)
    plain_cfg = dataclasses.replace(
        cfg,
        finetune=FinetuneConfig(),
        checkpoint=dataclasses.replace(cfg.checkpoint, init_from=None, resume=False, load=None),
    )
    fp8 = resolve_fp8(plain_cfg) if plain_cfg.precision.dtype == "fp8" else None
    plain = build_gpt_chunks(plain_cfg, dtype, fp8=fp8).chunks
    for src, dst in zip(chunks, plain):
        dst.load_state_dict({k: v for k, v in src.state_dict().items() if is_base_key(k)})
    del chunks
    meta = ckpt_lib.read_meta(ckpt)
    with in_process_write_results():  # a synchronous save: no multiprocessing manager left behind
        return save_model_checkpoint(
            out, plain_cfg, plain, iteration=int(meta.get("iteration", 0)), lineage=ckpt_lib.read_lineage(ckpt)
        )
