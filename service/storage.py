"""The one blob store: files live under their sha256, never under a client-given name. Uploads are
streamed to a temporary file with a byte cap and hashed on the way, then moved into place atomically."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

from service.errors import PayloadTooLarge
from service.settings import get_settings
from service.temp_names import temp_prefix

CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class StagedUpload:
    path: Path
    sha256: str
    size_bytes: int


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "tmp").mkdir(parents=True, exist_ok=True)

    def blob_path(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256[:2] / sha256

    def dataset_dir(self, dataset_id: str) -> Path:
        return self.root / "datasets" / dataset_id

    def stage(self, stream: BinaryIO, max_bytes: int) -> StagedUpload:
        """Copy a stream to a temporary file under the store, hashing it; nothing is kept beyond the cap."""
        digest = hashlib.sha256()
        size = 0
        fd, name = tempfile.mkstemp(dir=self.root / "tmp", prefix=temp_prefix("upload"))
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(CHUNK_BYTES):
                    size += len(chunk)
                    if size > max_bytes:
                        raise PayloadTooLarge(f"upload exceeds the limit of {max_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return StagedUpload(path=path, sha256=digest.hexdigest(), size_bytes=size)

    def temp_path(self, suffix: str = "", kind: str = "weights") -> Path:
        """A new empty file under the store's tmp/ (same filesystem as the blobs, so commit is a rename)."""
        fd, name = tempfile.mkstemp(dir=self.root / "tmp", suffix=suffix, prefix=temp_prefix(kind))
        os.close(fd)
        return Path(name)

    def stage_file(self, path: Path) -> StagedUpload:
        """Hash a file the server wrote under tmp/ (e.g. converted weights) so it can be committed or discarded."""
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
        return StagedUpload(path=path, sha256=digest.hexdigest(), size_bytes=path.stat().st_size)

    def commit(self, staged: StagedUpload) -> Path:
        """Move a staged upload to its content address (a no-op when the same bytes are already stored)."""
        target = self.blob_path(staged.sha256)
        if target.exists():
            staged.path.unlink(missing_ok=True)
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged.path, target)
        return target

    def add_file(self, path: Path) -> str:
        """Move a file the server wrote itself (e.g. pruned weights) into the store; returns its sha256."""
        staged = self.stage_file(path)
        self.commit(staged)
        return staged.sha256

    def discard(self, staged: StagedUpload) -> None:
        staged.path.unlink(missing_ok=True)

    @contextmanager
    def staged_dataset_dir(self, dataset_id: str) -> Iterator[Path]:
        """A new directory under tmp/ to write a dataset's files in, renamed to its place when the block ends
        (removed if it raises)."""
        # Not mkdtemp, whose 0700 would stay on the renamed directory: workers may run as another user.
        staging = self.root / "tmp" / (temp_prefix("dataset") + secrets.token_hex(8))
        staging.mkdir()
        try:
            yield staging
            self.dataset_dir(dataset_id).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, self.dataset_dir(dataset_id))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def remove_dataset_dir(self, dataset_id: str) -> None:
        shutil.rmtree(self.dataset_dir(dataset_id), ignore_errors=True)

    @property
    def work_root(self) -> Path:
        return self.root / "work"

    def work_dir(self, audit_id: str, attempt: int) -> Path:
        """What the runs of one audit attempt share across workers and hosts: the stored dense baseline and the
        unmitigated runs' masks. Per attempt, so a stalled earlier attempt never writes over a later one's."""
        return self.work_root / audit_id / f"attempt-{attempt}"

    def work_audit_ids(self) -> list[str]:
        return sorted(path.name for path in self.work_root.iterdir()) if self.work_root.is_dir() else []

    def remove_work(self, audit_id: str) -> None:
        """Every attempt's work files of an audit that has ended."""
        shutil.rmtree(self.work_root / audit_id, ignore_errors=True)


@lru_cache
def get_store() -> BlobStore:
    return BlobStore(get_settings().resolved_blob_dir())
