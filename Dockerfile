# syntax=docker/dockerfile:1
#
# Sidecar's container image, in two stages:
#   build   - builds a wheel of every pinned dependency (deploy/requirements.lock)
#             and of Sidecar itself;
#   runtime - installs exactly those wheels, offline (--no-index --no-deps), into a
#             virtualenv, and runs as an unprivileged user.
# The runtime stage needs no compiler and holds no pip cache, wheel or source tree.
#
#   docker build -t sidecar .
#   docker run --read-only --tmpfs /tmp -p 8080:8080 \
#     -e PLEX_TOKEN -e SIDECAR_ADMIN_TOKEN -v sidecar-state:/var/lib/sidecar \
#     -v "$PWD/deploy/config/config.yaml:/etc/sidecar/config.yaml:ro" sidecar
#
# Works with a read-only root filesystem: bytecode is compiled at install time and
# the only thing written at run time is the SQLite state under /var/lib/sidecar.
# tests/test_deploy.py lints this file and replays its install steps in a venv.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# --------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src

# Dependencies first: this layer is rebuilt only when the lock changes.
COPY deploy/requirements.lock /wheels/requirements.lock
RUN pip wheel --no-deps --wheel-dir /wheels -r /wheels/requirements.lock

# Then Sidecar itself, with a pinned build backend instead of pip's floating one.
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN pip install setuptools==84.2.1 \
 && pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

# --------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="sidecar" \
      org.opencontainers.image.description="Reverse-proxy auth sidecar: scoped, expiring, revocable API keys in front of Plex and MCP servers" \
      org.opencontainers.image.licenses="MIT"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/sidecar \
    PATH=/opt/sidecar/bin:$PATH

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can check it and volumes can
# be prepared for it (fsGroup: 10001).
RUN groupadd --system --gid 10001 sidecar \
 && useradd --system --uid 10001 --gid sidecar --no-create-home \
        --home-dir /var/lib/sidecar --shell /usr/sbin/nologin sidecar \
 && mkdir -p /etc/sidecar /var/lib/sidecar \
 && chown sidecar:sidecar /var/lib/sidecar \
 && chmod 0750 /var/lib/sidecar

# The wheels are bind-mounted from the build stage, so none of them lands in a layer.
# --no-deps: the lock is the whole dependency set; `pip check` proves it is closed.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv --without-pip /opt/sidecar \
 && pip --python /opt/sidecar/bin/python install --no-index --find-links /wheels --no-deps \
        -r /wheels/requirements.lock /wheels/sidecar-*.whl \
 && pip --python /opt/sidecar/bin/python check

# A default config (Plex on the pod's loopback, SQLite in the volume); mount your own
# over it. Secrets come from the environment: PLEX_TOKEN, SIDECAR_ADMIN_TOKEN.
COPY --chmod=0444 deploy/config/config.yaml /etc/sidecar/config.yaml

USER 10001:10001
WORKDIR /var/lib/sidecar
VOLUME ["/var/lib/sidecar"]

# 8080: the proxy (clients). 9188: admin (/metrics, /healthz, /readyz, /admin/).
EXPOSE 8080 9188

# No curl in a slim image: the venv's Python asks /healthz, bypassing any HTTP(S)_PROXY.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u; r = u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:9188/healthz', timeout=4); sys.exit(0 if r.status == 200 else 1)"]

# Exec form: sidecar is PID 1 and receives SIGTERM itself, then drains connections
# for server.shutdown_grace (keep it below the orchestrator's stop timeout).
STOPSIGNAL SIGTERM
ENTRYPOINT ["sidecar"]
CMD ["serve", "-c", "/etc/sidecar/config.yaml"]
