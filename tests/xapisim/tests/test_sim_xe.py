"""The `xe` stand-in (tests/xapisim/xe), run as a subprocess against the
simulator exactly as vmbackup runs real xe: over dom0's unix socket (no -s)
and over TCP with `-s 127.0.0.1 -p PORT --nossl -u root -pwf FILE`."""
import io
import os
import re
import subprocess
import tarfile
import time

import pytest

MODES = ["socket", "tcp"]

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

class Result(object):
    def __init__(self, proc):
        self.rc = proc.returncode
        self.out_bytes = proc.stdout
        self.out = proc.stdout.decode("utf-8", "replace")
        self.err = proc.stderr.decode("utf-8", "replace")

    def __repr__(self):
        return "<xe rc=%s out=%r err=%r>" % (self.rc, self.out[:2000], self.err[:2000])


@pytest.fixture
def pwfile(sim_pool, tmp_path):
    path = tmp_path / "xe-password"
    path.write_text("%s\n%s\n" % (sim_pool.user, sim_pool.password))
    return str(path)


@pytest.fixture
def xe(sim_pool, pwfile, tmp_path):
    """xe(*args, mode="socket"|"tcp", stdin=bytes|None, extra_env=None) -> Result"""
    workdir = tmp_path / "cwd"
    workdir.mkdir()

    def run(*args, mode="socket", stdin=None, extra_env=None, timeout=120):
        cmd = [sim_pool.xe_path] + list(args)
        if mode == "tcp":
            cmd += ["-s", "127.0.0.1", "-p", str(sim_pool.port), "--nossl",
                    "-u", "root", "-pwf", pwfile]
        env = sim_pool.env()
        if extra_env:
            env.update(extra_env)
        proc = subprocess.run(cmd, env=env, cwd=str(workdir), timeout=timeout,
                              stdin=subprocess.DEVNULL if stdin is None else None,
                              input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return Result(proc)
    run.cwd = workdir
    return run


def vm_uuid(sim_pool, name):
    return sim_pool.vm(name)[1]["uuid"]


def ok(res):
    assert res.rc == 0, res
    return res


def minimal_list(text):
    """Split a --minimal line on unescaped commas, undoing the escapes."""
    items, cur, i = [], "", 0
    text = text.rstrip("\n")
    if text == "":
        return []
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur += text[i + 1]
            i += 2
            continue
        if c == ",":
            items.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    items.append(cur)
    return items


def parse_records(text):
    """Parse xe's multi-line records into a list of {field: value}."""
    recs = []
    for block in re.split(r"\n\n\n", text.strip("\n")):
        rec = {}
        last = None
        for line in block.split("\n"):
            m = re.match(r"^\s*(\S+) \((?: RO| RW|MRO|MRW|SRO|SRW)\)(?: \[DEPRECATED\])?\s*: (.*)$", line)
            if m is None:
                # a value with a newline in it (names are printed raw)
                assert last is not None, "bad line %r" % line
                rec[last] += "\n" + line
                continue
            last = m.group(1)
            rec[last] = m.group(2)
        recs.append(rec)
    return recs


def curl(sim_pool, path, query, dest):
    url = "%s%s?%s" % (sim_pool.url.rstrip("/"), path,
                       "&".join("%s=%s" % kv for kv in query.items()))
    subprocess.run(["curl", "-s", "-f", "-L", "-o", str(dest), url], check=True, timeout=120)
    return dest.read_bytes()


def tar_members(data):
    """name -> content for an uncompressed XVA."""
    res = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tf:
        for m in tf:
            f = tf.extractfile(m)
            res[m.name] = f.read() if f is not None else b""
    return res


def xva_disk_hashes(data):
    """Sorted sha256 of the disks an XVA holds (any compression)."""
    from xapisim import xva
    _, disks = xva.parse_xva(io.BytesIO(data))
    return sorted(d.sha256() for d in disks.values())


def vdi_of(xapi, vm_ref):
    """VDI refs of the VM's disks, in userdevice order."""
    vbds = [xapi.xenapi.VBD.get_record(v) for v in xapi.xenapi.VM.get_VBDs(vm_ref)]
    vbds = [v for v in vbds if v["type"] == "Disk" and not v["empty"]]
    vbds.sort(key=lambda v: int(v["userdevice"]))
    return [v["VDI"] for v in vbds]


# ---------------------------------------------------------------------------
# listings and output formats
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_vm_list_format(xe, xapi, mode):
    res = ok(xe("vm-list", mode=mode))
    # records: padded qualifiers, two blank lines after each (cli_printer.ml)
    assert res.out.endswith("\n\n\n")
    first = res.out.split("\n")[:3]
    assert re.match(r"^uuid \( RO\)           : [0-9a-f-]{36}$", first[0]), first
    assert re.match(r"^     name-label \( RW\): ", first[1]), first
    assert re.match(r"^    power-state \( RO\): (halted|running|suspended|paused)$", first[2]), first
    recs = parse_records(res.out)
    want = {r["uuid"]: r for r in xapi.xenapi.VM.get_all_records().values()
            if not r["is_a_template"]}
    assert {r["uuid"] for r in recs} == set(want)
    for r in recs:
        assert list(r) == ["uuid", "name-label", "power-state"]
        assert r["power-state"] == want[r["uuid"]]["power_state"].lower()
    # --minimal prints the first field of the record: the uuid
    res = ok(xe("vm-list", "--minimal", mode=mode))
    assert set(minimal_list(res.out)) == set(want)


def test_vm_list_filters_and_params(xe, xapi, sim_pool):
    res = ok(xe("vm-list", "is-control-domain=false", "is-a-snapshot=false",
                "params=name-label", "--minimal"))
    names = minimal_list(res.out)
    want = [r["name_label"] for r in xapi.xenapi.VM.get_all_records().values()
            if not r["is_a_template"] and not r["is_control_domain"] and not r["is_a_snapshot"]]
    assert sorted(names) == sorted(want)
    assert "dup-vm" in names and names.count("dup-vm") == 2
    # control domains are listed by default
    res = ok(xe("vm-list", "is-control-domain=true", "params=uuid", "--minimal"))
    assert len(minimal_list(res.out)) == 3
    # lowercase power state filter
    res = ok(xe("vm-list", "power-state=running", "is-control-domain=false",
                "params=name-label", "--minimal"))
    assert "web01" in minimal_list(res.out) and "db01" not in minimal_list(res.out)
    # fields print in record order, whatever the order asked for
    res = ok(xe("vm-list", "name-label=db01", "params=power-state,name-label,uuid"))
    assert list(parse_records(res.out)[0]) == ["uuid", "name-label", "power-state"]
    # params=all shows everything; map fields are MRW
    res = ok(xe("vm-list", "name-label=web01", "params=all"))
    assert re.search(r"^\s+other-config \(MRW\): ", res.out, re.M)
    assert re.search(r"^\s+os-version \(MRO\): .*distro: debian", res.out, re.M)
    assert re.search(r"^\s+ha-always-run \( RW\) \[DEPRECATED\]: false$", res.out, re.M)
    # set and map filters
    res = ok(xe("vm-list", "tags:contains=production", "params=name-label", "--minimal"))
    assert minimal_list(res.out) == ["web01"]
    # no match: an empty line
    res = ok(xe("vm-list", "name-label=nothing-like-this", "--minimal"))
    assert res.out == "\n"
    res = ok(xe("vm-list", "name-label=nothing-like-this"))
    assert res.out == ""
    # unknown field
    res = xe("vm-list", "no-such-field=1")
    assert res.rc == 1 and res.err == "Error: Unknown field 'no-such-field'\n"


def test_minimal_escaping(xe, xapi, sim_pool):
    ref, rec = sim_pool.vm("db01")
    xapi.xenapi.VM.set_name_label(ref, "a,b\\c")
    res = ok(xe("vm-list", "uuid=%s" % rec["uuid"], "params=name-label", "--minimal"))
    assert res.out == "a\\,b\\\\c\n"
    assert minimal_list(res.out) == ["a,b\\c"]
    # escaping applies to every item; items joined by plain commas
    xapi.xenapi.VM.set_name_label(sim_pool.vm("PRD-print7")[0], "x,y")
    res = ok(xe("vm-list", "params=name-label", "--minimal"))
    assert "a\\,b\\\\c" in res.out and "x\\,y" in res.out


@pytest.mark.parametrize("mode", MODES)
def test_other_lists(xe, xapi, mode):
    x = xapi.xenapi

    def uuids(cls, pred=lambda r: True):
        return {r["uuid"] for r in getattr(x, cls).get_all_records().values() if pred(r)}

    cases = [
        ("snapshot-list", uuids("VM", lambda r: r["is_a_snapshot"])),
        ("template-list", uuids("VM", lambda r: r["is_a_template"] and not r["is_a_snapshot"])),
        ("host-list", uuids("host")),
        ("sr-list", uuids("SR")),
        ("vdi-list", uuids("VDI")),
        ("vbd-list", uuids("VBD")),
        ("vif-list", uuids("VIF")),
        ("network-list", uuids("network")),
        ("pool-list", uuids("pool")),
    ]
    for cmd, want in cases:
        res = ok(xe(cmd, "--minimal", mode=mode))
        assert set(minimal_list(res.out)) == want, cmd
    res = ok(xe("snapshot-list", mode=mode))
    assert list(parse_records(res.out)[0]) == ["uuid", "name-label", "name-description",
                                               "is-vmss-snapshot"]
    res = ok(xe("vdi-list", "name-label=web01 root", mode=mode))
    rec = parse_records(res.out)[0]
    assert list(rec) == ["uuid", "name-label", "name-description", "sr-uuid",
                         "virtual-size", "sharable", "read-only"]
    assert rec["virtual-size"] == str(8 << 20)
    res = ok(xe("vbd-list", "vm-name-label=web01", "type=Disk", mode=mode))
    recs = parse_records(res.out)
    assert len(recs) == 2 and list(recs[0]) == ["uuid", "vm-uuid", "vm-name-label", "vdi-uuid",
                                                "empty", "device"]
    res = ok(xe("sr-list", "name-label=NFS storage", mode=mode))
    rec = parse_records(res.out)[0]
    assert rec["host"] == "<shared>" and rec["type"] == "nfs"
    res = ok(xe("host-list", "params=name-label,address", mode=mode))
    assert {r["address"] for r in parse_records(res.out)} == {"127.0.0.1", "127.0.0.2", "127.0.0.3"}


@pytest.mark.parametrize("mode", MODES)
def test_param_get_and_set(xe, xapi, sim_pool, mode):
    def xe_m(*a, **kw):
        return xe(*a, mode=mode, **kw)
    ref, rec = sim_pool.vm("web01")
    uuid = rec["uuid"]
    assert ok(xe_m("vm-param-get", "uuid=" + uuid, "param-name=name-label")).out == "web01\n"
    assert ok(xe_m("vm-param-get", "uuid=" + uuid, "param-name=power-state")).out == "running\n"
    res = ok(xe_m("vm-param-get", "uuid=" + uuid, "param-name=os-version", "param-key=distro"))
    assert res.out == "debian\n"
    ok(xe_m("vm-param-set", "uuid=" + uuid, "other-config:backup=daily", "name-description=hello"))
    assert xapi.xenapi.VM.get_other_config(ref)["backup"] == "daily"
    assert xapi.xenapi.VM.get_name_description(ref) == "hello"
    # replacing an existing key: remove then add, as the CLI does
    ok(xe_m("vm-param-set", "uuid=" + uuid, "other-config:backup=weekly"))
    assert xapi.xenapi.VM.get_other_config(ref)["backup"] == "weekly"
    res = ok(xe_m("vm-list", "other-config:backup=weekly", "params=name-label", "--minimal"))
    assert res.out == "web01\n"
    res = ok(xe_m("vm-param-get", "uuid=" + uuid, "param-name=other-config", "param-key=backup"))
    assert res.out == "weekly\n"
    res = xe_m("vm-param-get", "uuid=" + uuid, "param-name=other-config", "param-key=nope")
    assert res.rc == 1 and res.err == "Error: Key nope not found in map\n"
    res = xe_m("vm-param-get", "uuid=" + uuid, "param-name=no-such-param")
    assert res.rc == 1
    assert res.err == "Error code: Missing parameter\nError parameters: no-such-param\n"
    res = xe_m("vm-param-set", "uuid=" + uuid, "power-state=halted")
    assert res.rc == 1 and res.err == "Error: Field 'power-state' is read-only.\n"
    res = xe_m("vm-param-set", "uuid=" + uuid, "is-a-template=maybe")
    assert res.rc == 1
    assert res.err == ("Error: Failed to parse parameter 'is-a-template': "
                       "expecting a boolean (true or false)\n")


# ---------------------------------------------------------------------------
# snapshots, template-param-set, export selection, uninstall
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_snapshot_export_uninstall_cycle(xe, xapi, sim_pool, mode, tmp_path):
    """NAUbackup's vm-export cycle: snapshot, template-param-set, export, uninstall."""
    x = xapi.xenapi
    src_ref, src = sim_pool.vm("web01")
    src_vdis = vdi_of(xapi, src_ref)
    res = ok(xe("vm-snapshot", "uuid=" + src["uuid"], "new-name-label=web01 backup",
                "new-name-description=nightly", mode=mode))
    snap_uuid = res.out.strip()
    assert re.match(r"^[0-9a-f-]{36}$", snap_uuid) and res.out == snap_uuid + "\n"
    snap = x.VM.get_by_uuid(snap_uuid)
    rec = x.VM.get_record(snap)
    assert rec["is_a_snapshot"] and rec["is_a_template"] and rec["snapshot_of"] == src_ref
    assert rec["name_description"] == "nightly"
    assert snap_uuid in minimal_list(ok(xe("snapshot-list", "--minimal", mode=mode)).out)
    # a snapshot that is still a template is not a VM to vm-export / vm-uninstall
    target = tmp_path / "snap.xva"
    res = xe("vm-export", "uuid=" + snap_uuid, "filename=" + str(target), mode=mode)
    assert res.rc == 1 and res.err == "Error: No matching VMs found\n" and not target.exists()
    res = xe("vm-uninstall", "uuid=" + snap_uuid, "force=true", mode=mode)
    assert res.rc == 1 and res.err == "Error: No matching VMs found\n"
    ok(xe("template-param-set", "uuid=" + snap_uuid, "is-a-template=false",
          "ha-always-run=false", mode=mode))
    assert x.VM.get_is_a_template(snap) is False
    res = ok(xe("vm-export", "uuid=" + snap_uuid, "filename=" + str(target), mode=mode))
    assert res.out == "Export succeeded\n" and res.err == ""
    assert oct(os.stat(str(target)).st_mode & 0o777) == "0o600"
    members = tar_members(target.read_bytes())
    assert list(members)[0] == "ova.xml"
    # the snapshot's disk content, as exported
    snap_vdis = vdi_of(xapi, snap)
    content = sim_pool.vdi_content(snap_vdis[0])
    assert content.virtual_size == 8 << 20
    # uninstall: the snapshot and its own disks go, the VM it was taken of stays
    res = ok(xe("vm-uninstall", "uuid=" + snap_uuid, "force=true", mode=mode))
    lines = res.out.split("\n")
    assert lines[0] == "The following items are about to be destroyed"
    assert lines[1] == "VM : %s (web01 backup)" % snap_uuid
    vdi_lines = [ln for ln in lines if ln.startswith("VDI: ")]
    assert len(vdi_lines) == len(snap_vdis)
    assert lines[-2] == "All objects destroyed" and lines[-1] == ""
    assert snap_uuid not in {r["uuid"] for r in x.VM.get_all_records().values()}
    all_vdis = x.VDI.get_all()
    for v in snap_vdis:
        assert v not in all_vdis
    for v in src_vdis:
        assert v in all_vdis
    assert x.VM.get_record(src_ref)["power_state"] == "Running"
    assert sim_pool.leftovers() == {"snapshots": [], "vdis": []}


def test_uninstall_output_and_prompt(xe, xapi, sim_pool):
    x = xapi.xenapi
    src_ref, src = sim_pool.vm("db01")
    snap_uuid = ok(xe("vm-snapshot", "vm=db01", "new-name-label=db01 snap")).out.strip()
    snap = x.VM.get_by_uuid(snap_uuid)
    snap_vdis = vdi_of(xapi, snap)
    expect_vdis = ["VDI: %s (%s) " % (x.VDI.get_uuid(v), x.VDI.get_name_label(v)) for v in snap_vdis]
    # no --force and nothing on stdin: real xe's prompt read hits end of file
    res = xe("snapshot-uninstall", "snapshot-uuid=" + snap_uuid)
    assert res.rc == 1
    assert res.out.split("\n")[:2] == ["The following items are about to be destroyed",
                                       "VM : %s (db01 snap)" % snap_uuid]
    assert res.out.endswith("Type 'yes' to continue\n")
    assert res.err == "Lost connection to the server.\n"
    assert x.VM.get_uuid(snap) == snap_uuid
    res = xe("snapshot-uninstall", "uuid=" + snap_uuid, stdin=b"no\n")
    assert res.rc == 0 and res.out.endswith("Type 'yes' to continue\nAborted (you typed: 'no')\n")
    assert x.VM.get_uuid(snap) == snap_uuid
    res = ok(xe("snapshot-uninstall", "uuid=" + snap_uuid, stdin=b"yes\n"))
    assert res.out.split("\n")[2:2 + len(expect_vdis)] == expect_vdis
    assert res.out.endswith("Type 'yes' to continue\nAll objects destroyed\n")
    assert snap_uuid not in {r["uuid"] for r in x.VM.get_all_records().values()}
    for v in vdi_of(xapi, src_ref):
        assert x.VDI.get_uuid(v)
    assert sim_pool.leftovers() == {"snapshots": [], "vdis": []}
    # a VM that is not a snapshot
    res = xe("snapshot-uninstall", "uuid=" + src["uuid"], "--force")
    assert res.rc == 1
    assert res.err == ("Error: This operation can only be performed on a VM snapshot. "
                       "%s is not a VM snapshot.\n" % src["uuid"])
    res = xe("snapshot-uninstall", "--force")
    assert res.rc == 1 and res.err == "Error: Required parameter not found: snapshot-uuid or uuid.\n"


@pytest.mark.parametrize("mode", MODES)
def test_snapshot_export_to_template_and_import(xe, xapi, sim_pool, tmp_path, mode):
    def xe_m(*a, **kw):
        return xe(*a, mode=mode, **kw)
    x = xapi.xenapi
    snap_uuid = ok(xe_m("vm-snapshot", "vm=web01", "new-name-label=web01 tpl")).out.strip()
    target = tmp_path / "tpl.xva"
    res = ok(xe_m("snapshot-export-to-template", "snapshot-uuid=" + snap_uuid,
                "filename=" + str(target)))
    assert res.out == "Export succeeded\n"
    nfs = [r["uuid"] for r in x.SR.get_all_records().values() if r["name_label"] == "NFS storage"][0]
    res = ok(xe_m("vm-import", "filename=" + str(target), "sr-uuid=" + nfs))
    new_uuid = res.out.strip()
    assert re.match(r"^[0-9a-f-]{36}$", new_uuid)
    new = x.VM.get_by_uuid(new_uuid)
    # an untouched snapshot imports as a template (facts 3.4)
    assert x.VM.get_name_label(new) == "web01 tpl" and x.VM.get_is_a_template(new)
    imported = vdi_of(xapi, new)
    original = vdi_of(xapi, x.VM.get_by_uuid(snap_uuid))
    assert len(imported) == len(original)
    for a, b in zip(imported, original):
        assert sim_pool.vdi_content(a).sha256() == sim_pool.vdi_content(b).sha256()
        assert x.VDI.get_SR(a) == x.SR.get_by_uuid(nfs)
    res = xe_m("snapshot-export-to-template", "snapshot-uuid=" + vm_uuid(sim_pool, "db01"),
             "filename=" + str(tmp_path / "x.xva"))
    assert res.rc == 1 and "is not a VM snapshot." in res.err


@pytest.mark.parametrize("mode", MODES)
def test_vm_export_compression_and_metadata(xe, xapi, sim_pool, tmp_path, mode):
    uuid = vm_uuid(sim_pool, "db01")
    cases = [("true", GZIP_MAGIC, "gzip"), ("gzip", GZIP_MAGIC, "gzip"),
             ("zstd", ZSTD_MAGIC, "zstd"), ("True", b"ova.xml", "false"),
             ("false", b"ova.xml", "false"), (None, b"ova.xml", "false")]
    for i, (compress, magic, sent) in enumerate(cases):
        target = tmp_path / ("e%d.xva" % i)
        args = ["vm-export", "uuid=" + uuid, "filename=" + str(target)]
        if compress is not None:
            args.append("compress=" + compress)
        sim_pool.calls.clear()
        res = ok(xe(*args, mode=mode))
        assert res.out == "Export succeeded\n"
        assert target.read_bytes()[:len(magic)] == magic, compress
        reqs = sim_pool.calls.requests("/export")
        assert len(reqs) == 1 and reqs[0].query["use_compression"] == sent
        assert reqs[0].query["preserve_power_state"] == "false"
        assert reqs[0].query["export_snapshots"] == "false"
        assert reqs[0].query["ref"] == sim_pool.vm("db01")[0]
        assert reqs[0].task and reqs[0].status == 200
    # every form holds the same disks (export ids differ between exports)
    hashes = [xva_disk_hashes((tmp_path / ("e%d.xva" % i)).read_bytes()) for i in range(len(cases))]
    assert all(h == hashes[0] for h in hashes) and len(hashes[0]) == 3
    assert sorted(hashes[0]) == sorted(sim_pool.vdi_content(v).sha256()
                                       for v in vdi_of(xapi, sim_pool.vm("db01")[0]))
    # metadata=true: a tar with only ova.xml, from /export_metadata
    target = tmp_path / "meta.xva"
    sim_pool.calls.clear()
    ok(xe("vm-export", "vm=db01", "metadata=true", "include-snapshots=true",
          "filename=" + str(target), mode=mode))
    assert list(tar_members(target.read_bytes())) == ["ova.xml"]
    req = sim_pool.calls.requests("/export_metadata")[0]
    assert req.query["export_snapshots"] == "true"
    # tasks made for the transfers are gone again
    assert not [t for t in xapi.xenapi.task.get_all_records().values()
                if t["name_label"] == "Export of VM"]


def test_vm_export_equals_handler_output(xe, xapi, sim_pool, tmp_path):
    uuid = vm_uuid(sim_pool, "db01")
    target = tmp_path / "xe.xva"
    ok(xe("vm-export", "uuid=" + uuid, "filename=" + str(target)))
    ref = sim_pool.vm("db01")[0]
    direct = curl(sim_pool, "/export", {"session_id": xapi._session, "ref": ref,
                                        "use_compression": "false"}, tmp_path / "curl.xva")
    assert xva_disk_hashes(target.read_bytes()) == xva_disk_hashes(direct)
    assert list(tar_members(target.read_bytes()))[0] == "ova.xml"


def test_vm_export_to_stdout_and_refusals(xe, xapi, sim_pool, tmp_path):
    uuid = vm_uuid(sim_pool, "db01")
    res = ok(xe("vm-export", "uuid=" + uuid, "filename="))
    assert res.out_bytes[:7] == b"ova.xml" and b"Export succeeded" not in res.out_bytes
    assert "ova.xml" in tar_members(res.out_bytes)
    # an existing file is refused (O_CREAT|O_EXCL) and left as it was
    target = tmp_path / "exists.xva"
    target.write_bytes(b"precious")
    res = xe("vm-export", "uuid=" + uuid, "filename=" + str(target))
    assert res.rc == 1
    assert res.err == 'Operation failed. Error: Sys_error("%s: File exists")\n' % target
    assert target.read_bytes() == b"precious"
    # a running VM cannot be exported
    web = sim_pool.vm("web01")[1]["uuid"]
    res = xe("vm-export", "uuid=" + web, "filename=" + str(tmp_path / "web.xva"))
    assert res.rc == 1
    lines = res.err.split("\n")
    assert lines[0].startswith("You attempted an operation on a VM that was not in an "
                               "appropriate power state")
    assert lines[1] == "vm: %s (web01)" % web
    assert lines[2] == "expected: halted, suspended" and lines[3] == "actual: running"
    # a blocked export
    res = xe("vm-export", "vm=no-export-vm", "filename=" + str(tmp_path / "b.xva"))
    assert res.rc == 1 and res.err.startswith("You attempted an operation that was explicitly blocked")
    # several matches need --multiple
    res = xe("vm-export", "vm=dup-vm", "filename=" + str(tmp_path / "d.xva"))
    assert res.rc == 1
    assert res.err == "Error: Multiple matches VMs found. --multiple required to complete the operation\n"


def test_interrupted_export_leaves_partial_file(xe, sim_pool, tmp_path):
    uuid = vm_uuid(sim_pool, "db01")
    sim_pool.faults.drop_export(after_bytes=100000)
    target = tmp_path / "cut.xva"
    res = xe("vm-export", "uuid=" + uuid, "filename=" + str(target))
    assert res.rc == 1
    assert res.out == ""
    # the task's error, as the CLI server reports it (not "Export succeeded")
    assert res.err.startswith("Error code: ") or res.err.split("\n")[0].endswith(".")
    # real xe leaves what it received in place
    assert 0 < target.stat().st_size <= 100000 + 4096
    assert sim_pool.calls.requests("/export")[0].error


def test_cancelled_export(xe, xapi, sim_pool, tmp_path):
    """task.cancel during a slow export: real xe prints "Export cancelled",
    exits 1 and leaves what it had received."""
    x = xapi.xenapi
    sim_pool.faults.throttle(128 * 1024)
    target = tmp_path / "slow.xva"
    cmd = [sim_pool.xe_path, "vm-export", "vm=db01", "filename=" + str(target)]
    proc = subprocess.Popen(cmd, env=sim_pool.env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        task = None
        deadline = time.time() + 30
        while time.time() < deadline and task is None:
            for ref, t in x.task.get_all_records().items():
                if t["name_label"] == "Export of VM" and float(t["progress"]) >= 0:
                    task = ref
            time.sleep(0.05)
        assert task is not None
        while not target.exists() or target.stat().st_size == 0:
            time.sleep(0.05)
        x.task.cancel(task)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, (out, err)
    assert out == b"" and err == b"Export cancelled\n"
    assert target.stat().st_size > 0
    assert task not in x.task.get_all()


def test_export_redirect_to_member(xe, sim_pool, tmp_path):
    """local-vm's disks are on xcp-ng-b's local SR: the master answers 302 and
    xe fetches from the member's own listener."""
    target = tmp_path / "local.xva"
    res = ok(xe("vm-export", "vm=local-vm", "filename=" + str(target)))
    assert res.out == "Export succeeded\n"
    reqs = sim_pool.calls.requests("/export")
    assert [r.status for r in reqs] == [302, 200]
    assert reqs[1].host == "xcp-ng-b"
    assert "ova.xml" in tar_members(target.read_bytes())


def _local_sr_of(xapi, host_name):
    x = xapi.xenapi
    host = [r for r, h in x.host.get_all_records().items() if h["name_label"] == host_name][0]
    for ref, rec in x.SR.get_all_records().items():
        if rec["name_label"] == "Local storage" and x.PBD.get_host(rec["PBDs"][0]) == host:
            return rec["uuid"]


def test_import_redirect_to_member(xe, xapi, sim_pool, tmp_path):
    """Importing into xcp-ng-b's local SR: the master answers the PUT with 302
    (without reading the body) and xe sends the file to the member."""
    target = tmp_path / "db01.xva"
    ok(xe("vm-export", "vm=db01", "filename=" + str(target)))
    sim_pool.calls.clear()
    res = ok(xe("vm-import", "filename=" + str(target), "sr-uuid=" + _local_sr_of(xapi, "xcp-ng-b"),
                timeout=8))
    assert re.match(r"^[0-9a-f-]{36}\n$", res.out)
    reqs = sim_pool.calls.requests("/import")
    assert [r.status for r in reqs] == [302, 200] and reqs[1].host == "xcp-ng-b"


# ---------------------------------------------------------------------------
# VDI commands
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_vdi_commands(xe, xapi, sim_pool, tmp_path, mode):
    x = xapi.xenapi
    nfs = [r["uuid"] for r in x.SR.get_all_records().values() if r["name_label"] == "NFS storage"][0]
    res = ok(xe("vdi-create", "sr-uuid=" + nfs, "name-label=scratch disk",
                "virtual-size=10MiB", "type=user", mode=mode))
    new_uuid = res.out.strip()
    vdi = x.VDI.get_by_uuid(new_uuid)
    assert int(x.VDI.get_virtual_size(vdi)) == 10 << 20
    ok(xe("vdi-param-set", "uuid=" + new_uuid, "name-label=renamed", "name-description=d",
          "other-config:vmbackup=yes", mode=mode))
    assert x.VDI.get_name_label(vdi) == "renamed"
    assert x.VDI.get_other_config(vdi)["vmbackup"] == "yes"
    assert ok(xe("vdi-param-get", "uuid=" + new_uuid, "param-name=type", mode=mode)).out == "User\n"
    # vdi-import raw, then vdi-export raw / vhd
    raw = bytearray(10 << 20)
    raw[0:5] = b"hello"
    raw[(3 << 20) + 7:(3 << 20) + 12] = b"world"
    src = tmp_path / "in.raw"
    src.write_bytes(bytes(raw))
    ok(xe("vdi-import", "uuid=" + new_uuid, "filename=" + str(src), "format=raw", mode=mode))
    assert sim_pool.vdi_content(new_uuid).read(0, 10 << 20) == bytes(raw)
    dest = tmp_path / "out.raw"
    res = ok(xe("vdi-export", "uuid=" + new_uuid, "filename=" + str(dest), "format=raw", mode=mode))
    assert res.out == ""     # no "succeeded" line for vdi-export
    assert dest.read_bytes() == bytes(raw)
    assert oct(dest.stat().st_mode & 0o777) == "0o600"
    vhd = tmp_path / "out.vhd"
    ok(xe("vdi-export", "uuid=" + new_uuid, "filename=" + str(vhd), "format=vhd", mode=mode))
    assert vhd.read_bytes()[:8] == b"conectix"
    # a snapshot keeps the content when the disk changes
    snap_uuid = ok(xe("vdi-snapshot", "uuid=" + new_uuid, mode=mode)).out.strip()
    sim_pool.write_vdi(new_uuid, 0, b"HELLO")
    assert sim_pool.vdi_content(snap_uuid).read(0, 5) == b"hello"
    # vhd round trip into a fresh VDI
    other = ok(xe("vdi-create", "sr-uuid=" + nfs, "name-label=from vhd",
                  "virtual-size=10485760", mode=mode)).out.strip()
    ok(xe("vdi-import", "uuid=" + other, "filename=" + str(vhd), "format=vhd", mode=mode))
    assert sim_pool.vdi_content(other).sha256() == sim_pool.vdi_content(snap_uuid).sha256()
    # refusals
    res = xe("vdi-export", "uuid=" + new_uuid, "filename=" + str(dest), mode=mode)
    assert res.rc == 1 and res.err == 'Operation failed. Error: Sys_error("%s: File exists")\n' % dest
    res = xe("vdi-import", "uuid=" + new_uuid, "filename=" + str(tmp_path / "missing"), mode=mode)
    assert res.rc == 1
    assert res.err == "Operation failed. Error: file '%s' does not exist\n" % (tmp_path / "missing")
    for u in (snap_uuid, other, new_uuid):
        ok(xe("vdi-destroy", "uuid=" + u, mode=mode))
    assert new_uuid not in {r["uuid"] for r in x.VDI.get_all_records().values()}
    assert not [t for t in x.task.get_all_records().values()
                if t["name_label"] in ("VDI export", "VDI import")]


def test_vdi_export_equals_handler_output(xe, xapi, sim_pool, tmp_path):
    ref = vdi_of(xapi, sim_pool.vm("db01")[0])[0]
    uuid = xapi.xenapi.VDI.get_uuid(ref)
    dest = tmp_path / "xe.raw"
    ok(xe("vdi-export", "uuid=" + uuid, "filename=" + str(dest)))
    direct = curl(sim_pool, "/export_raw_vdi", {"session_id": xapi._session, "vdi": ref,
                                                "format": "raw"}, tmp_path / "curl.raw")
    assert dest.read_bytes() == direct
    assert len(direct) == int(xapi.xenapi.VDI.get_virtual_size(ref))
    req = [r for r in sim_pool.calls.requests("/export_raw_vdi") if "task_id" in r.query][0]
    assert req.query["vdi"] == ref and req.status == 200


@pytest.mark.parametrize("mode", MODES)
def test_vbd_vif_create_and_power(xe, xapi, sim_pool, mode):
    def xe_m(*a, **kw):
        return xe(*a, mode=mode, **kw)
    x = xapi.xenapi
    vm_ref, vm = sim_pool.vm("nodisk-vm")
    nfs = [r["uuid"] for r in x.SR.get_all_records().values() if r["name_label"] == "NFS storage"][0]
    vdi_uuid = ok(xe_m("vdi-create", "sr-uuid=" + nfs, "name-label=nd disk",
                     "virtual-size=1GiB")).out.strip()
    assert int(x.VDI.get_virtual_size(x.VDI.get_by_uuid(vdi_uuid))) == 1 << 30
    vbd_uuid = ok(xe_m("vbd-create", "vm-uuid=" + vm["uuid"], "vdi-uuid=" + vdi_uuid,
                     "device=0", "bootable=true", "mode=RW", "type=Disk")).out.strip()
    vbd = x.VBD.get_record(x.VBD.get_by_uuid(vbd_uuid))
    assert vbd["VM"] == vm_ref and vbd["userdevice"] == "0" and vbd["bootable"] is True
    assert vbd["mode"] == "RW" and vbd["type"] == "Disk"
    res = xe_m("vbd-create", "vm-uuid=" + vm["uuid"], "device=1")
    assert res.rc == 1 and res.err == "Error: Empty VBDs can only be made for type=CD\n"
    net = [r["uuid"] for r in x.network.get_all_records().values() if r["bridge"] == "xenbr1"][0]
    vif_uuid = ok(xe_m("vif-create", "vm-uuid=" + vm["uuid"], "network-uuid=" + net,
                     "device=1")).out.strip()
    vif = x.VIF.get_record(x.VIF.get_by_uuid(vif_uuid))
    assert vif["VM"] == vm_ref and vif["device"] == "1" and vif["MTU"] == "9000"
    ok(xe_m("vm-start", "uuid=" + vm["uuid"]))
    assert x.VM.get_power_state(vm_ref) == "Running"
    res = xe_m("vm-start", "uuid=" + vm["uuid"])
    assert res.rc == 1 and res.err.startswith("You attempted an operation on a VM that was not")
    ok(xe_m("vm-shutdown", "uuid=" + vm["uuid"]))
    assert x.VM.get_power_state(vm_ref) == "Halted"
    ok(xe_m("vm-start", "vm=nodisk-vm"))
    ok(xe_m("vm-shutdown", "vm=nodisk-vm", "--force"))
    assert x.VM.get_power_state(vm_ref) == "Halted"
    assert sim_pool.calls.count("Async.VM.hard_shutdown") == 1
    assert sim_pool.calls.count("Async.VM.clean_shutdown") == 1


# ---------------------------------------------------------------------------
# pool database and host backups
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_pool_dump_database(xe, sim_pool, tmp_path, mode):
    dest = tmp_path / "pool.db"
    res = ok(xe("pool-dump-database", "file-name=" + str(dest), mode=mode))
    assert res.out == ""
    data = dest.read_bytes()
    assert b"<database" in data and b"<table" in data
    req = sim_pool.calls.requests("/pool/xmldbdump")[-1]
    assert req.host == "xcp-ng-a" and req.status == 200 and req.transport == "tcp"


@pytest.mark.parametrize("mode", MODES)
def test_host_backup_goes_to_named_host(xe, xapi, sim_pool, tmp_path, mode):
    x = xapi.xenapi
    hosts = {r["name_label"]: r for r in x.host.get_all_records().values()}
    for name, by in (("xcp-ng-b", "name"), ("xcp-ng-c", "uuid"), ("xcp-ng-a", "name")):
        sim_pool.calls.clear()
        dest = tmp_path / ("%s-%s.tgz" % (name, mode))
        sel = name if by == "name" else hosts[name]["uuid"]
        res = ok(xe("host-backup", "host=" + sel, "file-name=" + str(dest), mode=mode))
        assert res.out == ""
        reqs = sim_pool.calls.requests("/host_backup")
        assert len(reqs) == 1 and reqs[0].host == name and reqs[0].status == 200
        assert dest.read_bytes()[:2] == GZIP_MAGIC
        direct = tmp_path / ("%s-%s.curl" % (name, mode))
        url_host = sim_pool.host_urls[name].rstrip("/")
        subprocess.run(["curl", "-s", "-f", "-o", str(direct),
                        "%s/host_backup?session_id=%s" % (url_host, xapi._session)],
                       check=True, timeout=60)
        assert direct.read_bytes() == dest.read_bytes()
    res = xe("host-backup", "host=no-such-host", "file-name=" + str(tmp_path / "n.tgz"))
    assert res.rc == 1 and res.err == "Error: No matching hosts found\n"
    res = xe("host-backup", "file-name=" + str(tmp_path / "all.tgz"))
    assert res.rc == 1 and res.err.startswith("Error: Multiple matching hosts found.")


# ---------------------------------------------------------------------------
# errors, connection options
# ---------------------------------------------------------------------------

def test_usage_errors(xe):
    res = xe("no-such-command")
    assert res.rc == 1 and res.err == "Unknown command: no-such-command\nFor usage run: 'xe help'\n"
    res = xe("vdi-export", "uuid=x")
    assert res.rc == 1
    assert res.err == "Required parameter not found: filename\nFor usage run: 'xe help'\n"
    res = ok(xe("help", "vm-export"))
    assert "reqd params     : filename" in res.out
    res = ok(xe("help"))
    assert "vm-export" in res.out


@pytest.mark.parametrize("mode", MODES)
def test_api_errors(xe, sim_pool, tmp_path, mode):
    bogus = "00000000-0000-0000-0000-000000000000"
    res = xe("vdi-export", "uuid=" + bogus, "filename=" + str(tmp_path / "x"), mode=mode)
    assert res.rc == 1
    assert res.err == "The uuid you supplied was invalid.\ntype: VDI\nuuid: %s\n" % bogus
    assert not (tmp_path / "x").exists()
    res = xe("vm-param-get", "uuid=" + bogus, "param-name=uuid", mode=mode)
    assert res.rc == 1 and res.err == "The uuid you supplied was invalid.\ntype: VM\nuuid: %s\n" % bogus
    res = xe("vm-export", "uuid=" + bogus, "filename=" + str(tmp_path / "y"), mode=mode)
    assert res.rc == 1 and res.err == "Error: No matching VMs found\n"
    res = xe("vm-snapshot-with-quiesce", "vm=db01", "new-name-label=q", mode=mode)
    assert res.rc == 1 and res.err == "This function is no longer available.\n"
    sim_pool.faults.fail("VM.snapshot", "SR_BACKEND_FAILURE_44", "",
                         "There is insufficient space", "")
    res = xe("vm-snapshot", "vm=db01", "new-name-label=s", mode=mode)
    assert res.rc == 1
    assert res.err == ("Error code: SR_BACKEND_FAILURE_44\n"
                       "Error parameters: , There is insufficient space, \n")
    # refs in error parameters are shown as "uuid (name-label)" (Cli_util.ref_convert)
    session = sim_pool.session()
    x = session.xenapi
    vdi_ref = vdi_of(session, sim_pool.vm("db01")[0])[0]
    vdi = x.VDI.get_record(vdi_ref)
    sim_pool.faults.fail("VDI.destroy", "VDI_IN_USE", vdi_ref, "destroy")
    res = xe("vdi-destroy", "uuid=" + vdi["uuid"], mode=mode)
    assert res.rc == 1
    assert res.err == ("This operation cannot be performed because this VDI is in use by some "
                       "other operation\nvdi: %s (%s)\noperation: destroy\n"
                       % (vdi["uuid"], vdi["name_label"]))
    # more parameters than the datamodel declares: "<extra>:" lines
    vm_ref, vm = sim_pool.vm("db01")
    sim_pool.faults.fail("VM.snapshot", "OTHER_OPERATION_IN_PROGRESS", "VM", vm_ref, "export",
                         "OpaqueRef:00000000-1111-2222-3333-444444444444")
    res = xe("vm-snapshot", "vm=db01", "new-name-label=s", mode=mode)
    assert res.rc == 1
    assert res.err == ("Another operation involving the object is currently in progress\n"
                       "class: VM\nobject: %s (db01)\n<extra>: export\n"
                       "<extra>: OpaqueRef:00000000-1111-2222-3333-444444444444\n" % vm["uuid"])


def test_wrong_password_and_slave(xe, sim_pool, tmp_path):
    bad = tmp_path / "bad-pw"
    bad.write_text("root\nwrong\n")
    t0 = time.time()
    res = xe("vm-list", "-s", "127.0.0.1", "-p", str(sim_pool.port), "--nossl", "-pwf", str(bad))
    assert res.rc == 1 and res.out == ""
    assert res.err == "Authentication failed\nFor usage run: 'xe help'\n"
    res = xe("-s", "127.0.0.1", "-p", str(sim_pool.port), "--nossl", "-u", "root", "-pw",
             "wrong", "vm-list")
    assert res.rc == 1 and res.err == "Authentication failed\nFor usage run: 'xe help'\n"
    # key=value forms of the connection options
    res = ok(xe("vm-list", "server=127.0.0.1", "port=%d" % sim_pool.port, "nossl=true",
                "username=root", "password=" + sim_pool.password, "--minimal"))
    assert res.out.strip()
    # the unix socket is pre-authenticated
    res = ok(xe("vm-list", "-pw", "anything", "--minimal"))
    assert res.out.strip()
    # a member answers HOST_IS_SLAVE; real xe reports it, it does not redirect
    res = xe("-s", "127.0.0.2", "-p", str(sim_pool.port), "--nossl", "-u", "root", "-pw",
             sim_pool.password, "vm-list")
    assert res.rc == 1
    assert res.err == ("You cannot make regular API calls directly on a slave. Please pass API "
                       "calls via the master host.\nMaster IP address: 127.0.0.1\n")
    # password file with one line: real xe wants the user name first
    one = tmp_path / "one-line"
    one.write_text(sim_pool.password + "\n")
    res = xe("-s", "127.0.0.1", "-p", str(sim_pool.port), "--nossl", "-pwf", str(one), "vm-list")
    assert res.rc == 1
    assert res.err == ("Error: password file format: expecting username on the first line, "
                       "password on the second line\n")
    # nothing listening
    res = xe("-s", "127.0.0.1", "-p", "1", "--nossl", "-pw", "x", "vm-list")
    assert res.rc == 1 and res.err == "Error: Connection refused (calling connect )\n"
    assert time.time() - t0 < 60


def test_names_pass_through_untouched(xe, xapi, sim_pool, tmp_path):
    """Shell metacharacters, quotes, newlines and unicode are data, never code."""
    x = xapi.xenapi
    names = ["$(touch pwned)", "`touch pwned2` ; echo x && rm -rf nothing | cat > /dev/null &",
             "quote's \"double\"", "new\nline", "ünïcødé VM 日本語 ✓", "my VM with spaces",
             "-rf", "../../etc"]
    for name in names:
        ref, rec = sim_pool.vm(name)
        res = ok(xe("vm-list", "name-label=" + name, "params=uuid", "--minimal"))
        assert res.out == rec["uuid"] + "\n", name
        res = ok(xe("vm-param-get", "uuid=" + rec["uuid"], "param-name=name-label"))
        assert res.out == name + "\n"
        new = "snap of " + name
        snap_uuid = ok(xe("vm-snapshot", "vm=" + name, "new-name-label=" + new)).out.strip() \
            if '\\' not in name else None
        if snap_uuid:
            assert x.VM.get_name_label(x.VM.get_by_uuid(snap_uuid)) == new
            ok(xe("snapshot-uninstall", "uuid=" + snap_uuid, "--force"))
    ref = vdi_of(xapi, sim_pool.vm("db01")[0])[0]
    uuid = x.VDI.get_uuid(ref)
    for label in ["$(touch pwned3)", "a\nb", "x'y\"z`w`", "😀 disque"]:
        ok(xe("vdi-param-set", "uuid=" + uuid, "name-label=" + label))
        assert x.VDI.get_name_label(ref) == label
        assert ok(xe("vdi-param-get", "uuid=" + uuid, "param-name=name-label")).out == label + "\n"
    # file names too
    odd = tmp_path / "$(touch pwned4) 'q' ü.raw"
    ok(xe("vdi-export", "uuid=" + uuid, "filename=" + str(odd)))
    assert odd.stat().st_size == int(x.VDI.get_virtual_size(ref))
    for d in (xe.cwd, tmp_path, os.getcwd()):
        for p in ("pwned", "pwned2", "pwned3", "pwned4"):
            assert not os.path.exists(os.path.join(str(d), p))
    assert sim_pool.leftovers() == {"snapshots": [], "vdis": []}


def test_tls_pool(tmp_path):
    """Without --nossl xe speaks HTTPS (certificate not checked, as real xe's
    stunnel does not); socket sessions reach other hosts over TLS too."""
    import xapisim
    with xapisim.start_pool(xapisim.pools.simple_pool(vms=["a", "b"]), tls=True) as pool:
        env = pool.env()
        tcp = ["-s", "127.0.0.1", "-p", str(pool.port), "-u", "root", "-pw", pool.password]

        def run(*args):
            proc = subprocess.run([pool.xe_path] + list(args), env=env, cwd=str(tmp_path),
                                  stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
            return Result(proc)
        res = ok(run("vm-list", "is-control-domain=false", "params=name-label", "--minimal", *tcp))
        assert sorted(minimal_list(res.out)) == ["a", "b"]
        target = tmp_path / "a.xva"
        assert ok(run("vm-export", "vm=a", "filename=" + str(target), *tcp)).out == "Export succeeded\n"
        assert list(tar_members(target.read_bytes()))[0] == "ova.xml"
        dump = tmp_path / "db.xml"
        ok(run("pool-dump-database", "file-name=" + str(dump)))
        assert b"<database" in dump.read_bytes()
        backup = tmp_path / "h2.tgz"
        ok(run("host-backup", "host=host2", "file-name=" + str(backup), *tcp))
        assert [r.host for r in pool.calls.requests("/host_backup")] == ["host2"]
        res = run("vm-list", "--nossl", *tcp)
        assert res.rc == 1
        assert res.err == "Unable to contact server. Please check server and port settings.\n"


def test_vm_uninstall_takes_snapshots_along(xe, xapi, sim_pool):
    """vm-uninstall of a VM: the VM and all its snapshots, with the disks whose
    VBD other_config has an `owner` key; a running VM is hard-shut-down first."""
    x = xapi.xenapi
    ref, rec = sim_pool.vm("web01")
    snaps = x.VM.get_snapshots(ref)
    assert snaps
    owned = {}
    for vm in [ref] + snaps:
        owned[vm] = [x.VBD.get_VDI(b) for b in x.VM.get_VBDs(vm)
                     if "owner" in x.VBD.get_other_config(b)]
    kept = [x.VBD.get_VDI(b) for b in x.VM.get_VBDs(ref)
            if "owner" not in x.VBD.get_other_config(b) and x.VBD.get_VDI(b) != "OpaqueRef:NULL"]
    expect = ["The following items are about to be destroyed"]
    for vm in [ref] + snaps:
        expect.append("VM : %s (%s)" % (x.VM.get_uuid(vm), x.VM.get_name_label(vm))
                      if vm != ref else "VM : %s (web01)" % rec["uuid"])
        for v in owned[vm]:
            vr = x.VDI.get_record(v)
            warn = " ** WARNING: disk is shared by other VMs" if len(vr["VBDs"]) > 1 else ""
            expect.append("VDI: %s (%s) %s" % (vr["uuid"], vr["name_label"], warn))
    expect += ["All objects destroyed", ""]
    res = ok(xe("vm-uninstall", "vm=web01", "--force"))
    assert res.out.split("\n") == expect
    assert sim_pool.calls.count("VM.hard_shutdown") == 1
    left = x.VM.get_all()
    assert ref not in left and not [s for s in snaps if s in left]
    vdis = x.VDI.get_all()
    for vs in owned.values():
        assert not [v for v in vs if v in vdis]
    for v in kept:
        assert v in vdis


# ---------------------------------------------------------------------------
# CBT commands and differencing exports
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_cbt_commands_and_differencing_export(xe, xapi, sim_pool, mode, tmp_path):
    from xapisim import cbt, vhd
    x = xapi.xenapi
    vdi = sim_pool.vm_disks("db01")["xvda"]
    uuid = x.VDI.get_uuid(vdi)

    def xe_m(*a):
        return xe(*a, mode=mode)
    assert ok(xe_m("vdi-param-get", "uuid=" + uuid, "param-name=cbt-enabled")).out == "false\n"
    assert ok(xe_m("vdi-enable-cbt", "uuid=" + uuid)).out == ""
    assert ok(xe_m("vdi-param-get", "uuid=" + uuid, "param-name=cbt-enabled")).out == "true\n"
    s1 = ok(xe_m("vdi-snapshot", "uuid=" + uuid)).out.strip()
    sim_pool.write_vdi(vdi, 5 * 65536, b"xe")
    sim_pool.write_vdi(vdi, 70 * 65536, b"xe")
    s2 = ok(xe_m("vdi-snapshot", "uuid=" + uuid)).out.strip()
    res = ok(xe_m("vdi-list-changed-blocks", "vdi-from-uuid=" + s1, "vdi-to-uuid=" + s2))
    assert res.out == x.VDI.list_changed_blocks(x.VDI.get_by_uuid(s1), x.VDI.get_by_uuid(s2)) + "\n"
    assert cbt.decode_bitmap(res.out.strip()) == {5, 70}
    # the older one second: the SM error, as xe prints errors that have no doc sentence
    res = xe_m("vdi-list-changed-blocks", "vdi-from-uuid=" + s2, "vdi-to-uuid=" + s1)
    assert res.rc == 1 and res.err == (
        "Error code: SR_BACKEND_FAILURE_460\nError parameters: , Failed to calculate changed "
        "blocks for given VDIs. [opterr=Source and target VDI are unrelated], \n")
    res = xe_m("vdi-list-changed-blocks", "vdi-from-uuid=" + s1)
    assert res.rc == 1 and "vdi-to-uuid" in res.err
    # differencing export, base= a uuid as xe passes it
    out = tmp_path / ("d-%s.vhd" % mode)
    ok(xe_m("vdi-export", "uuid=" + s2, "filename=" + str(out), "format=vhd", "base=" + s1))
    data = out.read_bytes()
    assert vhd.parse_footer(data[:512])["disk_type"] == vhd.DISK_DIFFERENCING
    bat = [v for v in __import__("struct").unpack_from(">3I", data, 2048)]
    assert [i for i, v in enumerate(bat) if v != 0xFFFFFFFF] == [0, 2]
    got = vhd.parse_vhd(io.BytesIO(data), base=sim_pool.vdi_content(s1))
    assert got == sim_pool.vdi_content(s2)
    # data-destroy: a snapshot whose VBDs are gone (a VDI snapshot has none)
    assert ok(xe_m("vdi-data-destroy", "uuid=" + s1)).out == ""
    assert ok(xe_m("vdi-param-get", "uuid=" + s1, "param-name=type")).out == "CBT metadata\n"
    res = xe_m("vdi-data-destroy", "uuid=" + uuid)
    assert res.rc == 1 and res.err.startswith("You attempted an operation that was not allowed.\n")
    plain = x.VDI.snapshot(sim_pool.vm_disks("db01")["xvdb"], {})
    res = xe_m("vdi-data-destroy", "uuid=" + x.VDI.get_uuid(plain))
    assert res.rc == 1 and res.err.startswith(
        "The requested operation is not allowed because the specified VDI does not have changed "
        "block tracking metadata.\nvdi: %s" % x.VDI.get_uuid(plain))
    assert ok(xe_m("vdi-disable-cbt", "uuid=" + uuid)).out == ""
    assert ok(xe_m("vdi-param-get", "uuid=" + uuid, "param-name=cbt-enabled")).out == "false\n"
    res = ok(xe_m("help", "vdi-list-changed-blocks"))
    assert "vdi-from-uuid, vdi-to-uuid" in res.out
