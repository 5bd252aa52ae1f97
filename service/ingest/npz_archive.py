"""An ``.npz`` archive's arrays read within a byte cap: every member's ``.npy`` header is read first and
the bytes it declares are checked against the cap (and against the member's size) before any array is
allocated or decompressed. ``allow_pickle=False``: object arrays are refused, never unpickled."""

from __future__ import annotations

import lzma
import math
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from service.errors import InvalidInput, PayloadTooLarge
from service.ingest.excerpts import listing, quoted

SAVE_HINT = "save the dataset with np.savez(path, x=x, y=y, group_<attribute>=...)"
# x, y and one array per group attribute: far more than any dataset has; the zip's directory is read
# only once its entry count is known to be under this.
MAX_ARRAYS = 1_000
# A directory entry is 46 bytes, its name and its extra fields: an array's name is short.
_DIRECTORY_BYTES_PER_ARRAY = 1024
# numpy's own default: a header longer than this is refused before it is parsed.
_MAX_NPY_HEADER_BYTES = 10_000
# What reading a corrupt or hostile archive can raise: the zip layer (a bad directory, a CRC or
# decompression error, an unsupported method or encryption), the .npy header and data parsers.
_READ_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    NotImplementedError,  # a compression method zipfile lacks
    RuntimeError,  # an encrypted member (RecursionError too: a header nesting bomb)
    EOFError,
    OSError,
    ValueError,  # numpy's header and data checks, a filename that is not UTF-8
    SyntaxError,  # numpy parses a dtype string's repeat count, "(2,3)f4", with ast.literal_eval
    zlib.error,
    lzma.LZMAError,
    struct.error,
)


@dataclass(frozen=True)
class _Member:
    info: zipfile.ZipInfo
    array: str  # the name np.load gives it: the member's name without ".npy"
    shape: tuple[int, ...]
    dtype: np.dtype
    data_offset: int  # where the array's bytes start within the member

    @property
    def nbytes(self) -> int:
        # At least a byte an element: zero-size dtypes would otherwise make any element count free.
        return math.prod(self.shape) * max(self.dtype.itemsize, 1)


def decoded_bytes(path: Path, max_decoded_bytes: int) -> int:
    """The bytes the archive's arrays take once read, from their headers (nothing is decompressed
    beyond them); PayloadTooLarge over `max_decoded_bytes`, InvalidInput for a malformed archive."""
    return sum(m.nbytes for m in _members(Path(path), max_decoded_bytes))


def read_arrays(path: Path, max_decoded_bytes: int, check_names: Callable[[list[str]], None]) -> dict[str, np.ndarray]:
    """Every array of the archive by name, read only once every header passed the cap and
    `check_names` (which raises to refuse) accepted the array names."""
    path = Path(path)
    members = _members(path, max_decoded_bytes)
    check_names([m.array for m in members])
    with _corrupt_is_invalid(), zipfile.ZipFile(path) as archive:
        return {m.array: _read(archive, m) for m in members}


def _members(path: Path, max_decoded_bytes: int) -> list[_Member]:
    _check_is_archive(path)
    with _corrupt_is_invalid():
        _check_directory(path)
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            _check_names(infos)
            listed = sum(info.file_size for info in infos)
            if listed > max_decoded_bytes:
                raise _too_large(f"the .npz archive expands to {listed} bytes", max_decoded_bytes)
            members = [_member(archive, info, max_decoded_bytes) for info in infos]
    total = sum(m.nbytes for m in members)
    if total > max_decoded_bytes:
        raise _too_large(f"the .npz's arrays declare {total} bytes", max_decoded_bytes)
    return members


def _too_large(what: str, cap: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{what}, more than the {cap} bytes one dataset may take (setting max_decoded_bytes)")


@contextmanager
def _corrupt_is_invalid() -> Iterator[None]:
    """What a corrupt archive raises becomes InvalidInput, with the reason."""
    try:
        yield
    except _READ_ERRORS as exc:
        reason = quoted(str(exc) or type(exc).__name__, 200)
        raise InvalidInput(f"the .npz archive is corrupt ({reason}); save it again with np.savez") from None


def _check_is_archive(path: Path) -> None:
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic.startswith(b"\x93NUMPY"):
        raise InvalidInput(f"this is a single .npy array, not an .npz archive; {SAVE_HINT}")
    if not magic.startswith(b"PK"):
        hint = " (it looks like a pickle, which is refused)" if magic.startswith(b"\x80") else ""
        raise InvalidInput(f"not an .npz archive{hint}; {SAVE_HINT}")


def _check_directory(path: Path) -> None:
    # The standard library's reader of the end-of-directory record (zip64 included): the count and the
    # directory's size it holds are checked before ZipFile reads the directory and builds an object for
    # every entry in it (it reads as many bytes as the record says, whatever the count).
    with open(path, "rb") as handle:
        end = zipfile._EndRecData(handle)  # type: ignore[attr-defined]
    if end is None:
        raise zipfile.BadZipFile("no end of central directory record")
    entries = end[zipfile._ECD_ENTRIES_TOTAL]  # type: ignore[attr-defined]
    directory_bytes = end[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
    if entries > MAX_ARRAYS or directory_bytes > MAX_ARRAYS * _DIRECTORY_BYTES_PER_ARRAY:
        raise InvalidInput(
            f"the .npz archive has {entries} entries in a {directory_bytes}-byte directory; at most {MAX_ARRAYS} "
            "arrays are accepted"
        )


def _check_names(infos: list[zipfile.ZipInfo]) -> None:
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        raise InvalidInput("the .npz archive holds two entries with the same name; save it again with np.savez")
    odd = [name for name in names if not name.endswith(".npy")]
    if odd:
        raise InvalidInput(f"the .npz archive holds entries that are not .npy arrays: {listing(odd)}; {SAVE_HINT}")


def _member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int) -> _Member:
    array = info.filename[: -len(".npy")]
    with archive.open(info) as handle:
        shape, dtype = _header(handle, array)
        member = _Member(info, array, shape, dtype, data_offset=handle.tell())
    if member.nbytes > cap:
        raise _too_large(f"array {quoted(array)} declares shape {list(shape)} of {dtype}", cap)
    held, declared = info.file_size - member.data_offset, math.prod(shape) * dtype.itemsize
    if declared != held:
        raise InvalidInput(
            f"array {quoted(array)} declares shape {list(shape)} of {dtype} ({declared} bytes) but its entry "
            f"holds {held}; the .npz is corrupt, save it again"
        )
    return member


def _header(handle, array: str) -> tuple[tuple[int, ...], np.dtype]:
    version = npy_format.read_magic(handle)
    if version == (1, 0):
        shape, _fortran, dtype = npy_format.read_array_header_1_0(handle, max_header_size=_MAX_NPY_HEADER_BYTES)
    elif version == (2, 0):
        shape, _fortran, dtype = npy_format.read_array_header_2_0(handle, max_header_size=_MAX_NPY_HEADER_BYTES)
    else:
        raise InvalidInput(f"array {quoted(array)} uses .npy format version {version}, which is not supported")
    if dtype.hasobject:
        raise InvalidInput(
            f"array {quoted(array)} is an object array (Python objects, e.g. from pandas); object "
            "arrays would have to be unpickled, which is refused. Convert it first, e.g. "
            "np.asarray(values, dtype=str) or dtype=np.float32"
        )
    return tuple(int(d) for d in shape), dtype


def _read(archive: zipfile.ZipFile, member: _Member) -> np.ndarray:
    with archive.open(member.info) as handle:
        return npy_format.read_array(handle, allow_pickle=False, max_header_size=_MAX_NPY_HEADER_BYTES)
