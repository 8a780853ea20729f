"""Tags never block a backup, and runs and their leftovers are told apart across hosts:
a restored VM backs up again; a killed run's lock and snapshots are cleaned up from another
host as soon as that run is provably over, and never while it lives; xe dies with vmbackup."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

import vmbackup
from conftest import VMBACKUP, assert_pool_clean, backups_of, run_vmbackup, session


def complete(backup_dir, vm):
    return [b for b in backups_of(backup_dir, vm)
            if os.path.exists(os.path.join(str(backup_dir), vm, b, "success"))]


def tool_keys(s, cls, ref):
    other = getattr(s.xenapi, cls).get_other_config(ref)
    return sorted(k for k in other if k.startswith("vmbackup_"))


# -- 3. tags never block a backup -------------------------------------------------

@pytest.mark.parametrize("mode, preserve", [("-e", False), ("-e", True), ("-E", False)],
                         ids=["vm-export", "vm-export-preserve", "vdi-export"])
def test_a_restored_vm_backs_up_again(sim_pool, transport, backup_dir, mode, preserve):
    """The .xva carries the snapshot's tagged disks; their copies must not block a backup."""
    args = transport(sim_pool)
    run_vmbackup(*args, "-e", "PRD-print7", "-d", backup_dir)
    s = session(sim_pool)
    try:
        if preserve:   # disaster recovery: the original is gone
            lost = sim_pool.vm("PRD-print7")[0]
            if s.xenapi.VM.get_power_state(lost) != "Halted":
                s.xenapi.VM.hard_shutdown(lost)
            s.xenapi.VM.destroy(lost)
        extra = ["--preserve"] if preserve else ["--name", "print7-copy"]
        run_vmbackup("restore", *args, backup_dir / "PRD-print7", *extra)
        name = "PRD-print7" if preserve else "print7-copy"
        target = sim_pool.vm(name)[0]
        vdis = [s.xenapi.VBD.get_VDI(v) for v in s.xenapi.VM.get_VBDs(target)
                if s.xenapi.VBD.get_type(v) == "Disk"]
        # restore leaves none of the tool's keys on what it created
        assert tool_keys(s, "VM", target) == []
        assert vdis and all(tool_keys(s, "VDI", v) == [] for v in vdis)
        # and a disk that still carries a copied tag (restored by an older version) backs up
        s.xenapi.VDI.add_to_other_config(vdis[0], vmbackup.TAG_KEY,
                                         "00000000-0000-0000-0000-000000000000 h 1 2020-01-01T00:00:00")
    finally:
        s.xenapi.session.logout()
    run_vmbackup(*args, mode, name, "-d", backup_dir)
    assert complete(backup_dir, name)[-1:]
    left = sim_pool.leftovers()     # the restored disks are the only VDIs made in the test
    assert left["snapshots"] == [] and {v["ref"] for v in left["vdis"]} == set(vdis)


# -- 5. no orphans: xe dies with vmbackup, the password leaves no file ----------------

def xe_processes(marker):
    """Pids of running `xe vm-export` of an .xva under `marker` (the backup_dir)."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as handle:
                argv = handle.read().split(b"\0")
            with open("/proc/%s/stat" % pid) as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and b"vm-export" in argv \
                and any(marker.encode() in a and b".xva" in a for a in argv):
            found.append(int(pid))
    return found


def remote_xe(pool, tmp_path):
    """Arguments for the xe transport to a remote pool (xe needs the password: -pwf)."""
    pw = tmp_path / "xapi.pw"
    pw.write_text(pool.password + "\n")
    pw.chmod(0o600)
    return ["--transport", "xe", "--xe", pool.xe_path, "--server", pool.url, "--password-file", pw]


def test_kill_9_takes_the_xe_export_with_it(sim_pool, backup_dir, tmp_path, monkeypatch):
    for key, value in sim_pool.env().items():
        monkeypatch.setenv(key, value)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    args = remote_xe(sim_pool, tmp_path)
    sim_pool.faults.throttle(128 * 1024, path="/export")
    proc = subprocess.Popen([sys.executable, VMBACKUP] + [str(a) for a in args]
                            + ["-e", "db01", "-d", str(backup_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for(lambda: xe_processes(str(backup_dir)), what="xe vm-export to start")
    assert os.listdir(str(tmp)) == []          # the password is in no file
    os.kill(proc.pid, signal.SIGKILL)          # vmbackup only: xe is not signalled
    proc.communicate(timeout=30)
    wait_for(lambda: not xe_processes(str(backup_dir)), timeout=10, what="xe to die with vmbackup")
    assert os.listdir(str(tmp)) == []
    sim_pool.faults.clear()
    began = time.monotonic()
    out = run_vmbackup(*args, "-e", "PRD-print7", "-d", backup_dir, exit_code=None)
    assert "destroying leftover snapshot" in out and " E:0" in out
    assert time.monotonic() - began < 30        # no two minutes on OTHER_OPERATION_IN_PROGRESS
    assert_pool_clean(sim_pool)


def wait_for(predicate, timeout=30.0, what="condition"):
    """Poll `predicate` until true (bounded); fail the test if it never is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail("timed out waiting for " + what)


# -- 4. runs and leftovers across hosts -------------------------------------------------

def on_host(hostname, args):
    """A vmbackup process whose hostname is `hostname` (its own UTS namespace), like a
    container, a new pool master or a second host on the same NFS backup_dir."""
    if subprocess.run(["unshare", "--uts", "true"], stderr=subprocess.DEVNULL).returncode != 0:
        pytest.skip("unshare --uts is not allowed here")
    return subprocess.Popen(["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname,
                             sys.executable, VMBACKUP] + [str(a) for a in args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, start_new_session=True)


def exporting_xva(pool):
    return lambda: any(r.path == "/export" for r in pool.calls.requests())


def beat_keys(pool):
    s = session(pool)
    try:
        ref = s.xenapi.pool.get_all()[0]
        return ref, [k for k in s.xenapi.pool.get_other_config(ref) if k.startswith("vmbackup_alive ")]
    finally:
        s.xenapi.session.logout()


def age_heartbeats(pool, minutes):
    """Move every run heartbeat in the pool `minutes` into the past (the clock, injected)."""
    ref, keys = beat_keys(pool)
    s = session(pool)
    try:
        for key in keys:
            words = key.split()
            when = vmbackup.note_time(["", "", words[-1]]) - __import__("datetime").timedelta(minutes=minutes)
            s.xenapi.pool.remove_from_other_config(ref, key)
            s.xenapi.pool.add_to_other_config(ref, " ".join(words[:-1] + [when.isoformat()]), "")
    finally:
        s.xenapi.session.logout()


def test_a_run_killed_on_another_host_is_cleaned_up(sim_pool, transport, backup_dir):
    args = transport(sim_pool) + ["-d", backup_dir]
    sim_pool.faults.throttle(128 * 1024, path="/export")
    proc = on_host("otherhost", args + ["-e", "db01"])
    wait_for(exporting_xva(sim_pool), what="the other host's export")
    os.kill(proc.pid, signal.SIGKILL)           # vmbackup itself (sh exec'd it)
    proc.communicate(timeout=30)
    sim_pool.faults.clear()
    assert len(sim_pool.leftovers()["snapshots"]) == 1
    lock = backup_dir / ".vmbackup.lock"
    # while its lock is fresh the run may still live: refused, naming the file and the host
    out = run_vmbackup(*args, "-e", "PRD-print7", exit_code=2)
    assert "on host otherhost" in out and str(lock) in out
    # five minutes later (the clock, injected): nothing refreshed the lock or the heartbeat
    old = time.time() - 600
    os.utime(str(lock), (old, old))
    age_heartbeats(sim_pool, 11)
    out = run_vmbackup(*args, "-e", "PRD-print7", exit_code=None)
    assert "taking over stale lock %s" % lock in out and "host otherhost" in out
    assert "destroying leftover snapshot" in out and " E:0" in out
    assert_pool_clean(sim_pool)
    assert beat_keys(sim_pool)[1] == []         # the dead run's heartbeat went too
    assert complete(backup_dir, "PRD-print7") and not lock.exists()


def test_a_live_run_on_another_host_is_left_alone(sim_pool, transport, tmp_path):
    first_dir, second_dir = tmp_path / "a", tmp_path / "b"
    first_dir.mkdir()
    second_dir.mkdir()
    args = transport(sim_pool)
    sim_pool.faults.throttle(512 * 1024, path="/export")
    proc = on_host("otherhost", args + ["-e", "db01", "-d", first_dir])
    try:
        wait_for(exporting_xva(sim_pool), what="the other host's export")
        assert beat_keys(sim_pool)[1]           # it beats
        out = run_vmbackup(*args, "-e", "PRD-print7", "-d", second_dir, exit_code=None)
        assert "leftover" not in out and " E:0" in out
    finally:
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert complete(first_dir, "db01") and complete(second_dir, "PRD-print7")
    assert_pool_clean(sim_pool)
    assert beat_keys(sim_pool)[1] == []


NOW = __import__("datetime").datetime(2026, 11, 23, 20, 0, 0)


@pytest.mark.parametrize("note, beats, expected", [
    (["otherhost", "7", "2026-11-23T19:00:00", "beat"], {("otherhost", "7", "2026-11-23T19:00:00"): NOW}, False),
    (["otherhost", "7", "2026-11-23T19:00:00", "beat"], {("otherhost", "7", "2026-11-23T19:00:00"):
                                                         NOW - __import__("datetime").timedelta(minutes=11)}, True),
    (["otherhost", "7", "2026-11-23T19:00:00", "beat"], {}, True),
    (["otherhost", "7", "2026-11-23T19:00:00"], {}, False),            # an older version: 25 h
    (["otherhost", "7", "2026-11-22T18:00:00"], {}, True),
    (["thishost", "1", "2026-11-23T19:00:00", "beat"], {("thishost", "1", "2026-11-23T19:00:00"): NOW}, True),
    (["thishost", "1", "2026-11-23T20:00:00", "beat"], {("thishost", "1", "2026-11-23T20:00:00"): NOW}, False),
], ids=["beating", "beat-stale", "no-beat", "old-version-young", "old-version-25h",
        "own-pid-earlier-run", "this-run"])
def test_run_is_dead(note, beats, expected):
    me = ("thishost", "1", "2026-11-23T20:00:00")
    assert vmbackup.run_is_dead(note, NOW, beats, me) is expected


@pytest.mark.parametrize("holder, age, expected", [
    ((12, "h1"), 30, "held"), ((12, "h2"), 30, "held"), ((12, "h2"), 301, "stale"),
    ((999999, "h1"), 30, "stale"), ((None, ""), 1, "held"), ((None, ""), 60, "stale"),
], ids=["fresh-here", "fresh-other-host", "stale-other-host", "dead-pid-here",
        "being-written", "garbage"])
def test_lock_verdict(holder, age, expected):
    assert vmbackup.lock_verdict(holder, age, "h1", lambda pid: pid == 12) == expected


def test_lock_is_kept_fresh_while_the_run_lives(backup_dir, monkeypatch):
    monkeypatch.setattr(vmbackup, "LOCK_REFRESH", 0.05)
    with vmbackup.RunLock(str(backup_dir)) as lock:
        old = time.time() - 600
        os.utime(lock.path, (old, old))
        wait_for(lambda: time.time() - os.stat(lock.path).st_mtime < 60, what="the lock's refresh")
        pid, host, started = open(lock.path).read().split()
        assert int(pid) == os.getpid() and started[:2] == "20"
    assert not os.path.exists(lock.path)


def test_a_leftover_still_being_exported_has_its_task_cancelled_first(sim_pool, transport, tmp_path):
    """A killed run's export may live on (an older version's xe child, a hung connection):
    the next run cancels that export's task, says what the destroy waits for, then destroys
    the leftover."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    args = transport(sim_pool)
    sim_pool.faults.throttle(128 * 1024, path="/export")
    proc = on_host("otherhost", args + ["-e", "db01", "-d", first])
    wait_for(exporting_xva(sim_pool), what="the other host's export")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    (snap,) = sim_pool.leftovers()["snapshots"]
    s = session(sim_pool)
    stream = None
    try:   # the export that lives on: the snapshot still streamed, slowly
        stream = urllib.request.urlopen("%s/export?session_id=%s&uuid=%s"
                                        % (sim_pool.url, s._session, snap["uuid"]))
        stream.read(1024)
        assert s.xenapi.VM.get_current_operations(snap["ref"])
        age_heartbeats(sim_pool, 11)
        out = run_vmbackup(*args, "-m", "PRD-print7", "-d", second, exit_code=None)
    finally:
        if stream is not None:
            stream.close()
        s.xenapi.session.logout()
    assert "leftover %s is still busy (export, task" % snap["uuid"] in out
    assert "cancelling that task" in out and "destroying leftover snapshot" in out and " E:0" in out
    assert_pool_clean(sim_pool)
