"""Names of the temporary files and directories under the blob store's tmp/: each begins with what made
it and the process that owns it (``upload~<host>~<pid>~…``), so that the janitor (service/janitor.py)
can tell a crash's leftover, whose owner is gone, from a file still in use."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

_SEPARATOR = "~"  # never part of a host name


@dataclass(frozen=True)
class Owner:
    kind: str  # upload, weights, convert, onnx, dataset, run, report
    host: str
    pid: int


def temp_prefix(kind: str) -> str:
    """The prefix for a temporary name made by this process (tempfile's `prefix=`)."""
    return _SEPARATOR.join((kind, socket.gethostname(), str(os.getpid()), ""))


def owner_of(name: str) -> Owner | None:
    """Who made the temporary file or directory `name`; None for a name without an owner."""
    parts = name.split(_SEPARATOR)
    if len(parts) != 4 or not parts[2].isdigit():
        return None
    return Owner(kind=parts[0], host=parts[1], pid=int(parts[2]))
