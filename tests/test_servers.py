"""The throwaway database servers: real processes whose committed rows survive kill -9."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from servers import (
    MariaDBServer,
    PostgresServer,
    ServerUnavailable,
    children_of,
    live_processes,
    start_or_skip,
)

BACKENDS = ["postgres", "mariadb"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """(session server, URL of a fresh database on it), for each SQL backend."""
    server = request.getfixturevalue(f"{request.param}_server")
    return server, request.getfixturevalue(f"{request.param}_url")


def insert_row(url: str, value: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE IF NOT EXISTS notes (body VARCHAR(100))"))
        connection.execute(sa.text("INSERT INTO notes VALUES (:body)"), {"body": value})
    engine.dispose()


def read_rows(url: str) -> list[str]:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT body FROM notes")).scalars().all()
    engine.dispose()
    return rows


def test_a_row_round_trips_through_sqlalchemy(backend):
    _server, url = backend
    insert_row(url, "héllo ✓")
    assert read_rows(url) == ["héllo ✓"]


@pytest.mark.parametrize("halt", ["kill", "stop"])
def test_committed_rows_survive_a_restart_on_the_same_port(backend, halt):
    server, url = backend
    port = server.port
    insert_row(url, "committed")

    getattr(server, halt)()
    with pytest.raises(sa.exc.OperationalError):
        read_rows(url)

    server.start()
    assert server.port == port
    assert read_rows(url) == ["committed"]


def test_each_test_gets_a_fresh_database_named_after_it(postgres_url, mariadb_url):
    for url in (postgres_url, mariadb_url):
        assert "/test_each_test_gets_a_fresh_database" in url
        engine = sa.create_engine(url)
        assert sa.inspect(engine).get_table_names() == []
        engine.dispose()


@pytest.mark.parametrize("name", BACKENDS)
def test_a_session_server_left_killed_is_restarted_for_the_next_database(name, request):
    request.getfixturevalue(f"{name}_server").kill()
    url = request.getfixturevalue(f"{name}_url")
    insert_row(url, "after the crash")
    assert read_rows(url) == ["after the crash"]


@pytest.mark.parametrize(
    ("server_class", "hint"),
    [(PostgresServer, "apt-get install postgresql"), (MariaDBServer, "apt-get install mariadb-server")],
)
def test_missing_binaries_give_a_reason_with_what_to_install(tmp_path, server_class, hint):
    server = server_class(bin_dir=tmp_path)
    assert hint in server.unavailable_reason()
    with pytest.raises(ServerUnavailable, match=hint):
        server.start()
    assert server.root is None  # nothing was created


def test_an_unavailable_server_skips_unless_services_are_required(tmp_path, monkeypatch):
    server = PostgresServer(bin_dir=tmp_path)
    monkeypatch.delenv("RUNRELAY_REQUIRE_SERVICES", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install postgresql"):
        start_or_skip(server)
    monkeypatch.setenv("RUNRELAY_REQUIRE_SERVICES", "1")
    with pytest.raises(pytest.fail.Exception, match="apt-get install postgresql"):
        start_or_skip(server)


def test_kill_leaves_no_server_process_alive(backend):
    server, url = backend
    insert_row(url, "open a backend")
    pid = server.process.pid
    children = children_of(pid)

    server.kill()

    alive = {pid for pid, _ppid in live_processes()}
    assert not alive & {pid, *children}
