"""Installation as a newcomer tries it: `pip install .` gives the one built vmbackup.py as the
module `vmbackup` and a `vmbackup` command that previews the simulated pool.

The wheel is built from a copy of the files pyproject.toml ships (so the source tree
gets no build/ or egg-info), with the test's own setuptools (no download), and
installed into a fresh virtualenv; XenAPI, the one dependency, is copied in beside
it, since the suite must not reach PyPI."""
import email.parser
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import XenAPI

import vmbackup
from conftest import ROOT

SHIPPED = ("pyproject.toml", "vmbackup.py", "README.md", "LICENSE")


def run(argv, **kw):
    proc = subprocess.run([str(a) for a in argv], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=300, **kw)
    return proc.returncode, proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel `pip wheel .` builds from the shipped files."""
    src = tmp_path_factory.mktemp("src")
    for name in SHIPPED:
        shutil.copy(os.path.join(ROOT, name), str(src / name))
    out = tmp_path_factory.mktemp("wheel")
    rc, text = run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                    "--no-index", "-q", "-w", out, src])
    assert rc == 0, text
    found = list(out.glob("*.whl"))
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    """A fresh virtualenv with the wheel installed (and XenAPI copied in)."""
    env = tmp_path_factory.mktemp("venv") / "env"
    rc, text = run([sys.executable, "-m", "venv", "--without-pip", env])
    assert rc == 0, text
    python = env / "bin" / "python"
    rc, text = run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
                    "--no-index", "-q", wheel])
    assert rc == 0, text
    rc, site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    shutil.copytree(os.path.dirname(XenAPI.__file__), os.path.join(site.strip(), "XenAPI"))
    return env


def test_wheel_holds_the_one_file_and_its_metadata(wheel):
    names = zipfile.ZipFile(str(wheel)).namelist()
    assert [n for n in names if ".dist-info/" not in n] == ["vmbackup.py"]
    assert wheel.name == "vmbackup-%s-py3-none-any.whl" % vmbackup.__version__
    meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
    meta = email.parser.Parser().parsestr(zipfile.ZipFile(str(wheel)).read(meta_name).decode())
    assert meta["Name"] == "vmbackup" and meta["Version"] == vmbackup.__version__
    assert meta["Requires-Python"] == ">=3.6"
    assert "GPL-3.0-or-later" in (meta["License"] or meta["License-Expression"] or "")
    requires = meta.get_all("Requires-Dist")
    assert "XenAPI" in requires and any(r.startswith("xxhash") and "extra" in r for r in requires)
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "vmbackup = vmbackup:main" in zipfile.ZipFile(str(wheel)).read(entry).decode()


def test_the_vmbackup_command_prints_the_version(venv):
    rc, out = run([venv / "bin" / "vmbackup", "--version"])
    assert rc == 0 and out.split() == ["vmbackup.py", vmbackup.__version__]
    rc, out = run([venv / "bin" / "python", "-c", "import vmbackup; print(vmbackup.__file__)"],
                  cwd="/")
    assert rc == 0 and out.strip().startswith(str(venv)), out


def test_the_vmbackup_command_previews_the_simulated_pool(venv, sim_pool, tmp_path):
    password = tmp_path / "xapi.pw"
    password.write_text(sim_pool.password + "\n")
    password.chmod(0o600)
    backups = tmp_path / "backups"
    backups.mkdir()
    rc, out = run([venv / "bin" / "vmbackup", "--server", sim_pool.url, "--transport", "api",
                   "--password-file", password, "-e", "web01", "-d", backups, "--preview"],
                  cwd=str(tmp_path), env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert rc == 0, out
    assert "Selected VMs (1):" in out and "web01" in out
    assert "Preview: the run would succeed (exit 0" in out
    assert os.listdir(str(backups)) == []
