"""``keys.max_lifetime`` for keys written in a YAML keys file (GitOps), as the admin API applies it.

The admin API caps a key's expiry at ``created_at + keys.max_lifetime`` when the key is created
or patched (``sidecar.admin.manage``). A keys file is written by hand, so the same cap is applied
each time the file is read: a key's effective expiry is ``min(expires_at or ∞, created_at +
max_lifetime)``, and the record every consumer sees (verifier, latch, stream sweeps, admin API
lists, OAuth grants' parents) carries that expiry. So a capped key answers ``401 expired_key``
at the cap, and the verifier's "seen ended" latch (``sidecar.auth.latch``) holds it like any
other expiry: a re-read of an unchanged entry gives the same capped ``expires_at``.

Why a cap and not a load error: an entry beyond the cap made a load error would refuse the
whole file, so the next restart of a deployment whose file has one such entry would start
with no keys at all (and a reload would keep the last good set, with that key in it). Capping
never lets a key outlive the cap and never turns a reload or restart into an outage; the
operator is told once per load (log) and by ``sidecar config check``, naming the entry and the
key id and the capped expiry, never the hash.

What "created" means: the entry's own ``created_at``, which ``sidecar keys create`` always
writes. It is not the time the sidecar first read the entry (that resets on every restart).
With ``max_lifetime`` set, an entry without ``created_at``, or with one in the future (more
than ``FUTURE_SKEW``; it would push the cap out at will), cannot be shown to be within the cap:
it is refused as expired (``expires_at`` 1970-01-01), with a warning saying why. Only that
entry fails closed; every other key keeps working. A future ``created_at`` is judged when the
file is read, so such an entry works once the file is re-read after that time.
"""

from __future__ import annotations

import time

from ..auth.models import KeyRecord, iso
from ..config import Config

__all__ = ["FUTURE_SKEW", "cap_lifetimes", "keys_file_warnings"]

FUTURE_SKEW = 300.0  # a created_at this far ahead of our clock is taken as clock skew, not a lie
_REFUSED = 0.0  # the expiry given to an entry whose age cannot be known: long past


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def cap_lifetimes(
    records: dict[str, KeyRecord],
    max_lifetime: float | None,
    now: float,
    source: str = "keys file",
    *,
    written_by_hand: bool = True,
) -> tuple[dict[str, KeyRecord], list[str]]:
    """The records with ``keys.max_lifetime`` applied, and one warning per entry it shortened.

    ``records`` is in file order (``parse_keys_file``), so ``keys[i]`` names the entry. A warning
    names the entry, the key id and the effective expiry; never the hash. A revoked entry is
    capped too, silently (the cap changes nothing for it).

    ``written_by_hand=False`` (a database store, ``sidecar.store.capped``): a warning names the key
    id alone (no file position), and a ``created_at`` in the future is counted as it stands, not
    refused: a sidecar process wrote it (another replica's clock a little ahead), and a key
    refused that way would stay refused until the next full reload.
    """
    if max_lifetime is None:
        return records, []
    out: dict[str, KeyRecord] = {}
    notes: list[str] = []
    cap = _span(max_lifetime)
    for i, rec in enumerate(records.values()):
        where = f"{source}: keys[{i}] (id {rec.id})" if written_by_hand else f"{source}: key {rec.id}"
        why: str | None = None
        if rec.created_at <= 0:
            last = _REFUSED
            why = (
                f"{where}: no created_at, so keys.max_lifetime ({cap}) cannot be counted: the key is refused "
                "as expired; add the created_at `sidecar keys create` printed"
            )
        elif written_by_hand and rec.created_at > now + FUTURE_SKEW:
            last = _REFUSED
            why = (
                f"{where}: created_at {iso(rec.created_at)} is in the future, so keys.max_lifetime ({cap}) cannot "
                "be counted: the key is refused as expired until the file is read after that time"
            )
        else:
            last = rec.created_at + max_lifetime
        if rec.expires_at is not None and rec.expires_at <= last:
            out[rec.id] = rec
            continue
        out[rec.id] = rec.with_changes(expires_at=last)
        if rec.revoked_at is not None and rec.revoked_at <= last:
            continue
        if why is None:
            said = "no expires_at, so" if rec.expires_at is None else f"expires_at {iso(rec.expires_at)} is beyond"
            why = (
                f"{where}: {said} keys.max_lifetime ({cap} from created_at {iso(rec.created_at)}) applies: "
                f"the key expires at {iso(last)}"
            )
        notes.append(why)
    return out, notes


def keys_file_warnings(config: Config, now: float | None = None) -> list[str]:
    """For ``sidecar config check``: the YAML entries ``keys.max_lifetime`` shortens or refuses.

    A keys file that is missing or does not parse is not this check's business (the store says
    so when it opens), so it gives no warning here.
    """
    if config.store.kind != "yaml" or config.keys.max_lifetime is None:
        return []
    from .base import StoreError
    from .yamlfile import parse_keys_file

    path = config.store.path
    try:
        records = parse_keys_file(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError, StoreError):
        return []
    return cap_lifetimes(records, config.keys.max_lifetime, time.time() if now is None else now, str(path))[1]
