"""Shared fixtures for the vmbackup test suite, shaped like borg's: a clean environment,
`run_vmbackup(*args, exit_code=0)`, and a `transport` fixture so every backup scenario
runs over both xe and the API."""
import contextlib
import io
import os
import subprocess
import sys

import pytest
import XenAPI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (HERE, ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)

import vmbackup  # noqa: E402

pytest_plugins = ["xapisim.pytest_plugin"]

VMBACKUP = os.path.join(ROOT, "vmbackup.py")


def session(pool):
    """A XenAPI session logged in to a simulated pool (the caller logs out)."""
    s = XenAPI.Session(pool.url)
    s.xenapi.login_with_password(pool.user, pool.password, "2.0", "tests")
    return s


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No VMBACKUP_/XE/XAPISIM variables leak in; HOME is the test's own folder."""
    for key in list(os.environ):
        if key.startswith(("VMBACKUP_", "XAPISIM_", "XE")):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    yield


@pytest.fixture
def backup_dir(tmp_path):
    path = tmp_path / "backups"
    path.mkdir()
    return path


def invoke(*args, fork=False, env=None, cwd=None):
    """Run vmbackup with `args`; return (exit code, output).

    In-process by default (calls main()), or as a real subprocess with fork=True.
    """
    args = [str(a) for a in args]
    if fork:
        proc = subprocess.run([sys.executable, VMBACKUP] + args, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, universal_newlines=True,
                              env=env, cwd=cwd, timeout=600)
        return proc.returncode, proc.stdout
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = vmbackup.main(args)
    return rc, buf.getvalue()


def run_vmbackup(*args, exit_code=0, fork=False, env=None, cwd=None):
    """Run vmbackup with `args`; assert its exit code (None: any); return its output."""
    rc, output = invoke(*args, fork=fork, env=env, cwd=cwd)
    if exit_code is not None and rc != exit_code:
        pytest.fail("vmbackup %s exited %s, expected %s; output:\n%s"
                    % ([str(a) for a in args], rc, exit_code, output))
    return output


def spawn(args):
    """Start vmbackup as a real process in its own session (like a cron job)."""
    return subprocess.Popen([sys.executable, VMBACKUP] + [str(a) for a in args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, start_new_session=True)


def backups_of(backup_dir, vm_folder):
    """The backup-* folder names of one VM folder of backup_dir, oldest first ([] if none)."""
    path = os.path.join(str(backup_dir), vm_folder)
    if not os.path.isdir(path):
        return []
    return sorted(n for n in os.listdir(path) if n.startswith("backup-"))


def assert_pool_clean(pool):
    """No snapshot and no VDI the tool made is left in the pool."""
    left = pool.leftovers()
    assert not left["snapshots"] and not left["vdis"], left


class Connect:
    """Command-line arguments that connect vmbackup to a simulated pool over one transport.

    `transport(pool)` sets the pool's environment (the xe stand-in reads it) and returns
    the arguments; `transport.kind` is "xe" or "api".
    """

    def __init__(self, kind, tmp_path, monkeypatch):
        self.kind, self.tmp_path, self.monkeypatch = kind, tmp_path, monkeypatch

    def password_file(self, pool):
        path = self.tmp_path / "xapi.pw"
        path.write_text(pool.password + "\n")
        path.chmod(0o600)
        return path

    def __call__(self, pool):
        for key, value in pool.env().items():
            self.monkeypatch.setenv(key, value)
        if self.kind == "xe":
            # on the pool host: xe and XenAPI over the local socket, no password
            return ["--transport", "xe", "--xe", pool.xe_path, "--server", "unix:" + pool.socket_path]
        return ["--transport", "api", "--server", pool.url,
                "--password-file", str(self.password_file(pool))]


@pytest.fixture(params=["xe", "api"])
def transport(request, tmp_path, monkeypatch):
    """Parametrises a test over both transports (borg's generate_archiver_tests)."""
    return Connect(request.param, tmp_path, monkeypatch)


@pytest.fixture
def api(tmp_path, monkeypatch):
    return Connect("api", tmp_path, monkeypatch)
