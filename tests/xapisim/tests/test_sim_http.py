"""The simulator's HTTP handlers through real HTTP (http.client, curl) and the
real XenAPI client; fidelity checked with tools nobody here wrote (xva-img,
qemu-img, gzip, zstd, tar, the xxhash package)."""
import gzip
import hashlib
import http.client
import io
import os
import re
import ssl
import subprocess
import tarfile
import time
import urllib.parse
import xmlrpc.client

import pytest
import xxhash
import XenAPI

import xapisim
from xapisim import pools, xva

MIB = 1 << 20


def request(url, method="GET", path="/", query=None, body=None, headers=None, context=None):
    """-> (status, headers dict (lower-case keys), raw status line, body bytes)"""
    u = urllib.parse.urlsplit(url)
    if u.scheme == "https":
        conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=30, context=context)
    else:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    target = path + ("?" + urllib.parse.urlencode(query) if query else "")
    conn.request(method, target, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    hdrs = {k.lower(): v for k, v in resp.getheaders()}
    version = resp.version
    conn.close()
    return resp.status, hdrs, version, data


def wait_task(x, task, timeout=10):
    deadline = time.time() + timeout
    while x.task.get_status(task) == "pending" and time.time() < deadline:
        time.sleep(0.02)
    return x.task.get_record(task)


def tar_members(data):
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        return [(m.name, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]


def curl(*args):
    return subprocess.run(["curl", "-sS"] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=60)


# ---------------------------------------------------------------------------
# /export
# ---------------------------------------------------------------------------
def test_export_xva_layout_headers_and_xxhash(sim_pool, xapi):
    x = xapi.xenapi
    ref, rec = sim_pool.vm("db01")
    task = x.task.create("Export of VM", "")
    status, hdrs, version, body = request(sim_pool.url, path="/export",
                                          query={"session_id": xapi._session, "ref": ref, "task_id": task})
    assert status == 200 and version == 10                      # HTTP/1.0
    assert "content-length" not in hdrs and hdrs["connection"] == "close"
    assert hdrs["task-id"] == task
    t = x.task.get_record(task)
    assert t["status"] == "success" and t["progress"] == 1.0
    members = tar_members(body)
    assert members[0][0] == "ova.xml"
    assert body.endswith(b"\0" * 1024)
    ova = xmlrpc.client.loads("<methodResponse><params><param>%s</param></params></methodResponse>"
                              % members[0][1].decode())[0][0]
    assert ova["version"]["export_vsn"] == "2"
    classes = [o["class"] for o in ova["objects"]]
    order = ["host", "VM", "VM_metrics", "VM_guest_metrics", "VBD", "VIF", "network", "VDI", "SR"]
    assert classes == sorted(classes, key=order.index)
    vm = next(o for o in ova["objects"] if o["class"] == "VM")["snapshot"]
    assert vm["name_label"] == "db01" and vm["power_state"] == "Halted"
    vdi_ids = {o["id"]: o["snapshot"] for o in ova["objects"] if o["class"] == "VDI"}
    dirs = []
    for name, data in members[1:]:
        d = name.split("/")[0]
        if d not in dirs:
            dirs.append(d)
    assert dirs == sorted(dirs) and len(dirs) == 3                # lexicographic, Ref:10 < Ref:2
    by_uuid = {v["uuid"]: k for k, v in vdi_ids.items()}
    for vdi in sim_pool.vm_disks("db01").values():
        disk = sim_pool.vdi_content(vdi)
        d = by_uuid[x.VDI.get_uuid(vdi)]
        chunks = [(n, data) for n, data in members if n.startswith(d + "/") and "." not in n]
        sums = dict((n, data) for n, data in members if n.endswith(".xxhash") and n.startswith(d + "/"))
        counters = [int(n.split("/")[1]) for n, _ in chunks]
        last = (disk.virtual_size - 1) // MIB
        assert counters[0] == 0 and counters[-1] == last
        for n, data in chunks:
            assert sums[n + ".xxhash"] == ("%016X" % xxhash.xxh64(data).intdigest()).encode()
            c = int(n.split("/")[1])
            assert data == disk.read(c * MIB, len(data))
        # zero chunks skipped (except first and last)
        for c in range(1, last):
            if c not in counters:
                assert disk.is_zero(c * MIB, MIB)
    ova2, disks = xva.parse_xva(io.BytesIO(body))
    for vdi in sim_pool.vm_disks("db01").values():
        assert disks[by_uuid[x.VDI.get_uuid(vdi)]].sha256() == sim_pool.vdi_content(vdi).sha256()
    assert x.VM.get_current_operations(ref) == {}


def test_export_sha1_checksums_read_by_xva_img(sim_pool, xapi, tmp_path):
    sim_pool.set_checksum("sha1")
    ref, _ = sim_pool.vm("odd-size-vm")       # 3 MiB + 128 KiB: a short last chunk
    xvda = sim_pool.vm_disks("odd-size-vm")["xvda"]
    url = "%sexport?session_id=%s&ref=%s" % (sim_pool.url, xapi._session, ref)
    out = tmp_path / "vm.xva"
    r = curl("-o", str(out), url)
    assert r.returncode == 0, r.stderr
    members = tar_members(out.read_bytes())
    assert any(n.endswith(".checksum") for n, _ in members)
    assert not any(n.endswith(".xxhash") for n, _ in members)
    for n, data in members:
        if n.endswith(".checksum"):
            chunk = dict(members)[n[:-9]]
            assert data.decode() == hashlib.sha1(chunk).hexdigest()
    ext = tmp_path / "x"
    ext.mkdir()
    subprocess.run(["tar", "-xf", str(out), "-C", str(ext)], check=True)
    refdir = [d for d in os.listdir(ext) if d.startswith("Ref:")]
    assert len(refdir) == 1
    raw = tmp_path / "disk.raw"
    r = subprocess.run(["xva-img", "disk-export", str(ext / refdir[0]) + "/", str(raw)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    assert r.returncode == 0, r.stdout
    assert hashlib.sha256(raw.read_bytes()).hexdigest() == sim_pool.vdi_content(xvda).sha256()
    # and a corrupted checksum is noticed by xva-img
    chk = sorted((ext / refdir[0]).glob("*.checksum"))[0]
    chk.write_text("0" * 40)
    r = subprocess.run(["xva-img", "disk-export", str(ext / refdir[0]) + "/", str(tmp_path / "bad.raw")],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    assert r.returncode != 0


def test_export_compression_gzip_zstd(sim_pool, xapi, tmp_path):
    ref, _ = sim_pool.vm("db01")
    bodies = {}
    for comp in ("false", "true", "gzip", "zstd"):
        st, hdrs, _, body = request(sim_pool.url, path="/export",
                                    query={"session_id": xapi._session, "ref": ref, "use_compression": comp})
        assert st == 200
        bodies[comp] = body
    assert bodies["true"][:2] == b"\x1f\x8b" and bodies["gzip"][:2] == b"\x1f\x8b"
    assert bodies["zstd"][:4] == b"\x28\xb5\x2f\xfd"
    assert bodies["false"][257:262] == b"ustar" or bodies["false"][:7] == b"ova.xml"
    plain = gzip.decompress(bodies["gzip"])
    zst = subprocess.run(["zstd", "-dc"], input=bodies["zstd"], stdout=subprocess.PIPE, check=True).stdout
    gz_cli = subprocess.run(["gzip", "-dc"], input=bodies["true"], stdout=subprocess.PIPE, check=True).stdout

    def structure(data):   # Ref:N ids come from a global counter, so set them aside
        return sorted((re.sub(r"Ref:\d+", "Ref", n), (hashlib.sha1(d).hexdigest() if d is not None and n != "ova.xml" else None))
                      for n, d in tar_members(data))
    s = structure(bodies["false"])
    assert structure(plain) == s and structure(zst) == s and structure(gz_cli) == s
    # the chunk data is identical once Ref ids are set aside (ids come from a global counter)
    for comp in ("gzip", "zstd", "true"):
        _, disks = xva.parse_xva(io.BytesIO(bodies[comp]))
        assert sorted(d.sha256() for d in disks.values()) == \
            sorted(sim_pool.vdi_content(v).sha256() for v in sim_pool.vm_disks("db01").values())


def test_export_running_vm_refused(sim_pool, xapi):
    x = xapi.xenapi
    ref, _ = sim_pool.vm("web01")
    task = x.task.create("export", "")
    st, hdrs, _, body = request(sim_pool.url, path="/export",
                                query={"session_id": xapi._session, "ref": ref, "task_id": task})
    assert st == 500 and b"VM_BAD_POWER_STATE" in body and b"<html>" in body
    rec = x.task.get_record(task)
    assert rec["status"] == "failure"
    assert rec["error_info"] == ["VM_BAD_POWER_STATE", ref, "halted, suspended", "running"]
    blocked, _ = sim_pool.vm("no-export-vm")
    st, _, _, body = request(sim_pool.url, path="/export", query={"session_id": xapi._session, "ref": blocked})
    assert st == 500 and b"OPERATION_BLOCKED" in body


def test_export_snapshot_and_uuid_and_suspended(sim_pool, xapi):
    x = xapi.xenapi
    ref, _ = sim_pool.vm("web01")
    snap = x.VM.snapshot(ref, "backup")
    uuid = x.VM.get_uuid(snap)
    st, _, _, body = request(sim_pool.url, path="/export", query={"session_id": xapi._session, "uuid": uuid})
    assert st == 200
    ova, disks = xva.parse_xva(io.BytesIO(body))
    vm = [o for o in xva.parse_ova_xml(ova)["objects"] if o["class"] == "VM"][0]["snapshot"]
    assert vm["is_a_snapshot"] is False and vm["is_a_template"] is True   # as xapi: template stays
    assert len(disks) == 2   # the CD is a record, not data
    susp, _ = sim_pool.vm("suspended-vm")
    st, _, _, body = request(sim_pool.url, path="/export",
                             query={"session_id": xapi._session, "ref": susp, "preserve_power_state": "true"})
    assert st == 200
    ova, disks = xva.parse_xva(io.BytesIO(body))
    assert len(disks) == 2   # its disk and the suspend image


def test_export_redirects_to_host_that_sees_local_sr(sim_pool, xapi):
    ref, _ = sim_pool.vm("local-vm")
    q = {"session_id": xapi._session, "ref": ref}
    st, hdrs, _, body = request(sim_pool.url, path="/export", query=q)
    assert st == 302
    b_url = sim_pool.host_urls["xcp-ng-b"]
    loc = urllib.parse.urlsplit(hdrs["location"])
    assert hdrs["connection"] == "close"
    assert "%s://%s/" % (loc.scheme, loc.netloc) == b_url and loc.path == "/export"
    assert urllib.parse.parse_qs(loc.query) == {k: [v] for k, v in q.items()}
    st, _, _, body = request(b_url, path="/export", query=q)
    assert st == 200
    ova, disks = xva.parse_xva(io.BytesIO(body))
    assert len(disks) == 2
    r = curl("-L", "-o", "/dev/null", "-w", "%{http_code} %{num_redirects}", sim_pool.url + "export?" + urllib.parse.urlencode(q))
    assert r.stdout == b"200 1"
    hosts = [h.host for h in sim_pool.calls.requests("/export")]
    assert hosts == ["xcp-ng-a", "xcp-ng-b", "xcp-ng-a", "xcp-ng-b"]
    # raw VDI export of that disk redirects too
    vdi = sim_pool.vm_disks("local-vm")["xvda"]
    st, hdrs, _, _ = request(sim_pool.url, path="/export_raw_vdi",
                             query={"session_id": xapi._session, "vdi": vdi, "format": "raw"})
    assert st == 302 and hdrs["location"].startswith(b_url + "export_raw_vdi?")


def test_export_keepalive_chunks_when_slow(xapi):
    with xapisim.start_pool(pools.simple_pool(vms=[{"name": "v", "disks": [
            {"size": "3M", "blocks": [0, 1, 20, 40]}]}]), keepalive=0.05) as pool:
        s = pool.session()
        ref, _ = pool.vm("v")
        pool.faults.throttle(3 * MIB, path="/export")    # ~1 s for the whole thing
        st, _, _, body = request(pool.url, path="/export", query={"session_id": s._session, "ref": ref})
        assert st == 200
        names = [(n, d) for n, d in tar_members(body)]
        empty = [n for n, d in names if d == b"" and "." not in n]
        assert empty, "expected zero-length keep-alive chunks"
        for n in empty:
            assert dict(names)[n + ".xxhash"] == ("%016X" % xxhash.xxh64(b"").intdigest()).encode()
        _, disks = xva.parse_xva(io.BytesIO(body))
        vdi = pool.vm_disks("v")["xvda"]
        assert list(disks.values())[0].sha256() == pool.vdi_content(vdi).sha256()


def test_export_in_progress_blocks_destroy_and_cancel(sim_pool, xapi):
    x = xapi.xenapi
    ref, _ = sim_pool.vm("web01")
    snap = x.VM.snapshot(ref, "backup")
    x.VM.set_is_a_template(snap, False)
    vdi = [x.VBD.get_VDI(b) for b in x.VM.get_VBDs(snap) if x.VBD.get_type(b) == "Disk"][0]
    task = x.task.create("export", "")
    sim_pool.faults.throttle(256 * 1024, path="/export")
    u = urllib.parse.urlsplit(sim_pool.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("GET", "/export?" + urllib.parse.urlencode({"session_id": xapi._session, "ref": snap,
                                                             "task_id": task}))
    resp = conn.getresponse()
    assert resp.status == 200
    resp.read(1000)
    assert x.VM.get_current_operations(snap) == {task: "export"}
    assert "export" not in x.VM.get_allowed_operations(snap) or True
    assert XenAPIfail(x.VM.destroy, snap) == ["OTHER_OPERATION_IN_PROGRESS", "VM", snap, "export", task]
    assert XenAPIfail(x.VDI.destroy, vdi) == ["VDI_IN_USE", vdi, "destroy"]
    x.task.cancel(task)
    rec = wait_task(x, task)
    assert rec["status"] == "cancelled" and rec["error_info"] == ["TASK_CANCELLED", task]
    resp.read()             # the body just ends
    conn.close()
    assert x.VM.get_current_operations(snap) == {}
    x.VM.destroy(snap)
    x.VDI.destroy(vdi)


def XenAPIfail(fn, *args):
    with pytest.raises(XenAPI.Failure) as e:
        fn(*args)
    return e.value.details


def test_export_client_disconnect_fails_task(sim_pool, xapi):
    x = xapi.xenapi
    ref, _ = sim_pool.vm("db01")
    task = x.task.create("export", "")
    sim_pool.faults.throttle(512 * 1024, path="/export")
    u = urllib.parse.urlsplit(sim_pool.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("GET", "/export?" + urllib.parse.urlencode({"session_id": xapi._session, "ref": ref,
                                                             "task_id": task}))
    resp = conn.getresponse()
    resp.read(4096)
    resp.close()
    conn.close()
    rec = wait_task(x, task)
    assert rec["status"] == "failure" and rec["error_info"][0] == "CLIENT_ERROR"
    assert x.VM.get_current_operations(ref) == {}


# ---------------------------------------------------------------------------
# /export_metadata, /export_raw_vdi
# ---------------------------------------------------------------------------
def test_export_metadata(sim_pool, xapi):
    ref, _ = sim_pool.vm("web01")
    st, hdrs, version, body = request(sim_pool.url, path="/export_metadata",
                                      query={"session_id": xapi._session, "ref": ref})
    assert st == 200 and version == 10 and int(hdrs["content-length"]) == len(body)
    members = tar_members(body)
    assert [n for n, _ in members] == ["ova.xml"]
    ova = xva.parse_ova_xml(members[0][1])
    vms = [o["snapshot"] for o in ova["objects"] if o["class"] == "VM"]
    assert sorted(v["name_label"] for v in vms) == ["web01", "web01 before upgrade"]
    snap = next(v for v in vms if v["is_a_snapshot"])
    assert snap["snapshot_of"].startswith("Ref:")
    live = next(v for v in vms if not v["is_a_snapshot"])
    assert live["power_state"] == "Running"    # metadata export keeps the power state


def test_export_raw_vdi_raw_and_vhd(sim_pool, xapi, tmp_path):
    x = xapi.xenapi
    vdi = sim_pool.vm_disks("db01")["xvda"]
    disk = sim_pool.vdi_content(vdi)
    task = x.task.create("raw", "")
    st, hdrs, version, body = request(sim_pool.url, path="/export_raw_vdi",
                                      query={"session_id": xapi._session, "vdi": vdi, "task_id": task})
    assert st == 200 and version == 11 and "content-length" not in hdrs and hdrs["connection"] == "close"
    assert hdrs["content-type"] == "application/octet-stream"
    assert hdrs["content-disposition"] == 'attachment; filename="%s.raw"' % x.VDI.get_uuid(vdi)
    assert len(body) == disk.virtual_size
    assert hashlib.sha256(body).hexdigest() == disk.sha256()
    assert x.task.get_status(task) == "success"
    # vhd by uuid, checked by qemu-img
    uuid = x.VDI.get_uuid(vdi)
    out = tmp_path / "d.vhd"
    r = curl("-o", str(out), "%sexport_raw_vdi?session_id=%s&vdi=%s&format=VHD" % (sim_pool.url, xapi._session, uuid))
    assert r.returncode == 0
    assert out.read_bytes()[:8] == b"conectix"
    info = subprocess.run(["qemu-img", "info", "--output=json", str(out)], stdout=subprocess.PIPE,
                          check=True).stdout
    assert b'"format": "vpc"' in info
    raw = tmp_path / "back.raw"
    opts = "driver=vpc,force_size_calc=current_size,file.filename=%s" % out
    subprocess.run(["qemu-img", "convert", "--image-opts", opts, "-O", "raw", str(raw)], check=True)
    assert hashlib.sha256(raw.read_bytes()).hexdigest() == disk.sha256()
    (tmp_path / "orig.raw").write_bytes(body)
    r = subprocess.run(["qemu-img", "compare", "--image-opts", opts,
                        "driver=raw,file.filename=%s" % (tmp_path / "orig.raw")],
                       stdout=subprocess.PIPE)
    assert r.returncode == 0, r.stdout
    # unknown format: 404 and the task fails
    task = x.task.create("raw", "")
    st, _, _, _ = request(sim_pool.url, path="/export_raw_vdi",
                          query={"session_id": xapi._session, "vdi": vdi, "format": "qcow9", "task_id": task})
    assert st == 404
    assert x.task.get_record(task)["error_info"] == ["INTERNAL_ERROR", "Unknown format qcow9"]
    st, _, _, body = request(sim_pool.url, path="/export_raw_vdi",
                             query={"session_id": xapi._session, "vdi": "OpaqueRef:nope"})
    assert st == 500 and b"HANDLE_INVALID" in body


def test_export_raw_vdi_ignores_cancel_but_not_a_closed_connection(sim_pool, xapi):
    x = xapi.xenapi
    vdi = sim_pool.vm_disks("db01")["xvda"]
    sim_pool.faults.throttle(8 * MIB, path="/export_raw_vdi")
    task = x.task.create("raw", "")
    u = urllib.parse.urlsplit(sim_pool.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("GET", "/export_raw_vdi?" + urllib.parse.urlencode(
        {"session_id": xapi._session, "vdi": vdi, "task_id": task}))
    resp = conn.getresponse()
    resp.read(65536)
    x.task.cancel(task)
    data = resp.read()
    conn.close()
    assert 65536 + len(data) == 6 * MIB           # cancel not noticed: the whole disk came
    assert wait_task(x, task)["status"] == "success"
    task = x.task.create("raw", "")
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("GET", "/export_raw_vdi?" + urllib.parse.urlencode(
        {"session_id": xapi._session, "vdi": vdi, "task_id": task}))
    resp = conn.getresponse()
    resp.read(65536)
    assert XenAPIfail(x.VDI.destroy, vdi) == ["VDI_IN_USE", vdi, "destroy"]
    resp.close()
    conn.close()
    rec = wait_task(x, task)
    assert rec["status"] == "failure" and rec["error_info"] == ["VDI_IO_ERROR", "Device I/O errors"]


# ---------------------------------------------------------------------------
# /pool/xmldbdump, /host_backup
# ---------------------------------------------------------------------------
def test_xmldbdump_on_master_and_member(sim_pool, xapi):
    x = xapi.xenapi
    task = x.task.create("dump", "")
    st, hdrs, _, body = request(sim_pool.url, path="/pool/xmldbdump",
                                query={"session_id": xapi._session, "task_id": task})
    assert st == 200 and body.startswith(b'<?xml version="1.0" encoding="UTF-8"?><database><manifest>')
    assert b'<table name="VM">' in body and b'name__label="web01"' in body
    import xml.etree.ElementTree as ET
    root = ET.fromstring(body)
    vm_rows = root.find("table[@name='VM']").findall("row")
    assert len(vm_rows) == len(x.VM.get_all())
    assert x.task.get_status(task) == "success"
    task = x.task.create("dump", "")
    st, hdrs, _, body = request(sim_pool.host_urls["xcp-ng-c"], path="/pool/xmldbdump",
                                query={"session_id": xapi._session, "task_id": task})
    assert st == 200 and body == b""
    rec = x.task.get_record(task)
    assert rec["status"] == "failure" and rec["error_info"][0] == "HOST_IS_SLAVE"


def test_host_backup_identifies_the_host_that_answered(sim_pool, xapi):
    x = xapi.xenapi
    seen = {}
    for name, url in sim_pool.host_urls.items():
        st, hdrs, _, body = request(url, path="/host_backup", query={"session_id": xapi._session})
        assert st == 200 and body[:2] == b"\x1f\x8b" and "content-length" not in hdrs
        files = dict(tar_members(body))
        assert files["etc/hostname"].decode().strip() == name
        seen[name] = body
        # deterministic
        assert request(url, path="/host_backup", query={"session_id": xapi._session})[3] == body
        h = x.host.get_by_name_label(name)[0]
        assert ("INSTALLATION_UUID='%s'" % x.host.get_uuid(h)).encode() in files["etc/xensource-inventory"]
    assert len(set(seen.values())) == 3


# ---------------------------------------------------------------------------
# authentication
# ---------------------------------------------------------------------------
def test_http_authentication(sim_pool, xapi):
    ref, _ = sim_pool.vm("db01")
    task = xapi.xenapi.task.create("t", "")
    st, hdrs, _, body = request(sim_pool.url, path="/export",
                                query={"session_id": "OpaqueRef:bad", "ref": ref, "task_id": task})
    assert st == 401 and hdrs["www-authenticate"].startswith("Basic realm=")
    assert xapi.xenapi.task.get_error_info(task)[0] == "SESSION_AUTHENTICATION_FAILED"
    st, *_ = request(sim_pool.url, path="/export_metadata", query={"ref": ref})
    assert st == 401
    st, *_ = request(sim_pool.url, path="/export_metadata", query={"ref": ref},
                     headers={"Cookie": "session_id=%s" % xapi._session})
    assert st == 200
    r = curl("-u", "root:%s" % sim_pool.password, "-o", "/dev/null", "-w", "%{http_code}",
             sim_pool.url + "export_metadata?ref=" + ref)
    assert r.stdout == b"200"
    r = curl("-u", "root:wrong", "-o", "/dev/null", "-w", "%{http_code}",
             sim_pool.url + "export_metadata?ref=" + ref)
    assert r.stdout == b"401"
    # the unix socket needs no session
    r = curl("--unix-socket", sim_pool.socket_path, "-o", "/dev/null", "-w", "%{http_code}",
             "http://localhost/export_metadata?ref=" + ref)
    assert r.stdout == b"200"
    st, *_ = request(sim_pool.url, path="/no_such_handler", query={"session_id": xapi._session})
    assert st == 404


# ---------------------------------------------------------------------------
# /import, /import_raw_vdi
# ---------------------------------------------------------------------------
def _export(pool, session, vm, comp="false"):
    st, _, _, body = request(pool.url, path="/export",
                             query={"session_id": session, "ref": vm, "use_compression": comp})
    assert st == 200
    return body


@pytest.mark.parametrize("comp", ["false", "gzip", "zstd"])
def test_import_roundtrip(sim_pool, xapi, comp):
    x = xapi.xenapi
    ref, rec = sim_pool.vm("db01")
    body = _export(sim_pool, xapi._session, ref, comp)
    orig = {x.VBD.get_userdevice(b): sim_pool.vdi_content(x.VBD.get_VDI(b)).sha256()
            for b in x.VM.get_VBDs(ref) if x.VBD.get_type(b) == "Disk"}
    macs = sorted(x.VIF.get_MAC(v) for v in x.VM.get_VIFs(ref))
    task = x.task.create("import", "")
    local_b = [r for r, s in x.SR.get_all_records().items()
               if s["type"] == "lvm" and sim_pool.host_urls["xcp-ng-a"]
               and x.PBD.get_host(s["PBDs"][0]) == x.pool.get_master(x.pool.get_all()[0])][0]
    st, hdrs, _, resp = request(sim_pool.url, method="PUT", path="/import",
                                query={"session_id": xapi._session, "task_id": task, "sr_id": local_b},
                                body=body, headers={"Content-Length": str(len(body))})
    assert st == 200 and hdrs["task-id"] == task
    assert sim_pool.calls.requests("/import")[0].bytes_received == len(body)
    rec_t = wait_task(x, task)
    assert rec_t["status"] == "success", rec_t["error_info"]
    new = xmlrpc.client.loads("<methodResponse><params><param>%s</param></params></methodResponse>"
                              % rec_t["result"])[0][0]
    assert len(new) == 1
    vm = x.VM.get_record(new[0])
    assert vm["name_label"] == "db01" and vm["uuid"] != rec["uuid"] and vm["power_state"] == "Halted"
    got = {x.VBD.get_userdevice(b): sim_pool.vdi_content(x.VBD.get_VDI(b)).sha256()
           for b in vm["VBDs"] if x.VBD.get_type(b) == "Disk"}
    assert got == orig
    for b in vm["VBDs"]:
        if x.VBD.get_type(b) == "Disk":
            assert x.VDI.get_SR(x.VBD.get_VDI(b)) == local_b
    assert sorted(x.VIF.get_MAC(v) for v in vm["VIFs"]) != macs      # fresh MACs without restore=true
    assert len([b for b in vm["VBDs"] if x.VBD.get_type(b) == "CD"]) == 1


def test_import_restore_keeps_uuid_and_macs(sim_pool, xapi):
    x = xapi.xenapi
    ref, rec = sim_pool.vm("db01")
    body = _export(sim_pool, xapi._session, ref)
    macs = sorted(x.VIF.get_MAC(v) for v in x.VM.get_VIFs(ref))
    # the original still exists: same uuid, not newer -> refused
    task = x.task.create("import", "")
    st, *_ = request(sim_pool.url, method="PUT", path="/import", body=body,
                     query={"session_id": xapi._session, "task_id": task, "restore": "true"})
    assert wait_task(x, task)["error_info"][0] == "VM_TO_IMPORT_IS_NOT_NEWER_VERSION"
    assert x.VM.get_by_uuid(rec["uuid"]) == ref
    disks = list(sim_pool.vm_disks("db01").values())
    x.VM.destroy(ref)
    for v in disks:
        x.VDI.destroy(v)
    task = x.task.create("import", "")
    st, *_ = request(sim_pool.url, method="PUT", path="/import", body=body,
                     query={"session_id": xapi._session, "task_id": task, "restore": "true"})
    assert wait_task(x, task)["status"] == "success"
    new = x.VM.get_by_uuid(rec["uuid"])
    assert sorted(x.VIF.get_MAC(v) for v in x.VM.get_VIFs(new)) == macs


def test_import_errors(sim_pool, xapi):
    x = xapi.xenapi
    ref, _ = sim_pool.vm("db01")
    body = bytearray(_export(sim_pool, xapi._session, ref))
    # corrupt one chunk byte: checksum mismatch fails the task, nothing is left behind
    idx = body.find(b"Ref:", 1024)
    pos = (idx // 512 + 1) * 512 + 10
    body[pos] ^= 0xFF
    before = len(x.VM.get_all())
    task = x.task.create("import", "")
    st, *_ = request(sim_pool.url, method="PUT", path="/import", body=bytes(body),
                     query={"session_id": xapi._session, "task_id": task})
    assert st == 200
    rec = wait_task(x, task)
    assert rec["status"] == "failure"
    assert len(x.VM.get_all()) == before and sim_pool.leftovers()["vdis"] == []
    # chunked transfer encoding is refused
    u = urllib.parse.urlsplit(sim_pool.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("PUT", "/import?session_id=" + xapi._session, body=iter([bytes(body[:1000])]),
                 encode_chunked=True)
    assert conn.getresponse().status == 403
    conn.close()


def test_import_raw_vdi_raw_vhd_chunked(sim_pool, xapi, tmp_path):
    x = xapi.xenapi
    src = sim_pool.vm_disks("db01")["xvda"]
    src_disk = sim_pool.vdi_content(src)
    sr = x.pool.get_default_SR(x.pool.get_all()[0])

    def new_vdi():
        return x.VDI.create({"name_label": "restore", "SR": sr, "virtual_size": str(src_disk.virtual_size),
                             "type": "user", "sharable": False, "read_only": False, "other_config": {},
                             "xenstore_data": {}, "sm_config": {}, "tags": []})
    raw = request(sim_pool.url, path="/export_raw_vdi", query={"session_id": xapi._session, "vdi": src})[3]
    vhd = request(sim_pool.url, path="/export_raw_vdi",
                  query={"session_id": xapi._session, "vdi": src, "format": "vhd"})[3]
    for fmt, body in (("raw", raw), ("vhd", vhd)):
        dst = new_vdi()
        task = x.task.create("import", "")
        st, hdrs, _, _ = request(sim_pool.url, method="PUT", path="/import_raw_vdi", body=body,
                                 query={"session_id": xapi._session, "vdi": dst, "format": fmt, "task_id": task})
        assert st == 200
        assert wait_task(x, task)["status"] == "success"
        assert sim_pool.vdi_content(dst).sha256() == src_disk.sha256()
    # xapi's own chunk framing (12-byte little-endian headers)
    import struct
    dst = new_vdi()
    payload = struct.pack("<QI", 65536, 5) + b"hello" + struct.pack("<QI", 0, 0)
    st, *_ = request(sim_pool.url, method="PUT", path="/import_raw_vdi", body=payload,
                     query={"session_id": xapi._session, "vdi": dst, "format": "raw", "chunked": "true"})
    assert sim_pool.vdi_content(dst).read(65536, 5) == b"hello"
    # curl -T, as a restore script would
    dst = new_vdi()
    f = tmp_path / "disk.raw"
    f.write_bytes(raw)
    r = curl("-T", str(f), "%simport_raw_vdi?session_id=%s&vdi=%s&format=raw" % (sim_pool.url, xapi._session, dst))
    assert r.returncode == 0
    assert sim_pool.vdi_content(dst).sha256() == src_disk.sha256()
    # too large for the VDI: fails
    small = x.VDI.create({"name_label": "small", "SR": sr, "virtual_size": str(MIB), "type": "user",
                          "sharable": False, "read_only": False, "other_config": {}})
    task = x.task.create("import", "")
    request(sim_pool.url, method="PUT", path="/import_raw_vdi", body=raw,
            query={"session_id": xapi._session, "vdi": small, "task_id": task})
    assert wait_task(x, task)["error_info"][0] == "VDI_IO_ERROR"


def put_status_first(url, path, query, body, timeout=5, max_redirects=2):
    """PUT `body` the way xe and vmbackup do, without `Expect: 100-continue`: send the
    request line and headers, read the status line, and send the body only after a 200;
    follow 302s to their Location.  Every socket operation has `timeout`, so a server
    that waits for the body before answering makes this raise socket.timeout instead of
    hanging.  -> [(host URL, status), ...] (the last one 200, its body sent and the
    server's close seen)."""
    hops = []
    target = path + "?" + urllib.parse.urlencode(query)
    for _ in range(max_redirects + 1):
        u = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
        try:
            conn.putrequest("PUT", target, skip_accept_encoding=True)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders()
            # keep the socket: on an answer with "Connection: close" (xapi's 200 and 302
            # both say it) http.client lets go of it, and conn.send() would then open a
            # new connection and send the body there
            sock = conn.sock
            resp = conn.getresponse()
            hops.append((url, resp.status))
            if resp.status == 302:
                assert resp.getheader("Connection") == "close"
                assert resp.read() == b""
                loc = urllib.parse.urlsplit(resp.getheader("Location"))
                url, target = "%s://%s/" % (loc.scheme, loc.netloc), loc.path + "?" + loc.query
                continue
            assert resp.status == 200, hops
            sock.sendall(body)
            assert resp.read() == b""          # the server closes once it has it all
            return hops
        finally:
            conn.close()
    raise AssertionError("too many redirects: %r" % hops)


def test_import_put_redirect_answered_before_the_body(sim_pool, xapi):
    """A host that cannot see the target SR answers a PUT /import or /import_raw_vdi
    with 302 at once, before reading the body, and closes (import.ml, import_raw_vdi.ml).
    A client that waits for the status line before sending (xe, vmbackup) follows the
    Location and uploads there: no deadlock."""
    x = xapi.xenapi
    master_url, b_url = sim_pool.url, sim_pool.host_urls["xcp-ng-b"]
    b_host = [r for r, h in x.host.get_all_records().items() if h["name_label"] == "xcp-ng-b"][0]
    local_b = [r for r, s in x.SR.get_all_records().items()
               if s["name_label"] == "Local storage" and x.PBD.get_host(s["PBDs"][0]) == b_host][0]
    vms_before, vdis_before = set(x.VM.get_all()), set(x.VDI.get_all())
    tasks_before = set(x.task.get_all())

    # /import of an XVA into xcp-ng-b's local SR, sent to the master
    ref, _ = sim_pool.vm("db01")
    xva_body = _export(sim_pool, xapi._session, ref)
    sim_pool.calls.clear()
    task = x.task.create("import", "")
    hops = put_status_first(master_url, "/import", {"session_id": xapi._session, "task_id": task,
                                                    "sr_id": local_b}, xva_body)
    assert hops == [(master_url, 302), (b_url, 200)]
    first, second = sim_pool.calls.requests("/import")
    assert (first.host, first.status, first.bytes_received, first.task) == ("xcp-ng-a", 302, 0, None)
    assert (second.host, second.status, second.bytes_received) == ("xcp-ng-b", 200, len(xva_body))
    rec = wait_task(x, task)
    assert rec["status"] == "success", rec["error_info"]
    new_vm = xmlrpc.client.loads("<methodResponse><params><param>%s</param></params></methodResponse>"
                                 % rec["result"])[0][0][0]
    disks = [x.VBD.get_VDI(b) for b in x.VM.get_VBDs(new_vm) if x.VBD.get_type(b) == "Disk"]
    assert disks and all(x.VDI.get_SR(v) == local_b for v in disks)

    # /import_raw_vdi into an existing VDI on that SR
    raw = b"\x5a" * MIB
    dst = x.VDI.create({"name_label": "restore", "SR": local_b, "virtual_size": str(2 * MIB),
                        "type": "user", "sharable": False, "read_only": False, "other_config": {},
                        "xenstore_data": {}, "sm_config": {}, "tags": []})
    sim_pool.calls.clear()
    task = x.task.create("import", "")
    hops = put_status_first(master_url, "/import_raw_vdi", {"session_id": xapi._session, "vdi": dst,
                                                            "format": "raw", "task_id": task}, raw)
    assert hops == [(master_url, 302), (b_url, 200)]
    assert [(r.host, r.status, r.bytes_received) for r in sim_pool.calls.requests("/import_raw_vdi")] \
        == [("xcp-ng-a", 302, 0), ("xcp-ng-b", 200, len(raw))]
    assert wait_task(x, task)["status"] == "success"
    assert sim_pool.vdi_content(dst).read(0, len(raw)) == raw

    # raw into the SR itself (sr_id, no vdi): the VDI is created once, by xcp-ng-b
    task = x.task.create("import", "")
    hops = put_status_first(master_url, "/import_raw_vdi", {"session_id": xapi._session, "sr_id": local_b,
                                                            "format": "raw", "task_id": task}, raw)
    assert hops == [(master_url, 302), (b_url, 200)]
    rec = wait_task(x, task)
    assert rec["status"] == "success", rec["error_info"]
    created = set(x.VDI.get_all()) - vdis_before - set(disks) - {dst}
    assert [x.VDI.get_name_label(v) for v in created] == ["Imported VDI"]
    made = created.pop()
    assert x.VDI.get_SR(made) == local_b and sim_pool.vdi_content(made).read(0, len(raw)) == raw

    # a client that sends the body without waiting is not left hanging either: it reads
    # the 302 (the body fit in the socket buffers) or meets the close, as from xapi
    u = urllib.parse.urlsplit(master_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
    try:
        conn.request("PUT", "/import?" + urllib.parse.urlencode(
            {"session_id": xapi._session, "sr_id": local_b}), body=xva_body)
        outcome = conn.getresponse().status
    except (BrokenPipeError, ConnectionResetError) as e:
        outcome = type(e).__name__
    finally:
        conn.close()
    assert outcome in (302, "BrokenPipeError", "ConnectionResetError")

    # nothing else was created, and no task was left behind by the 302s
    assert set(x.VM.get_all()) - vms_before == {new_vm}
    assert set(x.task.get_all()) - tasks_before <= set(x.task.get_all_records())
    assert not [t for t, r in x.task.get_all_records().items()
                if t not in tasks_before and r["name_label"] in ("VM.import", "VDI.import")]


# ---------------------------------------------------------------------------
# TLS, call log
# ---------------------------------------------------------------------------
def test_tls_pool():
    with xapisim.start_pool(pools.simple_pool(vms=["a"]), tls=True) as pool:
        assert pool.url.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=pool.cert_path)
        s = XenAPI.Session(pool.url, transport=xmlrpc.client.SafeTransport(context=ctx))
        s.xenapi.login_with_password("root", pool.password)
        ref, _ = pool.vm("a")
        st, hdrs, _, body = request(pool.url, path="/export", query={"session_id": s._session, "ref": ref},
                                    context=ctx)
        assert st == 200 and len(xva.parse_xva(io.BytesIO(body))[1]) == 1
        r = subprocess.run(["curl", "-sS", "--cacert", pool.cert_path, "-o", "/dev/null", "-w", "%{http_code}",
                            "%sexport_raw_vdi?session_id=%s&vdi=%s" % (
                                pool.url, s._session, pool.vm_disks("a")["xvda"])],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert r.returncode == 0 and r.stdout == b"200", r.stderr
        der = ssl.PEM_cert_to_DER_cert(open(pool.cert_path).read())
        assert hashlib.sha256(der).hexdigest().upper() == pool.cert_sha256.replace(":", "")
        s2 = XenAPI.Session(pool.host_urls["host2"], ignore_ssl=True)
        with pytest.raises(XenAPI.Failure) as e:
            s2.xenapi.login_with_password("root", pool.password)
        assert e.value.details == ["HOST_IS_SLAVE", "127.0.0.1"]


def test_http_call_log(sim_pool, xapi):
    ref, _ = sim_pool.vm("db01")
    request(sim_pool.url, path="/export_metadata", query={"session_id": xapi._session, "ref": ref})
    body = _export(sim_pool, xapi._session, ref)
    reqs = sim_pool.calls.http
    assert [(r.method, r.path, r.status) for r in reqs] == [("GET", "/export_metadata", 200),
                                                             ("GET", "/export", 200)]
    assert reqs[1].bytes_sent == len(body) and reqs[1].query["ref"] == ref
    assert reqs[1].host == "xcp-ng-a" and reqs[1].task
