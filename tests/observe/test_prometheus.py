"""A real Prometheus scrapes a running sidecar's admin listener and answers queries about it.

This is the end of the metrics contract: the exposition is accepted by Prometheus
itself (content type, format, names), the target is up, and a query through its HTTP
API returns the per-key series with the values the traffic produced. Debian's
``prometheus`` binary; under CI=true a missing one fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import Running, require_binary

DEADLINE = 30.0  # Prometheus start-up plus a few 1 s scrapes, on a busy machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def prometheus(tmp_path: Path, target: str) -> AsyncIterator[str]:
    """Run Prometheus scraping ``target`` every second; yield its base URL; always stop it."""
    binary = require_binary("prometheus")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "sidecar", "metrics_path": "/metrics", "static_configs": [{"targets": [target]}]}
                ],
            }
        )
    )
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
        stdout=log,
        stderr=log,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


async def query(http: aiohttp.ClientSession, base: str, promql: str) -> list[dict[str, Any]]:
    """The instant-query result, or [] while Prometheus is still starting."""
    try:
        async with http.get(f"{base}/api/v1/query", params={"query": promql}) as resp:
            if resp.status != 200:
                return []
            body = await resp.json()
    except aiohttp.ClientError:
        return []
    return list(body["data"]["result"]) if body.get("status") == "success" else []


async def poll(http: aiohttp.ClientSession, base: str, promql: str, ok: Any, log: Path) -> list[dict[str, Any]]:
    deadline = time.monotonic() + DEADLINE
    result: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        result = await query(http, base, promql)
        if ok(result):
            return result
        await asyncio.sleep(0.25)
    pytest.fail(f"{promql}: no satisfying answer in {DEADLINE:g}s; last {result}; log: {log.read_text()[-2000:]}")


def values(result: list[dict[str, Any]], label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in result}


async def test_real_prometheus_scrapes_per_key_series(plex_sidecar: Running, tmp_path: Path) -> None:
    require_binary("prometheus")
    r = plex_sidecar
    alice, key_a = await r.create_key(name="alice", owner="team-a")
    bob, key_b = await r.create_key(name="bob")
    for _ in range(3):
        assert (await r.proxy.get("/library/sections", headers={"X-Plex-Token": key_a})).status == 200
    assert (await r.proxy.get("/identity", headers={"Authorization": f"Bearer {key_b}"})).status == 200
    assert (await r.proxy.get("/identity")).status == 401

    url = r.admin.make_url("/metrics")
    target = f"{url.host}:{url.port}"
    log = tmp_path / "prometheus.log"
    async with prometheus(tmp_path, target) as base, aiohttp.ClientSession() as http:
        up = await poll(http, base, 'up{job="sidecar"}', lambda res: res and res[0]["value"][1] == "1", log)
        assert up[0]["metric"]["instance"] == target

        result = await poll(
            http, base, 'sidecar_requests_total{code="200"}', lambda res: len(values(res, "key")) == 2, log
        )
        assert values(result, "key") == {alice.id: 3.0, bob.id: 1.0}
        assert {x["metric"]["upstream"] for x in result} == {"plex"}

        # The whole series family, as the issue asks: the unauthenticated request is key="".
        everything = await query(http, base, "sidecar_requests_total")
        assert sum(float(x["value"][1]) for x in everything) == 5
        assert values([x for x in everything if x["metric"]["code"] == "401"], "key") == {"": 1.0}

        info = await query(http, base, "sidecar_key_info")
        assert {(x["metric"]["key"], x["metric"]["name"], x["metric"].get("owner", "")) for x in info} == {
            (alice.id, "alice", "team-a"),
            (bob.id, "bob", ""),
        }
        assert values(await query(http, base, "sidecar_keys"), "state") == {"active": 2, "expired": 0, "revoked": 0}
        # Histograms arrive whole: a quantile over them evaluates.
        q = await query(http, base, "histogram_quantile(0.5, sum by (le) (sidecar_request_duration_seconds_bucket))")
        assert len(q) == 1 and 0 < float(q[0]["value"][1]) < 10
        # A join of traffic with key names, as a dashboard would do it.
        joined = await query(
            http,
            base,
            'sum by (name) (sidecar_requests_total{code="200"} * on (key) group_left (name) sidecar_key_info)',
        )
        assert values(joined, "name") == {"alice": 3.0, "bob": 1.0}

        # New traffic shows up at the next scrape.
        assert (await r.proxy.get("/identity", headers={"X-Plex-Token": key_b})).status == 200
        result = await poll(
            http,
            base,
            f'sidecar_requests_total{{key="{bob.id}",code="200"}}',
            lambda res: res and res[0]["value"][1] == "2",
            log,
        )
