"""The console's plumbing: its state, the page wrapper (session, CSRF, headers), sign-in and static files.

Every console response goes through :func:`harden`: a strict Content-Security-Policy (only
this origin's script and stylesheet; no inline script or style; ``frame-ancestors 'none'``;
forms post only here), ``no-store`` for pages, a referrer only to this origin (browsers then send
``Origin`` on its own form posts, which the CSRF check reads; the one-time link never leaves it),
``nosniff``. Every page but sign-in goes through :func:`page`: no session → the sign-in page;
a state-changing request whose CSRF token does not match the session's (or that comes from
another origin) → 403, and nothing is done.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import mimetypes
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote

import jinja2
from aiohttp import web
from multidict import MultiDictProxy

from ..auth.models import KeyRecord
from ..core.addresses import browser_origin, client_ip, foreign_page
from ..core.errors import BadRequest, RevokedKey, SidecarError, TooManyFailures
from ..observe.recent import Entry, RecentRequests
from ..store import ReadOnlyStore, StoreError
from .forms import audit_detail
from .sessions import OneTimeLinks, Session, SessionStore, SignInThrottle, cookie_name
from .tools import ToolLister

if TYPE_CHECKING:
    from .host import ConsoleHost

__all__ = ["CONSOLE", "Console", "default_headers", "harden", "page", "read_form", "see_other"]

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}
STATIC_FILES = ("console.css", "console.js", "favicon.svg")

Handler = Callable[[web.Request, "Console", Session], Awaitable[web.StreamResponse]]


def harden(resp: web.StreamResponse, *, cache: bool = False) -> web.StreamResponse:
    resp.headers.update(_HEADERS)
    resp.headers["Cache-Control"] = "public, max-age=31536000, immutable" if cache else "no-store"
    return resp


async def default_headers(request: web.Request, resp: web.StreamResponse) -> None:
    """Every other answer of the admin listener (the router's 404/405/413, the admin API's JSON, /metrics)
    is on the console's origin too: the same headers, where the answer did not set its own."""
    for name, value in _HEADERS.items():
        resp.headers.setdefault(name, value)
    resp.headers.setdefault("Cache-Control", "no-store")


def _time(ts: float | None) -> str:
    import time

    return "—" if ts is None else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def _short(ts: float | None) -> str:
    import time

    return "—" if ts is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))


def _iso(ts: float | None) -> str:
    import time

    return "" if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class Console:
    """What the console holds: sessions, the throttle, one-time links, recent requests, templates."""

    def __init__(self, sc: ConsoleHost) -> None:
        cfg = sc.config.console
        self.sc = sc
        self.sessions = SessionStore(
            idle=cfg.session_idle, lifetime=cfg.session_lifetime, max_sessions=cfg.max_sessions, clock=sc.steady
        )
        self.throttle = SignInThrottle(sc.config.keys.failed_attempts_per_minute, sc.steady)
        self.links = OneTimeLinks(sc.steady)
        self.recent = RecentRequests(clock=sc.clock)
        sc.access_log.tap = self.recent.add  # fed with every finished proxy request
        self.tools = ToolLister(sc.sessions)
        self.proxy_url: str | None = sc.config.server.public_url  # for the examples; `running` callers may set it
        files = resources.files(__package__)
        self.static: dict[str, tuple[bytes, str]] = {}
        for name in STATIC_FILES:
            body = (files / "static" / name).read_bytes()
            ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
            self.static[name] = (body, ctype)
        # A file's URL carries its hash: cached for a year, and a new version is a new URL.
        self.versions = {n: hashlib.sha256(b).hexdigest()[:12] for n, (b, _) in self.static.items()}
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(files / "templates")),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.globals.update(asset=self.asset, when=_time, short=_short, iso=_iso, detail=audit_detail)

    def asset(self, name: str) -> str:
        return f"/static/{name}?v={self.versions[name]}"

    # ------------------------------------------------------------------ sessions

    def tls(self, request: web.Request) -> bool:
        """Did the browser use https: TLS on the admin listener, or ended by a trusted proxy in front."""
        return browser_origin(request, self.sc.trusted_proxies)[0] == "https"

    def client_ip(self, request: web.Request) -> str:
        """The sign-in throttle's unit: behind a trusted ingress the client, not the ingress (whose one
        address would let one guesser lock every operator out)."""
        return client_ip(request, self.sc.trusted_proxies)

    def cookie(self, request: web.Request) -> str | None:
        """The session cookie's value; None when there is none, or more than one: a page on another port of
        this host can plant a second one from script (cookies are not per port), and which of two is the
        operator's own cannot be told, so neither is used (``two_cookies`` says why on the sign-in page)."""
        found = self._cookies(request)
        return found[0] if len(found) == 1 else None

    def _cookies(self, request: web.Request) -> list[str]:
        name = cookie_name(self.tls(request))
        raw = "; ".join(request.headers.getall("Cookie", ()))
        if name not in raw:
            return []
        pairs = (p.split("=", 1) for p in raw.split(";"))
        return [p[1].strip() for p in pairs if len(p) == 2 and p[0].strip() == name]

    def two_cookies(self, request: web.Request) -> bool:
        return len(self._cookies(request)) > 1

    def session(self, request: web.Request) -> Session | None:
        return self.sessions.get(self.cookie(request))

    def acting_key(self, session: Session) -> KeyRecord | None:
        """The admin key a session signed in with, as the verifier sees it now (None: the admin token)."""
        if session.key_id is None:
            return None
        rec = self.sc.verifier.table.get(session.key_id)
        if rec is None:  # gone since the request began: never None, which would mean the admin token
            raise RevokedKey("this API key has been revoked")
        return rec

    def still_allowed(self, session: Session) -> bool:
        """A key session ends the moment its key is revoked, expires or loses ``admin``."""
        if session.key_id is None:
            return bool(self.sc.config.admin.token)
        rec = self.sc.verifier.table.get(session.key_id)
        if rec is None or not rec.permissions.admin:
            return False
        return self.sc.verifier.state(rec, self.sc.clock()) == "active"

    def start_session(self, request: web.Request, resp: web.StreamResponse, actor: str, key_id: str | None) -> None:
        sid, _ = self.sessions.create(actor, key_id)
        tls = self.tls(request)
        resp.set_cookie(cookie_name(tls), sid, path="/", httponly=True, samesite="Strict", secure=tls)

    def note_failure(self, request: web.Request, reason: str) -> None:
        """A refused sign-in, for the activity page (the token tried is never kept)."""
        ip = self.client_ip(request)
        self.recent.note(Entry(self.sc.clock(), "POST", "/signin", 401, 0.0, ip, "console", "", reason))

    # ------------------------------------------------------------------ rendering

    def render(
        self, request: web.Request, template: str, *, session: Session | None = None, status: int = 200, **ctx: Any
    ) -> web.Response:
        html = self.env.get_template(template).render(
            session=session, csrf=session.csrf if session else "", path=request.path, **ctx
        )
        return harden(web.Response(text=html, content_type="text/html", status=status))  # type: ignore[return-value]

    def error(self, request: web.Request, status: int, message: str, session: Session | None = None) -> web.Response:
        return self.render(request, "error.html", session=session, status=status, message=message)

    def broken(self, request: web.Request, session: Session | None) -> web.StreamResponse:
        """The page for an internal error: the console's own, or a bare one if rendering is what broke."""
        try:
            return self.error(request, 500, BROKEN, session)
        except Exception:
            page = f'<!doctype html><title>Error</title><p role="alert">{BROKEN}</p><p><a href="/">Back</a></p>'
            return harden(web.Response(text=page, content_type="text/html", status=500))


log = logging.getLogger("sidecar.console")
BROKEN = "The console hit an internal error and this page could not be shown; the sidecar's log says why."
CONSOLE: web.AppKey[Console] = web.AppKey("console", Console)


def _same_origin(request: web.Request) -> bool:
    """A browser's own statement that the form came from elsewhere (CSRF's first line; the token is the second).
    The host compared is the one the browser used (a trusted ingress's ``X-Forwarded-Host``, else ``Host``)."""
    return not foreign_page(request, request.app[CONSOLE].sc.trusted_proxies)


FORM = "application/x-www-form-urlencoded"
BAD_FORM = (
    "The console's forms are sent as URL-encoded UTF-8 text (application/x-www-form-urlencoded): nothing was changed."
)


async def read_form(request: web.Request) -> MultiDictProxy[str]:
    """A form as the console's own pages send it: URL-encoded UTF-8 text fields, nothing else.

    Anything else is a 400 before it is parsed: a multipart body (files spooled to disk, fields that are
    not text, a missing boundary), another or an unknown charset, bytes that are not UTF-8 — each was a 500
    and a traceback in the log, from ``/signin`` for anyone, and a cross-site form can send most of them."""
    if request.body_exists and (
        request.content_type != FORM or (request.charset or "utf-8").lower() not in ("utf-8", "utf8")
    ):
        raise BadRequest(BAD_FORM)
    try:
        form = await request.post()
    except ValueError:  # UnicodeDecodeError: not UTF-8
        raise BadRequest(BAD_FORM) from None
    return cast("MultiDictProxy[str]", form)  # URL-encoded: every value is text


def page(fn: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A console page: signed in, CSRF-checked when it changes something, errors as pages."""

    async def handler(request: web.Request) -> web.StreamResponse:
        console = request.app[CONSOLE]
        session = console.session(request)
        if session is not None and not console.still_allowed(session):
            console.sessions.end(console.cookie(request))
            session = None
        if session is None:
            if request.method in ("GET", "HEAD"):
                return see_other(f"/signin?next={quote(request.path_qs, safe='/')}")
            return console.render(
                request, "signin.html", status=401, message="Your session ended: sign in again.", next="/"
            )
        if request.method not in ("GET", "HEAD"):
            try:
                form = await read_form(request)
            except BadRequest as e:
                return console.error(request, e.status, e.message, session)
            raw = form.get("csrf")
            token = raw if isinstance(raw, str) else None
            if not _same_origin(request) or not session.check_csrf(token or request.headers.get("X-CSRF-Token")):
                return console.error(
                    request, 403, "This form is stale or did not come from the console (CSRF check failed): "
                    "nothing was changed. Reload the page and try again.", session,
                )  # fmt: skip
        try:
            return await fn(request, console, session)
        except SidecarError as e:
            return console.error(request, e.status, e.message, session)
        except ReadOnlyStore as e:
            return console.error(request, 409, str(e), session)
        except StoreError as e:
            return console.error(request, 503, str(e), session)
        except web.HTTPException:
            raise
        except Exception:  # a bug of ours: logged (redacted, as every record is), and a page, not a bare 500
            log.exception("console: %s %s failed", request.method, request.path)
            return console.broken(request, session)

    return handler


TWO_COOKIES = (
    "Your browser sent two console cookies: a page on another port of this host may have set one. "
    "Neither is used: clear this site's cookies in the browser, then sign in."
)


def _safe_next(value: str | None) -> str:
    """Only a path on this listener (never //host or a scheme): no open redirect after sign-in.
    Printable ASCII only: browsers drop tabs and newlines from a URL (``/<TAB>/evil`` is ``//evil``),
    and a control character in ``Location`` would break the answer."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    if not all("!" <= c <= "~" for c in value):
        return "/"
    return value


async def sign_in_page(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    if console.session(request) is not None:
        return see_other(_safe_next(request.query.get("next")))
    message = (
        TWO_COOKIES
        if console.two_cookies(request)
        else ""
        if console.sc.config.admin.token
        else (
            f"The admin token is not set ({console.sc.config.admin.token_env}): "
            "only a key with the admin permission can sign in."
        )
    )
    return console.render(request, "signin.html", message=message, next=_safe_next(request.query.get("next")))


async def sign_in(request: web.Request) -> web.StreamResponse:
    """The admin token, or a key with ``admin``; failures throttled per address like failed keys."""
    console = request.app[CONSOLE]
    sc = console.sc
    if not _same_origin(request):  # before the body is even read
        return console.error(request, 403, "Sign in from the console's own page.")
    try:
        form = await read_form(request)
    except BadRequest as e:
        return console.error(request, e.status, e.message)
    nxt = _safe_next(str(form.get("next") or "/"))
    ip = console.client_ip(request)
    wait = console.throttle.wait(ip)
    if wait > 0:
        console.note_failure(request, "too_many_failed_attempts")
        resp = console.render(
            request, "signin.html", status=429, next=nxt,
            message=f"Too many failed sign-ins from this address: wait {int(wait) + 1} s.",
        )  # fmt: skip
        resp.headers["Retry-After"] = str(int(wait) + 1)
        return resp
    secret = str(form.get("token") or "").strip()
    token = sc.config.admin.token
    resp = see_other(nxt)
    if token and secret and hmac.compare_digest(secret.encode(), token.encode()):
        console.start_session(request, resp, "console", None)
        return resp
    if secret and sc.verifier.parse(secret) is not None:
        try:
            key = await sc.verifier.verify(secret, ip)
        except TooManyFailures as e:
            console.note_failure(request, "too_many_failed_attempts")
            return console.render(request, "signin.html", status=429, next=nxt, message=e.message)
        except SidecarError as e:
            console.throttle.fail(ip)
            console.note_failure(request, "console_sign_in")
            return console.render(request, "signin.html", status=401, next=nxt, message=e.message)
        if key.permissions.admin:
            console.start_session(request, resp, f"console:key:{key.id}", key.id)
            return resp
    console.throttle.fail(ip)
    console.note_failure(request, "console_sign_in")
    msg = "That is not the admin token, nor a key with the admin permission."
    return console.render(request, "signin.html", status=401, next=nxt, message=msg)


async def sign_in_once(request: web.Request) -> web.StreamResponse:
    """``sidecar demo``'s link: works once, for two minutes; then sends the browser on to ``/``.

    The page forwards with a meta refresh rather than a redirect: a navigation the page
    itself starts is same-site, so the ``SameSite=Strict`` cookie set here goes with it
    (a redirect answering a link clicked in a terminal or mail would not carry it).
    """
    console = request.app[CONSOLE]
    if not console.links.redeem(request.match_info["token"]) or not console.sc.config.admin.token:
        console.note_failure(request, "console_sign_in")
        msg = "That sign-in link was used already or has expired: sign in with the token."
        return console.render(request, "signin.html", status=401, next="/", message=msg)
    resp = console.render(request, "continue.html")
    console.start_session(request, resp, "console", None)
    return resp


async def sign_out(request: web.Request, console: Console, session: Session) -> web.StreamResponse:
    console.sessions.end(console.cookie(request))
    resp = console.render(request, "signin.html", message="Signed out.", next="/")
    tls = console.tls(request)
    resp.del_cookie(cookie_name(tls), path="/", secure=tls, httponly=True, samesite="Strict")
    return resp


async def static(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    found = console.static.get(request.match_info["name"])
    if found is None:
        return harden(web.Response(status=404, text="not found"))
    body, ctype = found
    return harden(web.Response(body=body, content_type=ctype), cache=True)


def see_other(location: str) -> web.Response:
    """303 to a path of this listener (after a POST, so a reload does not post again)."""
    return harden(web.Response(status=303, headers={"Location": location}))  # type: ignore[return-value]
