"""HTTP client of HIL's v0 REST API, shaped by how HIL really behaves.

- Every path is under ``/v0``. HTTP Basic credentials are sent with every request up
  front: HIL never challenges (no ``WWW-Authenticate``), it just answers 401.
- Request bodies are JSON sent raw: HIL reads the raw body, so a form-encoded one would
  be dropped and the call refused with 400 ``ValidationError``.
- Answers are labelled ``text/html`` even when they are JSON, so the label is ignored;
  successful writes answer 200 (or 202) with an empty body.
- Power calls answer 307 to the out-of-band management service: the same method and
  body are sent again to ``Location`` (which carries its own token), never HIL's
  credentials.
- Timeouts, connection failures and 5xx are Unavailable. Only GETs are retried (with
  jittered exponential backoff): a repeated POST could queue a second network action.
  A timeout is not retried either: a HIL that is slow now will be slow again, and
  waiting ``attempts`` times the timeout would outlast the caller's deadline; one
  request's timeout bounds the whole call.
- Within a call with a deadline (core/deadlines.py) a request waits at most until
  shortly before it, and is not sent once it has passed (DeadlineExceeded): the caller
  then hears why, rather than its own bare deadline.
"""

from __future__ import annotations

import base64
import http.cookiejar
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urljoin

import requests

from ...core import deadlines
from ...core.errors import DeadlineExceeded, FailedPrecondition, Unavailable
from ...core.models import Credentials
from .errors import error_for

log = logging.getLogger(__name__)

API_PREFIX = "/v0"
# A request ends this long before the caller's deadline, so the answer still reaches it.
REPLY_MARGIN_SECONDS = 0.5


class _TimedOut(Unavailable):
    """HIL did not answer within the timeout (not worth retrying at once)."""


def api_path(*parts: str) -> str:
    """``api_path("node", "n 1")`` -> ``/v0/node/n%201``: every part quoted, slashes too."""
    return API_PREFIX + "".join("/" + quote(part, safe="") for part in parts)


def basic_authorization(credentials: Credentials) -> str:
    pair = f"{credentials.user}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


class HilClient:
    def __init__(
        self,
        url: str,
        account: Credentials,
        *,
        timeout: float = 10.0,
        attempts: int = 3,
        backoff: float = 0.2,
        backoff_max: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """``account`` is BMI's own HIL user, used for calls made without a caller's."""
        self.url = url.rstrip("/")
        self.account = account
        self.timeout = timeout
        self._attempts = max(1, attempts)
        self._backoff = backoff
        self._backoff_max = backoff_max
        self._sleep = sleep
        self._local = threading.local()  # one requests.Session per thread

    def get(self, path: str, *, as_: Credentials | None = None) -> Any:
        return self._call("GET", path, None, as_)

    def post(self, path: str, body: dict | None = None, *, as_: Credentials | None = None) -> Any:
        return self._call("POST", path, body, as_)

    def put(self, path: str, body: dict | None = None, *, as_: Credentials | None = None) -> Any:
        return self._call("PUT", path, body, as_)

    # -- plumbing ----------------------------------------------------------------------

    def _call(self, method: str, path: str, body: dict | None, who: Credentials | None) -> Any:
        attempts = self._attempts if method == "GET" else 1
        for attempt in range(attempts):
            try:
                return self._once(method, path, body, who or self.account)
            except _TimedOut:
                raise
            except Unavailable as exc:
                if attempt == attempts - 1:
                    raise
                delay = random.uniform(0, min(self._backoff_max, self._backoff * 2**attempt))
                log.info("%s; retrying in %.2fs", exc.message, delay)
                self._sleep(delay)
        raise AssertionError("unreachable")

    def _once(self, method: str, path: str, body: dict | None, who: Credentials) -> Any:
        request = f"{method} {path}"
        data = None if body is None else json.dumps(body)
        headers = {"Authorization": basic_authorization(who)}
        if data is not None:
            headers["Content-Type"] = "application/json"
        response = self._send(method, self.url + path, data, headers, request)
        if response.status_code in (307, 308):
            response = self._hand_off(method, response, data, request)
        if not 200 <= response.status_code < 300:
            raise error_for(response.status_code, response.text, request)
        text = response.text.strip()
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            raise Unavailable(f"HIL answered {request} with something that is not JSON") from None

    def _hand_off(
        self, method: str, response: requests.Response, data: str | None, request: str
    ) -> requests.Response:
        location = response.headers.get("Location")
        if not location:
            raise Unavailable(f"HIL redirected {request} without a Location")
        # The out-of-band management service authorises by the token in Location; HIL's
        # credentials must not travel there.
        headers = {"Content-Type": "application/json"} if data is not None else {}
        target = urljoin(response.url, location)
        answer = self._send(method, target, data, headers, f"{request} (hand-off)")
        if 300 <= answer.status_code < 400:
            raise FailedPrecondition(f"HIL's hand-off of {request} redirected again")
        return answer

    def _timeout(self, request: str) -> tuple[float, bool]:
        """(seconds to wait for an answer, whether the caller's deadline set them)."""
        left = deadlines.remaining()
        if left is None or left - REPLY_MARGIN_SECONDS >= self.timeout:
            return self.timeout, False
        if left - REPLY_MARGIN_SECONDS <= 0:
            raise DeadlineExceeded(f"the call's deadline left no time to ask HIL {request}")
        return left - REPLY_MARGIN_SECONDS, True

    def _send(
        self, method: str, url: str, data: str | None, headers: dict[str, str], request: str
    ) -> requests.Response:
        started = time.monotonic()
        timeout, by_caller = self._timeout(request)
        try:
            response = self._session().request(
                method, url, data=data, headers=headers, timeout=timeout,
                allow_redirects=False,
            )
        except requests.Timeout:
            if by_caller:
                raise DeadlineExceeded(
                    f"HIL did not answer {request} before the call's deadline ({timeout:.1f}s)"
                ) from None
            raise _TimedOut(f"HIL did not answer {request} within {self.timeout:g}s") from None
        except requests.RequestException as exc:
            reason = " ".join(str(exc).split())[:200]
            raise Unavailable(f"cannot reach HIL for {request}: {reason}") from None
        log.debug("%s -> %d in %.3fs", request, response.status_code, time.monotonic() - started)
        return response

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            # Only what is configured here: no proxies or .netrc credentials from the
            # environment (a .netrc entry would replace the caller's credentials).
            session.trust_env = False
            # Callers share sessions: no cookie may carry one caller's state to the next.
            session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
            self._local.session = session
        return session
