"""A sender's small durable notes in the state database."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

from .state import State


class Memo(MutableMapping[str, str]):
    """A sender's small durable notes (e.g. an XNAT prearchive entry already uploaded), so a
    retry after a restart continues where the last attempt stopped."""

    def __init__(self, state: State, scope: str) -> None:
        self.state = state
        self.scope = scope

    def __getitem__(self, key: str) -> str:
        rows = self.state._read("SELECT value FROM memos WHERE scope=? AND key=?",
                                self.scope, key)
        if not rows:
            raise KeyError(key)
        return str(rows[0][0])

    def __setitem__(self, key: str, value: str) -> None:
        with self.state._write() as db:
            db.execute("INSERT OR REPLACE INTO memos VALUES (?, ?, ?)", (self.scope, key, value))

    def __delitem__(self, key: str) -> None:
        with self.state._write() as db:
            gone = db.execute("DELETE FROM memos WHERE scope=? AND key=?",
                              (self.scope, key)).rowcount
        if not gone:
            raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        rows = self.state._read("SELECT key FROM memos WHERE scope=?", self.scope)
        return iter([str(row[0]) for row in rows])

    def __len__(self) -> int:
        return int(self.state._read("SELECT count(*) FROM memos WHERE scope=?",
                                    self.scope)[0][0])
