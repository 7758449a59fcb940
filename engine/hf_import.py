"""Hugging Face checkpoints into the engine: ``python -m engine import hf`` and
``checkpoint.init_from_hf``.

``import_hf`` reads a transformers directory (LLaMA, GPT-2 or Mixtral: ``config.json`` and
safetensors weights), builds the engine ``ModelConfig`` from its config (the inverse of
``models.hf_convert.hf_config``), maps the weights with ``hf_to_megatron`` and writes a
weights-only engine checkpoint (``model_io.save_model_checkpoint``) that every command and
``checkpoint.init_from`` accept, plus the tokenizer when the directory has a SentencePiece
``tokenizer.model``. Exporting that checkpoint gives back the same tensors.

``init_from_hf_checkpoint`` serves training at any layout: rank 0 converts once, in a
single-process subprocess (the trainer's own process already holds the run's process
groups), into ``<checkpoint.dir>/hf_import/<key>`` (key: hash of the Hugging Face files
and of the run's model section), and every rank then loads that checkpoint like
``checkpoint.init_from`` (dist_checkpointing reshards it to the run's TP/PP/EP layout).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence

import yaml

from engine.config import ConfigError
from models.hf_dir import HF_CONFIG, HFImportError, check_architecture, hf_model_config, read_hf_config

if TYPE_CHECKING:
    from engine.config import Config

CACHE_DIR = "hf_import"
"""Subdirectory of ``checkpoint.dir`` holding the converted checkpoints of ``init_from_hf``."""


def _weight_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [hf_dir / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise HFImportError(f"{hf_dir}: shards listed in {index.name} are missing: {', '.join(missing)}")
        return files
    single = hf_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise HFImportError(f"{hf_dir}: no safetensors weights (model.safetensors or model.safetensors.index.json)")


def load_hf_state_dict(hf_dir: str | Path) -> Dict[str, Any]:
    """All tensors of ``hf_dir``'s safetensors files (one-line error for a damaged file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out: Dict[str, Any] = {}
    for f in _weight_files(Path(hf_dir)):
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError) as exc:
            raise HFImportError(f"{f}: unreadable safetensors file ({exc})") from None
    # Old checkpoints carry the RoPE frequencies, which are derived, not weights.
    return {k: v for k, v in out.items() if not k.endswith("rotary_emb.inv_freq")}


def files_hash(hf_dir: str | Path) -> str:
    """sha256 (16 hex digits) of the config and weight files of ``hf_dir`` (their bytes)."""
    h = hashlib.sha256()
    d = Path(hf_dir)
    for f in [d / HF_CONFIG, *_weight_files(d)]:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _chat_template(hf_dir: Path) -> Optional[str]:
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    tc = hf_dir / "tokenizer_config.json"
    if tc.is_file():
        value = json.loads(tc.read_text()).get("chat_template")
        return value if isinstance(value, str) else None
    return None


def _import_tokenizer(hf_dir: Path, out: Path) -> Dict[str, str]:
    """Copy the SentencePiece tokenizer (and the chat template) into ``out/tokenizer``;
    returns the ``data`` config keys that point at them (empty without tokenizer.model)."""
    from engine.data.chat_template import BUILTIN

    if not (hf_dir / "tokenizer.model").is_file():
        return {}
    dst = out / "tokenizer"
    dst.mkdir(parents=True)
    for name in ("tokenizer.model", "tokenizer.json"):
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, dst / name)
    keys = {"tokenizer": str(dst)}
    template = _chat_template(hf_dir)
    if template is not None:
        builtin = [name for name, cls in BUILTIN.items() if cls().to_jinja() == template]
        if builtin:
            keys["chat_template"] = builtin[0]
        else:
            (dst / "chat_template.jinja").write_text(template)
            keys["chat_template"] = str(dst / "chat_template.jinja")
    return keys


def import_config(hf_dir: str | Path, out_run_dir: str | Path, overrides: Sequence[str] = ()) -> "Config":
    """The engine config of an import: ``hf_dir``'s model, then ``overrides``."""
    from engine.run_config import load_run_config

    model = dataclasses.asdict(hf_model_config(hf_dir))
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump({"model": model, "checkpoint": {"dir": str(out_run_dir)}}, fh)
    try:
        return load_run_config(fh.name, overrides)
    finally:
        os.unlink(fh.name)


def import_hf(
    hf_dir: str | Path, out_run_dir: str | Path, overrides: Sequence[str] = (), cfg: Optional["Config"] = None
) -> Path:
    """Convert ``hf_dir`` into the weights-only engine checkpoint ``out_run_dir/checkpoints/
    iter_0000000`` (with the tokenizer under ``out_run_dir/tokenizer``); returns it.

    ``cfg``: the config to build with (its model must be ``hf_dir``'s network, checked);
    default: ``hf_dir``'s model with ``overrides``. ``out_run_dir`` must not exist; on any
    failure it is removed again. Runs on one process."""
    import torch

    from engine import model_io
    from models.hf_convert import ConversionError, hf_to_megatron, load_megatron_state_dict

    hf = Path(hf_dir)
    out = Path(out_run_dir)
    read_hf_config(hf)
    if out.exists():
        raise HFImportError(f"{out} already exists; choose a new run directory")
    if cfg is None:
        cfg = import_config(hf, out, overrides)
    else:
        check_architecture(cfg.model, hf)
    _weight_files(hf)
    try:
        out.mkdir(parents=True)
        if cfg.data.tokenizer is None:
            data_keys = _import_tokenizer(hf, out)
            data = dataclasses.replace(
                cfg.data,
                tokenizer=data_keys.get("tokenizer"),
                chat_template=data_keys.get("chat_template", cfg.data.chat_template),
            )
            cfg = dataclasses.replace(cfg, data=data)
        sd = load_hf_state_dict(hf)
        dtypes = {v.dtype for v in sd.values() if v.is_floating_point()}
        # Build in the weights' own dtype (bf16 weights: half the memory of fp32); exact.
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        try:
            mega = hf_to_megatron(sd, cfg.model, allow_sliding_window_mismatch=True)
        except ConversionError as exc:
            raise HFImportError(f"{hf}: {exc}") from None
        del sd
        single = model_io.single_process_layout(cfg)
        chunks = model_io.build_model(single, dtype)
        load_megatron_state_dict(chunks[0], mega)
        del mega
        lineage = [{"init_from": str(hf.resolve()), "iteration": 0, "objective": "huggingface"}]
        return model_io.save_model_checkpoint(out, single, chunks, iteration=0, lineage=lineage)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------
# checkpoint.init_from_hf
# --------------------------------------------------------------------------------------


def _single_process_env() -> Dict[str, str]:
    """This process's environment without the launcher's rendezvous variables, and with
    this engine's source on the path (the subprocess must run the same code)."""
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("TORCHELASTIC_")}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in [env.get("PYTHONPATH")] if p]])
    return env


def init_from_hf_checkpoint(cfg: "Config") -> Path:
    """The engine checkpoint holding ``cfg.checkpoint.init_from_hf``'s weights for this run's
    model, converted once by rank 0 (a subprocess) and shared by every rank. All ranks call
    it; a failed conversion raises HFImportError on every rank."""
    import torch.distributed as dist

    from engine import checkpoint as ckpt_lib
    from engine import model_io

    hf = Path(str(cfg.checkpoint.init_from_hf))
    target = Path(cfg.checkpoint.dir) / CACHE_DIR
    error: Optional[str] = None
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    run_dir = None
    if rank0:
        try:
            check_architecture(cfg.model, hf)
            run_dir = target / f"{files_hash(hf)}-{model_io.config_hash(cfg)}"
            if ckpt_lib.latest_checkpoint(str(run_dir)) is None:
                shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted conversion
                _convert_in_subprocess(cfg, hf, run_dir)
        except ConfigError as exc:
            error = str(exc)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error, str(run_dir) if run_dir else None]
        dist.broadcast_object_list(box, src=0)
        error, run_dir = box[0], Path(box[1]) if box[1] else None
    if error is not None:
        raise HFImportError(error)
    assert run_dir is not None
    return model_io.resolve_checkpoint(run_dir)


def _convert_in_subprocess(cfg: "Config", hf: Path, run_dir: Path) -> None:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    conf = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, init_from_hf=None))
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=run_dir.parent, delete=False) as fh:
        fh.write(conf.to_yaml())
    cmd = [sys.executable, "-m", "engine", "import", "hf", str(hf), str(run_dir), "--config", fh.name]
    print(f"init_from_hf: converting {hf} into {run_dir}", flush=True)
    try:
        proc = subprocess.run(cmd, env=_single_process_env(), capture_output=True, text=True)
    finally:
        os.unlink(fh.name)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise HFImportError(f"init_from_hf: converting {hf} failed: {lines[-1] if lines else proc.returncode}")
