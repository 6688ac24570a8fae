"""Sidecar: a reverse-proxy auth sidecar for Plex Media Server and MCP servers.

Public API: ``load_config``/``parse_config`` to read a config, ``Sidecar`` to build one
running instance (it owns everything), ``create_apps``/``running``/``serve`` to run it.

Imported on first use (PEP 562): ``sidecar.app`` pulls in the whole proxy, ~0.25 s, and a
CLI command such as ``sidecar keys create`` or ``sidecar config check`` needs none of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import Sidecar, create_apps, running, serve
    from .config import Config, ConfigError, load_config, parse_config

__all__ = ["Config", "ConfigError", "Sidecar", "create_apps", "load_config", "parse_config", "running", "serve"]
__version__ = "0.1.0"

_FROM_APP = frozenset({"Sidecar", "create_apps", "running", "serve"})


def __getattr__(name: str) -> Any:
    if name in _FROM_APP:
        from . import app

        return getattr(app, name)
    if name in __all__:
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'sidecar' has no attribute {name!r}")
