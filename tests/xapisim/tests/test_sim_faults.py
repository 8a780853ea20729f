"""Every fault switch of the simulator, observed through the real XenAPI client
and real HTTP (http.client, curl)."""
import http.client
import io
import socket
import subprocess
import time
import urllib.parse
import xmlrpc.client

import pytest
import XenAPI

from xapisim import xva

MIB = 1 << 20


def failure(fn, *args):
    with pytest.raises(XenAPI.Failure) as e:
        fn(*args)
    return e.value.details


def open_get(url, path, query, timeout=30):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    conn.request("GET", path + "?" + urllib.parse.urlencode(query))
    return conn, conn.getresponse()


def wait_task(x, task, timeout=10):
    deadline = time.time() + timeout
    while x.task.get_status(task) == "pending" and time.time() < deadline:
        time.sleep(0.02)
    return x.task.get_record(task)


# ---------------------------------------------------------------------------
# XML-RPC faults
# ---------------------------------------------------------------------------
def test_fail_method_with_code_times_and_match(sim_pool, xapi):
    x = xapi.xenapi
    web, _ = sim_pool.vm("web01")
    db, _ = sim_pool.vm("db01")
    sim_pool.faults.fail("VM.snapshot", "SR_BACKEND_FAILURE_44", "", "There is insufficient space", "",
                         times=2)
    for _ in range(2):
        assert failure(x.VM.snapshot, web, "s") == \
            ["SR_BACKEND_FAILURE_44", "", "There is insufficient space", ""]
    assert x.VM.snapshot(web, "s")           # the fault is used up
    sim_pool.faults.fail("VM.snapshot", "SR_BACKEND_FAILURE_82", "", "Failed to snapshot VDI", "",
                         times=None, match="db01")
    assert x.VM.snapshot(web, "other VM is fine")
    assert failure(x.VM.snapshot, db, "s")[0] == "SR_BACKEND_FAILURE_82"
    assert failure(x.VM.snapshot, db, "s")[0] == "SR_BACKEND_FAILURE_82"   # times=None: always
    sim_pool.faults.clear()
    assert x.VM.snapshot(db, "s")
    vdi = sim_pool.vm_disks("db01")["xvda"]
    snap = x.VDI.snapshot(vdi, {})
    sim_pool.faults.fail("VDI.destroy", "VDI_IN_USE", snap, "destroy", match=x.VDI.get_uuid(snap))
    assert failure(x.VDI.destroy, snap) == ["VDI_IN_USE", snap, "destroy"]
    x.VDI.destroy(snap)
    calls = sim_pool.calls.find("VDI.destroy")
    assert [c.status for c in calls] == ["Failure", "Success"]


def test_slow_method(sim_pool, xapi):
    sim_pool.faults.slow("VM.get_all_records", 0.5)
    t = time.time()
    xapi.xenapi.VM.get_all_records()
    assert time.time() - t >= 0.5
    t = time.time()
    xapi.xenapi.VM.get_all()
    assert time.time() - t < 0.5


def test_drop_rpc_once_is_hidden_by_the_xmlrpc_retry(sim_pool, xapi):
    sim_pool.faults.drop_rpc("VM.get_all", times=1)
    assert xapi.xenapi.VM.get_all()
    assert [c.status for c in sim_pool.calls.find("VM.get_all")] == ["dropped", "Success"]


def test_drop_rpc_twice_surfaces(sim_pool, xapi):
    sim_pool.faults.drop_rpc("VM.get_all", times=2)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        xapi.xenapi.VM.get_all()
    assert xapi.xenapi.VM.get_all()


def test_drop_rpc_after_the_call_ran_duplicates_it(sim_pool, xapi):
    x = xapi.xenapi
    web, _ = sim_pool.vm("web01")
    before = len(x.VM.get_snapshots(web))
    sim_pool.faults.drop_rpc("VM.snapshot", times=1, after_call=True)
    x.VM.snapshot(web, "retried")            # the client resent it after the lost answer
    assert len(x.VM.get_snapshots(web)) == before + 2
    assert len(sim_pool.leftovers()["snapshots"]) == 2


def test_http_error_on_a_control_call(sim_pool, xapi):
    sim_pool.faults.http_error("VM.get_all_records", status=503)
    with pytest.raises(xmlrpc.client.ProtocolError) as e:
        xapi.xenapi.VM.get_all_records()
    assert e.value.errcode == 503
    assert xapi.xenapi.VM.get_all_records()
    sim_pool.faults.http_error(status=500)      # any method
    body = xmlrpc.client.dumps((xapi._session,), "pool.get_all")
    r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--data-binary", body,
                        sim_pool.url], stdout=subprocess.PIPE)
    assert r.stdout == b"500"
    assert sim_pool.calls.find("pool.get_all")[0].status == "http 500"


def test_host_is_slave_and_designate_master(sim_pool):
    sim_pool.faults.host_is_slave()                    # xcp-ng-b becomes master
    s = XenAPI.Session(sim_pool.url)
    assert failure(s.xenapi.login_with_password, "root", sim_pool.password) == \
        ["HOST_IS_SLAVE", "127.0.0.2"]
    new = XenAPI.Session("http://127.0.0.2:%d/" % sim_pool.port)
    new.xenapi.login_with_password("root", sim_pool.password)
    pool = new.xenapi.pool.get_all()[0]
    assert new.xenapi.host.get_address(new.xenapi.pool.get_master(pool)) == "127.0.0.2"
    assert sim_pool.master_url == "http://127.0.0.2:%d/" % sim_pool.port
    # pool dump must go to the (new) master
    st = open_get(sim_pool.url, "/pool/xmldbdump", {"session_id": new._session})[1]
    assert st.status == 200 and st.read() == b""
    sim_pool.faults.clear()
    s.xenapi.login_with_password("root", sim_pool.password)
    assert s.xenapi.pool.get_all()
    sim_pool.designate_master("xcp-ng-c")
    assert failure(s.xenapi.VM.get_all) == ["HOST_IS_SLAVE", "127.0.0.3"]


def test_sr_full(sim_pool, xapi):
    x = xapi.xenapi
    web, _ = sim_pool.vm("web01")
    nfs = x.pool.get_default_SR(x.pool.get_all()[0])
    util = x.SR.get_physical_utilisation(nfs)
    sim_pool.faults.sr_full("NFS storage")
    assert x.SR.get_physical_utilisation(nfs) == x.SR.get_physical_size(nfs)
    assert failure(x.VM.snapshot, web, "s") == ["SR_BACKEND_FAILURE_44", "", "There is insufficient space", ""]
    vdi = sim_pool.vm_disks("web01")["xvda"]
    assert failure(x.VDI.snapshot, vdi, {})[0] == "SR_BACKEND_FAILURE_44"
    local_vm, _ = sim_pool.vm("local-vm")
    assert x.VM.snapshot(local_vm, "other SR is fine")
    assert sim_pool.leftovers()["vdis"] and all(
        x.VDI.get_SR(v["ref"]) != nfs for v in sim_pool.leftovers()["vdis"])
    sim_pool.faults.clear()
    assert x.SR.get_physical_utilisation(nfs) == util
    assert x.VM.snapshot(web, "s")


def test_vanish_vm_between_listing_and_snapshot(sim_pool, xapi):
    x = xapi.xenapi
    vms = x.VM.get_all_records()
    ref = next(r for r, v in vms.items() if v["name_label"] == "DEV-web3")
    vdis = list(sim_pool.vm_disks("DEV-web3").values())
    sim_pool.faults.vanish_vm("DEV-web3", before="VM.snapshot")
    assert failure(x.VM.snapshot, ref, "backup") == ["HANDLE_INVALID", "VM", ref]
    assert ref not in x.VM.get_all()
    for v in vdis:
        assert failure(x.VDI.get_record, v)[0] == "HANDLE_INVALID"
    assert sim_pool.leftovers() == {"snapshots": [], "vdis": []}


# ---------------------------------------------------------------------------
# HTTP faults
# ---------------------------------------------------------------------------
def test_drop_export_cuts_body_and_fails_task(sim_pool, xapi, tmp_path):
    x = xapi.xenapi
    ref, _ = sim_pool.vm("db01")
    task = x.task.create("export", "")
    sim_pool.faults.drop_export(after_bytes=100000)
    conn, resp = open_get(sim_pool.url, "/export", {"session_id": xapi._session, "ref": ref, "task_id": task})
    assert resp.status == 200
    data = resp.read()                  # no Content-Length: the short body looks complete
    conn.close()
    assert len(data) == 100000
    rec = wait_task(x, task)
    assert rec["status"] == "failure"
    with pytest.raises(Exception):
        xva.parse_xva(io.BytesIO(data))
    assert x.VM.get_current_operations(ref) == {}
    # the next export is whole again; with curl the truncation is invisible to the exit code
    sim_pool.faults.drop_export(after_bytes=4096, path="/export_raw_vdi")
    vdi = sim_pool.vm_disks("db01")["xvda"]
    task = x.task.create("raw", "")
    out = tmp_path / "d.raw"
    r = subprocess.run(["curl", "-sS", "-o", str(out), "%sexport_raw_vdi?session_id=%s&vdi=%s&task_id=%s"
                        % (sim_pool.url, xapi._session, vdi, task)], stderr=subprocess.PIPE)
    assert out.stat().st_size == 4096
    assert wait_task(x, task)["error_info"] == ["VDI_IO_ERROR", "Device I/O errors"]
    r = subprocess.run(["curl", "-sS", "-o", str(out), "%sexport_raw_vdi?session_id=%s&vdi=%s"
                        % (sim_pool.url, xapi._session, vdi)], stderr=subprocess.PIPE)
    assert r.returncode == 0 and out.stat().st_size == 6 * MIB
    reqs = sim_pool.calls.requests("/export_raw_vdi")
    assert reqs[0].bytes_sent == 4096 and "dropped" in reqs[0].error


def test_drop_export_times_and_other_paths(sim_pool, xapi):
    sim_pool.faults.drop_export(after_bytes=10, times=2, path="/pool/xmldbdump")
    for _ in range(2):
        conn, resp = open_get(sim_pool.url, "/pool/xmldbdump", {"session_id": xapi._session})
        assert len(resp.read()) == 10
        conn.close()
    conn, resp = open_get(sim_pool.url, "/pool/xmldbdump", {"session_id": xapi._session})
    assert resp.read().endswith(b"</database>")
    conn.close()


def test_throttle(sim_pool, xapi):
    vdi = sim_pool.vm_disks("odd-size-vm")["xvda"]     # 3.125 MiB
    sim_pool.faults.throttle(4 * MIB, path="/export_raw_vdi")
    t = time.time()
    r = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download}",
                        "%sexport_raw_vdi?session_id=%s&vdi=%s" % (sim_pool.url, xapi._session, vdi)],
                       stdout=subprocess.PIPE)
    elapsed = time.time() - t
    assert int(r.stdout) == 3 * MIB + 131072
    assert 0.6 < elapsed < 3, elapsed
    sim_pool.faults.clear()
    t = time.time()
    subprocess.run(["curl", "-sS", "-o", "/dev/null",
                    "%sexport_raw_vdi?session_id=%s&vdi=%s" % (sim_pool.url, xapi._session, vdi)])
    assert time.time() - t < 0.5


def test_stall_export_keeps_connection_open(sim_pool, xapi):
    x = xapi.xenapi
    ref, _ = sim_pool.vm("db01")
    sim_pool.faults.stall_export(after_bytes=8192, seconds=1.0, path="/export")
    task = x.task.create("export", "")
    conn, resp = open_get(sim_pool.url, "/export", {"session_id": xapi._session, "ref": ref,
                                                    "task_id": task}, timeout=0.4)
    assert len(resp.read(8192)) == 8192
    with pytest.raises(socket.timeout):
        resp.read(1)                   # nothing comes, but the connection is not closed
    resp.close()                           # close the response too, or the socket stays open
    conn.close()
    rec = wait_task(x, task)
    assert rec["status"] == "failure" and rec["error_info"][0] == "CLIENT_ERROR"
    # a patient reader gets everything after the stall
    sim_pool.faults.stall_export(after_bytes=8192, seconds=0.5, path="/export")
    t = time.time()
    conn, resp = open_get(sim_pool.url, "/export", {"session_id": xapi._session, "ref": ref}, timeout=5)
    body = resp.read()
    conn.close()
    assert time.time() - t >= 0.5
    assert len(xva.parse_xva(io.BytesIO(body))[1]) == 3


def test_clear_switches_everything_off(sim_pool, xapi):
    x = xapi.xenapi
    f = sim_pool.faults
    f.fail("VM.get_all", "INTERNAL_ERROR", "boom", times=None)
    f.slow("VM.get_all", 5)
    f.throttle(1)
    f.drop_export(0)
    f.stall_export(0, 10)
    f.http_error("pool.get_all", times=None)
    f.drop_rpc("host.get_all", times=5)
    assert len(f.active) == 7
    f.clear()
    assert f.active == []
    t = time.time()
    assert x.VM.get_all() and x.pool.get_all() and x.host.get_all()
    ref, _ = sim_pool.vm("db01")
    conn, resp = open_get(sim_pool.url, "/export", {"session_id": xapi._session, "ref": ref})
    assert len(xva.parse_xva(io.BytesIO(resp.read()))[1]) == 3
    conn.close()
    assert time.time() - t < 3
