"""``workers: N | auto``: how many worker processes serve the proxy port (sidecar.workers).

A top-level scalar, validated as a one-field section so its errors read like every
other option's (``workers: …``). ``auto`` is the host's CPU count, resolved at load.
"""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import BeforeValidator, WithJsonSchema

from .models import Section

__all__ = ["MAX_WORKERS", "WorkersSection", "resolve_workers"]

MAX_WORKERS = 256


def resolve_workers(value: object) -> int:
    """``auto`` -> the CPU count; a number must be 1..MAX_WORKERS (ValueError otherwise)."""
    if value == "auto":
        return max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ValueError(f"expected a whole number from 1 to {MAX_WORKERS}, or auto; got {value!r}")
    return value


_SCHEMA = {
    "anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_WORKERS}, {"const": "auto"}],
    "description": "worker processes sharing the proxy port; auto: one per CPU",
}
WorkerCount = Annotated[int, BeforeValidator(resolve_workers), WithJsonSchema(_SCHEMA)]


class WorkersSection(Section):
    """The top-level ``workers`` option (1: one process, no supervisor, exactly as before)."""

    workers: WorkerCount = 1

    def count(self) -> int:
        return self.workers
