"""Changed Block Tracking and differencing exports, through the real XenAPI
client and real sockets; differencing VHDs are read by libvhdi."""
import base64
import http.client
import os
import struct
import subprocess
import textwrap
import urllib.parse

import pytest
import XenAPI

import xapisim
from xapisim import cbt, pools, vhd

KiB, MiB = 1 << 10, 1 << 20
B = 64 * KiB


def failure(fn, *args):
    with pytest.raises(XenAPI.Failure) as e:
        fn(*args)
    return e.value.details


def bits(text):
    return cbt.decode_bitmap(text)


def blocks_of(offset, length):
    return set(range(offset // B, (offset + length - 1) // B + 1))


def cbt_pool(**extra):
    """A small pool: one halted VM ``h`` (6 MiB disk, 3 blocks), one running VM
    ``r``, a second halted VM ``other``; extra description keys on top."""
    desc = pools.simple_pool(vms=[
        {"name": "h", "disks": [{"size": "6M", "blocks": [0, 17, 90]}, {"size": "3M", "blocks": [1]}]},
        {"name": "r", "power_state": "Running", "disks": [{"size": "4M", "blocks": [0, 9]}]},
        {"name": "other", "disks": [{"size": "4M", "blocks": [2]}]},
    ], **{k: v for k, v in extra.items() if k == "release"})
    desc.update({k: v for k, v in extra.items() if k != "release"})
    return xapisim.start_pool(desc)


@pytest.fixture
def pool():
    p = cbt_pool()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def x(pool):
    return pool.session().xenapi


def disk(pool, name, dev="xvda"):
    return pool.vm_disks(name)[dev]


# ---------------------------------------------------------------------------
# enable / disable / the field
# ---------------------------------------------------------------------------
def test_enable_disable_and_field(pool, x):
    vdi = disk(pool, "h")
    assert x.VDI.get_cbt_enabled(vdi) is False
    assert x.VDI.get_record(vdi)["cbt_enabled"] is False
    x.VDI.enable_cbt(vdi)
    x.VDI.enable_cbt(vdi)                      # idempotent
    assert x.VDI.get_cbt_enabled(vdi) is True
    assert x.VDI.get_record(vdi)["cbt_enabled"] is True
    snap = x.VDI.snapshot(vdi, {})
    assert x.VDI.get_cbt_enabled(snap) is True  # the snapshot carries the log
    x.VDI.disable_cbt(vdi)
    x.VDI.disable_cbt(vdi)
    assert x.VDI.get_cbt_enabled(vdi) is False
    assert x.VDI.get_cbt_enabled(snap) is True
    # Async works too
    task = x.Async.VDI.enable_cbt(vdi)
    while x.task.get_status(task) == "pending":
        pass
    assert x.task.get_status(task) == "success" and x.VDI.get_cbt_enabled(vdi)


def test_enable_refusals(pool, x):
    vdi = disk(pool, "h")
    x.VDI.enable_cbt(vdi)
    snap = x.VDI.snapshot(vdi, {})
    assert failure(x.VDI.enable_cbt, snap) == ["OPERATION_NOT_ALLOWED", "VDI is a snapshot: %s" % snap]
    assert failure(x.VDI.disable_cbt, snap) == ["OPERATION_NOT_ALLOWED", "VDI is a snapshot: %s" % snap]
    iso = [r for r, v in x.VDI.get_all_records().items() if v["name_label"].endswith(".iso")][0]
    sr = x.VDI.get_SR(iso)
    assert failure(x.VDI.enable_cbt, iso) == ["SR_OPERATION_NOT_SUPPORTED", sr]
    sr0 = x.VDI.get_SR(vdi)
    susp = x.VDI.create({"SR": sr0, "virtual_size": str(MiB), "type": "suspend", "name_label": "s"})
    assert failure(x.VDI.enable_cbt, susp) == ["VDI_INCOMPATIBLE_TYPE", susp, "Suspend"]
    x.VDI.set_on_boot(vdi, "reset")
    x.VDI.disable_cbt(disk(pool, "other"))     # on a VDI without CBT: nothing to do
    assert failure(x.VDI.disable_cbt, vdi) == ["VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION"]


def test_licence_restriction_for_unlicensed_xenserver():
    with cbt_pool(release="xenserver-8", restrictions={"restrict_cbt": "true"}) as p:
        x = p.session().xenapi
        vdi = disk(p, "h")
        assert x.pool.get_restrictions(x.pool.get_all()[0])["restrict_cbt"] == "true"
        assert failure(x.VDI.enable_cbt, vdi) == ["LICENCE_RESTRICTION", "CBT"]
        assert x.VDI.get_cbt_enabled(vdi) is False
        x.VDI.disable_cbt(vdi)                 # not licence-gated


@pytest.mark.parametrize("method,nargs", [
    ("enable_cbt", 1), ("disable_cbt", 1), ("get_cbt_enabled", 1), ("data_destroy", 1),
    ("list_changed_blocks", 2)])
def test_before_xenserver_7_3_cbt_messages_are_unknown(method, nargs):
    with cbt_pool(release="xenserver-7.1") as p:
        x = p.session().xenapi
        vdi = disk(p, "h")
        fn = getattr(x.VDI, method)
        assert failure(fn, *([vdi] * nargs)) == ["MESSAGE_METHOD_UNKNOWN", "VDI." + method]


# ---------------------------------------------------------------------------
# list_changed_blocks
# ---------------------------------------------------------------------------
WRITES = [(0, 10), (3 * B - 5, 10), (40 * B, 70000), (95 * B + 100, 200)]


def test_bitmap_agrees_with_written_blocks(pool, x):
    vdi = disk(pool, "h")                      # 6 MiB = 96 blocks = 12 bytes
    x.VDI.enable_cbt(vdi)
    s1 = x.VDI.snapshot(vdi, {})
    expect = set()
    for off, n in WRITES:
        pool.write_vdi(vdi, off, os.urandom(n))
        expect |= blocks_of(off, n)
    s2 = x.VDI.snapshot(vdi, {})
    text = x.VDI.list_changed_blocks(s1, s2)
    raw = base64.b64decode(text)
    assert len(raw) == 12
    assert bits(text) == expect == {0, 2, 3, 40, 41, 95}
    # most significant bit first: block 0 is 0x80 of byte 0, 95 is 0x01 of byte 11
    assert raw[0] == 0x80 | 0x20 | 0x10 and raw[5] == 0x80 | 0x40 and raw[11] == 0x01
    # the live VDI as vdi_to (the VM is halted): writes since s2 only
    pool.write_vdi(vdi, 60 * B, b"z")
    assert bits(x.VDI.list_changed_blocks(s2, vdi)) == {60}
    assert bits(x.VDI.list_changed_blocks(s1, vdi)) == expect | {60}
    # nothing written: an all-zero bitmap of the right size
    s3 = x.VDI.snapshot(vdi, {})
    assert base64.b64decode(x.VDI.list_changed_blocks(s3, vdi)) == bytes(12)


def test_bitmap_size_of_an_odd_sized_disk():
    size = 5 * MiB + 3 * B + 1000                # 84 blocks (the last one partial) -> 11 bytes
    desc = pools.simple_pool(vms=[{"name": "odd", "disks": [{"size": size, "blocks": [0]}]}])
    with xapisim.start_pool(desc) as p:
        x = p.session().xenapi
        vdi = disk(p, "odd")
        x.VDI.enable_cbt(vdi)
        s1 = x.VDI.snapshot(vdi, {})
        p.write_vdi(vdi, size - 1, b"\x01")
        raw = base64.b64decode(x.VDI.list_changed_blocks(s1, x.VDI.snapshot(vdi, {})))
        assert len(raw) == 11 and bits(base64.b64encode(raw)) == {83}


def test_chain_of_snapshots_and_destroying_one_in_the_middle(pool, x):
    vdi = disk(pool, "h")
    x.VDI.enable_cbt(vdi)
    s1 = x.VDI.snapshot(vdi, {})
    pool.write_vdi(vdi, 5 * B, b"1")
    s2 = x.VDI.snapshot(vdi, {})
    pool.write_vdi(vdi, 7 * B, b"2")
    s3 = x.VDI.snapshot(vdi, {})
    assert bits(x.VDI.list_changed_blocks(s1, s2)) == {5}
    assert bits(x.VDI.list_changed_blocks(s2, s3)) == {7}
    assert bits(x.VDI.list_changed_blocks(s1, s3)) == {5, 7}
    x.VDI.destroy(s2)                          # its log is coalesced into s3's
    assert bits(x.VDI.list_changed_blocks(s1, s3)) == {5, 7}
    # a VM snapshot carries the log too
    vm, _ = pool.vm("h")
    snapvm = x.VM.snapshot(vm, "s4")
    s4 = [x.VBD.get_VDI(b) for b in x.VM.get_VBDs(snapvm) if x.VBD.get_userdevice(b) == "0"][0]
    pool.write_vdi(vdi, 9 * B, b"3")
    assert bits(x.VDI.list_changed_blocks(s3, s4)) == set()
    assert bits(x.VDI.list_changed_blocks(s4, vdi)) == {9}
    # a clone is not part of the chain
    clone = x.VDI.clone(vdi, {})
    assert x.VDI.get_cbt_enabled(clone) is False
    assert bits(x.VDI.list_changed_blocks(s4, vdi)) == {9}


def test_unrelated_same_and_reversed_vdis_fail_460(pool, x):
    vdi, other = disk(pool, "h"), disk(pool, "other")
    x.VDI.enable_cbt(vdi)
    x.VDI.enable_cbt(other)
    s1 = x.VDI.snapshot(vdi, {})
    s2 = x.VDI.snapshot(vdi, {})
    o1 = x.VDI.snapshot(other, {})
    unrelated = ["SR_BACKEND_FAILURE_460", "",
                 "Failed to calculate changed blocks for given VDIs. "
                 "[opterr=Source and target VDI are unrelated]", ""]
    assert failure(x.VDI.list_changed_blocks, s1, o1) == unrelated
    assert failure(x.VDI.list_changed_blocks, s2, s1) == unrelated      # older one first
    assert failure(x.VDI.list_changed_blocks, s1, s1) == [
        "SR_BACKEND_FAILURE_460", "", "Failed to calculate changed blocks for given VDIs. "
        "[opterr=Source and target VDI are same]", ""]
    plain = disk(pool, "h", "xvdb")                                       # no CBT at all
    ps = x.VDI.snapshot(plain, {})
    assert failure(x.VDI.list_changed_blocks, ps, plain) == unrelated
    assert failure(x.VDI.list_changed_blocks, s1, "OpaqueRef:nope") == [
        "HANDLE_INVALID", "VDI", "OpaqueRef:nope"]


def test_vdi_to_attached_to_a_running_vm_is_in_use(pool, x):
    vdi = disk(pool, "r")
    x.VDI.enable_cbt(vdi)                      # allowed live
    vm, _ = pool.vm("r")
    snapvm = x.VM.snapshot(vm, "backup")
    snap = [x.VBD.get_VDI(b) for b in x.VM.get_VBDs(snapvm)][0]
    pool.write_vdi(vdi, 3 * B, b"w")
    assert failure(x.VDI.list_changed_blocks, snap, vdi) == ["VDI_IN_USE", vdi, "list_changed_blocks"]
    snap2 = x.VDI.snapshot(vdi, {})
    assert bits(x.VDI.list_changed_blocks(snap, snap2)) == {3}
    x.VM.hard_shutdown(vm)
    assert bits(x.VDI.list_changed_blocks(snap2, vdi)) == set()


def test_async_list_changed_blocks_result(pool, x):
    vdi = disk(pool, "h")
    x.VDI.enable_cbt(vdi)
    s1 = x.VDI.snapshot(vdi, {})
    pool.write_vdi(vdi, 0, b"a")
    task = x.Async.VDI.list_changed_blocks(s1, vdi)
    while x.task.get_status(task) == "pending":
        pass
    result = x.task.get_result(task)
    text = result.replace("<value>", "").replace("</value>", "")
    assert bits(text) == {0}


# ---------------------------------------------------------------------------
# data_destroy
# ---------------------------------------------------------------------------
def _cbt_vm_snapshot(pool, x, name="h"):
    vm, _ = pool.vm(name)
    vdi = disk(pool, name)
    x.VDI.enable_cbt(vdi)
    snapvm = x.VM.snapshot(vm, "cbt")
    snap = [x.VBD.get_VDI(b) for b in x.VM.get_VBDs(snapvm) if x.VBD.get_userdevice(b) == "0"][0]
    return vdi, snapvm, snap


def test_data_destroy_makes_cbt_metadata(pool, x):
    vdi, snapvm, snap = _cbt_vm_snapshot(pool, x)
    sr = x.VDI.get_SR(snap)
    pool.write_vdi(vdi, 30 * B, b"after")
    x.VM.destroy(snapvm)
    used = int(x.SR.get_physical_utilisation(sr))
    own = int(x.VDI.get_physical_utilisation(snap))
    assert own > 0
    x.VDI.data_destroy(snap)
    x.VDI.data_destroy(snap)                   # already done: nothing happens
    rec = x.VDI.get_record(snap)
    assert rec["type"] == "cbt_metadata" and rec["physical_utilisation"] == "0"
    assert rec["cbt_enabled"] is True and rec["virtual_size"] == str(6 * MiB)
    assert int(x.SR.get_physical_utilisation(sr)) == used - own
    assert cbt.is_cbt_metadata(pool.db, snap)
    # still a reference for the next incremental
    assert bits(x.VDI.list_changed_blocks(snap, vdi)) == {30}
    # not exportable, not a base
    session = pool.session()._session
    for q in ({"vdi": snap}, {"vdi": vdi, "base": snap, "format": "vhd"}):
        st, body, task = _get(pool, session, dict(q))
        assert st == 500 and b"VDI_INCOMPATIBLE_TYPE" in body
        assert x.task.get_error_info(task) == ["VDI_INCOMPATIBLE_TYPE", snap, "CBT metadata"]
    assert failure(x.VDI.enable_cbt, snap) == ["VDI_INCOMPATIBLE_TYPE", snap, "CBT metadata"]
    x.VDI.destroy(snap)
    assert failure(x.VDI.get_record, snap)[0] == "HANDLE_INVALID"


def test_data_destroy_refusals(pool, x):
    vdi = disk(pool, "h")
    assert failure(x.VDI.data_destroy, vdi) == ["OPERATION_NOT_ALLOWED", "VDI is not a snapshot: %s" % vdi]
    plain = x.VDI.snapshot(vdi, {})            # CBT off when it was taken
    assert failure(x.VDI.data_destroy, plain) == ["VDI_NO_CBT_METADATA", plain]


def test_data_destroy_waits_for_the_snapshot_vbds():
    with cbt_pool(cbt={"data_destroy_timeout": 0}) as p:
        x = p.session().xenapi
        vdi, snapvm, snap = _cbt_vm_snapshot(p, x)
        # the snapshot VM still has its VBDs: xapi waits for them, then gives up
        assert failure(x.VDI.data_destroy, snap) == ["VDI_IN_USE", snap, "data_destroy"]
        assert x.VDI.get_type(snap) == "system"
        x.VM.destroy(snapvm)
        x.VDI.data_destroy(snap)
        assert x.VDI.get_type(snap) == "cbt_metadata"


def test_data_destroy_in_use_window_after_the_vbds_go():
    with cbt_pool(cbt={"in_use_window": 3.0}) as p:
        x = p.session().xenapi
        vdi, snapvm, snap = _cbt_vm_snapshot(p, x)
        x.VM.destroy(snapvm)
        assert failure(x.VDI.data_destroy, snap) == ["VDI_IN_USE", snap, "data_destroy"]
        p.db.cbt.advance(2.0)
        assert failure(x.VDI.data_destroy, snap) == ["VDI_IN_USE", snap, "data_destroy"]
        p.db.cbt.advance(1.5)
        x.VDI.data_destroy(snap)
        assert x.VDI.get_type(snap) == "cbt_metadata"


# ---------------------------------------------------------------------------
# resize and storage migration
# ---------------------------------------------------------------------------
def test_resize_grows_the_log(pool, x):
    vdi = disk(pool, "h")
    x.VDI.enable_cbt(vdi)
    s1 = x.VDI.snapshot(vdi, {})
    pool.write_vdi(vdi, 2 * B, b"old")
    assert failure(x.VDI.resize, vdi, str(4 * MiB)) == [
        "SR_BACKEND_FAILURE_79", "", "VDI Invalid size [opterr=shrinking not allowed]", ""]
    x.VDI.resize(vdi, str(7 * MiB))            # VHD sizes round up to 2 MiB
    assert x.VDI.get_virtual_size(vdi) == str(8 * MiB)
    pool.write_vdi(vdi, 7 * MiB, b"new")
    s2 = x.VDI.snapshot(vdi, {})
    raw = base64.b64decode(x.VDI.list_changed_blocks(s1, s2))
    assert len(raw) == 16                      # covers vdi_to's 8 MiB
    assert bits(base64.b64encode(raw)) == {2, 7 * MiB // B}
    # a running VM's disk cannot be resized offline
    r = disk(pool, "r")
    assert failure(x.VDI.resize, r, str(8 * MiB)) == ["VDI_IN_USE", r, "resize"]


def test_pool_migrate_refused_with_cbt_and_resets_the_log(pool, x):
    vdi = disk(pool, "h")
    x.VDI.enable_cbt(vdi)
    s1 = x.VDI.snapshot(vdi, {})
    local = [r for r, v in x.SR.get_all_records().items() if v["name_label"] == "Local storage"][0]
    assert failure(x.VDI.pool_migrate, vdi, local, {}) == ["VDI_CBT_ENABLED", vdi]
    assert failure(x.VDI.pool_migrate, s1, local, {}) == ["VDI_NEEDS_VM_FOR_MIGRATE", s1]
    content = pool.vdi_content(vdi).to_bytes()
    x.VDI.disable_cbt(vdi)
    new = x.VDI.pool_migrate(vdi, local, {})
    assert new != vdi and x.VDI.get_SR(new) == local
    assert failure(x.VDI.get_record, vdi)[0] == "HANDLE_INVALID"
    assert pool.vdi_content(new).to_bytes() == content
    vm, _ = pool.vm("h")
    assert new in [x.VBD.get_VDI(b) for b in x.VM.get_VBDs(vm)]
    x.VDI.enable_cbt(new)
    pool.write_vdi(new, 0, b"x")
    assert failure(x.VDI.list_changed_blocks, s1, new)[0] == "SR_BACKEND_FAILURE_460"
    s2 = x.VDI.snapshot(new, {})
    assert bits(x.VDI.list_changed_blocks(s2, new)) == set()


# ---------------------------------------------------------------------------
# differencing exports
# ---------------------------------------------------------------------------
def _get(pool, session, query):
    """GET /export_raw_vdi under a fresh task: (status, body, task)."""
    x = pool.session().xenapi
    task = x.task.create("export", "")
    query = dict(query, session_id=session, task_id=task)
    u = urllib.parse.urlsplit(pool.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("GET", "/export_raw_vdi?" + urllib.parse.urlencode(query))
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body, task


LIBVHDI_CHAIN = textwrap.dedent("""
    import sys, pyvhdi
    base, child, out = sys.argv[1:4]
    p = pyvhdi.file(); p.open(base)
    c = pyvhdi.file(); c.open(child)
    c.set_parent(p)
    with open(out, "wb") as f:
        f.write(c.read_buffer_at_offset(c.get_media_size(), 0))
    print(c.get_parent_identifier())
""")


def _have_pyvhdi():
    try:
        return subprocess.run(["/usr/bin/python3", "-c", "import pyvhdi"],
                              stderr=subprocess.DEVNULL).returncode == 0
    except OSError:
        return False


def _set_footer_uid(data, uid):
    """Give a dynamic VHD (bytes) another footer uid, in both footer copies: what a
    client does to hang its copy of the base under a differencing export (vhd-tool
    names the base's on-host file as the parent; libvhdi checks the identifier)."""
    footer = bytearray(data[:512])
    footer[68:84] = uid.bytes
    struct.pack_into(">I", footer, 64, 0)
    struct.pack_into(">I", footer, 64, vhd.checksum(footer))
    return bytes(footer) + data[512:-512] + bytes(footer)


def _two_snapshots(pool, x):
    vdi = disk(pool, "h")
    s1 = x.VDI.snapshot(vdi, {})
    pool.write_vdi(vdi, 17 * B + 7, b"changed")    # 2 MiB block 0
    pool.write_vdi(vdi, 70 * B, os.urandom(B))     # 2 MiB block 2
    s2 = x.VDI.snapshot(vdi, {})
    pool.write_vdi(vdi, 33 * B, b"later")          # after s2: block 1, not in s1..s2
    return vdi, s1, s2


def test_differencing_vhd_layout(pool, x):
    vdi, s1, s2 = _two_snapshots(pool, x)
    session = pool.session()._session
    st, body, task = _get(pool, session, {"vdi": s2, "format": "vhd", "base": s1})
    assert st == 200 and x.task.get_status(task) == "success"
    footer = vhd.parse_footer(body[:512])
    assert footer["disk_type"] == vhd.DISK_DIFFERENCING == 4
    assert footer["current_size"] == 6 * MiB and body[-512:] == body[:512]
    header = vhd.parse_header(body[512:1536])
    assert header["parent_uid"] == cbt.vhd_uid(pool.db, s1) != footer["uid"]
    sr_uuid = x.SR.get_uuid(x.VDI.get_SR(s1))
    name = "/var/run/sr-mount/%s/%s.vhd" % (sr_uuid, x.VDI.get_uuid(s1))
    h = body[512:1536]
    assert h[64:64 + 2 * len(name)].decode("utf-16-be") == name
    code, space, length, _, offset = struct.unpack_from(">4sIIIQ", h, 576)
    assert (code, space, length, offset) == (b"MacX", 1, len("file://" + name), 1536)
    assert body[1536:2048] == bytes(512)           # vhd-tool leaves the locator sector empty
    bat = struct.unpack_from(">3I", body, 2048)
    assert [i for i, v in enumerate(bat) if v != 0xFFFFFFFF] == [0, 2]   # exactly the changed blocks
    assert len(body) == 2048 + 512 + 2 * (512 + 2 * MiB) + 512
    # by uuid, and a missing base
    st, body2, _ = _get(pool, session, {"vdi": s2, "format": "vhd", "base": x.VDI.get_uuid(s1)})
    assert st == 200 and struct.unpack_from(">3I", body2, 2048) == bat
    st, body3, task = _get(pool, session, {"vdi": s2, "format": "vhd", "base": "nope"})
    assert st == 500 and x.task.get_error_info(task) == ["UUID_INVALID", "VDI", "nope"]
    # the simulator's own reader applies it on top of the base
    import io
    got = vhd.parse_vhd(io.BytesIO(body), base=pool.vdi_content(s1))
    assert got == pool.vdi_content(s2)


@pytest.mark.skipif(not _have_pyvhdi(), reason="python3-libvhdi (pyvhdi for /usr/bin/python3) missing")
def test_differencing_vhd_read_by_libvhdi_on_top_of_the_base(pool, x, tmp_path):
    vdi, s1, s2 = _two_snapshots(pool, x)
    session = pool.session()._session
    st, base, _ = _get(pool, session, {"vdi": s1, "format": "vhd"})
    assert st == 200 and vhd.parse_footer(base[:512])["disk_type"] == vhd.DISK_DYNAMIC
    st, child, _ = _get(pool, session, {"vdi": s2, "format": "vhd", "base": s1})
    assert st == 200
    parent_uid = vhd.parse_header(child[512:1536])["parent_uid"]
    (tmp_path / "base.vhd").write_bytes(_set_footer_uid(base, parent_uid))
    (tmp_path / "child.vhd").write_bytes(child)
    r = subprocess.run(["/usr/bin/python3", "-c", LIBVHDI_CHAIN, str(tmp_path / "base.vhd"),
                        str(tmp_path / "child.vhd"), str(tmp_path / "out.raw")],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(parent_uid)
    out = (tmp_path / "out.raw").read_bytes()
    assert out == pool.vdi_content(s2).to_bytes() != pool.vdi_content(s1).to_bytes()
    # without the matching uid libvhdi refuses the chain: the parent really is checked
    (tmp_path / "base.vhd").write_bytes(base)
    r = subprocess.run(["/usr/bin/python3", "-c", LIBVHDI_CHAIN, str(tmp_path / "base.vhd"),
                        str(tmp_path / "child.vhd"), str(tmp_path / "out2.raw")],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert r.returncode != 0 and "identifier" in r.stderr


def test_differencing_raw_export(pool, x):
    vdi, s1, s2 = _two_snapshots(pool, x)
    session = pool.session()._session
    st, body, task = _get(pool, session, {"vdi": s2, "format": "raw", "base": s1})
    assert st == 200 and x.task.get_status(task) == "success"
    new = pool.vdi_content(s2).to_bytes()
    assert len(body) == 6 * MiB
    for i in range(3):
        piece = body[i * 2 * MiB:(i + 1) * 2 * MiB]
        if i in (0, 2):
            assert piece == new[i * 2 * MiB:(i + 1) * 2 * MiB]
        else:                                      # unchanged since the base: zeros
            assert piece == bytes(2 * MiB)
    # raw base= does not send the base's data where nothing changed
    assert body[:2 * MiB] == new[:2 * MiB] != pool.vdi_content(s1).read(0, 2 * MiB)


def test_differencing_export_of_the_live_vdi_and_unrelated_base(pool, x):
    vdi, s1, s2 = _two_snapshots(pool, x)
    session = pool.session()._session
    st, body, _ = _get(pool, session, {"vdi": vdi, "format": "vhd", "base": s2})
    bat = struct.unpack_from(">3I", body, 2048)
    assert [i for i, v in enumerate(bat) if v != 0xFFFFFFFF] == [1]       # only the later write
    # a base from another disk: everything either chain ever wrote
    other = disk(pool, "other")
    st, body, _ = _get(pool, session, {"vdi": vdi, "format": "vhd", "base": other})
    bat = struct.unpack_from(">3I", body, 2048)
    assert [i for i, v in enumerate(bat) if v != 0xFFFFFFFF] == [0, 1, 2]
