"""Byte ranges over HTTP(S): the :class:`~paramctl.io.reader.ByteReader` behind remote specs.

Only metadata is ever fetched, so a reader is built to answer a format module's few
``pread`` calls in as few round trips as possible:

- opening it fetches the first 100 KiB (``Range: bytes=0-102399``): the file size comes from
  ``Content-Range``, and a safetensors header, an index JSON or a torch zip's ``data.pkl``
  usually lie inside it, so they cost no second request;
- a read that touches the last 64 KiB fetches the whole tail (a zip's end-of-central-directory
  and central directory, in one request);
- anything else fetches exactly the bytes asked for (a prefix or suffix already held is not
  fetched again).

Redirects are followed (up to 5 hops, ``Range`` re-sent, ``Authorization`` dropped when a
redirect leaves the original origin, as huggingface_hub does); the final location is then
asked directly. 408/429/5xx and dropped connections are retried with exponential back-off
(4 tries, ``Retry-After`` honoured up to 20 s). Connections are kept alive, one per host and
thread, so fetching many shards from a thread pool reuses them.

Stdlib :mod:`http.client` rather than urllib3: importing it (ssl included) costs ~14 ms here
against urllib3's ~41 ms, and a reader needs nothing urllib3 adds (one range request per
thread at a time, no pool sharing, no proxies yet). Timeouts (connect 10 s, read 30 s) and
the back-off base (0.5 s) can be set with ``PARAMCTL_HTTP_TIMEOUT`` (``"10,30"`` or one
number) and ``PARAMCTL_HTTP_BACKOFF``.
"""

from __future__ import annotations

import http.client
import os
import random
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import Message
from typing import TYPE_CHECKING
from urllib.parse import quote, urljoin, urlsplit

from paramctl.errors import CorruptFileError, SourceError

if TYPE_CHECKING:
    import ssl

__all__ = ["FIRST_READ", "TAIL_READ", "HttpError", "HttpReader"]

FIRST_READ = 100 * 1024
TAIL_READ = 64 * 1024
# A server that ignores Range answers 200 with the whole file: accepted only this small.
MAX_WHOLE_BODY = 2 << 20
# Fetched spans up to this size are kept to serve later reads; larger ones are not.
MAX_CACHED_SPAN = 1 << 20
MAX_REDIRECTS = 5
TRIES = 4
RETRY_AFTER_CAP = 20.0
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "paramctl (python http.client)"


class HttpError(SourceError):
    """The server answered with an error status; ``error_code`` is the Hub's
    ``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``...), if any."""

    def __init__(self, message: str, status: int, error_code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code


@dataclass(frozen=True)
class _Settings:
    connect_timeout: float
    read_timeout: float
    backoff: float


def _settings() -> _Settings:
    def number(text: str, what: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise SourceError(f"{what}={text!r}: expected a positive number of seconds")
        return value

    connect, read = 10.0, 30.0
    raw = os.environ.get("PARAMCTL_HTTP_TIMEOUT", "").strip()
    if raw:
        parts = [number(p, "PARAMCTL_HTTP_TIMEOUT") for p in raw.split(",", 1)]
        connect, read = parts[0], parts[-1]
    raw = os.environ.get("PARAMCTL_HTTP_BACKOFF", "").strip()
    return _Settings(connect, read, number(raw, "PARAMCTL_HTTP_BACKOFF") if raw else 0.5)


# -- connections ----------------------------------------------------------------------------

_Origin = tuple[str, str, int]  # scheme, host, port


def _origin(url: str) -> _Origin:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise SourceError(f"{url}: not an http:// or https:// URL")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise SourceError(f"{url}: bad port in the URL") from None
    return scheme, parts.hostname, port


class _Connections:
    """Keep-alive connections, one per origin and thread (``http.client`` connections are
    not thread-safe). Threads of a pool reuse theirs for every file they fetch."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._ssl: ssl.SSLContext | None = None
        self._lock = threading.Lock()

    def _by_origin(self) -> dict[_Origin, http.client.HTTPConnection]:
        conns: dict[_Origin, http.client.HTTPConnection] | None = getattr(
            self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        return conns

    def get(self, origin: _Origin, settings: _Settings
            ) -> tuple[http.client.HTTPConnection, bool]:
        """A connected connection for ``origin``, and whether it was used before."""
        conns = self._by_origin()
        conn = conns.get(origin)
        if conn is not None and conn.sock is not None:
            return conn, True
        scheme, host, port = origin
        if scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=settings.connect_timeout,
                                               context=self._ssl_context())
        else:
            conn = http.client.HTTPConnection(host, port, timeout=settings.connect_timeout)
        conns[origin] = conn
        conn.connect()
        if conn.sock is not None:
            conn.sock.settimeout(settings.read_timeout)
        return conn, False

    def drop(self, origin: _Origin) -> None:
        conn = self._by_origin().pop(origin, None)
        if conn is not None:
            conn.close()

    def _ssl_context(self) -> ssl.SSLContext:
        with self._lock:
            if self._ssl is None:
                import ssl

                self._ssl = ssl.create_default_context()
            return self._ssl


_CONNECTIONS = _Connections()


@dataclass
class _Response:
    status: int
    reason: str
    headers: Message
    body: bytes
    url: str  # where it came from, after redirects
    oversize: bool = False  # a 200/206 body over the limit, left unread


class _Truncated(Exception):
    def __init__(self, got: int, want: int) -> None:
        self.got, self.want = got, want


def _request_once(url: str, headers: Mapping[str, str], limit: int,
                  settings: _Settings) -> _Response:
    """One request on a kept-alive connection; the body is read only for 200/206 (up to
    ``limit`` bytes) and for short error pages. Raises OSError/HTTPException on network
    trouble and :class:`_Truncated` when the body ends early."""
    origin = _origin(url)
    parts = urlsplit(url)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    for fresh_try in (False, True):
        conn, reused = _CONNECTIONS.get(origin, settings)
        try:
            conn.request("GET", target, headers=dict(headers))
            resp = conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            _CONNECTIONS.drop(origin)
            if reused and not fresh_try:
                continue  # the server closed an idle kept-alive connection: reconnect once
            raise
        except BaseException:
            _CONNECTIONS.drop(origin)
            raise
        break
    try:
        if resp.status in (200, 206):
            length = resp.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > limit:
                _CONNECTIONS.drop(origin)
                return _Response(resp.status, resp.reason, resp.msg, b"", url, oversize=True)
            body = resp.read(limit + 1)
            if len(body) > limit:
                _CONNECTIONS.drop(origin)
                return _Response(resp.status, resp.reason, resp.msg, b"", url, oversize=True)
            if length is not None and length.isdigit() and len(body) < int(length):
                _CONNECTIONS.drop(origin)
                raise _Truncated(len(body), int(length))
        else:
            body = resp.read(4096)
        if not resp.isclosed():
            _CONNECTIONS.drop(origin)  # unread rest (or a body over the limit): not reusable
        elif resp.will_close:
            _CONNECTIONS.drop(origin)
    except (OSError, http.client.HTTPException):
        _CONNECTIONS.drop(origin)
        raise
    return _Response(resp.status, resp.reason, resp.msg, body, url)


def _same_origin(a: str, b: str) -> bool:
    try:
        return _origin(a) == _origin(b)
    except SourceError:
        return False


def _retry_after(headers: Message) -> float | None:
    raw = headers.get("Retry-After")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _quote_url(url: str) -> str:
    """Percent-encode what cannot travel in a request line (spaces, non-ASCII in shard
    names), leaving existing escapes alone."""
    parts = urlsplit(url)
    path = quote(parts.path, safe="/%:@!$&'()*+,;=~-._")
    return parts._replace(path=path).geturl()


# -- the reader -----------------------------------------------------------------------------


class HttpReader:
    """Random access to one file over HTTP range requests (see the module docstring).

    ``name`` is how messages name the file (an ``hf://`` spec rather than the URL it
    resolves to); ``headers`` go with every request to the original origin
    (``Authorization`` is dropped on a redirect elsewhere).
    """

    def __init__(self, url: str, *, name: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        self.url = _quote_url(url)
        self.name = name or url
        self.headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity",
                        **(headers or {})}
        self.settings = _settings()
        self._location: str | None = None  # where the first redirect chain led
        self._spans: list[tuple[int, bytes]] = []
        self.size = -1
        data = self._fetch(0, FIRST_READ)
        self._keep(0, data)

    # -- ByteReader ---------------------------------------------------------------------
    def pread(self, n: int, offset: int) -> bytes:
        end = min(offset + max(n, 0), self.size)
        if offset >= end:
            return b""
        parts: list[bytes] = []
        pos = offset
        while pos < end:
            span = self._span_at(pos)
            if span is not None:
                start, data = span
                take = data[pos - start: end - start]
                parts.append(take)
                pos += len(take)
                continue
            following = [s for s, d in self._spans if s > pos]
            gap_end = min([end, *following])
            fetch_start, fetch_end = pos, gap_end
            if gap_end > self.size - TAIL_READ and not following:
                # The end of the file: take the whole tail in one request (a zip's
                # end-of-central-directory, then its central directory, are read here).
                before = max([s + len(d) for s, d in self._spans if s + len(d) <= pos],
                             default=0)
                fetch_start = min(pos, max(before, self.size - TAIL_READ))
                fetch_end = self.size
            data = self._fetch(fetch_start, fetch_end - fetch_start)
            self._keep(fetch_start, data)
            parts.append(data[pos - fetch_start: gap_end - fetch_start])
            pos = gap_end
        return b"".join(parts)

    def close(self) -> None:
        self._spans = []

    def __enter__(self) -> HttpReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- cache --------------------------------------------------------------------------
    def _span_at(self, pos: int) -> tuple[int, bytes] | None:
        for start, data in self._spans:
            if start <= pos < start + len(data):
                return start, data
        return None

    def _keep(self, start: int, data: bytes) -> None:
        if data and len(data) <= MAX_CACHED_SPAN:
            self._spans.append((start, data))

    # -- fetching -----------------------------------------------------------------------
    def _fetch(self, start: int, length: int) -> bytes:
        """Bytes ``[start, start + length)``, clipped to the file; the first call also
        learns the size."""
        resp = self._get(f"bytes={start}-{start + length - 1}", length)
        if resp.oversize or (resp.status == 200 and len(resp.body) > MAX_WHOLE_BODY):
            if resp.status == 206:
                raise SourceError(f"{self.name}: the server sent more than the range asked")
            raise SourceError(
                f"{self.name}: the server does not answer range requests (HTTP 200 with the "
                f"whole file, over {MAX_WHOLE_BODY >> 20} MiB); paramctl reads only metadata: "
                "download the file first")
        if resp.status == 200:  # no range support, but a small file: it is all here
            self._learn_size(len(resp.body))
            return resp.body[start: start + length]
        raw = resp.headers.get("Content-Range", "")
        first, _, total = raw.removeprefix("bytes").strip().partition("/")
        if not total.isdigit():
            raise SourceError(f"{self.name}: the server gave no file size (Content-Range "
                              f"{raw!r:.60}); cannot read it by ranges")
        self._learn_size(int(total))
        if resp.status == 416:  # asked from 0 in an empty file
            if self.size != 0:
                raise SourceError(f"{self.name}: HTTP 416 (range not satisfiable) for a "
                                  "range inside the file")
            return b""
        begin = first.split("-", 1)[0]
        expect = max(0, min(start + length, self.size) - start)
        if begin != str(start) or len(resp.body) < expect:
            raise CorruptFileError(f"{self.name}: truncated response: asked for {expect} "
                                   f"bytes at offset {start}, got {len(resp.body)}")
        return resp.body[:expect]

    def _learn_size(self, total: int) -> None:
        if self.size < 0:
            self.size = total
        elif total != self.size:
            raise CorruptFileError(f"{self.name}: the file changed while being read "
                                   f"({self.size} bytes, now {total})")

    def _get(self, byte_range: str, want: int) -> _Response:
        """GET with ``Range``, following redirects and retrying transient failures. Only
        200, 206 and 416 come back; anything else raises."""
        limit = max(want, MAX_WHOLE_BODY)
        settings = self.settings
        problem = ""
        delay = 0.0
        for attempt in range(TRIES):
            if attempt:
                time.sleep(delay)
            delay = settings.backoff * 2 ** attempt * (1 + 0.1 * random.random())
            try:
                resp = self._follow(byte_range, limit)
            except _Truncated as exc:
                problem = f"truncated response ({exc.got} of {exc.want} bytes)"
                continue
            except http.client.IncompleteRead as exc:
                problem = (f"truncated response ({len(exc.partial)} bytes, then the "
                           "connection closed)")
                continue
            except TimeoutError:
                problem = f"no answer within {settings.read_timeout:g} s"
                continue
            except socket.gaierror as exc:
                host = urlsplit(self._location or self.url).hostname
                raise SourceError(f"{self.name}: cannot resolve host {host}: "
                                  f"{exc.strerror}") from None
            except (OSError, http.client.HTTPException) as exc:
                if type(exc).__name__ == "SSLCertVerificationError":
                    raise SourceError(f"{self.name}: TLS certificate check failed: "
                                      f"{exc}") from None
                host = urlsplit(self._location or self.url).netloc
                problem = f"connection to {host} failed: {_describe(exc)}"
                continue
            if resp.status in (200, 206, 416):
                return resp
            if resp.status not in RETRY_STATUSES:
                raise self._status_error(resp)
            problem = f"HTTP {resp.status} {resp.reason}".rstrip()
            wait = _retry_after(resp.headers)
            if wait is not None:
                if wait > RETRY_AFTER_CAP:
                    raise HttpError(f"{self.name}: {problem} (the server asks to retry after "
                                    f"{wait:.0f} s)", resp.status)
                delay = max(delay, wait)
        if problem.startswith("truncated"):
            raise CorruptFileError(f"{self.name}: {problem}, after {TRIES} tries")
        status = int(problem.split()[1]) if problem.startswith("HTTP ") else 0
        raise HttpError(f"{self.name}: {problem}, after {TRIES} tries", status)

    def _follow(self, byte_range: str, limit: int) -> _Response:
        """One attempt: the request and its redirect chain."""
        remembered = self._location is not None
        url = self._location or self.url
        for _ in range(2):
            headers = self._headers_for(url, byte_range)
            for _hop in range(MAX_REDIRECTS + 1):
                resp = _request_once(url, headers, limit, self.settings)
                if resp.status not in REDIRECT_STATUSES:
                    break
                location = resp.headers.get("Location")
                if not location:
                    raise SourceError(f"{self.name}: HTTP {resp.status} redirect without "
                                      "a Location")
                url = _quote_url(urljoin(url, location))
                headers = self._headers_for(url, byte_range)
            else:
                raise SourceError(f"{self.name}: more than {MAX_REDIRECTS} redirects")
            if remembered and resp.status in (401, 403, 404, 410):
                # A remembered CDN location may have expired: start over from the original.
                self._location, remembered, url = None, False, self.url
                continue
            break
        if url != self.url and resp.status in (200, 206, 416):
            self._location = url
        return resp

    def _headers_for(self, url: str, byte_range: str) -> dict[str, str]:
        headers = {**self.headers, "Range": byte_range}
        if not _same_origin(url, self.url):
            headers.pop("Authorization", None)
        return headers

    def _status_error(self, resp: _Response) -> HttpError:
        status = resp.status
        code = resp.headers.get("X-Error-Code")
        if status in (401, 403):
            text = f"access denied (HTTP {status})"
        elif status == 404:
            text = "not found (HTTP 404)"
        else:
            text = f"HTTP {status} {resp.reason}".rstrip()
        detail = resp.headers.get("X-Error-Message")
        if detail and status not in (401, 403, 404):
            text += f": {' '.join(detail.split())[:160]}"
        return HttpError(f"{self.name}: {text}", status, code)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
