"""HTTP(S) plumbing shared by the http, registry and s3 backends: a thread-safe keep-alive connection pool
over :mod:`http.client` (optionally through a forward proxy, :mod:`.proxy`), and the checks that turn a ranged
response into exactly the bytes asked for.

Every socket wait (connect, send, each receive of a body) is cut to the time left before the caller's
:func:`~.deadline.deadline`, and a body is read one receive at a time, checking the deadline between receives: a
server trickling bytes cannot stretch a request past it (the status line and headers are bounded per receive).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from erofs.reader.backend import BackendStats

from .deadline import PermanentFailure, time_left
from .proxy import PROXY_FAILURE_STATUSES, ProxyRoute
from .retry import RETRY_STATUSES, TempFailure, describe, is_temp_failure, parse_retry_after

USER_AGENT = "nydus-erofs-cachefilesd-py"
_PIECE = 1 << 20  # read/discard granularity
_DRAIN_LIMIT = 64 << 10  # bodies at most this long are read to keep the connection; longer ones close it
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.I)
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int


@dataclass(frozen=True)
class Hop:
    """Where a pooled connection goes: straight to ``origin``, or to the proxy ``via`` (``tunnel``: through a
    CONNECT tunnel to ``origin``, for https; else requests in absolute form, any http origin)."""

    origin: Origin
    via: Origin | None = None
    tunnel: bool = False


def http_url_parts(url: str) -> SplitResult | None:
    """``url`` split, if it is an absolute http(s) URL with a host (and a valid port if any); else None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts


def split_url(url: str) -> tuple[Origin, str]:
    """(origin, request target) of an absolute http(s) URL."""
    parts = http_url_parts(url)
    if parts is None:
        raise PermanentFailure(f"unsupported URL {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return Origin(parts.scheme, parts.hostname, port), target


class Response:
    """A response whose connection goes back to the pool once its body is consumed (or is closed)."""

    def __init__(
        self,
        transport: Transport,
        hop: Hop,
        conn: http.client.HTTPConnection,
        resp: http.client.HTTPResponse,
        url: str,
    ) -> None:
        self._transport = transport
        self._hop = hop
        self._conn: http.client.HTTPConnection | None = conn
        self._resp = resp
        self.url = url
        self.status = resp.status
        self.reason = resp.reason
        self.headers = resp.headers

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        if value is None or self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return None
        try:
            n = int(value)
        except ValueError:
            raise TempFailure(f"bad Content-Length {value!r}") from None
        if n < 0:
            raise TempFailure(f"bad Content-Length {value!r}")
        return n

    def _bound(self) -> None:
        """Cut the socket's wait to the time left before the deadline (DeadlineExceeded once it passed)."""
        conn = self._conn
        if conn is not None and conn.sock is not None:
            conn.sock.settimeout(time_left(self._transport._socket_timeout(self._hop)))

    def read_exact(self, n: int) -> bytes:
        """Exactly ``n`` body bytes; a body ending early is a temporary failure (truncated transfer)."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        try:
            while got < n:
                self._bound()  # one receive at a time: each waits at most the time left
                piece = self._resp.read1(min(n - got, _PIECE))
                if not piece:
                    break
                k = len(piece)
                view[got : got + k] = piece
                got += k
        except http.client.IncompleteRead:
            pass
        except BaseException as e:
            self._broken(describe(e))
            raise
        if got < n:
            self._broken("body cut short")
            raise TempFailure(f"body truncated: got {got} of {n} bytes")
        return bytes(buf)

    def _broken(self, why: str) -> None:
        """The body failed: drop the connection, and tell the transport (a proxy's failure makes it fall back)."""
        self.close()
        self._transport._body_failed(self._hop, why)

    def read_upto(self, limit: int) -> bytes:
        """The whole body, which must be at most ``limit`` bytes (PermanentFailure if longer); then release."""
        length = self.content_length
        if length is not None and length > limit:
            self.close()
            raise PermanentFailure(f"response body of {length} bytes is over the limit of {limit}")
        if length is not None:
            data = self.read_exact(length)
        else:
            try:
                data = self._resp.read(limit + 1)
            except BaseException:
                self.close()
                raise
            if len(data) > limit:
                self.close()
                raise PermanentFailure(f"response body is over the limit of {limit} bytes")
        self.release()
        return data

    def discard(self, n: int) -> int:
        """Read and drop ``n`` body bytes, returns how many (fewer only at end of body)."""
        left = n
        try:
            while left:
                self._bound()
                piece = self._resp.read1(min(left, _PIECE))
                if not piece:
                    break
                left -= len(piece)
        except BaseException as e:
            self._broken(describe(e))
            raise
        return n - left

    def text(self, limit: int = 4096) -> str:
        """A short body (error JSON), then release or close the connection."""
        length = self.content_length
        if length is not None and length > _DRAIN_LIMIT:
            self.close()
            return ""
        try:
            data = self._resp.read(limit if length is None else length)
        except (OSError, http.client.HTTPException):
            self.close()
            return ""
        self.release()
        return data[:limit].decode("utf-8", "replace")

    def release(self) -> None:
        """Give the connection back if the body was consumed entirely, else close it."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._resp.isclosed() and not self._resp.will_close:
            self._transport._put(self._hop, conn)
        elif not self._resp.isclosed() and self._resp.length is not None and self._resp.length <= _DRAIN_LIMIT:
            try:
                self._resp.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                return
            if self._resp.will_close:
                conn.close()
            else:
                self._transport._put(self._hop, conn)
        else:
            conn.close()

    def close(self) -> None:
        """Drop the connection (body not wanted, or broken)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


@dataclass(frozen=True)
class TransportOptions:
    """How to connect: the one list of connection options, taken by :class:`Transport` and (as keywords) by
    :class:`~.http.HttpBackend`, :class:`~.registry.RegistryBackend` and ``make_backend("http"/"registry", ...)``.

    ``timeout``: seconds a connected socket waits for the server (each read or write; the whole request is bounded
    by the caller's :func:`~.deadline.deadline`: a fill's, ``fill_timeout``); ``connect_timeout``: seconds to wait
    for a connection; ``pool_size``: idle keep-alive connections kept per origin; ``insecure``: no TLS
    certificate or host name verification; ``ca_file``: a PEM bundle of CAs to trust instead of the system's.
    ``proxy``, ``proxy_fallback``, ``proxy_timeout``, ``proxy_check_interval``: an HTTP forward proxy tried first,
    and when to go around it (:mod:`.proxy` says how).
    """

    timeout: float = 30.0
    connect_timeout: float = 5.0
    pool_size: int = 8
    insecure: bool = False
    ca_file: str | None = None
    proxy: str | None = None
    proxy_fallback: bool = True
    proxy_timeout: float = 5.0
    proxy_check_interval: float = 5.0


class Transport:
    """Keep-alive connections per origin, at most ``options.pool_size`` idle ones each; safe across threads."""

    def __init__(
        self,
        options: TransportOptions | None = None,
        *,
        stats: BackendStats | None = None,
        user_agent: str = USER_AGENT,
    ) -> None:
        self.options = options if options is not None else TransportOptions()
        self.stats = stats if stats is not None else BackendStats()
        self.user_agent = user_agent
        self._ssl: ssl.SSLContext | None = None
        self._idle: dict[Hop, list[http.client.HTTPConnection]] = {}
        self.proxy: ProxyRoute | None = None
        self._proxy_origin: Origin | None = None
        opts = self.options
        if opts.proxy:
            self.proxy = ProxyRoute(opts.proxy, fallback=opts.proxy_fallback, timeout=opts.proxy_timeout,
                                    check_interval=opts.proxy_check_interval)  # fmt: skip
            self._proxy_origin = split_url(self.proxy.url)[0]
        self._lock = threading.Lock()
        self._closed = False

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context(cafile=self.options.ca_file)
            if self.options.insecure:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._ssl = ctx
        return self._ssl

    def _connect(self, hop: Hop) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        origin, target = hop.origin, hop.via or hop.origin
        timeout = time_left(self.options.connect_timeout if hop.via is None else self._socket_timeout(hop))
        if origin.scheme == "https" and (hop.via is None or hop.tunnel):
            conn = http.client.HTTPSConnection(target.host, target.port, timeout=timeout, context=self._context())
            if hop.tunnel:
                conn.set_tunnel(origin.host, origin.port)
        else:
            conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
        try:
            conn.connect()
        except BaseException:
            conn.close()
            raise
        return conn

    def _socket_timeout(self, hop: Hop) -> float:
        """How long a socket of ``hop`` waits for the server: a proxy's stall limit, else ``timeout``."""
        if hop.via is not None:
            assert self.proxy is not None
            return self.proxy.timeout
        return self.options.timeout

    def _get(self, hop: Hop) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            idle = self._idle.get(hop)
            if idle:
                return idle.pop(), True
        return self._connect(hop), False

    def _put(self, hop: Hop, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(hop, [])
            if not self._closed and len(idle) < self.options.pool_size:
                idle.append(conn)
                return
        conn.close()

    def request(
        self, method: str, url: str, headers: Mapping[str, str] | None = None, body: bytes | None = None
    ) -> Response:
        """Send one request and return its response (headers read, body pending).

        A pooled connection the server closed meanwhile is replaced transparently, once.  With a proxy, the
        request goes through it first, and to the origin when the proxy fails (:mod:`.proxy`)."""
        origin, target = split_url(url)
        hdrs = {"User-Agent": self.user_agent, **(headers or {})}
        if body is not None:
            hdrs.setdefault("Content-Length", str(len(body)))
        proxy = self.proxy
        if proxy is not None and proxy.usable():
            tunnel = origin.scheme == "https"
            hop = Hop(origin, self._proxy_origin, tunnel)
            try:
                resp = self._send(hop, method, target if tunnel else url, hdrs, body, url)
            except Exception as e:  # the proxy's trouble (a CONNECT refused too), or what the origin would give
                if not (is_temp_failure(e) or isinstance(e, OSError | http.client.HTTPException)):
                    raise
                proxy.failed(describe(e))
                if not proxy.fallback:
                    raise
            else:
                self.stats.add(proxied=1)
                if resp.status not in PROXY_FAILURE_STATUSES:
                    proxy.succeeded()
                    return resp
                proxy.failed(f"HTTP {resp.status} {resp.reason}")
                if not proxy.fallback:
                    return resp
                resp.text()
            self.stats.add(fallbacks=1)
        return self._send(Hop(origin), method, target, hdrs, body, url)

    def _send(self, hop: Hop, method: str, target: str, hdrs: Mapping[str, str], body: bytes | None,
              url: str) -> Response:  # fmt: skip
        while True:
            conn, reused = self._get(hop)
            self.stats.add(requests=1)
            try:
                if conn.sock is not None:
                    conn.sock.settimeout(time_left(self._socket_timeout(hop)))
                conn.request(method, target, body=body, headers=hdrs)
                resp = conn.getresponse()
            except _STALE:
                conn.close()
                if reused:
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            return Response(self, hop, conn, resp, url)

    def _body_failed(self, hop: Hop, why: str) -> None:
        """A response body through ``hop`` broke off: if that was through the proxy, it failed."""
        if hop.via is not None and self.proxy is not None:
            self.proxy.failed(why)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()


def status_failure(resp: Response, what: str = "") -> Exception:
    """The exception for an unexpected status: temporary for 408/429/502/503/504, permanent otherwise.

    The body (registry error JSON) is read briefly for its first error code and message."""
    detail = ""
    body = resp.text()
    if body:
        try:
            errors = json.loads(body).get("errors") or []
            if errors:
                e = errors[0]
                detail = f": {e.get('code', '')} {e.get('message', '')}".rstrip()
        except (ValueError, AttributeError):
            pass
    where = f" {what}" if what else ""
    message = f"HTTP {resp.status} {resp.reason}{detail}{where}".replace("\n", " ")
    if resp.status in RETRY_STATUSES:
        return TempFailure(message, parse_retry_after(resp.header("Retry-After")))
    return PermanentFailure(message)


def parse_content_range(value: str | None) -> tuple[int, int, int | None]:
    """(first, last, total or None) of ``Content-Range: bytes a-b/t``."""
    m = _CONTENT_RANGE.match(value or "")
    if not m:
        raise TempFailure(f"206 with bad Content-Range {value!r}")
    first, last = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if last < first or (total is not None and last >= total):
        raise TempFailure(f"206 with bad Content-Range {value!r}")
    return first, last, total


def range_body(
    resp: Response, offset: int, length: int, *, stats: BackendStats, max_discard: int
) -> tuple[bytes, int | None]:
    """The body of a 2xx answer to ``Range: bytes=offset-(offset+length-1)``: (exactly ``length`` bytes,
    blob size if the response told it).

    206 must cover exactly the range; 200 (Range ignored) is read through, dropping up to ``max_discard``
    leading bytes.  A range past the end of the blob is a permanent failure, a short body a temporary one."""
    try:
        return _range_body(resp, offset, length, stats, max_discard)
    except BaseException:
        resp.close()  # a no-op once released
        raise


def _range_body(
    resp: Response, offset: int, length: int, stats: BackendStats, max_discard: int
) -> tuple[bytes, int | None]:
    end = offset + length - 1
    if resp.status == 206:
        if (resp.header("Content-Type") or "").lower().startswith("multipart/"):
            resp.close()
            raise PermanentFailure("server answered a single range with multipart/byteranges")
        first, last, total = parse_content_range(resp.header("Content-Range"))
        if first != offset or last != end:
            resp.close()
            if first == offset and total is not None and last == total - 1 and last < end:
                raise PermanentFailure(f"range {offset}+{length} is past the end of the blob (size {total})")
            raise TempFailure(f"asked bytes {offset}-{end}, server sent {first}-{last}")
        clen = resp.content_length
        if clen is not None and clen != length:
            resp.close()
            raise TempFailure(f"Content-Length {clen} does not match Content-Range {first}-{last}")
        data = resp.read_exact(length)
        stats.add(bytes=length)
        resp.release()
        return data, total
    # 200: the whole blob
    total = resp.content_length
    if total is not None and offset + length > total:
        resp.close()
        raise PermanentFailure(f"range {offset}+{length} is past the end of the blob (size {total})")
    if offset > max_discard:
        resp.close()
        raise PermanentFailure(f"server ignores Range requests; refusing to skip {offset} bytes (limit {max_discard})")
    skipped = resp.discard(offset)
    stats.add(bytes=skipped)
    if skipped < offset:
        resp.close()
        if total is None:
            raise PermanentFailure(f"range {offset}+{length} is past the end of the blob (size {skipped})")
        raise TempFailure(f"body truncated: got {skipped} of {total} bytes")
    data = resp.read_exact(length)
    stats.add(bytes=length)
    resp.release()  # reads a short rest to keep the connection, closes it otherwise
    return data, total


def check_digest(blob_id: str, data: bytes) -> None:
    """A whole blob must hash to its id (sha256); a mismatch is retried (corrupted in transit)."""
    got = hashlib.sha256(data).hexdigest()
    if got != blob_id:
        raise TempFailure(f"sha256 mismatch: received data hashes to {got[:16]}…")
