"""A throw-away OpenSSH server for tests: its own host key, client key, config and port, in one folder.

``Sshd(root).configure()`` writes everything under ``root`` (neither /etc/ssh nor ~/.ssh is involved);
``running(server)`` starts ``sshd -D -e`` and stops it at exit. Logins are by the generated client key only,
as the user running the tests. ``server.known_hosts`` holds the generated host key, so an OpenSSH client
(``server.ssh(...)``) checks it is talking to this server (DVC checks no host key: tests/test_dvc_remote.py).
The server also offers SFTP (internal-sftp), which DVC's SSH remotes use.

On one machine the server listens on 127.0.0.1 (the default). On a host of ``netns.network`` give it that
host's address and start it there: ``running(server, popen=partial(net.popen, name), ready=server.listening)``
(the port cannot be probed from outside the namespace, so readiness comes from sshd's own log).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipelines.services import free_port, port_open

PRIVSEP_DIR = Path("/run/sshd")  # Debian's sshd refuses to start as root without it


def sshd_binary() -> str | None:
    """Absolute path of sshd (it re-executes itself, so it must be started by one), or None."""
    found = shutil.which("sshd", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"]))
    return str(Path(found).resolve()) if found else None


@dataclass
class Sshd:
    root: Path
    host: str = "127.0.0.1"
    port: int = 0  # 0: chosen by configure(): a free port when host is this machine's, else 22 (a namespace's own)

    @property
    def user(self) -> str:
        return pwd.getpwuid(os.geteuid()).pw_name

    @property
    def config(self) -> Path:
        return self.root / "sshd_config"

    @property
    def host_key(self) -> Path:
        return self.root / "host_ed25519"

    @property
    def client_key(self) -> Path:
        """The private key to log in with (``.pub`` beside it)."""
        return self.root / "client_ed25519"

    @property
    def known_hosts(self) -> Path:
        """A known_hosts file trusting this server's host key at ``[host]:port``."""
        return self.root / "known_hosts"

    @property
    def log(self) -> Path:
        return self.root / "sshd.log"

    def configure(self) -> None:
        """Keys, authorized_keys, known_hosts and sshd_config in ``root``; skips the test without OpenSSH."""
        sshd, keygen = sshd_binary(), shutil.which("ssh-keygen")
        if sshd is None or keygen is None:
            missing = " and ".join(n for n, p in (("sshd", sshd), ("ssh-keygen", keygen)) if p is None)
            pytest.skip(f"no {missing} here (Debian: apt-get install openssh-server)")
        if os.geteuid() == 0 and not PRIVSEP_DIR.is_dir():
            try:
                PRIVSEP_DIR.mkdir(mode=0o755, parents=True)
            except OSError as e:
                pytest.skip(f"sshd needs its privilege-separation folder {PRIVSEP_DIR}: {e}")
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.port:
            try:
                self.port = free_port(self.host)
            except OSError:  # an address of another network namespace: the port is free there
                self.port = 22
        for key, comment in ((self.host_key, "mocosfl-test-host"), (self.client_key, "mocosfl-test-client")):
            if not key.exists():
                subprocess.run(
                    [keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)],
                    check=True,
                    capture_output=True,
                    timeout=30,
                )
        authorized = self.root / "authorized_keys"
        authorized.write_text(self.client_key.with_suffix(".pub").read_text())
        host_pub = " ".join(self.host_key.with_suffix(".pub").read_text().split()[:2])  # type and key, no comment
        name = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        self.known_hosts.write_text(f"{name} {host_pub}\n")
        self.config.write_text(
            "\n".join(
                [
                    f"ListenAddress {self.host}",
                    f"Port {self.port}",
                    f"HostKey {self.host_key}",
                    f"PidFile {self.root / 'sshd.pid'}",
                    f"AuthorizedKeysFile {authorized}",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",
                    "StrictModes no",  # the key files live in a temp folder, not a home with checked modes
                    "UsePAM no",
                    "Subsystem sftp internal-sftp",  # SFTP without depending on where sftp-server is installed
                    "LogLevel VERBOSE",
                    "",
                ]
            )
        )

    def command(self) -> list[str]:
        sshd = sshd_binary()
        assert sshd is not None, "configure() first"
        return [sshd, "-D", "-e", "-f", str(self.config)]

    def listening(self) -> bool:
        """sshd's log says it listens (what readiness means where the port cannot be probed from here)."""
        return self.log.exists() and "Server listening on" in self.log.read_text(errors="replace")

    def url(self, path: Path | str) -> str:
        """``ssh://user@host:port/abs/path`` of ``path`` on this server."""
        return f"ssh://{self.user}@{self.host}:{self.port}/{str(path).lstrip('/')}"

    def ssh(self, *remote_command: str) -> list[str]:
        """An OpenSSH client command line running ``remote_command`` on this server with the client key."""
        return [
            "ssh",
            "-F",
            "none",
            "-i",
            str(self.client_key),
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "BatchMode=yes",
            "-p",
            str(self.port),
            f"{self.user}@{self.host}",
            *remote_command,
        ]


@contextlib.contextmanager
def running(
    server: Sshd,
    popen: Callable[..., subprocess.Popen] = subprocess.Popen,
    ready: Callable[[], bool] | None = None,
    timeout: float = 20.0,
) -> Iterator[subprocess.Popen]:
    """Start ``server`` (configured) with ``popen``; wait until ``ready()`` (default: the port answers) for at
    most ``timeout`` s; stop it at exit. A server that exits or never gets ready fails with its log."""
    probe = ready or (lambda: port_open(server.host, server.port, timeout=0.5))
    with open(server.log, "ab") as log:
        kwargs: dict = {"stdin": subprocess.DEVNULL, "stdout": log, "stderr": subprocess.STDOUT}
        if popen is subprocess.Popen:
            kwargs["start_new_session"] = True  # stopping it stops nothing of the test's own
        proc = popen(server.command(), **kwargs)
    try:
        deadline = time.monotonic() + timeout
        while not probe():
            if proc.poll() is not None or time.monotonic() > deadline:
                code = proc.returncode
                state = f"exited with {code}" if code is not None else f"not ready in {timeout:.0f} s"
                tail = server.log.read_text(errors="replace").strip().splitlines()[-15:]
                raise RuntimeError(f"sshd on {server.host}:{server.port} {state}; its log:\n" + "\n".join(tail))
            time.sleep(0.1)
        yield proc
    finally:
        # The listener only: each login is a child in a session of its own that ends with its connection.
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
