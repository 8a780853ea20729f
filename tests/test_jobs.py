"""Parallel backups (jobs=N, jobs_per_host, jobs_per_sr) and the progress of exports.

The scheduling decision and the progress arithmetic are pure and table-tested; the runs
go through the simulated pool over both transports: a run of 4 jobs gives the same
results, status log and JSON as a run of 1; a fault in one VM touches no other; a
signal or a SIGKILL of the whole run leaves no snapshot (after the next run) and no
false `success`; and the progress shows live on a terminal, as log lines off one.
"""
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys

import pytest

import vmbackup
from conftest import VMBACKUP, assert_pool_clean, backups_of, run_vmbackup, spawn
from test_reliability import complete, stray_files, wait_for
from xapisim import pools, start_pool

K = vmbackup.JobKey
HOSTS = ("h1", "h2", "h3", "h4")
EXPORTS = ("/export", "/export_raw_vdi")


# -- which VM starts next (pure) ---------------------------------------------------

def key(hosts="", srs=""):
    return K(frozenset(hosts.split()), frozenset(srs.split()))


@pytest.mark.parametrize("pending, running, caps, expected", [
    ([key("a", "s1")], [], vmbackup.Caps(1, 0, 0), 0),
    ([key("a", "s1")], [key("b", "s2")], vmbackup.Caps(1, 0, 0), None),
    ([key("a", "s1"), key("b", "s2")], [key("a", "s1")], vmbackup.Caps(4, 1, 0), 1),
    ([key("a", "s1"), key("a", "s1")], [key("a", "s1")], vmbackup.Caps(4, 1, 0), None),
    ([key("a", "s1")], [key("a", "s1")], vmbackup.Caps(4, 2, 2), 0),
    ([key("a", "s1")], [key("a", "s1"), key("a", "s2")], vmbackup.Caps(4, 2, 0), None),
    ([key("a", "s1")], [key("a", "s1"), key("a", "s2")], vmbackup.Caps(4, 0, 2), 0),
    ([key("b", "s1"), key("c", "s2")], [key("a", "s1"), key("a", "s1")], vmbackup.Caps(8, 2, 2), 1),
    ([key("a b", "s1 s2")], [key("b", "s3")], vmbackup.Caps(8, 1, 0), None),
    ([key()], [key("a", "s1")] * 3, vmbackup.Caps(4, 1, 1), 0),
    ([key()], [key()] * 4, vmbackup.Caps(4, 0, 0), None),
    ([], [], vmbackup.Caps(4, 2, 2), None),
], ids=["first-fits", "jobs-full", "host-busy-skips-to-next", "host-busy-none-fits",
        "under-both-caps", "per-host-cap", "per-host-off", "sr-cap-skips-in-order",
        "vdi-export-on-two-hosts", "meta-export-loads-nothing", "meta-export-jobs-cap",
        "nothing-pending"])
def test_next_job(pending, running, caps, expected):
    assert vmbackup.next_job(pending, running, caps) == expected


SEES = {"m": frozenset({"nfs", "iso"}), "h2": frozenset({"nfs", "iso", "l2"}),
        "h3": frozenset({"nfs", "l3"})}


@pytest.mark.parametrize("srs, expected", [
    ({"nfs"}, "m"), ({"l2"}, "h2"), ({"nfs", "l3"}, "h3"), ({"l2", "l3"}, None), (set(), "m"),
], ids=["shared-master", "local-member", "shared-and-local", "no-host-sees-both", "no-disk"])
def test_serving_host(srs, expected):
    assert vmbackup.serving_host(frozenset(srs), "m", SEES) == expected


def test_jobs_settings_from_file_and_command_line(sim_pool, api, tmp_path):
    config = vmbackup.build_config(vmbackup.parse_config(
        "jobs=4\njobs_per_host=0\njobs_per_sr=3\n", "t.cfg"))
    assert (config.jobs, config.jobs_per_host, config.jobs_per_sr) == (4, 0, 3)
    default = vmbackup.Config()
    assert (default.jobs, default.jobs_per_host, default.jobs_per_sr) == (1, 2, 2)
    with pytest.raises(vmbackup.ConfigError, match="t.cfg:2: jobs=0"):
        vmbackup.parse_config("max_backups=2\njobs=0\n", "t.cfg")
    out = run_vmbackup(*api(sim_pool), "-e", "db01", "-j", "many", exit_code=2)
    assert out.strip().splitlines()[-1].startswith("vmbackup.py: error: --jobs many: ")


def plan_of(mode, *srs):
    vm = vmbackup.Selected("ref", "a", "uuid", mode, 1, (), None)
    disks = [vmbackup.VmDisk("xvd" + "ab"[i], str(i), "vbd", "vdi", {"SR": sr}, False)
             for i, sr in enumerate(srs)]
    return vmbackup.VmPlan(vm, disks, [], [])


@pytest.mark.parametrize("plan, sees, expected", [
    (plan_of("vm-export", "nfs"), SEES, key("m", "nfs")),
    (plan_of("vm-export", "l2", "nfs"), SEES, key("h2", "l2 nfs")),
    (plan_of("vdi-export", "l2", "l3"), SEES, key("h2 h3", "l2 l3")),
    (plan_of("vm-export", "l2", "l3"), SEES, key("", "l2 l3")),
    (plan_of("meta-export"), SEES, key()),
    (plan_of("vm-export", "l2"), None, key("", "l2")),
], ids=["shared-served-by-master", "local-served-by-its-host", "vdi-export-host-per-disk",
        "no-host-sees-all", "meta-export", "pbds-unreadable"])
def test_job_key(plan, sees, expected):
    view = vmbackup.PoolView({"master": "m"}, {}, {}, {}, {}, {}, {}, {}, {})
    assert vmbackup.job_key(plan, view, sees) == expected


# -- progress arithmetic (pure) ------------------------------------------------------

M = 1 << 20


@pytest.mark.parametrize("done, expected, fraction, elapsed, eta", [
    (10 * M, 40 * M, None, 10.0, 30.0),
    (10 * M, 40 * M, 0.5, 10.0, 10.0),
    (10 * M, None, None, 10.0, None),
    (50 * M, 40 * M, None, 10.0, None),
    (0, 40 * M, None, 0.0, None),
    (10 * M, None, 1.0, 10.0, None),
], ids=["from-size", "task-fraction-wins", "unknown-size", "past-estimate", "not-started",
        "task-done"])
def test_eta_seconds(done, expected, fraction, elapsed, eta):
    got = vmbackup.eta_seconds(done, expected, fraction, elapsed)
    assert got == (pytest.approx(eta) if eta is not None else None)


@pytest.mark.parametrize("args, text", [
    (("xvda", 10 * M, 40 * M, None, 10.0), "xvda: 10.0M of ~40.0M, 1.0M/s, ETA 0:30"),
    (("web01.xva", 10 * M, None, 0.25, 10.0), "web01.xva: 10.0M (25%), 1.0M/s, ETA 0:30"),
    (("xvdb", 3 * M, None, None, 0.0), "xvdb: 3.0M"),
    (("xvda", 3600 * M, 7300 * M, None, 3600.0), "xvda: 3.5G of ~7.1G, 1.0M/s, ETA 1:01:40"),
    (("xvda", 30 * M, 20 * M, None, 10.0), "xvda: 30.0M, 3.0M/s"),
], ids=["size-estimate", "task-progress", "just-started", "hours", "past-the-estimate"])
def test_progress_text(args, text):
    assert vmbackup.progress_text(*args) == text


# -- the pool the runs use -------------------------------------------------------------

def jobs_pool(n=8, size="4M"):
    """`n` halted VMs over 4 hosts: most on their host's local SR (the export is served by
    that host), every fourth on the shared SR (served by the master); small sparse disks."""
    vms = []
    for i in range(n):
        host = HOSTS[i % len(HOSTS)]
        disks = [{"size": size, "blocks": [0, i + 1]}]
        if i % 4:       # dense: its physical utilisation is its export's size
            disks = [{"size": "2M", "blocks": list(range(32)), "sr": "local:" + host},
                     {"size": "1M", "blocks": list(range(16)), "sr": "local:" + host}]
        vms.append({"name": "vm%02d" % i, "host": host, "disks": disks})
    return pools.simple_pool(vms=vms, hosts=HOSTS)


@pytest.fixture
def pool():
    with start_pool(jobs_pool()) as sim:
        yield sim


#: vm-export, vdi-export (raw and one disk), meta-export: every mode at once.
SELECT = ["-e", "vm0[0-3]", "-E", "vm0[4-5]", "-E", "vm06:2:xvdb", "-m", "vm07"]
VMS = ["vm%02d" % i for i in range(8)]


def without_times(data):
    """The JSON summary without what differs between two runs of the same backups."""
    data = dict(data, started=None, finished=None)
    data["settings"] = {k: v for k, v in data["settings"].items()
                        if k not in ("jobs", "backup_dir", "status_log", "server",
                                      "password_file", "xe_path")}
    data["vms"] = [dict(vm, seconds=None, path=vm["path"] and os.path.basename(
        os.path.dirname(vm["path"]))) for vm in data["vms"]]
    return data


def status_fields(path):
    """The status log's lines without their time stamps."""
    with open(str(path)) as handle:
        return [line.rstrip("\n").split(",", 1)[1] for line in handle]


def backup_files(backup_dir, vm):
    """{file: (size, sha256)} of the VM's newest backup, from its manifest."""
    folder = os.path.join(str(backup_dir), vm, backups_of(backup_dir, vm)[-1])
    with open(os.path.join(folder, "backup.json")) as handle:
        manifest = json.load(handle)
    return {f["name"]: (f["size"], f.get("sha256")) for f in manifest["files"]
            if f["name"].endswith(".raw")}


def test_four_jobs_back_up_what_one_job_does(transport, tmp_path):
    """Same results, status log and JSON (but for times) at -j 4 as at -j 1, in the
    selection's order; the 4 jobs really overlap, at most 2 per serving host."""
    runs = {}
    for jobs in ("1", "4"):
        backup_dir = tmp_path / ("j" + jobs)
        backup_dir.mkdir()
        with start_pool(jobs_pool()) as sim:
            sim.faults.throttle(4 * M)       # each export lasts a moment: they overlap
            out = run_vmbackup(*transport(sim), *SELECT, "-d", backup_dir, "-j", jobs,
                               "--status-log", tmp_path / ("status" + jobs),
                               "--json", tmp_path / ("j%s.json" % jobs))
            assert_pool_clean(sim)
            runs[jobs] = dict(
                out=out, json=json.loads((tmp_path / ("j%s.json" % jobs)).read_text()),
                status=status_fields(tmp_path / ("status" + jobs)),
                files={vm: backup_files(backup_dir, vm) for vm in VMS},
                at_once=sim.calls.most_at_once(EXPORTS),
                per_host=sim.calls.most_at_once(EXPORTS, key=lambda r: r.host))
            assert not stray_files(backup_dir)
            assert all(complete(backup_dir, vm) for vm in VMS)
            if transport.kind == "api":   # zero blocks are skipped at any -j: the file is sparse
                folder = os.path.join(str(backup_dir), "vm04", backups_of(backup_dir, "vm04")[-1])
                raw = os.stat(os.path.join(folder, "vm04.raw"))
                assert raw.st_size == 4 * M and raw.st_blocks * 512 <= 2 * M
    one, four = runs["1"], runs["4"]
    assert without_times(four["json"]) == without_times(one["json"])
    assert [vm["name"] for vm in four["json"]["vms"]] == VMS
    assert four["json"]["exit_code"] == 0 and four["json"]["summary"] == "S:8 W:0 E:0"
    assert four["status"] == one["status"]
    assert four["files"] == one["files"] and any(four["files"].values())
    assert one["at_once"] == 1
    assert four["at_once"] >= 2 and four["per_host"] <= 2
    assert "up to 4 VMs at once" in four["out"]
    # every line a VM's work logged names the VM
    for line in four["out"].splitlines():
        if re.search(r"snapshot|export", line) and "vmbackup:" not in line \
                and "VMs selected" not in line:
            assert "vm=vm0" in line, line


def test_jobs_per_host_one_serves_one_export_per_host(api, tmp_path, pool):
    backup_dir = tmp_path / "b"
    backup_dir.mkdir()
    pool.faults.throttle(4 * M)
    run_vmbackup(*api(pool), "-e", "vm0.", "-d", backup_dir, "-j", "8", "--jobs-per-host", "1",
                 "--jobs-per-sr", "0")
    assert pool.calls.most_at_once(("/export",), key=lambda r: r.host) == 1
    assert pool.calls.most_at_once(("/export",)) >= 2
    assert {r.host for r in pool.calls.requests("/export") if r.status == 200} == set(HOSTS)
    assert_pool_clean(pool)


def test_dropped_export_fails_only_its_vm(transport, tmp_path, pool):
    backup_dir = tmp_path / "b"
    backup_dir.mkdir()
    pool.faults.throttle(4 * M)
    pool.faults.drop_export(after_bytes=100000, times=1, path="/export")
    out = run_vmbackup(*transport(pool), "-e", "vm0.", "-d", backup_dir, "-j", "4",
                       "--jobs-per-host", "0", "--jobs-per-sr", "0",
                       "--json", tmp_path / "run.json", exit_code=2)
    data = json.loads((tmp_path / "run.json").read_text())
    assert [vm["name"] for vm in data["vms"]] == VMS
    failed = [vm["name"] for vm in data["vms"] if vm["status"] == "error"]
    assert len(failed) == 1, out
    for vm in VMS:
        assert bool(complete(backup_dir, vm)) == (vm not in failed)
    assert not stray_files(backup_dir)
    assert_pool_clean(pool)


def test_failed_snapshot_fails_only_its_vm(transport, tmp_path, pool):
    backup_dir = tmp_path / "b"
    backup_dir.mkdir()
    pool.faults.fail("VM.snapshot", "SR_BACKEND_FAILURE_44", "", "There is insufficient space",
                     "", match="vm05")
    out = run_vmbackup(*transport(pool), "-e", "vm0.", "-d", backup_dir, "-j", "4",
                       "--status-log", tmp_path / "status", exit_code=2)
    assert "vm=vm05: FAILED" in out
    assert [vm for vm in VMS if not complete(backup_dir, vm)] == ["vm05"]
    ends = [f for f in status_fields(tmp_path / "status") if ",end," in f]
    assert [re.search(r"(vm0\d)", f).group(1) for f in ends if "vm0" in f] == VMS
    assert "VM-EXPORT-FAIL vm05" in ends[5]
    assert_pool_clean(pool)


@pytest.mark.parametrize("signum, code, says", [
    (signal.SIGTERM, 2, "terminated by SIGTERM; snapshots cleaned up"),
    (signal.SIGINT, 130, "interrupted"),
], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_stops_every_export_and_destroys_every_snapshot(transport, tmp_path, pool,
                                                                  signum, code, says):
    backup_dir = tmp_path / "b"
    backup_dir.mkdir()
    pool.faults.throttle(256 * 1024)        # long enough to be cut
    proc = spawn(transport(pool) + ["-e", "vm0.", "-d", backup_dir, "-j", "4",
                                    "--jobs-per-host", "0", "--jobs-per-sr", "0"])
    wait_for(lambda: len(pool.leftovers()["snapshots"]) >= 3, what="3 snapshots at once")
    wait_for(lambda: pool.calls.most_at_once(("/export",)) >= 3, what="3 exports at once")
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, out
    assert says in out and "Traceback" not in out
    assert_pool_clean(pool)
    assert not any(complete(backup_dir, vm) for vm in VMS)
    assert not stray_files(backup_dir)


def test_a_second_signal_while_stopping_does_not_cut_the_cleanup(transport, tmp_path, pool):
    backup_dir = tmp_path / "b"
    backup_dir.mkdir()
    pool.faults.throttle(256 * 1024)
    pool.faults.slow("VM.destroy", 1.5)      # the cleanup takes a while
    proc = spawn(transport(pool) + ["-e", "vm0.", "-d", backup_dir, "-j", "4",
                                    "--jobs-per-host", "0", "--jobs-per-sr", "0"])
    wait_for(lambda: pool.calls.most_at_once(("/export",)) >= 3, what="3 exports at once")
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: pool.calls.count("VM.destroy") > 0, what="the first snapshot destroy")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert "stopping: waiting for" in out and "snapshots cleaned up" in out
    assert_pool_clean(pool)
    assert not stray_files(backup_dir)


@pytest.mark.parametrize("signum, name", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")],
                         ids=["SIGTERM", "Ctrl-C"])
@pytest.mark.parametrize("jobs", ["1", "4"])
def test_every_vm_a_signal_cuts_is_a_failed_unit_of_the_outcome(transport, tmp_path, pool, jobs,
                                                                  signum, name):
    """The VMs being backed up when the signal came are named everywhere the outcome is
    read: --json vms, the status log's end lines, the recap; in the selection's order."""
    backup_dir, status, summary = tmp_path / "b", tmp_path / "status", tmp_path / "run.json"
    backup_dir.mkdir()
    pool.faults.throttle(256 * 1024)
    proc = spawn(transport(pool) + ["-e", "vm0.", "-d", backup_dir, "-j", jobs,
                                    "--jobs-per-host", "0", "--jobs-per-sr", "0",
                                    "--status-log", status, "--json", summary])
    wait_for(lambda: pool.calls.most_at_once(("/export",)) >= min(3, int(jobs)),
             what="the exports to start")
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert "Traceback" not in out
    lines = status_fields(status)
    begun = [f.split(",")[-1] for f in lines if ",begin," in f and "vm0" in f]
    ended = [re.search(r"(vm0\d)", f).group(1) for f in lines if ",end," in f and "vm0" in f]
    assert begun == ended and begun == sorted(begun) and begun, lines
    vms = json.loads(summary.read_text())["vms"]
    assert [vm["name"] for vm in vms] == begun
    cut = [vm for vm in vms if vm["status"] == "error"]
    assert len(cut) >= min(3, int(jobs))
    for vm in cut:
        assert vm["message"] == "terminated by %s before it finished; snapshot destroyed" % name
        assert any(f.endswith(",end,VM-EXPORT-FAIL " + vm["name"]) for f in lines), lines
        assert "recap: FAILED %s: terminated by %s before" % (vm["name"], name) in out, out
        assert not complete(backup_dir, vm["name"])
    assert_pool_clean(pool)


def test_sigkill_leaves_no_false_success_and_the_next_run_cleans_up(transport, tmp_path, pool):
    backup_dir = tmp_path / "b"
    backup_dir.mkdir()
    pool.faults.throttle(256 * 1024)
    proc = spawn(transport(pool) + ["-e", "vm0.", "-d", backup_dir, "-j", "4",
                                    "--jobs-per-host", "0", "--jobs-per-sr", "0"])
    wait_for(lambda: pool.calls.most_at_once(("/export",)) >= 3, what="3 exports at once")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    pool.faults.clear()
    assert len(pool.leftovers()["snapshots"]) >= 3
    assert not any(complete(backup_dir, vm) for vm in VMS)
    run_vmbackup(*transport(pool), "-e", "vm0[0-1]", "-d", backup_dir, "-j", "4")
    assert_pool_clean(pool)
    assert [vm for vm in VMS if complete(backup_dir, vm)] == ["vm00", "vm01"]
    # the killed run's folders say they are incomplete; every backup with `success` is good
    lines = run_vmbackup("verify", backup_dir, exit_code=None).splitlines()[:-1]
    assert lines and all(line.startswith(("good ", "INCOMPLETE ")) for line in lines), lines
    assert sum(line.startswith("good ") for line in lines) == 2


# -- progress --------------------------------------------------------------------------

def run_on_pty(args, env, timeout=120):
    """Run vmbackup with stderr (and stdout) on a pseudo-terminal; return (rc, output)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, VMBACKUP] + [str(a) for a in args], stdout=slave,
                            stderr=slave, stdin=subprocess.DEVNULL, env=env, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], timeout)
        if not ready:
            proc.kill()
            pytest.fail("no output for %d s" % timeout)
        try:
            data = os.read(master, 65536)
        except OSError:          # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(), b"".join(chunks).decode("utf-8", "replace")


def test_progress_is_live_on_a_terminal(transport, tmp_path, pool):
    backup_dir = tmp_path / "b"
    backup_dir.mkdir()
    pool.faults.throttle(1 * M)             # 2-3 s per export: several redraws
    args = transport(pool) + ["-e", "vm0[1-2]", "-d", backup_dir, "-j", "2"]
    rc, out = run_on_pty(args, dict(os.environ))
    assert rc == 0, out
    assert "\x1b[" in out                    # lines redrawn in place
    live = [line for line in re.split(r"[\r\n]|\x1b\[\d*[AJ]", out) if line.startswith("vm=")]
    assert any(re.match(r"vm=vm01: vm01\.xva: [\d.]+[KM] of ~[\d.]+[KM].*/s, ETA \d+:\d\d", line)
               for line in live), out
    assert any(line.startswith("vm=vm02: ") for line in live)
    assert re.search(r"vmbackup: \d of 2 VMs done, \d exports running", out)
    assert complete(backup_dir, "vm01") and complete(backup_dir, "vm02")


def test_progress_off_a_terminal_is_a_log_line_per_interval(transport, tmp_path, pool):
    backup_dir = tmp_path / "b"
    backup_dir.mkdir()
    pool.faults.throttle(512 * 1024)        # about 6 s for vm01's export
    out = run_vmbackup(*transport(pool), "-e", "vm01", "-d", backup_dir, "--progress-interval",
                       "1")
    assert "\x1b[" not in out
    lines = [line for line in out.splitlines() if " progress " in line]
    assert lines and all(re.search(r"INFO vm=vm01: progress (vm01\.xva|metadata export of \S+): "
                                   r"[\d.]+[BKM]", line) for line in lines), out
    xva = [line for line in lines if "progress vm01.xva: " in line]
    assert len(xva) >= 2 and all(re.search(r"/s(, ETA \d+:\d\d)?$", line) for line in xva), out
    assert any(" of ~" in line for line in xva), out     # the disks' physical utilisation
    if transport.kind == "xe":   # and the task's progress, as xe prints none
        assert any(re.search(r"\(\d+%\)", line) for line in xva), out


def test_delta_export_of_four_vms_at_once_makes_chains_that_read_back(transport, tmp_path):
    """delta-export (CBT, the changed blocks over NBD) with 4 jobs: each VM its own chain."""
    desc = jobs_pool(4)
    desc["nbd"] = {"purpose": "nbd"}
    backup_dir = tmp_path / "b"
    backup_dir.mkdir()
    names = VMS[:4]
    with start_pool(pools.describe(desc)) as sim:
        args = transport(sim) + ["-D", "vm0[0-3]", "-d", backup_dir, "-j", "4",
                                 "--jobs-per-host", "0", "--jobs-per-sr", "0"]
        run_vmbackup(*args)
        for i, vm in enumerate(names):          # change each disk, differently
            sim.write_vdi(sim.vm_disks(vm)["xvda"], 65536 * (i + 2), bytes([i + 1]) * 4096)
        run_vmbackup(*args)
        assert sim.leftovers()["snapshots"] == []
    for vm in names:
        points = complete(backup_dir, vm)
        assert len(points) == 2
        with open(os.path.join(str(backup_dir), vm, points[-1], "backup.json")) as handle:
            disks = json.load(handle)["disks"]
        assert all(d["chain"]["parent"] is not None for d in disks), (vm, disks)
    out = run_vmbackup("verify", backup_dir)
    assert "verified 8 backups: 8 good" in out, out
