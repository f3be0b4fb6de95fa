"""The SQL sink's tables: Sacred's ``SqlObserver`` tables, a metrics table, and runrelay's
bookkeeping (docs/sinks.md; differences from Sacred's in docs/compatibility.md)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from runrelay.sinks.sacred import NAME_WIDTH, STATUS_WIDTH

RUN_ID_WIDTH = 24
PATH_WIDTH = 1024
MYSQL_DIALECTS = ("mysql", "mariadb")

# --- the tables ------------------------------------------------------------------------------
# Sacred's (sacred/observers/sql_bases.py): same names, columns and column types, with the
# differences listed in docs/compatibility.md (wider strings, a string status, MySQL types
# that hold microseconds and more than 64 KB).

metadata = sa.MetaData()
_TEXT = sa.Text().with_variant(mysql.LONGTEXT(), *MYSQL_DIALECTS)
_BYTES = sa.LargeBinary().with_variant(mysql.LONGBLOB(), *MYSQL_DIALECTS)
_TIME = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), *MYSQL_DIALECTS)
_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER only


# utf8mb4_bin: all of Unicode, and names compare case-sensitively as they do elsewhere.
# SQLAlchemy's "mariadb" dialect (mariadb+pymysql://) reads only mariadb_ options.
_MYSQL_TABLE = {"engine": "InnoDB", "charset": "utf8mb4", "collate": "utf8mb4_bin"}
_MYSQL_OPTIONS = {f"{dialect}_{name}": value for dialect in MYSQL_DIALECTS for name, value in _MYSQL_TABLE.items()}


class _Status(sa.types.UserDefinedType):
    """VARCHAR bound without a type: PostgreSQL then also fits it into the status_enum of
    tables Sacred created (a VARCHAR parameter would not be cast to the enum)."""

    cache_ok = True

    def get_col_spec(self, **_kw) -> str:
        return f"VARCHAR({STATUS_WIDTH})"


def _table(name: str, *columns: sa.SchemaItem) -> sa.Table:
    return sa.Table(name, metadata, *columns, **_MYSQL_OPTIONS)


def _link(name: str, left: str, right: str, left_type: sa.types.TypeEngine = sa.Integer()) -> sa.Table:
    """A many-to-many association table, as Sacred declares them."""
    return _table(
        name,
        sa.Column(f"{left}_id", left_type, sa.ForeignKey(f"{left}.{left}_id")),
        sa.Column(f"{right}_id", sa.Integer, sa.ForeignKey(f"{right}.{right}_id")),
    )


source = _table(
    "source",
    sa.Column("source_id", sa.Integer, primary_key=True),
    sa.Column("filename", sa.String(PATH_WIDTH)),
    sa.Column("md5sum", sa.String(32)),
    sa.Column("content", _TEXT),
)
repository = _table(
    "repository",
    sa.Column("repository_id", sa.Integer, primary_key=True),
    sa.Column("url", sa.String(2048)),
    sa.Column("commit", sa.String(40)),
    sa.Column("dirty", sa.Boolean),
)
dependency = _table(
    "dependency",
    sa.Column("dependency_id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(NAME_WIDTH)),
    sa.Column("version", sa.String(NAME_WIDTH)),
)
resource = _table(
    "resource",
    sa.Column("resource_id", sa.Integer, primary_key=True),
    sa.Column("filename", sa.String(PATH_WIDTH)),
    sa.Column("md5sum", sa.String(32)),
    sa.Column("content", _BYTES),
)
host = _table(
    "host",
    sa.Column("host_id", sa.Integer, primary_key=True),
    sa.Column("cpu", sa.String(NAME_WIDTH)),
    sa.Column("hostname", sa.String(NAME_WIDTH)),
    sa.Column("os", sa.String(NAME_WIDTH)),
    sa.Column("os_info", sa.String(NAME_WIDTH)),
    sa.Column("python_version", sa.String(NAME_WIDTH)),
)
experiment = _table(
    "experiment",
    sa.Column("experiment_id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(NAME_WIDTH)),
    sa.Column("md5sum", sa.String(32)),
    sa.Column("base_dir", sa.String(PATH_WIDTH)),
)
experiments_sources = _link("experiments_sources", "experiment", "source")
experiments_repositories = _link("experiments_repositories", "experiment", "repository")
experiments_dependencies = _link("experiments_dependencies", "experiment", "dependency")
run = _table(
    "run",
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("run_id", sa.String(RUN_ID_WIDTH), unique=True),
    sa.Column("command", sa.String(NAME_WIDTH)),
    sa.Column("start_time", _TIME),
    sa.Column("heartbeat", _TIME),
    sa.Column("stop_time", _TIME),
    sa.Column("queue_time", _TIME),
    sa.Column("priority", sa.Double),
    sa.Column("comment", _TEXT),
    sa.Column("fail_trace", _TEXT),
    sa.Column("captured_out", _TEXT),
    sa.Column("config", _TEXT),
    sa.Column("info", _TEXT),
    sa.Column("status", _Status()),  # Sacred: a fixed Enum without DIED or custom statuses
    sa.Column("host_id", sa.Integer, sa.ForeignKey("host.host_id")),
    sa.Column("experiment_id", sa.Integer, sa.ForeignKey("experiment.experiment_id")),
    sa.Column("result", sa.Double),
)
artifact = _table(
    "artifact",
    sa.Column("artifact_id", sa.Integer, primary_key=True),
    sa.Column("filename", sa.String(NAME_WIDTH)),
    sa.Column("content", _BYTES),
    sa.Column("run_id", sa.String(RUN_ID_WIDTH), sa.ForeignKey("run.run_id")),
)
runs_resources = _link("runs_resources", "run", "resource", sa.String(RUN_ID_WIDTH))  # to run.run_id

# runrelay's own tables. No foreign keys to run: MySQL refuses them when run (created by
# Sacred) has another collation, and the sink writes both sides in one transaction.
metric = _table(
    "metric",
    sa.Column("metric_id", _BIG_ID, primary_key=True),
    sa.Column("run_id", sa.String(RUN_ID_WIDTH), nullable=False),
    sa.Column("name", sa.String(NAME_WIDTH), nullable=False),
    sa.Column("step", sa.BigInteger),
    sa.Column("value", sa.Double),  # NULL when the value is not finite ...
    sa.Column("nonfinite", sa.String(4)),  # ... and then 'nan', 'inf' or '-inf'
    sa.Column("timestamp", _TIME),
    sa.Index("metric_run_name", "run_id", "name"),
)
runrelay_run = _table(
    "runrelay_run",
    sa.Column("uid", sa.String(36), primary_key=True),
    sa.Column("run_id", sa.String(RUN_ID_WIDTH), nullable=False, unique=True),
    sa.Column("applied_seq", sa.BigInteger, nullable=False),
    sa.Column("result", _TEXT),  # the whole result as JSON; run.result holds finite numbers only
    sa.Column("death_reason", _TEXT),  # set while a death verdict stands ('' if it gave no reason)
)
runrelay_host = _table(  # each daemon's latest report that its host lives (the central watchdog's clue)
    "runrelay_host",
    sa.Column("host", sa.String(NAME_WIDTH), primary_key=True),
    sa.Column("seen_time", _TIME, nullable=False),
)
runrelay_run_host = _table(  # the host a run's process runs on (its started event's process.host)
    "runrelay_run_host",
    sa.Column("uid", sa.String(36), primary_key=True),
    sa.Column("host", sa.String(NAME_WIDTH), nullable=False),
)
runrelay_redelivered = _table(
    "runrelay_redelivered",
    sa.Column("uid", sa.String(36), sa.ForeignKey("runrelay_run.uid"), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
)
