"""Shared fixtures: real database servers owned by the test session (DESIGN.md section 7).

A session server that a test kills is started again by the next ``*_url`` fixture, so one
chaos test cannot break the tests after it.
"""

from __future__ import annotations

import os
import re
import uuid

import pytest

from servers import FakeGcsServer, MariaDBServer, MongoServer, MotoServer, PostgresServer, Server, start_or_skip


@pytest.fixture(scope="session")
def postgres_server():
    server = PostgresServer()
    try:
        yield start_or_skip(server)
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def mariadb_server():
    server = MariaDBServer()
    try:
        yield start_or_skip(server)
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def mongo_server():
    """SecantusDB on a free port; a real mongod instead when RUNRELAY_TEST_MONGO_URL is set."""
    server = MongoServer(os.environ.get("RUNRELAY_TEST_MONGO_URL") or None)
    try:
        yield start_or_skip(server)
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def moto_server():
    server = MotoServer()
    try:
        yield start_or_skip(server)
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def gcs_server():
    server = FakeGcsServer()
    try:
        yield start_or_skip(server)
    finally:
        server.cleanup()


@pytest.fixture
def postgres_url(postgres_server, request) -> str:
    return fresh_database(postgres_server, request.node.name)


@pytest.fixture
def mariadb_url(mariadb_server, request) -> str:
    return fresh_database(mariadb_server, request.node.name)


@pytest.fixture
def mongo_url(mongo_server, request) -> str:
    return fresh_database(mongo_server, request.node.name)


@pytest.fixture
def journal_dir(tmp_path):
    """Where a test's journal lives; not created yet (the journal creates it)."""
    return tmp_path / "journal"


def fresh_database(server: Server, test_name: str) -> str:
    """Create an empty database named after the test; return its SQLAlchemy URL."""
    server.start()  # no-op unless an earlier test killed or stopped it
    name = f"{re.sub(r'[^a-z0-9]+', '_', test_name.lower())[:40]}_{uuid.uuid4().hex[:8]}"
    server.create_database(name)
    return server.url(name)
