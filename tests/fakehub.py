"""A fake Hugging Face Hub on 127.0.0.1, for the remote tests and the benchmark.

Two threaded HTTP/1.1 servers on ephemeral ports: the *hub* answers
``/{org}/{repo}/resolve/{rev}/{path}`` (GET with single byte ranges, HEAD with the headers
huggingface_hub reads) and, for repositories added with ``cdn=True``, redirects with a 302 to
the *cdn* server, another origin (so ``Authorization`` must not follow). Every request is
recorded (server, method, path, range, Authorization, status, body bytes sent).

Faults are queued per file and consumed one per request: ``"429"`` / ``"429:SECONDS"``
(with ``Retry-After``), any other status code as a string (``"500"``, ``"403"``...),
``"truncate"`` (the headers of the full answer, half the body, then the connection
closes), ``"stall"`` (no answer until the server stops) and ``"norange"`` (a 200 with the
whole file, as a server without range support). ``forever=True`` repeats the last one.

No torch import here: the benchmark process must stay small.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 drops connects of a 16-thread client (1 s SYN retry)


@dataclass(frozen=True)
class Hit:
    server: str  # "hub" or "cdn"
    method: str
    path: str  # the file inside its repository ("" when the URL named none)
    range: str | None
    authorization: str | None
    status: int
    sent: int  # body bytes


@dataclass
class Repo:
    folder: Path
    revisions: set[str]
    token: str | None
    cdn: bool


@dataclass
class FakeHub:
    latency: float = 0.0  # seconds added before every answer
    repos: dict[str, Repo] = field(default_factory=dict)
    hits: list[Hit] = field(default_factory=list)
    max_in_flight: int = 0

    def __post_init__(self) -> None:
        self._faults: dict[str, tuple[list[str], bool]] = {}
        self._lock = threading.Lock()
        self._in_flight = 0
        self._stopping = threading.Event()
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []

    # -- set-up ---------------------------------------------------------------------------
    def add_repo(self, name: str, folder: Path, *, revisions: tuple[str, ...] = ("main",),
                 token: str | None = None, cdn: bool = False) -> None:
        self.repos[name] = Repo(folder, set(revisions), token, cdn)

    def fault(self, repo: str, path: str, *behaviours: str, forever: bool = False) -> None:
        self._faults[f"{repo}/{path}"] = (list(behaviours), forever)

    def reset(self) -> None:
        with self._lock:
            self.hits.clear()
            self._faults.clear()
            self.max_in_flight = 0

    # -- what happened ----------------------------------------------------------------------
    def hits_for(self, path: str, server: str | None = None) -> list[Hit]:
        return [h for h in self.hits if h.path == path and server in (None, h.server)]

    def bytes_sent(self, path: str | None = None) -> int:
        return sum(h.sent for h in self.hits if path is None or h.path == path)

    # -- running --------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn_endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    def url(self, repo: str, path: str, revision: str = "main") -> str:
        return f"{self.endpoint}/{repo}/resolve/{quote(revision, safe='')}/{path}"

    def start(self) -> FakeHub:
        for role in ("hub", "cdn"):
            server = _Server(("127.0.0.1", 0), _handler(self, role))
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                      name=f"fakehub-{role}", daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------------
    def _next_fault(self, key: str) -> str | None:
        with self._lock:
            queued = self._faults.get(key)
            if not queued or not queued[0]:
                return None
            behaviours, forever = queued
            if forever and len(behaviours) == 1:
                return behaviours[0]
            return behaviours.pop(0)

    def _record(self, hit: Hit) -> None:
        with self._lock:
            self.hits.append(hit)


def _parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """(first, last) of a single ``bytes=`` range, None for no/ignored Range, "416" when
    it cannot be satisfied."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first_s, _, last_s = header[len("bytes="):].strip().partition("-")
    try:
        if first_s == "":
            n = int(last_s)
            return (max(0, size - n), size - 1) if n > 0 and size else "416"
        first = int(first_s)
        last = int(last_s) if last_s else size - 1
    except ValueError:
        return None
    if first >= size or last < first:
        return "416"
    return first, min(last, size - 1)


def _handler(hub: FakeHub, role: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out as separate writes

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            self._serve(head=False)

        def do_HEAD(self) -> None:
            self._serve(head=True)

        # -- helpers ------------------------------------------------------------------
        def _send(self, status: int, headers: dict[str, str], body: bytes = b"", *,
                  path: str = "", head: bool = False, length: int | None = None) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            sent = 0
            if not head and body:
                self.wfile.write(body)
                sent = len(body)
            self.wfile.flush()
            hub._record(Hit(role, self.command, path, self.headers.get("Range"),
                            self.headers.get("Authorization"), status, sent))

        def _error(self, status: int, path: str, code: str | None = None,
                   head: bool = False, extra: dict[str, str] | None = None) -> None:
            headers = {"Content-Type": "text/plain", **(extra or {})}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, headers, f"error {status}\n".encode(), path=path, head=head)

        def _serve(self, head: bool) -> None:
            with hub._lock:
                hub._in_flight += 1
                hub.max_in_flight = max(hub.max_in_flight, hub._in_flight)
            try:
                if hub.latency:
                    time.sleep(hub.latency)
                self._route(head)
            finally:
                with hub._lock:
                    hub._in_flight -= 1

        def _route(self, head: bool) -> None:
            parts = [unquote(p) for p in urlsplit(self.path).path.split("/")]
            if role == "cdn":  # /cdn/{org}/{repo}/{rev}/{path...}
                if len(parts) < 6 or parts[1] != "cdn":
                    self._error(404, "")
                    return
                repo_name, rev, path = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
            else:  # /{org}/{repo}/resolve/{rev}/{path...}
                if len(parts) < 6 or parts[3] != "resolve":
                    self._error(404, "")
                    return
                repo_name, rev, path = f"{parts[1]}/{parts[2]}", parts[4], "/".join(parts[5:])
            repo = hub.repos.get(repo_name)
            if repo is None:
                self._error(404, path, "RepoNotFound", head)
                return
            if role == "hub" and repo.token is not None:
                auth = self.headers.get("Authorization")
                if auth is None:
                    self._error(401, path, "GatedRepo", head)
                    return
                if auth != f"Bearer {repo.token}":
                    self._error(403, path, "GatedRepo", head)
                    return
            if rev not in repo.revisions:
                self._error(404, path, "RevisionNotFound", head)
                return
            file = repo.folder / path
            if not path or not file.is_file():
                self._error(404, path, "EntryNotFound", head)
                return
            if role == "hub" and repo.cdn:
                where = f"{hub.cdn_endpoint}/cdn/{repo_name}/{quote(rev, safe='')}/{path}"
                self._send(302, {"Location": where}, path=path, head=head)
                return
            self._file(file, f"{repo_name}/{path}", path, head)

        def _file(self, file: Path, key: str, path: str, head: bool) -> None:
            st = file.stat()
            size = st.st_size
            etag = hashlib.sha1(f"{key}:{size}:{st.st_mtime_ns}".encode()).hexdigest()
            meta = {"ETag": f'"{etag}"', "X-Repo-Commit": COMMIT,
                    "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            fault = None if head else hub._next_fault(key)
            if fault == "stall":
                hub._stopping.wait(60)
                hub._record(Hit(role, self.command, path, self.headers.get("Range"),
                                self.headers.get("Authorization"), 0, 0))
                self.close_connection = True
                return
            if fault is not None and fault.split(":")[0].isdigit():
                status = int(fault.split(":")[0])
                extra = {"Retry-After": fault.split(":")[1] if ":" in fault else "0"} \
                    if status == 429 else {}
                self._error(status, path, "GatedRepo" if status in (401, 403) else None,
                            extra=extra)
                return
            wanted = None if fault == "norange" else _parse_range(self.headers.get("Range"),
                                                                   size)
            if head:
                self._send(200, meta, path=path, head=True, length=size)
                return
            if wanted == "416":
                self._error(416, path, extra={"Content-Range": f"bytes */{size}"})
                return
            if wanted is None:
                status, first, last, headers = 200, 0, size - 1, meta
            else:
                assert isinstance(wanted, tuple)
                first, last = wanted
                status = 206
                headers = {**meta, "Content-Range": f"bytes {first}-{last}/{size}"}
            with open(file, "rb") as f:
                f.seek(first)
                body = f.read(last + 1 - first)
            if fault == "truncate":
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                half = body[: len(body) // 2]
                self.wfile.write(half)
                self.wfile.flush()
                self.close_connection = True
                hub._record(Hit(role, self.command, path, self.headers.get("Range"),
                                self.headers.get("Authorization"), status, len(half)))
                return
            self._send(status, headers, body, path=path)

    return Handler
