"""What a key's record is *now*, for the verifier: after an await, and across a re-read of the store.

Two moments where an old record object could decide for a key whose record has changed
(docs/reliability.md, "Clock"; invariant 5):

- ``current``: the argon2 queue can hold a first check for seconds; a poll meanwhile may
  revoke the key, cut its permissions or (a keys-file edit) give its id another secret.
- ``carried``: a re-read (SIGHUP, a keys-file edit, a poll) makes new record objects for
  unchanged keys; if that dropped the "seen ended" latch, a wall clock stepped back would
  revive every expired or revoked key at the next reload.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..core.errors import InvalidKey, RevokedKey
from .models import KeyRecord

__all__ = ["Ended", "carried", "carry", "current"]

Ended = tuple[KeyRecord, str, bool]  # (record, "revoked"/"expired", ended by its own times, not a parent's)


def current(table: Mapping[str, KeyRecord], verified: KeyRecord) -> KeyRecord:
    """The table's record for a key whose secret was checked against ``verified`` before an await."""
    now = table.get(verified.id)
    if now is verified:
        return verified
    if now is None:
        raise RevokedKey("this API key has been revoked")  # gone from the store while it was checked
    if now.hash != verified.hash:
        raise InvalidKey("wrong API key")  # its secret was replaced: the one presented is no longer it
    return now


def carried(ended: Ended, record: KeyRecord | None) -> Ended | None:
    """A latched end carried over to a re-read ``record`` of the key, or None: judged afresh.

    The end stays while the record's own ``revoked_at`` and ``expires_at`` are what ended it: an
    operator who extends or un-revokes a key changes them. An end that came from an OAuth grant's
    parent is not carried: the parent's own latch ends the grant again.
    """
    old, state, own = ended
    if record is old:
        return ended
    if record is None or not own or (record.revoked_at, record.expires_at) != (old.revoked_at, old.expires_at):
        return None
    return record, state, own


def carry(latches: dict[str, Ended], record: KeyRecord) -> None:
    """A poll brought a new ``record`` of a key: keep its latch if ``carried`` says so, else drop it."""
    ended = latches.pop(record.id, None)
    if ended is not None and (kept := carried(ended, record)):
        latches[record.id] = kept
