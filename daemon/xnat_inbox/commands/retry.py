"""`xnat-inbox retry`: put drops from failed/ back in line, and `xnat-inbox status`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..config import InboxConfig, SiteConfig
from ..service.state import State


class RetryError(Exception):
    """This path can't be put back; the message says why."""


def requeue(config: SiteConfig, state: State, path: Path, resend_all: bool) -> str:
    """Move a failed drop back to where it arrived; the running daemon picks it up.

    Studies its report shows as delivered are skipped unless `resend_all`."""
    path = path.resolve()
    inbox = _inbox_of_failed(config, path)
    report_path = path.with_name(path.name + ".report.json")
    try:
        report: dict[str, Any] = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RetryError(f"{path}: no readable report beside it ({report_path}: {exc})") from None
    origin = inbox.path / report["drop"]["origin"]
    if report["drop"].get("loose_files"):
        origin = origin.parent / path.name  # loose files come back as one folder
    target = _free(origin)
    skip = [] if resend_all else [s["study_instance_uid"] for s in report["studies"]
                                  if s["delivered"]]
    state.request_retry(str(target.relative_to(inbox.path)), skip)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(path, target)
    os.rename(report_path, _free(report_path.with_name(report_path.name + ".retried")))
    skipped = f", skipping {len(skip)} delivered study(ies)" if skip else ""
    return f"{path} -> {target}{skipped}"


def _inbox_of_failed(config: SiteConfig, path: Path) -> InboxConfig:
    for inbox in config.inboxes:
        if inbox.failed.resolve() in path.parents and path.is_dir():
            return inbox
    raise RetryError(f"{path} is not a drop folder in any inbox's failed/ "
                     f"(e.g. {config.inboxes[0].failed}/YYYY-MM-DD/<drop>)")


def _free(path: Path) -> Path:
    candidate, n = path, 0
    while os.path.lexists(candidate):
        n += 1
        candidate = path.with_name(f"{path.name}-retry{n}")
    return candidate


def status_lines(summary: dict[str, Any]) -> list[str]:
    lines = [f"waiting: {len(summary['waiting'])}"]
    lines += [f"  {d['drop']} ({d['stage']}) -> {d['destination'] or '?'}"
              for d in summary["waiting"]]
    lines.append(f"sending: {len(summary['sending'])}")
    lines += [f"  {d['drop']} -> {d['destination']}: {d['stored']}/{d['total']}"
              + (f" (sent {d['sent_files']} file(s), {d['sent_bytes'] / 1e6:.1f} MB)"
                 if d.get("sent_files") else "")
              for d in summary["sending"]]
    lines.append(f"failed today: {len(summary['failed_today'])}")
    lines += [f"  {d['drop']} -> {d['moved_to']}" for d in summary["failed_today"]]
    lines.append("destinations:")
    for d in summary["destinations"]:
        health = "up" if d["up"] else f"DOWN: {d['error']} (next try {d['next_try']})"
        lines.append(f"  {d['name']}: {health} since {d['since']}")
    return lines
