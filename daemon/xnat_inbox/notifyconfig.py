"""`notify:` and `metrics:` in the site config, and `notify:` in a route.yaml: their schema, and
the check of a route's notify entries against the site's targets and the inbox's `allow:`.

The site config defines every target (a webhook URL, or an SMTP server and its sender), with
any secret it needs. A route.yaml, written by inbox users, only names one of those targets
(`use:`), chooses its events, and for an email target adds recipients within the inbox's
`allow.notify_to`: so no inbox user can make the daemon POST to a URL of their choosing (a
service on the daemon's network) or send mail through the site's server to anyone outside.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    model_validator,
)

from .allow import Breach, InboxAllow

#: a drop finished in failed/, in done/, or waits (claimed, not sent) longer than `after`
NoticeEvent = Literal["failed", "done", "waiting"]
TARGET_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: a mail address one header can hold (dot-atom@domain): no spaces, commas, quotes, brackets
#: or line breaks, so a route's `to:` can never add a header or a recipient of its own
ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]*"
                     r"[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*")


def _address(value: str) -> str:
    if len(value) > 254 or not ADDRESS.fullmatch(value):
        raise ValueError(f"expected one mail address such as lab@example.org (no name, spaces, "
                         f"commas or line breaks), got {value!r}")
    return value


Address = Annotated[str, AfterValidator(_address)]
#: node_exporter's textfile collector reads only files ending in .prom
TEXTFILE_SUFFIX = ".prom"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _on_key(data: Any) -> Any:
    """YAML 1.1 reads a bare `on:` key as true (as it reads `on` as a value): it means on."""
    if isinstance(data, dict) and True in data and "on" not in data:
        return {("on" if key is True else key): value for key, value in data.items()}
    return data


class NoticeRetry(_Strict):
    """How long a notice that can't be delivered is retried (backoff with jitter)."""

    initial_backoff: float = Field(10.0, gt=0, description="seconds before the first retry")
    max_backoff: float = Field(600.0, gt=0, description="longest wait between two tries")
    give_up_after: float = Field(86400.0, gt=0, description="seconds since the first try")


class EmailSettings(_Strict):
    """An SMTP server and the notice's sender and recipients."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    to: list[Address] = []
    sender: Address = Field(alias="from")
    smtp_host: str = Field(min_length=1)
    smtp_port: int = Field(587, ge=1, le=65535)
    starttls: bool = True  # false: plain SMTP (a relay on the host itself)
    username: str | None = Field(None, min_length=1)
    #: a file holding the password on one line, or (a name without /) a LoadCredential= name
    password_file: str | None = Field(None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict) and "password" in data:
            raise ValueError("an inline password is not allowed (the config is readable by "
                             "others): use password_file (a file, or a LoadCredential= name)")
        return data

    @model_validator(mode="after")
    def _login_needs_both(self) -> EmailSettings:
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together: give both for an SMTP "
                             "login, or neither")
        return self

    @property
    def domain(self) -> str:
        return self.sender.rpartition("@")[2].lower()


class NoticeTarget(_Strict):
    """One entry of the site config's `notify:` list: a webhook or an email, and when."""

    name: str | None = Field(None, pattern=TARGET_NAME)  # how a route.yaml names it (use:)
    webhook: str | None = Field(None, pattern=r"^https?://[^/?#@\s]+(/[^#\s]*)?$")
    allow_http: bool = False  # a plain http:// webhook (with a warning)
    #: "Name: value" lines sent with every POST: a file, or a LoadCredential= name
    headers_file: str | None = Field(None, min_length=1)
    email: EmailSettings | None = None
    verify_tls: bool | Path = True  # or the path of a CA bundle
    on: list[NoticeEvent] = ["failed"]
    after: float = Field(60.0, gt=0, description="minutes a drop waits before `waiting`")
    include_phi: bool = False
    timeout: float = Field(30.0, gt=0, description="seconds for one try")
    retry: NoticeRetry = NoticeRetry()

    _on = model_validator(mode="before")(classmethod(lambda cls, data: _on_key(data)))

    @model_validator(mode="after")
    def _one_kind(self) -> NoticeTarget:
        if (self.webhook is None) == (self.email is None):
            raise ValueError("give either webhook: URL or email: {...}, not both or neither")
        if self.email is not None and (self.headers_file or self.allow_http):
            raise ValueError("headers_file and allow_http belong to a webhook target")
        if self.webhook and self.webhook.startswith("http://") and not self.allow_http:
            raise ValueError("a plain http:// webhook sends the notice (and any headers) "
                             "unencrypted: use https://, or add allow_http: true if the network "
                             "path is trusted (e.g. a receiver on loopback)")
        if self.email is not None and self.on and not self.email.to:
            raise ValueError("email.to is empty, so these notices would reach nobody: add to:, "
                             "or set on: [] for a target only route.yaml files use (with to: "
                             "of their own)")
        return self

    @property
    def kind(self) -> Literal["webhook", "email"]:
        return "webhook" if self.webhook else "email"

    @property
    def host(self) -> str:
        """Where notices go, for the log: a webhook's host (its path may hold a token), or the
        SMTP server."""
        if self.email is not None:
            return f"{self.email.smtp_host}:{self.email.smtp_port}"
        return (self.webhook or "").split("/")[2]

    def label(self, index: int) -> str:
        return self.name or f"notify[{index}]"


class RouteNotice(_Strict):
    """One entry of a route.yaml's `notify:`: a target of the site config, by name."""

    use: str = Field(pattern=TARGET_NAME)
    to: list[Address] | None = None  # email targets only: these recipients instead
    on: list[NoticeEvent] | None = None  # default: the target's own, or [failed]
    after: float | None = Field(None, gt=0, description="minutes")

    _on = model_validator(mode="before")(classmethod(lambda cls, data: _on_key(data)))


class MetricsConfig(_Strict):
    """Prometheus metrics: served over HTTP, written for node_exporter, or both."""

    listen: str | None = Field(None, description="HOST:PORT, [IPv6]:PORT, or PORT (loopback)")
    textfile: Path | None = None
    textfile_seconds: float = Field(15.0, gt=0, description="seconds between two writes")

    @model_validator(mode="after")
    def _something(self) -> MetricsConfig:
        if self.listen is None and self.textfile is None:
            raise ValueError("give listen: \"127.0.0.1:9464\" (served at /metrics), textfile: "
                             "PATH.prom (for node_exporter), or both")
        if self.listen is not None:
            listen_address(self.listen)  # raises with what is wrong
        if self.textfile is not None and (not self.textfile.is_absolute()
                                          or self.textfile.suffix != TEXTFILE_SUFFIX):
            raise ValueError(f"textfile: expected an absolute path ending in {TEXTFILE_SUFFIX} "
                             "(node_exporter's textfile collector reads only those), got "
                             f"{str(self.textfile)!r}")
        return self

    def address(self) -> tuple[str, int]:
        assert self.listen is not None
        return listen_address(self.listen)


def listen_address(text: str) -> tuple[str, int]:
    """("127.0.0.1", 9464) from "127.0.0.1:9464", "[::1]:9464" or "9464" (loopback)."""
    host, colon, port = text.rpartition(":")
    if not colon:
        host, port = "127.0.0.1", text
    host = host.removeprefix("[").removesuffix("]")
    if not port.isdigit() or not 1 <= int(port) <= 65535 or not host:
        raise ValueError(f"listen: expected HOST:PORT (e.g. 127.0.0.1:9464) or a port, got "
                         f"{text!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def unique_names(targets: list[NoticeTarget]) -> list[NoticeTarget]:
    names = [target.name for target in targets if target.name]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"notify target name(s) {', '.join(twice)} given twice: a route.yaml "
                         "names a target by it, so each must be unique")
    return targets


#: the site config's notify: list, each name at most once (a route.yaml names targets by it)
NoticeTargets = Annotated[list[NoticeTarget], AfterValidator(unique_names)]


def target_names(data: Any) -> set[str]:
    """The target names in the site config's raw data (the validation context of allow:)."""
    notify = data.get("notify") if isinstance(data, dict) else None
    return {str(t["name"]) for t in notify if isinstance(t, dict) and t.get("name")} \
        if isinstance(notify, list) else set()


def notify_warnings(targets: list[NoticeTarget], metrics: MetricsConfig | None) -> list[str]:
    """What the config allows but should not stay so (for `check` and the journal)."""
    found = [f"notify[{i}]{f' ({t.name})' if t.name else ''}: {t.host} is a plain http:// "
             "webhook (allow_http: true): notices cross the network unencrypted; use https://"
             for i, t in enumerate(targets) if t.webhook and t.webhook.startswith("http://")]
    if metrics and metrics.listen and not is_loopback(metrics.address()[0]):
        found.append(f"metrics.listen {metrics.listen} is reachable from the network: /metrics "
                     "names inboxes and destinations; keep it on loopback behind a proxy, or "
                     "limit who can reach the port")
    return found


def route_notice_problems(entries: list[RouteNotice], source: str, allow: InboxAllow,
                          where: str, targets: Mapping[str, NoticeTarget]) -> list[str]:
    """What the notify entries of one route (`source`) ask that the site doesn't offer or
    doesn't allow this inbox (`where`: its place in the site config), one message each."""
    found: list[str] = []
    for entry in entries:
        target = targets.get(entry.use)
        if target is None:
            names = ", ".join(sorted(targets)) or "none are named"
            found.append(f"{source}: notify.use: {entry.use!r} is not a target of the site "
                         f"config's notify: list ({names}); fix the name")
            continue
        breaches: list[Breach] = []
        if allow.notify_targets is not None and entry.use not in allow.notify_targets:
            breaches.append(Breach("notify.use", entry.use, "notify_targets",
                                   ", ".join(allow.notify_targets) or "none",
                                   "use one of those"))
        if entry.to is not None and target.email is None:
            found.append(f"{source}: notify.to: {entry.use} is a webhook target; only an email "
                         "target takes to:")
        elif entry.to is not None:
            patterns = allowed_recipients(allow, target)
            outside = [address for address in entry.to if not any(
                fnmatch.fnmatchcase(address.lower(), pattern.lower()) for pattern in patterns)]
            if outside:
                breaches.append(Breach("notify.to", ", ".join(outside), "notify_to",
                                       " ".join(patterns) or "none",
                                       "use addresses matching one of those"))
        found += [breach.message(source, where) for breach in breaches]
    return found


def allowed_recipients(allow: InboxAllow, target: NoticeTarget) -> list[str]:
    """Glob patterns a route's `to:` must match: the inbox's, or by default the domain of the
    target's sender (mail stays within the site's own domain)."""
    if allow.notify_to is not None:
        return list(allow.notify_to)
    return [f"*@{target.email.domain}"] if target.email else []


__all__ = [
    "TARGET_NAME",
    "Address",
    "EmailSettings",
    "MetricsConfig",
    "NoticeEvent",
    "NoticeRetry",
    "NoticeTarget",
    "NoticeTargets",
    "RouteNotice",
    "allowed_recipients",
    "is_loopback",
    "listen_address",
    "notify_warnings",
    "route_notice_problems",
    "target_names",
    "unique_names",
]
