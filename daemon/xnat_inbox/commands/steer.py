"""`xnat-inbox pause`, `resume` and `cancel`: requests written into the state database, which
the running daemon reads every tick (and a stopped one when it starts). Whoever may write the
state database (the service's account, root) may run them."""

from __future__ import annotations

import os
import pwd
import sqlite3
import sys
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from ..config import SiteConfig
from ..service.cancel import request_cancel
from ..service.lease import holder
from ..service.pause import holds, record_pause, recorded_pauses, remove_pauses
from ..service.state import DB_NAME, State
from .when import WhenError, until


class SteerError(Exception):
    """The request can't be made; the message says why and what to do."""


def invoking_user() -> str:
    """The login name of the user running the command (from the uid, not the environment)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid {os.getuid()}"


def open_state(config: SiteConfig) -> State:
    try:
        return State(config.state_dir)
    except (OSError, sqlite3.Error) as exc:
        raise SteerError(f"cannot open the state database {config.state_dir / DB_NAME}: {exc}; "
                         "run this as the service's account (e.g. sudo -u xnat-inbox "
                         "xnat-inbox …) or as root") from None


def steer(config: SiteConfig, command: str, args: Any) -> int:
    """Run pause, resume or cancel; print what was done (or why not) and return the exit code."""
    try:
        state = open_state(config)
        try:
            if command == "cancel":
                lines, code = cancel(config, state, args.drops)
            else:
                lines, code = pause(config, state, command, args), 0
        finally:
            state.close()
    except (SteerError, WhenError, sqlite3.Error) as exc:
        print(f"xnat-inbox {command}: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, SteerError | sqlite3.Error) else 2
    for line in lines:
        print(line, file=sys.stderr if line.startswith(f"xnat-inbox {command}:") else sys.stdout)
    return code


def pause(config: SiteConfig, state: State, command: str, args: Any) -> list[str]:
    names = _destinations(config, args.destination, args.all, command)
    running = holder(config.state_dir) is not None
    if command == "resume":
        lifted = set(remove_pauses(state, None if args.all else names[0]))
        lines = [f"{name}: resumed" if name in lifted else f"{name}: was not paused"
                 for name in names]
        # a send window is the config's: resume does not open it
        for name, hold in holds(config.destinations, {}, datetime.now().timestamp()).items():
            if name in names:
                lines.append(f"{name}: still {hold.describe()} (its send_window in the site "
                             "config; edit it there to send at other hours)")
        return lines
    now = datetime.now().astimezone()
    ends = until(args.until, now).timestamp() if args.until else None
    by = invoking_user()
    for name in names:
        record_pause(state, name, args.reason, ends, by)
    paused = recorded_pauses(state)
    after = ("the running daemon finishes the instance in flight, then sends nothing to it; "
             "its drops wait in order") if running else \
        "the daemon is not running: the pause holds from its start"
    return [f"{name}: {paused[name].describe()}" for name in names] + [after]


def _destinations(config: SiteConfig, name: str | None, every: bool, command: str) -> list[str]:
    known = sorted(config.destinations)
    if every == (name is not None):
        raise SteerError(f"name one destination or give --all (the site config defines: "
                         f"{', '.join(known)})")
    if every:
        return known
    if name not in config.destinations:
        raise SteerError(f"unknown destination {name!r}; the site config defines: "
                         f"{', '.join(known)}")
    return [name]


def cancel(config: SiteConfig, state: State, wanted: list[str]) -> tuple[list[str], int]:
    """Ask for each drop named (as `status` names it: its path in the inbox, its name, its id,
    or its path on disk) to go to failed/; nothing is deleted, `retry` brings it back."""
    claimed = _claimed(config, state)
    running = holder(config.state_dir) is not None
    by = invoking_user()
    lines, code = [], 0
    for text in wanted:
        found = [drop for drop in claimed if _names(drop, text)]
        if len(found) != 1:
            code = 1
            lines.append(f"xnat-inbox cancel: {text}: " + (
                "no drop waiting or sending has that name, id or path (`xnat-inbox status` "
                "lists them; a drop still settling is not claimed yet: move it out of the "
                "inbox instead)" if not found else "names several drops: " + "; ".join(
                    f"{d['origin']} in {d['inbox']} (id {d['id']})" for d in found)
                + "; give the id"))
            continue
        drop = found[0]
        request_cancel(state, drop["id"], by)
        when = ("the daemon moves it to failed/ now, or at its next instance if it is "
                "sending") if running else "the daemon is not running: it moves it to failed/ " \
            "when it starts"
        lines.append(f"{drop['origin']} in {drop['inbox']} (id {drop['id']}): cancel requested; "
                     f"{when}; `xnat-inbox retry` brings it back")
    return lines, code


def _claimed(config: SiteConfig, state: State) -> list[dict[str, Any]]:
    """Drops claimed and not finished that are still in their work areas."""
    work = {str(inbox.path): inbox.work for inbox in config.inboxes}
    return [drop | {"area": work[drop["inbox"]] / drop["id"]} for drop in state.unfinished()
            if drop["inbox"] in work and os.path.lexists(work[drop["inbox"]] / drop["id"])]


def _names(drop: dict[str, Any], text: str) -> bool:
    if text in (drop["id"], drop["origin"], PurePosixPath(drop["origin"]).name):
        return True
    path = Path(os.path.abspath(text))
    return path == Path(drop["inbox"]) / drop["origin"] or path == drop["area"] or \
        drop["area"] in path.parents
