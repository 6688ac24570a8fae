"""The ``sidecar`` command: serve, demo, config check, and key management.

``keys`` commands open the store directly (no server needed); a running sidecar
sees their changes within a second through its store poll. Exit codes: 0 done,
1 the operation failed (message on stderr), 2 bad usage or a bad config.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .admin.manage import KeyManager
from .auth.models import KeyRecord, iso
from .config import Config, ConfigError, load_config, parse_duration
from .config.postgres import describe_dsn
from .core.errors import SidecarError
from .core.redaction import url_origin
from .observe import logfilter
from .store import StoreError, open_store
from .store.commands import add_store_commands
from .store.yamlfile import entry_yaml

__all__ = ["main"]

DEFAULT_CONFIG = "sidecar.yaml"


def _run_loop(coro: Awaitable[Any]) -> Any:
    try:
        import uvloop  # speed-up when installed; plain asyncio otherwise

        return uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]


_UNSET_ENV = re.compile(r"^(upstreams\[\d+\]\.token_env): environment variable (\w+) is not set$")


def _load(args: argparse.Namespace) -> Config:
    if args.command not in ("keys", "store"):
        return load_config(args.config)
    # Managing keys needs the store, not the upstreams' secrets: an operator running
    # `sidecar keys list` need not export PLEX_TOKEN. Only those errors are forgiven.
    try:
        return load_config(args.config)
    except ConfigError as e:
        missing = [m.group(2) for m in map(_UNSET_ENV.match, e.problems) if m]
        if len(missing) != len(e.problems):
            raise
        env = {**os.environ, **dict.fromkeys(missing, "unset-in-cli")}
        return load_config(args.config, env=env)


def _print_key(rec: KeyRecord, key: str, as_json: bool, yaml_entry: bool) -> None:
    if as_json:
        data = rec.public_dict()
        data["key"] = key
        if yaml_entry:
            data["entry"] = entry_yaml(rec)
        print(json.dumps(data, indent=2))
        return
    if yaml_entry:
        print("# Add this entry under `keys:` in your keys file (it holds only the hash):")
        print(entry_yaml(rec), end="")
        print()
    print(f"Key {rec.id} ({rec.name}) — shown once, store it now:\n\n  {key}\n")
    if rec.expires_at:
        print(f"Expires: {rec.public_dict()['expires_at']}")


def _show(rec: KeyRecord, as_json: bool, extra: dict[str, Any] | None = None) -> None:
    data = rec.public_dict()
    if extra:
        data.update(extra)
    if as_json:
        print(json.dumps(data, indent=2))
        return
    for k, v in data.items():
        if v not in (None, "", [], {}):
            quoted = isinstance(v, dict | list) or (isinstance(v, str) and not v.isprintable())  # one line each
            print(f"{k:>20}: {json.dumps(v) if quoted else v}")


async def _with_manager(args: argparse.Namespace, fn: Callable[[KeyManager], Awaitable[int]]) -> int:
    config = _load(args)
    store = await open_store(config.store, max_lifetime=config.keys.max_lifetime)
    try:
        return await fn(KeyManager(config, store))
    finally:
        await store.close()


def _fields_from_args(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {"name": args.name}
    perms: dict[str, Any] = {"upstreams": args.upstream or ["*"]}
    if args.method:
        perms["methods"] = args.method
    if args.path:
        perms["paths"] = args.path
    for opt, kind, what in (("tool", "tools", "TOOL"), ("resource", "resources", "URI_GLOB"),
                            ("prompt", "prompts", "PROMPT")):  # fmt: skip
        table: dict[str, list[str]] = {}
        for t in getattr(args, opt, None) or ():
            up, sep, name = t.partition(":")  # the first colon: resource URIs have their own
            if not sep or not up or not name:
                raise SidecarError(f"--{opt} {t!r}: expected UPSTREAM:{what}")
            table.setdefault(up, []).append(name)
        if table:
            perms[kind] = table
    if args.admin:
        perms["admin"] = args.admin  # "delegate" (= true) or "full"
    fields["permissions"] = perms
    for attr, f in (("description", "description"), ("owner", "owner"), ("quota", "quota"),
                    ("expires", "expires"), ("concurrency", "concurrency")):  # fmt: skip
        if getattr(args, attr) is not None:
            fields[f] = getattr(args, attr)
    if args.rate:
        fields["rate_limits"] = args.rate
    if args.upstream_token_env:
        ute = {}
        for item in args.upstream_token_env:
            up, sep, var = item.partition("=")
            if not sep:
                raise SidecarError(f"--upstream-token-env {item!r}: expected UPSTREAM=ENV_VAR")
            ute[up] = var
        fields["upstream_token_env"] = ute
    return fields


def cmd_keys(args: argparse.Namespace) -> int:
    actor = "cli"

    async def create(m: KeyManager) -> int:
        rec, key = await m.create(_fields_from_args(args), actor, entry_only=not m.store.writable)
        _print_key(rec, key, args.json, yaml_entry=not m.store.writable)
        return 0

    async def list_(m: KeyManager) -> int:
        recs = await m.store.list_keys()
        if args.json:
            print(json.dumps([r.public_dict() for r in recs], indent=2))
            return 0
        print(f"{'ID':<14}{'DISPLAY':<18}{'STATE':<9}{'NAME':<24}{'OWNER':<16}EXPIRES")
        for r in recs:
            d = r.public_dict()
            print(f"{r.id:<14}{r.display:<18}{d['state']:<9}{r.name[:23]:<24}{(r.owner or '-')[:15]:<16}"
                  f"{d['expires_at'] or 'never'}")  # fmt: skip
        return 0

    async def show(m: KeyManager) -> int:
        rec = await m.get(args.id)
        _show(rec, args.json, {"quota_status": await _quota_used(m, rec)})
        return 0

    async def revoke(m: KeyManager) -> int:
        _show(await m.revoke(args.id, actor), args.json)
        return 0

    async def rotate(m: KeyManager) -> int:
        grace = parse_duration(args.grace) if args.grace else 0.0
        rec, key = await m.rotate(args.id, actor, grace, entry_only=not m.store.writable)
        if not m.store.writable and not args.json:
            ends = iso(m.clock() + grace)
            print(f"# In the keys file, give key {args.id} `revoked_at: {ends}` and `rotated_to: {rec.id}`;")
        _print_key(rec, key, args.json, yaml_entry=not m.store.writable)
        return 0

    async def usage(m: KeyManager) -> int:
        from .observe.usage import report

        rec = await m.get(args.id)
        last = rec.public_dict()["last_used_at"]
        data = await report(m.store, rec.id, args.days, m.clock())
        if args.json:
            out = {"id": rec.id, "name": rec.name, "last_used_at": last, "last_used_ip": rec.last_used_ip, **data}
            print(json.dumps(out, indent=2))
            return 0
        print(f"Key {rec.id} ({rec.name}); last used {last or 'never'}{f' from {rec.last_used_ip}' if last else ''}")
        print(f"{'DAY':<12}{'REQUESTS':>10}{'ERRORS':>8}{'BYTES':>14}{'LIMITED':>9}")
        for d in [*data["days"], {"day": "TOTAL", **data["total"]}]:
            print(f"{d['day']:<12}{d['requests']:>10}{d['errors']:>8}{d['bytes']:>14}{d['rate_limited']:>9}")
        return 0

    action = {"create": create, "list": list_, "show": show, "revoke": revoke, "rotate": rotate, "usage": usage}
    return int(_run_loop(_with_manager(args, action[args.action])))


async def _quota_used(m: KeyManager, rec: KeyRecord) -> Any:
    fn = getattr(m, "quota_status", None)
    return await fn(rec) if fn else None


def cmd_config_check(args: argparse.Namespace) -> int:
    config = _load(args)
    ups = ", ".join(f"{u.id} ({u.kind}) {u.path_prefix} -> {url_origin(u.url)}" for u in config.upstreams)
    where = describe_dsn(config.store.dsn) if config.store.dsn else config.store.path
    print(f"{args.config}: OK — listen {config.listen}, admin {config.admin.listen}, store {config.store.kind} "
          f"{where}, upstreams: {ups}")  # fmt: skip
    for warning in [
        *_file_mode_warnings(config),
        *filter(None, [config.admin.weak_token()]),
        *_slow_revocation(config),
        *_keys_file_lifetimes(config),
    ]:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _keys_file_lifetimes(config: Config) -> list[str]:
    """YAML keys that keys.max_lifetime shortens or refuses (sidecar.store.lifetime)."""
    from .store.lifetime import keys_file_warnings

    return keys_file_warnings(config)


def _slow_revocation(config: Config) -> list[str]:
    """Intervals that stretch revocation past DESIGN invariant 5 (1 s for new requests, 5 s for open streams):
    allowed (the operator's trade), but said."""
    poll = config.store.poll_interval if config.store.kind != "postgres" else 0.0  # postgres: LISTEN/NOTIFY
    out = []
    if poll > 1:
        out.append(f"store.poll_interval is {poll:g}s: a revoked key's new requests are refused up to {poll:g}s late "
                   "(the contract says 1s)")  # fmt: skip
    if (ends := poll + config.keys.stream_check_interval) > 5:
        out.append(f"keys.stream_check_interval and store.poll_interval let a revoked key's open streams run up to "
                   f"{ends:g}s (the contract says 5s)")  # fmt: skip
    return out


def cmd_config_schema(args: argparse.Namespace) -> int:
    from .config.json_schema import config_json_schema_text

    sys.stdout.write(config_json_schema_text())
    return 0


def _file_mode_warnings(config: Config) -> list[str]:
    """Existing state files (store, WAL, access log) that other local users can read."""
    from .store.filemodes import readable_by_others

    dbs = {config.store.state_path} | ({config.store.path} if config.store.kind == "sqlite" else set())
    paths = [p.with_name(p.name + suffix) for p in sorted(dbs) for suffix in ("", "-wal", "-shm")]
    if config.log.access not in ("stdout", "off"):
        paths.append(Path(config.log.access))
    return [w for w in map(readable_by_others, paths) if w]


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import serve

    config = _load(args)
    logging.getLogger().setLevel(config.log.level.upper())
    if not os.environ.get("SIDECAR_WORKER") and (weak := config.admin.weak_token()):  # once per host
        logging.getLogger("sidecar").warning("%s", weak)
    if os.environ.get("SIDECAR_WORKER") or (args.workers or config.workers) > 1:  # sidecar.workers
        from .workers import serve_workers

        return serve_workers(config, args.config, args.workers, _run_loop)
    _run_loop(serve(config))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    try:
        _run_loop(run_demo(args.listen))
    except KeyboardInterrupt:
        pass
    return 0


def _workers_arg(value: str) -> int:
    from .config.workers import resolve_workers

    try:
        return resolve_workers(int(value) if value.isdigit() else value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sidecar", description="Reverse-proxy auth sidecar for Plex and MCP servers.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")

    s = sub.add_parser("serve", help="run the sidecar")
    with_config(s)
    s.add_argument("--workers", type=_workers_arg, help="worker processes on the proxy port: a number or auto "
                   "(default: the config's workers, 1)")  # fmt: skip
    s.set_defaults(fn=cmd_serve)

    d = sub.add_parser("demo", help="run a demo: a Plex-like server behind the sidecar, with keys")
    d.add_argument("--listen", help="proxy address (default 127.0.0.1:8080, or a free port if taken)")
    d.set_defaults(fn=cmd_demo)

    c = sub.add_parser("config", help="configuration tools")
    csub = c.add_subparsers(dest="action", required=True)
    cc = csub.add_parser("check", help="validate a config file and exit")
    with_config(cc)
    cc.set_defaults(fn=cmd_config_check)
    cs = csub.add_parser("schema", help="print the config file's JSON Schema (editors: config.schema.json)")
    cs.set_defaults(fn=cmd_config_schema)

    k = sub.add_parser("keys", help="manage API keys")
    ksub = k.add_subparsers(dest="action", required=True)
    kc = ksub.add_parser("create", help="create a key (printed once)")
    kc.add_argument("--name", required=True)
    kc.add_argument("--description")
    kc.add_argument("--owner")
    kc.add_argument("--upstream", action="append", help="upstream id (repeatable; default all: '*')")
    kc.add_argument("--method", action="append", type=str.upper, help="allowed HTTP method (repeatable)")
    kc.add_argument("--path", action="append", help="path glob or plex:read|plex:playback|plex:admin (repeatable)")
    kc.add_argument("--tool", action="append", help="UPSTREAM:TOOL name or glob (repeatable)")
    kc.add_argument("--resource", action="append", help="UPSTREAM:URI glob of MCP resources (repeatable)")
    kc.add_argument("--prompt", action="append", help="UPSTREAM:PROMPT name or glob (repeatable)")
    kc.add_argument("--rate", action="append", help="rate limit such as 60/minute (repeatable)")
    kc.add_argument("--quota", help="quota such as 10000/month")
    kc.add_argument("--concurrency", type=int, help="max requests in flight")
    kc.add_argument("--expires", help="90d, 12h, or a date (2027-01-31)")
    kc.add_argument(
        "--admin",
        nargs="?",
        const="delegate",
        choices=("delegate", "full"),
        help="may mint Plex tokens and manage keys: of its own owner within its own reach (--admin), "
        "or every key (--admin full)",
    )
    kc.add_argument("--upstream-token-env", action="append", help="UPSTREAM=ENV_VAR: a different upstream token")
    for name, helptext in (("list", "list keys"), ("show", "show a key"), ("revoke", "revoke a key"),
                           ("rotate", "replace a key"), ("usage", "daily usage of a key")):  # fmt: skip
        sp = ksub.add_parser(name, help=helptext) if name != "create" else kc
        if name != "list":
            sp.add_argument("id")
        if name == "rotate":
            sp.add_argument("--grace", help="keep the old key working this long (e.g. 1h)")
        if name == "usage":
            sp.add_argument("--days", type=int, default=30)
    for sp in ksub.choices.values():
        with_config(sp)
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.set_defaults(fn=cmd_keys)
    from .oauth.cli import add_commands as add_oauth_commands

    add_oauth_commands(sub, with_config)  # sidecar oauth grants|revoke|clients|remove-client
    add_store_commands(sub, with_config, _load)  # store migrate | copy (sidecar/store/commands.py)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logfilter.install()  # no key or hash in any log line, whatever the command (Sidecar adds its tokens)
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except ConfigError as e:
        print(f"config error in {getattr(args, 'config', '?')}:", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    except SidecarError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        # 75 (EX_TEMPFAIL): the database file refused (locked, full, read-only); nothing was changed, retry later.
        return 75 if e.reason else 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
