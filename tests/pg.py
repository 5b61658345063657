"""A private PostgreSQL for tests: its own data directory in a temporary folder, a free loopback port.

Debian's ``postgresql`` package provides the server binaries; the server runs as the ``postgres``
user (it refuses root). Each test gets a database of its own (:meth:`Postgres.new_database`).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.peers import free_port, wait_port


def server_bin() -> Path | None:
    """The folder of initdb/pg_ctl (Debian keeps them out of PATH), or None when PostgreSQL is not installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class Postgres:
    def __init__(self, durable: bool = False) -> None:
        self.durable = durable
        self.bin = server_bin()
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
        self.dir = Path(tempfile.mkdtemp(prefix="dicomnode-pg-"))
        self.port = free_port()
        self._names = itertools.count()
        self.proc: subprocess.Popen | None = None

    def _as_postgres(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        prefix = [] if os.getuid() != 0 else ["runuser", "-u", "postgres", "--"]
        return subprocess.run([*prefix, *cmd], check=True, capture_output=True, text=True, **kw)

    def start(self) -> "Postgres":
        if os.getuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        data = self.dir / "data"
        self._as_postgres(str(self.bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8")
        prefix = [] if os.getuid() != 0 else ["runuser", "-u", "postgres", "--"]
        # durability off for tests (they check who does what, not what survives a power loss); on for benchmarks
        fast = [] if self.durable else ["-c", "fsync=off", "-c", "synchronous_commit=off"]
        self.proc = subprocess.Popen(
            [*prefix, str(self.bin / "postgres"), "-D", str(data), "-p", str(self.port), "-h", "127.0.0.1",
             "-k", str(self.dir), *fast, "-c", "max_connections=200"],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "server.log", "w"))
        wait_port(self.port, 30, self.proc)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def url(self, db: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def new_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        """Fast shutdown of the server itself (``runuser`` does not pass signals on), then remove its folder."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                postmaster = int((self.dir / "data" / "postmaster.pid").read_text().split()[0])
                os.kill(postmaster, signal.SIGINT)  # fast shutdown: SIGTERM (smart) would wait for clients to leave
            except (OSError, ValueError, IndexError):
                self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
