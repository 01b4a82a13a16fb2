"""A real PostgreSQL server for the tests: ``initdb`` + ``pg_ctl`` in a temporary directory,
listening on a free loopback port, with password authentication (so the store's password
reference is exercised, not bypassed).

One server serves the whole test session (``shared_server``). Each store test gets a schema
of its own (``schema_url``), each daemon test a database (``create_database``). The binaries
come from the system's PostgreSQL packages (Debian: ``apt-get install postgresql-15``;
``.ci/run`` does it). Where none can be found, the tests that need a server are skipped with a
message saying so, unless ``HARVESTER_REQUIRE_POSTGRES`` is set (CI sets it): there, a
missing server is a failure.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest

from tests.required import start_for_session, unavailable

REQUIRE_ENV = "HARVESTER_REQUIRE_POSTGRES"
PASSWORD_ENV = "HARVESTER_TEST_DB_PASSWORD"
_T = TypeVar("_T")


def find_bindir() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres, newest version first."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    # Version folders sort as numbers: 16 is newer than 9.6.
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    for candidate in sorted(versions, key=lambda p: _version(p.parent.name), reverse=True):
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    return None


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in name.split(".") if x.isdigit())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_sync(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` to completion on a loop of its own, even from inside a running loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result(timeout=60)


class PgServer:
    """One PostgreSQL cluster in a temporary directory, running until ``stop()``."""

    user = "postgres"

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="harvester-pg-"))
        self.data = self.root / "data"
        self.password = secrets.token_hex(16)
        self.port = 0
        self._names = itertools.count(1)
        # initdb refuses to run as root: the cluster then belongs to the "postgres" user.
        self._as: list[str] = []
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root, and there is no 'postgres' user") from None
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str, timeout: float = 60) -> None:
        done = subprocess.run(
            [*self._as, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args[:2])} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
            )

    def start(self, *, durable: bool = False) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as:
            account = pwd.getpwnam("postgres")
            os.chown(pwfile, account.pw_uid, account.pw_gid)
        pwfile.chmod(0o600)
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            self.user,
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        pwfile.unlink()
        settings = [
            "listen_addresses=127.0.0.1",
            "unix_socket_directories=''",
            "max_connections=200",
        ]
        if not durable:
            # These clusters live for one test session, and the tests are about what the
            # store commits, not about surviving a power cut.
            settings += ["fsync=off", "synchronous_commit=off", "full_page_writes=off"]
        options = " ".join(f"-c {s}" for s in settings)
        for _attempt in range(5):
            self.port = free_port()
            try:
                self._run(
                    str(self.bindir / "pg_ctl"),
                    "start",
                    "-w",
                    "-t",
                    "30",
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.root / "server.log"),
                    "-o",
                    f"-p {self.port} {options}",
                )
                return
            except RuntimeError:
                continue  # the free port was taken meanwhile: try another
        raise RuntimeError(f"PostgreSQL did not start:\n{self.log()}")

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(
                    str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data), "-m", "immediate"
                )
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        """The URL the store is given: no password in it (that comes by reference)."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "db") -> str:
        """A new empty database; its name."""
        name = f"{prefix}_{next(self._names)}"
        self.execute(f'CREATE DATABASE "{name}"')
        return name

    def schema_url(self, database: str, prefix: str = "t") -> str:
        """The URL of a new empty schema in ``database`` (a fresh job table in a millisecond,
        where CREATE DATABASE takes a fifth of a second): ``search_path`` in the URL."""
        name = f"{prefix}_{next(self._names)}"
        self.execute(f'CREATE SCHEMA "{name}"', database=database)
        return f"{self.url(database)}?search_path={name}"

    def execute(self, statement: str, *, database: str = "postgres") -> None:
        async def run() -> None:
            import asyncpg

            conn = await asyncpg.connect(self.url(database), password=self.password)
            try:
                await conn.execute(statement)
            finally:
                await conn.close()

        run_sync(run())


_SERVER: PgServer | None = None


def shared_server(config: pytest.Config) -> PgServer:
    """The session's server, started on first use and stopped when the session ends."""
    global _SERVER
    if _SERVER is not None:
        return _SERVER
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        _missing("asyncpg is not installed (pip install -e '.[postgres]')")
    bindir = find_bindir()
    if bindir is None:
        _missing(
            "no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in"
            " /usr/lib/postgresql/*/bin; install them (Debian: apt-get install postgresql-15)"
        )
    assert bindir is not None
    _SERVER = start_for_session(PgServer(bindir), config)
    return _SERVER


def _missing(why: str) -> NoReturn:
    unavailable("a PostgreSQL server", REQUIRE_ENV, why)
