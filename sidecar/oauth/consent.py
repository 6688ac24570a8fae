"""The consent page and the authorization error page: plain HTML, no script, strict CSP.

Everything shown is escaped. The page names the client, says whether its name is
vouched for (a client from the config file) or self-declared, and shows the host its
answer goes to, so a person can spot a look-alike. Not frameable (``frame-ancestors
'none'``, ``X-Frame-Options: DENY``); the one stylesheet is allowed by its hash.
"""

from __future__ import annotations

import base64
import hashlib
import re
from html import escape
from urllib.parse import urlsplit

from aiohttp import web

from ..auth.permissions import literal_glob

__all__ = ["LIFETIMES", "consent_page", "csrf_cookie", "error_page"]

LIFETIMES = (("1h", 3600.0), ("1 day", 86400.0), ("7 days", 7 * 86400.0), ("30 days", 30 * 86400.0),
             ("90 days", 90 * 86400.0))  # fmt: skip

_STYLE = (
    "body{font:15px/1.5 system-ui,sans-serif;max-width:36rem;margin:3rem auto;padding:0 1rem;color:#222}"
    "h1{font-size:1.3rem}.box{border:1px solid #ccc;border-radius:6px;padding:1rem;margin:1rem 0}"
    "label{display:block;margin:.8rem 0 .2rem;font-weight:600}input,select{width:100%;padding:.4rem;"
    "box-sizing:border-box}.warn{color:#8a5300}.err{color:#b00020;font-weight:600}button{padding:.5rem 1.2rem;"
    "margin:1rem .5rem 0 0}code{background:#f3f3f3;padding:0 .2rem}input[type=checkbox]{width:auto}"
)
_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+$")
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()


def _headers(form_action: str = "'self'") -> dict[str, str]:
    return {
        "Content-Security-Policy": (
            f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; form-action {form_action}; "
            "frame-ancestors 'none'; base-uri 'none'"
        ),
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
    }


def csrf_cookie(secure: bool) -> str:
    """The CSRF cookie's name: ``__Host-`` prefixed behind https (browsers refuse it from anyone but the host)."""
    return "__Host-sidecar_oauth_csrf" if secure else "sidecar_oauth_csrf"


def _page(title: str, body: str) -> str:
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width"><style>{_STYLE}</style></head><body>{body}</body></html>'
    )


def error_page(message: str, status: int = 400, back_to: str | None = None) -> web.Response:
    """An authorization request that cannot be answered at its redirect URI (RFC 6749 §4.1.2.1), or
    whose error goes back to a client not vouched for: then only by a link the person follows."""
    body = f"<h1>This authorization request cannot continue</h1><p class=err>{escape(message)}</p>"
    if back_to is not None:
        host = escape(urlsplit(back_to).netloc)
        link = f'<a id=back href="{escape(back_to)}">Return to {host}</a>'
        body += f"<p>The application that sent you here is at <b>{host}</b>. {link}</p>"
    return web.Response(text=_page("Authorization error", body), status=status, content_type="text/html",
                        headers=_headers("'none'"))  # fmt: skip


def consent_page(
    *,
    action: str,
    request_id: str,
    csrf: str,
    client_name: str,
    client_id: str,
    vouched: bool,
    redirect_uri: str,
    resource: str,
    max_lifetime: float,
    error: str = "",
    status: int = 200,
    secure_cookie: bool,
    tools: list[str] | None = None,
    step: str = "key",
    console_url: str | None = None,
) -> web.Response:
    """Step ``key``: the person proves their right with an API key and picks a lifetime.
    Step ``tools``: they tick the tools to allow among those the key may use (``tools``;
    None when the upstream could not list them: a text field instead)."""
    host = urlsplit(redirect_uri).netloc
    who = escape(client_name or client_id)
    note = "" if vouched else "<p class=warn>This name was given by the application itself; check the address.</p>"
    err = f"<p class=err>{escape(error)}</p>" if error else ""
    if step == "key":
        options = (
            "".join(
                f'<option value="{int(sec)}"{" selected" if i == 2 else ""}>{escape(label)}</option>'
                for i, (label, sec) in enumerate(LIFETIMES)
                if sec <= max_lifetime
            )
            or f'<option value="{int(max_lifetime)}">{int(max_lifetime)} seconds</option>'
        )
        fields = f"""<label for=k>Your API key (proves you may grant this; it is not given to the application)</label>
<input id=k name=api_key type=password autocomplete=off required>
<label for=l>For how long</label><select id=l name=lifetime>{options}</select>
<button name=decision value=continue>Continue</button><button name=decision value=deny>Deny</button>"""
        if console_url:  # the console is another origin: it answers this same request (oauth/approve.py)
            href = escape(f"{console_url}/oauth/consent/{request_id}")
            fields += f"""<p>Or, signed in to the Sidecar console:
<a id=console href="{href}">Approve from the console</a> (choose the key, tools and lifetime there).</p>"""
    else:
        if tools is None:
            choice = """<label for=t>Tools to allow (names, comma separated)</label><input id=t name=tools>"""
        else:
            choice = (
                "".join(
                    f'<label><input type=checkbox name=tool value="{escape(literal_glob(t))}"> {escape(t)}</label>'
                    for t in tools  # the value matches that tool only, whatever its name (``*``)
                )
                or "<p>The server lists no tool this key may use.</p>"
            )
        fields = f"""<p>Tools to allow (only those your key may use are listed):</p>{choice}
<label><input type=checkbox name=all_tools value=1> every tool your key may use, now and later</label>
<button name=decision value=allow>Allow</button><button name=decision value=deny>Deny</button>"""
    body = f"""<h1>Allow {who} to use your MCP tools?</h1>
<div class=box><p><b>{who}</b> (<code>{escape(client_id)}</code>) asks for access to
<code>{escape(resource)}</code>.</p>{note}
<p>If you allow it, you will be sent back to <b>{escape(host)}</b>.</p></div>{err}
<form method=post action="{escape(action)}">
<input type=hidden name=request_id value="{escape(request_id)}"><input type=hidden name=csrf value="{escape(csrf)}">
{fields}
</form>"""
    target = f"{urlsplit(redirect_uri).scheme}://{host}"
    form_action = "'self' " + target if _ORIGIN.match(target) else "'self'"  # nothing that could end the directive
    response = web.Response(text=_page("Authorize access", body), status=status, content_type="text/html",
                            headers=_headers(form_action))  # fmt: skip
    # __Host-: behind https only the host itself can set it (Secure, Path=/, no Domain): no sibling host tosses one in
    response.set_cookie(csrf_cookie(secure_cookie), csrf, httponly=True, samesite="Strict", secure=secure_cookie,
                        path="/", max_age=900)  # fmt: skip
    return response
