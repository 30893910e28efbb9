"""Credentials of an XNAT destination: a password or an alias token, found by secrets.py in
`$CREDENTIALS_DIRECTORY` (systemd's LoadCredential=), a private file or ~/.netrc, never in the
config itself; wrapped in `Secret`, so they can't reach a log line, a report or an exception.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests
import requests.auth

from ...config import XnatDestination
from ...logs import get_logger, register_secret
from ...secrets import CREDENTIALS_ENV, Secret, SecretError, read_secret

log = get_logger(step="send")


class CredentialError(Exception):
    """No usable credentials; the message says where we looked (never what we found)."""


@dataclass(frozen=True)
class Credentials:
    username: str  # a user name, or a token's alias
    secret: Secret
    kind: str  # "password" or "token"
    source: str  # where they came from (a path, a credential or "netrc"), for messages

    def basic(self) -> BasicAuth:
        """HTTP Basic auth that reveals the secret only while it signs a request."""
        return BasicAuth(self)


class BasicAuth(requests.auth.AuthBase):
    """Unlike requests' HTTPBasicAuth, holds no plain-text password a traceback could show."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        creds = self.credentials
        token = base64.b64encode(f"{creds.username}:{creds.secret.reveal()}".encode())
        request.headers["Authorization"] = "Basic " + token.decode("ascii")
        return request


def load_credentials(name: str, destination: XnatDestination,
                     home: Path | None = None) -> Credentials:
    """$CREDENTIALS_DIRECTORY/<credential>, else password_file/token_file, else ~/.netrc."""
    d = destination
    kind = "token" if d.token_file and not d.password_file else "password"
    configured = d.password_file or d.token_file
    credential = d.credential or (configured.name if configured else None)
    host = urlsplit(d.url).hostname or ""
    try:
        secret = _from_systemd(credential) or (
            read_secret(configured) if configured else None)
        if secret is None:
            if d.credential:
                raise CredentialError(f"destination {name}: credential {d.credential!r} not "
                                      f"found in ${CREDENTIALS_ENV} (set LoadCredential= in the "
                                      "unit)")
            secret = read_secret(None, host=host, netrc_file=(home or Path.home()) / ".netrc")
            kind = "password"
    except SecretError as exc:
        raise CredentialError(f"destination {name}: no credentials: set password_file or "
                              f"token_file, credential (${CREDENTIALS_ENV}), or a 'machine "
                              f"{host}' line in ~/.netrc ({exc})") from None
    return _credentials(name, d, secret, kind)


def _from_systemd(credential: str | None) -> Secret | None:
    try:
        return read_secret(credential) if credential and "/" not in credential else None
    except SecretError:
        return None  # not handed over by systemd: the configured file comes next


def _credentials(name: str, d: XnatDestination, secret: Secret, kind: str) -> Credentials:
    source = "netrc" if secret.login is not None else secret.source
    user, colon, token_secret = secret.reveal().partition(":")
    if kind == "token" and colon and user:
        register_secret(token_secret)  # the secret half alone must be masked too
        return Credentials(user, Secret(token_secret, secret.source), kind, source)
    username = secret.login or d.username
    if secret.login and d.username and secret.login != d.username:
        log.warning("netrc login differs from username; using netrc's", destination=name)
    if not username:
        raise CredentialError(f"{secret.source}: set username (or the token alias) in the "
                              "destination")
    return Credentials(username, secret, kind, source)
