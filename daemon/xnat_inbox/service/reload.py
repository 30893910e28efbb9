"""SIGHUP: re-read the site config. A valid one takes over for every drop claimed from then
on; drops in flight finish with the config they started with, and the old config's senders
are closed once they have. An invalid one is refused with the reason in the log, and the
running config stays in force.

This module decides; the daemon applies (`Daemon.apply_config`). route.yaml files need no
reload: they are read for every drop.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..config import WORK_PARTS, ConfigError, InboxConfig, SiteConfig, load_config
from ..fsops import held
from ..intake.claim import Identity, work_folder
from ..logs import get_logger
from ..outcome.finish import outcome_folder

#: settings a running daemon can't change (where its state lives, its scan processes)
RESTART_ONLY = ("state_dir", "scan_processes", "scan_memory_limit")

log = get_logger(step="reload")


class InboxError(Exception):
    """The config is valid but an inbox can't be used as it stands (e.g. it is missing)."""


@dataclass(frozen=True)
class InboxChanges:
    """What a new config changes in the inboxes being watched."""

    stop: list[InboxConfig]   # watched now, removed or with other settings: stop watching
    watch: list[InboxConfig]  # settings changed: watch again (their claimed drops are in flight)
    adopt: list[InboxConfig]  # new: resume what an earlier run left claimed there, then watch


def load_for_reload(path: Path) -> tuple[SiteConfig, set[Identity]] | None:
    """The config file, loaded, and its inboxes prepared (with the identities of our own
    folders); None (logged) if it is refused."""
    try:
        new = load_config(path)
        own = prepare_inboxes(new)
    except (ConfigError, InboxError) as exc:
        log.error("config reload refused; the running config stays in force",
                  config=str(path), reason=str(exc))
        return None
    return new, own


def prepare_inboxes(config: SiteConfig) -> set[Identity]:
    """What start-up and every reload check: each inbox exists; our own folders in it are
    ours (made now if missing). Returns their (device, inode), which are never drops."""
    own: set[Identity] = set()
    for index, inbox in enumerate(config.inboxes):
        if not inbox.path.is_dir():
            raise InboxError(f"{config.source}: inboxes[{index}].path {inbox.path} is not a "
                             "folder; create it (writable by the daemon's user) or fix the path")
        for folder, make in ((inbox.work, lambda i=inbox: work_folder(i)),
                             (inbox.done, lambda i=inbox: outcome_folder(i, True)),
                             (inbox.failed, lambda i=inbox: outcome_folder(i, False))):
            try:
                with held(make()) as fd:
                    info = os.fstat(fd)
            except OSError as exc:
                raise InboxError(f"{config.source}: inboxes[{index}]: cannot create {folder}: "
                                 f"{exc.strerror}; make the inbox writable by the daemon's "
                                 "user (see docs/operations.md)") from None
            own.add((info.st_dev, info.st_ino))
        with held(os.open(inbox.path / WORK_PARTS[0], os.O_RDONLY | os.O_DIRECTORY)) as fd:
            info = os.fstat(fd)
            own.add((info.st_dev, info.st_ino))
    return own


def inbox_changes(old: SiteConfig, new: SiteConfig,
                  watched: Iterable[InboxConfig]) -> InboxChanges:
    for key in RESTART_ONLY:
        if getattr(old, key) != getattr(new, key):
            log.warning("this setting takes effect at the next restart", key=key,
                        running=str(getattr(old, key)), configured=str(getattr(new, key)))
    wanted = {inbox.path: inbox for inbox in new.inboxes}
    watched = list(watched)
    kept = {inbox.path for inbox in watched if wanted.get(inbox.path) == inbox}
    stop = [inbox for inbox in watched if inbox.path not in kept]
    for inbox in stop:
        if inbox.path not in wanted:
            log.info("no longer watching", inbox=str(inbox.path))
    old_paths = {inbox.path for inbox in old.inboxes}
    fresh = [inbox for inbox in new.inboxes if inbox.path not in kept]
    return InboxChanges(stop=stop,
                        watch=[inbox for inbox in fresh if inbox.path in old_paths],
                        adopt=[inbox for inbox in fresh if inbox.path not in old_paths])


def log_reloaded(config: SiteConfig) -> None:
    log.info("config reloaded", config=str(config.source), inboxes=len(config.inboxes),
             destinations=sorted(config.destinations))
    log_warnings(config)


#: the kernel's guard against hard links to files the linking user can't read (Debian: 1)
PROTECTED_HARDLINKS = Path("/proc/sys/fs/protected_hardlinks")


def warn_if_links_unprotected() -> None:
    """Symbolic links are never followed, but a hard link is the file itself: inbox users
    could link a file they can't read into a drop if the kernel let them."""
    try:
        unprotected = PROTECTED_HARDLINKS.read_text().strip() == "0"
    except OSError:
        return
    if unprotected:
        log.warning("the kernel lets users hard-link files they can't read into an inbox: set "
                    "fs.protected_hardlinks=1 (sysctl)", setting=str(PROTECTED_HARDLINKS))


def log_warnings(config: SiteConfig) -> None:
    """What `check` warns about, in the journal at start and after a reload."""
    for warning in config.warnings():
        log.warning("config warning", config=str(config.source), warning=warning)
