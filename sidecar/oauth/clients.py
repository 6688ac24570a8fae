"""OAuth clients: pre-registered (config), dynamically registered (RFC 7591), and Client ID
Metadata Documents (the client id is an https URL whose JSON names the client).

Every kind ends as one ``Client``: an id, a display name, the exact redirect URIs and, for
a confidential client, the SHA-256 of its secret (compared with ``hmac.compare_digest``).
Metadata documents are fetched through ``sidecar.oauth.fetch`` (SSRF guard) and cached
for ``oauth.cimd.cache_ttl``; the document's ``client_id`` must equal its URL and only
public clients (``token_endpoint_auth_method: none``) are accepted from one.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..config.oauth import OAuthConfig, check_redirect_uri
from ..store import Store
from ..store.base import AuditEvent
from .fetch import FetchRefused, fetch_document

__all__ = ["Client", "ClientError", "ClientRegistry", "redirect_matches"]

MAX_REGISTERED = 10_000  # dynamically registered clients kept; past it registration is refused
MAX_NAME = 100
MAX_REDIRECTS = 10
_GRANTS = {"authorization_code", "refresh_token"}
_AUTH_METHODS = ("none", "client_secret_post", "client_secret_basic")


class ClientError(Exception):
    """An OAuth error about the client (``error`` is the RFC 6749 / 7591 code); safe to show."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error, self.description = error, description


def redirect_matches(registered: str, given: str) -> bool:
    """Exact string match, except that a loopback IP redirect may name any port (RFC 8252 §7.3,
    OAuth 2.1 §8.4.2: native apps such as VS Code listen on whatever port is free)."""
    if given == registered:
        return True
    if not given.isprintable():  # ``urlsplit`` drops tabs and newlines: "/c<LF>b" would pass as "/cb"
        return False
    try:
        r, g = urlsplit(registered), urlsplit(given)
        g.port  # noqa: B018 - a malformed port raises here
    except ValueError:
        return False
    loopback = r.hostname in ("127.0.0.1", "::1")
    return (
        loopback and r.scheme == g.scheme == "http" and g.hostname == r.hostname and g.username is None
        and (r.path, r.query) == (g.path, g.query) and not g.fragment and "#" not in given
    )  # fmt: skip


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Client:
    client_id: str
    name: str
    redirect_uris: tuple[str, ...]
    kind: str  # "configured" | "registered" | "metadata"
    secret_hash: str | None = None  # None: a public client (PKCE is its only proof)
    created_at: float | None = None

    @property
    def confidential(self) -> bool:
        return self.secret_hash is not None

    def secret_ok(self, secret: str | None) -> bool:
        if self.secret_hash is None:
            return True  # public client: nothing to check (a stray secret proves nothing either)
        return secret is not None and hmac.compare_digest(_hash(secret), self.secret_hash)

    def public_dict(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id, "client_name": self.name, "redirect_uris": list(self.redirect_uris),
            "kind": self.kind, "confidential": self.confidential, "created_at": self.created_at,
        }  # fmt: skip


def _redirects(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or len(value) > MAX_REDIRECTS:
        raise ClientError("invalid_redirect_uri", f"redirect_uris: a list of 1 to {MAX_REDIRECTS} URIs is required")
    out = []
    for uri in value:
        problem = check_redirect_uri(uri) if isinstance(uri, str) else "a redirect URI must be a string"
        if problem:
            raise ClientError("invalid_redirect_uri", problem)
        out.append(uri)
    return tuple(out)


def _name(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > MAX_NAME:
        raise ClientError("invalid_client_metadata", f"client_name: a string of at most {MAX_NAME} characters")
    return "".join(c for c in value if c.isprintable())


class ClientRegistry:
    def __init__(self, config: OAuthConfig, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self._configured = {
            c.client_id: Client(c.client_id, c.client_name or c.client_id, c.redirect_uris, "configured",
                                _hash(c.client_secret) if c.client_secret else None)
            for c in config.clients
        }  # fmt: skip
        self._documents: dict[str, tuple[float, Client]] = {}  # URL -> (fetched at, client)
        self._allowed = frozenset(h.lower().strip("[]") for h in config.cimd.allowed_hosts)

    async def get(self, client_id: str, fetch_ok: Callable[[], bool] | None = None) -> Client:
        """The client, or ``ClientError("invalid_client")``. ``fetch_ok``: asked before a metadata
        document is fetched (not for one cached), so an anonymous caller's fetches are bounded
        (``ClientError("slow_down")``): each is an outbound request whose outcome the error tells."""
        if not client_id or len(client_id) > 2048 or not client_id.isprintable():  # NUL: Postgres cannot even compare
            raise ClientError("invalid_client", "unknown client")
        found = self._configured.get(client_id)
        if found is not None:
            return found
        if client_id.startswith("https://"):
            return await self._document(client_id, fetch_ok)
        if client_id.startswith("http://"):
            raise ClientError("invalid_client", "a client metadata document's URL must be https")
        data = await self.store.oauth_client(client_id)
        if data is None:
            raise ClientError("invalid_client", "unknown client")
        return Client(data["client_id"], data.get("client_name") or "", tuple(data["redirect_uris"]), "registered",
                      data.get("secret_hash"), data.get("created_at"))  # fmt: skip

    async def _document(self, url: str, fetch_ok: Callable[[], bool] | None) -> Client:
        cimd = self.config.cimd
        if not cimd.enabled:
            raise ClientError("invalid_client", "client metadata documents are not accepted here")
        now = self.clock()
        cached = self._documents.get(url)
        if cached is not None and now - cached[0] < cimd.cache_ttl:
            return cached[1]
        if fetch_ok is not None and not fetch_ok():
            raise ClientError("slow_down", "too many client metadata documents fetched from this address; try again")
        try:
            doc = await fetch_document(url, allowed_hosts=self._allowed, time_limit=cimd.timeout,
                                       max_bytes=cimd.max_bytes, ca_file=cimd.tls_ca_file)  # fmt: skip
        except FetchRefused as e:
            raise ClientError("invalid_client", str(e)) from None
        if doc.get("client_id") != url:
            raise ClientError("invalid_client", "the metadata document's client_id is not its own URL")
        method = doc.get("token_endpoint_auth_method", "none")
        if method != "none":
            raise ClientError(
                "invalid_client", "a metadata-document client must be public (token_endpoint_auth_method none)"
            )
        client = Client(url, _name(doc.get("client_name")), _redirects(doc.get("redirect_uris")), "metadata")
        if len(self._documents) >= 1000:
            self._documents.clear()
        self._documents[url] = (now, client)
        return client

    async def register(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """RFC 7591 §3: register a client; the answer (with a secret for a confidential one, shown once)."""
        if not self.config.allow_dynamic_registration:
            raise ClientError("access_denied", "dynamic client registration is turned off")
        redirect_uris = _redirects(body.get("redirect_uris"))
        name = _name(body.get("client_name"))
        method = body.get("token_endpoint_auth_method") or "none"
        if not isinstance(method, str) or method not in _AUTH_METHODS:
            raise ClientError(
                "invalid_client_metadata", f"token_endpoint_auth_method: one of {', '.join(_AUTH_METHODS)}"
            )
        grants = body.get("grant_types") or ["authorization_code", "refresh_token"]
        if (not isinstance(grants, list) or not all(isinstance(g, str) for g in grants)  # [[…]]: unhashable
                or not set(grants) <= _GRANTS or "authorization_code" not in grants):  # fmt: skip
            raise ClientError("invalid_client_metadata", "grant_types: authorization_code (and refresh_token) only")
        responses = body.get("response_types") or ["code"]
        if responses != ["code"]:
            raise ClientError("invalid_client_metadata", "response_types: only code")
        if await self.store.oauth_client_count() >= MAX_REGISTERED:  # not a read of every client: anyone may ask
            raise ClientError("access_denied", "too many registered clients; ask the operator to remove some")
        now = self.clock()
        client_id = "dcr_" + secrets.token_hex(16)
        secret = "dcs_" + secrets.token_hex(32) if method != "none" else None
        stored = {"client_id": client_id, "client_name": name, "redirect_uris": list(redirect_uris),
                  "token_endpoint_auth_method": method, "created_at": now}  # fmt: skip
        if secret:
            stored["secret_hash"] = _hash(secret)
        await self.store.oauth_save_client(client_id, stored, now)
        answer: dict[str, Any] = {
            "client_id": client_id, "client_id_issued_at": int(now), "client_name": name or None,
            "redirect_uris": list(redirect_uris), "grant_types": grants, "response_types": ["code"],
            "token_endpoint_auth_method": method,
        }  # fmt: skip
        if secret:
            answer["client_secret"] = secret
            answer["client_secret_expires_at"] = 0
        return {k: v for k, v in answer.items() if v is not None}

    async def listing(self) -> list[dict[str, Any]]:
        """Every client the operator can see: configured ones, registered ones, and cached documents."""
        out = [c.public_dict() for c in self._configured.values()]
        for data in await self.store.oauth_clients():
            out.append({"client_id": data["client_id"], "client_name": data.get("client_name") or "",
                        "redirect_uris": data["redirect_uris"], "kind": "registered",
                        "confidential": "secret_hash" in data, "created_at": data.get("created_at")})  # fmt: skip
        out.extend(c.public_dict() for _, c in self._documents.values())
        return out

    async def remove(self, client_id: str, actor: str | None = None) -> bool:
        """Forget a registered client (or a cached metadata document); configured ones live in the file.
        ``actor`` (the console, the admin API, the CLI): audited as ``oauth_client_removed``."""
        if client_id in self._configured:
            raise ClientError("invalid_request", "a client from the config file is removed by editing the file")
        if not client_id.isprintable():
            return False  # never stored (``get`` refuses it): nothing to remove
        cached = self._documents.pop(client_id, None)
        removed = await self.store.oauth_delete_client(client_id) or cached is not None
        if removed and actor is not None:
            await self.store.audit(
                AuditEvent(self.clock(), actor, "oauth_client_removed", None, {"client_id": client_id})
            )
        return removed
