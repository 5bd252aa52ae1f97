"""Model weights in safetensors: the header is validated by the safetensors library's own parser
(``safe_open`` with the numpy framework: no torch, no tensor bytes read, nothing unpickled) after a
few pure-Python pre-checks, then the tensors are checked against the architecture's state dict."""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from arch.mismatch import Tensors, state_dict_mismatch
from service.errors import InvalidInput
from service.ingest.excerpts import cut, quoted
from service.ingest.limits import DEFAULT_LIMITS, IngestLimits

# The caps (IngestLimits: max_header_bytes, max_tensors, max_tensor_name_bytes) bound what parsing a
# header costs the web process before the safetensors library sees it: safe_open accepts any number
# of zero-size tensors, which cost no data bytes, and names of any length.
#
# A size, offset or dimension is at most 2**64 - 1: 20 digits. Python's json would otherwise build
# integers of up to 4,300 digits, and raise ValueError (not JSONDecodeError) beyond.
MAX_INTEGER_DIGITS = 20
# Entries of a weights-fit error's `errors` (its message counts them all).
MAX_ERRORS_LISTED = 20
_REASON_CHARS = 500

EXPORT_HINT = (
    'export the weights with `safetensors.torch.save_file(model.state_dict(), "model.safetensors")` '
    "and upload that file"
)

# The kinds check_weights_fit compares, for the dtypes the safetensors format defines (0.8).
_DTYPE_KINDS: dict[str, str] = {
    **dict.fromkeys(
        (
            "F64",
            "F32",
            "F16",
            "BF16",
            "F8_E4M3",
            "F8_E4M3FNUZ",
            "F8_E5M2",
            "F8_E5M2FNUZ",
            "F8_E8M0",
            "F6_E2M3",
            "F6_E3M2",
            "F4",
        ),
        "float",
    ),
    **dict.fromkeys(("I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8"), "int"),
    "BOOL": "bool",
    # Valid safetensors, but no architecture here has complex parameters: check_weights_fit reports
    # it as a kind mismatch instead of calling the file malformed.
    "C64": "complex",
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    kind: str  # "float" | "int" | "bool" ("complex" for C64)


class _Malformed(Exception):
    """Internal: why the bytes are not a safetensors file (turned into InvalidInput below)."""


def read_safetensors_header(path: Path, limits: IngestLimits = DEFAULT_LIMITS) -> dict[str, TensorInfo]:
    """Validate a safetensors file's header without reading tensor data.

    Returns tensor name -> :class:`TensorInfo` in the order of the tensors' data. Raises
    InvalidInput ("not a safetensors file: ...") for anything the format does not allow."""
    path = Path(path)
    with open(path, "rb") as handle:
        file_size = os.fstat(handle.fileno()).st_size
        head = handle.read(8)
        try:
            _check_header_json(_header_text(handle, head, file_size, limits.max_header_bytes), limits)
            return _open_validated(path)
        except _Malformed as exc:
            reason = cut(str(exc), _REASON_CHARS)
    # A valid safetensors header length can begin with these bytes too, so the magic numbers are
    # only consulted once the file has failed to parse.
    if head.startswith(b"PK"):
        raise InvalidInput(
            "not a safetensors file: it looks like a zip archive, as written by torch.save (a PyTorch "
            "checkpoint); " + EXPORT_HINT + "."
        )
    if head.startswith(b"\x80"):
        raise InvalidInput(
            "not a safetensors file: it looks like a pickle, as written by torch.save or pickle.dump (a "
            "PyTorch checkpoint); " + EXPORT_HINT + "."
        )
    raise InvalidInput(f"not a safetensors file: {reason}; {EXPORT_HINT}.")


def _header_text(handle, head: bytes, file_size: int, max_header_bytes: int) -> str:
    """The header, read after the length prefix. safe_open rejects the same files, but only as
    "header too small" or "invalid header length"; these say what is wrong, and the bound keeps the
    pre-check's JSON parser below from being handed a huge header."""
    if file_size < 8:
        raise _Malformed(f"the file is {file_size} bytes long, shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > max_header_bytes:
        raise _Malformed(
            f"the header length field says {header_len} bytes, more than the {max_header_bytes}-byte limit "
            "(setting max_safetensors_header_bytes)"
        )
    if header_len > file_size - 8:
        raise _Malformed(
            f"the header length field says {header_len} bytes but only {file_size - 8} bytes follow it "
            "(the file is truncated or not safetensors)"
        )
    try:
        return handle.read(header_len).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Malformed(f"the header is not UTF-8 (bad byte at position {exc.start})") from None


def _check_header_json(text: str, limits: IngestLimits) -> None:
    """Pre-checks safe_open does not make: it keeps the last of two entries with the same name (a file
    that means different things to different readers) and accepts any number of tensors and names of
    any length. Parsing the JSON here also must not fail with a 500 on nesting bombs or huge integers."""
    too_many = (
        f"the header describes more than {limits.max_tensors} tensors, more than any model here has "
        "(setting max_tensors)"
    )
    objects = 0

    def unique_object(pairs: list[tuple[str, object]]) -> dict:
        nonlocal objects
        objects += 1  # counted as parsed, so a header with millions of entries stops early
        if objects > limits.max_tensors + 2:  # the tensor entries, __metadata__ and the header itself
            raise _Malformed(too_many)
        out: dict = {}
        for key, value in pairs:
            if len(key.encode("utf-8", "replace")) > limits.max_tensor_name_bytes:
                raise _Malformed(
                    f"the header holds a name of {len(key)} characters, {quoted(key, 40)}, longer than the "
                    f"{limits.max_tensor_name_bytes} bytes a tensor name may have (setting max_tensor_name_bytes)"
                )
            if key in out:
                raise _Malformed(f"the header names {quoted(key)} twice")
            out[key] = value
        return out

    try:
        header = json.loads(text, object_pairs_hook=unique_object, parse_int=_bounded_int)
    except json.JSONDecodeError as exc:
        raise _Malformed(f"the header is not valid JSON ({exc.msg} at character {exc.pos})") from None
    except RecursionError:
        raise _Malformed("the header nests JSON arrays or objects too deeply to be a safetensors header") from None
    if not isinstance(header, dict):
        raise _Malformed(f"the header is JSON but a {type(header).__name__}, not an object")
    if len(header) - ("__metadata__" in header) > limits.max_tensors:
        raise _Malformed(too_many)


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INTEGER_DIGITS:
        raise _Malformed(f"the header holds a {digits}-digit integer, too large for any size or offset")
    return int(text)


def _open_validated(path: Path) -> dict[str, TensorInfo]:
    """safe_open checks the entries (dtype, shape, data_offsets), that the tensors lie back to back
    without gap or overlap, that each span fits its dtype and shape, and that they cover the file."""
    # Imported here: the web process imports this module at start-up and stays light until a model
    # is uploaded (tests/integration/test_web_process.py holds it to that).
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as weights:
            slices = {name: weights.get_slice(name) for name in weights.offset_keys()}
            found = {name: (piece.get_dtype(), tuple(piece.get_shape())) for name, piece in slices.items()}
    except SafetensorError as exc:
        raise _Malformed(_reworded(str(exc))) from None
    tensors = {}
    for name, (dtype, shape) in found.items():
        if dtype not in _DTYPE_KINDS:  # a dtype added to the format after this table was written
            raise _Malformed(f"tensor {name!r} has dtype {dtype}, which this service does not support")
        tensors[name] = TensorInfo(dtype=dtype, shape=shape, kind=_DTYPE_KINDS[dtype])
    return tensors


# safe_open's reasons (safetensors 0.8), in a user's words; any other reason is passed on as it is.
_REWORDINGS: list[tuple[str, str]] = [
    (
        r"invalid offset for tensor `(.*)`",
        r"tensor '\1' has data_offsets that do not start where the tensor before it ends (the tensors must "
        r"fill the data section back to back, each [begin, end] with begin <= end, without gaps or overlaps)",
    ),
    (
        r"incomplete metadata, file not fully covered",
        "the tensors' data_offsets do not end where the file does: it is truncated, or has trailing bytes that "
        "belong to no tensor",
    ),
    (
        r"invalid shape, data type, or offset for tensor",
        "a tensor's data_offsets span a different number of bytes than its dtype and shape need",
    ),
    (
        r"The slice is slicing for subbytes dtypes.*",
        "a tensor of a sub-byte dtype (F4, F6_*) does not fill a whole number of bytes",
    ),
    (r"overflow computing buffer size.*", "a tensor's shape is too large: its byte size overflows"),
    (
        r"invalid JSON in header: (.*) at line (\d+) column (\d+)",
        r"the header does not follow the safetensors format: \1 (header line \2, column \3)",
    ),
]
# The header's terms for what serde, which parses it, calls by Rust names.
_RUST_TERMS = {
    "unknown variant": "unknown dtype",
    "expected usize": "expected a non-negative integer",
    "expected struct TensorInfo": "expected a tensor entry {dtype, shape, data_offsets}",
    "expected a tuple of size 2": "expected [begin, end]",
    "expected a sequence": "expected a list",
    "expected a map": "expected an object",
}


def _reworded(message: str) -> str:
    message = message.removeprefix("Error while deserializing header: ")
    for pattern, replacement in _REWORDINGS:
        if re.fullmatch(pattern, message, flags=re.DOTALL):
            message = re.sub(pattern, replacement, message, flags=re.DOTALL)
            break
    for rust, words in _RUST_TERMS.items():
        message = message.replace(rust, words)
    return message


def check_weights_fit(
    tensors: dict[str, TensorInfo],
    expected: Tensors,
    architecture: str,
) -> None:
    """Raise InvalidInput unless ``tensors`` has exactly the keys of ``expected`` with the expected
    shapes and kinds; the check itself is :func:`arch.mismatch.state_dict_mismatch`. Each
    error entry for a key the file has also names its safetensors dtype; the first
    MAX_ERRORS_LISTED entries are given, so that the answer stays small."""
    found = {key: (t.shape, t.kind) for key, t in tensors.items()}
    mismatch = state_dict_mismatch(architecture, expected, found)
    if mismatch is not None:
        errors = [
            e | {"dtype": tensors[e["key"]].dtype} if e["key"] in tensors else e
            for e in mismatch.errors[:MAX_ERRORS_LISTED]
        ]
        raise InvalidInput(mismatch.message, errors=errors)
