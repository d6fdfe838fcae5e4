"""UrlFetcher over HTTP(S) with requests: every hop checked by ``UrlPolicy``, and the
connection made to the address the check resolved (a pinned connection; TLS still
verifies the certificate against the URL's host name).

Redirects are followed here, one at a time, each target checked like the first;
credentials from the URL go to its own origin only. No proxy from the environment is
used (it would connect somewhere else than the address checked). Time limits: the
connect and read timeouts per socket operation, and between reads the caller's deadline
(``core/deadlines.py``, which the import narrows to its own overall limit).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from urllib.parse import urljoin

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from bmi_server.core import deadlines
from bmi_server.core.errors import (
    BmiError,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unavailable,
)

from .url_guard import Target, UrlPolicy

log = logging.getLogger(__name__)

REDIRECTS = (301, 302, 303, 307, 308)
CHUNK_BYTES = 1 << 20


class HttpFetcher:
    def __init__(
        self,
        policy: UrlPolicy,
        *,
        max_bytes: int,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        max_redirects: int = 5,
    ) -> None:
        self.policy = policy
        self.max_bytes = max_bytes
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_redirects = max_redirects

    def open(self, url: str) -> HttpDownload:
        target = self.policy.check(url)
        for _hop in range(self.max_redirects + 1):
            deadlines.check(f"fetch {target.shown}")
            session = _pinned_session(target.address)
            try:
                response = self._get(session, target)
                if response.status_code in REDIRECTS:
                    location = response.headers.get("Location", "")
                    response.close()
                    target = self._redirected(target, location)
                    continue
                return self._download(session, response, target)
            except BaseException:
                session.close()
                raise
        raise PermissionDenied(
            f"{target.shown}: more than {self.max_redirects} redirects; not followed"
        )

    def _get(self, session: requests.Session, target: Target) -> requests.Response:
        left = deadlines.remaining()
        read = self.read_timeout if left is None else max(min(self.read_timeout, left), 0.1)
        try:
            return session.get(
                target.url,
                stream=True,
                allow_redirects=False,
                auth=target.auth,
                timeout=(min(self.connect_timeout, read), read),
                # The digest is of the file as stored: no transfer compression.
                headers={"Accept-Encoding": "identity", "User-Agent": "bmi-server"},
            )
        except requests.RequestException as e:
            raise Unavailable(f"cannot fetch {target.shown}: {_reason(e)}") from None

    def _redirected(self, target: Target, location: str) -> Target:
        if not location:
            raise Unavailable(f"{target.shown}: a redirect without a Location")
        try:
            following = urljoin(target.url, location)
            nxt = self.policy.check(following)
        except (PermissionDenied, InvalidArgument) as e:
            raise PermissionDenied(f"{target.shown} redirects elsewhere: {e.message}") from None
        if nxt.auth is None and nxt.origin == target.origin:
            # Credentials stay with the origin they were given for.
            nxt = dataclasses.replace(nxt, auth=target.auth)
        log.info("URL import: %s redirects to %s", target.shown, nxt.shown)
        return nxt

    def _download(
        self, session: requests.Session, response: requests.Response, target: Target
    ) -> HttpDownload:
        status = response.status_code
        if 400 <= status < 500:
            response.close()
            raise FailedPrecondition(f"{target.shown} answered HTTP {status}")
        if status != 200:
            response.close()
            raise Unavailable(f"{target.shown} answered HTTP {status}")
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            response.close()
            raise FailedPrecondition(
                f"{target.shown} sent the file {encoding}-encoded although asked not to"
            )
        total = _length(response.headers.get("Content-Length"))
        if total is not None and total > self.max_bytes:
            response.close()
            raise InvalidArgument(
                f"{target.shown} is {total} bytes, more than this server's limit for URL "
                f"imports ({self.max_bytes} bytes)"
            )
        return HttpDownload(session, response, target.shown, total, self.max_bytes)


class HttpDownload:
    def __init__(
        self,
        session: requests.Session,
        response: requests.Response,
        shown: str,
        total: int | None,
        max_bytes: int,
    ) -> None:
        self._session = session
        self._response = response
        self._shown = shown
        self.total_bytes = total
        self._cap = total if total is not None else max_bytes

    def chunks(self) -> Iterator[bytes]:
        raw = self._response.raw
        received = 0
        what = f"fetch {self._shown}"
        while True:
            deadlines.check(what)
            try:
                # read1: returns after one receive, so the deadline is looked at again
                # at least once per read timeout, however slowly the server sends.
                chunk = raw.read1(CHUNK_BYTES, decode_content=False)
            except BmiError:
                raise
            except Exception as e:  # urllib3's timeouts, resets, incomplete reads
                raise Unavailable(
                    f"the download of {self._shown} broke off after {received} bytes: "
                    f"{_reason(e)}"
                ) from None
            if not chunk:
                return
            received += len(chunk)
            if received > self._cap:
                raise Unavailable(
                    f"{self._shown} sent more than "
                    f"{'it announced' if self.total_bytes is not None else 'the limit'} "
                    f"({self._cap} bytes)"
                )
            yield chunk

    def close(self) -> None:
        self._response.close()
        self._session.close()


def _length(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def _reason(error: BaseException) -> str:
    """A short cause without the URL (urllib3 puts the full URL, credentials and all,
    into its messages)."""
    text = type(error).__name__
    for cause in (error, error.__cause__, error.__context__):
        if isinstance(cause, requests.Timeout) or "timed out" in str(cause).lower():
            return "timed out"
        if isinstance(cause, ConnectionRefusedError) or "refused" in str(cause).lower():
            return "connection refused"
    if "IncompleteRead" in str(error) or "incomplete" in text.lower():
        return "the connection closed before the end"
    return text


def _pinned_session(address: str) -> requests.Session:
    """A session whose connections all go to ``address`` whatever the URL's host name."""

    class Http(HTTPConnection):
        def _new_conn(self):
            self._dns_host = address
            return super()._new_conn()

    class Https(HTTPSConnection):
        def _new_conn(self):
            self._dns_host = address
            return super()._new_conn()

    class HttpPool(HTTPConnectionPool):
        ConnectionCls = Http

    class HttpsPool(HTTPSConnectionPool):
        ConnectionCls = Https

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": HttpPool, "https": HttpsPool}

    session = requests.Session()
    session.trust_env = False  # no proxies, no .netrc: only what the URL says
    adapter = Adapter(max_retries=0, pool_connections=1, pool_maxsize=1)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
