"""The experiments admin API: bearer auth, every status, and nothing written by a rejected request."""
from __future__ import annotations

import dataclasses
import time
import warnings

import pytest
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():   # the venv pins httpx, which this starlette still supports but warns about
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

import recstream.settings
from recstream.experiments.definition import loads
from recstream.experiments.store import ExperimentStore
from serving.admin import MAX_BODY_BYTES, admin_routes

AUTH = {"Authorization": "Bearer t0k"}
URL = "/api/v1/admin/experiments"
HOUR = 3600
NOW = int(time.time())   # one clock for every body, also those built at collection


def problems(r) -> list[str]:
    """The refusal's fields as the experiments' 'location: message' lines (serving/errors.py located)."""
    return [f"{f['field']}: {f['reason']}" for f in r.json()["fields"]]


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def body(layer: str = "L", traffic: float = 0.5, start: float | str | None = None, ranker: str = "x",
         **extra: object) -> dict:
    return {"layer": layer, "start": iso(NOW - HOUR) if start is None else start, "end": iso(NOW + 24 * HOUR),
            "traffic": traffic, "variants": [{"name": "control", "weight": 0.5},
                                             {"name": "b", "weight": 0.5, "changes": {"ranker": ranker}}], **extra}


@pytest.fixture
def setup(tmp_path):
    s = dataclasses.replace(recstream.settings.load({}), admin_token="t0k", experiments_file=tmp_path / "e.toml")
    store = ExperimentStore(s.experiments_file)
    return s, store, TestClient(Starlette(routes=admin_routes(s, store)))


@pytest.fixture
def client(setup):
    return setup[2]


@pytest.fixture
def file(setup):
    return setup[0].experiments_file


def test_disabled_without_a_token(tmp_path):
    s = dataclasses.replace(recstream.settings.load({}), experiments_file=tmp_path / "e.toml")
    client = TestClient(Starlette(routes=admin_routes(s, ExperimentStore(s.experiments_file))))
    r = client.get(URL, headers={"Authorization": "Bearer "})
    assert r.status_code == 403 and r.json() == {"error": "admin API disabled: set RECSTREAM_ADMIN_TOKEN"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "t0k"},
                                     {"Authorization": "Basic t0k"}, {"Authorization": "Bearer t0k0"}])
def test_missing_or_wrong_token_is_401(client, file, headers):
    for r in (client.get(URL, headers=headers), client.put(URL + "/a", json=body(), headers=headers)):
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "error" in r.json()
    assert not file.exists()


def test_create_read_replace_delete(client, file):
    r = client.get(URL, headers=AUTH)
    assert r.status_code == 200 and r.json() == {"revision": 0, "defaults": {}, "experiments": [], "file_error": None}
    r = client.put(URL + "/a", json=body(description="first"), headers=AUTH)
    assert r.status_code == 201, r.json()
    a = r.json()
    assert a["id"] == "a" and a["slice"] == [0.0, 0.5] and a["active"] is True and a["control"] == "control"
    assert a["variants"][1] == {"name": "b", "weight": 0.5, "changes": {"ranker": "x"}}
    assert loads(file.read_text()).get("a").description == "first"
    r = client.put(URL + "/a", json={**body(description="second"), "id": "a"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["description"] == "second"
    assert client.get(URL + "/a", headers=AUTH).json() == r.json()
    listing = client.get(URL, headers=AUTH).json()
    assert listing["revision"] == 2 and [e["id"] for e in listing["experiments"]] == ["a"]
    assert client.delete(URL + "/a?force=1", headers=AUTH).json() == {"deleted": "a"}
    assert client.get(URL + "/a", headers=AUTH).status_code == 404
    assert loads(file.read_text()).experiments == ()


def test_unknown_experiment_is_404(client):
    for r in (client.get(URL + "/x", headers=AUTH), client.delete(URL + "/x", headers=AUTH)):
        assert r.status_code == 404 and r.json() == {"error": "unknown experiment 'x'"}


def test_reads_follow_edits_of_the_file(client, file):
    client.put(URL + "/a", json=body(), headers=AUTH)
    file.write_text(file.read_text().replace('description = ""', 'description = "by hand"'))
    assert client.get(URL + "/a", headers=AUTH).json()["description"] == "by hand"


@pytest.mark.parametrize("path, payload, status, problem", [
    ("/a", body(traffic=2), 400, "body.traffic:"),
    ("/a", body(start="2025-01-01T00:00:00"), 400, "body.start:"),
    ("/a", {**body(), "variants": [{"name": "control", "weight": 0.4}]}, 400, "body.variants:"),
    ("/a", {**body(), "id": "b"}, 400, "body.id:"),
    ("/a b", body(), 400, "body.id:"),
    ("/a", [1, 2], 400, "body:"),
    ("/b", body(traffic=0.6), 409, "cannot fit 'b'"),                      # beside a (0.5) in layer L
    ("/b", body(layer="M"), 409, "both change ranker"),                    # a unit in a and b: colliding rankers
    ("/a", body(traffic=0.4), 409, "is running: changing its traffic"),
    ("/a", body(start=iso(NOW - 60)), 409, "is running: changing its start"),
])
def test_rejected_puts_leave_the_file_unchanged(client, file, path, payload, status, problem):
    client.put(URL + "/a", json=body(), headers=AUTH)
    before = file.read_bytes()
    r = client.put(URL + path, json=payload, headers=AUTH)
    assert r.status_code == status, r.json()
    assert r.json()["error"] and any(problem in p for p in problems(r)), r.json()
    assert file.read_bytes() == before


def test_force_allows_changing_a_running_experiment(client):
    client.put(URL + "/a", json=body(), headers=AUTH)
    r = client.put(URL + "/a?force=1", json=body(traffic=0.4), headers=AUTH)
    assert r.status_code == 200 and r.json()["traffic"] == 0.4


def test_running_experiment_may_change_its_description_and_end(client):
    client.put(URL + "/a", json=body(), headers=AUTH)
    r = client.put(URL + "/a", json=body(description="why", end=iso(time.time() + 48 * HOUR)), headers=AUTH)
    assert r.status_code == 200 and r.json()["description"] == "why"


def test_delete_of_a_running_experiment_needs_force(client, file):
    client.put(URL + "/a", json=body(), headers=AUTH)
    before = file.read_bytes()
    r = client.delete(URL + "/a", headers=AUTH)
    assert r.status_code == 409 and "is running" in problems(r)[0]
    assert file.read_bytes() == before


def test_malformed_json_and_oversized_bodies(client, file):
    r = client.put(URL + "/a", content=b'{"id": ', headers=AUTH)
    assert r.status_code == 400 and r.json()["error"].startswith("body: not valid JSON")
    big = {**body(), "description": "x" * MAX_BODY_BYTES}
    assert client.put(URL + "/a", json=big, headers=AUTH).status_code == 413
    r = client.put(URL + "/a", content=iter([b"[" + b" " * MAX_BODY_BYTES, b"]"]), headers=AUTH)   # no length
    assert r.status_code == 413 and not file.exists()


def test_defaults(client, file):
    r = client.put("/api/v1/admin/defaults", json={"ranker": "champion", "sources": ["als"]}, headers=AUTH)
    assert r.status_code == 200 and r.json() == {"revision": 1, "defaults": {"sources": ["als"], "ranker": "champion"}}
    assert client.get(URL, headers=AUTH).json()["defaults"] == {"sources": ["als"], "ranker": "champion"}
    before = file.read_bytes()
    r = client.put("/api/v1/admin/defaults", json={"candidates": 0, "nope": 1}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"] == "invalid defaults" and len(r.json()["fields"]) == 2
    assert file.read_bytes() == before


def test_a_broken_file_is_reported_and_not_written_over(client, file):
    client.put(URL + "/a", json=body(), headers=AUTH)
    file.write_text("version = 1\nexperiments = 3\n")
    listing = client.get(URL, headers=AUTH).json()
    assert [e["id"] for e in listing["experiments"]] == ["a"] and "array of tables" in listing["file_error"]
    r = client.put("/api/v1/admin/defaults", json={}, headers=AUTH)
    assert r.status_code == 409 and "file is invalid" in problems(r)[0]
    assert file.read_text() == "version = 1\nexperiments = 3\n"
