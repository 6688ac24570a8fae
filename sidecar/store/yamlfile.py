"""YAML store: keys live in a file under version control (GitOps), state in SQLite.

The file holds argon2id hashes, never keys (``sidecar keys create`` prints the entry
to paste). It is re-read when its mtime/size/inode change (polled) and on SIGHUP; a broken
edit keeps the last good set and logs why, so a typo never locks everyone out.

Faults (docs/reliability.md): invalid YAML, a bad entry, a file that is not UTF-8 or was
removed are rejected — the last good key set stays in force, the error is logged once
(position and problem only, never the offending text: it may hold a hash) and counted in
``reload_errors`` (``sidecar_store_reload_errors_total{store="yaml"}``). A file still being
written (its stamp changed while it was read) is read again at the next poll; one that
does not end with a newline — most likely cut short mid-write — is taken only once it has
stayed the same for a poll (or on SIGHUP). Editors' and GitOps tools' atomic renames
change the inode and are picked up at the next poll.
Writes through the API are refused (``ReadOnlyStore``): the file is the source of truth.
Last used, usage, quotas and the audit trail go to a SQLite state file beside it.
``keys.max_lifetime`` is applied to every entry each time the file is read (``sidecar.store.lifetime``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

try:  # libyaml's parser is ~10x faster on a big keys file
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

from ..auth.models import KeyRecord
from .base import AuditEvent, KeyChanges, ReadOnlyStore, Store, StoreError, UsageRow
from .lifetime import cap_lifetimes
from .sqlite import SqliteStore

__all__ = ["YamlStore", "parse_keys_file"]

log = logging.getLogger("sidecar.store")

# What ``sidecar keys create`` writes: $argon2id$v=19$m=…,t=…,p=…$<salt>$<hash>, base64 without padding.
_PHC_ARGON2ID = re.compile(r"\$argon2id\$v=\d+\$m=(\d+),t=(\d+),p=(\d+)\$[A-Za-z0-9+/]{8,}\$[A-Za-z0-9+/]{6,}\Z")
# Key ids are public, so anyone can make us verify a guess against any entry's hash: its cost must
# stay near what we write (m=64 MiB, t=3, p=4). At most 4x that work, 256 MiB and 16 lanes.
MAX_ARGON2_M, MAX_ARGON2_MT, MAX_ARGON2_P = 262_144, 4 * 65_536 * 3, 16


def parse_keys_file(text: str, source: str = "keys file") -> dict[str, KeyRecord]:
    """Parse and validate a whole keys file; StoreError names the entry and field."""
    try:
        data = yaml.load(text, Loader=_Loader)  # CSafeLoader/SafeLoader: safe
    except yaml.YAMLError as e:
        raise StoreError(f"{source}: not valid YAML: {_yaml_problem(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or set(data) - {"keys"}:
        raise StoreError(f"{source}: expected a mapping with a single 'keys:' list")
    entries = data.get("keys") or []
    if not isinstance(entries, list):
        raise StoreError(f"{source}: keys: expected a list")
    out: dict[str, KeyRecord] = {}
    hashes: dict[str, int] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise StoreError(f"{source}: keys[{i}]: expected a mapping")
        try:
            rec = KeyRecord.from_dict(entry)
        except ValueError as e:
            raise StoreError(f"{source}: keys[{i}].{e}") from None
        phc = _PHC_ARGON2ID.match(rec.hash)
        if not phc:  # e.g. a file cut short inside a hash
            raise StoreError(f"{source}: keys[{i}].hash: not a complete argon2id hash")
        m, t, par = (int(x) for x in phc.groups())
        if m > MAX_ARGON2_M or m * t > MAX_ARGON2_MT or par > MAX_ARGON2_P:
            raise StoreError(
                f"{source}: keys[{i}].hash: argon2id parameters too costly to verify (m={m}, t={t}, p={par}; "
                f"at most m={MAX_ARGON2_M}, m*t={MAX_ARGON2_MT}, p={MAX_ARGON2_P}); make it with `sidecar keys create`"
            )
        if rec.id in out:
            raise StoreError(f"{source}: keys[{i}].id: duplicate id {rec.id!r}")
        if rec.hash in hashes:  # one secret under two ids: its holder could present it as either key
            raise StoreError(
                f"{source}: keys[{i}].hash: the same hash as keys[{hashes[rec.hash]}] (each key needs its own)"
            )
        hashes[rec.hash] = i
        out[rec.id] = rec
    return out


def _yaml_problem(e: yaml.YAMLError) -> str:
    """What went wrong and where, without the snippet of the file PyYAML quotes (it may hold a hash)."""
    if isinstance(e, yaml.MarkedYAMLError):
        what = " ".join(x for x in (e.problem, e.context) if x) or type(e).__name__
        mark = e.problem_mark or e.context_mark
        if mark is not None:
            return f"{what} (line {mark.line + 1}, column {mark.column + 1})"
        return what
    return type(e).__name__


def entry_yaml(record: KeyRecord) -> str:
    """The text ``sidecar keys create`` prints for a YAML store: one list item."""
    return yaml.safe_dump([record.to_dict()], sort_keys=False, allow_unicode=True)


class YamlStore(Store):
    writable = False

    def __init__(
        self,
        path: Path,
        state: SqliteStore,
        *,
        max_lifetime: float | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.path = Path(path)
        self.state = state
        self.max_lifetime = max_lifetime  # keys.max_lifetime: applied at every read (sidecar.store.lifetime)
        self.clock = clock or time.time  # the sidecar's wall clock: judges a created_at in the future
        self._capped: set[str] = set()  # the lifetime warnings of the set in force, each logged once
        self._stamp: tuple[int, int, int] | None = None
        self._records: dict[str, KeyRecord] = {}
        self.last_error: str | None = None
        self.reload_errors = 0  # rejected versions of the file (sidecar_store_reload_errors_total)
        self._unsettled: tuple[int, int, int] | None = None  # a version without a final newline, seen once

    def _file_stamp(self) -> tuple[int, int, int] | None:
        # The inode catches atomic replaces (editors, Kubernetes ConfigMap symlink swaps)
        # that keep size and mtime; os.stat follows the symlink.
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read_text(self) -> str:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"keys file {self.path} does not exist") from None
        except OSError as e:
            raise StoreError(f"keys file {self.path}: {e.strerror}") from None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:  # e.g. cut short inside a multi-byte character
            raise StoreError(f"keys file {self.path}: not UTF-8 text (at byte {e.start})") from None

    def _parse(self, text: str) -> tuple[dict[str, KeyRecord], list[str]]:
        """The file's keys with ``keys.max_lifetime`` applied, and what the cap changed."""
        return cap_lifetimes(parse_keys_file(text, str(self.path)), self.max_lifetime, self.clock(), str(self.path))

    def _read(self) -> tuple[dict[str, KeyRecord], list[str]]:
        return self._parse(self._read_text())

    def _warn_capped(self, notes: list[str]) -> None:
        """Log each lifetime warning once while it holds (a reload that keeps it says nothing again)."""
        for note in notes:
            if note not in self._capped:
                log.warning("%s", note)
        self._capped = set(notes)

    def _read_settled(
        self, stamp: tuple[int, int, int] | None, force: bool
    ) -> tuple[dict[str, KeyRecord], list[str]] | None:
        """The file's keys, or None while it looks mid-write (read again at the next poll)."""
        text = self._read_text()
        if self._file_stamp() != stamp:
            return None  # changed while we read it: a writer is at work
        if text and not text.endswith("\n") and not force and stamp != self._unsettled:
            self._unsettled = stamp  # maybe cut short mid-write: take it if it is still so next poll
            return None
        return self._parse(text)

    async def open(self) -> None:
        await self.state.open()
        self._stamp = self._file_stamp()
        self._records, notes = await asyncio.to_thread(self._read)
        self._warn_capped(notes)

    async def close(self) -> None:
        await self.state.close()

    async def reload(self, force: bool = False) -> KeyChanges | None:
        stamp = self._file_stamp()
        if not force and stamp == self._stamp:
            return None
        try:
            # A big file must not stall the loop; so both the read and the parse run in a thread.
            read = await asyncio.to_thread(self._read_settled, stamp, force)
        except StoreError as e:
            self._stamp = stamp  # this version is judged: not read again until it changes
            self.reload_errors += 1
            if self.last_error != str(e):
                log.error("keys file rejected, keeping the last good set of %d keys: %s", len(self._records), e)
            self.last_error = str(e)
            return None
        if read is None:
            return None  # self._stamp unchanged: the next poll looks again
        records, notes = read
        self._warn_capped(notes)
        self._stamp = stamp
        self._unsettled = None
        self.last_error = None
        self._records = records
        log.info("keys file reloaded: %d keys", len(records))
        return KeyChanges(records=list(records.values()), full=True)

    async def load_all(self) -> dict[str, KeyRecord]:
        return dict(self._records)

    async def poll(self, force: bool = False) -> KeyChanges | None:
        return await self.reload(force)

    async def get(self, key_id: str) -> KeyRecord | None:
        return self._records.get(key_id)

    async def list_keys(self) -> list[KeyRecord]:
        return list(self._records.values())

    async def insert(self, records: list[KeyRecord]) -> None:
        raise ReadOnlyStore(f"keys are managed in {self.path.name}: add the entry to the file instead")

    async def update(self, record: KeyRecord) -> None:
        raise ReadOnlyStore(f"keys are managed in {self.path.name}: edit the file instead")

    async def create_key(
        self, record: KeyRecord, *, max_per_owner: int | None, now: float, max_grants: int | None = None
    ) -> None:
        await self.insert([record])

    async def update_key(
        self,
        key_id: str,
        change: Callable[[KeyRecord], KeyRecord],
        *,
        max_per_owner: int | None,
        now: float,
        insert: KeyRecord | None = None,
    ) -> tuple[KeyRecord, KeyRecord]:
        raise ReadOnlyStore(f"keys are managed in {self.path.name}: edit the file instead")

    # State is delegated to the SQLite state database.
    @property
    def write_failures(self) -> dict[tuple[str, str], int]:
        return self.state.write_failures

    async def flush_pending(self) -> None:
        await self.state.flush_pending()

    async def record_last_used(self, batch: dict[str, tuple[float, str]]) -> None:
        await self.state.record_last_used(batch)

    async def add_usage(self, batch: dict[tuple[str, str], UsageRow]) -> None:
        await self.state.add_usage(batch)

    async def usage(self, key_id: str, days: int = 30) -> list[dict[str, Any]]:
        return await self.state.usage(key_id, days)

    async def quota_used(self, key_id: str, scope: str, window: str) -> int:
        return await self.state.quota_used(key_id, scope, window)

    async def add_quota(self, batch: dict[tuple[str, str, str], int]) -> None:
        await self.state.add_quota(batch)

    async def set_quota(self, key_id: str, scope: str, window: str, used: int) -> None:
        await self.state.set_quota(key_id, scope, window, used)

    async def audit(self, event: AuditEvent) -> None:
        await self.state.audit(event)

    async def audit_log(self, key_id: str | None = None, limit: int = 100) -> list[AuditEvent]:
        return await self.state.audit_log(key_id, limit)
