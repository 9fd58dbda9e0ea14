"""The explorer's HTTP API on a real local server: answers, page-ready errors, and it keeps serving."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from urllib.parse import urlencode

import pytest

from minterp_tl.explorer import Explorer
from minterp_tl.explorer.server import App, make_server

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server(smollm2, toys, hf_model):
    def loader(name: str):
        if name in ("toy-ln", "tiny-gpt2"):
            return toys["ln"] if name == "toy-ln" else hf_model("gpt2")
        raise ValueError(f"no model called {name!r} here")

    app = App(Explorer(smollm2), loader=loader)
    httpd = make_server(app)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]
    yield app, f"http://{host}:{port}"
    httpd.shutdown()
    httpd.server_close()


def _get(base: str, action: str, **params):
    url = f"{base}/api/{action}?{urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _post(base: str, action: str, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}/api/{action}", data=data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_local_only_and_answers(server):
    app, base = server
    assert base.startswith("http://127.0.0.1:")
    status, run = _post(base, "run", {"prompt": PROMPT})
    assert status == 200 and run["prediction"][0]["token"] == " Paris"
    status, graph = _get(base, "graph", threshold=0.04)
    assert status == 200 and graph["paths"] and graph["edges"]
    assert graph == app.explorer.graph(threshold=0.04)  # the API is the explorer's answer, as JSON
    status, edge = _get(base, "edge", layer=23, target=5, source=4)
    assert status == 200 and edge["heads"][0]["head"] == app.explorer.edge(23, 5, 4)["heads"][0]["head"]
    status, patch = _get(base, "patch", corrupted="The capital of Italy is")
    assert status == 200 and patch["corrupted_answer"] == " Rome"


def test_errors_are_messages_and_the_server_keeps_serving(server, monkeypatch):
    app, base = server
    _post(base, "run", {"prompt": PROMPT})
    cases = [
        (_post(base, "run", {"prompt": ""}), 400, "the prompt is empty"),
        (_post(base, "run", {"prompt": "word " * 100}), 400, "at most 64 are accepted"),
        (
            _get(base, "patch", corrupted="The capital of the Republic of Italy is"),
            400,
            "same number of tokens",
        ),
        (_get(base, "representation", layer="x", pos=0), 400, "parameter 'layer' must be an integer"),
        (_get(base, "edge", layer=3, target=2), 400, "missing parameter 'source'"),
        (_get(base, "frobnicate"), 400, "unknown action 'frobnicate'"),
        (_post(base, "run", b"[1, 2"), 400, "must be a JSON object"),
        (_post(base, "model", {"name": "gpt-17"}), 400, "could not load model 'gpt-17'"),
    ]
    for (status, body), expected_status, message in cases:
        assert status == expected_status and message in body["error"], body

    def broken():
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(app.explorer, "lens", broken)
    status, body = _get(base, "lens")
    assert status == 500 and "RuntimeError: disk on fire" in body["error"]
    monkeypatch.undo()
    status, body = _get(base, "representation", layer=29, pos=-1)  # still serving, same prompt
    assert status == 200 and body["top"][0]["token"] == " Paris"
    with urllib.request.urlopen(f"{base}/api/info", timeout=10) as response:
        assert json.loads(response.read())["prompt"] == PROMPT
    with urllib.request.urlopen(f"{base}/static/app.js", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/javascript")
    for path in ("/static/../../etc/passwd", "/nothing.txt", "/static/missing.js", "/elsewhere/app.js"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + path, timeout=10)
        assert err.value.code == 404


def test_switching_model(server, smollm2):
    app, base = server
    status, body = _post(base, "model", {"name": "toy-ln"})
    assert status == 400 and "has no tokenizer" in body["error"]
    status, body = _post(base, "model", {"name": "tiny-gpt2"})
    assert status == 200 and body["n_layers"] == 2
    assert _get(base, "graph")[1]["error"] == "run a prompt first"
    status, run = _post(base, "run", {"prompt": "The capital of France is"})
    assert status == 200 and run["n_layers"] == 2
    assert _get(base, "graph")[0] == 200
    app.explorer = Explorer(smollm2)  # back to SmolLM2 for the other tests
