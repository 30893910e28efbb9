"""`xnat-inbox status`: what the daemon is doing now.

Read from the daemon's lease (is it running, since when), its state database (drops settling,
claimed, sent; destinations' health) and the outcome folders. Every figure is about now: a
stopped daemon settles and sends nothing and knows nothing of its destinations; a drop that was
retried since it failed is no longer in failed/, so it is no longer listed there.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from ..config import SiteConfig
from ..intake.watch import existing_drops
from ..service.lease import holder
from ..service.pause import holds, recorded_pauses
from ..service.state import State

#: done drops listed by name in the text output (all of them with --json)
DONE_LISTED = 10


def status(config: SiteConfig, as_json: bool) -> int:
    """Print the status; 0 when the daemon runs, 1 when it does not."""
    state = State(config.state_dir)
    try:
        summary = gather(config, state)
    finally:
        state.close()
    print(json.dumps(summary, indent=2) if as_json else "\n".join(status_lines(summary)))
    return 0 if summary["daemon"]["running"] else 1


def gather(config: SiteConfig, state: State, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    running = holder(config.state_dir)
    daemon = {"running": running is not None, "pid": running.pid if running else None,
              "since": running.since if running else None}
    health = state.health()
    # a pause is recorded, so it holds whether the daemon runs or not; a send window likewise
    paused = {name: hold.as_dict() for name, hold in
              holds(config.destinations, recorded_pauses(state), now).items()}
    waiting, sending = _claimed(config, state, running is not None, health, now, paused)
    done, failed = _finished_today(config, state, now)
    return {
        "daemon": daemon,
        "settling": _settling(config, state) if running else [],
        # nothing takes them while the daemon is stopped: they wait for it in the inboxes
        "not_taken": [] if running else [
            {"inbox": str(inbox.path), "drop": str(ref)}
            for inbox in config.inboxes for ref in existing_drops(inbox)],
        "waiting": waiting,
        "sending": sending,
        "done_today": done,
        "failed_today": failed,
        "destinations": [_destination(name, health.get(name), running is not None)
                         | {"paused": paused.get(name)} for name in sorted(config.destinations)],
    }


def _settling(config: SiteConfig, state: State) -> list[dict[str, Any]]:
    settle = {str(inbox.path): config.settle_for(inbox) for inbox in config.inboxes}
    return [{"inbox": inbox, "drop": drop, "seen": _iso(seen), "settle_seconds": settle.get(inbox)}
            for inbox, drop, seen in state.settling()]


def _claimed(config: SiteConfig, state: State, running: bool,
             health: dict[str, dict[str, Any]], now: float,
             paused: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]],
                                                         list[dict[str, Any]]]:
    """Drops in the work areas: (waiting, sending). Waiting: queued behind another drop,
    waiting to retry, its destination paused, or held while the daemon is stopped; sending:
    an attempt under way."""
    work = {str(inbox.path): inbox.work for inbox in config.inboxes}
    waiting, sending = [], []
    for drop in state.unfinished():
        area = work.get(drop["inbox"])
        if area is None or not _exists(area / drop["id"]):
            continue  # finished a moment ago, or its inbox left the config
        attempts = state.attempts(drop["id"])
        last = attempts[-1] if attempts else None
        entry = {"id": drop["id"], "drop": drop["origin"],
                 "destination": drop["destination"] or (last.destination if last else None),
                 "attempts": len(attempts)}
        if drop["total"]:  # known once the drop was read and routed
            entry |= {"files": drop["total"], "stored": drop["stored"]}
        if drop["sent_files"]:
            entry |= {"sent_files": drop["sent_files"], "sent_bytes": drop["sent_bytes"]}
        if last is not None and last.ended is not None and last.outcome == "TransientFailure":
            entry["last_attempt"] = {"ended": _iso(last.ended), "reason": last.reason}
        if not running:
            waiting.append({**entry, "state": "held"})
        elif last is not None and last.ended is None:
            # this attempt's stage, or one left from an earlier attempt that is read again now
            reading = drop["stage"] != "sending" or drop["updated_at"] < last.started
            sending.append({**entry, "state": "reading" if reading else "sending"})
        elif entry["destination"] in paused:
            waiting.append({**entry, "state": "paused", "paused": paused[entry["destination"]]})
        elif last is not None and last.outcome == "TransientFailure":
            next_try = (health.get(entry["destination"] or "") or {}).get("next_try")
            waiting.append({**entry, "state": "retry",
                            "next_try": _iso(next_try) if next_try and next_try > now else None})
        else:
            waiting.append({**entry, "state": "queued"})
    return waiting, sending


def _finished_today(config: SiteConfig, state: State,
                    now: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Drops in today's done/ and failed/ folders now: each once (the latest drop moved to that
    path), and only while it is still there (a failed drop retried since has left)."""
    today = datetime.fromtimestamp(now).astimezone()
    midnight = today.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    day = f"{today:%Y-%m-%d}"
    folders = {str(i.path): {"done": i.done / day, "failed": i.failed / day}
               for i in config.inboxes}
    seen: set[str] = set()
    found: dict[str, list[dict[str, Any]]] = {"done": [], "failed": []}
    for row in state.finished_since(midnight):  # the latest first
        target, outcome = row["target"], row["outcome"]
        folder = folders.get(row["inbox"], {}).get(outcome)
        if not target or target in seen or folder is None or \
                not Path(target).is_relative_to(folder):
            continue
        seen.add(target)
        if os.path.lexists(target):
            found[outcome].append({"drop": row["origin"], "moved_to": target,
                                   "at": _iso(row["at"])})
    return found["done"], found["failed"][::-1]


def _destination(name: str, row: dict[str, Any] | None, running: bool) -> dict[str, Any]:
    known = {"name": name, "state": "no drop sent yet", "since": None, "error": None,
             "next_try": None, "last_delivery": None}
    if row is not None:
        known |= {"state": "unknown" if row["up"] is None else "up" if row["up"] else "down",
                  "since": _iso(row["since"]) if row["since"] else None, "error": row["error"],
                  "next_try": _iso(row["next_try"]) if row["next_try"] else None,
                  "last_delivery": _iso(row["last_delivery"]) if row.get("last_delivery")
                  else None}
    if running:
        return known
    # a stopped daemon tries nothing: what it last knew is history, not health
    return {"name": name, "state": "unknown", "last_known": known}


# --- the text -------------------------------------------------------------------------------

def status_lines(summary: dict[str, Any]) -> list[str]:
    daemon = summary["daemon"]
    if daemon["running"]:
        lines = [f"daemon: running (pid {daemon['pid']}) since {daemon['since']}"]
    else:
        lines = ["daemon: NOT RUNNING: nothing is settled, claimed or sent until it starts "
                 "(systemctl start xnat-inbox, or xnat-inbox run)"]
        lines.append(f"in the inboxes, not taken: {len(summary['not_taken'])}")
        lines += [f"  {d['drop']} in {d['inbox']}" for d in summary["not_taken"]]
    if daemon["running"]:
        lines.append(f"settling: {len(summary['settling'])}")
        lines += [f"  {d['drop']} in {d['inbox']}: seen {d['seen']}, taken once quiet for "
                  f"{d['settle_seconds']:g} s" for d in summary["settling"]]
    # a destination's error is shown with the destination, not again with each of its drops
    errors = {d["name"]: d.get("error") or d.get("last_known", {}).get("error")
              for d in summary["destinations"]}
    lines.append(f"waiting: {len(summary['waiting'])}")
    lines += [f"  {d['drop']} -> {d['destination'] or '?'}: "
              f"{_waiting(d, errors.get(d['destination']))}" for d in summary["waiting"]]
    lines.append(f"sending: {len(summary['sending'])}")
    lines += [f"  {d['drop']} -> {d['destination'] or '?'}: {_sending(d)}"
              for d in summary["sending"]]
    done = summary["done_today"]
    lines.append(f"done today: {len(done)}")
    lines += [f"  {d['drop']} -> {d['moved_to']}" for d in done[:DONE_LISTED]]
    if len(done) > DONE_LISTED:
        lines.append(f"  … and {len(done) - DONE_LISTED} more (--json lists them all)")
    lines.append(f"failed today: {len(summary['failed_today'])}")
    lines += [f"  {d['drop']} -> {d['moved_to']}" for d in summary["failed_today"]]
    lines.append("destinations:")
    lines += [f"  {d['name']}: " + (f"{_paused(d['paused'], by=True)}; " if d["paused"] else "")
              + _health(d) for d in summary["destinations"]]
    return lines


def _paused(hold: dict[str, Any], by: bool = False) -> str:
    """'paused (reason) until …', and with `by` who paused it, when."""
    text = f"paused ({hold['reason']}) until {hold['until'] or 'resumed'}"
    if by and hold["by"]:
        text += f" (`xnat-inbox pause` by {hold['by']} at {hold['since']})"
    return text


def _files(drop: dict[str, Any]) -> str:
    if "files" not in drop:
        return ""
    text = f"{drop['stored']} of {drop['files']} file(s) stored"
    if drop.get("sent_files"):  # a REST upload is acknowledged at its end: what went out
        text += f" (sent {drop['sent_files']} file(s), {drop['sent_bytes'] / 1e6:.1f} MB)"
    return text


def _waiting(drop: dict[str, Any], destination_error: str | None) -> str:
    parts = [_files(drop)] if "files" in drop else []
    if drop["state"] == "held":
        parts.append("held in the work area; resumes when the daemon starts")
    elif drop["state"] == "paused":
        parts.append(f"{_paused(drop['paused'])}; waits its turn")
    elif drop["state"] == "retry":
        parts.append(f"waiting to retry, next try {drop['next_try'] or 'now'}")
    else:
        parts.append("queued behind the destination's other drops")
    if last := drop.get("last_attempt"):
        same = last["reason"] == destination_error
        parts.append(f"attempt {drop['attempts']} failed"
                     + (" (the destination's error, below)" if same else f": {last['reason']}"))
    return "; ".join(parts)


def _sending(drop: dict[str, Any]) -> str:
    if drop["state"] == "reading":
        return f"reading the drop (attempt {drop['attempts']})"
    return _files(drop) or "sending"


def _health(destination: dict[str, Any], stale: bool = False) -> str:
    if destination["state"] == "unknown" and "last_known" in destination:
        last = _health(destination["last_known"], stale=True)
        return f"unknown (daemon not running); last known: {last}"
    if destination["state"] == "up":
        text = f"up since {destination['since']}"
        if destination["last_delivery"]:
            text += f", last delivery {destination['last_delivery']}"
        return text
    if destination["state"] == "down":
        text = f"DOWN since {destination['since']}: {destination['error']}"
        # a stopped daemon tries nothing: its next try is the next start
        return text if stale else f"{text} (next try {destination['next_try']})"
    return destination["state"]


def _exists(path: Path) -> bool:
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # there, if not readable by whoever asks
    return True


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")
