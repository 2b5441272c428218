"""A stand-in Hugging Face Hub on 127.0.0.1: the endpoints ``huggingface_hub`` calls to read a model's metadata
and download its files, serving repositories a test fills in, and able to lie the ways a hostile server might.

    GET  /api/models/{owner}/{name}[/revision/{rev}]     model_info (files_metadata: ?blobs=True)
    HEAD /{owner}/{name}/resolve/{rev}/{file}            hf_hub_download's metadata (ETag, X-Repo-Commit, size)
    GET  /{owner}/{name}/resolve/{rev}/{file}            the file itself

Every request's method and path is logged in ``StubHub.requests``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    """A repository: its files, and lies to tell about them.

    ``claimed``: file -> the size the metadata (and the download's headers) say, instead of the real one.
    ``extra``: file -> bytes sent after the real content on download (a body longer than its headers said).
    """

    files: dict[str, bytes]
    sha: str = "0123456789abcdef0123456789abcdef01234567"
    claimed: dict[str, int] = field(default_factory=dict)
    extra: dict[str, int] = field(default_factory=dict)
    parameters: int | None = None
    head_size: dict[str, int] = field(default_factory=dict)  # file -> the size HEAD says, unlike the listing


class StubHub:
    """A threaded HTTP server on 127.0.0.1 answering as the Hub does for ``repos``; use as a context manager."""

    def __init__(self, repos: dict[str, Repo]) -> None:
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                hub._answer(self, body=True)

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StubHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- answers ---------------------------------------------------------------------------------------------

    def _answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append((h.command, path))
        if m := re.match(r"^/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?$", path):
            self._info(h, m.group(1), m.group(2))
        elif m := re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path):
            self._file(h, m.group(1), m.group(2), m.group(3), body)
        else:
            self._send(h, 404, b'{"error": "not found"}', {"Content-Type": "application/json"})

    def _send(self, h, status: int, data: bytes, headers: dict[str, str], body: bool = True,
              length: int | None = None) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data) if length is None else length))
        h.end_headers()
        if body:
            try:
                h.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass

    def _missing(self, h, what: str) -> None:
        self._send(h, 404, json.dumps({"error": what}).encode(),
                   {"Content-Type": "application/json", "X-Error-Code": "RepoNotFound", "X-Error-Message": what})

    def _info(self, h, repo_id: str, revision: str | None) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._missing(h, "Repository not found")
        if revision not in (None, "main", repo.sha):
            return self._send(h, 404, b'{"error": "Invalid rev id"}',
                              {"Content-Type": "application/json", "X-Error-Code": "RevisionNotFound"})
        siblings = []
        for name, data in repo.files.items():
            size = repo.claimed.get(name, len(data))
            sib = {"rfilename": name, "size": size, "blobId": hashlib.sha1(data).hexdigest()}
            if not name.endswith(".json"):
                sib["lfs"] = {"size": size, "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            siblings.append(sib)
        info = {"_id": "x", "id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False, "gated": False,
                "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
                "lastModified": "2024-01-01T00:00:00.000Z", "createdAt": "2024-01-01T00:00:00.000Z"}
        if repo.parameters is not None:
            info["safetensors"] = {"parameters": {"F32": repo.parameters}, "total": repo.parameters}
        self._send(h, 200, json.dumps(info).encode(), {"Content-Type": "application/json"})

    def _file(self, h, repo_id: str, revision: str, name: str, body: bool) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._missing(h, "Repository not found")
        if name not in repo.files:
            return self._send(h, 404, b'{"error": "Entry not found"}',
                              {"Content-Type": "application/json", "X-Error-Code": "EntryNotFound"})
        data = repo.files[name]
        etag = hashlib.sha256(data).hexdigest()
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": repo.sha, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if not body and name in repo.head_size:
            return self._send(h, 200, b"", headers, body=False, length=repo.head_size[name])
        if name in repo.claimed or name in repo.extra:  # a liar: headers say one size, the body is another
            sent = data + b"\0" * repo.extra.get(name, 0)
            if not body:
                return self._send(h, 200, b"", headers, body=False, length=repo.claimed.get(name, len(data)))
            h.send_response(200)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            try:
                for i in range(0, len(sent), 1 << 20):
                    chunk = sent[i:i + (1 << 20)]
                    h.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                h.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
            return None
        self._send(h, 200, data, headers, body=body)
        return None
