"""What a key may do on an MCP upstream, judged from the JSON-RPC body (tools, resources, prompts).

Pure but for :class:`BodyJudge`, which only decides *where* the pure work runs.

* :class:`McpAccess` is a key's ``tools`` / ``resources`` / ``prompts`` globs for one
  upstream, resolved once per request (see ``permissions.mcp_globs`` for the rule: a key
  that names any of the three on an upstream is limited in all three, and what it does
  not name is denied; a key that names none is not limited).
* :func:`judge` parses a POST body, checks it against its ``Mcp-*`` headers and decides,
  message by message, what is refused, what is dropped, which list answers must be
  filtered and which bytes go upstream. It returns a small :class:`Decision`, so the
  parsed tree (up to ``mcp.max_body`` of JSON) is freed where it was built.
* :class:`BodyJudge` runs :func:`judge` inline for small bodies and in a worker thread,
  one at a time, for large ones (with the cyclic GC paused): a large body then holds the
  event loop for at most one parse (the json module keeps the GIL while it parses),
  never for the sum of all the bodies that arrived together, and only one large tree
  is alive at a time.

Bodies are read into exactly the tree the standard library's json makes
(``jsonrpc.loads_exact``: orjson only where it reads the same, since orjson makes
integers above 64 bits floats): a batch re-serialised after a refusal must not differ
from what the client sent, and the sidecar must judge exactly what the upstream reads.
"""

from __future__ import annotations

import asyncio
import fnmatch
import gc
import json
import re
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any, TypeVar
from urllib.parse import unquote

from ...auth.models import Permissions
from ...auth.permissions import mcp_globs
from ...core.names import valid
from .jsonrpc import (
    INVALID_PARAMS,
    TOOL_FORBIDDEN,
    TOOL_RATE_LIMITED,
    JsonRpcError,
    Message,
    check_headers,
    dumps,
    error_object,
    parse_body,
)

__all__ = ["CALLS", "LISTS", "BodyJudge", "Decision", "McpAccess", "judge", "refusal"]

_T = TypeVar("_T")
INLINE_MAX = 64 * 1024  # bodies up to this size are judged on the event loop (well under a millisecond)

# Requests that act on one named thing: method -> (kind, params key, what the refusal says).
CALLS: dict[str, tuple[str, str, str]] = {
    "tools/call": ("tools", "name", "call tool"),
    "resources/read": ("resources", "uri", "read resource"),
    "resources/subscribe": ("resources", "uri", "subscribe to resource"),
    "resources/unsubscribe": ("resources", "uri", "unsubscribe from resource"),
    "prompts/get": ("prompts", "name", "get prompt"),
}
# List requests whose answers are filtered: method -> (kind, result field, item key).
LISTS: dict[str, tuple[str, str, str]] = {
    "tools/list": ("tools", "tools", "name"),
    "resources/list": ("resources", "resources", "uri"),
    "resources/templates/list": ("resources", "resourceTemplates", "uriTemplate"),
    "prompts/list": ("prompts", "prompts", "name"),
}
_COMPLETION_REFS = {
    "ref/prompt": ("prompts", "name", "complete prompt"),
    "ref/resource": ("resources", "uri", "complete resource"),
}
# 2025-11-25's tasks: ids the upstream hands out and reads back, which it cannot bind to a key (it sees one
# credential for all); a key whose MCP access is limited may not use them (``_task_use``).
TASK_METHODS = frozenset({"tasks/get", "tasks/result", "tasks/cancel", "tasks/list"})
# 2026-07-28's subscriptions/listen names the resources to watch in params.notifications (the SDK's
# model takes the field by its alias or by its name): resources/subscribe in another form.
_LISTEN_FIELDS = ("resourceSubscriptions", "resource_subscriptions")


@lru_cache(maxsize=4096)
def _pattern(globs: tuple[str, ...]) -> re.Pattern[str] | None:
    if not globs:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))


@dataclass(frozen=True, slots=True)
class McpAccess:
    """One key's MCP limits on one upstream: per kind, the globs it may use (None = everything)."""

    tools: tuple[str, ...] | None = None
    resources: tuple[str, ...] | None = None
    prompts: tuple[str, ...] | None = None

    @classmethod
    def of(cls, perms: Permissions, upstream_id: str) -> McpAccess:
        return cls(
            mcp_globs(perms, upstream_id, "tools"),
            mcp_globs(perms, upstream_id, "resources"),
            mcp_globs(perms, upstream_id, "prompts"),
        )

    @classmethod
    def cached(cls, perms: Permissions, upstream_id: str) -> McpAccess:
        """``of``, memoised per permission set (records share interned ``Permissions``; a key edit makes a new one)."""
        ident = (id(perms), upstream_id)
        hit = _ACCESS.get(ident)
        if hit is not None and hit[0] is perms:
            return hit[1]
        if len(_ACCESS) >= 4096:
            _ACCESS.clear()
        access = _ACCESS[ident] = (perms, cls.of(perms, upstream_id))
        return access[1]

    @property
    def restricted(self) -> bool:
        """Whether any list answer needs filtering (if not, the upstream's answers pass untouched)."""
        return self.tools is not None or self.resources is not None or self.prompts is not None

    def allows(self, kind: str, name: Any) -> bool:
        """Tool name, resource URI (or a template's text, for template lists) or prompt name; ``tasks``: any use."""
        if kind == "tasks":
            return not self.restricted
        globs: tuple[str, ...] | None = getattr(self, kind)
        if globs is None:
            return True
        pat = _pattern(globs)
        if pat is None or not isinstance(name, str) or (kind == "resources" and _dot_segments(name)):
            return False
        return pat.match(name) is not None


_DOT_SEGMENT = re.compile(r"(?:^|[/\\])\.\.?(?:[/\\?#]|$)")


def _dot_segments(uri: str) -> bool:
    """Whether a URI has ``.`` / ``..`` segments, plain or percent-encoded (up to three times over).

    ``docs://public/../secret`` matches the glob ``docs://public/*``; an upstream that resolves
    dot segments (RFC 3986 §5.2.4, or a file server joining paths) reads ``docs://secret``. As
    with paths (``permissions.normalize_path``), such a URI is refused rather than judged one
    way here and read another way there.
    """
    for _ in range(3):
        if _DOT_SEGMENT.search(uri):
            return True
        if "%" not in uri:
            return False
        uri = unquote(uri)
    return _DOT_SEGMENT.search(uri) is not None


_ACCESS: dict[tuple[int, str], tuple[Permissions, McpAccess]] = {}  # the object is kept: its id stays its own


def refusal(rid: Any, verb: str, name: Any) -> dict[str, Any]:
    """The JSON-RPC error a refused call gets (the same code for tools, resources and prompts)."""
    shown = name if isinstance(name, str) else "?"
    return error_object(rid, TOOL_FORBIDDEN, f"this key may not {verb} {shown!r}", {"code": "insufficient_permissions"})


def _target(msg: Message) -> tuple[str, Any, str] | None:
    """``(kind, name, verb)`` for a message that names a tool, resource or prompt; None otherwise."""
    method = msg.method
    if method is None:
        return None
    spec = CALLS.get(method)
    if spec is not None:
        kind, key, verb = spec
        return kind, msg.params.get(key), verb
    if method == "completion/complete":  # completions describe a prompt's or a template's arguments
        ref = msg.params.get("ref")
        if isinstance(ref, dict) and ref.get("type") in _COMPLETION_REFS:
            kind, key, verb = _COMPLETION_REFS[ref["type"]]
            return kind, ref.get(key), verb
    return None


def _task_use(msg: Message) -> tuple[str, Any, str] | None:
    """A ``tasks/*`` request, or a ``tools/call`` asking to run as a task (``params.task``).

    The upstream's task store answers whoever names a task id, and behind the sidecar every key is
    the same caller to it: another key's ``tasks/result`` would be that key's answer, ``tasks/list``
    would name every key's tasks. Until task ids are bound to keys, a limited key does not use tasks.
    """
    if msg.method in TASK_METHODS:
        return "tasks", msg.method, "use"
    if msg.method == "tools/call" and "task" in msg.params:
        return "tasks", msg.params.get("name"), "call as a task the tool"
    return None


def _listen_refused(msg: Message, access: McpAccess) -> tuple[str, Any, str] | None:
    """A ``subscriptions/listen`` naming a resource the key may not read (or not a list of URIs)."""
    notes = msg.params.get("notifications")
    if not isinstance(notes, dict):
        return None  # nothing named (the upstream refuses a malformed filter itself)
    for name in _LISTEN_FIELDS:
        uris = notes.get(name)
        if uris is None:
            continue
        for uri in uris if isinstance(uris, list) else [uris]:
            if not access.allows("resources", uri):
                return "resources", uri, "subscribe to resource"
    return None


@dataclass(slots=True)
class Decision:
    """What to do with one POST body (everything the gateway needs once the tree is gone)."""

    error: JsonRpcError | None = None
    batch: bool = False
    tools: list[str] = field(default_factory=list)  # tools named by tools/call (logs and metrics)
    refused: list[dict[str, Any]] = field(default_factory=list)  # the refusals of requests, in order
    dropped: int = 0  # refused notifications: nothing to answer
    kept: int = 0  # the client's messages that go upstream
    lists: list[tuple[Any, str]] = field(default_factory=list)  # (id, method) of list answers to filter
    calls: list[tuple[int, str]] = field(default_factory=list)  # (message index, tool) of tools/call going up
    forward: bytes | None = None  # the body for the upstream; None: nothing goes up
    forward_has_request: bool = False  # the forwarded body holds a request (an answer will come)
    single_id: Any = None  # the id of a lone request (not a batch): its answer ends the POST's stream

    @property
    def denied(self) -> bool:
        return bool(self.refused) or self.dropped > 0


def judge(
    raw: bytes,
    headers: Iterable[tuple[str, str]],
    access: McpAccess,
    *,
    legacy: bool,
    limited: Mapping[int, tuple[str, dict[str, Any]]] | None = None,
) -> Decision:
    """Parse, check and authorize a POST body.

    ``legacy``: answers travel down a legacy SSE stream, so a refused request goes up as a
    ``ping`` with the same id (the gateway swaps its answer for the refusal on the way
    down) instead of being answered here. ``limited``: message index -> (message, data) of
    a ``tools/call`` over its per-tool rate limit (``toollimits.py``), refused like a
    forbidden one but with ``TOOL_RATE_LIMITED``.
    """
    try:
        body = parse_body(raw)
        check_headers(body, headers)
    except JsonRpcError as e:
        return Decision(error=e)
    d = Decision(batch=body.batch)
    out: list[Any] = []
    changed = False
    for i, msg in enumerate(body.messages):
        target = _target(msg)
        if target is None and msg.method == "subscriptions/listen" and access.resources is not None:
            target = _listen_refused(msg, access)
        if access.restricted and (task := _task_use(msg)) is not None:
            target = task
        if target is not None:
            kind, name, verb = target
            if isinstance(name, str) and not valid(name):  # a lone surrogate: no sink could write it (core/names.py)
                return Decision(
                    error=JsonRpcError(
                        INVALID_PARAMS, "Invalid params: a name that is not valid Unicode (a lone surrogate)"
                    )
                )
            if kind == "tools" and isinstance(name, str):
                d.tools.append(name)
            over = limited.get(i) if limited else None
            if over is not None or not access.allows(kind, name):
                changed = True
                if msg.is_request:
                    d.refused.append(
                        refusal(msg.id, verb, name) if over is None else error_object(msg.id, TOOL_RATE_LIMITED, *over)
                    )
                    if legacy:
                        out.append({"jsonrpc": "2.0", "id": msg.id, "method": "ping"})
                        d.forward_has_request = True
                else:
                    d.dropped += 1
                continue
            if kind == "tools" and isinstance(name, str):
                d.calls.append((i, name))
        d.kept += 1
        out.append(msg.raw)
        d.forward_has_request = d.forward_has_request or msg.is_request
        if msg.is_request and msg.method in LISTS:  # filtered, or at least its cacheScope checked
            d.lists.append((msg.id, msg.method))
    if not body.batch and d.kept and body.messages[0].is_request:
        d.single_id = body.messages[0].id
    if not changed:
        d.forward = raw
    elif out:
        d.forward = dumps(out if body.batch else out[0])
    return d


class BodyJudge:
    """Runs :func:`judge` without stalling other clients: large bodies in a thread, one at a time.

    The thread is its own (started once, on the first large body), not the loop's default
    executor: starting a pool thread waits for it to run, and while another thread holds
    the GIL in a parse that wait stalls the loop; sharing a pool with argon2 and DNS would
    also let a burst of bodies queue ahead of them.
    """

    def __init__(self, inline_max: int = INLINE_MAX, parallel: int = 1) -> None:
        self.inline_max = inline_max
        self.parallel = parallel
        self._pool: ThreadPoolExecutor | None = None

    async def judge(
        self,
        raw: bytes,
        headers: Iterable[tuple[str, str]],
        access: McpAccess,
        *,
        legacy: bool,
        limited: Mapping[int, tuple[str, dict[str, Any]]] | None = None,
    ) -> Decision:
        if len(raw) <= self.inline_max:
            return judge(raw, headers, access, legacy=legacy, limited=limited)
        items = list(headers)  # the thread gets its own copy
        return await self._run(partial(_without_gc, judge, raw, items, access, legacy=legacy, limited=limited))

    async def loads(self, raw: bytes) -> Any:
        """``json.loads`` under the same rule (the REST tool call's body); ValueError if it is not JSON."""
        if len(raw) <= self.inline_max:
            return _loads(raw)
        return await self._run(partial(_without_gc, _loads, raw))

    async def _run(self, fn: Callable[[], _T]) -> _T:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="sidecar-mcp-body")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def close(self) -> None:
        """Let the thread go (a parse under way finishes; nothing waits for it)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _without_gc(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Run a large parse with the cyclic GC paused.

    A megabyte of tiny JSON values is hundreds of thousands of allocations: enough to set
    off collections of every generation, and a full one walks the whole heap while the
    parse holds the GIL (100 ms measured, on top of the parse). A parsed JSON tree has no
    cycles, so there is nothing for the collector to find in it. Only this module's one
    worker thread pauses it, and only if it was on.
    """
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        return fn(*args, **kwargs)
    finally:
        if paused:
            gc.enable()


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None
