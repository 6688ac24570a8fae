"""``DELETE /admin/cache`` with workers: the host's caches, not the supervisor's empty one.

The admin listener is the supervisor's, and the supervisor proxies nothing, so its response
cache is always empty: a purge there purged nothing while every worker kept serving what the
operator meant to remove. Now the supervisor's admin app, once the request is the full
admin's (the admin API's own check), asks every worker to purge the same entries over its
private admin socket (``PURGE_PATH``, in the supervisor's 0700 directory, as ``/metrics``
and the console's recent requests are read), then lets the admin API answer and audit with
the host's count (``PURGED_ELSEWHERE``). A running worker that does not answer makes the
purge a 503: the operator must not be told a cache is clean when one may still serve.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from ..admin.api import PURGED_ELSEWHERE, query_str, require_full_admin
from ..core.errors import ServiceUnavailable
from .worker import admin_socket

if TYPE_CHECKING:
    from ..app import Sidecar
    from .supervisor import WorkerPool

__all__ = ["PURGE_PATH", "purge_workers", "serve_purge"]

PURGE_PATH = "/_worker/cache"
TIMEOUT = 2.0


def serve_purge(sc: Sidecar, admin: web.Application) -> None:
    """A worker: purge its own cache on ``PURGE_PATH`` (its admin app listens only on its private socket)."""

    async def purge(request: web.Request) -> web.Response:
        n = sc.cache.purge(request.query.get("upstream"), request.query.get("path"))
        return web.json_response({"purged": n})

    admin.router.add_delete(PURGE_PATH, purge)


async def purge_workers(pool: WorkerPool, request: web.Request) -> None:
    """The supervisor, before the admin API's purge: every worker's entries, counted in the request."""
    require_full_admin(request)  # as the admin API checks it (the auth middleware has run)
    params = {k: v for k in ("upstream", "path") if (v := query_str(request, k))}

    async def one(i: int) -> int | None:
        proc = pool.procs[i]
        try:
            conn = aiohttp.UnixConnector(path=admin_socket(pool.directory, i))
            async with (
                aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as http,
                http.delete(f"http://worker{PURGE_PATH}", params=params) as resp,
            ):
                if resp.status == 200:
                    return int((await resp.json())["purged"])
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError):
            pass
        # Not running (its replacement starts with an empty cache), or it did not answer: then we cannot say.
        return 0 if proc is None or proc.returncode is not None or not pool._bound(i) else None

    counts = await asyncio.gather(*(one(i) for i in range(pool.n)))
    if any(c is None for c in counts):
        raise ServiceUnavailable("a worker's response cache could not be purged; try again", {"Retry-After": "1"})
    request[PURGED_ELSEWHERE] = sum(c or 0 for c in counts)
