"""A content-addressed, crash-safe response cache for remote generator requests (SQLite).

Each answer is stored under the SHA-256 of its request's canonical JSON (model, messages, sampling settings,
seed: never the endpoint or the API key, which travel in the URL and headers only), in its own committed
transaction as soon as it arrives. SQLite's write-ahead log makes each commit atomic and durable against a killed
process, so a run killed mid-iteration and resumed finds every answer that had arrived and re-sends only the
requests that had not been answered.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sqlite3
import threading
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
  key TEXT PRIMARY KEY,
  response TEXT NOT NULL,
  created REAL NOT NULL DEFAULT (julianday('now'))
)
"""


def request_key(body: dict[str, Any]) -> str:
    """SHA-256 hex digest of a request body's canonical JSON (sorted keys, no whitespace)."""
    data = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


class ResponseCache:
    """Answers stored by request key in one SQLite file (write-ahead log; one commit per answer).

    Args:
      path: the database file; its folder is created. The same file can be shared by runs: keys are content
        hashes of the requests.

    Raises:
      TypeError: ``path`` is not a path.
      ValueError: ``path`` exists and is not a pejax response cache (or not an SQLite file).
    """

    def __init__(self, path: str | os.PathLike):
        if not isinstance(path, str | os.PathLike):
            raise TypeError(
                f"cache path must be a file path (str or os.PathLike), got {type(path).__name__}."
            )
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                str(self.path), check_same_thread=False, isolation_level=None
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL with WAL: a committed answer survives the process being killed (not a power cut).
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
            cols = [r[1] for r in self._db.execute("PRAGMA table_info(responses)")]
        except sqlite3.DatabaseError as e:
            raise ValueError(
                f"response cache {str(self.path)!r} cannot be opened as an SQLite database ({e}); give "
                "a new file name or remove that file."
            ) from e
        if cols[:2] != ["key", "response"]:
            raise ValueError(
                f"response cache {str(self.path)!r} holds a table 'responses' of another layout {cols}; "
                "it is not a pejax response cache. Give a new file name."
            )

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored answer of ``key``, or ``None``."""
        with self._lock:
            row = self._db.execute(
                "SELECT response FROM responses WHERE key = ?", (key,)
            ).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, response: dict[str, Any]) -> None:
        """Stores one answer in its own committed transaction (atomic: all or nothing)."""
        data = json.dumps(response, sort_keys=True, ensure_ascii=False)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO responses (key, response) VALUES (?, ?)", (key, data)
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
