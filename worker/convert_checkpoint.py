"""Convert an uploaded weights-only PyTorch checkpoint (.pt/.pth state dict) to safetensors.

    python -m worker.convert_checkpoint IN OUT --max-cpu-seconds S --max-output-bytes B

Run by the web process (which never imports torch) as a short-lived child with its own resource
limits (worker/child_limits.py; the parent caps its resident memory). The only loader is
``torch.load(weights_only=True)``: its unpickler admits tensors and plain containers and refuses
every other global, so a pickle whose loading would run code is rejected before any of it runs.
The child exits 0 after writing OUT; 2 with one JSON line ``{"error": "..."}`` on stdout when the
file is not a usable state dict; 3 on MemoryError; a signal when it hit the CPU or output-size
limit or its parent killed it for memory.
"""

from __future__ import annotations

import re
import sys

from worker.child_limits import Refused, child_main


def _why_unpickling_failed(message: str) -> str:
    # torch's message advises turning weights_only off, which must never reach a client as advice here.
    found = re.search(r"unsupported global:?\s+(?:GLOBAL\s+)?([\w.<>]+)", message, re.IGNORECASE)
    if found:
        return (
            f"it refers to the Python object {found.group(1)}, which is code, not weights "
            "(a whole pickled model or a custom class)"
        )
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", message)
    if found:
        return f"it holds something other than tensors and plain containers ({found.group(1).strip().rstrip('.')})"
    return "it holds something other than tensors and plain containers"


def load_state_dict(path: str) -> dict:
    import pickle

    import torch

    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise Refused(
            "torch.load(weights_only=True) refused the checkpoint: " + _why_unpickling_failed(str(exc))
        ) from None
    except RuntimeError as exc:
        text = str(exc)
        if "can't allocate memory" in text or "DefaultCPUAllocator" in text:
            raise MemoryError(text) from None
        if "TorchScript" in text:
            raise Refused("the file is a TorchScript archive, not a state dict") from None
        if "Invalid magic number" in text or "failed finding central directory" in text or "data.pkl" in text:
            raise Refused("the file is not a torch.save checkpoint (corrupt, truncated or another format)") from None
        raise Refused(
            f"torch.load(weights_only=True) could not read the checkpoint ({text.splitlines()[0][:200]})"
        ) from None
    except (EOFError, ValueError, OSError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise Refused(f"the checkpoint is corrupt or truncated ({type(exc).__name__}: {str(exc)[:200]})") from None

    allowed = _safetensors_dtypes()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # a training checkpoint {"state_dict": ..., "epoch": ...}: the weights only
    if not isinstance(obj, dict):
        raise Refused(
            f"the checkpoint holds a value of type {type(obj).__name__}, not a state dict "
            "(a mapping of names to tensors)"
        )
    if not obj:
        raise Refused("the checkpoint holds an empty mapping; a state dict maps parameter names to tensors")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise Refused(
                f"the state dict has the key {key!r} ({type(key).__name__}); keys must be parameter names (str)"
            )
        if not isinstance(value, torch.Tensor):
            raise Refused(
                f"the state dict maps {key!r} to a value of type {type(value).__name__}; every value must be a tensor"
            )
        if value.layout != torch.strided or value.is_quantized or value.is_nested:
            raise Refused(f"the state dict maps {key!r} to a {value.layout} tensor; only dense tensors are accepted")
        if value.dtype not in allowed:
            raise Refused(
                f"the state dict maps {key!r} to a tensor of dtype {value.dtype}, which safetensors cannot hold"
            )
    return obj


def _safetensors_dtypes() -> set:
    import torch

    names = [
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "float8_e4m3fn",
        "float8_e5m2",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
    ]
    return {getattr(torch, n) for n in names if hasattr(torch, n)}


def write_safetensors(state: dict, out: str) -> int:
    import torch
    from safetensors.torch import save_file

    # Tensors that share storage (tied or sliced weights) are refused by save_file: give each its own.
    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        value = value.detach()
        storage = value.untyped_storage()
        owns_storage = (
            value.is_contiguous()
            and value.storage_offset() == 0
            and storage.nbytes() == value.numel() * value.element_size()
        )
        if storage.data_ptr() in seen or not owns_storage:
            value = value.clone(memory_format=torch.contiguous_format)
        seen.add(value.untyped_storage().data_ptr())
        tensors[key] = value
    # No metadata: the same state dict gives byte-identical safetensors, so the same blob.
    save_file(tensors, out)
    return len(tensors)


def convert(source: str, target: str) -> dict:
    return {"tensors": write_safetensors(load_state_dict(source), target)}


def main(argv: list[str] | None = None) -> int:
    return child_main("python -m worker.convert_checkpoint", __doc__.split("\n\n")[0], convert, argv)


if __name__ == "__main__":
    sys.exit(main())
