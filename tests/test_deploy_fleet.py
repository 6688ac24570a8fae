"""The fleet deployment examples: Kubernetes overlay (3 replicas, PostgreSQL, Redis) and
compose.fleet.yaml, checked offline. The overlay is rendered by the real kustomize and
validated with the other overlays in tests/test_deploy.py (KUSTOMIZATIONS); here, what ties
the fleet together: replicas, URLs that point at the services that exist, secrets that come
from the Secret, data stores that only the sidecars can reach, configs that load."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from conftest import require_binary
from test_deploy import COMPOSE, K8S, _by_kind, _env_names, _yaml_docs, render

from sidecar.config import load_config

FLEET = K8S / "overlays" / "fleet"
FLEET_CONFIG = FLEET / "config.yaml"
COMPOSE_FLEET = COMPOSE / "compose.fleet.yaml"
COMPOSE_CONFIG = COMPOSE / "fleet" / "config.yaml"
ENV = {"MCP_UPSTREAM_TOKEN": "mcp", "SIDECAR_ADMIN_TOKEN": "admin", "SIDECAR_DATABASE_URL": "postgresql://u:p@h/d"}


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return render("overlays/fleet")


def _named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in _by_kind(docs, kind) if d["metadata"]["name"] == name]
    return doc


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_fleet_overlay_runs_three_replicas_on_postgres_and_redis(docs: list[dict[str, Any]]) -> None:
    deploy = _named(docs, "Deployment", "sidecar")
    spec = deploy["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    pod = spec["template"]["spec"]
    (sc,) = [c for c in pod["initContainers"] if c["name"] == "sidecar"]
    # No claim: a ReadWriteOnce volume cannot be shared by three pods, and nothing needs one.
    assert not _by_kind(docs, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(volumes["state"]) == {"name", "emptyDir"}

    # The config the pods mount is the overlay's, and it loads.
    cm_name = volumes["config"]["configMap"]["name"]
    assert cm_name.startswith("sidecar-config-")
    text = _named(docs, "ConfigMap", cm_name)["data"]["config.yaml"]
    assert text == FLEET_CONFIG.read_text(encoding="utf-8")
    cfg = load_config(FLEET_CONFIG, env=ENV)
    assert cfg.store.kind == "postgres" and cfg.rate_limits.backend == "redis"
    assert cfg.store.postgres is not None and cfg.store.postgres.dsn_env == "SIDECAR_DATABASE_URL"

    # Every variable the config needs is set; secrets come from the Secret, keys the example has.
    example_keys = set(_yaml_docs(K8S / "base" / "secret.example.yaml")[0]["stringData"])
    env = {e["name"]: e for e in sc["env"]}
    raw = yaml.safe_load(text)
    for name in _env_names(raw) | {raw["store"]["dsn_env"]}:
        assert name in env, f"the config needs ${name}"
    for e in sc["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == "sidecar-secrets" and ref["key"] in example_keys
    # The DSN: composed from the password variable defined BEFORE it (Kubernetes expands
    # $(VAR) only from earlier entries), pointing at the Service and port that exist.
    names = [e["name"] for e in sc["env"]]
    dsn = env["SIDECAR_DATABASE_URL"]["value"]
    assert "$(POSTGRES_PASSWORD)" in dsn and names.index("POSTGRES_PASSWORD") < names.index("SIDECAR_DATABASE_URL")
    url = urlsplit(dsn.replace("$(POSTGRES_PASSWORD)", "pw"))
    pg_svc = _named(docs, "Service", url.hostname or "")
    assert [p["port"] for p in pg_svc["spec"]["ports"]] == [url.port]
    pg = _named(docs, "StatefulSet", "sidecar-postgres")
    (pgc,) = pg["spec"]["template"]["spec"]["containers"]
    pg_env = {e["name"]: e for e in pgc["env"]}
    assert pg_env["POSTGRES_USER"]["value"] == url.username and pg_env["POSTGRES_DB"]["value"] == url.path[1:]
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"] == env["POSTGRES_PASSWORD"]["valueFrom"]
    assert _selects(pg_svc["spec"]["selector"], pg["spec"]["template"]["metadata"]["labels"])
    # Redis: the limiter's URL names the Service that exists.
    r = urlsplit(raw["rate_limits"]["redis_url"])
    redis_svc = _named(docs, "Service", r.hostname or "")
    assert [p["port"] for p in redis_svc["spec"]["ports"]] == [r.port]
    redis = _named(docs, "Deployment", "sidecar-redis")
    assert _selects(redis_svc["spec"]["selector"], redis["spec"]["template"]["metadata"]["labels"])


def test_fleet_data_stores_answer_the_sidecars_only(docs: list[dict[str, Any]]) -> None:
    sidecar_labels = _named(docs, "Deployment", "sidecar")["spec"]["template"]["metadata"]["labels"]
    sidecar_svc = _named(docs, "Service", "sidecar")
    for name, port in (("sidecar-postgres", 5432), ("sidecar-redis", 6379)):
        kind = "StatefulSet" if name == "sidecar-postgres" else "Deployment"
        labels = _named(docs, kind, name)["spec"]["template"]["metadata"]["labels"]
        # Not behind the sidecar's Service, not under the sidecar's NetworkPolicy.
        assert not _selects(sidecar_svc["spec"]["selector"], labels)
        policy = _named(docs, "NetworkPolicy", name)
        assert _selects(policy["spec"]["podSelector"]["matchLabels"], labels)
        (rule,) = policy["spec"]["ingress"]
        assert [p["port"] for p in rule["ports"]] == [port]
        (peer,) = rule["from"]
        assert set(peer) == {"podSelector"} and _selects(peer["podSelector"]["matchLabels"], sidecar_labels)
        for c in _named(docs, kind, name)["spec"]["template"]["spec"]["containers"]:
            sec = c["securityContext"]
            assert sec["runAsNonRoot"] and sec["readOnlyRootFilesystem"] and sec["capabilities"]["drop"] == ["ALL"]
            assert re.search(r":\d+\.\d+", c["image"]), f"{c['image']}: pin a version"


# --------------------------------------------------------------------------- compose


def _compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE_FLEET.read_text(encoding="utf-8")))


def test_compose_fleet_agrees_with_its_config() -> None:
    compose = _compose()
    svc = compose["services"]
    sc = svc["sidecar"]
    assert sc["deploy"]["replicas"] == 3 and sc["read_only"] and sc["cap_drop"] == ["ALL"]
    raw = yaml.safe_load(COMPOSE_CONFIG.read_text(encoding="utf-8"))
    cfg = load_config(COMPOSE_CONFIG, env=ENV)
    assert cfg.store.kind == "postgres" and cfg.rate_limits.backend == "redis"
    # Every variable the config needs is set on the replicas and on the migrate job.
    needed = _env_names(raw) | {raw["store"]["dsn_env"]}
    for name in ("sidecar", "migrate"):
        assert needed <= set(svc[name]["environment"]), name
        binds = [v.split(":") for v in svc[name]["volumes"]]
        assert [(COMPOSE / h).resolve() for h, c, *_ in binds if c == "/etc/sidecar/config.yaml"] == [
            COMPOSE_CONFIG.resolve()
        ]
    # The schema is migrated once, before the replicas; the replicas do not migrate.
    assert svc["migrate"]["command"][:2] == ["store", "migrate"]
    assert sc["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert raw["store"]["auto_migrate"] is False
    # URLs point at services of this file, on their ports; user and database agree.
    dsn = urlsplit(re.sub(r"\$\{\w+\}", "pw", sc["environment"]["SIDECAR_DATABASE_URL"]))
    pg_env = svc[dsn.hostname or ""]["environment"]
    assert dsn.port == 5432 and pg_env["POSTGRES_USER"] == dsn.username and pg_env["POSTGRES_DB"] == dsn.path[1:]
    assert urlsplit(raw["rate_limits"]["redis_url"]).hostname in svc
    assert urlsplit(raw["upstreams"][0]["url"]).hostname in svc
    # Only nginx publishes a port; the data stores and the MCP server sit on the internal network.
    published = {name for name, s in svc.items() if s.get("ports")}
    assert published == {"nginx"}
    assert compose["networks"]["backend"]["internal"] is True
    for name in ("postgres", "redis", "mcp-server"):
        assert svc[name]["networks"] == ["backend"], name
    conf = (COMPOSE / "fleet" / "nginx.conf").read_text(encoding="utf-8")
    port = raw["listen"].rpartition(":")[2]
    assert re.search(rf"server sidecar:{port}\b", conf) and "listen 8080;" in conf
    assert svc["nginx"]["ports"] == ["8080:8080"]
    example = (COMPOSE / "fleet" / "fleet.env.example").read_text(encoding="utf-8")
    for var in set(re.findall(r"\$\{(\w+)", COMPOSE_FLEET.read_text(encoding="utf-8"))):
        assert re.search(rf"^{var}=", example, re.M), f"fleet.env.example lacks {var}"


def test_compose_fleet_nginx_config_passes_nginx_t(tmp_path: Path) -> None:
    nginx = require_binary("nginx")
    conf = (COMPOSE / "fleet" / "nginx.conf").read_text(encoding="utf-8")
    (tmp_path / "fleet.conf").write_text(conf.replace("server sidecar:", "server 127.0.0.1:"))  # no Docker DNS here
    (tmp_path / "logs").mkdir()
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  include {tmp_path}/fleet.conf;\n}}\n"
    )
    done = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
