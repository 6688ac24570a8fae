"""A real, throwaway PostgreSQL server for the Postgres store's tests.

``initdb`` (Debian's ``/usr/lib/postgresql/*/bin``) into a temp dir, ``pg_ctl start -w`` on
a free port (unix socket in the same dir), a password-protected role for the sidecar,
stopped and removed at the end of the session. initdb refuses to run as root, so as root
everything runs as the ``postgres`` OS user (``runuser``) in a dir it owns. Each test gets
a database of its own (``CREATE DATABASE``), so tests never see each other's rows.

Under ``CI=true`` a missing PostgreSQL is a failure, elsewhere a skip (as tests/redis_support.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from sidecar.demo import free_port

PG_USER = "sidecar"
START_TIMEOUT = 30


def pg_bin(name: str) -> str:
    """A PostgreSQL server binary; under CI=true a missing one fails, elsewhere skips."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    path = found[-1] if found else shutil.which(name)
    if path:
        return path
    msg = f"PostgreSQL's {name} is not installed (scripts/test installs the postgresql package as root)"
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


class PgServer:
    """One PostgreSQL cluster in a temp dir; ``dsn(db)`` connects as the password-protected sidecar role."""

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
        self.as_root = os.geteuid() == 0
        self.dir = Path(tempfile.mkdtemp(prefix="sidecar-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.password = "pg-" + secrets.token_hex(12)
        self._n = 0
        if self.as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.dir.chmod(0o700)

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = ["runuser", "-u", "postgres", "--", *argv] if self.as_root else list(argv)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=START_TIMEOUT + 30, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed ({done.returncode}): {done.stdout}\n{done.stderr}")
        return done

    def init(self) -> None:
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password + "\n")
        if self.as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        self._run(self.initdb, "-D", str(self.data), "-U", "postgres", "--pwfile", str(pwfile),
                  "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")  # fmt: skip
        pwfile.unlink()

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")  # fmt: skip
        self._run(self.pg_ctl, "start", "-w", "-t", str(START_TIMEOUT), "-D", str(self.data), "-l",
                  str(self.dir / "log"), "-o", opts)  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run(self.pg_ctl, "stop", "-w", "-m", mode, "-D", str(self.data), check=False)

    def restart(self) -> None:
        """``pg_ctl stop -m fast`` then start (``pg_ctl restart`` would log to our pipe and keep it open).

        Blocking: from a test's event loop call it through ``asyncio.to_thread`` so traffic goes on."""
        self.stop()
        self.start()

    def running(self) -> bool:
        return self._run(self.pg_ctl, "status", "-D", str(self.data), check=False).returncode == 0

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def dsn(self, db: str = "postgres", *, user: str = PG_USER) -> str:
        return f"postgresql://{user}:{self.password}@127.0.0.1:{self.port}/{db}"

    def log_text(self) -> str:
        path = self.dir / "log"
        return path.read_text(errors="replace") if path.exists() else ""

    async def admin(self) -> asyncpg.Connection:
        """A superuser connection over the unix socket (trust), for CREATE DATABASE and friends."""
        return await asyncpg.connect(host=str(self.dir), port=self.port, user="postgres", database="postgres")

    async def setup_role(self) -> None:
        conn = await self.admin()
        try:
            await conn.execute(f"CREATE ROLE {PG_USER} LOGIN CREATEDB PASSWORD '{self.password}'")
        finally:
            await conn.close()

    async def new_database(self) -> str:
        """A fresh empty database owned by the sidecar role; its DSN."""
        self._n += 1
        name = f"t{os.getpid()}_{self._n}_{int(time.time() * 1000) % 100000}"
        conn = await self.admin()
        try:
            await conn.execute(f"CREATE DATABASE {name} OWNER {PG_USER}")
        finally:
            await conn.close()
        return self.dsn(name)

    async def drop_database(self, dsn: str) -> None:
        name = dsn.rsplit("/", 1)[1]
        conn = await self.admin()
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await conn.close()


_started: list[PgServer] = []


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = PgServer()
    try:
        server.init()
        server.start()
        _started.append(server)
        # Sync fixture, maybe set up from inside a running loop (getfixturevalue): its own loop in a thread.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, server.setup_role()).result()
        yield server
    finally:
        server.stop("immediate")
        server.remove()


@pytest.fixture
async def pg_dsn(pg_server: PgServer) -> AsyncIterator[str]:
    """A DSN (with password) to an empty database of this test's own."""
    if not pg_server.running():  # a test that restarted it failed halfway
        pg_server.start()
    dsn = await pg_server.new_database()
    try:
        yield dsn
    finally:
        if not pg_server.running():
            pg_server.start()
        await pg_server.drop_database(dsn)
