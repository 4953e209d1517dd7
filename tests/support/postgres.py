"""A real, throwaway PostgreSQL server for tests (Debian ``postgresql``), stopped by PID.

``postgres_server`` (session scope) runs ``initdb`` and ``postgres`` as the ``postgres``
user, in a ``mkdtemp`` directory chowned to it (not under pytest's 0700 ``tmp_path``), on
127.0.0.1 and a free port, with its Unix socket in a short directory (socket paths are
limited to 107 bytes). ``Popen``'s PID is the postmaster; it is stopped with SIGINT (fast
shutdown) in ``finally``. :meth:`PostgresServer.new_database` gives each test a fresh
database, as a ``postgresql+psycopg://`` URL (psycopg 3). A missing ``postgresql`` package
is an error, never a skip. See ../shared/LAB.md, "PostgreSQL for tests".
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_USER = "postgres"


def pg_bin() -> Path:
    """The newest installed PostgreSQL's program directory (off PATH on Debian)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4])
    )
    if not found:
        raise RuntimeError(
            "PostgreSQL is not installed: apt-get install postgresql (scripts/install.sh --test)"
        )
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One postmaster in a temporary directory."""

    def __init__(self, durable: bool = False) -> None:
        #: PostgreSQL's own defaults (fsync, synchronous_commit, full_page_writes on), as in
        #: production; off (the default here) a commit waits on no disk, for fast tests.
        self.durable = durable
        self.bin = pg_bin()
        self.root = Path(tempfile.mkdtemp(prefix="sp-pg-"))
        self.data = self.root / "data"
        self.sock = self.root / "s"
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.root / "postgres.log"
        if len(str(self.sock / f".s.PGSQL.{self.port}")) > 107:
            raise RuntimeError(f"socket path too long: {self.sock}")

    def _run_as_postgres(self, argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
            argv,
            user=PG_USER,
            group=PG_USER,
            extra_groups=[],
            cwd="/tmp",
            start_new_session=True,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            **kw,
        )

    def start(self) -> None:
        import pwd

        pw = pwd.getpwnam(PG_USER)
        os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.sock.mkdir()
        os.chown(self.sock, pw.pw_uid, pw.pw_gid)
        init = self._run_as_postgres(
            [
                str(self.bin / "initdb"),
                "--no-sync",
                "-A",
                "trust",
                "-U",
                PG_USER,
                "-D",
                str(self.data),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out, _ = init.communicate(timeout=60)
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({init.returncode}): {out.decode(errors='replace')}")
        logf = open(self.log, "wb")  # noqa: SIM115 - the server writes it until it stops
        os.chown(self.log, pw.pw_uid, pw.pw_gid)
        self.proc = self._run_as_postgres(
            [
                str(self.bin / "postgres"),
                "-D",
                str(self.data),
                "-c",
                "listen_addresses=127.0.0.1",
                "-p",
                str(self.port),
                "-k",
                str(self.sock),
                *self._durability(),
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
        logf.close()
        self._wait_ready()

    def _durability(self) -> list[str]:
        if self.durable:
            return []
        off = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")
        return [arg for setting in off for arg in ("-c", setting)]

    def _wait_ready(self, timeout: float = 30) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited ({self.proc.returncode}): {self.log_text()}")
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"postgres not ready in {timeout} s: {self.log_text()}"
                    ) from None
                time.sleep(0.05)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def dsn(self, db: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={PG_USER} dbname={db}"

    def url(self, db: str) -> str:
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/{db}"

    def new_database(self) -> str:
        """A fresh, empty database; its SQLAlchemy URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # name: hex digits only
        return self.url(name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)  # fast shutdown, by PID
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_postgres(durable: bool = False) -> Iterator[PostgresServer]:
    server = PostgresServer(durable)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the whole test session."""
    with running_postgres() as server:
        yield server


def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh PostgreSQL database URL (an engine of tests/support/portal_db.py)."""
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.new_database()
