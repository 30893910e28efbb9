"""Where the XNAT sender may send a request: paths under /data/ on the configured origin only.

XNAT's answers name where the data went (the import's prearchive entry, a commit's Location,
the archive's session) and the sender's next requests, with the session cookie, go there.
Glued to the base URL unchecked, an answer such as `@other-host:port/data/...` would move the
request, cookie and all, to another host; so every path is checked here first."""

from __future__ import annotations

import re
from urllib.parse import SplitResult, unquote, urlsplit

#: RFC 3986 path characters: no '?', '#', '\\', spaces or control characters
PATH_CHARACTERS = re.compile(r"/data/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")
MAX_LENGTH = 2048
SHOWN_LENGTH = 200
DEFAULT_PORTS = {"http": 80, "https": 443}


class RefusedUri(ValueError):
    """A URI that is not a path under /data/ on the destination's origin; says why."""


def data_path(base: str, uri: str) -> str:
    """`uri` as a path under /data/ relative to `base` (the destination's url without its
    trailing slash): as given when it is such a path, or taken from an absolute URL on base's
    scheme, host, port and path. Anything else raises RefusedUri."""
    if len(uri) > MAX_LENGTH:
        raise RefusedUri(f"longer than {MAX_LENGTH} characters")
    path = uri if uri.startswith("/") and not uri.startswith("//") else _on_origin(base, uri)
    if not PATH_CHARACTERS.fullmatch(path):
        raise RefusedUri("not a plain path under /data/")
    segments = path.split("/")[1:]
    if "" in segments[:-1]:
        raise RefusedUri("an empty path segment ('//')")
    # the server (or a proxy) decodes %2e and %2f, so '..' is looked for in decoded segments
    for segment in (unquote(s) for s in segments):
        if segment in (".", "..") or "/" in segment or "\\" in segment:
            raise RefusedUri("a '.' or '..' segment, or an encoded '/' or '\\'")
    return path


def _on_origin(base: str, uri: str) -> str:
    """The path of absolute URL `uri` relative to `base`, if both have the same origin."""
    try:
        given, ours = urlsplit(uri), urlsplit(base)
        same = (given.scheme.lower() == ours.scheme.lower() and "@" not in given.netloc
                and _host_port(given) == _host_port(ours))
    except ValueError:  # a malformed host or port
        same = False
    if not same:
        raise RefusedUri("neither a path under /data/ nor a URL on the destination's origin")
    if given.query or given.fragment:
        raise RefusedUri("a query or fragment in the URI")
    prefix = ours.path.rstrip("/")
    if not given.path.startswith(prefix + "/data/"):
        raise RefusedUri(f"not under {prefix}/data/")
    return given.path[len(prefix):]


def _host_port(parts: SplitResult) -> tuple[str, int | None]:
    return (parts.hostname or "").lower(), parts.port or DEFAULT_PORTS.get(parts.scheme.lower())


def shown(uri: str) -> str:
    """The URI fit to quote in a log or report: no user:password@, no session id, printable,
    and short."""
    text = re.sub(r"[^\s/@]+@", "***@", uri)
    text = re.sub(r"(?i)(jsessionid=)[^/?#;&]*", r"\1***", text)
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= SHOWN_LENGTH else text[:SHOWN_LENGTH] + "..."
