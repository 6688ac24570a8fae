"""A worker's side of ``workers: N``: how it binds, where its limits live, when it must go.

The supervisor starts each worker as ``sidecar serve`` with ``SIDECAR_WORKER`` in its
environment (``WorkerRole.ENV``): its index, the supervisor's private directory (mode
0700: the limiter socket and each worker's admin socket), the proxy port, and — when the
platform has no ``SO_REUSEPORT`` — the number of the listening socket it inherits.

- Proxy port: its own socket with ``SO_REUSEPORT`` (the kernel spreads new connections
  over the workers), or the one inherited socket (every worker accepts from one queue).
- Admin: not on ``admin.listen`` (the supervisor serves that, for the host) but on a unix
  socket in the private directory, which the supervisor reads ``/metrics`` from.
- Limits: the memory backend becomes the host's (``SharedLimits``: buckets in the shared
  table, quotas in the supervisor), so counts are exact; with ``backend: redis`` nothing changes.
  ``concurrency`` slots are the host's whatever the backend (``sidecar.workers.inflight``).
- Plex transcode-session owners: the host's table (``sidecar.workers.transcode``).
- MCP sealing key: without ``mcp_sessions.seal_key_env``, the one the supervisor drew for
  the host, read from an inherited pipe (``sidecar.workers.sealkey``).
- The supervisor gone (killed hard), the worker stops: ``PR_SET_PDEATHSIG`` on Linux, and
  a check of the parent pid every second everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .limits import SharedLimits
from .shm import ShmBuckets

if TYPE_CHECKING:
    from ..app import Sidecar

__all__ = ["WorkerRole", "admin_socket", "buckets_file", "inflight_file", "limits_socket", "transcode_file"]

log = logging.getLogger("sidecar.workers")

PARENT_CHECK = 1.0  # seconds between checks that the supervisor is still there


def limits_socket(directory: str) -> str:
    return os.path.join(directory, "limits.sock")


def buckets_file(directory: str) -> str:
    return os.path.join(directory, "buckets")


def inflight_file(directory: str) -> str:
    return os.path.join(directory, "inflight")


def transcode_file(directory: str) -> str:
    return os.path.join(directory, "transcode")


def admin_socket(directory: str, index: int) -> str:
    return os.path.join(directory, f"worker-{index}.sock")


@dataclass(frozen=True)
class WorkerRole:
    ENV = "SIDECAR_WORKER"

    index: int
    directory: str
    port: int
    fd: int | None = None  # an inherited listening socket; None: bind with SO_REUSEPORT
    shared_limits: bool = True  # the memory backend is the supervisor's
    seal_fd: int | None = None  # a pipe holding the host's MCP sealing key (sidecar.workers.sealkey)

    def to_env(self) -> str:
        return json.dumps(
            {"index": self.index, "dir": self.directory, "port": self.port, "fd": self.fd, "limits": self.shared_limits,
             "seal": self.seal_fd}
        )  # fmt: skip

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerRole | None:
        raw = (os.environ if env is None else env).get(cls.ENV)
        if not raw:
            return None
        d = json.loads(raw)
        return cls(
            int(d["index"]), str(d["dir"]), int(d["port"]), d.get("fd"), bool(d.get("limits", True)), d.get("seal")
        )

    def attach(self, sc: Sidecar) -> None:
        """Before ``Sidecar.start``: the supervisor's limiter, and stop when the supervisor is gone."""
        if self.shared_limits and sc.config.rate_limits.backend == "memory":
            buckets = ShmBuckets(buckets_file(self.directory))
            wait = sc.config.store.busy_timeout + 1.0  # a quota read waits on the store as in one process
            sc.shared_limits = SharedLimits(limits_socket(self.directory), buckets, quota_timeout=wait)
        sc.access_log.shared = True  # every worker writes to the same stdout or file
        _die_with_parent()
        sc.spawn(_watch_parent(os.getppid()))

    def started(self, sc: Sidecar, admin: web.Application) -> None:
        """After ``Sidecar.start``, before serving: the host's concurrency slots, and what the
        supervisor reads from the admin app besides ``/metrics`` (the console's recent requests)."""
        from .inflight import ShmInflight
        from .purge import serve_purge
        from .recent import serve_recent
        from .transcode import ShmTranscode

        inflight = ShmInflight(inflight_file(self.directory), column=self.index)
        sc.limiter.held, sc.limiter.make_slot = inflight, inflight.slot
        sc.transcode = ShmTranscode(transcode_file(self.directory))  # the host's session owners (invariant 4)
        serve_recent(admin)
        serve_purge(sc, admin)  # DELETE /admin/cache on the supervisor reaches this worker's cache

    async def bind(
        self, proxy: web.BaseRunner, admin: web.BaseRunner, host: str, port: int, ssl_ctx: ssl.SSLContext | None
    ) -> None:
        site: web.BaseSite
        if self.fd is not None:
            sock = socket.socket(fileno=os.dup(self.fd))
            site = web.SockSite(proxy, sock, ssl_context=ssl_ctx)
        else:
            site = web.TCPSite(proxy, host, self.port, ssl_context=ssl_ctx, reuse_address=True, reuse_port=True)
        await site.start()
        path = admin_socket(self.directory, self.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by this worker's predecessor, if it was killed
        await web.UnixSite(admin, path).start()


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM (a drain) when the supervisor dies


async def _watch_parent(parent: int) -> Any:
    while True:
        await asyncio.sleep(PARENT_CHECK)
        if os.getppid() != parent:
            log.warning("worker: the supervisor (pid %d) is gone; stopping", parent)
            os.kill(os.getpid(), signal.SIGTERM)
            return
