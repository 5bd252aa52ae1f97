"""What reading one upload may cost the web process, checked before anything is allocated: the caps of
one upload (:class:`IngestLimits`, from the settings), and the bytes all uploads being decoded at once
may hold (:class:`DecodeBudget`, one per process)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

from service.errors import PayloadTooLarge, ServiceBusy

# The defaults of the settings of the same names (service/settings.py says what each bounds).
MAX_DECODED_BYTES = 1024**3
MAX_DECODING_BYTES = 2 * 1024**3
DECODE_WAIT_S = 30.0
MAX_COLUMNS = 10_000
# Far above any real header (a few hundred tensors take some 30 kB), far below the reference
# implementation's 100 MB.
MAX_HEADER_BYTES = 16 * 1024**2
# The architectures here have a few hundred tensors; safe_open accepts any number of zero-size ones.
MAX_TENSORS = 10_000
MAX_TENSOR_NAME_BYTES = 512


@dataclass(frozen=True)
class IngestLimits:
    max_decoded_bytes: int = MAX_DECODED_BYTES
    max_columns: int = MAX_COLUMNS
    max_header_bytes: int = MAX_HEADER_BYTES
    max_tensors: int = MAX_TENSORS
    max_tensor_name_bytes: int = MAX_TENSOR_NAME_BYTES


class DecodeBudget:
    """Bytes that uploads being decoded at once may hold in this process. An upload waits (up to
    `wait_s`) for room; one that could never fit is refused at once."""

    def __init__(self, capacity: int, wait_s: float) -> None:
        self.capacity = capacity
        self.wait_s = wait_s
        self.in_flight = 0
        self._changed = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        if nbytes > self.capacity:
            raise PayloadTooLarge(
                f"decoding this upload takes {nbytes} bytes, more than the {self.capacity} bytes this server "
                "decodes at once (setting max_decoding_bytes)"
            )
        with self._changed:
            if not self._changed.wait_for(lambda: self.in_flight + nbytes <= self.capacity, timeout=self.wait_s):
                raise ServiceBusy(
                    f"the server is decoding other uploads (at most {self.capacity} bytes at once, setting "
                    f"max_decoding_bytes) and had no room for this one's {nbytes} bytes within "
                    f"{self.wait_s:g} s; retry shortly"
                )
            self.in_flight += nbytes
        try:
            yield
        finally:
            with self._changed:
                self.in_flight -= nbytes
                self._changed.notify_all()


@lru_cache
def decode_budget(capacity: int, wait_s: float) -> DecodeBudget:
    """The process's budget (one per setting values, so a process has one)."""
    return DecodeBudget(capacity, wait_s)


DEFAULT_LIMITS = IngestLimits()  # the settings' defaults, for callers without settings (tests, tools)
