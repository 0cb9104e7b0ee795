"""Atomic checkpoints: weights, optimizer state, clocks and data position; loading runs no code.

A checkpoint is a pair: ``ckpt-<version>.npz`` (arrays, written with allow_pickle=False) and
``ckpt-<version>.json`` (the manifest: the npz's SHA-256, the layout, clocks, history). Each
file is written to a temporary name, fsynced, then renamed, and the manifest goes last, so a
manifest on disk always names a complete npz. A crash at any moment leaves the previous
checkpoint intact.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import time
from typing import Any, BinaryIO, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError

__all__ = ["Checkpointer", "load_checkpoint", "manifests", "CheckpointError"]

FORMAT = 1


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: missing, corrupt, or for another model."""


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, write: Callable[[BinaryIO], Any]) -> None:
    """``write(f)`` into a temporary file, fsync it, rename it to ``path``: a reader (or a
    crash) never sees half a file. The temporary file is removed if writing fails."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Checkpointer:
    """Writes a checkpoint every ``every`` steps into ``directory``, keeping the last ``keep``."""

    def __init__(self, directory: str, every: Optional[int], keep: int = 3,
                 meta: Optional[Mapping[str, Any]] = None) -> None:
        self.directory = os.path.abspath(directory)
        self.every = every
        self.keep = keep
        self.meta = dict(meta or {})  # run facts a resume must match (layout, workers, mode)
        self.last_path: Optional[str] = None

    def due(self, version: int) -> bool:
        return bool(self.every and version > 0 and version % self.every == 0)

    def save(self, version: int, arrays: Mapping[str, Any], state: Mapping[str, Any],
             parts: Optional[Sequence[Dict[str, Any]]] = None) -> str:
        """``arrays``: name -> ndarray; ``state``: JSON-able clocks, samples, history;
        ``parts``: what the other servers wrote of this version (save_part), in server order.
        The manifest goes last: a checkpoint exists once its manifest does."""
        os.makedirs(self.directory, exist_ok=True)
        stem = os.path.join(self.directory, f"ckpt-{version:08d}")
        write_atomic(stem + ".npz", lambda f: np.savez(f, **arrays))
        manifest = {
            "format": FORMAT,
            "version": version,
            "file": os.path.basename(stem + ".npz"),
            "sha256": _sha256(stem + ".npz"),
            "bytes": os.path.getsize(stem + ".npz"),
            "created": time.time(),
            **self.meta,
            **state,
        }
        if parts is not None:  # the other servers' ranges, each a file of its own
            manifest["parts"] = list(parts)
        write_atomic(stem + ".json",
                      lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        _fsync_dir(self.directory)
        self.last_path = stem + ".json"
        self._prune()
        return self.last_path

    def save_part(self, version: int, server: int,
                  arrays: Mapping[str, Any]) -> Dict[str, Any]:
        """Another server's range of checkpoint ``version``: its file, for the manifest."""
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"ckpt-{version:08d}.server{server}.npz")
        write_atomic(path, lambda f: np.savez(f, **arrays))
        return {"file": os.path.basename(path), "sha256": _sha256(path),
                "bytes": os.path.getsize(path)}

    def _prune(self) -> None:
        for manifest in manifests(self.directory)[self.keep:]:
            stem = manifest[: -len(".json")]
            for path in [manifest, stem + ".npz"] + glob.glob(stem + ".server*.npz"):
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass


def manifests(directory: str) -> List[str]:
    """Manifest paths, newest version first."""
    return sorted(glob.glob(os.path.join(directory, "ckpt-*.json")), reverse=True)


def _read(manifest_path: str) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """(manifest, arrays) of one checkpoint, or raise CheckpointError saying what is wrong."""
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint manifest {manifest_path}: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path} has format {manifest.get('format')}, "
                              f"this psframe reads format {FORMAT}")
    directory = os.path.dirname(manifest_path)
    # Server 0's range, then each other server's: consecutive ranges, joined in order.
    pieces = [_read_part(directory, manifest)]
    pieces += [_read_part(directory, part) for part in manifest.get("parts", ())]
    if len(pieces) == 1:
        return manifest, pieces[0]
    if any(p.keys() != pieces[0].keys() for p in pieces):
        raise CheckpointError(f"the servers' parts of {manifest_path} hold different arrays")
    return manifest, {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}


def _read_part(directory: str, entry: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """The arrays of one file a manifest names, checked against its SHA-256."""
    npz = os.path.join(directory, entry["file"])
    if not os.path.exists(npz):
        raise CheckpointError(f"checkpoint data {npz} is missing")
    if _sha256(npz) != entry["sha256"]:
        raise CheckpointError(
            f"checkpoint {npz} is corrupt or truncated: its SHA-256 does not match the manifest"
        )
    with np.load(npz, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def load_checkpoint(path: str) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """Load the newest checkpoint in a directory, or the one a manifest path names.

    A corrupt newest checkpoint is refused, naming the newest earlier one that verifies,
    so the user can resume from it explicitly (``resume="DIR/ckpt-00000100.json"``).
    """
    if os.path.isdir(path):
        candidates = manifests(path)
        if not candidates:
            raise CheckpointError(f"no checkpoint (ckpt-*.json) in {path}")
    elif os.path.exists(path):
        candidates = [path]
    else:
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        return _read(candidates[0])
    except CheckpointError as exc:
        good = _earlier_good(path, candidates[0])
        hint = (f"; the earlier checkpoint {good} verifies: resume from it with resume={good!r}"
                if good else "; no earlier checkpoint verifies")
        raise CheckpointError(f"{exc}{hint}") from None


def _earlier_good(path: str, bad: str) -> Optional[str]:
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    for manifest in manifests(directory):
        if manifest >= bad:
            continue
        try:
            _read(manifest)
            return manifest
        except CheckpointError:
            continue
    return None
