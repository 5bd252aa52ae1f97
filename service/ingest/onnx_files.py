"""ONNX model uploads, imported by a short-lived, resource-limited child process (`worker.import_onnx`): it parses
the protobuf (never reading external data), checks it, converts it to torch ops from an allow-list, compares the
result with onnxruntime and writes the weights as safetensors. This process imports neither onnx nor torch."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from service.ingest.converter_child import ChildTask, ConversionLimits, child_failure, run_child
from service.temp_names import temp_prefix

_LIMITS = ConversionLimits()
HINT = (
    "Export with `torch.onnx.export(model, (x,), 'model.onnx', dynamo=True, external_data=False, "
    'dynamic_shapes=({0: torch.export.Dim(\'batch\')},))` and upload it with architecture={"name": "onnx"}'
)


_IMPORTER = ChildTask(
    module="worker.import_onnx",
    doing="importing the ONNX model",
    subject="the ONNX model",
    output_too_large="the weights of the ONNX model exceed the limit of {limit} bytes",
    unreadable="the ONNX model could not be read (it is corrupt or uses what the importer lacks)",
    hint=HINT,
)


def import_onnx(
    source: Path, target: Path, *, max_output_bytes: int, limits: ConversionLimits = _LIMITS
) -> dict[str, Any]:
    """Validate and convert the ONNX file at `source`; its weights are written to `target` (safetensors).
    Returns the child's summary (input_shape, num_classes, opset, ops, parameter_count, prunable_layers,
    reference). Raises InvalidInput (or PayloadTooLarge) with the reason when the file is refused."""
    source, target = Path(source), Path(target)
    # onnx's protobuf parse holds the file and its message; torch the converted copy and its gradients' slack.
    max_rss = limits.max_rss_bytes(source.stat().st_size, per_file_byte=6)
    workdir = Path(tempfile.mkdtemp(dir=target.parent, prefix=temp_prefix("onnx")))
    try:
        output = workdir / "out.safetensors"
        outcome = run_child(
            _IMPORTER, source, output, workdir, max_rss=max_rss, max_output_bytes=max_output_bytes, limits=limits
        )
        if outcome.returncode == 0 and output.is_file():
            summary = json.loads(outcome.stdout.strip().splitlines()[-1])
            output.replace(target)
            return summary
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    raise child_failure(_IMPORTER, outcome, max_rss, max_output_bytes, limits)
