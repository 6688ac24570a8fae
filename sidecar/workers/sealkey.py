"""One MCP session sealing key for the host, when ``mcp_sessions.seal_key_env`` is not set.

Without a configured key each process would draw its own (``upstreams.mcp.sealing``), and
a session opened on one worker would be ``404`` on the next: the kernel spreads new
connections over the workers, so an MCP client's requests land on all of them. The
supervisor draws one random key instead and hands it to every worker it starts, so a
session moves between workers and survives a worker's restart; it still dies with the
supervisor, and another host cannot open it (that needs ``seal_key_env``).

How the key travels: through a pipe the worker inherits (``pass_fds``), its number in the
worker's role (``SIDECAR_WORKER``); the supervisor writes the key and closes its end
before the worker runs, the worker reads it once at start and closes the pipe. Not an
environment variable: that stays readable in ``/proc/<pid>/environ`` for the worker's
whole life and is copied into every process the worker starts (a transcoder, say). Not
the command line: ``/proc/<pid>/cmdline`` is readable by every user. The key is never
logged; it joins the config's secrets (``iter_secrets``) so leak checks look for it.
"""

from __future__ import annotations

import base64
import dataclasses
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..config import Config
from ..config.mcp_scale import McpSessions
from ..core.errors import SidecarError

__all__ = ["draw", "needs_key", "receive", "send", "with_key"]

_SIZES = (16, 24, 32)


def needs_key(config: Config) -> bool:
    """An MCP upstream, and no configured sealing key: the supervisor must draw one."""
    return any(u.kind == "mcp" for u in config.upstreams) and not config.mcp_sessions.configured


def draw() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def with_key(config: Config, key: bytes) -> Config:
    """``config`` sealing with ``key`` (as if ``seal_key_env`` named it), its lifetime unchanged."""
    text = base64.b64encode(key).decode()
    sessions = McpSessions((key,), (text,), config.mcp_sessions.ttl)
    return dataclasses.replace(config, mcp_sessions=sessions)


def send(key: bytes) -> int:
    """A pipe holding ``key``, its write end closed: the read end, for the child to inherit (then close it)."""
    r, w = os.pipe()
    try:
        os.write(w, key)  # 32 bytes: far below a pipe's buffer, so this never blocks
    finally:
        os.close(w)
    return r


def receive(fd: int) -> bytes:
    """The key the supervisor put in pipe ``fd`` (read to the end, then closed)."""
    try:
        with os.fdopen(fd, "rb") as pipe:
            key = pipe.read(64)
    except OSError as e:
        raise SidecarError(f"worker: cannot read the MCP sealing key from the supervisor: {e.strerror or e}") from None
    if len(key) not in _SIZES:
        raise SidecarError("worker: the supervisor handed no MCP sealing key")
    return key
