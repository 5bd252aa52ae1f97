"""What the upload children (`worker.convert_checkpoint`, `worker.import_onnx`) share: their command line, the
limits they set on themselves before reading anything, and their exit codes (read by
service/ingest/converter_child.py, which also caps their resident memory from outside)."""

from __future__ import annotations

import argparse
import json
import resource
import signal
from collections.abc import Callable
from typing import Any

REFUSED = 2
OUT_OF_MEMORY = 3


class Refused(Exception):
    """The file cannot be used; the message says why, for the client."""


def limit_self(max_cpu_seconds: int, max_output_bytes: int) -> None:
    # Set before torch is imported, so the unpickler and every allocation run under the limits. Memory is capped by
    # the parent on resident size: an address-space cap would also count the libraries torch maps (3.2 GB for CUDA).
    resource.setrlimit(resource.RLIMIT_CPU, (max_cpu_seconds, max_cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_output_bytes, max_output_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Python ignores SIGXFSZ (a write past the limit would only raise); let the kernel end the child,
    # so the parent sees the signal and reports the size.
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)


def child_main(prog: str, description: str, work: Callable[[str, str], dict[str, Any]], argv: list[str] | None) -> int:
    """Parse `prog SOURCE TARGET --max-cpu-seconds S --max-output-bytes B`, limit this process, run `work`: exit 0
    with its summary as one JSON line, REFUSED with {"error": reason}, OUT_OF_MEMORY on MemoryError."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--max-cpu-seconds", type=int, required=True)
    parser.add_argument("--max-output-bytes", type=int, required=True)
    args = parser.parse_args(argv)
    limit_self(args.max_cpu_seconds, args.max_output_bytes)
    try:
        summary = work(args.source, args.target)
    except Refused as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return REFUSED
    except MemoryError:
        return OUT_OF_MEMORY
    print(json.dumps(summary), flush=True)
    return 0
