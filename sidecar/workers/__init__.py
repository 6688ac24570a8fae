"""``workers: N``: every core of one host — a supervisor and N worker processes on one port.

``supervisor`` (the supervisor: admin listener, limiter owner, restarts, signals),
``worker`` (a worker's binding and role), ``limits`` (exact limits across workers),
``aggregate`` (one ``/metrics`` for the host). See docs/scaling.md, "Workers".
"""

from __future__ import annotations

import os
from collections.abc import Callable, Coroutine
from typing import Any

from ..config import Config

__all__ = ["serve_workers"]


def serve_workers(
    config: Config, config_path: str, workers: int | None, run: Callable[[Coroutine[Any, Any, None]], Any]
) -> int:
    """``sidecar serve`` when more than one process serves: the supervisor, or one of its workers."""
    from .worker import WorkerRole

    role = WorkerRole.from_env()
    if role is not None:
        from ..app import serve

        if role.seal_fd is not None:  # the host's MCP sealing key, drawn by the supervisor
            from .sealkey import receive, with_key

            config = with_key(config, receive(role.seal_fd))

        run(serve(config, worker=role))
        return 0
    from .supervisor import supervise

    run(supervise(config, os.path.abspath(config_path), workers or config.workers))
    return 0
