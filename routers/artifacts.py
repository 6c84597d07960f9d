"""Trained router artifacts: a directory with `arrays.npz` (numbers) and `meta.json` (everything else).

No pickle: arrays load with `allow_pickle=False` and metadata is JSON. The version is a hash of both, so
a decision can name exactly which artifact made it. Loading refuses an artifact built with another
embedder or another model set, with a message saying which.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """An artifact that cannot be used here."""


@dataclass
class Artifact:
    """A trained router: its type, metadata and arrays."""

    router: str
    meta: dict[str, Any]
    arrays: dict[str, npt.NDArray[Any]] = field(default_factory=dict)

    @property
    def version(self) -> str:
        """Content hash of arrays and metadata (first 12 hex digits)."""
        h = hashlib.sha256(self.router.encode())
        bookkeeping = ("version", "created", "router", "format")  # written by save_artifact itself
        h.update(json.dumps({k: v for k, v in self.meta.items() if k not in bookkeeping},
                            sort_keys=True, default=str).encode())
        for name in sorted(self.arrays):
            arr = np.ascontiguousarray(self.arrays[name])
            h.update(name.encode())
            h.update(str(arr.dtype).encode() + str(arr.shape).encode())
            h.update(arr.tobytes())
        return h.hexdigest()[:12]

    @property
    def models(self) -> list[str]:
        """The model names, in the arrays' column order."""
        return list(self.meta["models"])

    @property
    def embedder_id(self) -> str:
        """The embedder the arrays were computed with."""
        return str(self.meta["embedder"])


def save_artifact(artifact: Artifact, out: Path) -> Path:
    """Write `artifact` to the directory `out` atomically (a temp directory renamed into place)."""
    meta = {**artifact.meta, "router": artifact.router, "format": FORMAT_VERSION,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "version": artifact.version}
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        arrays: dict[str, Any] = dict(artifact.arrays)  # (numpy's stub types **kwds like allow_pickle)
        np.savez(tmp / "arrays.npz", **arrays)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_artifact(path: Path, *, embedder_id: str | None = None, models: Sequence[str] | None = None) -> Artifact:
    """Read an artifact; `ArtifactError` if it is missing, malformed, or built for another embedder or
    model set than the ones given."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        with np.load(path / "arrays.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path}: not a Turnout artifact ({exc.filename} is missing)") from None
    except (ValueError, OSError) as exc:
        raise ArtifactError(f"{path}: unreadable artifact ({exc})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format {meta.get('format')!r}, this Turnout reads {FORMAT_VERSION}")
    art = Artifact(router=str(meta["router"]), meta=meta, arrays=arrays)
    if embedder_id is not None and art.embedder_id != embedder_id:
        raise ArtifactError(f"{path}: built with embedder {art.embedder_id!r}, but this one embeds with "
                            f"{embedder_id!r}; retrain it with this embedder")
    if models is not None and list(models) != art.models:
        raise ArtifactError(f"{path}: built for models {art.models}, not {list(models)}")
    if meta.get("version") != art.version:
        raise ArtifactError(f"{path}: contents do not match the recorded version (modified after training?)")
    return art
