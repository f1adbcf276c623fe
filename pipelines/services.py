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
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

USER = "mocosfl"


class ServiceError(RuntimeError):
    """A service could not be set up, started or reached; the message is one line for the user."""


def _write_secret(path: Path, text: str) -> None:
    """``text`` into a new file readable by its owner only from the first byte (no umask window)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


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

    def url(self, database: str = USER, driver: str = "postgresql", password: bool = True) -> str:
        """``postgresql://mocosfl:<password>@host:port/<database>`` (``driver`` e.g. ``postgresql+asyncpg``);
        ``password=False`` leaves it out (the client then takes it from PGPASSWORD or ~/.pgpass)."""
        secret = f":{self.password()}" if password else ""
        return f"{driver}://{USER}{secret}@{self.host}:{self.port}/{database}"

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
            _write_secret(self.password_file, secrets.token_urlsafe(24))
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        pwfile = self.root / ".initdb-password"
        pwfile.unlink(missing_ok=True)
        _write_secret(pwfile, self.password())
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
                "--no-locale",  # no dependence on which locales the machine generated
                "--no-instructions",
            )
        finally:
            pwfile.unlink(missing_ok=True)
        # Password logins over TCP from any address the server listens on (listen_addresses = the services'
        # host: loopback only by default); initdb's own rules cover 127.0.0.1 and ::1 only.
        with open(self.data_dir / "pg_hba.conf", "a") as hba:
            hba.write(f"host all {USER} all scram-sha-256\n")

    def running(self) -> bool:
        return self._server_alive() and port_open(self.host, self.port)

    def _server_alive(self) -> bool:
        """pg_ctl status: a postmaster.pid left by a crash does not count."""
        if not (self.data_dir / "postmaster.pid").exists():
            return False
        out = subprocess.run(self._as_owner(pg_bin("pg_ctl"), "-D", str(self.data_dir), "status"), capture_output=True)
        return out.returncode == 0

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
        if not self._server_alive():
            return
        self._run(pg_bin("pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop")

    def create_database(self, name: str) -> None:
        """Create database ``name`` owned by ``mocosfl`` unless it exists."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url("postgres"), connect_timeout=10, autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


# ----------------------------------------------------------------------------- make services

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Settings:
    """Where the shared services live and listen (``make services`` reads them from the environment)."""

    root: Path = ROOT / ".services"
    host: str = "127.0.0.1"
    pg_port: int = 5432
    mlflow_port: int = 5000
    prefect_port: int = 4200

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        try:
            return cls(
                root=Path(env.get("SERVICES_DIR", str(ROOT / ".services"))).resolve(),
                host=env.get("SERVICES_HOST", "127.0.0.1"),
                pg_port=int(env.get("PG_PORT", "5432")),
                mlflow_port=int(env.get("MLFLOW_PORT", "5000")),
                prefect_port=int(env.get("PREFECT_PORT", "4200")),
            )
        except ValueError as e:
            raise ServiceError(f"a port setting is not a number: {e}") from None

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def prefect_api(self) -> str:
        return f"http://{self.host}:{self.prefect_port}/api"

    def postgres(self) -> Postgres:
        return Postgres(self.root / "postgres", self.pg_port, self.host)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(200 <= response.status < 300)
    except OSError:
        return False


def _pid_alive(pidfile: Path) -> int | None:
    """The pid in ``pidfile`` if that process still leads its own process group (as ``_spawn`` started it), so
    a recycled pid of some other program is not taken for ours; zombies do not count."""
    try:
        pid = int(pidfile.read_text())
        if os.getpgid(pid) != pid:
            return None
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return None if state == "Z" else pid
    except (OSError, ValueError, IndexError):
        return None


def _spawn(name: str, argv: list[str], env: dict[str, str], root: Path) -> None:
    """Start ``argv`` in its own session (so ``stop`` ends it and its children), logging to ``root/name.log``."""
    with open(root / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    (root / f"{name}.pid").write_text(str(proc.pid))


def _wait(url: str, name: str, root: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not http_ok(url):
        if _pid_alive(root / f"{name}.pid") is None:
            raise ServiceError(f"{name} exited while starting (see {root / f'{name}.log'})")
        if time.monotonic() > deadline:
            raise ServiceError(f"{name} not healthy at {url} within {timeout:.0f} s (see {root / f'{name}.log'})")
        time.sleep(0.5)


def _bin(name: str) -> str:
    """A program of this virtualenv (mlflow, prefect), next to the running Python."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def start(s: Settings, log: Any = print, timeout: float = 120) -> dict[str, str]:
    """PostgreSQL, then an MLflow tracking server (proxied artifact store) and a Prefect server backed by it;
    waits until each is healthy. Services already running are left as they are. Returns the env to export."""
    t0 = time.monotonic()
    s.root.mkdir(parents=True, exist_ok=True)
    pg = s.postgres()
    was_up = pg.running()
    pg.start()
    log(f"PostgreSQL {'already running' if was_up else 'started'} on {s.host}:{s.pg_port} ({pg.data_dir})")
    for db in ("mlflow", "prefect", "optuna"):  # optuna: for tune.storage=postgresql://…/optuna
        pg.create_database(db)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    services = {
        "mlflow": (
            f"{s.mlflow_url}/health",
            [
                _bin("mlflow"),
                "server",
                "--host",
                s.host,
                "--port",
                str(s.mlflow_port),
                "--workers",
                "1",
                "--serve-artifacts",
                "--artifacts-destination",
                str(s.root / "mlflow-artifacts"),
            ],
            # The URL holds the password: in the environment, not on a command line others can read in ps.
            {
                "MLFLOW_BACKEND_STORE_URI": pg.url("mlflow", "postgresql+psycopg"),
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            },
        ),
        "prefect": (
            f"{s.prefect_api}/health",
            [_bin("prefect"), "server", "start", "--host", s.host, "--port", str(s.prefect_port)],
            {
                "PREFECT_API_DATABASE_CONNECTION_URL": pg.url("prefect", "postgresql+asyncpg"),
                "PREFECT_HOME": str(ROOT / ".prefect"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            },
        ),
    }
    for name, (health, argv, env) in services.items():
        if http_ok(health):
            log(f"{name} already running: {health.removesuffix('/health')}")
            continue
        if port_open(s.host, int(argv[argv.index("--port") + 1])):
            raise ServiceError(f"{name}'s port on {s.host} is taken by another program: set its port setting")
        _spawn(name, argv, {**base, **env}, s.root)
    for name, (health, _, _) in services.items():
        _wait(health, name, s.root, timeout)
    exports = {
        "MLFLOW_TRACKING_URI": s.mlflow_url,
        "PREFECT_API_URL": s.prefect_api,
        # For `--set tune.storage=$MOCOSFL_TUNE_STORAGE` and `make deploy`'s mocosfl/tune; the password
        # reaches the database driver (libpq) through PGPASSWORD, never inside a URL.
        "MOCOSFL_TUNE_STORAGE": pg.url("optuna", "postgresql", password=False),
    }
    env_file = s.root / "env"
    env_file.unlink(missing_ok=True)
    _write_secret(
        env_file,
        "".join(f"export {k}={v}\n" for k, v in exports.items()) + f"export PGPASSWORD={pg.password()}",
    )
    log(f"services healthy in {time.monotonic() - t0:.1f} s: MLflow {s.mlflow_url}, Prefect {s.prefect_api}")
    log(f"export them (or: source {env_file}, which also sets PGPASSWORD):")
    for k, v in exports.items():
        log(f"  export {k}={v}")
    return exports


def stop(s: Settings, log: Any = print, timeout: float = 30) -> None:
    """Stop the MLflow and Prefect servers this project started, then PostgreSQL."""
    import signal

    for name in ("prefect", "mlflow"):
        pidfile = s.root / f"{name}.pid"
        pid = _pid_alive(pidfile)
        if pid is None:
            log(f"{name}: not running")
            pidfile.unlink(missing_ok=True)
            continue
        try:
            os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _pid_alive(pidfile) is not None and time.monotonic() < deadline:
                time.sleep(0.2)
            if _pid_alive(pidfile) is not None:
                os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it ended on its own meanwhile
        pidfile.unlink(missing_ok=True)
        log(f"{name}: stopped")
    pg = s.postgres()
    if (pg.data_dir / "postmaster.pid").exists():
        pg.stop()
        log("PostgreSQL: stopped")
    else:
        log("PostgreSQL: not running")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m pipelines.services",
        description="PostgreSQL + MLflow + Prefect servers for several workers or hosts (`make services`). "
        "Settings from the environment: SERVICES_HOST, SERVICES_DIR, PG_PORT, MLFLOW_PORT, PREFECT_PORT.",
    )
    parser.add_argument("action", choices=["start", "stop"])
    args = parser.parse_args(argv)
    try:
        s = Settings.from_env()
        if args.action == "start":
            start(s)
        else:
            stop(s)
    except (ServiceError, subprocess.TimeoutExpired, OSError) as e:
        print(f"services: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
