"""What a relayed answer may make a browser do to the proxy's origin, and what of the sidecar's own goes up.

Every upstream behind the proxy listener and the sidecar's own pages (the OAuth consent page
where a person types an API key, its error pages) share one origin, and a browser keeps cookies
per *host*, not per port: the console on the admin listener shares them too. An upstream that
echoes client input, or serves files people upload (Plex posters, MCP resources), must not be
able to act on that whole origin. Decisions, per header (docs/security.md, "Browsers and the
shared origin"):

Dropped from every relayed answer (``DROP``; the gateway owns the origin, not one upstream):

- ``Service-Worker-Allowed``: would let a relayed script register a service worker whose scope
  covers every path, the consent page included, for good. Plex Web and MCP do not send it.
- ``Clear-Site-Data``: wipes cookies and storage of every upstream on the origin (and the
  consent page's CSRF cookie), or reloads their pages.
- ``Strict-Transport-Security``, ``Alt-Svc``: pin the public origin's transport, which is the
  business of whoever terminates the client's TLS; an upstream's describe its own endpoint.
- ``NEL``, ``Report-To``: Network Error Logging is an origin-wide policy that lasts (``max_age``)
  and reports the URL of every request to the origin — Plex Web's carry the key in the query —
  to an address the upstream picks.
- ``Access-Control-Allow-Credentials``: the sidecar's credentials are explicit (a header or
  the query), never ambient; a credentialed cross-origin read could only ride on something
  ambient (a cookie, cached Basic credentials) the person never meant to lend another site.
- On MCP routes also every other ``Access-Control-*`` (``MCP_DROP``): the sidecar's ``cors``
  section is the only CORS policy there (``upstreams/mcp/cors.py``), so a hostile upstream
  cannot widen it. Plex answers keep Plex's own CORS (browser Plex apps on other origins use it).

``WWW-Authenticate`` challenges a browser answers with a password dialog (Basic, Digest, Negotiate,
NTLM) are dropped: on the sidecar's origin the dialog would collect a person's key for the
sidecar (which takes ``Basic any:<key>``), and the browser would then attach it to every request
to the origin, other sites' included — an ambient credential for cross-site forgeries. (MCP
answers lose every challenge already: ``upstreams/mcp/response.py``.)

``Set-Cookie`` lines naming one of the sidecar's own cookies (``sidecar_*``, with or without a
``__Host-``/``__Secure-`` prefix: the console session, the consent CSRF cookie) are dropped: no
tossing a value over them; so are those whose ``Path`` lies in the sidecar's own folders
(``/oauth``, ``/.well-known/oauth-``): a few large ones there would lock the consent page out
(every request over the header limit) for as long as they last. Other cookies pass (load
balancers' affinity cookies), kept inside their upstream's folder (below). Going up, the
sidecar's cookies are taken out of the client's ``Cookie`` header (``upstream_cookie``): the
browser sends the console's session cookie to every port of the host, and no upstream may see it.

Cookies between upstreams (``scoped``, what nginx's ``proxy_cookie_path`` does, by default): a
cookie a browser takes from one upstream goes with every later request whose path it covers, to
any upstream. An upstream with a ``path_prefix`` other than ``/`` gets each ``Set-Cookie`` rewritten
so the cookie stays in its folder: its session cookies cannot reach a sibling upstream, and a
"cookie bomb" (many large cookies) locks only its own paths out, not the origin's.

- The ``Path``: none, an empty one or one not starting with ``/`` (the browser would use the
  request's folder: ``/mcp`` for a request to ``/mcp/tools``) → ``Path=<prefix>``; with
  ``strip_prefix`` (the upstream sees paths without the prefix) ``Path=/`` → ``<prefix>`` and
  ``Path=/x`` → ``<prefix>/x``; without it, a path inside the prefix is kept and any other one
  becomes ``<prefix>`` (the upstream is never sent a request there through the sidecar). An
  upstream URL with a path (``http://host:8000/mcp``) is sent every path under it: its cookie's
  path is read less that part (``/mcp/x`` → ``/x``), and one outside it becomes ``<prefix>``. Compared
  as sent, case and all (browsers match cookie paths byte for byte). A result over 1,024 bytes
  (browsers ignore such an attribute and use the request's folder) becomes ``<prefix>``.
- ``Domain`` is removed: the cookie becomes host-only, not sent to sibling hosts either (a
  ``Domain`` the browser would have refused now yields a host-only cookie in the folder).
- A cookie line holding a control character is dropped (browsers cut or refuse such a line,
  where the rewritten ``Path`` would be lost).
- Everything else stays byte for byte, in order; every ``Path``/``Domain`` attribute goes (a
  browser takes the last one) and one ``Path`` is appended last, so it wins whatever else the
  line holds. Not ``http.cookies``: ``SimpleCookie`` refuses or rewrites what it does not know
  (``Partitioned``, unquoted commas and spaces in values, odd ``Expires``), reorders and recases
  attributes and quotes values; browsers parse by ``;`` and ``=`` and trim spaces and tabs only,
  and so does ``scoped``.
- ``__Host-`` cookies must have ``Path=/``: from a prefixed upstream browsers refuse them once
  rewritten (programs' cookie jars keep them, in the folder). That is the safe failure.
- The root upstream's (``path_prefix: /``) cookies pass as sent: its folder is the origin.

Not done, on purpose, going up: the sidecar does not take cookies out of requests to prefixed
upstreams. A ``Cookie`` header holds names and values only, never who set them, so the only
sure cut would be every cookie, and that breaks prefixed upstreams' own (an MCP server behind a
load balancer's affinity cookie, an application at ``/app`` with its session). The residual: the
root upstream's cookies with ``Path=/`` (and an outer prefix's, ``/mcp`` around ``/mcp/tools``)
reach the upstreams under it, and a root upstream could bomb them all. Plex (the usual root)
keeps its token in a header and storage, not a cookie; put at ``/`` only an upstream trusted as
much as those under it, or none (docs/security.md).

Added (CSP headers add up, the strictest wins; on an answer given the sandbox below, the upstream's
own CSP and ``Reporting-Endpoints`` are replaced: they could only add a report address, which would
be sent the URL, the client's key in its query):

- MCP answers: ``X-Content-Type-Options: nosniff`` and ``Content-Security-Policy: sandbox;
  default-src 'none'`` — an MCP server answers JSON or event streams to programs, never a page
  to run; CSP does not apply to ``fetch`` answers, so MCP clients in browsers are unaffected.
- Every upstream: SVG and XML types (``+xml`` too, and ``multipart/x-mixed-replace``, whose
  parts render as documents) get the same sandbox CSP (an SVG poster or an XML answer
  that echoes a title can carry script; as ``<img>`` or ``fetch`` nothing changes for Plex
  Web), and an answer with no or an "unknown" ``Content-Type`` gets ``nosniff`` (else the
  browser may sniff it into HTML). HTML from Plex is sandboxed too, except in Plex Web's own
  folder (``<path_prefix>/web/``): that is the application; anywhere else an HTML answer can
  only be an error page or a reflection. Plex's typed answers get no ``nosniff``: a mislabelled
  Plex Web script would stop loading, and sniffing a typed answer never yields HTML.

Service workers (``worker_refusal``): a request carrying ``Service-Worker: script`` (what a
browser sends when it fetches a script to register) is refused when the script's directory —
its widest possible scope, ``Service-Worker-Allowed`` being dropped — is ``/`` or ``/oauth/``:
such a worker would sit between the person and the consent page (and every upstream's pages)
even after the page that registered it is gone. Workers under an application's own folder
(Plex Web's ``/web/``) register as before.

Passed as sent, on purpose: ``Link``, ``Refresh``, the upstream's own CSP (outside the sandbox
above), ``Permissions-Policy``, ``Cross-Origin-Opener/Embedder/Resource-Policy``,
``Origin-Agent-Cluster``, ``Accept-CH``: each acts on its own document or resource, or is a hint;
none reaches the sidecar's pages or outlives the answer. No ``Cross-Origin-Opener-Policy`` is set
on the consent page: it would cut the ``window.opener`` of web MCP clients that open it in a
popup, and a script already running on this origin could as well draw a look-alike page at the
real address; what such a script can no longer do is make itself last (a worker, NEL) or reach
the console's session.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Final
from urllib.parse import urlsplit

from multidict import CIMultiDict

from ..core.errors import Forbidden
from ..core.relay import HOP_BY_HOP

__all__ = [
    "DROP", "MCP_DROP", "SANDBOX", "WORKER_FORBIDDEN", "answer_headers", "refused", "scoped", "upstream_cookie",
    "worker_refusal",
]  # fmt: skip

DROP: Final = frozenset(
    {"service-worker-allowed", "clear-site-data", "strict-transport-security", "alt-svc",
     "access-control-allow-credentials", "nel", "report-to"}
)  # fmt: skip
# An upstream's own policies on an answer the sidecar sandboxes: ours is stricter than any, and
# theirs could only add a report address (which would be sent the URL, the client's key in it).
_REPLACED: Final = ("Content-Security-Policy", "Content-Security-Policy-Report-Only", "Reporting-Endpoints")
MCP_DROP: Final = DROP | frozenset(
    {"access-control-allow-origin", "access-control-allow-methods", "access-control-allow-headers",
     "access-control-expose-headers", "access-control-max-age", "access-control-allow-private-network"}
)  # fmt: skip
_REFUSED: Final = HOP_BY_HOP | DROP  # the usual answer's whole drop set, one lookup per header
_MCP_REFUSED: Final = HOP_BY_HOP | MCP_DROP
SANDBOX: Final = "sandbox; default-src 'none'"
# Media types a browser runs script in when navigated to (besides HTML): sandboxed from every upstream.
# (and every ``+xml`` type: Atom, RSS, MathML… render as XML documents, which may hold XHTML script)
_ACTIVE: Final = frozenset(
    {"image/svg+xml", "text/xml", "application/xml", "application/xhtml+xml", "text/xsl", "application/xslt+xml",
     "multipart/x-mixed-replace"}
)  # fmt: skip
_UNKNOWN: Final = frozenset({"", "unknown/unknown", "application/unknown", "*/*"})  # sniffed by browsers
# The directories a service worker's script may not come from: "/" and every folder of the
# sidecar's own pages (``oauth.metadata.ENDPOINTS``; the root ``/authorize`` is under "/").
WORKER_FORBIDDEN: Final = frozenset({"/", "/oauth/"})
_OWN_COOKIE: Final = "sidecar_"
_OWN_PATHS: Final = ("/oauth", "/.well-known/oauth-")  # cookie paths only the sidecar's pages match
_PROMPTING: Final = frozenset({"basic", "digest", "negotiate", "ntlm"})  # schemes with a browser dialog
_WSP: Final = " \t"  # what browsers trim around cookie attribute names and values (RFC 6265 §5.2)
_CTL: Final = re.compile("[\x00-\x08\x0a-\x1f\x7f]")  # a line browsers cut or refuse
_MAX_ATTR: Final = 1024  # bytes: browsers ignore a longer attribute value (RFC 6265bis §5.6)


def refused(hop_by_hop: frozenset[str], mcp: bool) -> frozenset[str]:
    """Every header name not relayed: ``hop_by_hop`` (``HOP_BY_HOP`` unless ``Connection`` named more)
    and ``DROP`` (``MCP_DROP``): the precomputed union for the usual answer."""
    if hop_by_hop is HOP_BY_HOP:
        return _MCP_REFUSED if mcp else _REFUSED
    return hop_by_hop | (MCP_DROP if mcp else DROP)


def _own(cookie_name: str) -> bool:
    """One of the sidecar's cookies (the console session, the consent CSRF cookie)?"""
    n = cookie_name.strip().lower()
    if n.startswith("__"):
        n = n.removeprefix("__host-").removeprefix("__secure-")
    return n.startswith(_OWN_COOKIE)


def _prompts(challenge: str) -> bool:
    """Does this ``WWW-Authenticate`` value name a scheme browsers ask a person for credentials with?"""
    return any((c.split(None, 1) or ("",))[0].lower() in _PROMPTING for c in challenge.split(","))


def _aimed(set_cookie: str) -> bool:
    """A cookie whose ``Path`` lies in the sidecar's own folders (``/oauth``, ``/.well-known/oauth-``):
    it could only be meant for the sidecar's pages (a cookie bomb there locks the consent page out)."""
    for attr in set_cookie.split(";")[1:]:
        name, _, value = attr.partition("=")
        if name.strip().lower() == "path" and value.strip().lower().startswith(_OWN_PATHS):
            return True
    return False


@lru_cache(maxsize=256)
def _base(url: str) -> str:
    """The upstream URL's own path (``/mcp`` of ``http://host:8000/mcp``), which prefixes every path it is sent."""
    return urlsplit(url).path.rstrip("/")


def scoped(set_cookie: str, prefix: str, strip: bool, base: str = "") -> str | None:
    """``set_cookie`` kept inside the folder ``prefix`` (not ``/``) of an upstream that strips it (or
    not) and is sent its paths under ``base`` (its URL's path): ``Domain`` removed, one ``Path``
    last; ``None`` to drop the line (a control character)."""
    if _CTL.search(set_cookie):
        return None
    first, *attrs = set_cookie.split(";")
    path: str | None = None
    kept = [first]
    for attr in attrs:
        name, _, value = attr.partition("=")
        lname = name.strip(_WSP).lower()
        if lname == "path":
            path = value.strip(_WSP)  # the last one is the one browsers use
        elif lname != "domain":
            kept.append(attr)
    if path and path[0] == "/" and (not base or path == base or path.startswith(base + "/")):
        path = path[len(base) :] or "/"  # the path as the upstream's client side sees it
        if strip:
            path = prefix if path == "/" else prefix + path
        elif path != prefix and not path.startswith(prefix + "/"):
            path = prefix
    else:  # none, empty, quoted, relative (the browser would use the request's folder), or outside the URL's path
        path = prefix
    if len(path.encode()) > _MAX_ATTR:
        path = prefix
    kept.append(f" Path={path}")
    return ";".join(kept)


def answer_headers(
    mcp: bool, headers: CIMultiDict[str], path: str = "/", prefix: str = "/", strip: bool = True, url: str = ""
) -> None:
    """The additions (and ``Set-Cookie`` removals) above, on a relayed answer's headers (``DROP`` is
    applied while they are copied); ``path`` is the client's, ``prefix`` the upstream's path prefix
    (only an HTML answer and cookies look at them), ``strip`` its ``strip_prefix``, ``url`` its URL.
    A dict lookup and a set test for most answers."""
    if "Set-Cookie" in headers:
        kept = [v for v in headers.getall("Set-Cookie") if not (_own(v.split("=", 1)[0]) or _aimed(v))]
        if prefix != "/":  # kept in the upstream's folder: no reaching a sibling upstream
            base = _base(url)
            kept = [c for v in kept if (c := scoped(v, prefix, strip, base)) is not None]
        headers.popall("Set-Cookie")
        for v in kept:
            headers.add("Set-Cookie", v)
    if "WWW-Authenticate" in headers and any(_prompts(v) for v in headers.getall("WWW-Authenticate")):
        kept = [v for v in headers.getall("WWW-Authenticate") if not _prompts(v)]
        headers.popall("WWW-Authenticate")
        for v in kept:
            headers.add("WWW-Authenticate", v)
    if mcp:
        headers["X-Content-Type-Options"] = "nosniff"
        _sandbox(headers)
        return
    ctype = headers.get("Content-Type", "")
    mime = ctype.split(";", 1)[0].strip().lower() if ctype else ""
    if mime in _ACTIVE or mime.endswith("+xml") or (mime == "text/html" and not _plex_web(path, prefix)):
        _sandbox(headers)
    elif mime in _UNKNOWN:
        headers["X-Content-Type-Options"] = "nosniff"


def _plex_web(path: str, prefix: str) -> bool:
    """Is ``path`` in Plex Web's folder (``<prefix>/web``), the one place Plex serves a page to run?"""
    web = prefix.rstrip("/") + "/web"
    return path == web or path.startswith(web + "/")


def _sandbox(headers: CIMultiDict[str]) -> None:
    for name in _REPLACED:
        headers.popall(name, None)
    headers["Content-Security-Policy"] = SANDBOX


def upstream_cookie(value: str) -> str:
    """A client's ``Cookie`` header without the sidecar's own cookies ("" when nothing is left)."""
    if _OWN_COOKIE not in value:  # the sidecar sets its names in lower case, and reads them only so
        return value
    return "; ".join(p.strip() for p in value.split(";") if p.strip() and not _own(p.split("=", 1)[0]))


def worker_refusal(raw_path: str) -> Forbidden | None:
    """Refuse a service worker script whose scope could cover the whole origin or the consent page."""
    directory = raw_path[: raw_path.rfind("/") + 1]
    if directory in WORKER_FORBIDDEN:
        return Forbidden(
            "a service worker script from this folder would control the sidecar's own pages: "
            "serve it from the application's own folder"
        )
    return None
