"""``sidecar oauth …``: grants and clients from the command line (the store directly, no server).

``grants [--key ID] [--client CLIENT_ID]`` · ``revoke GRANT_ID`` · ``clients`` ·
``remove-client CLIENT_ID``; each with ``-c FILE`` and ``--json``. A running sidecar sees a
revocation within a poll (the grant is a key).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from ..admin.manage import KeyManager
from ..config import load_config
from ..core.errors import NotFound
from ..store import open_store
from .clients import ClientError, ClientRegistry

__all__ = ["add_commands"]


def _run(args: argparse.Namespace) -> int:
    import asyncio

    return int(asyncio.run(_main(args)))


async def _main(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    store = await open_store(config.store, max_lifetime=config.keys.max_lifetime)
    try:
        if args.action == "grants":
            found = await store.list_grants(args.key, args.client)
            rows = [r.public_dict() for r in found]
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                print(f"{'GRANT':<14}{'STATE':<9}{'PARENT KEY':<14}{'OWNER':<14}{'CLIENT':<30}{'RESOURCE':<12}EXPIRES")
                for d in rows:
                    g = d["grant"]
                    print(f"{d['id']:<14}{d['state']:<9}{d['parent_id']:<14}{(d['owner'] or '-')[:13]:<14}"
                          f"{(g.get('client_name') or g.get('client_id', ''))[:29]:<30}{g.get('resource', ''):<12}"
                          f"{d['expires_at'] or 'never'}")  # fmt: skip
            return 0
        if args.action == "revoke":
            rec = await store.get(args.id)
            if rec is None or rec.parent_id is None:
                raise NotFound(f"no OAuth grant with id {args.id!r}")
            after = await KeyManager(config, store).revoke(args.id, "cli")
            await store.oauth_forget(args.id, time.time())
            print(json.dumps(after.public_dict(), indent=2) if args.json else f"revoked grant {args.id}")
            return 0
        registry = ClientRegistry(config.oauth, store)
        if args.action == "clients":
            clients = await registry.listing()
            if args.json:
                print(json.dumps(clients, indent=2))
            else:
                print(f"{'CLIENT ID':<40}{'KIND':<12}{'NAME':<24}REDIRECT URIS")
                for c in clients:
                    print(f"{c['client_id'][:39]:<40}{c['kind']:<12}{c['client_name'][:23]:<24}"
                          f"{' '.join(c['redirect_uris'])}")  # fmt: skip
            return 0
        try:
            removed = await registry.remove(args.id, "cli")
        except ClientError as e:
            raise ValueError(e.description) from None
        if not removed:
            raise NotFound(f"no registered client {args.id!r}")
        print(json.dumps({"client_id": args.id, "removed": True}) if args.json else f"removed client {args.id}")
        return 0
    finally:
        await store.close()


def add_commands(sub: Any, with_config: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``sidecar oauth`` to the command line's subparsers."""
    o = sub.add_parser("oauth", help="OAuth grants and clients")
    osub = o.add_subparsers(dest="action", required=True)
    g = osub.add_parser("grants", help="list OAuth grants (child keys)")
    g.add_argument("--key", help="only grants approved with this key id")
    g.add_argument("--client", help="only grants of this client id")
    osub.add_parser("revoke", help="revoke a grant").add_argument("id")
    osub.add_parser("clients", help="list clients (configured, registered, cached documents)")
    osub.add_parser("remove-client", help="remove a dynamically registered client").add_argument("id")
    for sp in osub.choices.values():
        with_config(sp)
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.set_defaults(fn=_run)
