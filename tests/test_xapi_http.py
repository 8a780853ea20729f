"""The one HTTP path and the one task lifecycle, over GET (backup) and PUT (restore):
XAPI's redirects are followed up to one limit and a loop fails with one clear error,
and a transfer abandoned midway (error, SIGTERM, Ctrl-C) cancels and destroys its task,
so the pool keeps no task of ours. Faults go through the simulated pool, whose server
runs in this process: a test swaps one of its HTTP handlers or slows its body reader."""
import os
import signal
import socket
import struct
import time

import pytest

import vmbackup
from conftest import assert_pool_clean, run_vmbackup, session, spawn
from test_reliability import complete, stray_files, wait_for
from xapisim import server


def our_tasks(pool):
    """name_label of every task vmbackup created that still exists, read with XenAPI."""
    s = session(pool)
    try:
        return sorted(rec["name_label"] for rec in s.xenapi.task.get_all_records().values()
                      if rec["name_label"].startswith("vmbackup: "))
    finally:
        s.xenapi.session.logout()


def redirect_forever(self, path, rawq, q):
    """A handler that always answers 302 to its own host: a redirect loop."""
    if self._auth(q) is not None:
        self._redirect(self.host_ref, path, rawq)


def only_folder(backup_dir, vm):
    vm_dir = os.path.join(str(backup_dir), vm)
    (name,) = [n for n in os.listdir(vm_dir) if n.startswith("backup-")]
    return os.path.join(vm_dir, name)


def vms_named_like(pool, prefix):
    s = session(pool)
    try:
        return [rec["name_label"] for rec in s.xenapi.VM.get_all_records().values()
                if rec["name_label"].startswith(prefix) and not rec["is_a_snapshot"]]
    finally:
        s.xenapi.session.logout()


def member_local_sr(pool):
    """uuid of a local SR that only a pool member (not the master) sees."""
    s = session(pool)
    try:
        master = s.xenapi.pool.get_master(s.xenapi.pool.get_all()[0])
        for rec in s.xenapi.SR.get_all_records().values():
            hosts = {s.xenapi.PBD.get_host(pbd) for pbd in rec["PBDs"]}
            if rec["name_label"].startswith("Local storage") and hosts and master not in hosts:
                return rec["uuid"]
    finally:
        s.xenapi.session.logout()
    pytest.skip("no member-local SR in this pool")


# -- redirects ------------------------------------------------------------------------

def test_get_redirect_loop_fails_with_one_clear_error(sim_pool, api, backup_dir, monkeypatch):
    monkeypatch.setattr(server.Handler, "h_export", redirect_forever)
    out = run_vmbackup(*api(sim_pool), "-e", "web01", "-d", backup_dir, exit_code=2)
    assert "GET /export: too many redirects (more than %d)" % vmbackup.MAX_REDIRECTS in out
    assert "Traceback" not in out
    hops = [r.status for r in sim_pool.calls.requests("/export")]
    assert hops == [302] * (vmbackup.MAX_REDIRECTS + 1)     # the limit is the property
    assert complete(backup_dir, "web01") == [] and stray_files(backup_dir) == []
    assert our_tasks(sim_pool) == []
    assert_pool_clean(sim_pool)


def test_put_redirect_loop_fails_with_one_clear_error(sim_pool, api, backup_dir, monkeypatch):
    args = api(sim_pool)
    run_vmbackup(*args, "-e", "db01", "-d", backup_dir)
    monkeypatch.setattr(server.Handler, "h_import", redirect_forever)
    out = run_vmbackup("restore", only_folder(backup_dir, "db01"), *args, exit_code=2)
    assert "PUT /import: too many redirects (more than %d)" % vmbackup.MAX_REDIRECTS in out
    assert "Traceback" not in out
    hops = [(r.status, r.bytes_received) for r in sim_pool.calls.requests("/import")]
    assert hops == [(302, 0)] * (vmbackup.MAX_REDIRECTS + 1)   # no body sent to a redirect
    assert vms_named_like(sim_pool, "db01 (restored") == []
    assert our_tasks(sim_pool) == []


def test_put_redirect_is_followed_with_the_body(sim_pool, api, backup_dir):
    """A restore onto a member's local SR: the master answers 302 before the body, and
    the whole body goes to the member, once."""
    args = api(sim_pool)
    run_vmbackup(*args, "-e", "db01", "-d", backup_dir)
    out = run_vmbackup("restore", only_folder(backup_dir, "db01"), *args,
                       "--sr", member_local_sr(sim_pool))
    assert "restored vm" in out
    xva = os.path.getsize(os.path.join(only_folder(backup_dir, "db01"), "db01.xva"))
    hops = [(r.host, r.status, r.bytes_received) for r in sim_pool.calls.requests("/import")]
    assert [(status, sent) for _, status, sent in hops] == [(302, 0), (200, xva)]
    assert hops[0][0] != hops[1][0]
    assert len(vms_named_like(sim_pool, "db01 (restored")) == 1
    assert our_tasks(sim_pool) == []


# -- the task of an abandoned transfer ------------------------------------------------

def slow_body_reader(monkeypatch, block=16 * 1024, pause=0.05):
    """Make the simulator read PUT bodies slowly (about 320 KiB/s), as a busy SR would."""
    readinto = server.BodyReader.readinto

    def slow(self, b):
        time.sleep(pause)
        return readinto(self, memoryview(b)[:block])
    monkeypatch.setattr(server.BodyReader, "readinto", slow)


def downloading(pool):
    return lambda: any(r.bytes_sent > 0 for r in pool.calls.requests("/export"))


def uploading(pool):
    return lambda: any(r.bytes_received > 0 for r in pool.calls.requests("/import"))


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 2), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("direction", ["download", "upload"])
def test_transfer_stopped_midway_cancels_and_destroys_its_task(sim_pool, api, backup_dir,
                                                               monkeypatch, direction, signum, code):
    args = api(sim_pool)
    if direction == "download":
        sim_pool.faults.throttle(256 * 1024, path="/export")
        proc = spawn(args + ["-e", "db01", "-d", backup_dir])
        wait_for(downloading(sim_pool), what="the export to start")
    else:
        run_vmbackup(*args, "-e", "db01", "-d", backup_dir)
        slow_body_reader(monkeypatch)
        proc = spawn(["restore", only_folder(backup_dir, "db01")] + args)
        wait_for(uploading(sim_pool), what="the upload to start")
    sim_pool.calls.clear()
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, out
    assert "Traceback" not in out
    assert sim_pool.calls.count("task.cancel") == 1, out    # cancelled while it still ran
    assert our_tasks(sim_pool) == []                          # and destroyed
    assert vms_named_like(sim_pool, "db01 (restored") == []
    assert_pool_clean(sim_pool)


def cut_put_bodies(monkeypatch, pool, after):
    """The pool reads PUT bodies slowly and resets the connection once `after` bytes are
    in; it fails the import's task only 2 s later, so the client meets the reset first."""
    body_reader = server.Handler._body_reader

    def reader(self):
        raw = body_reader(self)
        readinto, cut = raw.readinto, []

        def read(b):
            if cut:
                raise ConnectionError("test: the connection was reset")
            if self.req.bytes_received >= after:
                cut.append(True)
                # linger 0: the close sends a reset, and the client's next send fails
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.rfile.close()
                self.connection.close()
                pool.sleep(2)
                raise ConnectionError("test: the connection was reset")
            time.sleep(0.05)
            return readinto(memoryview(b)[:16 * 1024])
        raw.readinto = read
        return raw
    monkeypatch.setattr(server.Handler, "_body_reader", reader)


def test_upload_that_fails_midway_cancels_and_destroys_its_task(sim_pool, api, backup_dir,
                                                                 monkeypatch):
    args = api(sim_pool)
    run_vmbackup(*args, "-e", "db01", "-d", backup_dir)
    cut_put_bodies(monkeypatch, sim_pool, after=128 * 1024)
    sim_pool.calls.clear()
    out = run_vmbackup("restore", only_folder(backup_dir, "db01"), *args, exit_code=2)
    assert "import of db01.xva: connection lost after" in out and "Traceback" not in out
    assert sim_pool.calls.count("task.cancel") == 1, out    # it still ran: cancelled
    assert our_tasks(sim_pool) == []                          # and destroyed
    assert vms_named_like(sim_pool, "db01 (restored") == []
