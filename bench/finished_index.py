"""python -m bench.finished_index: the status page's 24-h count on a journal months old.

Fills a SQLite journal with 500,000 done rows spread over 60 days and times the page's query
(``finished_counts_since``'s SQL) five times with the ``files_finished`` index and five times
without it (dropped, on a new connection). Prints the two ranges.
"""

from __future__ import annotations

import pathlib
import random
import sqlite3
import tempfile
import time

from konfuzio_watch.journal import SqliteJournal

ROWS = 500_000
QUERY = "SELECT state, COUNT(*) FROM files WHERE state IN ('done', 'failed') AND finished_at >= ? GROUP BY state"


def timed(db: sqlite3.Connection, since: float) -> str:
    took = []
    for _ in range(5):
        t0 = time.perf_counter()
        db.execute(QUERY, (since,)).fetchall()
        took.append((time.perf_counter() - t0) * 1000)
    return f"{min(took):.2f}-{max(took):.2f} ms"


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "journal.sqlite3"
        SqliteJournal(path).close()
        now = time.time()
        db = sqlite3.connect(path)
        db.executemany(
            "INSERT INTO files (rel_path, state, detected_at, updated_at, finished_at) VALUES (?, ?, ?, ?, ?)",
            [
                (f"f{i}.pdf".encode(), "done", t, t, t)
                for i in range(ROWS)
                for t in [now - random.random() * 60 * 86400]
            ],
        )
        db.commit()
        with_index = timed(db, now - 86400)
        db.execute("DROP INDEX files_finished")
        db.commit()
        db.close()
        db = sqlite3.connect(path)
        print(
            f"{ROWS:,} done rows over 60 days, the 24-h count: {with_index} with files_finished, "
            f"{timed(db, now - 86400)} without"
        )
        db.close()


if __name__ == "__main__":
    main()
