"""vmbackup.py really runs on dom0's Python 3.6 (XCP-ng 8.3, XenServer 8): a backup, a
verify and a restore with a 3.6 interpreter, where one is installed (vermin checks the
syntax and library use on every run, in the README's test command)."""
import glob
import os
import shutil
import subprocess

import pytest
import XenAPI

from conftest import VMBACKUP


def python36():
    candidates = glob.glob("/root/.pyenv/versions/3.6*/bin/python3.6") + \
        glob.glob(os.path.expanduser("~/.pyenv/versions/3.6*/bin/python3.6")) + \
        [p for p in (shutil.which("python3.6"),) if p]
    for path in candidates:
        try:
            out = subprocess.run([path, "--version"], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, universal_newlines=True, timeout=30)
        except OSError:
            continue
        if out.returncode == 0 and out.stdout.startswith("Python 3.6"):
            return path
    return None


PY36 = python36()
pytestmark = pytest.mark.skipif(PY36 is None, reason="no Python 3.6 interpreter on this machine")


def run36(args, env, tmp_path, code=0):
    proc = subprocess.run([PY36, VMBACKUP] + [str(a) for a in args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, env=env, timeout=300,
                          cwd=str(tmp_path))
    assert proc.returncode == code, proc.stdout
    return proc.stdout


@pytest.fixture
def env36(tmp_path, sim_pool):
    """The XenAPI package as dom0 has it: importable by the 3.6 interpreter."""
    lib = tmp_path / "lib36"
    shutil.copytree(os.path.dirname(XenAPI.__file__), str(lib / "XenAPI"))
    env = dict(os.environ, PYTHONPATH=str(lib), **sim_pool.env())
    env.pop("PYTHONHOME", None)
    return env


def test_backup_verify_restore_on_python36(sim_pool, env36, tmp_path, backup_dir):
    pw = tmp_path / "pw"
    pw.write_text(sim_pool.password + "\n")
    pw.chmod(0o600)
    api = ["--server", sim_pool.url, "--password-file", pw, "--transport", "api"]
    xe = ["--server", "unix:" + sim_pool.socket_path, "--transport", "xe", "--xe", sim_pool.xe_path]
    run36(api + ["-e", "web01", "-E", "db01::xvda;xvdb", "-m", "win2022", "-d", backup_dir,
                 "--pool-db-backup"], env36, tmp_path)
    run36(xe + ["-e", "PRD-print7", "--compress", "gzip", "-d", backup_dir], env36, tmp_path)
    out = run36(["verify", backup_dir], env36, tmp_path)
    assert "BAD" not in out
    out = run36(["restore", backup_dir / "web01"] + api, env36, tmp_path)
    assert "restored vm" in out
    out = run36(["-c", "/nonexistent.cfg"], env36, tmp_path, code=2)
    assert out.strip() == "vmbackup.py: error: cannot read config file /nonexistent.cfg: No such file or directory"
    assert not sim_pool.leftovers()["snapshots"]
