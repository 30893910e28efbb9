"""SIGHUP: re-read the site config. A valid one takes over for every drop claimed from then
on; drops in flight finish with the config they started with, and the old config's senders
are closed once they have. An invalid one is refused with the reason in the log, and the
running config stays in force.

route.yaml files need no reload: they are read for every drop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import ConfigError, SiteConfig, load_config
from .logs import get_logger, set_log_phi
from .pipeline import Pipeline

if TYPE_CHECKING:
    from .service import Daemon

#: settings a running daemon can't change (where its state lives, its scan processes)
RESTART_ONLY = ("state_dir", "scan_processes")

log = get_logger(step="reload")


class ReloadError(Exception):
    """The new config is valid but can't be used as it stands (e.g. a missing inbox)."""


def reload_config(daemon: Daemon) -> bool:
    """Load, check and apply the config file the daemon was started with; False if refused."""
    path = daemon.config.source
    try:
        new = load_config(path)
        prepare_inboxes(new)
    except (ConfigError, ReloadError) as exc:
        log.error("config reload refused; the running config stays in force",
                  config=str(path), reason=str(exc))
        return False
    apply(daemon, new)
    return True


def prepare_inboxes(config: SiteConfig) -> None:
    """What Daemon.prepare checks at start-up: each inbox exists; our folders can be made."""
    for index, inbox in enumerate(config.inboxes):
        if not inbox.path.is_dir():
            raise ReloadError(f"{config.source}: inboxes[{index}].path {inbox.path} is not a "
                              "folder; create it (writable by the daemon's user) or fix the path")
        for folder in (inbox.work, inbox.done, inbox.failed):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ReloadError(f"{config.source}: inboxes[{index}]: cannot create {folder}: "
                                  f"{exc.strerror}") from None


def apply(daemon: Daemon, new: SiteConfig) -> None:
    old = daemon.config
    for key in RESTART_ONLY:
        if getattr(old, key) != getattr(new, key):
            log.warning("this setting takes effect at the next restart", key=key,
                        running=str(getattr(old, key)), configured=str(getattr(new, key)))
    wanted = {inbox.path: inbox for inbox in new.inboxes}
    unchanged = [w for w in daemon.watchers if wanted.get(w.inbox.path) == w.inbox]
    for watcher in daemon.watchers:
        if watcher not in unchanged:
            watcher.stop()
            # drops still settling come back with the new inbox settings (or not at all)
            for ref in daemon.tracker.pending():
                if ref.inbox.path == watcher.inbox.path:
                    daemon.tracker.forget(ref)
            if watcher.inbox.path not in wanted:
                log.info("no longer watching", inbox=str(watcher.inbox.path))
    daemon.watchers = unchanged
    old_paths = {inbox.path for inbox in old.inboxes}
    daemon.config = new
    daemon.replace_pipeline(Pipeline(new, daemon.state, daemon.pipeline.progress, daemon.stop,
                                     daemon.pipeline.phi_by_drop, daemon.scans))
    set_log_phi(new.log_phi)
    for inbox in new.inboxes:
        if any(w.inbox.path == inbox.path for w in unchanged):
            continue
        if inbox.path in old_paths:
            daemon.watch_inbox(inbox)  # settings changed; its claimed drops are in flight
        else:
            daemon.adopt_inbox(inbox)  # new: resume what an earlier run left claimed there
    log.info("config reloaded", config=str(new.source), inboxes=len(new.inboxes),
             destinations=sorted(new.destinations))
