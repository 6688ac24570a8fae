"""``keys.max_lifetime`` for keys already in a database store (SQLite, PostgreSQL).

The admin API caps a key's expiry when the key is created or patched (``sidecar.admin.manage``),
with the cap configured *then*. Lowering ``keys.max_lifetime`` later (or setting it for the
first time) must shorten the keys that already exist too, as it does for a YAML keys file
(``sidecar.store.lifetime``). So every record a database store hands out — ``load_all``,
``poll`` (LISTEN/NOTIFY changes, resyncs, ``SIGHUP``), ``get``, ``list_keys``, ``list_grants`` —
carries its effective expiry ``min(expires_at or ∞, created_at + max_lifetime)``, and every
consumer (verifier, "seen ended" latch, admin API, console, OAuth grants' parents) sees that one
value. The cap is applied when records are read, never per request.

The stored record is left as the operator wrote it: nothing capped is written back. Raising
``max_lifetime`` again gives back what the database holds. The cap is a pure function of the
record and the setting, so a re-read gives the same ``expires_at`` and the verifier's latch
(``sidecar.auth.latch.carried``) holds a capped key ended across polls and a clock stepped back.

A key's own ``created_at`` counts (an OAuth grant's is its own: grants end by their parent's
expiry anyway). A database key without ``created_at`` is refused as expired, as in a keys file.
Each shortened key is logged once (key id and effective expiry, never the hash).
``sidecar config check`` does not open the database, so it cannot list them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..auth.models import KeyRecord
from .base import KeyChanges, Store
from .lifetime import cap_lifetimes
from .sqlite import SqliteStore

__all__ = ["CappedSqliteStore", "LifetimeCap"]

log = logging.getLogger("sidecar.store")


class LifetimeCap(Store):
    """Put before a database store class: its reads come out with ``keys.max_lifetime`` applied.

    Its ``super()`` calls reach the concrete store that follows it in the MRO (never ``Store``'s
    abstract methods, which mypy cannot know: hence the ``safe-super`` ignores)."""

    max_lifetime: float | None = None
    _cap_clock: Callable[[], float] = staticmethod(time.time)
    _cap_said: set[str]  # the warnings already logged (once per key and expiry); set with the cap

    def set_lifetime_cap(self, max_lifetime: float | None, clock: Callable[[], float] | None = None) -> None:
        self.max_lifetime = max_lifetime
        self._cap_clock = clock or time.time
        self._cap_said = set()

    def _cap(self, records: dict[str, KeyRecord]) -> dict[str, KeyRecord]:
        if self.max_lifetime is None or not records:
            return records
        out, notes = cap_lifetimes(records, self.max_lifetime, self._cap_clock(), "key store", written_by_hand=False)
        for note in notes:
            if note not in self._cap_said:
                self._cap_said.add(note)
                log.warning("%s", note)
        return out

    def _cap_list(self, records: list[KeyRecord]) -> list[KeyRecord]:
        if self.max_lifetime is None:
            return records
        capped = self._cap({r.id: r for r in records})
        return [capped[r.id] for r in records]

    async def load_all(self) -> dict[str, KeyRecord]:
        return self._cap(await super().load_all())  # type: ignore[safe-super]

    async def poll(self, force: bool = False) -> KeyChanges | None:
        changes = await super().poll(force)  # type: ignore[safe-super]
        if changes is None or self.max_lifetime is None:
            return changes
        return KeyChanges(records=self._cap_list(changes.records), full=changes.full)

    async def get(self, key_id: str) -> KeyRecord | None:
        rec = await super().get(key_id)  # type: ignore[safe-super]
        return None if rec is None else self._cap_list([rec])[0]

    async def list_keys(self) -> list[KeyRecord]:
        return self._cap_list(await super().list_keys())  # type: ignore[safe-super]

    async def update_key(
        self,
        key_id: str,
        change: Callable[[KeyRecord], KeyRecord],
        *,
        max_per_owner: int | None,
        now: float,
        insert: KeyRecord | None = None,
    ) -> tuple[KeyRecord, KeyRecord]:
        """``change`` gets the record as stored (so a PATCH writes no capped value back); the
        (before, after) handed back carry the effective expiry, and stay one object when unchanged."""
        before, after = await super().update_key(  # type: ignore[safe-super]
            key_id, change, max_per_owner=max_per_owner, now=now, insert=insert
        )
        if self.max_lifetime is None:
            return before, after
        was = self._cap_list([before])[0]
        return (was, was) if after is before else (was, self._cap_list([after])[0])

    async def list_grants(self, key_id: str | None = None, client_id: str | None = None) -> list[KeyRecord]:
        return self._cap_list(await super().list_grants(key_id, client_id))


class CappedSqliteStore(LifetimeCap, SqliteStore):
    """The SQLite key store with ``keys.max_lifetime`` applied to what it reads."""
