"""PyTorch files, told apart by content (zip entry names, the pickle opcode), never by loading them:
TorchScript and torch.export archives are refused; a torch.save checkpoint is converted to
safetensors by a resource-limited child process that loads it only with
``torch.load(weights_only=True)``. This process never imports torch."""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path

from service.errors import InvalidInput
from service.ingest.converter_child import ChildTask, ConversionLimits, child_failure, run_child
from service.ingest.limits import DEFAULT_LIMITS, IngestLimits
from service.ingest.safetensors import EXPORT_HINT, read_safetensors_header
from service.temp_names import temp_prefix

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
    '(torch.save(model.state_dict(), "model.pt")); better, upload safetensors: `from safetensors.torch '
    'import save_file; save_file(model.state_dict(), "model.safetensors")`'
)


def identify_model_file(path: Path, limits: IngestLimits = DEFAULT_LIMITS) -> str:
    """ "safetensors" or "torch-checkpoint" (a torch.save zip or a raw pickle, to be converted by
    :func:`convert_torch_checkpoint`). Raises InvalidInput for TorchScript and torch.export
    archives, other zips and anything else, saying what was found and how to export."""
    path = Path(path)
    try:
        read_safetensors_header(path, limits)
        return "safetensors"
    except InvalidInput:
        with open(path, "rb") as handle:
            head = handle.read(2)
        if head == b"PK":
            return _identify_zip(path)
        if head.startswith(b"\x80"):
            return "torch-checkpoint"  # pickle protocol 2+: legacy torch.save, or pickle.dump of anything
        raise  # why the file is not safetensors


def _identify_zip(path: Path) -> str:
    names = _zip_names(path)
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
        "it to /v1/datasets; model weights are safetensors: " + EXPORT_HINT + "."
    )


def classify_zip_entries(names: list[str]) -> str:
    """What a zip holds, from its entry names: "torch.export", "torchscript", "checkpoint" (torch.save)
    or "other". Torch archives put every entry under one top-level folder named after the file."""
    inner = [name.split("/", 1)[1] if "/" in name else name for name in names]
    export = [
        n
        for n in inner
        if n.rsplit("/", 1)[-1] in ("archive_format", "archive_version")
        or (n.startswith("models/") and n.endswith(".json"))
    ]
    if export:
        return "torch.export"
    if any(n == "constants.pkl" or n.startswith("code/") for n in inner):
        return "torchscript"
    if "data.pkl" in inner:
        return "checkpoint"
    return "other"


def _zip_directory_size(handle, file_size: int) -> tuple[int, int] | None:
    """(entries, central directory bytes) from the end records, read without zipfile (which would
    build one object per entry first); None when the file has no end-of-central-directory record."""
    tail_len = min(file_size, 22 + 65535)
    handle.seek(file_size - tail_len)
    tail = handle.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + 22 > len(tail):
        return None
    entries, directory_bytes = struct.unpack_from("<HI", tail, at + 10)
    locator = at - 20
    if locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07":
        # zip64, as torch writes it: the locator points at the zip64 end record, whose counts win
        (offset,) = struct.unpack_from("<Q", tail, locator + 8)
        if offset > file_size - 56:
            return None
        handle.seek(offset)
        record = handle.read(56)
        if record[:4] != b"PK\x06\x06":
            return None
        entries, directory_bytes = struct.unpack_from("<QQ", record, 32)
    return entries, directory_bytes


def _zip_names(path: Path) -> list[str]:
    with open(path, "rb") as handle:
        directory = _zip_directory_size(handle, os.fstat(handle.fileno()).st_size)
    if directory is None:
        raise InvalidInput(
            "the file starts like a zip archive but has no zip directory (truncated or corrupt); " + EXPORT_HINT + "."
        )
    entries, directory_bytes = directory
    if entries > MAX_ZIP_ENTRIES or directory_bytes > MAX_ZIP_DIRECTORY_BYTES:
        raise InvalidInput(
            f"the zip archive lists {entries} entries ({directory_bytes} bytes of directory), more than a model "
            f"checkpoint has (at most {MAX_ZIP_ENTRIES}); " + EXPORT_HINT + "."
        )
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as exc:
        raise InvalidInput(f"the file is a corrupt zip archive ({exc}); {EXPORT_HINT}.") from None


# --------------------------------------------------------------------------------------------------
# conversion of a torch.save checkpoint, in a child process
# --------------------------------------------------------------------------------------------------


_LIMITS = ConversionLimits()
_CONVERTER = ChildTask(
    module="worker.convert_checkpoint",
    doing="reading the PyTorch checkpoint",
    subject="the PyTorch checkpoint",
    output_too_large="the safetensors file converted from the checkpoint exceeds the limit of {limit} bytes",
    unreadable="torch.load(weights_only=True) could not read the PyTorch checkpoint (it is corrupt or not a state "
    "dict)",
    hint=_CHECKPOINT_HINT,
)


def convert_torch_checkpoint(
    source: Path, target: Path, *, max_output_bytes: int, limits: ConversionLimits = _LIMITS
) -> None:
    """Turn a weights-only PyTorch checkpoint into safetensors at ``target`` in a child process that
    loads it with ``torch.load(weights_only=True)`` under memory, CPU and wall-clock limits (this
    process never imports torch). Raises InvalidInput when the file is not a usable state dict."""
    source, target = Path(source), Path(target)
    max_rss = limits.max_rss_bytes(source.stat().st_size)
    # The child writes in a directory of its own (safetensors writes via a temporary file, which a
    # killed child would leave behind); it is removed whatever happens.
    workdir = Path(tempfile.mkdtemp(dir=target.parent, prefix=temp_prefix("convert")))
    try:
        output = workdir / "out.safetensors"
        outcome = run_child(
            _CONVERTER, source, output, workdir, max_rss=max_rss, max_output_bytes=max_output_bytes, limits=limits
        )
        if outcome.returncode == 0 and output.is_file():
            os.replace(output, target)
            return
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    raise child_failure(_CONVERTER, outcome, max_rss, max_output_bytes, limits)
