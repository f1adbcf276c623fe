"""A PostgreSQL server of the project's own: a data directory, a port, started and stopped on demand.

The shared services (Optuna studies, and later MLflow and Prefect) keep their state in it instead of one
host's SQLite files. PostgreSQL refuses to run as root, so under root the server runs as the ``postgres``
user (Debian's package creates it) and its data directory belongs to that user. Connections go over TCP to
``host:port`` with a password (scram-sha-256); the superuser and its password are the project's
(``mocosfl``, a random password kept in ``<data_dir>/../password``, mode 600).
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

USER = "mocosfl"


class ServiceError(RuntimeError):
    """A service could not be set up, started or reached; the message is one line for the user."""


def pg_bin(name: str) -> str:
    """Path of a PostgreSQL server program (``initdb``, ``pg_ctl``, ``postgres``): PATH, then Debian's folder."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        raise ServiceError(f"PostgreSQL's {name} not found: install the server (Debian: apt-get install postgresql)")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class Postgres:
    """One PostgreSQL cluster in ``root`` (``root/data`` its data directory), listening on ``host:port``."""

    root: Path
    port: int = 5432
    host: str = "127.0.0.1"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def password_file(self) -> Path:
        return self.root / "password"

    @property
    def log_file(self) -> Path:
        return self.root / "postgres.log"

    def _as_owner(self, *args: str) -> list[str]:
        """``args`` run as the ``postgres`` user when this process is root (the server refuses root)."""
        if os.geteuid() != 0:
            return list(args)
        runuser = shutil.which("runuser")
        if not runuser:
            raise ServiceError("running as root needs runuser (util-linux) to start PostgreSQL as 'postgres'")
        return [runuser, "-u", "postgres", "--", *args]

    def _run(self, *args: str, timeout: float = 120) -> None:
        out = subprocess.run(self._as_owner(*args), capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            detail = (out.stderr or out.stdout).strip().splitlines()
            raise ServiceError(f"{Path(args[0]).name} failed: {detail[-1] if detail else out.returncode}")

    def password(self) -> str:
        return self.password_file.read_text().strip()

    def url(self, database: str = USER, driver: str = "postgresql") -> str:
        """``postgresql://mocosfl:<password>@host:port/<database>`` (``driver`` e.g. ``postgresql+asyncpg``)."""
        return f"{driver}://{USER}:{self.password()}@{self.host}:{self.port}/{database}"

    def init(self) -> None:
        """Create the cluster once (nothing to do when it exists): superuser ``mocosfl`` with a random password."""
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:  # the server's user must reach its folder
            for parent in self.root.resolve().parents:
                if not parent.stat().st_mode & 0o001:
                    raise ServiceError(f"{parent} is closed to other users, so 'postgres' cannot reach {self.root}")
        if not self.password_file.exists():
            self.password_file.write_text(secrets.token_urlsafe(24) + "\n")
            self.password_file.chmod(0o600)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        pwfile = self.root / ".initdb-password"
        pwfile.write_text(self.password() + "\n")
        if os.geteuid() == 0:
            for path in (self.root, self.data_dir, pwfile):
                shutil.chown(path, "postgres", "postgres")
            self.root.chmod(0o711)  # the owner lists it; others (root's clients) only reach the password by path
        try:
            self._run(
                pg_bin("initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                USER,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=peer",
                "-E",
                "UTF8",
                "--no-instructions",
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists() and port_open(self.host, self.port)

    def start(self, timeout: float = 60) -> None:
        """Start the server (init first if needed) and wait until it accepts connections."""
        self.init()
        if self.running():
            return
        if port_open(self.host, self.port):
            raise ServiceError(f"port {self.host}:{self.port} is taken by another program: choose another port")
        if os.geteuid() == 0:
            self.log_file.touch()
            shutil.chown(self.log_file, "postgres", "postgres")
        options = f"-p {self.port} -c listen_addresses={self.host} -k {self.root}"
        self._run(pg_bin("pg_ctl"), "-D", str(self.data_dir), "-o", options, "-l", str(self.log_file), "start")
        deadline = time.monotonic() + timeout
        while not port_open(self.host, self.port):
            if time.monotonic() > deadline:
                raise ServiceError(f"PostgreSQL refused connections for {timeout:.0f} s (see {self.log_file})")
            time.sleep(0.2)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server if it runs (``mode``: smart, fast or immediate)."""
        if not (self.data_dir / "postmaster.pid").exists():
            return
        self._run(pg_bin("pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop")

    def create_database(self, name: str) -> None:
        """Create database ``name`` owned by ``mocosfl`` unless it exists."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url("postgres"), connect_timeout=10, autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
