"""The web console on the admin listener: keys, usage and activity in a browser (docs/console.md).

Server-rendered pages (Jinja2 templates in ``templates/``) with one small script and one
stylesheet in ``static/``, all inside the package: nothing from a CDN, nothing built at
install time, works with no internet. ``mount`` adds its routes to the admin app, next to
``/admin/*`` (whose code it calls for every change), ``/metrics`` and health.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from .activity import activity_page
from .routes import CONSOLE, Console, default_headers, page, sign_in, sign_in_once, sign_in_page, sign_out, static
from .views import edit_key, key_page, keys_page, new_key, revoke_key, rotate_key, tools_json

if TYPE_CHECKING:
    from .host import ConsoleHost

__all__ = ["CONSOLE", "Console", "mount"]


def mount(app: web.Application, sc: ConsoleHost) -> Console:
    """Serve the console at / of ``app`` (the admin app); returns it (``sidecar demo`` issues its link)."""
    console = Console(sc)
    app[CONSOLE] = console
    r = app.router
    r.add_get("/", page(keys_page))
    r.add_get("/signin", sign_in_page)
    r.add_post("/signin", sign_in)
    r.add_get("/signin/once/{token}", sign_in_once, allow_head=False)  # a HEAD (link preview) must not spend it
    r.add_post("/signout", page(sign_out))
    r.add_get("/keys/new", page(new_key))
    r.add_post("/keys/new", page(new_key))
    r.add_get("/keys/{id}", page(key_page))
    r.add_get("/keys/{id}/edit", page(edit_key))
    r.add_post("/keys/{id}/edit", page(edit_key))
    r.add_post("/keys/{id}/rotate", page(rotate_key))
    r.add_get("/keys/{id}/revoke", page(revoke_key))
    r.add_post("/keys/{id}/revoke", page(revoke_key))
    r.add_get("/activity", page(activity_page))
    r.add_get("/console/tools/{upstream}", page(tools_json))
    r.add_get("/static/{name}", static)
    console.env.globals["oauth_nav"] = sc.oauth is not None
    if sc.oauth is not None:
        from .oauthviews import mount_oauth

        mount_oauth(app)  # grants on key pages, the clients page, approving from the console

    app.on_response_prepare.append(default_headers)  # the router's 404/405, the admin API's JSON: the same origin

    async def close(_: web.Application) -> None:
        await console.tools.close(list(sc.config.upstreams))

    app.on_cleanup.append(close)
    return console
