"""The site config (config.yaml) and route templates (route.yaml): their schema and loading."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydicom.datadict import keyword_dict

from . import notifyconfig as notices
from .allow import OVERWRITE_LEVELS, InboxAllow, breaches, exceeds, known_phi_allow
from .patterns import PatternError, UserPattern
from .sendwindow import SendWindowText
from .templates import Template, TemplateError
from .yamlfile import ConfigError, load_yaml, validate

DEFAULT_CONFIG_PATH = Path("/etc/xnat-inbox/config.yaml")
ROUTE_FILE = "route.yaml"
#: a route is a few hundred bytes, written by any inbox user: larger ones are refused unread
ROUTE_MAX_BYTES = 64 * 1024
#: the site config, written by the admin, may be longer (many inboxes) and use aliases
CONFIG_MAX_BYTES = 1024 * 1024
#: the least scan_memory_limit a worker can start with (it maps ~200 MiB before reading)
MIN_SCAN_MEMORY = 512 * 2**20
LABEL_KEYS = ("project", "subject", "session")
#: the daemon's work area below each inbox (claimed drops)
WORK_PARTS = (".xnat-inbox", "work")

#: the most a transcoded instance's pixel data may take once decoded (transcode_max_bytes)
TRANSCODE_MAX_BYTES = 2**30

#: 1-16 printable ASCII characters, no backslash, not only spaces
AETitle = Annotated[str, StringConstraints(
    min_length=1, max_length=16, pattern=r"^[ -\[\]-~]*[!-\[\]-~][ -\[\]-~]*$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryPolicy(Strict):
    """How long a destination's transient failures are retried before a drop goes to failed/."""

    max_attempts: int = Field(100, ge=1)
    initial_backoff: float = Field(10.0, gt=0, description="seconds before the first retry")
    max_backoff: float = Field(900.0, gt=0, description="longest wait between two attempts")
    give_up_after: float = Field(172800.0, gt=0, description="seconds since the first attempt")


class DicomDestination(Strict):
    """A DICOM storage SCP, e.g. the site's XNAT DICOM receiver."""

    type: Literal["dicom"]
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    called_ae: AETitle = "ANY-SCP"
    calling_ae: AETitle = "XNAT_INBOX"
    connect_timeout: float = Field(10.0, gt=0)
    acse_timeout: float = Field(30.0, gt=0)
    dimse_timeout: float = Field(60.0, gt=0)
    network_timeout: float = Field(60.0, gt=0)
    max_pdu: int = Field(131072, ge=0, description="our maximum receive PDU; 0 = unlimited")
    associations: int = Field(1, ge=1, le=8, description="parallel associations per study; "
                              "more than 1 needs a receiver that accepts them at once")
    association_close_delay: float = Field(
        5.0, ge=0, le=600, description="seconds an association stays open after a drop for "
        "the next one (as Orthanc's DicomAssociationCloseDelay); 0: released at once")
    send_window: SendWindowText = None
    transcode: Literal["when_refused", "never", "uncompressed"] = Field(
        "when_refused", description="when_refused: each file in its own transfer syntax where "
        "the receiver takes it, else decoded to an uncompressed one it takes; never: a refused "
        "syntax fails those files; uncompressed: every file goes uncompressed")
    transcode_max_bytes: int = Field(TRANSCODE_MAX_BYTES, gt=0, description="the largest "
                                     "decoded pixel data an instance may have to be transcoded")
    retry: RetryPolicy = RetryPolicy()


class XnatDestination(Strict):
    """XNAT's REST import service (what the Compressed Uploader and Desktop Client use)."""

    type: Literal["xnat"]
    # before url, so that url's check sees it
    allow_http: bool = Field(False, description="true: a plain http:// url is accepted "
                             "(with a warning); the password and session cross unencrypted")
    url: str = Field(pattern=r"^https?://[^/?#@\s]+(/[^?#\s]*)?$",
                     description="site URL, e.g. https://xnat.example.org (no credentials)")
    username: str | None = Field(None, min_length=1)
    password_file: Path | None = None
    token_file: Path | None = None  # "alias:secret", or the secret with username = alias
    credential: str | None = Field(None, pattern=r"^[^/]+$",
                                   description="file name in $CREDENTIALS_DIRECTORY")
    dest: Literal["prearchive", "archive"] = "prearchive"
    overwrite: Literal["none", "append", "delete"] = "none"
    verify_tls: bool | Path = True  # or a CA bundle
    connect_timeout: float = Field(10.0, gt=0)
    read_timeout: float = Field(600.0, gt=0, description="seconds of silence from XNAT")
    max_parallel: int = Field(1, ge=1, le=8, description="series zips uploaded at once")
    study_zip_max_files: int = Field(100, ge=0, description="smaller studies go as one zip")
    compression: Literal["stored", "deflate"] = "stored"
    send_window: SendWindowText = None
    # XNAT's importer reads the common compressed syntaxes: files go as they are by default
    transcode: Literal["never", "uncompressed"] = Field(
        "never", description="never: files as they are; uncompressed: compressed, big endian "
        "and deflated files decoded to Explicit VR Little Endian in the zip")
    transcode_max_bytes: int = Field(TRANSCODE_MAX_BYTES, gt=0)
    retry: RetryPolicy = RetryPolicy()

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict) and ({"password", "token", "secret"} & data.keys()):
            raise ValueError("inline passwords and tokens are not allowed (the config is "
                             "world-readable): use password_file, token_file, credential "
                             "($CREDENTIALS_DIRECTORY) or ~/.netrc")
        return data

    @field_validator("url")
    @classmethod
    def _https_unless_allowed(cls, value: str, info: ValidationInfo) -> str:
        if value.startswith("http://") and not info.data.get("allow_http"):
            raise ValueError(
                "a plain http:// url sends the password and the session cookie unencrypted: "
                "use https://, or add allow_http: true to this destination if the network "
                "path is trusted (e.g. a test server on loopback)")
        return value

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def plain_http(self) -> bool:
        return self.url.startswith("http://")


Destination = Annotated[DicomDestination | XnatDestination, Field(discriminator="type")]


def _user_pattern(value: Any) -> Any:
    if isinstance(value, UserPattern):
        return value
    try:
        return UserPattern.compile(str(value))
    except PatternError as exc:
        raise ValueError(str(exc)) from None


#: a regular expression from a route file, run by RE2 (linear time: see patterns.py)
Pattern = Annotated[UserPattern, BeforeValidator(_user_pattern)]


class SeriesFilter(Strict):
    """Regular expressions over series attributes (XNAT's "Series Import Filters")."""

    include: dict[str, Pattern] = {}
    exclude: dict[str, Pattern] = {}

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    @field_validator("include", "exclude", mode="before")
    @classmethod
    def _keywords(cls, value: Any) -> Any:
        for keyword in value if isinstance(value, dict) else ():
            if keyword not in keyword_dict:
                raise ValueError(f"{keyword!r} is not a DICOM keyword (e.g. SeriesDescription)")
        return value


class RouteTemplate(Strict):
    """One route.yaml (or an inbox's inline route): every key optional, children override."""

    destination: str | None = None
    project: Template | None = None
    subject: Template | None = None
    session: Template | None = None
    clean_labels: bool | None = None
    routing_field: Literal["study_description", "patient_comments"] | None = None
    ignore_unparsable: bool | None = None
    series: SeriesFilter | None = None
    dest: Literal["prearchive", "archive"] | None = None  # xnat: overrides the destination's
    overwrite: Literal["none", "append", "delete"] | None = None  # xnat: likewise
    # de-identification and the PHI guard (deidentify.py)
    deidentify: Literal["off", "basic"] | None = None  # basic: PS3.15 E.1-1, outgoing copy only
    label_source: Literal["original", "deidentified"] | None = None
    phi_guard: Literal["reject", "warn", "off"] | None = None
    phi_allow: list[str] | None = None  # keywords (or "private") the guard lets through
    phi_allow_patient_name: Pattern | None = None  # an allowed PatientName pattern
    notify: list[notices.RouteNotice] | None = None  # site targets by name (notifyconfig.py)

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    @field_validator("project", "subject", "session", mode="before")
    @classmethod
    def _parse_template(cls, value: Any) -> Any:
        if value is None or isinstance(value, Template):
            return value
        if not isinstance(value, str | int):
            raise ValueError("expected a label or a template string such as \"{PatientID}\"")
        try:
            return Template.parse(str(value))
        except TemplateError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("destination")
    @classmethod
    def _known_destination(cls, value: str | None, info: ValidationInfo) -> str | None:
        known = (info.context or {}).get("destinations")
        if value is not None and known is not None and value not in known:
            names = ", ".join(sorted(known)) or "none are configured"
            raise ValueError(f"unknown destination {value!r}; the site config defines: {names}")
        return value

    @field_validator("phi_allow")
    @classmethod
    def _known_keywords(cls, value: list[str] | None) -> list[str] | None:
        return known_phi_allow(value)

    def keys_set(self) -> dict[str, Any]:
        """The keys this route sets (not None), with their values."""
        return {key: value for key, value in self if value is not None}

    def merged_over(self, parent: RouteTemplate) -> RouteTemplate:
        """This route's keys, falling back to `parent`'s for keys it leaves out; notify
        entries add to the parent's (a lab's contact beside the department's)."""
        update = self.keys_set()
        if self.notify is not None and parent.notify:
            update["notify"] = [*parent.notify, *self.notify]
        return parent.model_copy(update=update)


class ArchiveLimits(Strict):
    """What an archive drop may unpack to before it is refused (zip bombs, runaway sizes)."""

    max_bytes: int = Field(100 * 2**30, gt=0, description="bytes unpacked in all")
    max_entries: int = Field(200_000, gt=0)
    max_ratio: float = Field(200.0, gt=1, description="unpacked bytes per archive byte")


class InboxConfig(Strict):
    path: Path
    poll: Literal["auto"] | bool = "auto"
    poll_interval: float = Field(2.0, gt=0)
    settle_seconds: float | None = Field(None, ge=0)
    ready_marker: str | None = Field(None, min_length=1, pattern=r"^[^/]+$")
    done_dir: Path | None = None
    failed_dir: Path | None = None
    route: RouteTemplate | None = None
    archives: ArchiveLimits = ArchiveLimits()
    allow: InboxAllow = InboxAllow()  # what a route.yaml here may ask for
    #: where this inbox sits in the site config ("/etc/xnat-inbox/config.yaml inboxes[1]"),
    #: for messages that send the reader there
    config_key: str = Field("inboxes[?]", exclude=True)
    #: the site config's named notify targets, which a route here may use
    notice_targets: dict[str, notices.NoticeTarget] = Field({}, exclude=True)

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    @model_validator(mode="after")
    def _route_within_allow(self) -> InboxConfig:
        asked = self.route.keys_set() if self.route else {}
        problems = [f"route.{b.key}: {b.asked} goes past allow.{b.limit_key} ({b.limit}); "
                    "change one of the two" for b in breaches(asked, self.allow)]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @field_validator("poll", mode="before")
    @classmethod
    def _poll_mode(cls, value: Any) -> Any:
        if value == "auto" or isinstance(value, bool):
            return value
        raise ValueError(f"expected auto, true or false, got {value!r}")

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError(f"expected an absolute path, got {str(value)!r}")
        return value

    @property
    def done(self) -> Path:
        return self.done_dir or self.path / "done"

    @property
    def failed(self) -> Path:
        return self.failed_dir or self.path / "failed"

    @property
    def work(self) -> Path:
        # inside the inbox, so the claim rename stays on one file system
        return self.path.joinpath(*WORK_PARTS)

    def reserved(self) -> tuple[Path, ...]:
        """Folders in or beside the inbox that hold our own files and are never drops."""
        return (self.path / WORK_PARTS[0], self.done, self.failed)


class SiteConfig(Strict):
    state_dir: Path
    settle_seconds: float = Field(30.0, ge=0)
    log_phi: bool = False
    #: a drop with no progress for this long means a stuck worker: systemd's watchdog restarts us
    hung_worker_seconds: float = Field(900.0, ge=0, description="0: never")
    #: processes that unpack drops and read their headers beside the daemon (see
    #: scan_workers); 0: in its own, where a hostile drop costs the daemon, not a worker
    scan_processes: int = Field(2, ge=0, le=32)
    #: each scan worker's address space (RLIMIT_AS) in bytes: a bomb costs a worker; 0: none
    scan_memory_limit: int = Field(2 * 2**30, description="bytes; 0: no limit")
    #: a worker reading one drop for longer is stopped (the drop is set aside after a few);
    #: keep it below hung_worker_seconds, or the watchdog restarts the daemon first
    scan_timeout: float = Field(600.0, ge=0, description="seconds; 0: no limit")
    destinations: dict[str, Destination] = Field(min_length=1)
    inboxes: list[InboxConfig] = Field(min_length=1)
    #: the site secret that keys de-identification's UID remapping (a file or a credential name)
    deid_secret_file: str | None = None
    notify: notices.NoticeTargets = []  # notices of every inbox's drops
    metrics: notices.MetricsConfig | None = None
    source: Path = Field(Path("config.yaml"), exclude=True)

    @model_validator(mode="after")
    def _inboxes_are_distinct(self) -> SiteConfig:
        paths = [inbox.path.resolve() for inbox in self.inboxes]
        for i, path in enumerate(paths):
            for j, other in enumerate(paths):
                if i != j and (path == other or other in path.parents):
                    raise ValueError(
                        f"inboxes[{i}].path {path} lies inside inboxes[{j}].path {other}")
        return self

    @field_validator("scan_memory_limit")
    @classmethod
    def _room_to_read(cls, value: int) -> int:
        if value and value < MIN_SCAN_MEMORY:
            raise ValueError(f"expected 0 (no limit) or at least {MIN_SCAN_MEMORY} bytes: a scan "
                             "worker needs about 200 MiB of address space before it reads a "
                             "byte; the default is 2147483648 (2 GiB)")
        return value

    @model_validator(mode="after")
    def _deid_has_secret(self) -> SiteConfig:
        if self.deid_secret_file is None and any(
                (inbox.route and inbox.route.deidentify not in (None, "off"))
                or inbox.allow.deidentify_floor != "off" for inbox in self.inboxes):
            raise ValueError("an inbox route sets deidentify (or an inbox's allow sets "
                             "deidentify_floor) but deid_secret_file is missing: add "
                             "deid_secret_file (a file holding the site secret, or a "
                             "LoadCredential= name)")
        return self

    @model_validator(mode="after")
    def _overwrite_within_allow(self) -> SiteConfig:
        """A route that leaves overwrite out sends with the inline route's or the
        destination's: that must be within every inbox that may send there."""
        for index, inbox in enumerate(self.inboxes):
            if inbox.route and inbox.route.overwrite:
                continue  # the inline route's own, within its allow (see InboxConfig)
            for name, destination in self.destinations.items():
                if isinstance(destination, XnatDestination) and \
                        inbox.allow.allows_destination(name) and \
                        exceeds(destination.overwrite, inbox.allow.overwrite, OVERWRITE_LEVELS):
                    default = "" if "overwrite" in inbox.allow.model_fields_set else \
                        ", the default"
                    raise ValueError(
                        f"destinations.{name}.overwrite is {destination.overwrite}, more than "
                        f"inboxes[{index}].allow.overwrite ({inbox.allow.overwrite}{default}): "
                        "allow it there, set a lower overwrite in "
                        f"inboxes[{index}].route, or take {name} out of "
                        f"inboxes[{index}].allow.destinations")
        return self

    def warnings(self) -> list[str]:
        """What the config allows but should not stay so: for `check` and the journal."""
        return [f"destination {name}: {destination.url} is plain http (allow_http: true): the "
                "password and the session cookie cross the network unencrypted; use https://"
                for name, destination in self.destinations.items()
                if isinstance(destination, XnatDestination) and destination.plain_http] + \
            notices.notify_warnings(self.notify, self.metrics)

    def settle_for(self, inbox: InboxConfig) -> float:
        return self.settle_seconds if inbox.settle_seconds is None else inbox.settle_seconds


def load_config(path: Path) -> SiteConfig:
    """Read and validate the site config; raises ConfigError naming file, line and key."""
    # the admin's file: anchors and aliases may share settings between inboxes (bounded)
    data, lines = load_yaml(path, max_bytes=CONFIG_MAX_BYTES, allow_aliases=True)
    names = data.get("destinations") if isinstance(data, dict) else None
    context = {"destinations": set(names) if isinstance(names, dict) else None,
               "notice_targets": notices.target_names(data)}
    config = validate(SiteConfig, data, path, lines, context)
    targets = {target.name: target for target in config.notify if target.name}
    inboxes = [inbox.model_copy(update={"config_key": f"{path} inboxes[{index}]",
                                        "notice_targets": targets})
               for index, inbox in enumerate(config.inboxes)]
    return config.model_copy(update={"source": path, "inboxes": inboxes})


def load_route(path: Path, destinations: set[str] | None,
               content: bytes | None = None) -> RouteTemplate:
    """Read one route.yaml (or parse its `content`, already read: at most ROUTE_MAX_BYTES of
    it, see yamlfile.read_limited); `destinations` are the names its `destination` may take.
    Any inbox user may write one: no anchors or aliases, and at most ROUTE_MAX_BYTES."""
    data, lines = load_yaml(path, content, max_bytes=ROUTE_MAX_BYTES, allow_aliases=False)
    return validate(RouteTemplate, data, path, lines, {"destinations": destinations})


__all__ = [
    "CONFIG_MAX_BYTES",
    "DEFAULT_CONFIG_PATH",
    "LABEL_KEYS",
    "ROUTE_FILE",
    "ROUTE_MAX_BYTES",
    "WORK_PARTS",
    "ArchiveLimits",
    "ConfigError",
    "Destination",
    "DicomDestination",
    "InboxAllow",
    "InboxConfig",
    "RetryPolicy",
    "RouteTemplate",
    "SeriesFilter",
    "SiteConfig",
    "XnatDestination",
    "load_config",
    "load_route",
]
