"""One record of the run's outcome: the exit code, the S/W/E tally, the status log, the
JSON summary and the recap are all read from it, and agree -- from a table of Outcomes
(pure) and from a table of runs against the simulated pool over both transports."""
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

import vmbackup
from vmbackup import (
    Outcome, RunProblem, VmResult, exit_code_for, recap, run_summary, status_end_fields,
    status_size, tally)
from conftest import assert_pool_clean, invoke, run_vmbackup, session, spawn
from test_reliability import exporting, stray_files, wait_for

T0 = datetime.datetime(2026, 12, 1, 3, 0, 0)


def unit(status, name="web01", warnings=(), message=""):
    return VmResult(name, "u-" + name, "vm-export", status, message=message, warnings=warnings)


def outcome(*results, problems=(), cannot_start=None, terminated=None):
    return Outcome(T0, T0, tuple(results), tuple(problems), cannot_start=cannot_start,
                   terminated=terminated)


W = RunProblem("warning", "", "vm not found: vm-export=nosuchvm (--vm-export)")
E = RunProblem("error", "", "cannot destroy leftover snapshot 1234: INTERNAL_ERROR")


@pytest.mark.parametrize("record, code, counts, word", [
    (outcome(), 0, "S:0 W:0 E:0", "SUCCESS"),
    (outcome(unit("success"), unit("success", "db01")), 0, "S:2 W:0 E:0", "SUCCESS"),
    (outcome(unit("warning", warnings=("export attempt 1 of 2 failed",))), 1, "S:1 W:1 E:0",
     "WARNING"),
    (outcome(unit("warning", warnings=("retry 1", "retry 2")), unit("success", "db01")), 1,
     "S:2 W:2 E:0", "WARNING"),
    (outcome(unit("error", message="export dropped")), 2, "S:0 W:0 E:1", "ERROR"),
    (outcome(unit("success"), problems=[W]), 1, "S:1 W:1 E:0", "WARNING"),
    (outcome(unit("success"), problems=[E]), 2, "S:1 W:0 E:1", "ERROR"),
    (outcome(problems=[RunProblem("warning", "", "nothing to back up: every VM excluded")]), 1,
     "S:0 W:1 E:0", "WARNING"),
    (outcome(cannot_start="backup_dir=/x (command line): the folder does not exist"), 2,
     "S:0 W:0 E:1", "ERROR"),
    (outcome(unit("success"), terminated="SIGTERM"), 2, "S:1 W:0 E:1", "ERROR"),
    (outcome(unit("success"), terminated="SIGINT"), 130, "S:1 W:0 E:1", "ERROR"),
], ids=["nothing", "ok", "vm-warning", "two-warnings", "vm-failure", "run-warning",
        "run-error", "nothing-selected", "cannot-start", "sigterm", "sigint"])
def test_every_reader_of_the_outcome_agrees(record, code, counts, word):
    assert exit_code_for(record) == code
    assert str(tally(record)) == counts
    assert status_end_fields(record) == ["end", word, counts]
    data = run_summary(None, record)
    assert data["exit_code"] == code and data["summary"] == counts
    assert data["status"] == {0: "ok", 1: "warning", 2: "error", 130: "error"}[code]
    assert len(data["warnings"]) == tally(record).warnings
    assert len(data["errors"]) == tally(record).errors
    assert len(recap(record)) == tally(record).warnings + tally(record).errors


@pytest.mark.parametrize("nbytes, text", [(0, "0G"), (2 ** 30 - 1, "0G"), (int(3.1 * 2 ** 30), "3G"),
                                          (5 * 2 ** 30, "5G")])
def test_status_log_size_is_whole_gib_like_nauBackup(nbytes, text):
    assert status_size(nbytes) == text


# -- the same table, as runs against the simulated pool ---------------------------------

def make_leftover(pool):
    """A snapshot tagged by a dead run of this host: the next run destroys it. Return its uuid."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    s = session(pool)
    try:
        web01, _ = pool.vm("web01")
        snap = s.xenapi.VM.snapshot(web01, "vmbackup_web01_2026-01-01-000000")
        uuid = s.xenapi.VM.get_uuid(snap)
        s.xenapi.VM.add_to_other_config(snap, vmbackup.TAG_KEY, "%s %s %d 2026-01-01T00:00:00"
                                        % (uuid, socket.gethostname(), dead.pid))
        return uuid
    finally:
        s.xenapi.session.logout()


def ok(pool):
    return ["-e", "PRD-print7"]


def vm_warning(pool):   # a retry that worked: the VM succeeded, with a warning
    pool.faults.drop_export(after_bytes=100000, times=1, path="/export")
    return ["-e", "db01", "--retries", "1"]


def vm_failure(pool):
    pool.faults.drop_export(after_bytes=100000, times=10, path="/export")
    return ["-e", "db01"]


def run_warning(pool):
    return ["-e", "PRD-print7", "-e", "nosuchvm"]


def run_error(pool):    # a leftover that cannot be destroyed
    pool.faults.fail("VM.destroy", "INTERNAL_ERROR", "injected", times=None,
                     match=make_leftover(pool))
    return ["-m", "PRD-print7"]


def nothing_selected(pool):
    return ["-e", ".*", "-x", ".*"]


def one_vm_selected_and_excluded(pool):
    return ["-e", "web01", "-x", "web01"]


def cannot_start(pool):
    return ["-e", "PRD-print7", "-d", "/nonexistent/backups"]


def backup_dir_full(pool):     # as good as full: below space_threshold
    return ["-e", "PRD-print7", "--space-threshold", "100"]


EVENTS = [
    # (make the event, exit code, tally, end word, VM result statuses)
    (ok, 0, "S:1 W:0 E:0", "SUCCESS", ["success"]),
    (vm_warning, 1, "S:1 W:1 E:0", "WARNING", ["warning"]),
    (vm_failure, 2, "S:0 W:0 E:1", "ERROR", ["error"]),
    (run_warning, 1, "S:1 W:1 E:0", "WARNING", ["success"]),
    (run_error, 2, "S:1 W:0 E:1", "ERROR", ["success"]),
    (nothing_selected, 1, "S:0 W:1 E:0", "WARNING", []),
    (one_vm_selected_and_excluded, 1, "S:0 W:1 E:0", "WARNING", []),
    (cannot_start, 2, "S:0 W:0 E:1", "ERROR", []),
    (backup_dir_full, 2, "S:0 W:0 E:1", "ERROR", []),
]


@pytest.mark.parametrize("event, code, counts, word, statuses", EVENTS,
                         ids=[e[0].__name__ for e in EVENTS])
def test_run_outcome_table(sim_pool, transport, backup_dir, tmp_path, event, code, counts, word,
                           statuses):
    status_log, summary = tmp_path / "status.log", tmp_path / "run.json"
    args = transport(sim_pool) + ["-d", backup_dir, "--status-log", status_log,
                                  "--json", summary] + event(sim_pool)
    out = run_vmbackup(*args, exit_code=code)
    lines = status_log.read_text().splitlines()
    assert lines[0].endswith(",vmbackup.py,%s,begin" % socket.gethostname())
    assert lines[-1].endswith(",vmbackup.py,%s,end,%s,%s" % (socket.gethostname(), word, counts))
    data = json.loads(summary.read_text())
    assert data["exit_code"] == code and data["summary"] == counts
    assert [v["status"] for v in data["vms"]] == statuses
    s, w, e = (int(n) for n in re.findall(r"\d+", counts))
    assert len(data["warnings"]) == w and len(data["errors"]) == e
    if event is cannot_start:
        assert data["status"] == "error" and "/nonexistent/backups" in data["reason"]
        assert "vmbackup.py: error: backup_dir=/nonexistent/backups" in out
    elif event is backup_dir_full:
        assert data["status"] == "error" and "below space_threshold=100" in data["reason"]
        assert "vmbackup.py: error: backup_dir %s has " % backup_dir in out
        assert sim_pool.calls.count("VM.snapshot") == 0
    else:
        assert "done: %s, exit %d" % (counts, code) in out
        assert len(re.findall(r"recap: (FAILED|WARNING) ", out)) == w + e
    for line in lines[1:-1]:
        if ",end,SUCCESS " in line:
            assert re.search(r",elapse:\d+ size:\d+G$", line), line
    if event is not run_error:
        assert_pool_clean(sim_pool)


@pytest.mark.parametrize("signum, code, said", [
    (signal.SIGTERM, 2, "terminated by SIGTERM; snapshots cleaned up"),
    (signal.SIGINT, 130, "interrupted"),
], ids=["SIGTERM", "SIGINT"])
def test_a_signal_is_in_the_outcome_and_the_snapshot_claim_is_true(sim_pool, transport,
                                                                   backup_dir, tmp_path,
                                                                   signum, code, said):
    status_log, summary = tmp_path / "status.log", tmp_path / "run.json"
    metrics = tmp_path / "vmbackup.prom"
    sim_pool.faults.throttle(256 * 1024, path="/export")
    proc = spawn(transport(sim_pool) + ["-e", "db01", "-d", backup_dir, "--status-log",
                                        status_log, "--json", summary, "--metrics-file", metrics])
    wait_for(exporting(sim_pool), what="the export to start")
    wait_for(lambda: stray_files(backup_dir), what="the partial file")
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, out
    assert said in out
    name = signal.Signals(signum).name
    lines = status_log.read_text().splitlines()
    assert lines[-1].endswith(",end,ERROR,S:0 W:0 E:2")
    assert lines[-2].endswith(",end,VM-EXPORT-FAIL db01")    # the VM that was cut ends too
    data = json.loads(summary.read_text())
    assert data["status"] == "error" and data["terminated"] == name
    cut = "terminated by %s before it finished; snapshot destroyed" % name
    assert [(vm["name"], vm["status"], vm["message"]) for vm in data["vms"]] == [
        ("db01", "error", cut)]
    assert sorted(data["errors"]) == sorted(["terminated by %s" % name, "db01: " + cut])
    assert "recap: FAILED db01: " + cut in out
    assert re.search(r'^vmbackup_vm_last_run_status\{[^}]*vm="db01"[^}]*\} 2$',
                     metrics.read_text(), re.M), metrics.read_text()
    assert data["exit_code"] == code            # what the process exits with
    assert_pool_clean(sim_pool)


def test_sigterm_claims_no_cleanup_when_a_snapshot_could_not_be_destroyed(sim_pool, transport,
                                                                           backup_dir, tmp_path):
    summary = tmp_path / "run.json"
    sim_pool.faults.throttle(256 * 1024, path="/export")
    sim_pool.faults.fail("VM.destroy", "INTERNAL_ERROR", "injected", times=None)
    proc = spawn(transport(sim_pool) + ["-e", "db01", "-d", backup_dir, "--json", summary])
    wait_for(exporting(sim_pool), what="the export to start")
    wait_for(lambda: stray_files(backup_dir), what="the partial file")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    (snap,) = sim_pool.leftovers()["snapshots"]
    assert "snapshots cleaned up" not in out
    assert "terminated by SIGTERM; snapshot %s left (the next run destroys it)" % snap["uuid"] in out
    assert "recap: FAILED db01: terminated by SIGTERM before it finished; snapshot %s left" \
        " (the next run destroys it)" % snap["uuid"] in out
    assert json.loads(summary.read_text())["terminated"] == "SIGTERM"
    sim_pool.faults.clear()
    out = run_vmbackup(*transport(sim_pool), "-e", "PRD-print7", "-d", backup_dir)
    assert "destroying leftover snapshot %r (%s)" % (snap["name_label"], snap["uuid"]) in out
    assert_pool_clean(sim_pool)


def test_terminated_outside_a_run_claims_no_snapshots():
    code, out = invoke("list", "-d", "/nonexistent")   # any command: no run, no claim
    assert "snapshots cleaned up" not in out
    err = vmbackup.Terminated("SIGTERM")
    assert "; ".join(err.args) == "SIGTERM"


# -- the bullets of issue 11's "Why" -------------------------------------------------------

def test_quiesce_fallback_is_the_vms_warning_named_by_the_vm(transport, backup_dir, tmp_path):
    from xapisim import pools, start_pool
    desc = pools.simple_pool(vms=[{"name": "lin", "other_config": {"vmbackup:quiesce": "true"}}])
    with start_pool(desc) as pool:
        summary = tmp_path / "run.json"
        out = run_vmbackup(*transport(pool), "-e", "lin", "-d", backup_dir, "--json", summary,
                           exit_code=1)
    (vm,) = json.loads(summary.read_text())["vms"]
    assert vm["status"] == "warning" and "no quiesced snapshot" in vm["warnings"][0]
    assert re.search(r"WARNING vm=lin: no quiesced snapshot", out)
    assert "done: S:1 W:1 E:0, exit 1" in out


def test_recap_lists_every_failed_unit_at_the_end(sim_pool, transport, backup_dir):
    sim_pool.faults.drop_export(after_bytes=100000, times=10, path="/export")
    out = run_vmbackup(*transport(sim_pool), "-e", "db01", "-e", "PRD-print7", "-e", "nosuchvm",
                       "-d", backup_dir, exit_code=2)
    lines = out.strip().splitlines()
    tail = lines[[i for i, l in enumerate(lines) if "done: " in l][-1] + 1:]
    assert len(tail) == 3 and all(" recap: " in l for l in tail)      # the last lines
    assert any("ERROR recap: FAILED db01: " in l for l in tail)
    assert any("ERROR recap: FAILED PRD-print7: " in l for l in tail)
    assert any("WARNING recap: WARNING (run): vm not found: vm-export=nosuchvm" in l for l in tail)


def test_cannot_start_reports_wrong_password_to_json_and_status_log(sim_pool, backup_dir, tmp_path):
    pw = tmp_path / "wrong.pw"
    pw.write_text("not-the-password\n")
    pw.chmod(0o600)
    status_log, summary = tmp_path / "status.log", tmp_path / "run.json"
    summary.write_text('{"status": "ok"}')          # yesterday's
    out = run_vmbackup("--server", sim_pool.url, "--password-file", pw, "-e", "web01", "-d",
                       backup_dir, "--status-log", status_log, "--json", summary, exit_code=2)
    assert out.strip().splitlines()[-1].startswith("vmbackup.py: error: cannot log in to ")
    data = json.loads(summary.read_text())
    assert data["status"] == "error" and data["vms"] == [] and "authentication failed" in data["reason"]
    lines = status_log.read_text().splitlines()
    assert lines[0].endswith(",begin") and lines[-1].endswith(",end,ERROR,S:0 W:0 E:1")


def test_cannot_start_with_a_bad_config_still_writes_json(tmp_path):
    cfg, summary = tmp_path / "weekly.cfg", tmp_path / "run.json"
    cfg.write_text("backup_dir=%s\nvm-export=web01:abc\n" % tmp_path)
    out = run_vmbackup("-c", cfg, "--json", summary, exit_code=2)
    assert "weekly.cfg:2: vm-export=web01:abc: MAX_BACKUPS 'abc'" in out
    assert json.loads(summary.read_text())["status"] == "error"


@pytest.mark.parametrize("argv, message", [
    (["pw", "weekend.cgf"], "config file weekend.cgf does not exist"),
    (["pw", "/etc/vmbackup/weekly.cfg"], "config file /etc/vmbackup/weekly.cfg does not exist"),
    (["pw", "vm-export=web01:abc"], "MAX_BACKUPS 'abc' in 'web01:abc' is not a whole number"),
    (["-e", "web01:abc", "-d", "/tmp"], "MAX_BACKUPS 'abc' in 'web01:abc' is not a whole number"),
], ids=["typo-cfg", "missing-path", "legacy-max", "modern-max"])
def test_input_mistakes_are_errors(argv, message):
    out = run_vmbackup(*argv, exit_code=2)
    assert message in out


def test_empty_config_file_says_so(tmp_path):
    cfg = tmp_path / "empty.cfg"
    cfg.write_text("# nothing yet\nbackup_dir=%s\n" % tmp_path)
    out = run_vmbackup("-c", cfg, exit_code=2)
    assert "config file %s selects nothing" % cfg in out and "give -c FILE" not in out


# -- the preview is the run without side effects ------------------------------------------

def preview_and_run(args, code):
    """Preview `args`, then run them: both must exit `code`; return (preview text, run output)."""
    shown = run_vmbackup(*args, "--preview", exit_code=code)
    return shown, run_vmbackup(*args, exit_code=code)


def test_preview_refuses_what_the_run_refuses(sim_pool, api, backup_dir):
    args = api(sim_pool) + ["-e", "PRD-print7", "-d", backup_dir]
    shown, out = preview_and_run(args + ["--transport", "xe", "--xe", "/nonexistent/xe"], 2)
    assert "Preview: the run would not start (exit 2): transport=xe" in shown
    assert "no xe binary" in out
    shown, out = preview_and_run(args + ["--space-threshold", "100"], 2)   # as good as full
    assert "the run would not start (exit 2): backup_dir %s has" % backup_dir in shown
    assert os.listdir(str(backup_dir)) == []


def test_preview_of_a_run_that_starts_but_fails_one_vm(sim_pool, api, backup_dir):
    args = api(sim_pool) + ["-E", "DEV-web3:7:xvda;xvdb", "-e", "PRD-print7", "-d", backup_dir]
    shown, out = preview_and_run(args, 2)
    assert "Preview: the run would start, but end with errors (exit 2, S:1 W:0 E:1)" in shown
    assert "***ERROR - DEV-web3: no disk xvdb on VM DEV-web3" in shown
    assert "done: S:1 W:0 E:1, exit 2" in out and os.listdir(str(backup_dir / "PRD-print7"))


def test_preview_with_warnings_exits_like_the_run(sim_pool, api, backup_dir):
    shown, _ = preview_and_run(api(sim_pool) + ["-e", "PRD-print7", "-e", "nosuchvm", "-d",
                                                backup_dir], 1)
    assert "Preview: the run would end with warnings (exit 1, S:1 W:1 E:0)" in shown


def test_preview_lists_what_the_run_would_delete_and_destroy(sim_pool, api, backup_dir):
    args = api(sim_pool) + ["-e", "PRD-print7", "-d", backup_dir, "--max-backups", "2"]
    run_vmbackup(*args)
    run_vmbackup(*args)
    oldest = sorted(os.listdir(str(backup_dir / "PRD-print7")))[0]
    uuid = make_leftover(sim_pool)
    data = json.loads(run_vmbackup(*args, "--preview", "--json", "-"))
    assert data["delete"] == [{"vm": "PRD-print7", "backup": oldest}]
    assert data["destroy"] == [{"class": "VM", "name": "vmbackup_web01_2026-01-01-000000",
                                "uuid": uuid}]
    shown = run_vmbackup(*args, "--preview")
    assert "  PRD-print7/%s" % oldest in shown and uuid in shown
    out = run_vmbackup(*args)                    # and the run does exactly that
    assert oldest not in os.listdir(str(backup_dir / "PRD-print7"))
    assert "destroying leftover snapshot 'vmbackup_web01_2026-01-01-000000' (%s)" % uuid in out


# -- first contact ----------------------------------------------------------------------------

@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_the_simulators_banner_command_works_as_printed(tmp_path, tls):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    here = os.path.dirname(os.path.abspath(__file__))
    sim = subprocess.Popen([sys.executable, os.path.join(here, "xapisim"), "--no-socket",
                            "--auth-delay", "0"] + (["--tls"] if tls else []),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           universal_newlines=True, env=env, start_new_session=True)
    try:
        banner = []
        for line in sim.stdout:
            banner.append(line)
            if line.startswith("Ctrl-C stops it."):
                break
        (command,) = [l.strip() for l in banner if " --preview" in l]
        done = subprocess.run(["bash", "-c", command], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, universal_newlines=True, env=env,
                              timeout=300)
    finally:
        sim.terminate()
        sim.communicate(timeout=60)
    assert re.search(r"Preview: the run would (succeed|end with warnings|start, but end)",
                     done.stdout), "".join(banner) + done.stdout
    assert "Traceback" not in done.stdout and "would not start" not in done.stdout


def test_no_password_says_so(sim_pool, backup_dir):
    out = run_vmbackup("--server", sim_pool.url, "-e", "web01", "-d", backup_dir, exit_code=2)
    assert "no password given: use --password-file FILE" in out


def test_nauBackup_base64_file_given_as_password_file(sim_pool, backup_dir, tmp_path):
    pw = tmp_path / "VmBackup.pass"
    run_vmbackup(sim_pool.password, "create-password-file=%s" % pw)
    out = run_vmbackup("--server", sim_pool.url, "--password-file", pw, "-e", "web01",
                       "-d", backup_dir, exit_code=2)
    assert "authentication failed" in out and "looks like NAUbackup's base64 password file" in out


def test_certificate_failure_prints_the_fingerprint_to_pin(backup_dir, tmp_path):
    from xapisim import pools, start_pool
    with start_pool(pools.simple_pool(vms=["tlsvm"]), tls=True) as pool:
        pw = tmp_path / "pw"
        pw.write_text(pool.password)
        pw.chmod(0o600)
        out = run_vmbackup("--server", pool.url, "--password-file", pw, "-e", "tlsvm",
                           "-d", backup_dir, exit_code=2)
        seen = re.search(r"SHA-256 fingerprint ([0-9A-F:]{95})", out).group(1)
        assert seen.replace(":", "").lower() == pool.cert_sha256.replace(":", "").lower()
        assert "--tls-fingerprint %s" % seen in out
        http_url = pool.url.replace("https://", "http://")
        out = run_vmbackup("--server", http_url, "--password-file", pw, "-e", "tlsvm",
                           "-d", backup_dir, exit_code=2)
        assert "if the server speaks HTTPS on this port, use https://" in out


def test_https_to_a_plain_http_server_says_so(sim_pool, backup_dir, tmp_path):
    pw = tmp_path / "pw"
    pw.write_text(sim_pool.password)
    pw.chmod(0o600)
    out = run_vmbackup("--server", sim_pool.url.replace("http://", "https://"), "--password-file",
                       pw, "-e", "web01", "-d", backup_dir, exit_code=2)
    assert "does not speak TLS on this port; if it serves plain HTTP, use http://" in out


def test_hung_server_is_named_after_the_login_timeout(backup_dir, tmp_path, monkeypatch):
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(1)               # accepts the connection, never answers
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    pw.chmod(0o600)
    monkeypatch.setattr(vmbackup, "LOGIN_TIMEOUT", 1)
    try:
        out = run_vmbackup("--server", "http://127.0.0.1:%d/" % hung.getsockname()[1],
                           "--password-file", pw, "-e", "web01", "-d", backup_dir, exit_code=2)
    finally:
        hung.close()
    assert "no answer within 1 s (the login timeout)" in out


def test_a_hung_xapi_call_is_named_after_the_call_timeout(sim_pool, api, backup_dir, tmp_path,
                                                        monkeypatch):
    summary = tmp_path / "run.json"
    monkeypatch.setattr(vmbackup, "XMLRPC_TIMEOUT", 1)
    sim_pool.faults.slow("pool.get_all_records", 4)
    out = run_vmbackup(*api(sim_pool), "-e", "PRD-print7", "-d", backup_dir, "--json", summary,
                       exit_code=2)
    assert "XAPI pool.get_all_records failed: no answer within 1 s (the XAPI call timeout)" in out
    assert "(the XAPI call timeout)" in json.loads(summary.read_text())["reason"]


@pytest.mark.parametrize("where", ["command-line", "config-file"])
def test_credentials_in_the_server_url_are_refused_and_masked(backup_dir, tmp_path, where):
    status_log, summary = tmp_path / "status.log", tmp_path / "run.json"
    if where == "config-file":
        cfg = tmp_path / "weekly.cfg"
        cfg.write_text("server=https://root:hunter2@pool1/\nbackup_dir=%s\nvm-export=web01\n"
                       "status_log=%s\n" % (backup_dir, status_log))
        args = ["-c", cfg]
    else:
        args = ["--server", "https://root:hunter2@pool1/", "-e", "web01", "-d", backup_dir,
                "--status-log", status_log]
    out = run_vmbackup(*args, "-v", "--json", summary, exit_code=2)
    assert "https://***@pool1/" in out and "hunter2" not in out
    data = json.loads(summary.read_text())
    assert data["status"] == "error" and "https://***@pool1/" in data["reason"]
    assert data["settings"]["server"] == "https://***@pool1/"
    assert "hunter2" not in summary.read_text()
    lines = status_log.read_text().splitlines()      # it cannot start, and says so there too
    assert lines[0].endswith(",begin") and lines[-1].endswith(",end,ERROR,S:0 W:0 E:1")
    assert "hunter2" not in status_log.read_text()


def test_vdi_export_says_exported_before_snapshot_destroyed(sim_pool, transport, backup_dir):
    out = run_vmbackup(*transport(sim_pool), "-E", "PRD-print7", "-d", backup_dir)
    lines = out.splitlines()
    exported = [i for i, l in enumerate(lines) if "exported disk xvda" in l]
    destroyed = [i for i, l in enumerate(lines) if "VDI snapshot" in l and "destroyed" in l]
    assert exported and destroyed and exported[0] < destroyed[0]
