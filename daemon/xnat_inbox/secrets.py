"""Secrets (an XNAT password or token): read from systemd credentials, a private file, or
~/.netrc; never taken from the command line, and never shown.

Where a secret comes from, in this order:
1. `$CREDENTIALS_DIRECTORY/<name>`: the unit's `LoadCredential=<name>:/etc/xnat-inbox/…`
   (systemd copies the file there, readable by the service alone);
2. a file path (`password_file:` / `token_file:`), which should have mode 0600: a warning
   names the file when group or other users may read it;
3. the password of `machine <host>` in ~/.netrc.

The value comes back as a `Secret`, whose repr and str never show it; it is also registered
with logs.py, so it is masked wherever it might still reach a log line, a report or an
exception's text.
"""

from __future__ import annotations

import netrc
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

from .logs import SECRET_MASK, get_logger, register_secret

CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"

log = get_logger(step="secrets")


class SecretError(Exception):
    """A secret could not be read; the message says where we looked, never a value."""


class Secret:
    """A secret value that doesn't show itself: `reveal()` is the only way to the value."""

    __slots__ = ("_value", "login", "source")

    def __init__(self, value: str, source: str = "", login: str | None = None) -> None:
        self._value = value
        self.source = source  # where it came from, for messages: a path or a credential name
        self.login = login  # the netrc login, when the secret came from ~/.netrc

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret(source={self.source!r})"

    def __str__(self) -> str:
        return SECRET_MASK

    def __format__(self, spec: str) -> str:
        return format(SECRET_MASK, spec)

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret is not pickled: it would be written out in clear")


def read_secret(name_or_path: str | Path | None, *, host: str | None = None,
                environ: Mapping[str, str] | None = None,
                netrc_file: Path | None = None, multiline: bool = False) -> Secret:
    """The secret named `name_or_path` (a credential name or a file), else `host`'s password
    in the netrc file (default ~/.netrc); SecretError says what was tried. `multiline`: the
    file may hold several lines (e.g. a webhook's headers)."""
    environ = os.environ if environ is None else environ
    tried: list[str] = []
    if name_or_path:
        text = str(name_or_path)
        credential = _credential_path(text, environ)
        if credential is not None and credential.is_file():
            return _remember(Secret(_read_file(credential, multiline), f"credential {text}"))
        if credential is not None:
            tried.append(f"{credential} (from LoadCredential=)")
        if "/" in text:
            path = Path(text).expanduser()
            if path.exists() or host is None:
                _warn_if_readable_by_others(path)
                return _remember(Secret(_read_file(path, multiline), str(path)))
            tried.append(str(path))
        elif credential is None:
            tried.append(f"credential {text} (${CREDENTIALS_ENV} is not set: add "
                         f"LoadCredential={text}:/path/to/file to the unit)")
    if host:
        return _from_netrc(host, netrc_file or Path.home() / ".netrc", tried)
    raise SecretError("no secret found; tried " + "; ".join(tried or ["nothing"]))


def _credential_path(name: str, environ: Mapping[str, str]) -> Path | None:
    folder = environ.get(CREDENTIALS_ENV)
    if not folder or "/" in name:
        return None
    return Path(folder) / name


def _read_file(path: Path, multiline: bool = False) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SecretError(f"cannot read the secret file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SecretError(f"the secret file {path} is not UTF-8 text") from None
    value = text.rstrip("\r\n")  # files written with `echo` end with a newline
    if not value:
        raise SecretError(f"the secret file {path} is empty")
    if "\n" in value and not multiline:
        raise SecretError(f"the secret file {path} holds more than one line; "
                          "write the password or token alone")
    return value


def _warn_if_readable_by_others(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # _read_file says why
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("secret file is readable by other users; make it private",
                    path=str(path), mode=f"{stat.S_IMODE(mode):04o}", fix=f"chmod 600 {path}")


def _from_netrc(host: str, path: Path, tried: list[str]) -> Secret:
    if not path.is_file():
        tried.append(f"machine {host} in {path} (no such file)")
        raise SecretError("no secret found; tried " + "; ".join(tried))
    _warn_if_readable_by_others(path)
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except netrc.NetrcParseError as exc:
        # its message may quote a token of the file, which may be a password
        raise SecretError(f"cannot parse {path}: line {exc.lineno}") from None
    except OSError as exc:
        raise SecretError(f"cannot read {path}: {exc.strerror}") from None
    if entry is None or not entry[2]:
        tried.append(f"machine {host} in {path} (no password for it)")
        raise SecretError("no secret found; tried " + "; ".join(tried))
    login, _, password = entry
    return _remember(Secret(password, f"{path} machine {host}", login or None))


def _remember(secret: Secret) -> Secret:
    register_secret(secret.reveal())
    return secret
