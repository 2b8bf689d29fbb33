"""One error body for every HTTP route (serving/errors.py): each operation of the OpenAPI description
documents it for every error status, and the app, admin routes included, answers with it: every
path and method is sent requests that fail, with every status from 400 to 503 among them."""
from __future__ import annotations

import dataclasses
import time
import warnings

import orjson
import pytest
from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():   # the venv pins httpx, which this starlette still supports but warns about
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

import recstream.settings
from serving import app as app_module
from serving import params
from serving.app import create_app
from serving.errors import SCHEMA

TOKEN = "t0k"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"content-type": "application/json"}
PROBE_KEYS = {"status", "model_version"}   # /healthz and /readyz keep their probe fields beside the error
ERROR_REF = {"$ref": "#/components/schemas/Error"}


def check_shape(path: str, r) -> None:
    body = r.json()
    extra = PROBE_KEYS if path in ("/healthz", "/readyz") else set()
    assert isinstance(body, dict) and set(body) <= {"error", "fields"} | extra, (path, r.status_code, body)
    assert isinstance(body["error"], str) and body["error"], (path, r.status_code, body)
    if "fields" in body:
        assert body["fields"] and all(set(f) == {"field", "reason"} and isinstance(f["field"], str)
                                      and isinstance(f["reason"], str) for f in body["fields"]), body


def test_every_documented_error_is_the_one_schema():
    doc = params.openapi()
    assert doc["components"]["schemas"]["Error"] == SCHEMA
    documented = set()
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if int(status) < 400:
                    continue
                schema = response["content"]["application/json"]["schema"]
                assert schema == ERROR_REF or ERROR_REF in schema.get("allOf", []), (path, method, status, schema)
                documented.add(int(status))
    assert {400, 401, 403, 404, 409, 413, 415, 422, 500, 503} <= documented


@pytest.fixture
def app_settings(tmp_path):
    return dataclasses.replace(recstream.settings.load({}), admin_token=TOKEN, home_dir=tmp_path / "home",
                               experiments_file=tmp_path / "experiments.toml")


def _experiment(start_s: float) -> dict:
    def iso(t: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
    return {"layer": "L", "start": iso(start_s), "end": iso(start_s + 86400), "traffic": 0.5,
            "variants": [{"name": "control", "weight": 0.5}, {"name": "b", "weight": 0.5, "changes": {"ranker": "x"}}]}


def failing_requests(s) -> list[tuple[str, str, str, dict, bytes | None]]:
    """(openapi path, method, url, headers, body) of requests that each route refuses, one per cause."""
    admin = params.ADMIN_PREFIX
    out = [("/api/v1/recommendations/homepage", "GET", "/api/v1/recommendations/homepage?bogus=1", {}, None),  # 400
           ("/api/v1/recommendations/similar", "GET", "/api/v1/recommendations/similar", {}, None),            # 400
           ("/api/v1/recommendations/{kind}", "GET", "/api/v1/recommendations/nope?user_id=u", {}, None),      # 404
           ("/api/v1/events", "POST", "/api/v1/events", {"content-type": "text/plain"}, b"{}"),                 # 415
           ("/api/v1/events", "POST", "/api/v1/events", JSON, b"{not json"),                                    # 400
           ("/api/v1/events", "POST", "/api/v1/events", JSON, b'{"user_id": 3}'),                               # 422
           ("/api/v1/events", "POST", "/api/v1/events", JSON, b" " * (s.http_max_body_bytes + 1)),              # 413
           ("/healthz", "GET", "/healthz", {}, None),                                  # 503: no lifespan, no Kafka
           ("/readyz", "GET", "/readyz", {}, None),                                    # 503
           (f"{admin}/experiments", "GET", f"{admin}/experiments", {}, None),          # 401
           (f"{admin}/experiments/{{id}}", "GET", f"{admin}/experiments/nope", AUTH, None),                     # 404
           (f"{admin}/experiments/{{id}}", "PUT", f"{admin}/experiments/a", AUTH, b"[1]"),                      # 400
           (f"{admin}/experiments/{{id}}", "PUT", f"{admin}/experiments/a", AUTH,
            orjson.dumps({**_experiment(time.time() - 3600), "variants": []})),                                # 400 fields
           (f"{admin}/experiments/{{id}}", "DELETE", f"{admin}/experiments/running", AUTH, None),              # 409
           (f"{admin}/defaults", "PUT", f"{admin}/defaults", AUTH, b'{"nope": 1}'),                             # 400
           ("/api/v1/unknown", "GET", "/api/v1/unknown", {}, None)]                                          # 404 no route
    # and every documented path with a method it does not take: 405
    for path in params.openapi()["paths"]:
        url = path.replace("{kind}", "homepage").replace("{id}", "x")
        out.append((path, "PATCH", url, AUTH, None))
    return out


def test_every_route_answers_errors_in_the_one_shape(app_settings, monkeypatch):
    app = create_app(app_settings)   # no lifespan: every refusal here comes before Kafka
    seen: dict[int, set[str]] = {}
    client = TestClient(app, raise_server_exceptions=False)
    assert client.put(f"{params.ADMIN_PREFIX}/experiments/running", content=orjson.dumps(
        _experiment(time.time() - 3600)), headers=AUTH).status_code == 201
    for path, method, url, headers, body in failing_requests(app_settings):
        r = client.request(method, url, headers=headers, content=body)
        assert r.status_code >= 400, (method, url, r.status_code, r.text)
        check_shape(path, r)
        seen.setdefault(r.status_code, set()).add(f"{method} {path}")

    def boom(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(app_module.params, "parse", boom)
    r = client.get("/api/v1/recommendations/homepage")
    assert r.status_code == 500 and r.json() == {"error": "Internal Server Error"}
    seen.setdefault(500, set()).add("GET /api/v1/recommendations/{kind}")
    assert {400, 401, 404, 405, 409, 413, 415, 422, 500, 503} <= set(seen), seen
    # every documented path was refused at least once
    assert {p.split(" ", 1)[1] for ps in seen.values() for p in ps} >= set(params.openapi()["paths"])


def test_a_disabled_admin_api_answers_403_in_the_one_shape(app_settings):
    client = TestClient(create_app(dataclasses.replace(app_settings, admin_token="")))
    r = client.get(f"{params.ADMIN_PREFIX}/experiments", headers=AUTH)
    assert r.status_code == 403
    check_shape(f"{params.ADMIN_PREFIX}/experiments", r)
