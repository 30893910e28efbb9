"""Credentials of an XNAT destination: a password or an alias token, read from a file,
`$CREDENTIALS_DIRECTORY` (systemd's LoadCredential=) or ~/.netrc, never from the config itself.

Secrets travel wrapped in `Secret`, whose str/repr never show the value, so a secret can't
reach a log line, a report or an exception message by accident.
(To be reconciled with the systemd branch's secrets.py at merge.)
"""

from __future__ import annotations

import base64
import netrc
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests
import requests.auth

from ..config import XnatDestination
from ..logs import get_logger

log = get_logger(step="send")


class CredentialError(Exception):
    """No usable credentials; the message says where we looked (never what we found)."""


class Secret:
    """A password or token secret; shows as '****' wherever it is printed."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('****')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret is not pickled")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Credentials:
    username: str  # a user name, or a token's alias
    secret: Secret
    kind: str  # "password" or "token"
    source: str  # where they came from (a path or "netrc"), for messages

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
    from_systemd = _credentials_directory_file(d.credential or (
        configured.name if configured else None))
    path = from_systemd or configured
    if path is not None:
        return _from_file(path, d.username, kind, warn_mode=path is not from_systemd)
    if d.credential:
        raise CredentialError(f"destination {name}: credential {d.credential!r} not found in "
                              "$CREDENTIALS_DIRECTORY (set LoadCredential= in the unit)")
    return _from_netrc(name, d, home or Path.home())


def _credentials_directory_file(credential: str | None) -> Path | None:
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory or not credential:
        return None
    path = Path(directory) / credential
    return path if path.is_file() else None


def _from_file(path: Path, username: str | None, kind: str, warn_mode: bool) -> Credentials:
    try:
        info = path.stat()
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CredentialError(f"cannot read the {kind} file {path}: {exc.strerror}") from None
    if warn_mode and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("credentials file is readable by others; chmod 600 it", path=str(path),
                    mode=oct(stat.S_IMODE(info.st_mode)))
    value = text.strip()
    lines = value.splitlines()
    if not value or len(lines) > 1:
        raise CredentialError(f"the {kind} file {path} must hold exactly one line")
    user, colon, secret = value.partition(":")
    if kind == "token" and colon and user:
        return Credentials(user, Secret(secret), kind, str(path))
    if not username:
        raise CredentialError(f"{path}: set username (or the token alias) in the destination")
    return Credentials(username, Secret(value), kind, str(path))


def _from_netrc(name: str, d: XnatDestination, home: Path) -> Credentials:
    host = urlsplit(d.url).hostname or ""
    path = Path(os.environ.get("NETRC") or home / ".netrc")
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except FileNotFoundError:
        entry = None
    except (OSError, netrc.NetrcParseError) as exc:
        raise CredentialError(f"cannot read {path}: {type(exc).__name__}") from None
    if not entry or not entry[2]:
        raise CredentialError(
            f"destination {name}: no credentials: set password_file or token_file, "
            f"credential ($CREDENTIALS_DIRECTORY), or a 'machine {host}' line in {path}")
    login = entry[0] or d.username
    if d.username and login != d.username:
        log.warning("netrc login differs from username; using netrc's", host=host)
    if not login:
        raise CredentialError(f"{path}: the 'machine {host}' entry has no login")
    return Credentials(login, Secret(entry[2]), "password", "netrc")
