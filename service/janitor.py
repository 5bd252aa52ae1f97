"""What a killed process leaves in the blob store, removed by the sweeper (service/recovery.py):

- entries of tmp/ (staged uploads, converted weights, datasets being written, a run's output directory, ...):
  at once when their owner, named in the entry (service/temp_names.py), is a process of this host that no
  longer exists; else once nothing in them changed for `leftover_age_s` (an owner on another host, a name
  without an owner);
- dataset directories without a dataset row (the API died after moving one into place, before its commit),
  and half-written ``*.tmp`` arrays in any dataset directory (as older versions wrote them in place), once
  `leftover_age_s` old.

An entry whose owner is alive on this host is kept, however old: a long run writes its output directory late."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy import select

from service.db import session_scope
from service.models import Dataset
from service.storage import BlobStore
from service.temp_names import owner_of

log = logging.getLogger(__name__)
_IDS_PER_QUERY = 500


def remove_leftovers(store: BlobStore, max_age_s: float) -> list[str]:
    """Remove the leftovers (see the module's docstring); returns their paths relative to the store."""
    cutoff = time.time() - max_age_s
    leftovers = [path for path in _entries(store.root / "tmp") if _temp_is_leftover(path, cutoff)]
    leftovers += _orphan_datasets(store, cutoff)
    for path in leftovers:
        _remove(path)
    half_written = [path for path in (store.root / "datasets").glob("*/*.tmp") if _last_change(path) < cutoff]
    for path in half_written:
        _remove(path)
    names = [str(path.relative_to(store.root)) for path in (*leftovers, *half_written)]
    if names:
        log.warning("removed %d leftovers of crashed processes: %s", len(names), ", ".join(names[:20]))
    return names


def _entries(directory: Path) -> list[Path]:
    return sorted(directory.iterdir()) if directory.is_dir() else []


def _temp_is_leftover(path: Path, cutoff: float) -> bool:
    owner = owner_of(path.name)
    if owner is not None and owner.host == socket.gethostname():
        return not _alive(owner.pid)
    return _last_change(path) < cutoff


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True


def _last_change(path: Path) -> float:
    """The newest modification time of `path` and, for a directory, of anything in it (0 once it is gone)."""
    try:
        newest = path.stat().st_mtime
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                for name in (*dirs, *files):
                    newest = max(newest, (Path(root) / name).stat().st_mtime)
        return newest
    except FileNotFoundError:  # removed meanwhile by its owner
        return 0.0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _orphan_datasets(store: BlobStore, cutoff: float) -> list[Path]:
    """Dataset directories unchanged since `cutoff` whose dataset has no row."""
    old = {path.name: path for path in _entries(store.root / "datasets") if _last_change(path) < cutoff}
    recorded = _recorded_datasets(list(old))
    return [path for dataset_id, path in old.items() if dataset_id not in recorded]


def _recorded_datasets(ids: list[str]) -> set[str]:
    found: set[str] = set()
    with session_scope() as session:
        for chunk in _chunks(ids, _IDS_PER_QUERY):
            found.update(session.scalars(select(Dataset.id).where(Dataset.id.in_(chunk))))
    return found


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    return (items[start : start + size] for start in range(0, len(items), size))
