"""A throwaway PostgreSQL server for the tests: ``initdb`` in a temporary folder (trust authentication, only the
loopback port and a unix socket inside that folder), ``pg_ctl start -w``, one fresh database per test server, and
``pg_ctl stop`` at the end. The binaries come from ``pg_config --bindir`` or Debian's /usr/lib/postgresql/*/bin.

PostgreSQL refuses to run as root: as root (CI containers), the server runs as the ``postgres`` user that Debian's
package creates, and its folder belongs to that user.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

REQUIRE = "FACEID_REQUIRE_POSTGRES"  # set (CI): a missing PostgreSQL fails the tests that need it, never skips them
USER = "faceid"  # the server's superuser (trust authentication: no password)


def find_bindir() -> Path | None:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``: ``pg_config --bindir`` first, then the newest
    /usr/lib/postgresql/*/bin; None when there is none (Debian's ``pg_config`` comes with libpq-dev, without the
    server, so each candidate is checked for the server binaries)."""
    candidates = []
    if shutil.which("pg_config"):
        try:
            found = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=30)
            candidates.append(found.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted(versions, key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)[::-1]
    for candidate in candidates:
        folder = Path(candidate)
        if all(os.access(folder / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """A running server (``start``) in its own temporary folder; ``new_database()`` -> a SQLAlchemy URL."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.folder = Path(tempfile.mkdtemp(prefix="faceid-postgres-"))  # short: the socket path has a length limit
        self.data = self.folder / "data"
        self.sockets = self.folder / "sockets"
        self.log = self.folder / "server.log"
        self.port = 0
        self._names = itertools.count()
        # as root: everything runs as the ``postgres`` user (initdb and postgres refuse root), its folder theirs
        self.user = "postgres" if os.geteuid() == 0 else None
        self.sockets.mkdir()
        if self.user is not None:
            try:
                owner = pwd.getpwnam(self.user)
            except KeyError:
                raise RuntimeError(
                    "PostgreSQL does not run as root and there is no postgres user to run it as: run the tests as "
                    "another user, or install Debian's postgresql package (it creates that user)"
                ) from None
            for path in (self.folder, self.sockets):
                os.chown(path, owner.pw_uid, owner.pw_gid)

    def _run(self, *command: str, timeout: float = 120) -> None:
        done = subprocess.run(
            [str(self.bindir / command[0]), *command[1:]], capture_output=True, text=True, timeout=timeout,
            user=self.user, cwd=self.folder, env={**os.environ, "LC_ALL": "C.UTF-8"},
        )  # fmt: skip
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""
            raise RuntimeError(f"{command[0]} failed ({done.returncode}): {done.stderr or done.stdout}\n{log}")

    def start(self) -> PostgresServer:
        # fsync off: a test server's data need not survive a power cut, and the tests run faster without it
        self._run("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "--encoding=UTF8", "--no-sync")
        for attempt in range(3):  # the free port may be taken between finding it and the server binding it
            self.port = free_port()
            options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockets} -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")  # fmt: skip
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")
                return self
            except RuntimeError:
                if attempt == 2:
                    raise
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A new, empty database; its SQLAlchemy URL."""
        import psycopg

        name = f"test_{next(self._names)}"
        with psycopg.connect(f"postgresql://{USER}@127.0.0.1:{self.port}/postgres", autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
