"""README's own commands, run as written where they can run here (so the docs cannot rot):
`make demo`'s command, the "By hand, on the simulated pool" block (a preview, a backup with
a metrics file, list, verify, a restore preview, promtool), and the two alert rules
(`promtool check rules` and `promtool test rules` against series shaped like the metrics
file's)."""
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT


def readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        return handle.read()


def block_after(marker):
    """Return the lines of the first fenced block after `marker` in README.md."""
    text = readme()
    start = text.index(marker)
    match = re.search(r"```[a-z]*\n(.*?)\n```", text[start:], re.S)
    return match.group(1).splitlines()


def shell(line, cwd, env):
    proc = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    return proc.returncode, proc.stdout


def test_make_demo_runs(tmp_path):
    makefile = open(os.path.join(ROOT, "Makefile"), encoding="utf-8").read()
    recipe = re.search(r"^demo:.*\n\t(.+)$", makefile, re.M).group(1)
    assert "make demo" in readme()
    line = recipe.replace("$(PY)", shlex.quote(sys.executable)).replace(
        "demo-backups", shlex.quote(str(tmp_path / "demo-backups")))
    rc, out = shell(line, ROOT, dict(os.environ))
    assert rc == 0, out
    assert "all steps behaved as designed" in out


def test_by_hand_block_runs_as_written(sim_pool, tmp_path):
    lines = [l for l in block_after("<!-- readme-test: begin -->") if l.strip()]
    makefile = open(os.path.join(ROOT, "Makefile"), encoding="utf-8").read()
    sim = re.search(r"^sim:.*\n\t(.+)$", makefile, re.M).group(1)
    # what `make sim` runs, with the virtualenv's Python (XenAPI, xxhash): the sim_pool fixture
    assert lines[0].startswith(sim.replace("$(PY)", ".venv/bin/python") + " "), lines[0]
    assert all(l.startswith((".venv/bin/python ", "promtool ", "(umask")) for l in lines), lines
    assert sim_pool.password == "xenroot"
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    outputs = []
    for line in lines[1:]:
        line = line.replace("http://127.0.0.1:8080/", sim_pool.url.rstrip("/") + "/")
        line = line.replace("/tmp/", str(tmp_path) + "/")
        line = re.sub(r"^\.venv/bin/python ", shlex.quote(sys.executable) + " ", line)
        rc, out = shell(line, ROOT, env)
        assert rc == 0, "%s\n%s" % (line, out)
        outputs.append(out)
    preview, backup, listing, verify, restore = outputs[1:6]
    assert "Preview: the run would succeed (exit 0, S:1 W:0 E:0): 1 VMs selected." in preview
    assert "done: S:1 W:0 E:0, exit 0" in backup
    assert "web01" in listing and "complete" in listing
    assert os.path.isfile(str(tmp_path / "backups" / "vmbackup.prom"))
    assert "web01" in restore


def test_install_block_runs_on_a_fresh_host(tmp_path):
    """The install steps, with / moved into tmp_path: nothing assumes a folder is there."""
    lines = block_after("## Install on a pool host")
    root = tmp_path / "root"
    bin_dir = root / "usr/local/bin"
    bin_dir.mkdir(parents=True)
    env = dict(os.environ, PATH=str(bin_dir) + os.pathsep + os.path.dirname(sys.executable)
               + os.pathsep + os.environ["PATH"])
    outputs = []
    for line in lines:
        line = re.sub(r"(?<![\w.])/(usr|etc)/", str(root) + r"/\1/", line)
        rc, out = shell(line, ROOT, env)
        outputs.append((line, rc, out))
    (_, rc, out) = outputs[0]
    assert rc == 0, out
    assert all(rc == 0 for (_, rc, _) in outputs[:-1]), outputs
    # the printed config selects nothing until its selectors are uncommented, and says so
    assert outputs[-1][1] == 2 and "selects nothing" in outputs[-1][2], outputs[-1]


@pytest.fixture
def rules(tmp_path):
    path = tmp_path / "rules.yml"
    path.write_text("\n".join(block_after("<!-- readme-test: alert-rules -->")) + "\n")
    return path


def test_alert_rules_pass_promtool(rules):
    proc = subprocess.run(["promtool", "check", "rules", str(rules)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True)
    assert proc.returncode == 0 and "SUCCESS: 2 rules found" in proc.stdout, proc.stdout


ALERT_TESTS = """\
rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      # db01's last good backup is at time 0 and stays there (every later run failed)
      - series: 'vmbackup_vm_last_success_timestamp_seconds{config="n.cfg",mode="vm-export",uuid="u1",vm="db01"}'
        values: '0x3100'
      # web01 succeeds all the time
      - series: 'vmbackup_vm_last_success_timestamp_seconds{config="n.cfg",mode="vm-export",uuid="u2",vm="web01"}'
        values: '0+60x3100'
      # a metadata-only backup is not a backup of the disks
      - series: 'vmbackup_vm_last_success_timestamp_seconds{config="m.cfg",mode="meta-export",uuid="u2",vm="web01"}'
        values: '0x3100'
      - series: 'vmbackup_last_run_exit_code{config="n.cfg"}'
        values: '0x59 1x60 2x60'
    alert_rule_test:
      - eval_time: 47h
        alertname: VmBackupTooOld
        exp_alerts: []
      - eval_time: 50h
        alertname: VmBackupTooOld
        exp_alerts:
          - exp_labels: {severity: critical, vm: db01, uuid: u1}
            exp_annotations: {summary: "No successful backup of VM db01 for 2 days"}
      - eval_time: 90m
        alertname: VmBackupRunFailed
        exp_alerts: []
      - eval_time: 150m
        alertname: VmBackupRunFailed
        exp_alerts:
          - exp_labels: {severity: warning, config: n.cfg}
            exp_annotations: {summary: "The last vmbackup run (n.cfg) failed: see its mail or log"}
"""


def test_alert_rules_fire_when_they_should(rules, tmp_path):
    tests = tmp_path / "tests.yml"
    tests.write_text(ALERT_TESTS)
    proc = subprocess.run(["promtool", "test", "rules", str(tests)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, cwd=str(tmp_path))
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout
