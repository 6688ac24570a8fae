"""Sidecar: a reverse-proxy auth sidecar for Plex Media Server and MCP servers.

Public API: ``load_config``/``parse_config`` to read a config, ``Sidecar`` to build one
running instance (it owns everything), ``create_apps``/``running``/``serve`` to run it.
"""

from .app import Sidecar, create_apps, running, serve
from .config import Config, ConfigError, load_config, parse_config

__all__ = ["Config", "ConfigError", "Sidecar", "create_apps", "load_config", "parse_config", "running", "serve"]
__version__ = "0.1.0"
