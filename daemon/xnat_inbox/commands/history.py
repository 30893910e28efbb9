"""`xnat-inbox history`: one line per drop finished, from the state database (so it outlasts
the journal's rotation and restarts): when, inbox, drop, outcome, destination, studies,
instances, bytes, seconds, first reason."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from ..config import SiteConfig
from ..service.state import State
from .when import since as parse_since

COLUMNS = ("finished", "inbox", "drop", "outcome", "destination", "studies", "instances",
           "bytes", "seconds", "first reason")


def history(config: SiteConfig, since: str, failed_only: bool, as_json: bool) -> int:
    start = parse_since(since, datetime.now().astimezone())
    state = State(config.state_dir)
    try:
        rows = [_entry(row) for row in state.history(start.timestamp())
                if not failed_only or row["outcome"] == "failed"]
    finally:
        state.close()
    if as_json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        what = "failed" if failed_only else "finished"
        print(f"no drop {what} since {start.isoformat(timespec='seconds')} (--since {since})")
    else:
        print("\n".join(lines(rows)))
    return 0


def _entry(row: dict[str, Any]) -> dict[str, Any]:
    return {"finished": datetime.fromtimestamp(row["at"]).astimezone().isoformat(
                timespec="seconds"),
            "inbox": row["inbox"], "drop": row["origin"], "id": row["id"],
            "outcome": row["outcome"], "destination": row["destination"],
            "studies": row["studies"], "instances": row["instances"], "bytes": row["bytes"],
            "seconds": round(row["seconds"], 2) if row["seconds"] is not None else None,
            "first_reason": row["first_reason"], "moved_to": row["target"]}


def lines(rows: list[dict[str, Any]]) -> list[str]:
    """Aligned columns, the oldest drop first; the reason last, whole."""
    cells = [[_when(r["finished"]), r["inbox"], r["drop"], r["outcome"] or "-",
              r["destination"] or "-", _count(r["studies"]), _count(r["instances"]),
              _bytes(r["bytes"]), _seconds(r["seconds"]), r["first_reason"] or "-"]
             for r in rows]
    widths = [max(len(str(c[i])) for c in [list(COLUMNS), *cells])
              for i in range(len(COLUMNS) - 1)]
    numeric = {5, 6, 7, 8}
    return ["  ".join([*(str(c[i]).rjust(w) if i in numeric else str(c[i]).ljust(w)
                         for i, w in enumerate(widths)), str(c[-1])]).rstrip()
            for c in [list(COLUMNS), *cells]]


def _when(iso: str) -> str:
    return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"
