"""The PostgreSQL store's options (``store.kind: postgres``) and the DSN they point at.

The DSN is a secret (it may hold a password): the file names the environment variable
that holds it (``store.dsn_env``), never the DSN itself. ``describe_dsn`` is the only form
of it that reaches a message: host, port and database, no user, no password.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import Field

from .models import PositiveDuration, Section, validate_section

__all__ = ["DEFAULT_DSN_ENV", "PostgresStoreOptions", "describe_dsn", "dsn_secrets", "postgres_options"]

DEFAULT_DSN_ENV = "SIDECAR_DATABASE_URL"
_SCHEMES = ("postgres", "postgresql")


class PostgresStoreOptions(Section):
    """``store.*`` options that only mean something with ``kind: postgres``."""

    # Environment variable holding the DSN, e.g. postgresql://sidecar:pw@db:5432/sidecar.
    dsn_env: str = Field(DEFAULT_DSN_ENV, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # Bring the schema up to date at start (one replica does it, under an advisory lock).
    # false: a sidecar refuses to start on an older schema; run `sidecar store migrate`.
    auto_migrate: bool = True
    # How often every replica compares its whole key table with the database (the safety
    # net behind LISTEN/NOTIFY): a change a lost notification missed is seen within this.
    resync_interval: PositiveDuration = 60.0
    # Connections per process for queries (one more, dedicated, LISTENs).
    pool_size: int = Field(4, ge=1, le=100)
    # How long a connection attempt or a statement may take before it counts as a failure.
    connect_timeout: PositiveDuration = 5.0


def describe_dsn(dsn: str) -> str:
    """``postgres host:port/db``: where the store is, for messages; never a user or password."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "postgres (unparsable DSN)"
    if parts.scheme not in _SCHEMES:  # e.g. a libpq "host=… password=…" string: quoting it would show the password
        return "postgres (unparsable DSN)"
    query = parse_qs(parts.query)
    if not host and query.get("host"):
        host = query["host"][0]  # a unix socket directory
    db = unquote(parts.path.lstrip("/")) or (query.get("dbname") or [""])[0]
    where = host or "localhost"
    if port:
        where += f":{port}"
    return f"postgres {where}/{db}" if db else f"postgres {where}"


def dsn_secrets(dsn: str | None) -> Iterator[str]:
    """The DSN and its password, for the log scrubber (``iter_secrets``)."""
    if not dsn:
        return
    yield dsn
    try:
        parts = urlsplit(dsn)
        password = parts.password
    except ValueError:
        return
    if password:
        yield password
        yield unquote(password)
    yield from parse_qs(parts.query).get("password", [])


def check_dsn(dsn: str) -> str | None:
    """What is wrong with a DSN (without quoting it), or None."""
    try:
        parts = urlsplit(dsn)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        return f"not a valid postgresql:// URL ({e.__class__.__name__})"
    if parts.scheme not in _SCHEMES:
        return "expected a postgresql://user:password@host:port/database URL"
    return None


def postgres_options(
    store: Mapping[str, Any], kind: str, problems: list[str], env: Mapping[str, str]
) -> tuple[PostgresStoreOptions | None, str | None]:
    """The postgres options of the ``store`` section and the DSN they name (None, None for another kind)."""
    given = {k: v for k, v in store.items() if k in PostgresStoreOptions.model_fields}
    if kind != "postgres":
        for k in sorted(given):
            problems.append(f"store.{k}: only used with kind: postgres")
        return None, None
    opts = validate_section(PostgresStoreOptions, given, "store", problems, env)
    if opts is None:
        return None, None
    dsn = env.get(opts.dsn_env) or ""
    if not dsn:
        problems.append(f"store.dsn_env: environment variable {opts.dsn_env} is not set")
        return opts, None
    bad = check_dsn(dsn)
    if bad:
        problems.append(f"store.dsn_env: {opts.dsn_env}: {bad}")
        return opts, None
    return opts, dsn
