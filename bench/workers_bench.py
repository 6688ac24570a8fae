"""Workers (issue 19): Sidecar at 1, 2 and ``auto`` workers next to nginx at the same worker count.

    bench/run workers [--duration 3] [--rounds 2] [--connections 32] [--limiter-only] [--baseline CHECKOUT]

**Serving rows.** An nginx upstream (static 1 KiB file), then for each worker count W in
{1, 2, cores}: nginx ``proxy_pass`` with ``worker_processes W`` and ``sidecar serve`` with
``workers: W`` (full pipeline: key auth, a memory rate limit too high to trigger — so
with W > 1 every request asks the supervisor's limiter —, metrics, access log to a file),
plus Sidecar at the top worker count without rate limits (what the shared limiter
costs). wrk runs the targets in interleaved rounds. CPU seconds are read from
``/proc/PID/stat`` (utime + stime) of every process of the target's process group
(supervisor and workers; nginx master and workers) before and after each round: wrk and
the upstream share the same cores, so raw req/s cannot double on 2 cores, while requests
per CPU-second shows whether the scaling is eaten by coordination.

**Limiter rows.** The cost of one rate-limit check (one limit, allowed) as a worker pays
it: in process (workers: 1), through the supervisor's owner backend (a separate
process, over its unix socket), and through Redis (a ``redis-server`` started on a free
port when installed) — sequential (latency) and 64 at a time (pipelined throughput),
with the CPU each side spent per check.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .harness import make_docroot
from .procs import Proc, free_ports, nginx_proxy_conf, nginx_upstream_conf, wait_http
from .wrk import run_wrk, write_script

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "results" / "workers.md"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of the line)
    return total / TICK


# ------------------------------------------------------------------------------ serving


def sidecar_config(workdir: Path, port: int, admin: int, up: int, workers: int | None, limits: bool) -> Path:
    import yaml

    cfg = {
        "listen": f"127.0.0.1:{port}",
        "admin": {"listen": f"127.0.0.1:{admin}", "token_env": "SIDECAR_ADMIN_TOKEN"},
        "store": {"kind": "sqlite", "path": str(workdir.parent / "sidecar.db")},
        "keys": {"argon2": "cheapest"},
        "upstreams": [{"id": "plex", "kind": "plex", "url": f"http://127.0.0.1:{up}", "token_env": "PLEX_TOKEN"}],
        "rate_limits": {"backend": "memory", "default": ["1000000/second"] if limits else []},
        "log": {"access": str(workdir / "access.log"), "level": "warning"},
        "server": {"shutdown_grace": "1s"},
    }
    if workers is not None:  # None: a checkout from before workers (the --baseline row)
        cfg["workers"] = workers
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "sidecar.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def serving(args: argparse.Namespace, tmp: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    from sidecar.config.workers import available_cpus

    counts = sorted({1, 2, available_cpus()})
    procs: list[Proc] = []
    try:
        docroot = tmp / "www"
        make_docroot(docroot, 1024)
        (up,) = free_ports(1)
        conf = tmp / "upstream.conf"
        conf.write_text(nginx_upstream_conf(tmp, docroot, up))
        p = Proc("upstream", ["nginx", "-p", str(tmp), "-c", str(conf), "-g", "daemon off;"], tmp / "up.log")
        procs.append(p)
        wait_http(p, f"http://127.0.0.1:{up}/small.bin")
        targets: list[tuple[str, int, str, Proc]] = []
        ready: list[tuple[Proc, str]] = []  # every server starts at once; each is waited for below
        key = ""
        for w in counts:
            port, sport, sadmin = free_ports(3)
            nd = tmp / f"nginx{w}"
            nd.mkdir()
            conf = nd / "proxy.conf"
            conf.write_text(nginx_proxy_conf(nd, port, up, w))
            p = Proc(f"nginx{w}", ["nginx", "-p", str(nd), "-c", str(conf), "-g", "daemon off;"], nd / "log")
            procs.append(p)
            ready.append((p, f"http://127.0.0.1:{port}/small.bin"))
            auto = " (auto)" if w == available_cpus() else ""
            targets.append((f"nginx proxy_pass, {w} worker{'s' * (w > 1)}{auto}", w, f"http://127.0.0.1:{port}", p))
            variants = [True] + ([False] if w == counts[-1] and w > 1 else [])
            for limits in variants:
                if not limits:
                    sport, sadmin = free_ports(2)
                name = f"sidecar{w}{'' if limits else '-nolim'}"
                path = sidecar_config(tmp / name, sport, sadmin, up, w, limits)
                if not key:
                    out = subprocess.run(
                        [sys.executable, "-m", "sidecar", "keys", "create", "--name", "b", "--json", "-c", str(path)],
                        capture_output=True, text=True, env=env, check=True,
                    )  # fmt: skip
                    key = json.loads(out.stdout)["key"]
                argv = [sys.executable, "-m", "sidecar", "serve", "-c", str(path)]
                p = Proc(name, argv, tmp / f"{name}.log", env=env)
                procs.append(p)
                ready.append((p, f"http://127.0.0.1:{sadmin}/healthz"))
                label = f"Sidecar, {w} worker{'s' * (w > 1)}{auto}{'' if limits else ', no rate limits'}"
                targets.append((label, w, f"http://127.0.0.1:{sport}", p))
        if args.baseline:  # the same Sidecar from another checkout: does workers: 1 cost the hot path anything?
            sport, sadmin = free_ports(2)
            path = sidecar_config(tmp / "baseline", sport, sadmin, up, None, True)
            benv = {**env, "PYTHONPATH": str(Path(args.baseline).resolve())}
            p = Proc("baseline", [sys.executable, "-m", "sidecar", "serve", "-c", str(path)], tmp / "b.log", env=benv)
            procs.append(p)
            ready.append((p, f"http://127.0.0.1:{sadmin}/healthz"))
            targets.insert(1, (f"Sidecar, 1 process, {args.baseline} (baseline)", 1, f"http://127.0.0.1:{sport}", p))
        for p, url in ready:
            wait_http(p, url, timeout=120)
        script = write_script(tmp / "plain.lua")
        headers = {"x-api-key": key}
        warm = min(1.0, args.duration)  # a tiny run gets a tiny warm-up
        for _, _, url, _ in targets:  # warm-up: connections, key verification, plans
            run_wrk(url + "/small.bin", script, connections=args.connections, threads=1, duration=warm, headers=headers)
        rows = {label: {"target": label, "workers": w, "requests": 0, "seconds": 0.0, "cpu": 0.0, "errors": 0}
                for label, w, _, _ in targets}  # fmt: skip
        for r in range(args.rounds):
            order = targets if r % 2 == 0 else list(reversed(targets))
            for label, _, url, p in order:
                pids = p.group_pids()
                c0 = cpu_seconds(pids)
                res = run_wrk(
                    url + "/small.bin", script, connections=args.connections, threads=1, duration=args.duration,
                    headers=headers,
                )  # fmt: skip
                row = rows[label]
                row["cpu"] += cpu_seconds(pids) - c0
                row["requests"] += res.requests
                row["seconds"] += res.duration_s
                row["errors"] += res.error_count
        return list(rows.values())
    finally:
        for p in reversed(procs):
            p.stop()


# ------------------------------------------------------------------------------ limiter


OWNER_SCRIPT = """
import asyncio, sys
from sidecar.config import parse_config
from sidecar.limits.ratelimit import RateLimiter
from sidecar.store import open_store
from sidecar.workers.limits import LimitsOwner
from sidecar.workers.shm import ShmBuckets

async def main():
    cfg = parse_config({"upstreams": [{"id": "api", "kind": "mcp", "url": "http://127.0.0.1:9"}],
                        "store": {"path": sys.argv[2]}}, env={})
    store = await open_store(cfg.store)
    lim = RateLimiter(cfg, store)
    owner = LimitsOwner(ShmBuckets(sys.argv[3], create=True), lim.book, lim.quota_levels)
    await owner.start(sys.argv[1])
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def _checks(limiter: Any, n: int, parallel: int) -> float:
    from sidecar.auth.models import KeyRecord

    keys = [KeyRecord(id=f"k{i:04d}", name="b", hash="$argon2id$unused") for i in range(1000)]
    up = limiter.config.upstreams[0]
    for k in keys:
        await limiter.check(k, up)
    t0 = time.perf_counter()
    if parallel == 1:
        for i in range(n):
            assert (await limiter.check(keys[i % 1000], up)).allowed
    else:
        for i in range(0, n, parallel):
            await asyncio.gather(*(limiter.check(keys[(i + j) % 1000], up) for j in range(parallel)))
    return time.perf_counter() - t0


async def limiter_rows(tmp: Path, n: int) -> list[dict[str, Any]]:
    from sidecar.config import parse_config
    from sidecar.limits.ratelimit import RateLimiter
    from sidecar.store import open_store
    from sidecar.workers.limits import SharedLimits
    from sidecar.workers.shm import ShmBuckets

    rows: list[dict[str, Any]] = []
    base = {
        "upstreams": [{"id": "api", "kind": "mcp", "url": "http://127.0.0.1:9"}],
        "store": {"path": str(tmp / "l.db")},
    }

    async def measure(label: str, rl: dict[str, Any], other: int | None, shared: Any = None) -> None:
        cfg = parse_config({**base, "rate_limits": {"default": ["600/minute"], **rl}}, env={})
        store = await open_store(cfg.store)
        limiter = RateLimiter(cfg, store, shared=shared)
        await limiter.start()
        try:
            for parallel in (1, 64):
                c0, o0 = time.process_time(), cpu_seconds([other]) if other else 0.0
                wall = await _checks(limiter, n, parallel)
                c1, o1 = time.process_time(), cpu_seconds([other]) if other else 0.0
                rows.append({
                    "limiter": label, "parallel": parallel, "us_per_check": wall / n * 1e6,
                    "worker_cpu_us": (c1 - c0) / n * 1e6, "other_cpu_us": (o1 - o0) / n * 1e6 if other else None,
                })  # fmt: skip
        finally:
            await limiter.close()
            await store.close()

    quota = {"quota": "100000000/day"}
    await measure("in process (workers: 1)", {}, None)
    await measure("in process (workers: 1), + quota", quota, None)
    sock = str(tmp / "owner.sock")
    owner = subprocess.Popen([sys.executable, "-c", OWNER_SCRIPT, sock, str(tmp / "o.db"), str(tmp / "buckets")],
                             stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == b"ready"
        table = ShmBuckets(str(tmp / "buckets"))
        await measure("workers: shared-memory table", {}, owner.pid, SharedLimits(sock, table))
        await measure("workers: + quota (supervisor round trip)", quota, owner.pid, SharedLimits(sock, table))
        await measure("workers: everything via the supervisor", {}, owner.pid, SharedLimits(sock))
    finally:
        owner.kill()
        owner.wait()
    binary = shutil.which("redis-server")
    if binary:
        (port,) = free_ports(1)
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        redis = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        try:
            for _ in range(200):
                try:
                    with socket.create_connection(("127.0.0.1", port), 0.1):
                        break
                except OSError:
                    time.sleep(0.02)
            url = {"backend": "redis", "redis_url": f"redis://127.0.0.1:{port}/0"}
            await measure("redis", url, redis.pid)
            await measure("redis, + quota", {**url, **quota}, redis.pid)
        finally:
            redis.kill()
            redis.wait()
    return rows


# ------------------------------------------------------------------------------ report


def report(serve_rows: list[dict[str, Any]], lim_rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    out = [f"# Workers bench ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})",
           "", f"wrk -t1 -c{args.connections}, {args.rounds} × {args.duration:g}s per target, 1 KiB file; "
           "CPU: utime+stime of the target's processes.", ""]  # fmt: skip
    if serve_rows:
        out += ["| target | req/s | CPU s | req per CPU-s | errors |", "|---|---:|---:|---:|---:|"]
        for r in serve_rows:
            rps = r["requests"] / r["seconds"] if r["seconds"] else 0
            per_cpu = r["requests"] / r["cpu"] if r["cpu"] else 0
            r["rps"], r["per_cpu"] = rps, per_cpu
            out.append(f"| {r['target']} | {rps:,.0f} | {r['cpu']:.1f} | {per_cpu:,.0f} | {r['errors']} |")
        sc = {
            r["workers"]: r
            for r in serve_rows
            if r["target"].startswith("Sidecar") and "no rate" not in r["target"] and "baseline" not in r["target"]
        }
        base = [r for r in serve_rows if "baseline" in r["target"]]
        if base and 1 in sc:
            b = base[0]
            rps, cpu = sc[1]["rps"] / b["rps"], sc[1]["per_cpu"] / b["per_cpu"]
            out += ["", f"- workers: 1 / baseline: req/s {rps:.2f}×, req per CPU-s {cpu:.2f}× (must not be slower)"]
        if 1 in sc and 2 in sc:
            out += ["", f"- Sidecar 2 workers / 1 worker, req/s: **{sc[2]['rps'] / sc[1]['rps']:.2f}×** (goal ≥ 1.4×)",
                    f"- Sidecar 2 workers / 1 worker, req per CPU-s: **{sc[2]['per_cpu'] / sc[1]['per_cpu']:.2f}×** "
                    "(goal ≥ 0.85×)"]  # fmt: skip
    if lim_rows:
        out += ["", "| rate-limit check | in flight | µs per check (wall) | worker CPU µs | other side CPU µs |",
                "|---|---:|---:|---:|---:|"]  # fmt: skip
        for r in lim_rows:
            other = "" if r["other_cpu_us"] is None else f"{r['other_cpu_us']:.1f}"
            out.append(
                f"| {r['limiter']} | {r['parallel']} | {r['us_per_check']:.1f} | {r['worker_cpu_us']:.1f} | {other} |"
            )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=3, help="seconds per wrk round (default 3; 0.3 is a smoke test)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--checks", type=int, default=20000, help="rate-limit checks per limiter row")
    ap.add_argument("--limiter-only", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT, help=f"Markdown copy of the table (default {OUT})")
    ap.add_argument("--baseline", help="a checkout from before workers (e.g. /work/main): its Sidecar as a row too")
    ap.add_argument("--serve-only", action="store_true")
    args = ap.parse_args(argv)
    env = dict(os.environ, SIDECAR_ADMIN_TOKEN=os.urandom(16).hex(), PLEX_TOKEN=os.urandom(10).hex())
    env["PYTHONPATH"] = str(ROOT) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryDirectory(prefix="sidecar-wbench-") as d:
        tmp = Path(d)
        serve_rows = [] if args.limiter_only else serving(args, tmp, env)
        lim_rows = [] if args.serve_only else asyncio.run(limiter_rows(tmp, args.checks))
    text = report(serve_rows, lim_rows, args)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
