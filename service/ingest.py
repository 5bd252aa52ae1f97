"""Reading uploaded files as data, never as code.

* Model weights: a pure-Python parse of the safetensors header (no tensor bytes are read, nothing is
  unpickled) plus a check that the tensors fit the chosen architecture's state dict. PyTorch files
  are told apart by content: TorchScript and torch.export archives are refused; a torch.save
  checkpoint is converted to safetensors by a resource-limited child process that loads it only
  with ``torch.load(weights_only=True)``.
* Datasets: ``.npz`` (loaded with ``allow_pickle=False``) or CSV (stdlib ``csv``, one streaming
  pass), normalised to a :class:`ParsedDataset` and stored as plain ``.npy`` files that workers
  memory-map.

Every problem with the input raises :class:`~service.errors.InvalidInput` with a sentence that says
what is wrong and what to do about it. This module imports numpy and the standard library only: the
web process must never import torch.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import zipfile
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from service.architectures import state_dict_mismatch
from service.errors import InvalidInput, PayloadTooLarge

__all__ = [
    "TensorInfo",
    "GroupColumn",
    "ParsedDataset",
    "read_safetensors_header",
    "identify_model_file",
    "classify_zip_entries",
    "convert_torch_checkpoint",
    "ConversionLimits",
    "check_weights_fit",
    "read_npz_dataset",
    "read_csv_dataset",
    "save_dataset",
    "load_dataset_arrays",
    "MAX_HEADER_BYTES",
    "MAX_CSV_BYTES",
]

_log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------------

MAX_HEADER_BYTES = 100_000_000  # the limit the reference (Rust) implementation enforces

# dtype -> (bits per element, kind). The set the safetensors format defines (0.8); sub-byte float
# formats (F4, F6_*) are packed, so a tensor's byte size is prod(shape) * bits / 8.
_SAFETENSORS_DTYPES: dict[str, tuple[int, str]] = {
    "F64": (64, "float"),
    "F32": (32, "float"),
    "F16": (16, "float"),
    "BF16": (16, "float"),
    "F8_E4M3": (8, "float"),
    "F8_E4M3FNUZ": (8, "float"),
    "F8_E5M2": (8, "float"),
    "F8_E5M2FNUZ": (8, "float"),
    "F8_E8M0": (8, "float"),
    "F6_E2M3": (6, "float"),
    "F6_E3M2": (6, "float"),
    "F4": (4, "float"),
    "I64": (64, "int"),
    "I32": (32, "int"),
    "I16": (16, "int"),
    "I8": (8, "int"),
    "U64": (64, "int"),
    "U32": (32, "int"),
    "U16": (16, "int"),
    "U8": (8, "int"),
    "BOOL": (8, "bool"),
    # Valid safetensors, but no architecture here has complex parameters: check_weights_fit reports
    # it as a kind mismatch instead of calling the file malformed.
    "C64": (64, "complex"),
}

_EXPORT_HINT = (
    'export the weights with `safetensors.torch.save_file(model.state_dict(), "model.safetensors")` '
    "and upload that file"
)


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    kind: str  # "float" | "int" | "bool" ("complex" for C64)


class _Malformed(Exception):
    """Internal: why the bytes are not a safetensors file (turned into InvalidInput by the caller)."""


def _shape_str(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _Malformed(f"the header names {key!r} twice")
        out[key] = value
    return out


def _parse_safetensors(fh, file_size: int) -> dict[str, TensorInfo]:
    if file_size < 8:
        raise _Malformed(f"the file is {file_size} bytes long, shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", fh.read(8))
    if header_len > MAX_HEADER_BYTES:
        raise _Malformed(
            f"the header length field says {header_len} bytes, more than the {MAX_HEADER_BYTES}-byte limit"
        )
    if header_len > file_size - 8:
        raise _Malformed(
            f"the header length field says {header_len} bytes but only {file_size - 8} bytes follow it "
            "(the file is truncated or not safetensors)"
        )
    raw = fh.read(header_len)
    if len(raw) != header_len:
        raise _Malformed("the file ended while reading the header (truncated)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Malformed(f"the header is not UTF-8 (bad byte at position {exc.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise _Malformed(f"the header is not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(header, dict):
        raise _Malformed(f"the header is JSON but a {type(header).__name__}, not an object")

    data_len = file_size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in entry.items()
            ):
                raise _Malformed("__metadata__ must be an object mapping strings to strings")
            continue
        if not isinstance(entry, dict):
            raise _Malformed(f"the entry for tensor {name!r} is not an object")
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if dtype is None or shape is None or offsets is None:
            missing = [f for f in ("dtype", "shape", "data_offsets") if entry.get(f) is None]
            raise _Malformed(f"tensor {name!r} has no {', '.join(missing)}")
        if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
            raise _Malformed(
                f"tensor {name!r} has unknown dtype {dtype!r} (known: {', '.join(_SAFETENSORS_DTYPES)})"
            )
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _Malformed(f"tensor {name!r} has shape {shape!r}; a shape is a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) and o >= 0 for o in offsets)
        ):
            raise _Malformed(
                f"tensor {name!r} has data_offsets {offsets!r}; expected [begin, end] non-negative integers"
            )
        begin, end = offsets
        if end < begin:
            raise _Malformed(f"tensor {name!r} has data_offsets [{begin}, {end}] with end before begin")
        bits, kind = _SAFETENSORS_DTYPES[dtype]
        n_bits = math.prod(shape) * bits
        if n_bits % 8:
            raise _Malformed(
                f"tensor {name!r} ({dtype} {_shape_str(shape)}) does not fill a whole number of bytes"
            )
        if end - begin != n_bits // 8:
            raise _Malformed(
                f"tensor {name!r} ({dtype} {_shape_str(shape)}) needs {n_bits // 8} bytes but its "
                f"data_offsets [{begin}, {end}] span {end - begin}"
            )
        if end > data_len:
            raise _Malformed(
                f"tensor {name!r} needs bytes up to offset {end} but the data section holds only "
                f"{data_len} bytes (the file is truncated)"
            )
        tensors[name] = TensorInfo(dtype=dtype, shape=tuple(shape), kind=kind)
        spans.append((begin, end, name))

    spans.sort()
    cursor = 0
    previous = None
    for begin, end, name in spans:
        if begin < cursor:
            raise _Malformed(f"tensors {previous!r} and {name!r} overlap (data_offsets collide at byte {begin})")
        if begin > cursor:
            where = f"after tensor {previous!r}" if previous is not None else "at the start of the data"
            raise _Malformed(f"there is a gap of {begin - cursor} unused bytes {where} (before tensor {name!r})")
        cursor = end
        previous = name
    if cursor != data_len:
        raise _Malformed(f"the data section has {data_len - cursor} trailing bytes that belong to no tensor")
    return tensors


def _safetensors_or_reason(path: Path) -> tuple[dict[str, TensorInfo] | None, str, bytes]:
    """(tensors, "", head) for a valid safetensors file, else (None, why it is not, its first 8 bytes)."""
    with open(path, "rb") as fh:
        file_size = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        fh.seek(0)
        try:
            return _parse_safetensors(fh, file_size), "", head
        except _Malformed as exc:
            return None, str(exc), head


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors file's header without reading tensor data.

    Returns tensor name -> :class:`TensorInfo` in header order. Raises InvalidInput
    ("not a safetensors file: ...") for anything the format does not allow.
    """
    tensors, reason, head = _safetensors_or_reason(Path(path))
    if tensors is not None:
        return tensors
    # A valid safetensors header length can begin with these bytes too, so the magic numbers are
    # only consulted once the file has failed to parse.
    if head.startswith(b"PK"):
        raise InvalidInput(
            "not a safetensors file: it looks like a zip archive, as written by torch.save (a PyTorch "
            "checkpoint); " + _EXPORT_HINT + "."
        )
    if head.startswith(b"\x80"):
        raise InvalidInput(
            "not a safetensors file: it looks like a pickle, as written by torch.save or pickle.dump (a "
            "PyTorch checkpoint); " + _EXPORT_HINT + "."
        )
    raise InvalidInput(f"not a safetensors file: {reason}; {_EXPORT_HINT}.")


# --------------------------------------------------------------------------------------------------
# PyTorch files: told apart by content (zip entry names, pickle opcode), never by loading them
# --------------------------------------------------------------------------------------------------

MAX_ZIP_ENTRIES = 100_000  # a torch.save checkpoint has ~2 entries per tensor
MAX_ZIP_DIRECTORY_BYTES = 32 * 1024 * 1024  # zipfile reads the central directory into memory at once

_TORCHSCRIPT_REFUSAL = (
    "the file is a TorchScript archive (torch.jit.save: it holds {evidence}). TorchScript archives are "
    "programs, and loading one runs it, so they are refused. Load the model in your own environment and "
    "export its weights: `from safetensors.torch import save_file; save_file(model.state_dict(), "
    '"model.safetensors")` (a scripted module has the same state_dict()), then upload that file with the '
    "matching architecture"
)
_EXPORT_REFUSAL = (
    "the file is a torch.export archive (.pt2, torch.export.save: it holds {evidence}). A .pt2 archive is a "
    "serialized program, and torch.export.load can run code from a crafted archive, so .pt2 files are "
    "refused. Export the weights of the module you exported instead: `from safetensors.torch import "
    'save_file; save_file(model.state_dict(), "model.safetensors")`, then upload that file with the '
    "matching architecture"
)
_CHECKPOINT_HINT = (
    "Only weights-only state dicts are accepted from PyTorch files "
    "(torch.save(model.state_dict(), \"model.pt\")); better, upload safetensors: `from safetensors.torch "
    'import save_file; save_file(model.state_dict(), "model.safetensors")`'
)


def _zip_directory_size(fh, file_size: int) -> tuple[int, int] | None:
    """(entries, central directory bytes) from the end records, read without zipfile (which would
    build one object per entry first); None when the file has no end-of-central-directory record."""
    tail_len = min(file_size, 22 + 65535)
    fh.seek(file_size - tail_len)
    tail = fh.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + 22 > len(tail):
        return None
    entries, directory_bytes = struct.unpack_from("<HI", tail, at + 10)
    locator = at - 20
    if locator >= 0 and tail[locator:locator + 4] == b"PK\x06\x07":
        # zip64, as torch writes it: the locator points at the zip64 end record, whose counts win
        (offset,) = struct.unpack_from("<Q", tail, locator + 8)
        if offset > file_size - 56:
            return None
        fh.seek(offset)
        record = fh.read(56)
        if record[:4] != b"PK\x06\x06":
            return None
        entries, directory_bytes = struct.unpack_from("<QQ", record, 32)
    return entries, directory_bytes


def _zip_names(path: Path) -> list[str]:
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        directory = _zip_directory_size(fh, size)
    if directory is None:
        raise InvalidInput("the file starts like a zip archive but has no zip directory (truncated or corrupt); "
                           + _EXPORT_HINT + ".")
    entries, directory_bytes = directory
    if entries > MAX_ZIP_ENTRIES or directory_bytes > MAX_ZIP_DIRECTORY_BYTES:
        raise InvalidInput(
            f"the zip archive lists {entries} entries ({directory_bytes} bytes of directory), more than a model "
            f"checkpoint has (at most {MAX_ZIP_ENTRIES}); " + _EXPORT_HINT + "."
        )
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as exc:
        raise InvalidInput(f"the file is a corrupt zip archive ({exc}); {_EXPORT_HINT}.") from None


def classify_zip_entries(names: list[str]) -> str:
    """What a zip holds, from its entry names: "torch.export", "torchscript", "checkpoint" (torch.save)
    or "other". Torch archives put every entry under one top-level folder named after the file."""
    inner = [name.split("/", 1)[1] if "/" in name else name for name in names]
    export = [n for n in inner if n.rsplit("/", 1)[-1] in ("archive_format", "archive_version")
              or (n.startswith("models/") and n.endswith(".json"))]
    if export:
        return "torch.export"
    if any(n == "constants.pkl" or n.startswith("code/") for n in inner):
        return "torchscript"
    if "data.pkl" in inner:
        return "checkpoint"
    return "other"


def identify_model_file(path: Path) -> str:
    """ "safetensors" or "torch-checkpoint" (a torch.save zip or a raw pickle, to be converted by
    ``torch.load(weights_only=True)`` in a child process). Raises InvalidInput for TorchScript and
    torch.export archives, other zips and anything else, saying what was found and how to export."""
    tensors, reason, head = _safetensors_or_reason(Path(path))
    if tensors is not None:
        return "safetensors"
    if head.startswith(b"PK"):
        names = _zip_names(Path(path))
        kind = classify_zip_entries(names)
        if kind == "torch.export":
            evidence = ", ".join(sorted({n.split("/", 1)[-1] for n in names if "archive_" in n or "/models/" in n})[:3])
            raise InvalidInput(_EXPORT_REFUSAL.format(evidence=evidence or "a models/ program") + ".")
        if kind == "torchscript":
            evidence = "code/ and constants.pkl" if any("/code/" in f"/{n}" for n in names) else "constants.pkl"
            raise InvalidInput(_TORCHSCRIPT_REFUSAL.format(evidence=evidence) + ".")
        if kind == "checkpoint":
            return "torch-checkpoint"
        raise InvalidInput(
            "the file is a zip archive but not a PyTorch checkpoint (no data.pkl inside); if it is an .npz, upload "
            "it to /v1/datasets; model weights are safetensors: " + _EXPORT_HINT + "."
        )
    if head.startswith(b"\x80"):
        return "torch-checkpoint"  # pickle protocol 2+: legacy torch.save, or pickle.dump of anything
    raise InvalidInput(f"not a safetensors file: {reason}; {_EXPORT_HINT}.")


@dataclass(frozen=True)
class ConversionLimits:
    timeout_s: float = 120.0
    cpu_seconds: int = 60
    base_memory_bytes: int = 2 * 1024**3  # the interpreter and torch itself (address space, not RSS)
    memory_per_file_byte: int = 3  # the loaded tensors, their serialised copy and slack


_CONVERTER_MODULE = "worker.convert_checkpoint"
_REFUSED, _OUT_OF_MEMORY = 2, 3  # its exit codes (worker.convert_checkpoint.REFUSED, OUT_OF_MEMORY)
_PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Each child may map gigabytes; a few at once is plenty for uploads.
_CONVERSION_SLOTS = threading.BoundedSemaphore(2)


def _run_converter(source: Path, output: Path, workdir: Path, max_memory: int, max_output_bytes: int,
                   limits: ConversionLimits) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", _CONVERTER_MODULE, str(source), str(output),
               "--max-memory-bytes", str(max_memory), "--max-cpu-seconds", str(limits.cpu_seconds),
               "--max-output-bytes", str(max_output_bytes)]
    # A minimal environment: the child needs no secrets (database URLs) and one thread.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(_PROJECT_ROOT),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONHASHSEED": "0", "LC_ALL": "C.UTF-8"}
    with _CONVERSION_SLOTS:
        try:
            return subprocess.run(command, env=env, cwd=workdir, stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=limits.timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise InvalidInput(
                f"reading the PyTorch checkpoint took longer than {limits.timeout_s:g} s, the server's limit. "
                + _CHECKPOINT_HINT + "."
            ) from None


def convert_torch_checkpoint(
    source: Path, target: Path, *, max_output_bytes: int, limits: ConversionLimits = ConversionLimits()
) -> None:
    """Turn a weights-only PyTorch checkpoint into safetensors at ``target`` in a child process that
    loads it with ``torch.load(weights_only=True)`` under memory, CPU and wall-clock limits (this
    process never imports torch). Raises InvalidInput when the file is not a usable state dict."""
    source, target = Path(source), Path(target)
    max_memory = limits.base_memory_bytes + limits.memory_per_file_byte * source.stat().st_size
    # The child writes in a directory of its own (safetensors writes via a temporary file, which a
    # killed child would leave behind); it is removed whatever happens.
    workdir = Path(tempfile.mkdtemp(dir=target.parent, prefix="convert-"))
    try:
        result = _run_converter(source, workdir / "out.safetensors", workdir, max_memory, max_output_bytes, limits)
        if result.returncode == 0 and (workdir / "out.safetensors").is_file():
            os.replace(workdir / "out.safetensors", target)
            return
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    stdout = result.stdout.decode("utf-8", "replace").strip().splitlines()
    stderr = result.stderr.decode("utf-8", "replace")
    if result.returncode == _REFUSED and stdout:
        try:
            reason = json.loads(stdout[-1])["error"]
        except (ValueError, KeyError, TypeError):
            reason = None
        if reason:
            raise InvalidInput(f"the PyTorch checkpoint cannot be used: {reason}. {_CHECKPOINT_HINT}.")
    if result.returncode == -signal.SIGXFSZ:
        raise PayloadTooLarge(
            f"the safetensors file converted from the checkpoint exceeds the limit of {max_output_bytes} bytes"
        )
    if result.returncode in (_OUT_OF_MEMORY, -signal.SIGXCPU, -signal.SIGKILL) or "MemoryError" in stderr \
            or "std::bad_alloc" in stderr:
        raise InvalidInput(
            f"reading the PyTorch checkpoint exceeded the server's limits ({limits.cpu_seconds} CPU seconds, "
            f"{max_memory // 2**20} MiB of memory). " + _CHECKPOINT_HINT + "."
        )
    # torch missing or unable to start under the limits: the server's fault, not the file's
    if "ModuleNotFoundError" in stderr or "ImportError" in stderr:
        raise RuntimeError(f"the checkpoint converter cannot start: {stderr[-2000:]}")
    _log.warning("checkpoint conversion failed (exit %s): %s", result.returncode, stderr[-2000:])
    raise InvalidInput(
        "torch.load(weights_only=True) could not read the PyTorch checkpoint (it is corrupt or not a state "
        "dict). " + _CHECKPOINT_HINT + "."
    )


def check_weights_fit(
    tensors: dict[str, TensorInfo],
    expected: dict[str, tuple[tuple[int, ...], str]],
    architecture: str,
) -> None:
    """Raise InvalidInput unless ``tensors`` has exactly the keys of ``expected`` with the expected
    shapes and kinds; the check itself is :func:`service.architectures.state_dict_mismatch`. Each
    error entry for a key the file has also names its safetensors dtype."""
    found = {key: (t.shape, t.kind) for key, t in tensors.items()}
    mismatch = state_dict_mismatch(architecture, expected, found)
    if mismatch is not None:
        errors = [e | {"dtype": tensors[e["key"]].dtype} if e["key"] in tensors else e for e in mismatch.errors]
        raise InvalidInput(mismatch.message, errors=errors)


# --------------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------------

MAX_CSV_BYTES = 100_000_000
MAX_NPZ_UNCOMPRESSED_BYTES = 4 * 1024**3  # guards against zip bombs in savez_compressed files
MAX_CLASSES = 10_000
MAX_GROUP_VALUES = 10_000
ATTRIBUTE_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")
MISSING_TOKENS = frozenset({"", "nan", "na", "none"})
_CSV_CHUNK_ROWS = 8192


@dataclass
class GroupColumn:
    codes: np.ndarray  # int32, -1 = missing
    names: list[str]  # names[code]


@dataclass
class ParsedDataset:
    x: np.ndarray  # float32 [N, ...]
    y: np.ndarray  # int64 class codes 0..C-1
    classes: list[str]
    groups: dict[str, GroupColumn]


def _rows_list(indices: np.ndarray, *, limit: int = 5) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:limit])
    return shown + (", ..." if len(indices) > limit else "")


def _check_attribute_name(attr: str, fix: str) -> None:
    if not ATTRIBUTE_RE.match(attr):
        raise InvalidInput(
            f"{attr!r} cannot be a group attribute name: names must be 1-64 letters, digits or "
            f"underscores; {fix}"
        )


def _number_name(value: float) -> str:
    value = float(value)
    if value.is_integer():
        return str(int(value))
    return repr(value)


def _finish_strings(
    distinct: list[str], provisional: np.ndarray, *, what: str, numeric: bool | None
) -> GroupColumn:
    """Turn provisional codes into a sorted coding. ``distinct[i]`` is the stripped raw text of
    provisional code i; missing tokens become -1. With ``numeric=None`` the values sort numerically
    when every present value parses as a number (CSV), else lexicographically."""
    keep = [i for i, v in enumerate(distinct) if v.lower() not in MISSING_TOKENS]
    values = [distinct[i] for i in keep]
    if numeric is None:
        try:
            keys = [float(v) for v in values]
            numeric = True
        except ValueError:
            numeric = False
    order = (
        sorted(range(len(values)), key=lambda j: (keys[j], values[j]))
        if numeric
        else sorted(range(len(values)), key=lambda j: values[j])
    )
    remap = np.full(len(distinct) + 1, -1, dtype=np.int32)  # the extra slot maps -1 to -1
    names: list[str] = []
    for new_code, j in enumerate(order):
        remap[keep[j]] = new_code
        names.append(values[j])
    codes = remap[provisional]
    return _checked_group(GroupColumn(codes=codes, names=names), what)


def _checked_group(col: GroupColumn, what: str) -> GroupColumn:
    if not col.names:
        raise InvalidInput(f"{what} has no values: all {len(col.codes)} rows are missing")
    if len(col.names) > MAX_GROUP_VALUES:
        raise InvalidInput(
            f"{what} has {len(col.names)} distinct values, more than the {MAX_GROUP_VALUES} allowed; "
            "a group attribute should be a category (e.g. sex, age band), not an identifier"
        )
    return col


def _encode_group_array(arr: np.ndarray, what: str) -> GroupColumn:
    kind = arr.dtype.kind
    if kind in "US":
        text = arr.astype(str) if kind == "S" else arr
        stripped = np.char.strip(text)
        missing = np.isin(np.char.lower(stripped), list(MISSING_TOKENS))
        uniq, inverse = np.unique(stripped[~missing], return_inverse=True)
        codes = np.full(arr.shape[0], -1, dtype=np.int32)
        codes[~missing] = inverse.astype(np.int32).reshape(-1)
        return _checked_group(GroupColumn(codes=codes, names=[str(u) for u in uniq]), what)
    if kind in "iub":
        uniq, inverse = np.unique(arr, return_inverse=True)
        names = [str(bool(u)) for u in uniq] if kind == "b" else [str(int(u)) for u in uniq]
        return _checked_group(GroupColumn(codes=inverse.astype(np.int32).reshape(-1), names=names), what)
    if kind == "f":
        missing = np.isnan(arr)
        inf = np.isinf(arr)
        if inf.any():
            raise InvalidInput(
                f"{what} has {int(inf.sum())} infinite values (rows, 0-based: {_rows_list(np.flatnonzero(inf))}); "
                "use NaN for a missing group value"
            )
        uniq, inverse = np.unique(arr[~missing], return_inverse=True)
        codes = np.full(arr.shape[0], -1, dtype=np.int32)
        codes[~missing] = inverse.astype(np.int32).reshape(-1)
        return _checked_group(GroupColumn(codes=codes, names=[_number_name(u) for u in uniq]), what)
    raise InvalidInput(
        f"{what} has dtype {arr.dtype}; a group attribute must hold integers or strings (NaN in a float "
        "array, or '', 'NA', 'None' in a string array, marks a missing value)"
    )


def _labels_from_ints(values: np.ndarray, what: str) -> tuple[np.ndarray, list[str]]:
    if values.size and values.min() < 0:
        bad = np.flatnonzero(values < 0)
        raise InvalidInput(
            f"{what} has {len(bad)} negative labels (rows, 0-based: {_rows_list(bad)}); integer labels are class "
            "indices 0..C-1, or store the labels as strings"
        )
    top = int(values.max()) if values.size else -1
    if top + 1 > MAX_CLASSES:
        raise InvalidInput(
            f"the largest label in {what} is {top}; integer labels are class indices 0..max, and more than "
            f"{MAX_CLASSES} classes are not supported. If the labels are identifiers, store them as strings"
        )
    return values.astype(np.int64), [str(i) for i in range(top + 1)]


def _encode_npz_labels(y: np.ndarray, n: int) -> tuple[np.ndarray, list[str]]:
    if y.ndim != 1 or y.shape[0] != n:
        raise InvalidInput(f"y has shape {_shape_str(y.shape)}; it must be 1-D with one label per row of x ({n})")
    kind = y.dtype.kind
    if kind in "iub":
        return _labels_from_ints(y.astype(np.int64), "y")
    if kind == "f":
        bad = np.flatnonzero(~np.isfinite(y))
        if len(bad):
            raise InvalidInput(f"y has {len(bad)} NaN or infinite labels (rows, 0-based: {_rows_list(bad)})")
        frac = np.flatnonzero(y != np.floor(y))
        if len(frac):
            raise InvalidInput(
                f"y holds floats and {len(frac)} are not whole numbers (e.g. {float(y[frac[0]])!r} in row {int(frac[0])}, "
                "0-based); labels must be class indices or class names"
            )
        if y.size and float(y.max()) >= 2**62:
            raise InvalidInput(f"y's largest label is {float(y.max())!r}, far beyond a class index")
        return _labels_from_ints(y.astype(np.int64), "y")
    if kind in "US":
        text = np.char.strip(y.astype(str) if kind == "S" else y)
        empty = np.flatnonzero(text == "")
        if len(empty):
            raise InvalidInput(
                f"y has {len(empty)} empty labels (rows, 0-based: {_rows_list(empty)}); every row needs a label"
            )
        uniq, inverse = np.unique(text, return_inverse=True)
        if len(uniq) > MAX_CLASSES:
            raise InvalidInput(f"y has {len(uniq)} distinct labels, more than the {MAX_CLASSES} classes supported")
        return inverse.astype(np.int64).reshape(-1), [str(u) for u in uniq]
    raise InvalidInput(f"y has dtype {y.dtype}; labels must be non-negative integers or strings")


def _convert_features(x: np.ndarray) -> np.ndarray:
    if x.dtype.kind == "b":
        raise InvalidInput("x is a boolean array; store features as numbers (e.g. x.astype(np.float32))")
    if x.dtype.kind not in "iuf":
        raise InvalidInput(f"x has dtype {x.dtype}; features must be integers or floats")
    if x.ndim < 2:
        raise InvalidInput(
            f"x has shape {_shape_str(x.shape)}; it must be [N, features...] with at least 2 dimensions "
            "(for a single feature use x.reshape(-1, 1))"
        )
    if x.shape[0] < 1:
        raise InvalidInput("x has no rows; the dataset must have at least one example")
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(x, dtype=np.float32)
    flat = out.reshape(out.shape[0], -1)
    finite = np.isfinite(flat)
    if not finite.all():
        nan_rows = np.flatnonzero(np.isnan(flat).any(axis=1))
        inf_rows = np.flatnonzero(np.isinf(flat).any(axis=1))
        n_nan = int(np.isnan(flat).sum())
        n_inf = int(np.isinf(flat).sum())
        src_inf = int(np.isinf(x).sum()) if x.dtype.kind == "f" else 0
        pieces = []
        if n_nan:
            pieces.append(f"{n_nan} NaN values (first rows, 0-based: {_rows_list(nan_rows)})")
        if n_inf:
            note = f", {n_inf - src_inf} of them finite {x.dtype} values too large for float32" if n_inf > src_inf else ""
            pieces.append(f"{n_inf} infinite values{note} (first rows, 0-based: {_rows_list(inf_rows)})")
        raise InvalidInput("x has " + " and ".join(pieces) + "; every feature must be a finite number")
    return out


def read_npz_dataset(path: Path, *, max_uncompressed_bytes: int = MAX_NPZ_UNCOMPRESSED_BYTES) -> ParsedDataset:
    """Read an ``.npz`` with arrays ``x``, ``y`` and one or more ``group_<attribute>``."""
    path = Path(path)
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic.startswith(b"\x93NUMPY"):
        raise InvalidInput(
            "this is a single .npy array, not an .npz archive; save the dataset with "
            "np.savez(path, x=x, y=y, group_<attribute>=...)"
        )
    if not magic.startswith(b"PK"):
        hint = " (it looks like a pickle, which is refused)" if magic.startswith(b"\x80") else ""
        raise InvalidInput(
            f"not an .npz archive{hint}; save the dataset with np.savez(path, x=x, y=y, group_<attribute>=...)"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            total = sum(info.file_size for info in zf.infolist())
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise InvalidInput(f"the .npz archive is corrupt ({exc}); save it again with np.savez") from None
    if total > max_uncompressed_bytes:
        raise InvalidInput(
            f"the .npz archive expands to {total} bytes, more than the {max_uncompressed_bytes} allowed"
        )

    arrays: dict[str, np.ndarray] = {}
    try:
        npz = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise InvalidInput(f"the .npz archive cannot be read ({exc}); save it again with np.savez") from None
    with npz:
        names = list(npz.files)
        unknown = [n for n in names if n not in ("x", "y") and not n.startswith("group_")]
        if unknown:
            raise InvalidInput(
                f"the .npz has arrays this service does not know: {', '.join(map(repr, unknown[:10]))}; "
                "allowed names are x, y and group_<attribute> (one per group attribute)",
                errors=[{"key": n, "problem": "unexpected"} for n in unknown],
            )
        for required in ("x", "y"):
            if required not in names:
                raise InvalidInput(
                    f"the .npz has no array {required!r} (it has: {', '.join(names) or 'nothing'}); "
                    "required are x (features), y (labels) and at least one group_<attribute>"
                )
        attrs = [n[len("group_"):] for n in names if n.startswith("group_")]
        if not attrs:
            raise InvalidInput(
                "the .npz has no group attribute: add at least one array named group_<attribute> "
                "(e.g. group_sex) with one value per row"
            )
        for attr in attrs:
            _check_attribute_name(attr, f"rename the array group_{attr}")
        for name in names:
            try:
                arrays[name] = npz[name]
            except ValueError as exc:
                if "pickle" in str(exc).lower() or "object" in str(exc).lower():
                    raise InvalidInput(
                        f"array {name!r} is an object array (Python objects, e.g. from pandas); object "
                        "arrays would have to be unpickled, which is refused. Convert it first, e.g. "
                        "np.asarray(values, dtype=str) or dtype=np.float32"
                    ) from None
                raise InvalidInput(f"array {name!r} in the .npz cannot be read ({exc})") from None
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise InvalidInput(f"array {name!r} in the .npz is corrupt ({exc}); save it again") from None

    x = _convert_features(arrays["x"])
    n = x.shape[0]
    y, classes = _encode_npz_labels(arrays["y"], n)
    groups: dict[str, GroupColumn] = {}
    for attr in sorted(attrs):
        arr = arrays[f"group_{attr}"]
        if arr.ndim != 1 or arr.shape[0] != n:
            raise InvalidInput(
                f"group_{attr} has shape {_shape_str(arr.shape)}; it must be 1-D with one value per row of x ({n})"
            )
        groups[attr] = _encode_group_array(arr, f"group_{attr}")
    return ParsedDataset(x=x, y=y, classes=classes, groups=groups)


class _Interner:
    """Maps stripped strings to provisional codes while streaming."""

    __slots__ = ("ids", "values", "codes")

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.values: list[str] = []
        self.codes = array("i")

    def add(self, text: str) -> None:
        code = self.ids.get(text)
        if code is None:
            code = self.ids[text] = len(self.values)
            self.values.append(text)
        self.codes.append(code)

    def provisional(self) -> np.ndarray:
        return np.frombuffer(self.codes, dtype=np.int32) if len(self.codes) else np.zeros(0, dtype=np.int32)


def _column_listing(header: list[str]) -> str:
    shown = ", ".join(repr(h) for h in header[:50])
    return shown + (f" and {len(header) - 50} more" if len(header) > 50 else "")


def _parse_feature_chunk(cells: list[list[str]], row_numbers: list[int], feature_names: list[str]) -> np.ndarray:
    try:
        block = np.array(cells, dtype=np.float64)
    except ValueError:
        block = None
    if block is None:
        for r, row in enumerate(cells):
            for c, cell in enumerate(row):
                try:
                    float(cell)
                except ValueError:
                    raise InvalidInput(
                        f"feature column {feature_names[c]!r} has {cell!r} in row {row_numbers[r]}, which is not "
                        "a number; features must be numeric (rows count from 1 at the header, as in a spreadsheet)"
                    ) from None
        block = np.array([[float(v) for v in row] for row in cells], dtype=np.float64)
    with np.errstate(over="ignore"):
        out = block.astype(np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        r, c = (int(v[0]) for v in np.nonzero(bad))
        raise InvalidInput(
            f"feature column {feature_names[c]!r} has {cells[r][c].strip()!r} in row {row_numbers[r]}, which is not "
            "a finite float32 number; features must be finite (rows count from 1 at the header, as in a spreadsheet)"
        )
    return out


def read_csv_dataset(
    path: Path, *, label: str, features: list[str] | None, groups: list[str]
) -> ParsedDataset:
    """Read a UTF-8 CSV with a header row in one streaming pass.

    ``features`` defaults to every column that is neither the label nor a group column."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_CSV_BYTES:
        raise InvalidInput(
            f"the CSV is {size} bytes, more than the {MAX_CSV_BYTES} bytes a CSV may have; upload the "
            "dataset as .npz (np.savez) instead"
        )
    if not groups:
        raise InvalidInput("name at least one group attribute column (groups); the audit compares groups")
    for what, names in (("groups", groups), ("features", features or [])):
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise InvalidInput(f"{what} lists {', '.join(map(repr, dup))} more than once")
    for attr in groups:
        _check_attribute_name(attr, "rename the CSV column")

    try:
        fh = open(path, "r", encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise InvalidInput(f"the CSV cannot be opened ({exc})") from None
    try:
        with fh:
            reader = csv.reader(fh, strict=True)
            try:
                header = next(reader, None)
                if header is None:
                    raise InvalidInput("the CSV is empty; it needs a header row naming the columns and data rows")
                header = [h.strip() for h in header]
                if len(header) == 1 and (";" in header[0] or "\t" in header[0]):
                    sep = "';'" if ";" in header[0] else "tabs"
                    raise InvalidInput(
                        f"the CSV header has one column {header[0]!r}; the file seems to separate values with "
                        f"{sep}; save it with commas"
                    )
                index = {}
                for i, h in enumerate(header):
                    index.setdefault(h, i)
                wanted = [label, *groups, *(features or [])]
                absent = [c for c in dict.fromkeys(wanted) if c not in index]
                if absent:
                    raise InvalidInput(
                        f"the CSV has no column {', '.join(map(repr, absent))}; available columns: "
                        f"{_column_listing(header)}",
                        errors=[{"key": c, "problem": "missing_column"} for c in absent],
                    )
                if features is None:
                    excluded = {label, *groups}
                    feature_names = [h for h in header if h not in excluded]
                    unnamed = [i + 1 for i, h in enumerate(header) if h == ""]
                    if unnamed:
                        raise InvalidInput(
                            f"CSV column {unnamed[0]} has no name (a pandas index? save with index=False), so "
                            "it cannot be used as a feature; name it or list the features explicitly"
                        )
                else:
                    if label in features:
                        raise InvalidInput(f"the label column {label!r} cannot also be a feature")
                    feature_names = list(features)
                if not feature_names:
                    raise InvalidInput(
                        f"the CSV has no feature columns: every column is the label or a group attribute "
                        f"(columns: {_column_listing(header)})"
                    )
                counts = Counter(header)
                dup = sorted({c for c in (label, *groups, *feature_names) if counts[c] > 1})
                if dup:
                    raise InvalidInput(f"the CSV header has more than one column named {', '.join(map(repr, dup))}")

                label_i = index[label]
                group_is = [index[g] for g in groups]
                feat_is = [index[f] for f in feature_names]
                width = len(header)
                labels = _Interner()
                group_cols = [_Interner() for _ in groups]
                chunks: list[np.ndarray] = []
                pending: list[list[str]] = []
                pending_rows: list[int] = []
                row_no = 1  # the header; data rows count on from 2, blank lines included, as in a spreadsheet
                for row in reader:
                    row_no += 1
                    if not row or (len(row) == 1 and not row[0].strip()):
                        continue  # blank line
                    if len(row) != width:
                        raise InvalidInput(
                            f"CSV row {row_no} has {len(row)} cells but the header has {width}; every row needs "
                            "one cell per column (quote cells that contain commas)"
                        )
                    text = row[label_i].strip()
                    if not text:
                        raise InvalidInput(f"the label column {label!r} is empty in row {row_no}; every row needs a label")
                    labels.add(text)
                    for interner, gi in zip(group_cols, group_is):
                        interner.add(row[gi].strip())
                    pending.append([row[i] for i in feat_is])
                    pending_rows.append(row_no)
                    if len(pending) >= _CSV_CHUNK_ROWS:
                        chunks.append(_parse_feature_chunk(pending, pending_rows, feature_names))
                        pending, pending_rows = [], []
                if pending:
                    chunks.append(_parse_feature_chunk(pending, pending_rows, feature_names))
            except csv.Error as exc:
                raise InvalidInput(f"the CSV is malformed near line {reader.line_num}: {exc}; check its quoting") from None
    except UnicodeDecodeError:
        raise InvalidInput("the CSV is not valid UTF-8; save it with UTF-8 encoding") from None

    if not chunks:
        raise InvalidInput("the CSV has a header but no data rows; the dataset needs at least one example")
    x = np.concatenate(chunks, axis=0) if len(chunks) > 1 else chunks[0]
    n = x.shape[0]

    # Labels: integer class indices when every label is an integer >= 0, else sorted strings.
    ints: list[int] | None = []
    for v in labels.values:
        try:
            iv = int(v)
        except ValueError:
            ints = None
            break
        if iv < 0:
            ints = None
            break
        ints.append(iv)
    provisional = labels.provisional()
    if ints is not None:
        lookup = np.asarray(ints, dtype=np.int64)
        y, classes = _labels_from_ints(lookup[provisional], f"the label column {label!r}")
    else:
        if len(labels.values) > MAX_CLASSES:
            raise InvalidInput(
                f"the label column {label!r} has {len(labels.values)} distinct values, more than the "
                f"{MAX_CLASSES} classes supported"
            )
        order = sorted(range(len(labels.values)), key=lambda i: labels.values[i])
        remap = np.empty(len(order), dtype=np.int64)
        remap[order] = np.arange(len(order))
        y, classes = remap[provisional], [labels.values[i] for i in order]

    group_out = {
        attr: _finish_strings(interner.values, interner.provisional(), what=f"group column {attr!r}", numeric=None)
        for attr, interner in zip(groups, group_cols)
    }
    assert y.shape[0] == n
    return ParsedDataset(x=x, y=y, classes=classes, groups=group_out)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_dataset(ds: ParsedDataset, directory: Path) -> dict:
    """Write ``x.npy``, ``y.npy`` and ``group_<attr>.npy`` under ``directory``; return a summary."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    x = np.ascontiguousarray(ds.x, dtype=np.float32)
    y = np.ascontiguousarray(ds.y, dtype=np.int64)
    _save_npy(directory / "x.npy", x)
    _save_npy(directory / "y.npy", y)
    summary_groups: dict[str, dict] = {}
    for attr, col in ds.groups.items():
        _check_attribute_name(attr, "rename the attribute")
        codes = np.ascontiguousarray(col.codes, dtype=np.int32)
        _save_npy(directory / f"group_{attr}.npy", codes)
        present = codes[codes >= 0]
        sizes = np.bincount(present, minlength=len(col.names))[: len(col.names)]
        summary_groups[attr] = {
            "names": list(col.names),
            "sizes": [int(s) for s in sizes],
            "missing": int((codes < 0).sum()),
        }
    return {
        "rows": int(x.shape[0]),
        "feature_shape": [int(d) for d in x.shape[1:]],
        "classes": list(ds.classes),
        "groups": summary_groups,
    }


def load_dataset_arrays(
    directory: Path, attributes: list[str]
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Memory-map a dataset written by :func:`save_dataset`: (x, y, {attribute: codes})."""
    directory = Path(directory)
    available = sorted(p.name[len("group_"):-len(".npy")] for p in directory.glob("group_*.npy"))
    absent = [a for a in attributes if a not in available]
    if absent:
        raise InvalidInput(
            f"the dataset has no group attribute {', '.join(map(repr, absent))}; it has: "
            f"{', '.join(available) or 'none'}"
        )
    x = np.load(directory / "x.npy", mmap_mode="r", allow_pickle=False)
    y = np.load(directory / "y.npy", mmap_mode="r", allow_pickle=False)
    groups = {a: np.load(directory / f"group_{a}.npy", mmap_mode="r", allow_pickle=False) for a in attributes}
    return x, y, groups
