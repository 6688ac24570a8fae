"""``workers: N`` (N > 1): a supervisor process and N workers on one proxy port.

The supervisor does not proxy. It holds what must exist once per host:

- the **admin listener** (``admin.listen``): the admin app one process has (admin API,
  console, health) with ``/metrics`` for the whole host (``sidecar.workers.aggregate`` merges
  every worker's registry at scrape time) and the console's recent requests merged from
  every worker's (``sidecar.workers.recent``); key changes made there reach the workers
  through the store, as they reach any process;
- the **rate-limit state** (memory backend): the host's GCRA table in shared memory, which
  every worker checks under one lock, and the one quota book, which workers ask over a
  unix socket (``sidecar.workers.limits``): limits are exact, not divided by N, and quota
  counts are flushed to the store once. With ``backend: redis`` workers use Redis;
- the **in-flight table** (``sidecar.workers.inflight``): ``concurrency`` slots for the host,
  a dead worker's cleared before its replacement starts;
- the **transcode-session owners** (``sidecar.workers.transcode``): Plex sessions owned by
  their key on every worker;
- the **MCP sealing key** when ``mcp_sessions.seal_key_env`` is not set: one random key for
  every worker, handed over through a pipe (``sidecar.workers.sealkey``);
- the proxy port: bound with ``SO_REUSEPORT`` by each worker (the supervisor holds one
  bound, never listening, socket so the port stays reserved across restarts), or, without
  ``SO_REUSEPORT``, one listening socket every worker inherits.

Workers are ``sidecar serve`` processes started with ``SIDECAR_WORKER`` set
(``sidecar.workers.worker``); each runs the whole pipeline, its own key table poll
(``store.poll_interval``), usage recorder (each flushes the requests it served, so a
request is counted once) and stream sweeps. A worker that exits is logged and started
again after a back-off (0.1 s doubling to 5 s; reset once it stayed up 10 s). SIGTERM
(or SIGINT) drains: ``/readyz`` turns 503, every worker gets SIGTERM and does the usual
graceful shutdown; SIGHUP re-reads the key table here and in every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from ..app import Sidecar, _host_port, bound_addresses, create_apps
from ..config import Config
from ..core.errors import SidecarError
from ..http.listener import GuardedAppRunner
from ..observe.metrics import CONTENT_TYPE
from .aggregate import Retired, scrape_merge
from .inflight import ShmInflight
from .limits import LimitsOwner
from .purge import purge_workers
from .recent import RECENT_PATH, HostRecent, wanted
from .sealkey import draw, needs_key, send, with_key
from .shm import ShmBuckets
from .transcode import ShmTranscode
from .worker import WorkerRole, admin_socket, buckets_file, inflight_file, limits_socket, transcode_file

__all__ = ["WorkerPool", "supervise"]

log = logging.getLogger("sidecar.workers")

BACKOFF_MIN = 0.1  # seconds before restarting a worker that died
BACKOFF_MAX = 5.0
STABLE_AFTER = 10.0  # a worker up this long resets the back-off
READY_TIMEOUT = 60.0  # seconds for every worker to answer at start
SCRAPE_TIMEOUT = 2.0  # a worker's /metrics, at scrape time
KILL_AFTER = 5.0  # seconds past shutdown_grace before a draining worker is killed
PRIVATE_PREFIX = "sidecar-w-"


def inherit_fallback() -> bool:
    """One inherited socket instead of SO_REUSEPORT (no SO_REUSEPORT here, or asked to by the env)."""
    return not hasattr(socket, "SO_REUSEPORT") or os.environ.get("SIDECAR_WORKERS_SOCKET") == "inherit"


def proxy_socket(listen: str, inherit: bool) -> socket.socket:
    """The port for every worker: a listening socket to inherit, or an SO_REUSEPORT reservation."""
    host, port = _host_port(listen)
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if not inherit:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        if inherit:
            sock.listen(1024)
            sock.set_inheritable(True)
    except OSError as e:
        sock.close()
        raise SidecarError(f"cannot listen on {listen}: {e.strerror or e}") from None
    return sock


class WorkerPool:
    """N ``sidecar serve`` children, kept running until ``stop``."""

    def __init__(
        self, n: int, config_path: str, directory: str, sock: socket.socket, inherit: bool, seal: bytes | None = None
    ) -> None:
        self.n = n
        self.seal = seal  # the host's MCP sealing key, handed to each worker through a pipe (sealkey)
        self.inflight = ShmInflight(inflight_file(directory), workers=n)  # the host's concurrency slots
        self.transcode = ShmTranscode(transcode_file(directory), create=True)  # the host's transcode-session owners
        self.config_path = config_path
        self.directory = directory
        self.sock = sock
        self.inherit = inherit
        self.procs: list[asyncio.subprocess.Process | None] = [None] * n
        self.restarts = [0] * n
        self.last: dict[int, str] = {}  # each worker's last /metrics read, kept when it dies
        self.retired = Retired()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._hups: dict[int, asyncio.Future[None]] = {}  # SIGHUPs held for workers still starting
        self._started: list[asyncio.Event] = [asyncio.Event() for _ in range(n)]

    def role(self, i: int, seal_fd: int | None = None) -> WorkerRole:
        port = self.sock.getsockname()[1]
        return WorkerRole(i, self.directory, port, self.sock.fileno() if self.inherit else None, seal_fd=seal_fd)

    async def _spawn(self, i: int) -> asyncio.subprocess.Process:
        with contextlib.suppress(FileNotFoundError):  # the dead worker's: its existence says "ready" (signal_all)
            os.unlink(admin_socket(self.directory, i))
        seal_fd = send(self.seal) if self.seal is not None else None
        fds = ((self.sock.fileno(),) if self.inherit else ()) + ((seal_fd,) if seal_fd is not None else ())
        try:
            env = {**os.environ, WorkerRole.ENV: self.role(i, seal_fd).to_env()}
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sidecar", "serve", "-c", self.config_path,
                stdin=asyncio.subprocess.DEVNULL, env=env, pass_fds=fds,
            )  # fmt: skip
        finally:
            if seal_fd is not None:
                os.close(seal_fd)  # the worker holds its own copy
        self.procs[i] = proc
        self._started[i].set()
        log.info("worker %d started (pid %d)", i, proc.pid)
        return proc

    async def _keep(self, i: int) -> None:
        backoff = BACKOFF_MIN
        while not self._stopping.is_set():
            began = time.monotonic()
            proc = await self._spawn(i)
            if self._stopping.is_set():  # stop() came while this one was starting: it missed the SIGTERM
                proc.terminate()
            rc = await proc.wait()
            if self._stopping.is_set():
                return
            self.inflight.clear(i)  # the slots it held, given back before its replacement takes any
            if i in self.last:  # its counts so far stay in the host's sums
                self.retired.add(self.last.pop(i))
            how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"status {rc}"
            backoff = BACKOFF_MIN if time.monotonic() - began >= STABLE_AFTER else min(BACKOFF_MAX, backoff * 2)
            self.restarts[i] += 1
            log.warning("worker %d (pid %d) exited with %s; restarting in %.1fs", i, proc.pid, how, backoff)
            await asyncio.sleep(backoff)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._keep(i)) for i in range(self.n)]

    async def wait_ready(self) -> None:
        """Until every worker answers on its admin socket (or one cannot start)."""
        deadline = time.monotonic() + READY_TIMEOUT
        for i in range(self.n):
            await asyncio.wait_for(self._started[i].wait(), READY_TIMEOUT)
            while True:
                if await self.scrape(i, "/healthz") is not None:
                    break
                if time.monotonic() > deadline or self.restarts[i] >= 3:
                    raise SidecarError(f"worker {i} did not start (see its log above)")
                await asyncio.sleep(0.05)

    async def scrape(self, i: int, path: str = "/metrics") -> str | None:
        """A worker's admin page over its private socket; None when it does not answer."""
        try:
            conn = aiohttp.UnixConnector(path=admin_socket(self.directory, i))
            timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT)
            async with (
                aiohttp.ClientSession(connector=conn, timeout=timeout) as http,
                http.get(f"http://worker{path}") as resp,
            ):
                return await resp.text() if resp.status == 200 else None
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None

    async def recent(self, path: str) -> list[Any]:
        """Every answering worker's recent-request rings, or some keys' (``sidecar.workers.recent``)."""
        texts = await asyncio.gather(*(self.scrape(i, path) for i in range(self.n)))
        out = []
        for text in texts:
            if text is not None:
                with contextlib.suppress(ValueError):
                    out.append(json.loads(text))
        return out

    def signal_all(self, sig: signal.Signals) -> None:
        for i, proc in enumerate(self.procs):
            if proc is not None and proc.returncode is None:
                if sig == signal.SIGHUP and not self._bound(i):
                    # Still starting: its handler is not in place, and SIGHUP's default action is to
                    # terminate (a reload during a restart killed the replacement, again and again).
                    if i not in self._hups:
                        self._hups[i] = asyncio.ensure_future(self._hup_when_ready(i, proc))
                    continue
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    def _bound(self, i: int) -> bool:
        """Has worker ``i`` bound its admin socket (so its SIGHUP handler is in place)? One stat, in tmpfs."""
        return os.path.exists(admin_socket(self.directory, i))

    async def _hup_when_ready(self, i: int, proc: asyncio.subprocess.Process) -> None:
        """SIGHUP once the worker has bound its admin socket (after its handler): it re-reads then."""
        try:
            deadline = time.monotonic() + READY_TIMEOUT
            while proc.returncode is None and time.monotonic() < deadline:
                if self._bound(i):
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGHUP)
                    return
                await asyncio.sleep(0.05)
        finally:
            self._hups.pop(i, None)

    async def stop(self, grace: float) -> None:
        """SIGTERM every worker (each drains up to ``grace``), then SIGKILL what is left."""
        self._stopping.set()
        self.signal_all(signal.SIGTERM)
        waits = [p.wait() for p in self.procs if p is not None and p.returncode is None]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), grace + KILL_AFTER)
        except TimeoutError:
            log.warning("workers still running %.0fs after SIGTERM: killing them", grace + KILL_AFTER)
            self.signal_all(signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in self.procs if p is not None))
        for t in [*self._tasks, *self._hups.values()]:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._hups.values(), return_exceptions=True)


def _private_dir() -> str:
    """Mode 0700 (only this user reaches the sockets), in memory where possible: the bucket
    table is a mapped file, and on a disk-backed /tmp its pages would be written back."""
    shm = "/dev/shm"  # noqa: S108 - mkdtemp makes a private, unique directory inside it
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    d = tempfile.mkdtemp(prefix=PRIVATE_PREFIX, dir=base)
    if len(d) > 80:  # unix socket paths are short (108 bytes)
        shutil.rmtree(d)
        d = tempfile.mkdtemp(prefix=PRIVATE_PREFIX, dir="/tmp")
    _sweep_stale(os.path.dirname(d))
    fd = os.open(Path(d, "supervisor.pid"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # invariant 11, umask or not
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return d


def _sweep_stale(base: str) -> None:
    """Directories of supervisors that were killed hard (no cleanup ran): this user's, their pid gone."""
    for entry in Path(base).glob(PRIVATE_PREFIX + "*"):
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            pid = int((entry / "supervisor.pid").read_text())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except (OSError, ValueError):
            continue


async def supervise(config: Config, config_path: str, n: int) -> None:
    """Run N workers until SIGTERM/SIGINT; then drain them all and return (``config_path``: absolute)."""
    seal = draw() if needs_key(config) else None  # one MCP sealing key for every worker (sealkey)
    if seal is not None:
        config = with_key(config, seal)
    directory = _private_dir()
    sc = Sidecar(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    pool: WorkerPool | None = None
    owner: LimitsOwner | None = None
    admin_runner: web.AppRunner | None = None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def reload() -> None:
        sc.spawn(sc.verifier.refresh(force=True))
        if pool is not None:
            pool.signal_all(signal.SIGHUP)

    with contextlib.suppress(NotImplementedError, AttributeError):
        loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        await sc.start()
        if config.rate_limits.backend == "memory":
            buckets = ShmBuckets(buckets_file(directory), create=True)
            owner = LimitsOwner(buckets, sc.limiter.book, sc.limiter.quota_levels)
            sc.limiter.host_buckets = buckets  # an edit moving a key's rate limits charges the host's buckets
            await owner.start(limits_socket(directory))
        if seal is not None:
            log.warning(
                "workers: mcp_sessions.seal_key_env is not set: MCP session ids are sealed with a random key this "
                "supervisor drew and shared with its workers, so sessions move between workers but do not survive "
                "a restart of the supervisor or move to another host; set seal_key_env for that (docs/scaling.md)"
            )
        inherit = inherit_fallback()
        sock = proxy_socket(config.listen, inherit)
        pool = WorkerPool(n, config_path, directory, sock, inherit, seal)
        pool.start()
        await pool.wait_ready()
        _, admin = create_apps(sc)  # the admin app as one process has it: API, console, OAuth admin routes
        admin.middlewares.append(_host_metrics(sc, pool, _host_recent(admin), _console(admin)))
        admin_runner = GuardedAppRunner(admin, sc.config.server, access_log=None, shutdown_timeout=1.0)
        await admin_runner.setup()
        ahost, aport = _host_port(config.admin.listen)
        try:
            await web.TCPSite(admin_runner, ahost, aport, reuse_address=True).start()
        except OSError as e:
            raise SidecarError(f"cannot listen on {config.admin.listen}: {e.strerror or e}") from None
        host, _ = _host_port(config.listen)
        scheme = "https" if config.tls is not None else "http"
        port = sock.getsockname()[1]
        proxy = f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
        log.info(
            "sidecar listening on %s (admin %s) with %d workers%s",
            proxy, ", ".join(bound_addresses(admin_runner)), n, " (one inherited socket)" if inherit else "",
        )  # fmt: skip
        gc.freeze()
        await stop.wait()
        log.info("shutting down: draining %d workers (up to %gs)", n, config.server.shutdown_grace)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        sc.ready = False  # /readyz says 503 while the workers drain
        if pool is not None:
            await pool.stop(config.server.shutdown_grace)
            pool.sock.close()
            pool.inflight.close()
            pool.transcode.close()
        if admin_runner is not None:
            await admin_runner.cleanup()
        if owner is not None:
            await owner.close()
        await sc.close()  # the last quota flush: after every worker's last check
        shutil.rmtree(directory, ignore_errors=True)
    log.info("stopped")


def _with_workers(resp: web.StreamResponse, pool: WorkerPool) -> web.StreamResponse:
    """``/readyz`` with a ``workers`` check: not ready while no worker is running (all restarting)."""
    if not isinstance(resp, web.Response) or not isinstance(resp.body, bytes):
        return resp
    body = json.loads(resp.body)
    running = sum(1 for p in pool.procs if p is not None and p.returncode is None)
    body["checks"]["workers"] = "ok" if running else "none running"
    ready = resp.status == 200 and running > 0
    body["status"] = "ready" if ready else "not ready"
    return web.json_response(body, status=200 if ready else 503)


def _console(admin: web.Application) -> Any:
    """The admin app's console (None when it is off): whose sessions may read the workers' rings."""
    from ..console import CONSOLE

    return admin.get(CONSOLE)


def _host_recent(admin: web.Application) -> HostRecent | None:
    """The console's recent requests, switched to the host's (every worker's, merged on demand)."""
    from ..console import CONSOLE

    console = admin.get(CONSOLE)
    if console is None:
        return None
    console.recent = HostRecent(console.recent)
    return console.recent


def _host_metrics(sc: Sidecar, pool: WorkerPool, recent: HostRecent | None = None, console: Any = None) -> Any:
    """``/metrics``, ``/readyz`` and the console's recent requests on the admin listener: the host's."""

    def grants(key_id: str) -> list[str]:
        return [r.id for r in sc.verifier.table.values() if r.parent_id == key_id]

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        # Only for a signed-in operator: an anonymous GET of a console page (a redirect to sign in) cost
        # a scrape of every worker and a walk of the key table (invariant 6: refusals are cheap).
        signed_in = console is not None and console.session(request) is not None
        path = wanted(request, grants) if recent is not None and signed_in else None
        if path is not None and recent is not None:
            recent.load(await pool.recent(path), full=path == RECENT_PATH)
            return await handler(request)  # type: ignore[no-any-return]
        if request.path == "/admin/cache" and request.method == "DELETE":
            await purge_workers(pool, request)  # every worker's cache: the supervisor's own is empty
        if request.path == "/readyz":
            return _with_workers(await handler(request), pool)
        if request.path != "/metrics" or request.method not in ("GET", "HEAD"):
            return await handler(request)  # type: ignore[no-any-return]
        texts = await asyncio.gather(*(pool.scrape(i) for i in range(pool.n)))
        body = scrape_merge(sc.metrics.exposition().decode(), texts, pool.last, pool.restarts, pool.retired)
        return web.Response(body=body.encode(), headers={"Content-Type": CONTENT_TYPE})

    return middleware
