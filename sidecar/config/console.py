"""``admin.console``: the web console on the admin listener (sidecar/console/, docs/console.md).

A pydantic section (``config.models.Section``) kept here, a leaf of ``config``, so the
config package never imports the console it configures.
"""

from __future__ import annotations

from pydantic import Field

from .models import PositiveDuration, Section

__all__ = ["DEFAULT_SESSION_IDLE", "DEFAULT_SESSION_LIFETIME", "ConsoleConfig"]

DEFAULT_SESSION_IDLE = 30 * 60.0  # a signed-in browser left alone this long signs in again
DEFAULT_SESSION_LIFETIME = 12 * 3600.0  # and however busy, a session ends this long after sign-in


class ConsoleConfig(Section):
    """The console's options; every one has a default, so ``admin.console`` may be left out."""

    # Serve the console at / of the admin listener (the admin API, /metrics and health stay either way).
    enabled: bool = True
    # Inactivity after which a session ends (the seeds' "sessions expire after periods of inactivity").
    session_idle: PositiveDuration = DEFAULT_SESSION_IDLE
    # The longest a session lives, active or not.
    session_lifetime: PositiveDuration = DEFAULT_SESSION_LIFETIME
    # Signed-in sessions held at once; past it the least recently used one ends.
    max_sessions: int = Field(default=1000, ge=1, le=100_000)
