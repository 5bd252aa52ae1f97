"""ONNX model uploads, imported by a short-lived, resource-limited child process (`worker.import_onnx`): it parses
the protobuf (never reading external data), checks it, converts it to torch ops from an allow-list, compares the
result with onnxruntime and writes the weights as safetensors. This process imports neither onnx nor torch."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from service.errors import InvalidInput, PayloadTooLarge
from service.ingest.torch_files import ConversionLimits, child_environment, conversion_slot
from service.temp_names import temp_prefix

_log = logging.getLogger(__name__)
_IMPORTER_MODULE = "worker.import_onnx"
_REFUSED, _OUT_OF_MEMORY = 2, 3  # worker.import_onnx's exit codes
_LIMITS = ConversionLimits()
HINT = (
    "Export with `torch.onnx.export(model, (x,), 'model.onnx', dynamo=True, external_data=False, "
    'dynamic_shapes=({0: torch.export.Dim(\'batch\')},))` and upload it with architecture={"name": "onnx"}'
)


def import_onnx(
    source: Path, target: Path, *, max_output_bytes: int, limits: ConversionLimits = _LIMITS
) -> dict[str, Any]:
    """Validate and convert the ONNX file at `source`; its weights are written to `target` (safetensors).
    Returns the child's summary (input_shape, num_classes, opset, ops, parameter_count, prunable_layers,
    reference). Raises InvalidInput (or PayloadTooLarge) with the reason when the file is refused."""
    source, target = Path(source), Path(target)
    # onnx's protobuf parse holds the file and its message; torch the converted copy and its gradients' slack.
    max_memory = limits.base_memory_bytes + 6 * source.stat().st_size
    workdir = Path(tempfile.mkdtemp(dir=target.parent, prefix=temp_prefix("onnx")))
    try:
        output = workdir / "out.safetensors"
        result = _run(source, output, workdir, max_memory, max_output_bytes, limits)
        if result.returncode == 0 and output.is_file():
            summary = json.loads(result.stdout.decode().strip().splitlines()[-1])
            output.replace(target)
            return summary
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    raise _failure(result, max_memory, max_output_bytes, limits)


def _run(
    source: Path, output: Path, workdir: Path, max_memory: int, max_output_bytes: int, limits: ConversionLimits
) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        _IMPORTER_MODULE,
        str(source),
        str(output),
        "--max-memory-bytes",
        str(max_memory),
        "--max-cpu-seconds",
        str(limits.cpu_seconds),
        "--max-output-bytes",
        str(max_output_bytes),
    ]
    with conversion_slot():
        try:
            return subprocess.run(
                command,
                env=child_environment(),
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=limits.timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise InvalidInput(
                f"importing the ONNX model took longer than {limits.timeout_s:g} s, the server's limit"
            ) from None


def _failure(
    result: subprocess.CompletedProcess, max_memory: int, max_output_bytes: int, limits: ConversionLimits
) -> Exception:
    stdout = result.stdout.decode("utf-8", "replace").strip().splitlines()
    stderr = result.stderr.decode("utf-8", "replace")
    if result.returncode == _REFUSED and stdout:
        try:
            reason = json.loads(stdout[-1])["error"]
        except (ValueError, KeyError, TypeError):
            reason = None
        if reason:
            return InvalidInput(f"the ONNX model cannot be used: {reason}. {HINT}.")
    if result.returncode == -signal.SIGXFSZ:
        return PayloadTooLarge(f"the weights of the ONNX model exceed the limit of {max_output_bytes} bytes")
    if (
        result.returncode in (_OUT_OF_MEMORY, -signal.SIGXCPU, -signal.SIGKILL)
        or "MemoryError" in stderr
        or "std::bad_alloc" in stderr
    ):
        return InvalidInput(
            f"importing the ONNX model exceeded the server's limits ({limits.cpu_seconds} CPU seconds, "
            f"{max_memory // 2**20} MiB of memory)"
        )
    if "ModuleNotFoundError" in stderr or "ImportError" in stderr:
        return RuntimeError(f"the ONNX importer cannot start: {stderr[-2000:]}")
    _log.warning("ONNX import failed (exit %s): %s", result.returncode, stderr[-2000:])
    return InvalidInput(f"the ONNX model could not be read (it is corrupt or uses what the importer lacks). {HINT}.")
