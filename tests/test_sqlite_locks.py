"""A second SQLite engine on a database file must never drop the locks of the first.

POSIX locks belong to the process: closing any descriptor of a file drops all of them. If
opening the database file by hand (to create it owner-only) dropped the shared lock an open
WAL connection holds, another process closing its connection would think itself the last,
checkpoint and delete the WAL under the first, and the first engine's later commits would go
to a deleted file: lost. The daemon has several engines on one file (a sink's worker and its
host reports), and readers come and go.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import sqlalchemy as sa

from runrelay.sinks import sql_engine

INSERT_FROM_ANOTHER_PROCESS = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("INSERT INTO t VALUES ('another process')")
db.close()  # the last connection, if it thinks so: checkpoints and removes the WAL
"""


def test_a_second_engine_on_the_file_loses_none_of_the_firsts_commits(tmp_path):
    path = tmp_path / "runs.sqlite"
    first, _ = sql_engine.create_engine(sa.make_url(f"sqlite:///{path}"), 5)
    with first.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (x TEXT)"))
    second, _ = sql_engine.create_engine(sa.make_url(f"sqlite:///{path}"), 5)  # the file exists now
    subprocess.run([sys.executable, "-c", INSERT_FROM_ANOTHER_PROCESS, str(path)], check=True, timeout=60)
    with first.begin() as conn:
        conn.execute(sa.text("INSERT INTO t VALUES ('first engine')"))
    rows = sorted(row for (row,) in sqlite3.connect(path).execute("SELECT x FROM t"))
    second.dispose()
    first.dispose()
    assert rows == ["another process", "first engine"]
