"""A DVC remote on another host over SSH, for real: in a copy of this repository, the README's commands switch
the default remote from `.dvcstore/` to an SSH server (a throw-away sshd on 127.0.0.1, tests/sshd.py), `make
push` sends every stage's outputs there, and `make pull` brings them back byte for byte into a workspace whose
cache and outputs were deleted. Also pinned down: DVC logs in with the configured key, it does not check the
server's host key, and with `verify` it refuses an object altered on the remote."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import copy_checkout

pytestmark = [pytest.mark.integration]

VENV = Path(sys.executable).parent.parent  # not resolved: the venv, not the base interpreter
DVC = VENV / "bin" / "dvc"


def _copy_repo(dest: Path) -> None:
    """The working tree's tracked and untracked-not-ignored files as a fresh git repository: dvc.yaml,
    .dvc/config (default remote `local` = .dvcstore/) and the Makefile's push/pull as they are."""
    copy_checkout(dest)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "copy"]):
        subprocess.run(git + cmd, cwd=dest, check=True, capture_output=True, timeout=60)


def _outputs(repo: Path) -> list[str]:
    """Every cached output of dvc.yaml's stages: outs, metrics and plots (what `make push` sends)."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    entries = [e for st in stages.values() for kind in ("outs", "metrics", "plots") for e in st.get(kind, [])]
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries]


def _fake_outputs(repo: Path) -> dict[str, bytes]:
    """Small stand-ins for the outputs of a `dvc repro`: random content in each file output (text where DVC
    reads it as metrics: JSON, CSV), and in two files of each directory output (a name without a suffix:
    data/prepared, runs, ...). Returns {path: content}."""
    text = {".json": '{{"value": {}}}\n', ".csv": "step,value\n0,{}\n"}
    files: dict[str, bytes] = {}
    for out in _outputs(repo):
        names = [out] if Path(out).suffix else [f"{out}/shard-0.bin", f"{out}/sub/shard-1.bin"]
        for name in names:
            suffix = Path(name).suffix
            files[name] = text[suffix].format(random.random()).encode() if suffix in text else os.urandom(20_000)
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / name).write_bytes(files[name])
    return files


def _remote_object(remote: Path, md5: str) -> Path:
    return remote / "files" / "md5" / md5[:2] / md5[2:]  # DVC 3's layout of a remote (and of its cache)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    if not DVC.exists():
        pytest.skip(f"dvc not installed in {VENV}")
    if shutil.which("make") is None:
        pytest.skip("no make here")
    dest = tmp_path / "main"
    dest.mkdir()
    _copy_repo(dest)
    return dest


def test_push_and_pull_through_an_ssh_remote(repo: Path, sshd, tmp_path: Path) -> None:
    home = tmp_path / "home"  # the user's ~/.ssh (known_hosts) and ~/.config/dvc: none of this machine's own
    home.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(repo / ".dvc" / "tmp" / "site-cache"),
    }
    env.pop("MOCOSFL_PARAMS", None)

    def run(*cmd: str, ok: bool = True) -> str:
        proc = subprocess.run(list(cmd), cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        out = proc.stdout + proc.stderr
        assert (proc.returncode == 0) == ok, f"{' '.join(cmd)} exited with {proc.returncode}:\n{out}"
        return out

    def make(target: str, ok: bool = True) -> str:
        return run("make", "-o", ".venv/.installed", target, ok=ok)  # -o: never a pip install from a test

    # Every stage's outputs, committed to DVC's cache as if `dvc repro` had made them.
    files = _fake_outputs(repo)
    run(str(DVC), "commit", "--force")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    manifests = [o["md5"] for st in lock.values() for o in st.get("outs", []) if o["md5"].endswith(".dir")]
    assert len(manifests) == sum(not Path(o).suffix for o in _outputs(repo)) > 0

    # The README's switch: a default remote on the other host that re-hashes what it pulls (both in .dvc/config,
    # shared), and the key per user (.dvc/config.local).
    remote = sshd.root / "remote"  # on the "other host": sshd's side of the connection
    run(str(DVC), "remote", "add", "-d", "shared", sshd.url(remote))
    run(str(DVC), "remote", "modify", "shared", "verify", "true")
    run(str(DVC), "remote", "modify", "--local", "shared", "keyfile", str(sshd.client_key))
    assert "keyfile" not in (repo / ".dvc" / "config").read_text()  # the key path stays out of git
    assert "keyfile" in (repo / ".dvc" / "config.local").read_text()
    assert run("git", "check-ignore", ".dvc/config.local").strip() == ".dvc/config.local"

    # DVC does not check the server's host key: sshfs connects with known_hosts=None and DVC's config has no
    # option for it. A known_hosts that pins another key for this server does not stop the push (if it ever
    # does, DVC started checking: the README's note on host keys must change).
    (home / ".ssh").mkdir(mode=0o700)
    other_key = " ".join(sshd.client_key.with_suffix(".pub").read_text().split()[:2])
    (home / ".ssh" / "known_hosts").write_text(f"[{sshd.host}]:{sshd.port} {other_key}\n")
    assert "files pushed" in make("push")
    assert f"Accepted publickey for {sshd.user} from 127.0.0.1" in sshd.log.read_text()  # the key, not a password
    for md5 in manifests:
        assert _remote_object(remote, md5).is_file(), md5  # a directory output's list of files
    for name, data in files.items():
        assert _remote_object(remote, hashlib.md5(data).hexdigest()).read_bytes() == data, name
    assert not (repo / ".dvcstore").exists()  # nothing went to the project's default local remote

    # Another machine, as far as DVC can tell: no cache, no outputs; `make pull` restores them from the remote.
    shutil.rmtree(repo / ".dvc" / "cache")
    for out in _outputs(repo):
        if (repo / out).is_dir():
            shutil.rmtree(repo / out)
        else:
            (repo / out).unlink()
    make("pull")
    for name, data in files.items():
        assert (repo / name).read_bytes() == data, name
    assert "are in sync" in run(str(DVC), "status", "--cloud")

    # With `verify`, an object altered on the remote is refused instead of checked out (without it, DVC trusts
    # the remote's copy: the README's reason for the setting).
    name = next(iter(files))
    altered = _remote_object(remote, hashlib.md5(files[name]).hexdigest())
    altered.chmod(0o644)
    altered.write_bytes(b"altered on the remote\n")
    shutil.rmtree(repo / ".dvc" / "cache")
    (repo / name).unlink()
    out = next(o for o in _outputs(repo) if name == o or name.startswith(f"{o}/"))
    assert f"Checkout failed for following targets:\n{out}\n" in make("pull", ok=False)
    assert not (repo / name).exists()
    for other, data in files.items():  # the outputs not touched are checked out all the same
        if not (other == out or other.startswith(f"{out}/")):
            assert (repo / other).read_bytes() == data, other
