"""schemathesis against ``/admin/openapi.json`` of a running sidecar.

Every operation the document describes gets schema-valid (positive) and schema-violating
(negative) requests, with the admin token. The answers must never be a 5xx, must use a
status code and content type the document declares, and must match its response schema.
Example counts are bounded (``ci`` profile: 25 per operation and mode) so the file runs
in seconds; ``--hypothesis-profile=deep`` multiplies them by 50.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from conftest import ADMIN_TOKEN, PLEX_TOKEN, base_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS
from sec_harness import ThreadedSidecar

from sidecar.admin.api import openapi_spec
from sidecar.demo import plex_like_app

# Labels such as "GET /admin/keys/{id}", from the document the code serves (the live one is fetched below).
OPERATIONS = sorted(
    f"{method.upper()} {path}"
    for path, item in openapi_spec()["paths"].items()
    for method in item
    if method in ("get", "post", "put", "patch", "delete")
)
CHECK_NAMES = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ThreadedSidecar, schemathesis.BaseSchema]]:
    tmp: Path = tmp_path_factory.mktemp("schemathesis")
    ts = ThreadedSidecar().start(
        lambda: plex_like_app(PLEX_TOKEN),
        lambda url: base_config(url, tmp, log={"access": "off"}),
        {"PLEX_TOKEN": PLEX_TOKEN, "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN},
        tmp,
    )
    ts.create_key(name="existing", permissions={"upstreams": ["plex"], "paths": ["plex:read"]})
    try:
        yield ts, schemathesis.openapi.from_url(ts.admin_url + "/admin/openapi.json")
    finally:
        ts.stop()


def _checks() -> list[object]:
    by_name = {c.__name__: c for c in CHECKS.get_all()}
    return [by_name[n] for n in CHECK_NAMES]


def _takes_input(label: str) -> bool:
    """Negative mode needs something to make invalid: a parameter, a body, or the credential
    (an unauthenticated operation with neither, `GET /admin/openapi.json`, has none)."""
    method, path = label.split(" ", 1)
    spec = openapi_spec()
    item = spec["paths"][path]
    op = item[method.lower()]
    secured = op.get("security", spec.get("security"))
    return bool(item.get("parameters") or op.get("parameters") or op.get("requestBody") or secured)


CASES = [
    pytest.param(label, mode, id=f"{label}-{name}")
    for label in OPERATIONS
    for mode, name in ((GenerationMode.POSITIVE, "positive"), (GenerationMode.NEGATIVE, "negative"))
    if mode is GenerationMode.POSITIVE or _takes_input(label)
]


@pytest.mark.parametrize(("label", "mode"), CASES)
def test_admin_api_conforms(
    live: tuple[ThreadedSidecar, schemathesis.BaseSchema], label: str, mode: GenerationMode
) -> None:
    """No 5xx, and every answer (designed errors included) is one the document describes."""
    ts, schema = live
    found = schema.find_operation_by_label(label)
    assert found is not None, f"{label} is served by the code but missing from the live /admin/openapi.json"
    strategy = found.as_strategy(generation_mode=mode)
    checks = _checks()
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    examples = max(5, settings.default.max_examples // 16)

    @given(case=strategy, with_auth=st.booleans() if mode is GenerationMode.POSITIVE else st.just(True))
    @settings(max_examples=examples, suppress_health_check=list(HealthCheck), deadline=None)
    def run(case: schemathesis.Case, with_auth: bool) -> None:
        case.call_and_validate(base_url=ts.admin_url, headers=headers if with_auth else {}, checks=checks, timeout=10)

    run()
