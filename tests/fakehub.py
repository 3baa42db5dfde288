"""A Hugging Face Hub look-alike on 127.0.0.1, so download tests need no network.

It answers the requests ``huggingface_hub`` makes the way the real Hub does (read from the source of
huggingface_hub 2.4, ``file_download.py`` / ``utils/_http.py`` / ``hf_api.py``):

- ``HEAD``/``GET /{repo}/resolve/{revision}/{path}`` on the Hub origin. LFS files (``*.safetensors``,
  ``*.tar``) answer ``302`` to a CDN on another host (``localhost``, on a second port) with
  ``X-Linked-Etag`` (the sha256), ``X-Linked-Size`` and ``X-Repo-Commit``; regular files answer
  ``200`` with ``ETag`` (the git blob sha1), ``Content-Length`` and ``X-Repo-Commit``.
- ``GET /api/models/{repo}/tree/{revision}/{folder}``: the folder listing (JSON, with ``oid``,
  ``size`` and ``lfs``).
- the CDN: ``GET /{sha256}`` with ``Range`` support (``206`` + ``Content-Range``), no token needed.

The catalogue is written here by hand from the published repositories (not read from
``cascade_helpers.files``), so a misspelt name in the registry shows up as a 404. The contents are
small deterministic bytes. Faults can be switched on: drop the connection mid-file, stall mid-file
(to interrupt the client), corrupt a body, a 404, a token requirement (401 without
``Authorization: Bearer``), a CDN outage (503).
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

DECODER = "stabilityai/stable-cascade"
PRIOR = "stabilityai/stable-cascade-prior"
LORA = "dome272/stable-cascade"
COMMIT = "a" * 40  # what X-Repo-Commit says

_TOKENIZER = [
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
]
CATALOGUE: dict[str, list[str]] = {
    DECODER: [
        "stage_a.safetensors",
        "effnet_encoder.safetensors",
        "previewer.safetensors",
        *(
            f"stage_{s}{lite}{bf16}.safetensors"
            for s in "bc"
            for lite in ("", "_lite")
            for bf16 in ("", "_bf16")
        ),
        "controlnet/canny.safetensors",
        "controlnet/inpainting.safetensors",
        "controlnet/super_resolution.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder/model.bf16.safetensors",
        *_TOKENIZER,
        "decoder/config.json",  # decoys: never asked for
        "README.md",
    ],
    PRIOR: [
        "image_encoder/config.json",
        "image_encoder/model.safetensors",
        "image_encoder/model.bf16.safetensors",
        "feature_extractor/preprocessor_config.json",
        *_TOKENIZER,
        "prior/config.json",
    ],
    LORA: ["lora_fernando_10k.safetensors", "fernando.tar"],
}


def fake_content(repo: str, path: str) -> bytes:
    """Small, distinct, deterministic bytes for one file (a few kB)."""
    seed = hashlib.sha256(f"{repo}/{path}".encode()).digest()
    return (seed * (64 + seed[0]))[: 2048 + seed[1] * 8]


def is_lfs(path: str) -> bool:
    return path.endswith((".safetensors", ".tar"))


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Seen:
    """One request the fake hub received."""

    origin: str  # "hub" or "cdn"
    method: str
    path: str
    range: str | None
    authorization: str | None


class FakeHub:
    """Two servers (the Hub and its CDN) on 127.0.0.1 sharing one state. Use as a context manager."""

    def __init__(self) -> None:
        self.files: dict[tuple[str, str], bytes] = {
            (repo, path): fake_content(repo, path) for repo, paths in CATALOGUE.items() for path in paths
        }
        self.seen: list[Seen] = []
        self.token: str | None = None  # when set, the Hub answers 401 unless given this bearer token
        self.missing: set[str] = set()  # paths answered with 404
        self.corrupt: set[str] = set()  # paths whose CDN body has one byte flipped (same length)
        self.drops: dict[str, int] = {}  # path -> byte offset at which the next transfer is cut (once)
        self.outage_after_drop = False  # after a drop, the CDN answers 503 until `outage` is cleared
        self.outage = False
        # path -> byte offset at which the next transfer waits for `release`: set by the test (or on exit),
        # never by a clock, so a slow machine cannot let the transfer finish before the test interrupts it
        self.stalls: dict[str, int] = {}
        self.stalled = threading.Event()  # set once a stalled transfer has sent its bytes
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._hub = _Server(self, "hub")
        self._cdn = _Server(self, "cdn")

    # --- set-up ------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_port}"

    @property
    def cdn_url(self) -> str:
        """Another host name for the same loopback address: a CDN is another host, not another port."""
        return f"http://localhost:{self._cdn.server_port}"

    def __enter__(self) -> FakeHub:
        for server in (self._hub, self._cdn):
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()  # a stalled transfer ends with the hub
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()

    def content(self, path: str, repo: str | None = None) -> bytes:
        """The true bytes of ``path`` (in ``repo``, or the only repo that has it)."""
        matches = [data for (r, p), data in self.files.items() if p == path and repo in (None, r)]
        assert len(matches) == 1, f"{path} is in {len(matches)} repos: name one"
        return matches[0]

    # --- what the tests look at ------------------------------------------------------------------

    def gets(self, origin: str = "cdn") -> list[Seen]:
        return [s for s in self.seen if s.method == "GET" and s.origin == origin]

    def fetched_paths(self) -> list[str]:
        """Repo paths whose bytes were served (CDN bodies of LFS files, Hub bodies of regular files)."""
        by_sha = {hashlib.sha256(data).hexdigest(): path for (_, path), data in self.files.items()}
        cdn = [by_sha[s.path.strip("/")] for s in self.gets("cdn")]
        hub = [
            s.path.split("/resolve/", 1)[1].split("/", 1)[1]
            for s in self.gets("hub")
            if "/resolve/" in s.path
        ]
        return cdn + [p for p in hub if not is_lfs(p)]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: FakeHub, origin: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = hub
        self.origin = origin


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real Hub
    server: _Server

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    # --- routing -------------------------------------------------------------------------------------

    def _answer(self, body: bool) -> None:
        hub = self.server.hub
        path = unquote(urlsplit(self.path).path)
        with hub._lock:
            hub.seen.append(
                Seen(
                    self.server.origin,
                    self.command,
                    path,
                    self.headers.get("Range"),
                    self.headers.get("Authorization"),
                )
            )
        if self.server.origin == "cdn":
            return self._cdn(path.strip("/"), body)
        if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
            return self._error(
                401,
                "GatedRepo",
                "Access to this model is restricted. You must be authenticated to access it.",
            )
        if path.startswith("/api/models/"):
            return self._tree(path.removeprefix("/api/models/"))
        owner, name, verb, _revision, *rest = path.strip("/").split("/") + ["", "", ""]
        repo, file_path = f"{owner}/{name}", "/".join(p for p in rest if p)
        if verb != "resolve" or (repo, file_path) not in hub.files or file_path in hub.missing:
            return self._error(404, "EntryNotFound", f"{file_path} does not exist on 'main'")
        return self._resolve(repo, file_path, body)

    def _resolve(self, repo: str, path: str, body: bool) -> None:
        data = self.server.hub.files[(repo, path)]
        if is_lfs(path):
            sha256 = hashlib.sha256(data).hexdigest()
            return self._send(
                302,
                b"",
                {
                    "Location": f"{self.server.hub.cdn_url}/{sha256}",
                    "X-Linked-Etag": f'"{sha256}"',
                    "X-Linked-Size": str(len(data)),
                    "ETag": f'"{git_blob_sha1(data)}"',
                    "X-Repo-Commit": COMMIT,
                },
                body,
            )
        headers = {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": COMMIT}
        return self._send(200, self._maybe_corrupt(path, data), headers, body)

    def _tree(self, rest: str) -> None:
        owner, name, _tree, _revision, *folder = rest.split("/")
        repo, prefix = f"{owner}/{name}", "/".join(folder).rstrip("/") + "/"
        entries = []
        for (r, path), data in sorted(self.server.hub.files.items()):
            if r == repo and path.startswith(prefix):
                entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
                if is_lfs(path):
                    entry["lfs"] = {
                        "oid": hashlib.sha256(data).hexdigest(),
                        "size": len(data),
                        "pointerSize": 134,
                    }
                entries.append(entry)
        if not entries:
            return self._error(404, "EntryNotFound", f"{prefix} does not exist on 'main'")
        self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, True)

    def _cdn(self, sha256: str, body: bool) -> None:
        hub = self.server.hub
        found = [
            (path, data)
            for (_, path), data in hub.files.items()
            if hashlib.sha256(data).hexdigest() == sha256
        ]
        if not found:
            return self._send(404, b"NoSuchKey", {}, body)
        if hub.outage:
            return self._send(503, b"Service Unavailable", {}, body)
        path, data = found[0]
        data = self._maybe_corrupt(path, data)
        start = (
            int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
            if self.headers.get("Range")
            else 0
        )
        status, headers = 200, {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"}
        if start:
            status, headers["Content-Range"] = 206, f"bytes {start}-{len(data) - 1}/{len(data)}"
        if body and path in hub.drops:
            self._send_head(status, data[start:], headers)
            self.wfile.write(data[start : hub.drops.pop(path)])
            self._hang_up()
            hub.outage = hub.outage_after_drop
        elif body and path in hub.stalls:
            self._send_head(status, data[start:], headers)
            self.wfile.write(data[start : hub.stalls.pop(path)])
            self.wfile.flush()
            hub.stalled.set()
            hub.release.wait()
            self._hang_up()
        else:
            self._send(status, data[start:], headers, body)

    def _maybe_corrupt(self, path: str, data: bytes) -> bytes:
        """One byte flipped, same length: only a checksum can tell."""
        if path not in self.server.hub.corrupt:
            return data
        return data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]

    # --- responses -------------------------------------------------------------------------------------

    def _send_head(self, status: int, data: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(data)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()

    def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        self._send_head(status, data, headers)
        if body:
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        data = json.dumps({"error": message}).encode()
        headers = {"X-Error-Code": code, "X-Error-Message": message, "X-Repo-Commit": COMMIT}
        self._send(status, data, {"Content-Type": "application/json", **headers}, self.command != "HEAD")

    def _hang_up(self) -> None:
        """Cut the connection before the announced body is complete."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:  # the client is already gone
            pass
        self.close_connection = True
