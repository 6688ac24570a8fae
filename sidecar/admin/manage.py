"""Key lifecycle shared by the CLI and the admin API: create, patch, revoke, rotate.

One place validates a key's fields, applies ``keys.max_lifetime`` and
``keys.max_keys_per_owner``, limits what a delegated key may grant (``sidecar.admin.delegation``),
and writes the audit trail, so the front ends (CLI, admin API, console) cannot disagree.

Every change is a read-modify-write inside one store transaction (``Store.update_key``,
``Store.create_key``): the owner count and the insert cannot be interleaved by a parallel
create, and a PATCH racing a revoke cannot resurrect the key. Lifetimes are bounded from
``created_at``: no PATCH carries a key past ``created_at + keys.max_lifetime``.

Works on any store; a YAML store is read-only, so there ``create`` and ``rotate`` (with
``entry_only``) build the record for the caller to print as a paste-able entry, and
every other change raises ``ReadOnlyStore``.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import unicodedata
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ..auth.keys import display_form, generate_key
from ..auth.models import KeyRecord, Permissions, iso, parse_time
from ..auth.verify import argon2_pool, password_hasher
from ..config import Config, parse_duration, parse_limit
from ..core.errors import BadRequest, Conflict, ExpiredKey, Forbidden, NotFound, RevokedKey
from ..limits.carry import EditLocks
from ..observe.logfilter import redact_path_keys
from ..store import KeyMissing, OwnerLimitReached, ReadOnlyStore, Store
from ..store.base import AuditEvent
from .delegation import check_grant, check_target

if TYPE_CHECKING:
    from ..limits.ratelimit import RateLimiter

__all__ = ["KeyManager", "parse_expires"]

_MAX_NAME = 200


def _plain(text: str, multiline: bool = False) -> bool:
    """No control or format characters: a name with U+202E renders as another key's name in the
    console and the lists, a NUL or a newline breaks lines that quote it (a description may wrap), a lone
    surrogate (JSON's ``"\\ud800"``) cannot be stored or written at all (a 500, a page that fails)."""
    return not any(
        (cat := unicodedata.category(ch)) in ("Cf", "Cs") or (cat == "Cc" and not (multiline and ch in "\n\t"))
        for ch in text
    )


_MAX_DESCRIPTION = 2000
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_TIME = 253402300799.0  # 9999-12-31T23:59:59Z: the last instant an ISO date can show
MAX_GRACE = 366 * 86400.0  # a rotation's grace period is at most a year
MAX_CONCURRENCY = 1_000_000
# An OAuth grant is held to its parent's current limits (sidecar/oauth/grants.py): its own copy is not
# what counts, so an edit of it would be a limit that does not hold and is refused.
_PARENTS_LIMITS = ("rate_limits", "quota", "concurrency")
# A rotated key and its successor spend one budget during the grace: with different limits, each would
# read the other's buckets its own way or spend buckets and counters of its own (another period, another
# quota scope), so their limits are not edited until the grace ends.
_SHARED = "key {} shares its budget with key {} (a rotation's grace), so its limits cannot change {}"


def _limits_change(kw: Mapping[str, Any], rec: KeyRecord) -> bool:
    return any(f in kw and kw[f] != getattr(rec, f) for f in _PARENTS_LIMITS)


def parse_expires(value: object, now: float) -> float | None:
    """``90d``/``12h`` from now, an ISO date/time, epoch seconds, or None/"never"."""
    if value is None or value in ("", "never"):
        return None
    if isinstance(value, str) and value[:1].isdigit() and value[-1:] in "smhdw" and "-" not in value:
        ts = now + parse_duration(value)
        if not math.isfinite(ts) or ts > MAX_TIME:
            raise ValueError("too far in the future (the latest is 9999-12-31)")
        return ts
    try:
        parsed = parse_time(value)
    except OverflowError:
        raise ValueError("too far in the future (the latest is 9999-12-31)") from None
    assert parsed is not None
    if not math.isfinite(parsed) or parsed > MAX_TIME:
        raise ValueError("too far in the future (the latest is 9999-12-31)")
    return parsed


# A PATCH with ``"permissions": null`` is refused: null would read as the defaults, every upstream.
NULL_PERMISSIONS = (
    "permissions: null is not accepted in a change; leave the field out to keep the permissions, "
    'or send {"upstreams": ["*"]} to allow every upstream'
)


class KeyManager:
    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        limiter: RateLimiter | None = None,
        edit_locks: EditLocks | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.hasher = password_hasher(config.keys.argon2_profile)
        self.limiter = limiter  # a serving sidecar's: an edit moving a key's quota scope carries its count
        self.edit_locks = edit_locks or EditLocks()  # the application's: one key's edits one after another

    # ---------------------------------------------------------------- checks

    def _check_fields(self, fields: Mapping[str, Any], now: float) -> dict[str, Any]:
        """Validate user-supplied fields; return KeyRecord keyword arguments."""
        out: dict[str, Any] = {}
        allowed = {"name", "description", "owner", "permissions", "rate_limits", "quota", "concurrency",
                   "expires_at", "expires", "upstream_token_env"}  # fmt: skip
        unknown = set(fields) - allowed
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
        if "name" in fields:
            name = fields["name"]
            if not isinstance(name, str) or not name.strip() or len(name) > _MAX_NAME:
                raise BadRequest(f"name: required, 1-{_MAX_NAME} characters")
            if not _plain(name):
                raise BadRequest("name: no control or bidirectional-format characters")
            out["name"] = name.strip()
        for f in ("description", "owner"):
            if f in fields:
                v = fields[f]
                if v is not None and not isinstance(v, str):
                    raise BadRequest(f"{f}: expected a string")
                longest = _MAX_DESCRIPTION if f == "description" else _MAX_NAME
                if v is not None and len(v) > longest:  # the owner is a metrics label too
                    raise BadRequest(f"{f}: at most {longest} characters")
                if v is not None and not _plain(v, multiline=f == "description"):
                    raise BadRequest(f"{f}: no control or bidirectional-format characters")
                out[f] = (v or "") if f == "description" else (v or None)
        if "permissions" in fields:
            try:
                perms = Permissions.from_dict(fields["permissions"])
            except ValueError as e:
                raise BadRequest(str(e)) from None
            ids = {u.id for u in self.config.upstreams}
            for up in perms.upstreams:
                if up != "*" and up not in ids:
                    raise BadRequest(f"permissions.upstreams: no upstream with id {up!r}")
            for kind in ("tools", "resources", "prompts"):
                for up in getattr(perms, kind):
                    if up != "*" and up not in ids:
                        raise BadRequest(f"permissions.{kind}: no upstream with id {up!r}")
            out["permissions"] = perms
        if "rate_limits" in fields:
            limits = fields["rate_limits"] or []
            if isinstance(limits, str):
                limits = [limits]
            if not isinstance(limits, list):
                raise BadRequest('rate_limits: expected a list such as ["60/minute"]')
            for lim in limits:
                try:
                    parse_limit(lim)
                except ValueError as e:
                    raise BadRequest(f"rate_limits: {e}") from None
            out["rate_limits"] = tuple(str(x) for x in limits)
        if "quota" in fields:
            q = fields["quota"]
            if q is not None:
                try:
                    parse_limit(q)
                except ValueError as e:
                    raise BadRequest(f"quota: {e}") from None
            out["quota"] = q or None
        if "concurrency" in fields:
            c = fields["concurrency"]
            if c is not None and (not isinstance(c, int) or isinstance(c, bool) or not 1 <= c <= MAX_CONCURRENCY):
                raise BadRequest(f"concurrency: expected a whole number from 1 to {MAX_CONCURRENCY}")
            out["concurrency"] = c
        if "upstream_token_env" in fields:
            ute = fields["upstream_token_env"] or {}
            if not isinstance(ute, Mapping) or not all(isinstance(v, str) and _ENV_NAME.match(v) for v in ute.values()):
                raise BadRequest("upstream_token_env: expected {upstream id: ENV_VAR_NAME}")
            for up in ute:
                if self.config.upstream(str(up)) is None:
                    raise BadRequest(f"upstream_token_env: no upstream with id {up!r}")
            for name in ute.values():  # any other variable could be any secret of the process
                if not self.config.keys.token_env_allowed(name):
                    raise BadRequest(f"upstream_token_env: {name} is not allowed by keys.upstream_token_envs")
            out["upstream_token_env"] = {str(k): v for k, v in ute.items()}
        if "expires" in fields or "expires_at" in fields:
            raw = fields.get("expires", fields.get("expires_at"))
            try:
                expires = parse_expires(raw, now)
            except ValueError as e:
                raise BadRequest(f"expires: {e}") from None
            if expires is not None and expires <= now:
                raise BadRequest("expires: must be in the future")
            out["expires_at"] = expires
        return out

    def _cap_lifetime(self, expires: float | None, created: float, now: float, *, clamp: bool = False) -> float | None:
        """Apply ``keys.max_lifetime``, counted from the key's creation (never from now, so a
        PATCH cannot extend a key again and again): no expiry becomes the last allowed
        moment; a later one is refused (or clamped)."""
        cap = self.config.keys.max_lifetime
        if cap is None:
            return expires
        last = created + cap
        if expires is None or (clamp and expires > last):
            if last <= now:
                raise BadRequest(
                    f"expires: this key reached the maximum key lifetime ({_human(cap)} from its creation) "
                    f"at {iso(last)}; rotate it or create a new key"
                )
            return last
        if expires > last:
            raise BadRequest(
                f"expires: beyond the configured maximum key lifetime ({_human(cap)} from the key's creation, "
                f"{iso(last)})"
            )
        return expires

    async def current_actor(self, by: KeyRecord | None, now: float) -> KeyRecord | None:
        """The key making the request as the store holds it *now*, not as it was when the request's
        headers were read: a request held open (a slow body) must not finish with powers its key
        lost meanwhile — revoked, expired, ``admin`` taken away or narrowed. None: the admin token."""
        if by is None:
            return None
        cur = await self.store.get(by.id)
        state = "revoked" if cur is None else cur.state(now)
        if state == "revoked":
            raise RevokedKey("this API key has been revoked")
        if state == "expired":
            raise ExpiredKey("this API key has expired")
        assert cur is not None
        if not cur.permissions.admin:
            raise Forbidden("this key does not have the admin permission")
        return cur

    async def _check_owner_limit(self, owner: str | None, now: float) -> None:
        """A quick, early refusal (before argon2 runs); the binding check is in the store's write."""
        limit = self.config.keys.max_keys_per_owner
        if owner and limit is not None and await self.store.count_active(owner, now) >= limit:
            raise Conflict(f"owner {owner!r} already has the maximum of {limit} active keys")

    async def _new_record(self, now: float, **kw: Any) -> tuple[KeyRecord, str]:
        prefix = self.config.keys.prefix
        key, parsed = generate_key(prefix)
        # Hashing costs what verifying does (~0.1-0.3 s): in the argon2 threads, never on the loop.
        hashed = await asyncio.get_running_loop().run_in_executor(argon2_pool(), self.hasher.hash, parsed.secret)
        record = KeyRecord(
            id=parsed.key_id,
            hash=hashed,
            display=display_form(prefix, parsed.key_id, key),
            created_at=now,
            **kw,
        )
        return record, key

    def _writable(self, entry_only: bool) -> bool:
        """True to write; False to only build the record (YAML store, ``entry_only``)."""
        if self.store.writable:
            return True
        if entry_only:
            return False
        where = getattr(self.store, "path", None)
        raise ReadOnlyStore(
            f"keys are managed in the keys file {where.name if where else ''}: edit it "
            "(`sidecar keys create` prints a new entry to paste)"
        )

    # ------------------------------------------------------------ operations

    async def create(
        self, fields: Mapping[str, Any], actor: str, *, entry_only: bool = False, by: KeyRecord | None = None
    ) -> tuple[KeyRecord, str]:
        """A new key: (record, the full key — shown once, never stored).

        On a read-only (YAML) store this refuses, unless ``entry_only``: then the record
        is only built, for the caller to print as the entry to paste into the file.
        ``by`` is the key making the request (admin API), None for the admin token and CLI:
        a delegated key may only create keys within its own reach (``sidecar.admin.delegation``).
        """
        now = self.clock()
        write = self._writable(entry_only)
        if "name" not in fields:
            raise BadRequest("name: required")
        kw = self._check_fields(fields, now)
        by = await self.current_actor(by, now)
        if by is not None and "owner" not in fields:
            kw["owner"] = by.owner  # a delegated key creates keys for its own owner
        kw["expires_at"] = self._cap_lifetime(kw.get("expires_at"), now, now)
        if by is not None:
            check_grant(self.config, by, KeyRecord(id="", hash="", created_at=now, **kw), now)
        await self._check_owner_limit(kw.get("owner"), now)
        record, key = await self._new_record(now, **kw)
        if write:
            try:
                await self.store.create_key(record, max_per_owner=self.config.keys.max_keys_per_owner, now=now)
            except OwnerLimitReached as e:
                raise Conflict(str(e)) from None
            await self.store.audit(AuditEvent(now, actor, "created", record.id, {"name": record.name}))
        return record, key

    async def get(self, key_id: str) -> KeyRecord:
        rec = await self.store.get(key_id)
        if rec is None:
            raise NotFound(f"no key with id {redact_path_keys(key_id)!r}")  # a key given for its id: not echoed
        return rec

    async def quota_status(self, rec: KeyRecord) -> list[dict[str, Any]] | None:
        """Used and remaining quota per scope (``sidecar keys show``); None when no quota applies."""
        from ..limits.ratelimit import read_quota_status

        return await read_quota_status(self.config, self.store, rec, clock=self.clock)

    async def _update(
        self,
        key_id: str,
        change: Callable[[KeyRecord], KeyRecord],
        now: float,
        insert: KeyRecord | None = None,
    ) -> tuple[KeyRecord, KeyRecord]:
        """One atomic read-modify-write through the store, with its errors as the API's."""
        try:
            return await self.store.update_key(
                key_id, change, max_per_owner=self.config.keys.max_keys_per_owner, now=now, insert=insert
            )
        except KeyMissing:
            raise NotFound(f"no key with id {redact_path_keys(key_id)!r}") from None  # a key given for its id
        except OwnerLimitReached as e:
            raise Conflict(str(e)) from None

    async def patch(
        self, key_id: str, fields: Mapping[str, Any], actor: str, *, by: KeyRecord | None = None
    ) -> KeyRecord:
        now = self.clock()
        self._writable(False)
        current = await self.get(key_id)  # 404 before 400: an unknown id is the first thing to say
        if not fields:
            raise BadRequest("nothing to change: send the fields to set")
        if "permissions" in fields and fields["permissions"] is None:
            raise BadRequest(NULL_PERMISSIONS)  # would read as "the defaults": every upstream (fails open)
        kw = self._check_fields(fields, now)
        by = await self.current_actor(by, now)

        def change(rec: KeyRecord) -> KeyRecord:
            if rec.state(now) == "revoked":
                raise Conflict("a revoked key cannot be changed")
            if by is not None:
                check_target(self.config, by, rec, now)
            if rec.parent_id is not None and any(f in kw and kw[f] != getattr(rec, f) for f in _PARENTS_LIMITS):
                raise Conflict(f"an OAuth grant has its parent key's limits: change those of key {rec.parent_id}")
            if rec.rotated_to and rec.state(now) == "active" and _limits_change(kw, rec):
                raise Conflict(_SHARED.format(rec.id, rec.rotated_to, "until its rotation's grace ends (revoke it)"))
            changes = dict(kw)
            if "expires_at" in changes:
                changes["expires_at"] = self._cap_lifetime(changes["expires_at"], rec.created_at, now)
            new = rec.with_changes(**changes)
            if by is not None:
                check_grant(self.config, by, new, now)
            return new

        if current.budget_id and current.parent_id is None and _limits_change(kw, current):  # a successor
            if by is not None:
                check_target(self.config, by, current, now)  # a 403 first (the binding check is in the write)
            for other in await self.store.list_keys():  # an edit's rare case: a scan is fine
                same = (other.budget_id or other.id) == current.budget_id and other.id != current.id
                if same and other.parent_id is None and other.state(now) == "active":
                    until = f"until that key's grace ends (revoke {other.id})"
                    raise Conflict(_SHARED.format(current.id, other.id, until))
        if kw.get("owner") and kw["owner"] != current.owner:
            await self._check_owner_limit(kw["owner"], now)  # early; the binding check is in the write
        async with self.edit_locks.hold(key_id, self.limiter):  # one edit's write and carry, then the next (EditLocks)
            before, new = await self._update(key_id, change, now)
            if self.limiter is not None:  # before the hot path sees the edit (the caller refreshes after)
                from ..limits.carry import carry_quota, carry_rates

                await carry_quota(self.limiter, before, new)
                await carry_rates(self.limiter, before, new)
        await self.store.audit(AuditEvent(now, actor, "patched", key_id, {"fields": sorted(kw)}))
        return new

    async def revoke(self, key_id: str, actor: str, *, by: KeyRecord | None = None) -> KeyRecord:
        now = self.clock()
        self._writable(False)
        by = await self.current_actor(by, now)

        def change(rec: KeyRecord) -> KeyRecord:
            if by is not None:
                check_target(self.config, by, rec, now)
            if rec.revoked_at is not None and rec.revoked_at <= now:
                return rec  # already revoked: nothing to do, nothing to audit
            return rec.with_changes(revoked_at=now)

        before, after = await self._update(key_id, change, now)
        if after is not before:
            await self.store.audit(AuditEvent(now, actor, "revoked", key_id, {}))
        return after

    async def rotate(
        self, key_id: str, actor: str, grace: float = 0.0, *, entry_only: bool = False, by: KeyRecord | None = None
    ) -> tuple[KeyRecord, str]:
        """A new key with the same permissions; the old one works ``grace`` seconds more, then is revoked.

        The old key's end is recorded as a scheduled ``revoked_at``, so after the grace it
        answers ``revoked_key`` and stays listed with ``rotated_to`` pointing at its successor.
        Rotation never changes an owner's key count: the replaced key stops counting for
        ``keys.max_keys_per_owner`` when its successor starts (docs/keys.md), so it works for
        an owner at the limit and cannot be used to get past it. The successor keeps the old
        key's expiry (``keys.max_lifetime`` bounds how long one secret lives; a rotation makes
        a new secret).
        """
        now = self.clock()
        write = self._writable(entry_only)
        if not isinstance(grace, int | float) or not math.isfinite(grace) or not 0 <= grace <= MAX_GRACE:
            raise BadRequest(f"grace: expected a duration from 0 to {_human(MAX_GRACE)}")
        old = await self.get(key_id)
        by = await self.current_actor(by, now)

        def usable(rec: KeyRecord) -> None:
            if rec.state(now) != "active":
                raise Conflict(f"only an active key can be rotated (this one is {rec.state(now)})")
            if rec.rotated_to:
                raise Conflict(f"this key was already rotated to {rec.rotated_to}; rotate that one")
            if rec.parent_id is not None:  # its successor would be a plain key, no longer ended by its parent
                raise Conflict("an OAuth grant cannot be rotated: its client renews its tokens itself")
            if by is not None:
                check_target(self.config, by, rec, now)

        usable(old)
        fields = {
            "name": old.name, "description": old.description, "owner": old.owner,
            "permissions": old.permissions.to_dict(), "rate_limits": list(old.rate_limits), "quota": old.quota,
            "concurrency": old.concurrency, "upstream_token_env": dict(old.upstream_token_env),
        }  # fmt: skip
        kw = self._check_fields(fields, now)
        # Same expiry as the old key, but never past the configured maximum lifetime.
        expires = self._cap_lifetime(old.expires_at, now, now, clamp=True)
        new, key = await self._new_record(now, expires_at=expires, **kw)
        new = new.with_changes(budget_id=old.budget_id or old.id)  # the same budget, not a fresh one
        if by is not None:
            check_grant(self.config, by, new, now)
        if not write:
            return new, key
        ends = now + grace

        def retire(rec: KeyRecord) -> KeyRecord:
            usable(rec)  # again, in the transaction: two parallel rotations make one successor
            return rec.with_changes(rotated_to=new.id, revoked_at=ends)

        await self._update(key_id, retire, now, insert=new)
        await self.store.audit(AuditEvent(now, actor, "rotated", key_id, {"new_key": new.id, "grace_seconds": grace}))
        return new, key


def _human(seconds: float) -> str:
    if seconds >= 86400 and seconds % 86400 == 0:
        return f"{seconds / 86400:g} days"
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} hours"
    return f"{seconds:g} seconds"
