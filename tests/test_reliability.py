"""Never lose a backup, never leave a snapshot behind: each fault is injected through the
simulated pool and the pool (leftover snapshots/VDIs) and backup_dir (no false success,
earlier backups intact) are checked afterwards, over both transports where it applies."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import vmbackup
from conftest import assert_pool_clean, backups_of, run_vmbackup, session, spawn
from xapisim import pools, start_pool


def complete(backup_dir, vm):
    return [b for b in backups_of(backup_dir, vm)
            if os.path.exists(os.path.join(str(backup_dir), vm, b, "success"))]


def stray_files(backup_dir):
    """Partial export files anywhere in backup_dir."""
    return [os.path.join(d, f) for d, _, files in os.walk(str(backup_dir)) for f in files
            if f.endswith(".part")]


def wait_for(predicate, timeout=30.0, what="condition"):
    """Poll `predicate` until true (bounded); fail the test if it never is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail("timed out waiting for " + what)


def exporting(pool, path="/export"):
    return lambda: any(r.path == path for r in pool.calls.requests())


@pytest.fixture
def mount_tmpfs(tmp_path):
    """Mount a tiny tmpfs (root only; skipped where mounting is not allowed)."""
    mounted = []

    def mount(size, options="", name="small"):
        target = tmp_path / name
        target.mkdir()
        opts = "size=%s" % size + ("," + options if options else "")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(target)],
                          stderr=subprocess.DEVNULL).returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        mounted.append(target)
        return target
    yield mount
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)])


# -- 1. the snapshot is always removed --------------------------------------

def test_export_dropped_midway(sim_pool, transport, backup_dir):
    sim_pool.faults.drop_export(after_bytes=200000, times=5, path="/export")
    out = run_vmbackup(*transport(sim_pool), "-e", "db01", "-d", backup_dir, exit_code=2)
    assert "db01" in out and "FAILED" in out
    assert complete(backup_dir, "db01") == [] and stray_files(backup_dir) == []
    assert_pool_clean(sim_pool)


def test_export_command_exits_non_zero(sim_pool, transport, backup_dir):
    sim_pool.faults.fail("VM.set_is_a_template", "INTERNAL_ERROR", "injected", times=1)
    out = run_vmbackup(*transport(sim_pool), "-e", "db01", "-d", backup_dir, exit_code=2)
    assert "INTERNAL_ERROR" in out
    assert complete(backup_dir, "db01") == []
    assert_pool_clean(sim_pool)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 2), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_during_export(sim_pool, transport, backup_dir, signum, code):
    sim_pool.faults.throttle(256 * 1024, path="/export")
    proc = spawn(transport(sim_pool) + ["-e", "db01", "-d", backup_dir])
    wait_for(exporting(sim_pool), what="the export to start")
    wait_for(lambda: stray_files(backup_dir), what="the partial file")
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, out
    assert "Traceback" not in out
    assert complete(backup_dir, "db01") == [] and stray_files(backup_dir) == []
    assert_pool_clean(sim_pool)


def test_backup_dir_fills_up_mid_write(sim_pool, transport, mount_tmpfs):
    small = mount_tmpfs("3m")
    out = run_vmbackup(*transport(sim_pool), "-e", "db01", "-e", "PRD-print7", "-d", small,
                       "--space-threshold", "0", exit_code=2)
    assert "db01" in out
    assert complete(small, "db01") == [] and stray_files(small) == []
    assert complete(small, "PRD-print7")        # the small one still fits: the others go on
    assert_pool_clean(sim_pool)


# -- 2. leftovers of a killed run ---------------------------------------------

def test_leftovers_of_a_killed_run_are_destroyed_next_run(sim_pool, transport, backup_dir):
    s = session(sim_pool)
    try:
        web01, _ = sim_pool.vm("web01")
        # a person's snapshot, a real VM named like the tool's snapshots, and a copy of
        # a tagged snapshot (its tag names another uuid): none of these may be touched
        s.xenapi.VM.snapshot(web01, "vmbackup_web01_2026-01-01-000000")
        copy = s.xenapi.VM.snapshot(web01, "copied tag")
        s.xenapi.VM.add_to_other_config(copy, vmbackup.TAG_KEY,
                                        "00000000-0000-0000-0000-000000000000 otherhost 1 2020-01-01T00:00:00")
        lookalike, _ = sim_pool.vm("RESTORE_jira")
        s.xenapi.VM.set_name_label(lookalike, "vmbackup_db01_2026-01-01-000000")
        s.xenapi.VM.add_to_other_config(lookalike, vmbackup.TAG_KEY, "%s %s 1 2020-01-01T00:00:00"
                                        % (s.xenapi.VM.get_uuid(lookalike), "x"))
    finally:
        s.xenapi.session.logout()
    sim_pool.faults.throttle(128 * 1024, path="/export")
    proc = spawn(transport(sim_pool) + ["-e", "db01", "-d", backup_dir])
    wait_for(exporting(sim_pool), what="the export to start")
    os.killpg(proc.pid, signal.SIGKILL)       # no cleanup can run: like a host reboot
    proc.communicate(timeout=30)
    sim_pool.faults.clear()
    left = sim_pool.leftovers()
    assert len(left["snapshots"]) == 3        # the killed run's, plus the two made above
    out = run_vmbackup(*transport(sim_pool), "-e", "PRD-print7", "-d", backup_dir, exit_code=0)
    assert "INFO destroying leftover snapshot" in out   # housekeeping, not news
    names = sorted(s["name_label"] for s in sim_pool.leftovers()["snapshots"])
    assert names == ["copied tag", "vmbackup_web01_2026-01-01-000000"]
    assert sim_pool.vm("vmbackup_db01_2026-01-01-000000")  # the real VM survives
    s = session(sim_pool)
    try:
        kept = {s.xenapi.VBD.get_VDI(vbd) for snap in sim_pool.leftovers()["snapshots"]
                for vbd in s.xenapi.VM.get_VBDs(snap["ref"])}
    finally:
        s.xenapi.session.logout()
    # the killed run's snapshot disks went with it: what is left belongs to the two kept
    assert {v["ref"] for v in sim_pool.leftovers()["vdis"]} <= kept


# -- 3. no false success --------------------------------------------------------

def test_cut_raw_export_is_not_a_success(sim_pool, transport, backup_dir):
    sim_pool.faults.drop_export(after_bytes=3 * 65536, times=5, path="/export_raw_vdi")
    run_vmbackup(*transport(sim_pool), "-E", "db01", "-d", backup_dir, exit_code=2)
    assert complete(backup_dir, "db01") == [] and stray_files(backup_dir) == []
    assert_pool_clean(sim_pool)


def test_manifest_matches_what_is_on_disk(sim_pool, transport, backup_dir):
    run_vmbackup(*transport(sim_pool), "-E", "DEV-mySql::xvda;xvdb", "-d", backup_dir)
    (b,) = complete(backup_dir, "DEV-mySql")
    folder = os.path.join(str(backup_dir), "DEV-mySql", b)
    manifest = json.load(open(os.path.join(folder, "backup.json")))
    listed = {f["name"] for f in manifest["files"]}
    on_disk = {os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs}
    assert on_disk - listed == {"backup.json", "success"}
    for f in manifest["files"]:
        assert vmbackup.sha256_file(os.path.join(folder, f["name"])) == f["sha256"]
    for disk in manifest["disks"]:
        assert os.path.getsize(os.path.join(folder, disk["file"])) == disk["virtual_size"]


# -- 4. retention never deletes the last good backup ----------------------------

@pytest.mark.parametrize("pre_clean", [False, True], ids=["plain", "pre_clean"])
def test_five_failed_runs_keep_the_good_backups(sim_pool, api, backup_dir, pre_clean):
    args = api(sim_pool) + ["-e", "db01", "-d", str(backup_dir), "--max-backups", "2"]
    if pre_clean:
        args.append("--pre-clean")
    run_vmbackup(*args)
    run_vmbackup(*args)
    good = complete(backup_dir, "db01")
    assert len(good) == 2
    sim_pool.faults.drop_export(after_bytes=1000, times=100, path="/export")
    for _ in range(5):
        run_vmbackup(*args, exit_code=2)
    survivors = complete(backup_dir, "db01")
    assert survivors == (good[-1:] if pre_clean else good)
    assert_pool_clean(sim_pool)


# -- 5. one run at a time ------------------------------------------------------

def test_second_run_is_refused_while_one_runs(sim_pool, api, backup_dir):
    sim_pool.faults.throttle(128 * 1024, path="/export")
    args = api(sim_pool) + ["-e", "db01", "-d", str(backup_dir)]
    first = spawn(args)
    try:
        wait_for(exporting(sim_pool), what="the first run's export")
        out = run_vmbackup(*args, exit_code=2)
        assert "backup_dir %s is in use by another vmbackup run (pid %d;" % (backup_dir, first.pid) in out
        assert str(backup_dir / ".vmbackup.lock") in out    # the file, should it need removing
    finally:
        first.terminate()
        first.communicate(timeout=120)
    assert_pool_clean(sim_pool)


def test_stale_lock_is_taken_over(sim_pool, api, backup_dir):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (backup_dir / ".vmbackup.lock").write_text("%d %s\n" % (dead.pid, __import__("socket").gethostname()))
    # housekeeping after a killed run, like destroying its leftovers: info, exit 0
    out = run_vmbackup(*api(sim_pool), "-e", "PRD-print7", "-d", backup_dir, exit_code=0)
    assert "INFO taking over stale lock" in out
    assert not (backup_dir / ".vmbackup.lock").exists()


# -- 6. hung, not slow ------------------------------------------------------------

def test_stalled_export_is_aborted(sim_pool, transport, backup_dir):
    sim_pool.faults.stall_export(after_bytes=100000, seconds=6, times=1, path="/export")
    began = time.monotonic()
    out = run_vmbackup(*transport(sim_pool), "-e", "db01", "-e", "PRD-print7", "-d", backup_dir,
                       "--stall-timeout", "1", exit_code=2)
    assert "made no progress for 1 seconds" in out
    # VMs go in name order: PRD-print7's export (the first) hangs, db01 goes on
    assert complete(backup_dir, "PRD-print7") == [] and complete(backup_dir, "db01")
    assert_pool_clean(sim_pool)
    assert time.monotonic() - began < 60


def test_slow_export_that_keeps_moving_is_not_killed(sim_pool, transport, backup_dir):
    sim_pool.faults.throttle(1024 * 1024, path="/export")   # several seconds for db01
    began = time.monotonic()
    run_vmbackup(*transport(sim_pool), "-e", "db01", "-d", backup_dir, "--stall-timeout", "1")
    assert time.monotonic() - began > 2          # it really was slower than the timeout
    assert complete(backup_dir, "db01")
    assert_pool_clean(sim_pool)


# -- 7. transient XAPI trouble -----------------------------------------------------

def test_dropped_connection_and_5xx_on_control_calls_are_retried(sim_pool, transport, backup_dir):
    sim_pool.faults.drop_rpc("VM.get_all_records", times=2)
    sim_pool.faults.http_error(method="VBD.get_all_records", status=503, times=1)
    out = run_vmbackup(*transport(sim_pool), "-e", "PRD-print7", "-d", backup_dir)
    assert "retrying" in out
    assert complete(backup_dir, "PRD-print7")


def test_failed_export_is_retried_with_a_new_snapshot(sim_pool, transport, backup_dir):
    sim_pool.faults.drop_export(after_bytes=100000, times=1, path="/export")
    before = sim_pool.calls.count("VM.snapshot")
    out = run_vmbackup(*transport(sim_pool), "-e", "db01", "-d", backup_dir, "--retries", "1",
                       exit_code=1)
    assert "retrying with a new snapshot" in out
    assert len(complete(backup_dir, "db01")) == 1 and len(backups_of(backup_dir, "db01")) == 1
    assert sim_pool.calls.count("VM.snapshot") - before == 2
    assert_pool_clean(sim_pool)


# -- 8. bad input: one clear line, nothing changed --------------------------------

def test_backup_dir_missing_or_a_file(sim_pool, api, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for target, text in ((tmp_path / "missing", "the folder does not exist"), (a_file, "not a folder")):
        out = run_vmbackup(*api(sim_pool), "-e", "db01", "-d", target, exit_code=2)
        assert out.strip().splitlines()[-1] == "vmbackup.py: error: backup_dir=%s (command line): %s" % (
            target, text)
    assert sim_pool.calls.count("VM.snapshot") == 0


def test_backup_dir_read_only(sim_pool, api, tmp_path, mount_tmpfs):
    ro = mount_tmpfs("1m", "ro", name="ro")
    out = run_vmbackup(*api(sim_pool), "-e", "db01", "-d", ro, exit_code=2)
    assert "backup_dir=%s (command line): not writable" % ro in out
    assert "Traceback" not in out and sim_pool.calls.count("VM.snapshot") == 0


def test_tls_verified_pinned_and_mismatched(backup_dir, tmp_path):
    with start_pool(pools.simple_pool(vms=["tlsvm"]), tls=True) as pool:
        pw = tmp_path / "pw"
        pw.write_text(pool.password)
        pw.chmod(0o600)
        base = ["--server", pool.url, "--password-file", pw, "--transport", "api",
                "-e", "tlsvm", "-d", backup_dir]
        out = run_vmbackup(*base, exit_code=2)            # self-signed: refused by default
        assert "TLS" in out and "CERTIFICATE_VERIFY_FAILED" in out and "Traceback" not in out
        out = run_vmbackup(*base, "--tls-fingerprint", "ab" * 32, exit_code=2)
        assert "does not match tls_fingerprint" in out
        run_vmbackup(*base, "--tls-fingerprint", pool.cert_sha256)
        run_vmbackup(*base, "--tls-ca-file", pool.cert_path)
        out = run_vmbackup(*base, "--insecure")
        assert "verification is off" in out
        assert len(complete(backup_dir, "tlsvm")) == 3


def test_vm_vanishes_between_listing_and_snapshot(sim_pool, transport, backup_dir):
    sim_pool.faults.vanish_vm("db01", before="VM.snapshot")
    out = run_vmbackup(*transport(sim_pool), "-e", "db01", "-e", "PRD-print7", "-d", backup_dir,
                       exit_code=2)
    assert "vm=db01: FAILED" in out
    assert complete(backup_dir, "PRD-print7") and complete(backup_dir, "db01") == []
    assert_pool_clean(sim_pool)


def test_vm_without_disks(sim_pool, transport, backup_dir):
    out = run_vmbackup(*transport(sim_pool), "-E", "nodisk-vm", "-e", "PRD-print7",
                       "-d", backup_dir, exit_code=2)
    assert "no disk xvda on VM nodisk-vm" in out
    run_vmbackup(*transport(sim_pool), "-e", "nodisk-vm", "-d", backup_dir)  # an .xva of no disks
    assert complete(backup_dir, "nodisk-vm")


def test_sr_that_cannot_snapshot(sim_pool, transport, backup_dir):
    sim_pool.faults.fail("VM.snapshot", "SR_OPERATION_NOT_SUPPORTED", "OpaqueRef:x", times=1)
    out = run_vmbackup(*transport(sim_pool), "-e", "db01", "-d", backup_dir, exit_code=2)
    assert "SR_OPERATION_NOT_SUPPORTED" in out and "Traceback" not in out
    assert_pool_clean(sim_pool)


# -- 9. no shell, ever ------------------------------------------------------------

def test_no_shell_anywhere_in_vmbackup():
    import ast
    tree = ast.parse(open(vmbackup.__file__, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "shell":
            pytest.fail("shell= keyword at line %d" % node.value.lineno)
        if isinstance(node, ast.Attribute) and node.attr in ("system", "popen", "getoutput"):
            pytest.fail("os.%s at line %d" % (node.attr, node.lineno))


# -- 10. secrets -----------------------------------------------------------------------

def test_password_never_in_process_arguments(sim_pool, backup_dir, tmp_path, monkeypatch):
    for key, value in sim_pool.env().items():
        monkeypatch.setenv(key, value)
    pw = tmp_path / "pw"
    pw.write_text(sim_pool.password + "\n")
    pw.chmod(0o600)
    sim_pool.faults.throttle(512 * 1024, path="/export")
    seen = []
    proc = spawn(["--transport", "xe", "--xe", sim_pool.xe_path, "--server", sim_pool.url,
                  "--password-file", pw, "-e", "db01", "-d", backup_dir, "--json", tmp_path / "j"])

    def xe_running():
        for pid in os.listdir("/proc"):
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as handle:
                    argv = handle.read().split(b"\0")
            except OSError:
                continue
            if b"vm-export" in argv and any(str(backup_dir).encode() in a for a in argv):
                seen.append(argv)
        return bool(seen)
    wait_for(xe_running, what="xe vm-export to run")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert b"-pwf" in seen[0] and b"-pw" not in seen[0]
    assert not any(sim_pool.password.encode() in a for argv in seen for a in argv)
    assert sim_pool.password not in out and sim_pool.password not in (tmp_path / "j").read_text()


def test_legacy_base64_password_file_exposed_is_warned(sim_pool, monkeypatch, tmp_path):
    pw = tmp_path / "VmBackup.pass"
    pw.write_text(__import__("base64").b64encode(sim_pool.password.encode()).decode())
    pw.chmod(0o644)
    monkeypatch.setenv("VMBACKUP_SERVER", sim_pool.url)
    out = run_vmbackup(pw, "PRD-print7", "preview", exit_code=2)   # default backup_dir missing
    assert "readable by other users" in out and sim_pool.password not in out


def test_umask_option(sim_pool, api, backup_dir):
    run_vmbackup(*api(sim_pool), "-e", "PRD-print7", "-d", backup_dir, "--umask", "022")
    (b,) = complete(backup_dir, "PRD-print7")
    folder = os.path.join(str(backup_dir), "PRD-print7", b)
    assert os.stat(folder).st_mode & 0o777 == 0o755
    assert os.stat(os.path.join(folder, "PRD-print7.xva")).st_mode & 0o777 == 0o644


# -- 11. disk space --------------------------------------------------------------------

def test_vm_too_big_for_the_free_space_is_skipped(transport, mount_tmpfs):
    small = mount_tmpfs("8m")
    desc = pools.simple_pool(vms=[{"name": "huge", "disks": [{"size": "64M", "blocks": 300}]},
                                  "small"])
    with start_pool(desc) as pool:
        out = run_vmbackup(*transport(pool), "-e", "huge", "-e", "small", "-d", small,
                           "--space-threshold", "0", "--preview", exit_code=2)
        assert "has 8.0M free, VM huge needs about" in out
        assert "Preview: the run would start, but end with errors (exit 2, S:1 W:0 E:1)" in out
        out = run_vmbackup(*transport(pool), "-e", "huge", "-e", "small", "-d", small,
                           "--space-threshold", "0", exit_code=2)
        assert "has 8.0M free, VM huge needs about" in out
        assert complete(small, "small") and complete(small, "huge") == []
        assert not os.path.exists(os.path.join(str(small), "huge"))    # refused: nothing left
        assert pool.calls.count("VM.snapshot") == 1
        assert_pool_clean(pool)


MiB = 1 << 20


def plan_of(mode, *disks):
    """A VmPlan of one VM in `mode` with disks of (virtual_size, physical_utilisation)."""
    vm = vmbackup.Selected("r", "web01", "u", mode, 3, (), None)
    return vmbackup.VmPlan(vm, [vmbackup.VmDisk("xvd" + "abc"[i], str(i), "", "", {
        "virtual_size": v, "physical_utilisation": p}, False) for i, (v, p) in enumerate(disks)],
                           [], [])


@pytest.mark.parametrize("plan, previous, expected", [
    (plan_of("vm-export", (512 * MiB, 31 * MiB)), 0, 33 * (MiB + 1536)),
    (plan_of("vm-export", (512 * MiB, 31 * MiB)), 328 * MiB, 328 * MiB),
    (plan_of("vm-export", (3 * MiB, 3 * MiB)), 0, 3 * (MiB + 1536)),
    (plan_of("vm-export", (8 * MiB, 64 * 1024), (4 * MiB + 1, 0)), 0, 3 * (MiB + 1536) + 5 * (MiB + 1536)),
    (plan_of("vdi-export", (512 * MiB, 31 * MiB)), 0, 31 * MiB),
], ids=["xva-first-backup", "xva-as-big-as-the-last", "xva-never-above-the-disk",
        "xva-two-disks-whole-chunks", "vdi-export"])
def test_estimate_size(plan, previous, expected):
    assert vmbackup.estimate_size(plan, previous) == expected


def test_an_xva_that_will_not_fit_is_refused_before_its_snapshot(api, mount_tmpfs):
    """Data spread thinly (one 64 KiB block in every MiB): the XVA is 16 times the disk's
    physical utilisation; the second night's backup will not fit and is refused up front."""
    small = mount_tmpfs("40m")
    desc = pools.simple_pool(vms=[{"name": "thin", "disks": [{"size": "24M",
                                                               "blocks": list(range(0, 384, 16))}]}])
    with start_pool(desc) as pool:
        args = api(pool) + ["-e", "thin", "-d", small, "--space-threshold", "0", "--max-backups", "2"]
        run_vmbackup(*args)
        (first,) = complete(small, "thin")
        xva = os.path.getsize(os.path.join(str(small), "thin", first, "thin.xva"))
        assert xva > 24 * MiB                      # vs 1.5 MiB of physical utilisation
        out = run_vmbackup(*args, exit_code=2)
        assert re.search(r"has 1\d\.\dM free, VM thin needs about 2\d\.\dM", out), out
        assert pool.calls.count("VM.snapshot") == 1    # refused before its snapshot
        assert complete(small, "thin") == [first] and stray_files(small) == []
        assert os.listdir(os.path.join(str(small), "thin")) == [first]   # no empty backup folder
        assert_pool_clean(pool)


def test_space_threshold_stops_the_run_before_it_starts(sim_pool, api, backup_dir):
    out = run_vmbackup(*api(sim_pool), "-e", "db01", "-d", backup_dir, "--space-threshold", "100",
                       exit_code=2)
    assert "below space_threshold=100.0%" in out
    assert sim_pool.calls.count("VM.snapshot") == 0


def test_refused_export_says_why_in_xapis_words(sim_pool, transport, backup_dir):
    out = run_vmbackup(*transport(sim_pool), "-e", "no-export-vm", "-d", backup_dir, exit_code=2)
    assert "OPERATION_BLOCKED" in out or "explicitly blocked" in out
    assert "<html" not in out.lower()
    assert_pool_clean(sim_pool)


@pytest.mark.parametrize("call", ["VM.snapshot", "VM.add_to_other_config"])
def test_signal_while_the_snapshot_is_being_made(sim_pool, transport, backup_dir, call):
    """SIGTERM between 'snapshot made' and 'snapshot tagged' must not leave an untagged snapshot."""
    sim_pool.faults.slow(call, 1.5)
    proc = spawn(transport(sim_pool) + ["-e", "db01", "-d", backup_dir])
    wait_for(lambda: sim_pool.calls.count(call) > 0, what=call)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    # the pool finishes what it was asked even though the client went away
    wait_for(lambda: all(c.status for c in sim_pool.calls if c.method == call), what="the pool")
    assert_pool_clean(sim_pool)


@pytest.mark.parametrize("call, select", [("VM.snapshot", "-e"), ("VM.destroy", "-e"),
                                          ("VDI.snapshot", "-E"), ("VDI.destroy", "-E")])
def test_run_killed_at_the_worst_moment_is_cleaned_up_next_run(sim_pool, transport, backup_dir,
                                                                call, select):
    """SIGKILL (a reboot, the OOM killer) while XAPI makes or destroys the tool's snapshot:
    whatever is left must be recognisable, and the next run destroys it."""
    sim_pool.faults.slow(call, 1.5)
    proc = spawn(transport(sim_pool) + [select, "db01", "-d", backup_dir])
    wait_for(lambda: sim_pool.calls.count(call) > 0, what=call)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    wait_for(lambda: all(c.status for c in sim_pool.calls if c.method == call), what="the pool")
    sim_pool.faults.clear()
    run_vmbackup(*transport(sim_pool), "-e", "PRD-print7", "-d", backup_dir, exit_code=None)
    assert_pool_clean(sim_pool)
    # and the pending mark is gone from the VM and its disks
    s = session(sim_pool)
    try:
        ref, _ = sim_pool.vm("db01")
        assert vmbackup.PENDING_KEY not in s.xenapi.VM.get_other_config(ref)
        for vdi in s.xenapi.VDI.get_all_records().values():
            assert vmbackup.PENDING_KEY not in vdi["other_config"]
    finally:
        s.xenapi.session.logout()


def test_sigterm_while_the_snapshot_is_destroyed(sim_pool, transport, backup_dir):
    sim_pool.faults.slow("VM.destroy", 1.5)
    proc = spawn(transport(sim_pool) + ["-e", "db01", "-d", backup_dir])
    wait_for(lambda: sim_pool.calls.count("VM.destroy") > 0, what="VM.destroy")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert_pool_clean(sim_pool)


def test_failed_metadata_export_is_retried_too(sim_pool, transport, backup_dir):
    sim_pool.faults.drop_export(after_bytes=1000, times=1, path="/export_metadata")
    out = run_vmbackup(*transport(sim_pool), "-e", "PRD-print7", "-d", backup_dir, "--retries", "1",
                       exit_code=1)
    assert "export attempt 1 of 2 failed" in out
    (b,) = complete(backup_dir, "PRD-print7")
    assert os.path.getsize(os.path.join(str(backup_dir), "PRD-print7", b, "vm-metadata.xml")) > 0
    assert_pool_clean(sim_pool)
