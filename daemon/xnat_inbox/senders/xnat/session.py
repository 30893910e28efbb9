"""One logged-in conversation with an XNAT server: log in once (JSESSION), reuse the cookie,
log in again once on a 401, log out at the end. Every HTTP exchange is one log event, and every
failure becomes an XnatHttpError that says whether another attempt may succeed."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from http.cookiejar import DefaultCookiePolicy
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from ... import __version__
from ...config import XnatDestination
from ...logs import get_logger
from .auth import BasicAuth, CredentialError, Credentials, load_credentials
from .origin import RefusedUri, data_path, shown

log = get_logger(step="send")

#: statuses worth another attempt later: server trouble, proxies, a full disk (507)
TRANSIENT_STATUSES = frozenset({408, 425, 429, 502, 503, 504, 507})
#: 500s that are XNAT's verdict on the data, not a passing fault
PERMANENT_500 = re.compile(r"FAILED|unable to archive", re.IGNORECASE)
#: 400s that only say "not now"
TRANSIENT_400 = re.compile(r"Concurrent file sends", re.IGNORECASE)
MESSAGE_LIMIT = 400

Body = bytes | Mapping[str, str] | Callable[[], Iterable[bytes]] | None


class XnatHttpError(Exception):
    """An exchange failed; `message` is safe to show (no credentials, XNAT's own words)."""

    def __init__(self, message: str, transient: bool, status: int | None = None,
                 xnat_message: str = "") -> None:
        super().__init__(message)
        self.transient = transient
        self.status = status
        self.xnat_message = xnat_message


def is_transient(status: int, message: str) -> bool:
    if status in TRANSIENT_STATUSES:
        return True
    if status == 500:
        return not PERMANENT_500.search(message)
    return status == 400 and bool(TRANSIENT_400.search(message))


def xnat_message(response: requests.Response) -> str:
    """XNAT's error text, from plain text or an HTML status page, short and on one line."""
    text = response.text or ""
    if "html" in response.headers.get("Content-Type", "") or text.lstrip().startswith("<"):
        heading = re.search(r"<h[1-3][^>]*>(.*?)</h[1-3]>", text, re.IGNORECASE | re.DOTALL)
        text = heading.group(1) if heading else re.sub(r"<[^>]+>", " ", text)
    text = " ".join(text.split())
    return text[:MESSAGE_LIMIT] or f"HTTP {response.status_code} {response.reason or ''}".strip()


class _Counted:
    """Wraps a body generator to count the bytes that went out."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = chunks
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            self.sent += len(chunk)
            yield chunk


class XnatClient:
    def __init__(self, name: str, destination: XnatDestination) -> None:
        self.name = name
        self.destination = destination
        self.base = destination.url.rstrip("/")
        self.http = requests.Session()
        self.http.trust_env = False  # no proxies or ~/.netrc sneaking in; credentials are ours
        verify = destination.verify_tls
        self.http.verify = str(verify) if isinstance(verify, Path) else verify
        # a non-browser User-Agent: XNAT asks such clients for no CSRF token
        self.http.headers["User-Agent"] = f"xnat-inbox/{__version__}"
        self.http.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))  # we send our own
        pool = destination.max_parallel + 1
        self.http.mount(self.base, HTTPAdapter(pool_connections=1, pool_maxsize=pool,
                                               max_retries=0))
        self.timeout = (destination.connect_timeout, destination.read_timeout)
        self._lock = threading.Lock()
        self._cookie: str | None = None
        self._generation = 0  # counts logins, so parallel 401s renew only once
        self._credentials: Credentials | None = None

    @property
    def username(self) -> str:
        return self._creds().username

    def _creds(self) -> Credentials:
        if self._credentials is None:
            try:
                self._credentials = load_credentials(self.name, self.destination)
            except CredentialError as exc:
                raise XnatHttpError(str(exc), transient=False) from None
        return self._credentials

    # --- session ----------------------------------------------------------------------
    def login(self) -> None:
        with self._lock:
            self._login()

    def _login(self) -> None:
        creds = self._creds()
        self._cookie = None
        response = self._exchange("POST", "/data/JSESSION", auth=creds.basic())
        if response.status_code == 401:
            raise XnatHttpError(
                f"XNAT at {self.base} refused the {creds.kind} of {creds.username!r} (from "
                f"{creds.source}): check it, or whether the account or token is still valid",
                transient=False, status=401, xnat_message=xnat_message(response))
        self._raise_for(response, "POST", "/data/JSESSION")
        cookie = response.cookies.get("JSESSIONID") or response.text.strip()
        if not re.fullmatch(r"[A-Za-z0-9._-]{8,200}", cookie or ""):
            raise XnatHttpError(f"XNAT at {self.base} answered the login without a session id",
                                transient=True, status=response.status_code)
        self._cookie = cookie
        self._generation += 1

    def _renew(self, generation: int) -> None:
        """Log in again, unless another thread already did since `generation`."""
        with self._lock:
            if self._generation == generation:
                log.info("XNAT session expired; logging in again", destination=self.name)
                self._login()

    def ensure_login(self) -> None:
        with self._lock:
            if self._cookie is None:
                self._login()

    def logout(self) -> None:
        with self._lock:
            if self._cookie is None:
                return
            with contextlib.suppress(XnatHttpError):  # the server forgets idle ones anyway
                self._exchange("DELETE", "/data/JSESSION")
            self._cookie = None

    def close(self) -> None:
        self.logout()
        self.http.close()

    def forget_session(self) -> None:
        """After a network failure: log in afresh next time (a server that dropped the
        connection may have dropped our session too, and a stale cookie on an upload could
        otherwise fail the same way on every retry)."""
        with self._lock:
            self._cookie = None

    # --- requests ---------------------------------------------------------------------
    def request(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                body: Body = None, headers: Mapping[str, str] | None = None,
                ok: tuple[int, ...] = (200,)) -> requests.Response:
        """One call with the session cookie; on 401 log in again once and repeat it."""
        self.ensure_login()
        generation = self._generation
        response = self._exchange(method, path, params=params, body=body, headers=headers)
        if response.status_code == 401:
            self._renew(generation)
            response = self._exchange(method, path, params=params, body=body, headers=headers)
            if response.status_code == 401:
                raise XnatHttpError(f"XNAT answered 401 to {method} {path} even after a fresh "
                                    f"login as {self.username!r}", transient=False, status=401,
                                    xnat_message=xnat_message(response))
        if response.status_code not in ok:
            self._raise_for(response, method, path)
        return response

    def get_json(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        response = self.request("GET", path, params={"format": "json", **(params or {})})
        try:
            return response.json()
        except ValueError:
            raise XnatHttpError(f"GET {path}: XNAT's answer is not JSON", transient=True,
                                status=response.status_code) from None

    def data_path(self, uri: str) -> str:
        """A URI from XNAT (or our own path) as a path under /data/ on our origin; refused
        for good otherwise: the session cookie must not go anywhere else."""
        try:
            return data_path(self.base, uri)
        except RefusedUri as exc:
            raise XnatHttpError(
                f"destination {self.name}: refused to send a request to {shown(uri)!r}, which "
                f"XNAT named as a location: {exc}. Only paths under /data/ on {self.base} are "
                "followed; check the XNAT server and any proxy in front of it",
                transient=False) from None

    def _raise_for(self, response: requests.Response, method: str, path: str) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        message = xnat_message(response)
        if response.is_redirect:  # never followed: the cookie stays with our origin
            message = (f"a redirect to {shown(response.headers['Location'])!r}, not followed; "
                       "set the destination's url to where XNAT really is")
        raise XnatHttpError(f"XNAT answered {status} to {method} {path}: {message}",
                            transient=is_transient(status, message), status=status,
                            xnat_message=message)

    def _exchange(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                  body: Body = None, headers: Mapping[str, str] | None = None,
                  auth: BasicAuth | None = None) -> requests.Response:
        """Send one request and log it as one event: method, path, status, bytes, seconds."""
        url = self.base + self.data_path(path)
        all_headers = dict(headers or {})
        if self._cookie and auth is None:
            all_headers["Cookie"] = f"JSESSIONID={self._cookie}"
        counted = _Counted(body()) if callable(body) else None
        data: Any = counted if counted is not None else body
        started = time.monotonic()
        event: dict[str, Any] = {"method": method, "path": path, "destination": self.name}
        try:
            response = self.http.request(method, url, params=params, data=data,
                                         headers=all_headers, auth=auth, timeout=self.timeout,
                                         allow_redirects=False)
            _ = response.content  # read it whole now, so the seconds include it
        except Exception as exc:  # also our own body generator's StopUpload/LocalFileError
            event.update(status=None, bytes_out=_sent(counted, body), bytes_in=0,
                         seconds=round(time.monotonic() - started, 3), error=type(exc).__name__)
            log.warning("xnat http", **event)
            if not isinstance(exc, requests.RequestException):
                raise
            raise XnatHttpError(self._network_problem(method, path, exc), transient=True) \
                from None
        event.update(status=response.status_code, bytes_out=_sent(counted, body),
                     bytes_in=len(response.content), seconds=round(time.monotonic() - started, 3))
        log.info("xnat http", **event)
        return response

    def _network_problem(self, method: str, path: str, exc: requests.RequestException) -> str:
        if isinstance(exc, requests.exceptions.SSLError):
            what = "TLS verification failed (verify_tls: set a CA bundle path)"
        elif isinstance(exc, requests.ConnectTimeout):
            what = f"no connection within connect_timeout {self.timeout[0]:g} s"
        elif isinstance(exc, requests.Timeout):
            what = f"no answer within read_timeout {self.timeout[1]:g} s"
        elif isinstance(exc, requests.ConnectionError):
            resolve = re.search(r"resolve|Name or service not known", str(exc), re.IGNORECASE)
            what = "host name not found" if resolve else "connection refused, reset or dropped"
        else:
            what = type(exc).__name__
        return f"{method} {path} to {self.base}: {what}"


def _sent(counted: _Counted | None, body: Body) -> int:
    if counted is not None:
        return counted.sent
    if isinstance(body, bytes):
        return len(body)
    return 0
