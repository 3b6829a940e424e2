"""A local stand-in for the Hugging Face Hub, served over HF_ENDPOINT in tests.

It answers the few routes huggingface_hub uses to download (model info, tree listing,
HEAD/GET of /resolve/ with Range), logs every request, and can cut a file's body short to
simulate a dropped connection.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/.*)?$")


@dataclass
class FakeHub:
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    # file path -> how many more GETs of it are cut off after half of the body
    cuts: dict[str, int] = field(default_factory=dict)
    # repo -> the bearer token it needs (a gated repository)
    gated: dict[str, str] = field(default_factory=dict)
    _server: ThreadingHTTPServer | None = None

    def add(self, repo: str, files: dict[str, bytes]) -> None:
        self.repos.setdefault(repo, {}).update(files)

    @staticmethod
    def sha(repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                hub._handle(self, head=True)

            def do_GET(self) -> None:  # noqa: N802
                hub._handle(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- request handling ----------------------------------------------------------------

    def _handle(self, req: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlparse(req.path).path)
        self.requests.append((req.command, path, req.headers.get("Range")))
        if m := _RESOLVE.match(path):
            self._resolve(req, m["repo"], m["file"], head)
        elif m := _TREE.match(path):
            files = self.repos.get(m["repo"])
            if files is None:
                return self._missing_repo(req)
            self._json(req, [{"type": "file", "path": name, "size": len(data),
                              "oid": hashlib.sha1(data).hexdigest()}
                             for name, data in files.items()], head)
        elif m := _INFO.match(path):
            files = self.repos.get(m["repo"])
            if files is None:
                return self._missing_repo(req)
            self._json(req, {"id": m["repo"], "modelId": m["repo"], "sha": self.sha(m["repo"]),
                             "siblings": [{"rfilename": name} for name in files]}, head)
        else:
            self._send(req, 404, b"{}", {"X-Error-Code": "RepoNotFound"}, head)

    def _resolve(self, req: BaseHTTPRequestHandler, repo: str, name: str, head: bool) -> None:
        files = self.repos.get(repo)
        if files is None:
            return self._missing_repo(req)
        if repo in self.gated and req.headers.get("Authorization") != f"Bearer {self.gated[repo]}":
            return self._send(req, 401, b'{"error": "gated"}', {
                "X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this repo is gated"},
                head)
        data = files.get(name)
        commit = {"X-Repo-Commit": self.sha(repo)}
        if data is None:
            return self._send(req, 404, b"{}", {**commit, "X-Error-Code": "EntryNotFound",
                                                "X-Error-Message": "Entry not found"}, head)
        headers = {**commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Accept-Ranges": "bytes"}
        status, body = 200, data
        if (rng := req.headers.get("Range")) and (m := re.match(r"bytes=(\d+)-(\d*)", rng)):
            start = int(m[1])
            end = int(m[2]) if m[2] else len(data) - 1
            status, body = 206, data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        if not head and self.cuts.get(name, 0) > 0:
            self.cuts[name] -= 1
            req.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                req.send_header(key, value)
            req.end_headers()
            req.wfile.write(body[: len(body) // 2])
            req.wfile.flush()
            req.close_connection = True
            return
        self._send(req, status, body, headers, head)

    def _missing_repo(self, req: BaseHTTPRequestHandler) -> None:
        self._send(req, 404, b'{"error": "Repository not found"}',
                   {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
                   req.command == "HEAD")

    def _json(self, req: BaseHTTPRequestHandler, payload: object, head: bool) -> None:
        self._send(req, 200, json.dumps(payload).encode(),
                   {"Content-Type": "application/json"}, head)

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str],
              head: bool) -> None:
        req.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            req.send_header(key, value)
        req.end_headers()
        if not head:
            req.wfile.write(body)
