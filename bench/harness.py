"""The benchmark run behind ``bench/run``: start everything, drive it with wrk, report.

On loopback, on ports the OS hands out, this starts

- **upstream**: nginx serving static files (1 KiB, a Plex-like JSON, a sparse stream file),
- **nginx**: a second nginx, ``proxy_pass`` to the upstream (stock settings, keep-alive pool),
- **bare**: ``bench/bare_forwarder.py``, a featureless aiohttp forwarder,
- **Sidecar**: ``sidecar serve`` with the full pipeline (key auth, a rate limit too high
  to trigger, metrics, access log to a file, a cache rule on ``/cached/*``),
- **Sidecar N keys**: a second Sidecar whose store holds 100 000 keys,

then runs each scenario's targets in interleaved rounds (A B C, C B A, A B C, …) so
slow drift of the machine cancels out, measures key loading and verification in
process, and prints one table (also written to ``bench/results/latest.md``).
Every process is stopped at the end, on errors and on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import keybench
from .procs import Proc, ProcError, free_ports, nginx_proxy_conf, nginx_upstream_conf, read_status_kib, wait_http
from .report import Budget, Cell, fmt_ms, fmt_us, render
from .wrk import WrkError, run_wrk, write_script

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
DEFAULT_OUT = BENCH_DIR / "results" / "latest.md"
KEY_PREFIX = "pmcp_"
MIB = 1024 * 1024

# Target ids and how the table names them.
DIRECT, NGINX, BARE, SIDECAR, SIDECAR_HIT, SIDECAR_N = "direct", "nginx", "bare", "sidecar", "sidecar-hit", "sidecar-n"
SIDECAR_NOLIM = "sidecar-nolim"  # the same Sidecar without rate limits: the limiter's cost is the difference


@dataclass
class Settings:
    quick: bool
    duration: float
    rounds: int
    threads: int
    connections: int
    stream_mib: int
    keys: int
    hot_keys: int
    verify_keys: int
    warm_calls: int
    load_repeats: int
    nginx_workers: int
    out: Path
    keep: bool


def parse_args(argv: Sequence[str] | None) -> Settings:
    ap = argparse.ArgumentParser(
        prog="bench/run",
        description="Sidecar side by side with nginx and a bare aiohttp forwarder, in one run.",
    )
    ap.add_argument("--quick", action="store_true", help="under a minute: short rounds, 16 MiB stream, 2 000 keys")
    ap.add_argument("--duration", type=float, help="seconds per wrk round (default 5, quick 1; 0.3 is a smoke test)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds per scenario (default 3, quick 2)")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: wrk shares the 2 cores)")
    ap.add_argument("--connections", type=int, default=32, help="connections for the loaded scenarios (default 32)")
    ap.add_argument("--stream-mib", type=int, help="size of the streamed file (default 256, quick 16)")
    ap.add_argument("--keys", type=int, help="keys in the big store (default 100000, quick 2000)")
    ap.add_argument("--hot-keys", type=int, help="keys the requests rotate over (default 1000, quick 500)")
    ap.add_argument(
        "--nginx-workers", type=int, default=1, help="nginx proxy worker processes (default 1, like Sidecar)"
    )
    ap.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"Markdown report (default {DEFAULT_OUT.relative_to(ROOT)})"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    a = ap.parse_args(argv)
    q = a.quick

    def pick(value: int | None, full: int, quick: int, name: str, minimum: int = 1) -> int:
        v = value if value is not None else (quick if q else full)
        if v < minimum:
            ap.error(f"--{name} must be at least {minimum}")
        return v

    keys = pick(a.keys, 100_000, 2_000, "keys")
    duration = a.duration if a.duration is not None else (1.0 if q else 5.0)
    if duration <= 0:
        ap.error("--duration must be positive")
    hot = min(keys, pick(a.hot_keys, 1_000, 500, "hot-keys"))
    return Settings(
        quick=q,
        duration=duration,
        rounds=pick(a.rounds, 3, 2, "rounds"),
        threads=pick(a.threads, 1, 1, "threads"),
        connections=pick(a.connections, 32, 32, "connections"),
        stream_mib=pick(a.stream_mib, 256, 16, "stream-mib"),
        keys=keys,
        hot_keys=hot,
        verify_keys=3 if q else 5,
        warm_calls=5_000 if q else 20_000,
        load_repeats=1 if q else 3,
        nginx_workers=pick(a.nginx_workers, 1, 1, "nginx-workers"),
        out=a.out,
        keep=a.keep,
    )


# --------------------------------------------------------------------------- upstream content


def plex_like_json(items: int = 24) -> str:
    """About 8 KiB shaped like a Plex library listing (what a cache rule would cover)."""
    meta = [
        {
            "ratingKey": str(1000 + i),
            "key": f"/library/metadata/{1000 + i}",
            "guid": f"plex://movie/5d77683{i:05d}",
            "type": "movie",
            "title": f"Benchmark Movie {i}",
            "year": 1990 + i,
            "thumb": f"/library/metadata/{1000 + i}/thumb/1700000000",
            "duration": 5_400_000 + i,
            "addedAt": 1_700_000_000 + i,
        }
        for i in range(items)
    ]
    return json.dumps({"MediaContainer": {"size": items, "librarySectionID": 1, "Metadata": meta}}, indent=1)


def make_docroot(root: Path, stream_bytes: int) -> None:
    (root / "cached").mkdir(parents=True)
    (root / "small.bin").write_bytes(os.urandom(1024))
    data = plex_like_json()
    (root / "data.json").write_text(data)
    (root / "cached" / "data.json").write_text(data)
    with open(root / "big.bin", "wb") as f:
        f.truncate(stream_bytes)  # sparse: instant, and served from the page cache
    root.chmod(0o755)


# --------------------------------------------------------------------------- processes


class Unavailable(Exception):
    """A target cannot run in this checkout; the message says why (shown as n/a)."""


def sidecar_argv() -> list[str]:
    if importlib.util.find_spec("sidecar") is None:
        raise Unavailable("sidecar is not importable from this Python")
    if importlib.util.find_spec("sidecar.__main__") is not None:
        return [sys.executable, "-m", "sidecar"]
    script = Path(sys.executable).parent / "sidecar"
    if script.exists():
        return [str(script)]
    raise Unavailable("no sidecar command line yet (no sidecar/__main__.py and no sidecar script)")


@dataclass
class Target:
    id: str
    label: str
    base_url: str
    proc: Proc | None = None
    na: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Leg:
    """One target's part in a scenario: what to request, with which wrk script, how to warm it."""

    target: str
    path: str
    label: str = ""  # table label; the target's own by default
    script: Path | None = None  # wrk Lua script; None = plain run with the target's headers
    warm_keys: Sequence[str] = ()  # warm up with each of these keys once (first use = argon2)
    expect_hit: bool = False  # check X-Cache-Status: HIT after warm-up


def num(n: int) -> str:
    """100 000, as the issue writes key counts."""
    return f"{n:,}".replace(",", " ")


class Bench:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.procs: list[Proc] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
        self.targets: dict[str, Target] = {}
        self.cells: list[Cell] = []
        self.notes: list[str] = []
        self.key = ""
        self.hot_keys_file = self.tmp / "hot-keys.txt"
        self.one_key_file = self.tmp / "one-key.txt"
        self.plain_lua = write_script(self.tmp / "plain.lua")
        self.store_info: keybench.KeyStoreInfo | None = None
        self.sidecar_n_ready_s: float | None = None
        self.admin_urls: dict[str, str] = {}  # sidecar name -> admin base URL
        self.env = dict(os.environ, SIDECAR_ADMIN_TOKEN=os.urandom(16).hex(), PLEX_TOKEN=os.urandom(10).hex())
        self.stream_bytes = self.s.stream_mib * MIB
        self.load_before = _loadavg()

    # ----------------------------------------------------------------- lifecycle

    def log(self, msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        p = Proc(name, argv, self.tmp / f"{name}.log", env=env)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        if self.s.keep:
            self.log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def start_all(self) -> None:
        (up, ngx, bare, sc, sc_admin, scn, scn_admin, snl, snl_admin) = free_ports(9)
        docroot = self.tmp / "www"
        make_docroot(docroot, self.stream_bytes)

        conf = self.tmp / "upstream.conf"
        conf.write_text(nginx_upstream_conf(self.tmp, docroot, up))
        p = self.start("upstream-nginx", ["nginx", "-p", str(self.tmp), "-c", str(conf), "-g", "daemon off;"])
        wait_http(p, f"http://127.0.0.1:{up}/small.bin")
        self.targets[DIRECT] = Target(DIRECT, "upstream nginx, direct", f"http://127.0.0.1:{up}", p)

        conf = self.tmp / "proxy.conf"
        conf.write_text(nginx_proxy_conf(self.tmp, ngx, up, self.s.nginx_workers))
        p = self.start("proxy-nginx", ["nginx", "-p", str(self.tmp), "-c", str(conf), "-g", "daemon off;"])
        wait_http(p, f"http://127.0.0.1:{ngx}/small.bin")
        self.targets[NGINX] = Target(NGINX, "nginx proxy_pass", f"http://127.0.0.1:{ngx}", p)

        p = self.start(
            "bare-forwarder",
            [
                sys.executable,
                str(BENCH_DIR / "bare_forwarder.py"),
                "--listen",
                f"127.0.0.1:{bare}",
                "--upstream",
                f"http://127.0.0.1:{up}",
            ],
        )
        wait_http(p, f"http://127.0.0.1:{bare}/small.bin")
        self.targets[BARE] = Target(BARE, "bare aiohttp forwarder", f"http://127.0.0.1:{bare}", p)

        sc_t = self.targets[SIDECAR] = Target(SIDECAR, "Sidecar", f"http://127.0.0.1:{sc}")
        hit_t = self.targets[SIDECAR_HIT] = Target(SIDECAR_HIT, "Sidecar, cache hit", f"http://127.0.0.1:{sc}")
        nolim_t = self.targets[SIDECAR_NOLIM] = Target(
            SIDECAR_NOLIM, "Sidecar, no rate limits", f"http://127.0.0.1:{snl}"
        )
        n_t = self.targets[SIDECAR_N] = Target(
            SIDECAR_N, f"Sidecar, {num(self.s.keys)} keys", f"http://127.0.0.1:{scn}"
        )
        nolim_p: Proc | None = None
        try:
            argv = sidecar_argv()
            p = self.start_sidecar("sidecar", argv, sc, sc_admin, up, cache=True, wait=False)
            self.one_key_file.write_text(self.key + "\n")
            # Starts beside the first (the key is in the database by then): it shares the first
            # Sidecar's key database (SQLite is safe across processes), so the key works.
            nolim_p = self.start_sidecar(
                "sidecar-nolim", argv, snl, snl_admin, up, cache=True, db=self.tmp / "sidecar" / "sidecar.db",
                limits=False, wait=False,
            )  # fmt: skip
            self.ready("sidecar", p)
            sc_t.proc = hit_t.proc = p
        except (Unavailable, ProcError) as e:
            sc_t.na = hit_t.na = str(e).splitlines()[0]
            self.log(f"Sidecar unavailable: {e}")
        if sc_t.na is not None or nolim_p is None:
            nolim_t.na = sc_t.na
        else:
            try:
                self.ready("sidecar-nolim", nolim_p)
                nolim_t.proc = nolim_p
            except ProcError as e:
                nolim_t.na = str(e).splitlines()[0]
        # The big store is built in process either way: load time is measured from it.
        self.log(f"building a store of {self.s.keys:,} keys ({self.s.hot_keys:,} hashed)")
        try:
            self.store_info = keybench.run(
                keybench.build_store(self.tmp / "sidecar-n.db", self.s.keys, self.s.hot_keys, prefix=KEY_PREFIX)
            )
            self.hot_keys_file.write_text("\n".join(self.store_info.hot_keys) + "\n")
        except Exception as e:  # the store API the bench relies on changed: say so in the table
            n_t.na = f"could not build the key store: {type(e).__name__}: {e}".splitlines()[0][:160]
            self.log(n_t.na)
        if sc_t.na is not None:
            n_t.na = n_t.na or sc_t.na
        elif n_t.na is None:
            try:
                p = self.start_sidecar(
                    "sidecar-n", sidecar_argv(), scn, scn_admin, up, cache=False, db=self.tmp / "sidecar-n.db"
                )
                n_t.proc = p
            except (Unavailable, ProcError) as e:
                n_t.na = str(e).splitlines()[0]
                self.log(f"Sidecar with {self.s.keys} keys unavailable: {e}")
        key_headers = {"x-api-key": self.key} if self.key else {}
        for t in (DIRECT, NGINX, BARE, SIDECAR, SIDECAR_HIT, SIDECAR_NOLIM):
            # Identical requests everywhere: the others just pass the header along.
            self.targets[t].headers = dict(key_headers)

    def start_sidecar(
        self,
        name: str,
        argv: list[str],
        port: int,
        admin_port: int,
        up_port: int,
        *,
        cache: bool,
        db: Path | None = None,
        limits: bool = True,
        wait: bool = True,
    ) -> Proc:
        """Configure and start one Sidecar; with ``wait``, return once it is ready (else see ``ready``)."""
        import yaml

        workdir = self.tmp / name
        workdir.mkdir()
        db = db or workdir / "sidecar.db"
        cfg = {
            "listen": f"127.0.0.1:{port}",
            "admin": {"listen": f"127.0.0.1:{admin_port}", "token_env": "SIDECAR_ADMIN_TOKEN"},
            "store": {"kind": "sqlite", "path": str(db)},
            # Served sidecars use the cheapest argon2 profile so first uses in warm-up stay quick;
            # the production profile's cold cost is measured in process (key verify, cold).
            "keys": {"argon2": "cheapest"},
            "upstreams": [
                {
                    "id": "plex",
                    "kind": "plex",
                    "url": f"http://127.0.0.1:{up_port}",
                    "token_env": "PLEX_TOKEN",
                    "path_prefix": "/",
                },
            ],
            "rate_limits": {"backend": "memory", "default": ["1000000/second"] if limits else []},
            "cache": {
                "max_bytes": "64MiB",
                "rules": [{"upstream": "plex", "path": "/cached/*", "ttl": "600s"}] if cache else [],
            },
            "log": {"access": str(workdir / "access.log"), "level": "warning"},
            "server": {"shutdown_grace": "1s"},
        }
        path = workdir / "sidecar.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        if name == "sidecar":
            self.key = self.create_key(argv, path, db)
        p = self.start(name, [*argv, "serve", "-c", str(path)], env=self.env)
        self.admin_urls[name] = f"http://127.0.0.1:{admin_port}"
        if wait:
            self.ready(name, p)
        return p

    def ready(self, name: str, p: Proc) -> None:
        """Wait until the Sidecar ``name`` answers its health check (ProcError if it does not)."""
        ready = wait_http(p, self.admin_urls[name] + "/healthz", timeout=120)
        if name == "sidecar-n":
            self.sidecar_n_ready_s = ready
        self.log(f"{name} ready in {ready:.2f}s")

    def create_key(self, argv: list[str], config: Path, db: Path) -> str:
        """A key through the CLI (the contract); the store API if the CLI cannot yet."""
        cmd = [*argv, "keys", "create", "-c", str(config), "--name", "bench", "--json"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=60)
            if proc.returncode == 0:
                return str(json.loads(proc.stdout)["key"])
            why = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        except (subprocess.TimeoutExpired, ValueError, KeyError) as e:
            why = [str(e)]
        self.notes.append(f"`sidecar keys create` failed ({why[0]}); the bench key was written with the store API.")
        self.log(self.notes[-1])
        info = keybench.run(keybench.build_store(db, 1, 1, prefix=KEY_PREFIX))
        return info.hot_keys[0]

    # ----------------------------------------------------------------- measuring

    def group_rss_mib(self, t: Target, field_name: str = "VmHWM") -> float | None:
        if t.proc is None or not t.proc.alive():
            return None
        kib = [read_status_kib(pid, field_name) for pid in t.proc.group_pids()]
        known = [k for k in kib if k is not None]
        return sum(known) / 1024 if known else None

    def warm(self, t: Target, path: str, *, keys: Sequence[str] = (), n: int = 64) -> str | None:
        """Warm connections and caches; return why the target is unusable, or None."""
        return asyncio.run(_warm(t.base_url + path, t.headers, keys, n))

    def scenario(
        self,
        label: str,
        legs: Sequence[Leg],
        *,
        connections: int,
        timeout_s: int = 10,
        mb_s: bool = False,
    ) -> dict[str, Cell]:
        """Warm every leg, then run them in interleaved rounds (A B C, C B A, …)."""
        self.log(f"scenario: {label}")
        cells: dict[str, Cell] = {}
        live: list[tuple[Leg, Target, Cell]] = []
        for leg in legs:
            t = self.targets[leg.target]
            cell = cells[leg.target] = Cell(label, leg.label or t.label, show_mb_s=mb_s)
            if t.na is not None:
                cell.na = t.na
                continue
            why = self.warm(t, leg.path, keys=leg.warm_keys, n=1 if mb_s else 64)
            if why is not None:
                cell.na = why
                self.log(f"  {cell.target}: {why}")
                continue
            if leg.expect_hit:
                cell.note = self.cache_status(t, leg.path) or ""
            live.append((leg, t, cell))
        for r in range(self.s.rounds):
            for leg, t, cell in live if r % 2 == 0 else reversed(live):
                if cell.na is not None:
                    continue
                try:
                    res = run_wrk(
                        t.base_url + leg.path,
                        leg.script or self.plain_lua,
                        connections=connections,
                        threads=self.s.threads,
                        duration=self.s.duration,
                        headers=None if leg.script else t.headers,
                        timeout_s=timeout_s,
                    )
                except WrkError as e:
                    cell.na = str(e).splitlines()[0]
                    self.log(f"  {cell.target}: {cell.na}")
                    continue
                cell.samples.append(res)
                self.log(
                    f"  round {r + 1} {cell.target}: {res.rps:,.0f} req/s, p50 {fmt_ms(res.p50_ms)}"
                    + (f", {res.mb_s:,.0f} MB/s" if mb_s else "")
                )
        self.cells += cells.values()
        return cells

    def cache_status(self, t: Target, path: str) -> str | None:
        """None when the path is served from Sidecar's cache, else a note saying what came back."""
        got = asyncio.run(_header(t.base_url + path, t.headers, "X-Cache-Status"))
        return None if got == "HIT" else f"X-Cache-Status: {got or 'absent'}, not HIT"

    def run_all(self) -> dict[str, dict[str, Cell]]:
        s = self.s
        c = s.connections
        res: dict[str, dict[str, Cell]] = {}

        small = [Leg(t, "/small.bin") for t in (DIRECT, NGINX, BARE, SIDECAR)]
        res["small1"] = self.scenario("small 1 KiB · 1 conn", small, connections=1)
        res["small32"] = self.scenario(f"small 1 KiB · {c} conn", small, connections=c)

        lim = [Leg(SIDECAR, "/small.bin", "Sidecar, rate limited (memory)"), Leg(SIDECAR_NOLIM, "/small.bin")]
        res["limits"] = self.scenario(f"limiter cost: small 1 KiB · {c} conn", lim, connections=c)

        json_legs = [
            Leg(NGINX, "/data.json"),
            Leg(BARE, "/data.json"),
            Leg(SIDECAR, "/data.json", "Sidecar, uncached"),
            Leg(SIDECAR_HIT, "/cached/data.json", "Sidecar, cache hit", expect_hit=True),
        ]
        res["cache"] = self.scenario(f"cache: JSON 8 KiB · {c} conn", json_legs, connections=c)

        hot = self.store_info.hot_keys if self.store_info else []
        key_legs = [
            Leg(SIDECAR, "/small.bin", "Sidecar, 1 key",
                script=write_script(self.tmp / "one.lua", keys_file=self.one_key_file, url_path="/small.bin"),
                warm_keys=[self.key] if self.key else []),
            Leg(SIDECAR_N, "/small.bin",
                script=write_script(self.tmp / "many.lua", keys_file=self.hot_keys_file, url_path="/small.bin"),
                warm_keys=hot),
        ]  # fmt: skip
        res["keys"] = self.scenario(
            f"{num(s.keys)} keys · {num(s.hot_keys)} in use · {c} conn", key_legs, connections=c
        )
        for tid, cell in res["keys"].items():
            if cell.ok:
                cell.rss_mib = self.group_rss_mib(self.targets[tid])
        many = res["keys"][SIDECAR_N]
        if self.sidecar_n_ready_s is not None and many.ok:
            many.note = f"ready {self.sidecar_n_ready_s:.1f}s after start"

        before = self.group_rss_mib(self.targets[SIDECAR], "VmRSS")
        stream = [Leg(t, "/big.bin") for t in (NGINX, BARE, SIDECAR)]
        res["stream"] = self.scenario(
            f"stream {s.stream_mib} MiB · 1 conn", stream, connections=1, timeout_s=60, mb_s=True
        )
        for tid, cell in res["stream"].items():
            if cell.ok:
                cell.rss_mib = self.group_rss_mib(self.targets[tid])
        sc = res["stream"][SIDECAR]
        if sc.ok and before is not None:
            sc.note = f"RSS {before:.0f} MiB before the stream"
        return res

    def pipeline_check(self) -> None:
        """Evidence the full pipeline ran: access-log lines written, requests counted in /metrics."""
        if "sidecar" not in self.admin_urls:
            return
        log = self.tmp / "sidecar" / "access.log"
        try:
            with open(log, "rb") as f:
                lines = sum(1 for _ in f)
        except OSError:
            lines = 0
        counted = 0.0
        try:
            with urllib.request.urlopen(self.admin_urls["sidecar"] + "/metrics", timeout=5) as resp:
                for line in resp.read().decode().splitlines():
                    if line.startswith("sidecar_requests_total{"):
                        counted += float(line.rsplit(" ", 1)[1])
        except (OSError, ValueError, IndexError) as e:
            self.notes.append(f"Could not read Sidecar's /metrics: {e}")
        self.notes.append(
            f"Pipeline check: Sidecar wrote {num(lines)} access-log lines and counted {num(int(counted))} "
            "requests in sidecar_requests_total."
        )

    def key_rows(self) -> dict[str, float | None]:
        """In-process rows: store load time, cold and warm verification."""
        out: dict[str, float | None] = {"load_s": None, "warm_us": None}
        nk = num(self.s.keys)
        load = Cell(f"key store load ({nk} keys)", "Verifier.load(), SQLite")
        cold = Cell("key verify, cold (first use)", "argon2id, default profile")
        warm = Cell("key verify, warm (cached)", "Verifier.verify, in process")
        try:
            assert self.store_info is not None
            self.log("measuring key store load")
            secs, count = keybench.run(keybench.measure_load(self.store_info.path, self.s.load_repeats))
            load.text_p50 = fmt_ms(secs * 1000)
            load.note = (
                f"{num(count)} keys; store built in {self.store_info.build_s:.1f}s; median of {self.s.load_repeats}"
            )
            out["load_s"] = secs
            self.log("measuring key verification (cold: argon2id, RFC 9106 low-memory profile)")
            v = keybench.run(keybench.measure_verify(self.tmp, keys=self.s.verify_keys, warm_calls=self.s.warm_calls))
            cold.text_p50, cold.text_p99 = fmt_us(v.cold_p50), fmt_us(v.cold_max)
            cold.note = f"{len(v.cold_us)} keys, p99 column = slowest; 64 MiB, t=3, p=4; in a thread"
            warm.text_p50, warm.text_p99 = fmt_us(v.warm_p50), fmt_us(v.warm_p99)
            warm.note = f"{num(len(v.warm_us))} calls"
            if v.argon2_warm is not None:
                cold.note += f"; argon2 ran {v.argon2_cold}×"
                warm.note += f"; argon2 ran {v.argon2_warm}×"
            out["warm_us"] = v.warm_p50
        except Exception as e:  # an API the bench relies on changed: say so in the table
            reason = f"{type(e).__name__}: {e}".splitlines()[0][:160]
            for c in (load, cold, warm):
                if not c.text_p50:
                    c.na = reason
            self.log(f"in-process key measurements failed: {reason}")
        self.cells += [load, cold, warm]
        return out


async def _warm(url: str, headers: dict[str, str], keys: Sequence[str], n: int) -> str | None:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        sem = asyncio.Semaphore(16)

        async def one(h: dict[str, str]) -> str | None:
            async with sem:
                try:
                    async with session.get(url, headers=h) as resp:
                        body = b""
                        async for chunk in resp.content.iter_chunked(1 << 20):
                            if len(body) < 200:
                                body += chunk[:200]
                        if resp.status != 200:
                            return f"HTTP {resp.status} on warm-up: {body[:160].decode(errors='replace')}"
                except (aiohttp.ClientError, TimeoutError) as e:
                    return f"warm-up request failed: {type(e).__name__}: {e}"
            return None

        jobs = [one({**headers, "x-api-key": k}) for k in keys] if keys else [one(headers) for _ in range(n)]
        for problem in await asyncio.gather(*jobs):
            if problem:
                return problem
    return None


async def _header(url: str, headers: dict[str, str], name: str) -> str | None:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        await resp.read()
        return resp.headers.get(name)


# --------------------------------------------------------------------------- report


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _x(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}×"


def build_report(b: Bench, res: dict[str, dict[str, Cell]], keys: dict[str, float | None]) -> str:
    s = b.s
    c = s.connections
    s1, s32, ca, st, ks = res["small1"], res["small32"], res["cache"], res["stream"], res["keys"]

    def added(t: str) -> float | None:
        a, d = s1[t].p50_ms, s1[DIRECT].p50_ms
        return a - d if a is not None and d is not None else None

    def ms(x: float | None) -> str:
        return "n/a" if x is None else f"+{x:.3f} ms"

    ratios: list[tuple[str, str]] = [
        ("small · 1 conn:  Sidecar / nginx req/s", _x(_ratio(s1[SIDECAR].rps, s1[NGINX].rps))),
        ("small · 1 conn:  Sidecar / bare req/s", _x(_ratio(s1[SIDECAR].rps, s1[BARE].rps))),
        (
            "small · 1 conn:  p50 added over direct",
            f"Sidecar {ms(added(SIDECAR))}, nginx {ms(added(NGINX))}, bare {ms(added(BARE))}",
        ),
        (f"small · {c} conn: Sidecar / nginx req/s", _x(_ratio(s32[SIDECAR].rps, s32[NGINX].rps))),
        (f"small · {c} conn: Sidecar / bare req/s", _x(_ratio(s32[SIDECAR].rps, s32[BARE].rps))),
        ("cache: hit / uncached (Sidecar) req/s", _x(_ratio(ca[SIDECAR_HIT].rps, ca[SIDECAR].rps))),
        ("cache: Sidecar uncached / nginx req/s", _x(_ratio(ca[SIDECAR].rps, ca[NGINX].rps))),
        ("cache: Sidecar uncached / bare req/s", _x(_ratio(ca[SIDECAR].rps, ca[BARE].rps))),
        ("cache: Sidecar hit / nginx req/s", _x(_ratio(ca[SIDECAR_HIT].rps, ca[NGINX].rps))),
        ("stream: Sidecar / nginx MB/s", _x(_ratio(st[SIDECAR].mb_s, st[NGINX].mb_s))),
        ("stream: Sidecar / bare MB/s", _x(_ratio(st[SIDECAR].mb_s, st[BARE].mb_s))),
        (
            "limiter: Sidecar with / without rate limits req/s",
            _x(_ratio(res["limits"][SIDECAR].rps, res["limits"][SIDECAR_NOLIM].rps)),
        ),
        (f"keys: {num(s.keys)} keys / 1 key req/s", _x(_ratio(ks[SIDECAR_N].rps, ks[SIDECAR].rps))),
    ]

    def budget(what: str, value: float | None, ok: Callable[[float], bool], fmt: Callable[[float], str]) -> Budget:
        return Budget(what, "n/a" if value is None else fmt(value), None if value is None else ok(value))

    rss = st[SIDECAR].rss_mib if st[SIDECAR].ok else None
    load_note = "" if s.keys >= 100_000 else f" [measured with {num(s.keys)} keys]"
    budgets = [
        budget(
            f"full pipeline ≥ 0.9× bare forwarder req/s (small, {c} conn)",
            _ratio(s32[SIDECAR].rps, s32[BARE].rps),
            lambda r: r >= 0.9,
            lambda r: f"{r:.2f}×",
        ),
        budget(
            f"full pipeline ≥ 0.35× nginx req/s (small, {c} conn)",
            _ratio(s32[SIDECAR].rps, s32[NGINX].rps),
            lambda r: r >= 0.35,
            lambda r: f"{r:.2f}×",
        ),
        budget(
            f"cache hits ≥ 3× uncached Sidecar req/s (JSON, {c} conn)",
            _ratio(ca[SIDECAR_HIT].rps, ca[SIDECAR].rps),
            lambda r: r >= 3,
            lambda r: f"{r:.2f}×",
        ),
        budget(
            f"streaming ≥ 0.9× nginx MB/s ({s.stream_mib} MiB)",
            _ratio(st[SIDECAR].mb_s, st[NGINX].mb_s),
            lambda r: r >= 0.9,
            lambda r: f"{r:.2f}×",
        ),
        budget("Sidecar peak RSS < 100 MiB (VmHWM after streaming)", rss, lambda m: m < 100, lambda m: f"{m:.0f} MiB"),
        budget(
            "added p50 at 1 conn ≤ 0.3 ms over direct", added(SIDECAR), lambda m: m <= 0.3, lambda m: f"+{m:.3f} ms"
        ),
        budget(
            "rate limiter (memory) costs < 5% of req/s",
            _ratio(res["limits"][SIDECAR].rps, res["limits"][SIDECAR_NOLIM].rps),
            lambda r: r > 0.95,
            lambda r: f"{(1 - r) * 100:+.1f}%",
        ),
        budget("warm key check ≤ 20 µs (p50)", keys["warm_us"], lambda u: u <= 20, fmt_us),
        budget("100 000 keys load < 1 s" + load_note, keys["load_s"], lambda x: x < 1, lambda x: fmt_ms(x * 1000)),
    ]

    mode = "quick" if s.quick else "full"
    setup = [
        f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}, {mode} run: {s.rounds} interleaved round(s) "
        f"× {s.duration:g}s per target, wrk -t{s.threads}, stream {s.stream_mib} MiB, {num(s.keys)} keys",
        f"host: {_cpu()}, {os.cpu_count()} CPUs (wrk shares them with every server), Linux {platform.release()}; "
        f"1-min load average {b.load_before} before the run (above 0: other work shared the CPUs)",
        f"{_versions()}",
        f"nginx proxy: {s.nginx_workers} worker, stock proxy settings plus a keep-alive upstream pool; "
        "upstream: nginx, 1 worker, static files, sendfile",
        "Sidecar: full pipeline (key auth via x-api-key, rate limit 1000000/second, metrics, "
        "JSON access log to a file, cache rule on /cached/*), argon2 cheapest for served keys",
    ]
    foot = [
        "req/s, p50, p99 and MB/s are medians over the rounds; ± is half the min–max spread of req/s. "
        "peak RSS is VmHWM summed over the process group. MB/s is 10^6 bytes per second.",
        *b.notes,
    ]
    return render("Sidecar benchmark", setup, b.cells, ratios, budgets, foot)


def _loadavg() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _versions() -> str:
    parts = [f"Python {platform.python_version()}"]
    for mod in ("aiohttp", "uvloop"):
        try:
            from importlib.metadata import version

            parts.append(f"{mod} {version(mod)}")
        except Exception:
            parts.append(f"{mod} absent")
    for cmd in (["nginx", "-v"], ["wrk", "-v"]):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            text = (p.stderr + p.stdout).strip().splitlines()[0]
            parts.append(text.replace("nginx version: ", "").split(" [")[0].split(" Copyright")[0])
        except (OSError, IndexError, subprocess.TimeoutExpired):
            pass
    return ", ".join(parts)


# --------------------------------------------------------------------------- main


@contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_args(argv)
    missing = [t for t in ("nginx", "wrk") if shutil.which(t) is None]
    if missing:
        print(
            f"bench/run: {' and '.join(missing)} not found on PATH; install the Debian packages "
            f"({' '.join('nginx-light' if m == 'nginx' else m for m in missing)}) or run bench/run as root",
            file=sys.stderr,
        )
        return 2
    started = time.monotonic()
    b = Bench(s)
    try:
        with _terminate_on_sigterm():
            try:
                b.start_all()
                res = b.run_all()
                b.pipeline_check()
                keys = b.key_rows()
            finally:
                b.stop_all()
    except KeyboardInterrupt:
        print("bench/run: interrupted; every server was stopped", file=sys.stderr)
        return 130
    except ProcError as e:
        print(f"bench/run: {e}", file=sys.stderr)
        return 1
    text = build_report(b, res, keys)
    text += f"\n_Run took {time.monotonic() - started:.0f}s._\n"
    print(text)
    s.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = s.out.with_name(s.out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(s.out)
    print(f"bench/run: wrote {s.out}", file=sys.stderr)
    problems = [c for c in b.cells if c.na is not None or c.errors]
    if problems:
        print("bench/run: some rows could not be measured cleanly:", file=sys.stderr)
        for c in problems:
            print(f"  {c.scenario} / {c.target}: {c.na or c.errors}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
