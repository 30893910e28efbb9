"""A notice POSTed as JSON to a webhook, with optional headers from a secret file.

The URL's path may hold the receiver's token (many chat webhooks work so): messages name only
its host. TLS is verified (or against a CA bundle); no redirect is followed, and nothing from
the environment (proxies, ~/.netrc) joins the request.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests

from ...logs import register_secret
from ...notifyconfig import NoticeTarget
from ...secrets import SecretError, read_secret
from .message import NoticeError

#: answers worth another try: the receiver is busy or restarting
TRANSIENT_STATUS = frozenset({408, 425, 429})
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class Webhook:
    def __init__(self, target: NoticeTarget) -> None:
        assert target.webhook is not None
        self.target = target
        self.url = target.webhook
        self.host = target.host
        self.http = requests.Session()
        self.http.trust_env = False
        self._headers: dict[str, str] | None = None

    def headers(self) -> dict[str, str]:
        """The secret file's `Name: value` lines, read once (each value masked in logs)."""
        if self._headers is None:
            self._headers = {"Content-Type": "application/json",
                             **(_read_headers(self.target.headers_file)
                                if self.target.headers_file else {})}
        return self._headers

    def send(self, body: Mapping[str, Any]) -> None:
        verify = str(self.target.verify_tls) if isinstance(self.target.verify_tls, Path) \
            else self.target.verify_tls
        try:
            answer = self.http.post(self.url, json=body, headers=self.headers(),
                                    timeout=self.target.timeout, verify=verify,
                                    allow_redirects=False)
        except requests.exceptions.SSLError:
            raise NoticeError(f"TLS to {self.host} failed (its certificate is not trusted: set "
                              "verify_tls to the CA bundle that signed it)", True) from None
        except requests.exceptions.Timeout:
            raise NoticeError(f"no answer from {self.host} within {self.target.timeout:g} s",
                              True) from None
        except requests.exceptions.RequestException as exc:
            raise NoticeError(f"cannot reach {self.host}: {_reason(exc)}", True) from None
        status = answer.status_code
        answer.close()
        if 200 <= status < 300:
            return
        if 300 <= status < 400:
            raise NoticeError(f"{self.host} answered {status} (a redirect, not followed): give "
                              "the webhook's final URL", False)
        transient = status >= 500 or status in TRANSIENT_STATUS
        raise NoticeError(f"{self.host} answered {status}", transient)

    def close(self) -> None:
        self.http.close()


def _read_headers(source: str) -> dict[str, str]:
    try:
        text = read_secret(source, multiline=True).reveal()
    except SecretError as exc:
        raise NoticeError(f"webhook headers: {exc}", True) from None
    headers: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, colon, value = line.partition(":")
        if not colon or not HEADER_NAME.match(name.strip()) or "\r" in value:
            raise NoticeError(f"webhook headers: line {number} of {source} is not "
                              "`Name: value`", False)
        headers[name.strip()] = value.strip()
        register_secret(value.strip())
    return headers


def _reason(exc: Exception) -> str:
    """The OS's reason (e.g. "Connection refused") without the URL requests quotes."""
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(exc))
    if found:
        return found.group(1).strip().rstrip(",")
    return {requests.exceptions.ConnectionError: "connection failed"}.get(
        type(exc), type(exc).__name__)
