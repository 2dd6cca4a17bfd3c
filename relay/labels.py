"""The label store: people's choices between two answers to a prompt, in an embedded database (SQLite).

Every choice is committed the moment it is made (WAL journal, synchronous FULL): a label survives a crash of the
process that took it, and several processes (labelling replicas, people at once) write to one file safely — SQLite
serialises the writers, which an append from several processes to one file would not. A comparison gets one label
per labeller (a second click of the same person replaces the first; two people's labels are two rows).

`relay reward-model` reads a store directly (`reward_model_training.data: labels.sqlite`): each label that prefers
one answer is a prompt / chosen / rejected pair; ties and skips teach nothing there.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Choice = Literal["a", "b", "tie", "skip"]
CHOICES: tuple[Choice, ...] = ("a", "b", "tie", "skip")
SUFFIXES = (".sqlite", ".sqlite3", ".db")

SCHEMA = """
CREATE TABLE IF NOT EXISTS comparisons (
    id INTEGER PRIMARY KEY,
    prompt TEXT NOT NULL,
    answer_a TEXT NOT NULL,
    answer_b TEXT NOT NULL,
    source_a TEXT NOT NULL,  -- which policy wrote each answer (a checkpoint), shown in random order
    source_b TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY,
    comparison_id INTEGER NOT NULL REFERENCES comparisons(id),
    labeller TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'skip')),
    created REAL NOT NULL,
    UNIQUE (comparison_id, labeller)
);
"""


@dataclass(frozen=True)
class Comparison:
    id: int
    prompt: str
    answer_a: str
    answer_b: str
    source_a: str
    source_b: str


def is_label_store(source: str | Path) -> bool:
    return Path(source).suffix in SUFFIXES


class LabelStore:
    """One SQLite file; a connection per call, so that any thread or process may use it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)  # transactions are explicit
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        return db

    def add_comparison(self, prompt: str, answer_a: str, answer_b: str, source_a: str, source_b: str) -> int:
        with closing(self._connect()) as db:
            cursor = db.execute(
                "INSERT INTO comparisons (prompt, answer_a, answer_b, source_a, source_b, created) "
                "VALUES (?, ?, ?, ?, ?, ?)", (prompt, answer_a, answer_b, source_a, source_b, time.time()))
            return int(cursor.lastrowid)

    def comparison(self, comparison_id: int) -> Comparison:
        with closing(self._connect()) as db:
            row = db.execute("SELECT id, prompt, answer_a, answer_b, source_a, source_b FROM comparisons WHERE id = ?",
                             (comparison_id,)).fetchone()
        if row is None:
            raise KeyError(f"no comparison {comparison_id}")
        return Comparison(*row)

    def next_unlabelled(self, labeller: str) -> Comparison | None:
        """The oldest comparison this labeller has not labelled, preferring those nobody has."""
        with closing(self._connect()) as db:
            row = db.execute(
                "SELECT c.id, c.prompt, c.answer_a, c.answer_b, c.source_a, c.source_b FROM comparisons c "
                "WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.comparison_id = c.id AND l.labeller = ?) "
                "ORDER BY (SELECT COUNT(*) FROM labels l WHERE l.comparison_id = c.id), c.id LIMIT 1",
                (labeller,)).fetchone()
        return None if row is None else Comparison(*row)

    def label(self, comparison_id: int, choice: str, labeller: str) -> None:
        """Record a choice, durably, before returning; the same labeller's later choice replaces it."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {', '.join(CHOICES)}, not {choice!r}")
        with closing(self._connect()) as db:
            db.execute(
                "INSERT INTO labels (comparison_id, labeller, choice, created) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (comparison_id, labeller) DO UPDATE SET choice = excluded.choice, "
                "created = excluded.created", (comparison_id, labeller, choice, time.time()))

    def labelled_by(self, labeller: str) -> int:
        with closing(self._connect()) as db:
            return db.execute("SELECT COUNT(*) FROM labels WHERE labeller = ?", (labeller,)).fetchone()[0]

    def counts(self) -> dict[str, int]:
        """Labels by choice, and comparisons in all."""
        with closing(self._connect()) as db:
            counts = dict(db.execute("SELECT choice, COUNT(*) FROM labels GROUP BY choice").fetchall())
            total = db.execute("SELECT COUNT(*) FROM comparisons").fetchone()[0]
        return {**{choice: counts.get(choice, 0) for choice in CHOICES}, "comparisons": total}

    def preference_rows(self) -> list[dict[str, str]]:
        """Every label that prefers one answer as a {prompt, chosen, rejected} row, oldest first."""
        with closing(self._connect()) as db:
            rows = db.execute(
                "SELECT c.prompt, c.answer_a, c.answer_b, l.choice FROM labels l "
                "JOIN comparisons c ON c.id = l.comparison_id WHERE l.choice IN ('a', 'b') ORDER BY l.id").fetchall()
        return [{"prompt": prompt, "chosen": a if choice == "a" else b, "rejected": b if choice == "a" else a}
                for prompt, a, b, choice in rows]
