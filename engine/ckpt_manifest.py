"""A checkpoint's manifest: every file's size and CRC-32, written before the checkpoint is complete.

``manifest.json`` lists each file under the checkpoint directory (relative path -> size in
bytes and zlib CRC-32), except itself and ``engine_meta.json`` (written after it, and the
marker of completeness). It is written into the ``.tmp`` directory before the rename, so a
complete checkpoint always has one; on load the files are checked against it, which catches
a missing shard, a truncated file and bytes overwritten in place (same size, other CRC),
each reported in one line naming the file.

Checksums are spread over the ranks (file ``i`` is read by rank ``i % world``) and gathered,
so every rank reaches the same verdict and a large checkpoint is read once, in parallel.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Dict, List, Optional, TypeVar

import torch.distributed as dist

from engine.config import ConfigError

MANIFEST = "manifest.json"
_EXCLUDED = {MANIFEST, "engine_meta.json"}
_CHUNK = 8 << 20  # 8 MiB reads: crc32 runs at memory speed, the disk is the limit
_V = TypeVar("_V")


class CorruptCheckpointError(ConfigError):
    """A checkpoint's files disagree with its manifest (missing, truncated or altered).

    A ConfigError because the config points at it: the CLI reports it in one line (exit 2)."""


def crc32_file(path: Path) -> int:
    """CRC-32 (zlib) of a file, read in chunks."""
    crc = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                return crc
            crc = zlib.crc32(block, crc)


def _files(ckpt: Path) -> List[str]:
    return sorted(
        str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and str(p.relative_to(ckpt)) not in _EXCLUDED
    )


def _shared(local: Dict[str, _V]) -> Dict[str, _V]:
    """Union of every rank's dict (all ranks get it); the dict itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    parts: List[Optional[Dict[str, _V]]] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: Dict[str, _V] = {}
    for p in parts:
        merged.update(p or {})
    return merged


def _my_share(names: List[str]) -> List[str]:
    if not (dist.is_available() and dist.is_initialized()):
        return names
    return names[dist.get_rank() :: dist.get_world_size()]


def write_manifest(ckpt: Path) -> None:
    """Checksum every file of ``ckpt`` (all ranks call; the files must be on a shared
    filesystem and complete) and write ``manifest.json`` there (rank 0)."""
    ckpt = Path(ckpt)
    names = _files(ckpt) if _rank() == 0 else None
    names = _broadcast(names)
    local = {n: {"size": (ckpt / n).stat().st_size, "crc32": crc32_file(ckpt / n)} for n in _my_share(names)}
    entries = _shared(local)
    if _rank() == 0:
        body = {"algorithm": "zlib.crc32", "files": {n: entries[n] for n in names}}
        (ckpt / MANIFEST).write_text(json.dumps(body, indent=1))


def verify_manifest(ckpt: Path) -> Optional[str]:
    """Check ``ckpt`` against its manifest (all ranks call, all get the same answer).

    Returns None when every listed file is present with its size and CRC-32, the string
    ``"no manifest"`` for a checkpoint written before manifests existed, and otherwise raises
    CorruptCheckpointError with one line naming the first file that differs and how."""
    ckpt = Path(ckpt)
    manifest = ckpt / MANIFEST
    listed = json.loads(manifest.read_text())["files"] if manifest.is_file() else None
    if listed is None:
        return "no manifest"
    names = sorted(listed)
    local: Dict[str, str] = {}  # file -> what is wrong with it
    for n in _my_share(names):
        p = ckpt / n
        want = listed[n]
        if not p.is_file():
            local[n] = f"is missing (manifest: {want['size']} bytes)"
        elif p.stat().st_size != want["size"]:
            local[n] = f"has {p.stat().st_size} bytes, manifest says {want['size']} (truncated or replaced)"
        elif crc32_file(p) != want["crc32"]:
            local[n] = f"has the right size but CRC-32 {crc32_file(p):08x} != {want['crc32']:08x} (bytes altered)"
    problems = _shared(local)
    if problems:
        first = sorted(problems)[0]
        more = f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else ""
        raise CorruptCheckpointError(f"checkpoint {ckpt} is corrupt: {ckpt / first} {problems[first]}{more}")
    return None


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _broadcast(obj):
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
