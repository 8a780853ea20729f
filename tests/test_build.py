"""tools/build.py: the shipped vmbackup.py is the build of src/, and the build refuses what it cannot flatten."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUILD = os.path.join(ROOT, "tools", "build.py")

spec = importlib.util.spec_from_file_location("vmbackup_build", BUILD)
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)


def make_package(root, files):
    """Write a small package src/vmbackup/... under `root` and return the src path."""
    src = os.path.join(str(root), "src")
    for rel, text in files.items():
        path = os.path.join(src, "vmbackup", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(textwrap.dedent(text).lstrip("\n"))
    return src


BASE = {
    "__init__.py": '''
        """demo: a tiny package."""

        __version__ = "9.9"
        ''',
    "low.py": '''
        """low: the bottom layer."""

        import os

        #: a constant the top uses
        BASE = 40


        def two():
            return len(os.sep) * 2
        ''',
    "sub/__init__.py": '"""sub: a folder of modules."""\n',
    "sub/top.py": '''
        """top: uses low."""

        import os
        import sys

        from vmbackup import __version__
        from vmbackup.low import BASE, two


        def main():
            print(__version__, BASE + two())
            return 0


        if __name__ == "__main__":
            sys.exit(main())
        ''',
}


def build_fails(tmp_path, files, message):
    src = make_package(tmp_path, dict(BASE, **files))
    with pytest.raises(build.BuildError) as caught:
        build.build(src)
    assert message in str(caught.value)
    return str(caught.value)


def test_shipped_file_is_a_fresh_build_of_src():
    proc = subprocess.run([sys.executable, BUILD, "--check"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True)
    assert proc.returncode == 0, proc.stderr


def test_check_notices_a_stale_file(tmp_path):
    src = make_package(tmp_path, BASE)
    out = str(tmp_path / "out.py")
    assert build.main(["--src", src, "--out", out]) == 0
    assert build.main(["--src", src, "--out", out, "--check"]) == 0
    with open(out, "a") as handle:
        handle.write("# patched by hand\n")
    assert build.main(["--src", src, "--out", out, "--check"]) == 1


def test_joins_modules_in_dependency_order_and_runs(tmp_path):
    src = make_package(tmp_path, BASE)
    text = build.build(src)
    assert text.startswith('#!/usr/bin/env python3\n"""demo: a tiny package.')
    assert text.count("import os\n") == 1                    # hoisted once
    assert "from vmbackup" not in text
    assert text.index("# === vmbackup/low.py") < text.index("# === vmbackup/sub/top.py")
    assert "# low: the bottom layer." in text                # docstring as a comment
    assert "#: a constant the top uses\nBASE = 40" in text   # comments kept with their code
    out = tmp_path / "demo.py"
    out.write_text(text)
    proc = subprocess.run([sys.executable, str(out)], stdout=subprocess.PIPE, universal_newlines=True)
    assert (proc.returncode, proc.stdout) == (0, "9.9 42\n")


def test_order_is_by_layer():
    order = build.build_order({n: build.parse_module(n, p)
                               for n, p in build.find_modules(os.path.join(ROOT, "src")).items()})
    assert order[0] == "vmbackup"
    assert order.index("vmbackup.errors") < order.index("vmbackup.util") < order.index("vmbackup.config")
    assert order.index("vmbackup.transport.base") < order.index("vmbackup.transport.api")
    assert order[-1] == "vmbackup.cli"


@pytest.mark.parametrize("files, message", [
    ({"dup.py": '"""dup."""\n\nBASE = 1\n'}, "`BASE` is also defined in"),
    ({"rel.py": '"""rel."""\n\nfrom .low import BASE\n'}, "relative import"),
    ({"plain.py": '"""plain."""\n\nimport vmbackup.low\n'}, "cannot be flattened"),
    ({"alias.py": '"""alias."""\n\nfrom vmbackup.low import two as deux\n'}, "cannot be flattened"),
    ({"star.py": '"""star."""\n\nfrom vmbackup.low import *\n'}, "cannot be flattened"),
    ({"inner.py": '"""inner."""\n\n\ndef f():\n    from vmbackup.low import two\n    return two()\n'},
     "below the top level"),
    ({"missing.py": '"""missing."""\n\nfrom vmbackup.low import three\n'}, "does not define `three`"),
    ({"nowhere.py": '"""nowhere."""\n\nfrom vmbackup.gone import x\n'}, "no module vmbackup.gone"),
    ({"a.py": '"""a."""\n\nfrom vmbackup.b import B\n\nA = 1\n',
      "b.py": '"""b."""\n\nfrom vmbackup.a import A\n\nB = 2\n'}, "import cycle"),
])
def test_refuses_what_it_cannot_flatten(tmp_path, files, message):
    text = build_fails(tmp_path, files, message)
    assert "src/vmbackup/" in text or "vmbackup/" in text   # names the file
    assert "\n" not in text                                  # one line


def test_refusal_is_one_line_and_exit_2(tmp_path, capsys):
    src = make_package(tmp_path, dict(BASE, **{"dup.py": '"""dup."""\n\n\ndef two():\n    pass\n'}))
    assert build.main(["--src", src, "--out", str(tmp_path / "x.py")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "`two` is also defined in" in err and "dup.py:4" in err
    assert not os.path.exists(str(tmp_path / "x.py"))


def test_package_modules_import_only_downwards():
    """Nothing imports cli; the package itself imports nothing (so any module can use __version__)."""
    modules = {n: build.parse_module(n, p)
               for n, p in build.find_modules(os.path.join(ROOT, "src")).items()}
    assert not any("vmbackup.cli" in m.deps for m in modules.values())
    assert modules["vmbackup"].deps == {}


def test_package_runs_as_python_m_vmbackup():
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    proc = subprocess.run([sys.executable, "-m", "vmbackup", "--version"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    assert proc.returncode == 0 and "0." in proc.stdout, proc.stdout
