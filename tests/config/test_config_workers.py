"""``workers: N | auto`` (issue 19): what ``auto`` counts, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import ConfigError, parse_config
from sidecar.config import workers as w

BASE = {"upstreams": [{"id": "p", "kind": "plex", "url": "http://plex:32400", "token_env": "T"}]}


def test_default_number_and_auto() -> None:
    assert parse_config(BASE, env={"T": "x"}).workers == 1
    assert parse_config({**BASE, "workers": 3}, env={"T": "x"}).workers == 3
    assert parse_config({**BASE, "workers": "auto"}, env={"T": "x"}).workers == w.available_cpus()


@pytest.mark.parametrize("value", [0, -1, 257, "2", "many", True, 1.5])
def test_refused(value: object) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({**BASE, "workers": value}, env={"T": "x"})
    assert e.value.problems == [f"workers: expected a whole number from 1 to 256, or auto; got {value!r}"]


def test_auto_follows_a_container_cpu_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A container limited to 1.5 CPUs on a bigger host gets 2 workers, not one per host CPU."""
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(w, "CGROUP2_CPU_MAX", str(cpu_max))
    monkeypatch.setattr(w, "CGROUP1_QUOTA", str(tmp_path / "absent"))
    monkeypatch.setattr(w.os, "sched_getaffinity", lambda pid: set(range(64)))
    cpu_max.write_text("150000 100000\n")
    assert w.resolve_workers("auto") == 2
    cpu_max.write_text("max 100000\n")
    assert w.resolve_workers("auto") == 64
