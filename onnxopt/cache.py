"""A disk cache for expensive measurements (per-layer sensitivity curves).

An entry is a JSON file named by the SHA-256 of its key: a dict of everything the result
depends on — the model's bytes (``model_digest``), the data (``data_digest``: image paths with
size and modification time and the preprocessing, or the arrays' bytes) and the settings. Any
change to one of them is a different key, so a stale entry is never read. Entries are written
atomically (temporary file + rename), so a crash leaves no partial entry.

Location: ``$ONNXOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/onnxopt``, else ``~/.cache/onnxopt``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx

from onnxopt.atomic import atomic_path
from onnxopt.calib.readers import DataSource


def default_dir() -> Path:
    if os.environ.get("ONNXOPT_CACHE_DIR"):
        return Path(os.environ["ONNXOPT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "onnxopt"


def model_digest(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def data_digest(source: DataSource | None) -> str:
    """Identity of a data source: what it reads and how it preprocesses it."""
    digest = hashlib.sha256()
    if source is None:
        return "none"
    if source.paths is not None:
        digest.update((source.prep.describe() if source.prep else "").encode())
        for path in source.paths:
            stat = Path(path).stat()
            digest.update(f"{Path(path).resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    else:
        for name in sorted(source.arrays):
            array = np.ascontiguousarray(source.arrays[name])
            digest.update(f"{name}\0{array.dtype}\0{array.shape}\n".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


class DiskCache:
    """JSON entries under ``root/kind/``; ``root=None`` disables the cache."""

    def __init__(self, root: Path | None):
        self.root = root

    @staticmethod
    def key_digest(key: dict) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()

    def path(self, kind: str, key: dict) -> Path | None:
        return None if self.root is None else self.root / kind / f"{self.key_digest(key)}.json"

    def get(self, kind: str, key: dict) -> dict | None:
        path = self.path(kind, key)
        if path is None or not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            return None                      # unreadable entry: measure again (and overwrite it)
        return entry.get("value") if entry.get("key") == json.loads(json.dumps(key, default=str)) else None

    def put(self, kind: str, key: dict, value: dict) -> Path | None:
        path = self.path(kind, key)
        if path is None:
            return None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp, open(tmp, "w") as handle:
                json.dump({"key": key, "value": value}, handle, default=str)
        except OSError:
            return None                      # a read-only cache folder only costs speed
        return path
