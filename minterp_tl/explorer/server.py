"""The explorer's local web server: the page, its static files, and a JSON API over :class:`Explorer`.

Python's standard ``http.server`` (threaded), no web framework and nothing loaded from the internet: the
page and its script come from this package. It listens on ``127.0.0.1`` unless told otherwise. Requests
are answered one at a time (the model is not shared between threads); bad input is a ``400`` with
``{"error": message}``, any other failure a ``500`` with the same shape, and the server keeps serving.

API (``GET /api/<action>?...``; ``run``, ``patch`` and ``model`` change the state and also accept
``POST`` with a JSON body):

=================  ===============================================================
``model``          ``name``: load another model (as :func:`minterp_tl.models.load_model`)
``run``            ``prompt``
``graph``          ``token``, ``threshold``, ``distance_norm``
``representation`` ``layer`` (-1: embeddings), ``pos``
``head``           ``layer``, ``pos``, ``head``
``edge``           ``layer``, ``target``, ``source``, ``distance_norm``
``ffn``            ``layer``, ``pos``
``neuron``         ``layer``, ``neuron``
``lens``           (none)
``patch``          ``corrupted``
``patched_lens``   ``corrupted``, ``layer``, ``pos``
=================  ===============================================================
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qs, urlparse

from minterp_tl.explorer.session import Explorer

STATIC = Path(__file__).resolve().parent / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css"}
_NAME = re.compile(r"^[a-z0-9_\-]+\.(html|js|css)$")
MAX_BODY = 1 << 16


def _int(params: dict[str, str], name: str, default: Optional[int] = None) -> int:
    value = params.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"missing parameter {name!r}")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"parameter {name!r} must be an integer, got {value!r}") from None


def _float(params: dict[str, str], name: str, default: float) -> float:
    value = params.get(name)
    try:
        return default if value is None else float(value)
    except ValueError:
        raise ValueError(f"parameter {name!r} must be a number, got {value!r}") from None


def _text(params: dict[str, str], name: str) -> str:
    if name not in params:
        raise ValueError(f"missing parameter {name!r}")
    return params[name]


class App:
    """The API over one :class:`Explorer` (one lock: requests are answered one at a time).

    Args:
        explorer: The explorer (its model already loaded).
        loader: ``name -> model`` for the ``model`` action (default: :func:`minterp_tl.models.load_model`).
    """

    def __init__(
        self, explorer: Explorer, loader: Optional[Callable[[str], Any]] = None, name: str = "model"
    ) -> None:
        self.explorer = explorer
        self.loader = loader
        self.model_name = name
        self.lock = threading.Lock()

    def _load(self, name: str) -> dict[str, Any]:
        if not name.strip():
            raise ValueError("the model name is empty")
        if self.loader is None:
            from minterp_tl.models import load_model

            self.loader = lambda n: load_model(n, progress=False)
        try:
            model = self.loader(name)
        except Exception as err:  # noqa: BLE001 - any loading failure is the page's message
            raise ValueError(f"could not load model {name!r}: {type(err).__name__}: {err}") from None
        self.explorer = Explorer(model, max_tokens=self.explorer.max_tokens, top_k=self.explorer.top_k)
        self.model_name = name
        return {"model": name, "n_layers": int(model.cfg.n_layers)}

    def call(self, action: str, p: dict[str, str]) -> dict[str, Any]:
        """Answer one API call (``ValueError`` for bad input)."""
        e = self.explorer
        actions: dict[str, Callable[[], dict[str, Any]]] = {
            "model": lambda: self._load(_text(p, "name")),
            "info": lambda: {"model": self.model_name, "prompt": e.prompt, "max_tokens": e.max_tokens},
            "run": lambda: e.run(_text(p, "prompt")),
            "graph": lambda: e.graph(
                _int(p, "token", -1), _float(p, "threshold", 0.04), _int(p, "distance_norm", 1)
            ),
            "representation": lambda: e.representation(_int(p, "layer"), _int(p, "pos")),
            "head": lambda: e.head(_int(p, "layer"), _int(p, "pos"), _int(p, "head")),
            "edge": lambda: e.edge(
                _int(p, "layer"), _int(p, "target"), _int(p, "source"), _int(p, "distance_norm", 1)
            ),
            "ffn": lambda: e.ffn(_int(p, "layer"), _int(p, "pos")),
            "neuron": lambda: e.neuron(_int(p, "layer"), _int(p, "neuron")),
            "lens": e.lens,
            "patch": lambda: e.patch(_text(p, "corrupted")),
            "patched_lens": lambda: e.patched_lens(_text(p, "corrupted"), _int(p, "layer"), _int(p, "pos")),
        }
        if action not in actions:
            raise ValueError(f"unknown action {action!r}; valid: {sorted(actions)}")
        with self.lock:
            return actions[action]()


class _Handler(BaseHTTPRequestHandler):
    app: App  # set on the subclass made by make_server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # quiet: the page reports errors itself

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _api(self, action: str, params: dict[str, str]) -> None:
        try:
            self._json(200, self.app.call(action, params))
        except ValueError as err:
            self._json(400, {"error": str(err)})
        except Exception as err:  # noqa: BLE001 - report it in the page and keep serving
            self._json(500, {"error": f"internal error: {type(err).__name__}: {err}"})

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        url = urlparse(self.path)
        if url.path.startswith("/api/"):
            params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            return self._api(url.path[len("/api/") :], params)
        if url.path == "/favicon.ico":
            return self._send(204, b"", "image/x-icon")
        name = "index.html" if url.path in ("", "/") else url.path.removeprefix("/static/")
        path = STATIC / name
        if not _NAME.match(name) or not path.is_file():  # "/static/<file>" of the package only
            return self._json(404, {"error": f"no such page: {url.path}"})
        self._send(200, path.read_bytes(), _TYPES[path.suffix])

    def do_POST(self) -> None:  # noqa: N802 - the base class's name
        url = urlparse(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        if not url.path.startswith("/api/") or length > MAX_BODY:
            return self._json(400, {"error": "POST /api/<action> with a JSON body of at most 64 KiB"})
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            return self._json(400, {"error": "the request body must be a JSON object"})
        self._api(url.path[len("/api/") :], {str(k): str(v) for k, v in body.items()})


def make_server(app: App, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server for ``app`` on ``host:port`` (``port=0``: a free port; read ``server.server_address``).
    Call ``serve_forever()`` (and ``shutdown()`` from another thread)."""
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer in 0..65535, got {port!r}")
    handler = type("Handler", (_Handler,), {"app": app})
    return ThreadingHTTPServer((host, port), handler)


__all__ = ["App", "make_server"]
