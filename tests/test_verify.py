"""verify, list and diff: backups checked without a server.

Real XVAs and VHDs come from the simulator's format code; each is damaged on
purpose and must be rejected with a message that names the damage, and
cross-checked with tools nobody here wrote (Debian's xva-img, qemu-img).
"""
import collections
import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import struct
import subprocess
import tarfile
import urllib.request
import xml.dom.minidom
import xmlrpc.client

import pytest
import xxhash

import vmbackup
from conftest import run_vmbackup
from xapisim import vhd as sim_vhd
from xapisim import xva as sim_xva
from xapisim.disks import Disk

import vmbackup as V  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
NET0, NET1 = "Pool-wide network associated with eth0", "storage"


# ---------------------------------------------------------------------------
# Building real backups
# ---------------------------------------------------------------------------

def xmlrpc_value(value):
    """Return one XML-RPC <value> as XAPI's ova.xml holds it (ints as strings, as XAPI sends them)."""
    text = xmlrpc.client.dumps((value,))
    return re.search(r"<param>\s*(<value>.*</value>)\s*</param>", text, re.S).group(1).encode()


def ova_struct(disks=(("Ref:7", 6 * MiB, "root", "xvda"),), vifs=(("0", NET0),),
               memory=GiB, vcpus=2, other_config=None, cd=True):
    """Return an ova.xml struct: one VM, its disks {id, size, label, device}, VIFs and a CD."""
    objects = []
    vm = {"uuid": "11111111-2222-3333-4444-555555555555", "name_label": "web01",
          "name_description": "", "power_state": "Halted", "is_a_snapshot": False,
          "is_a_template": False, "is_control_domain": False,
          "memory_static_min": str(memory // 2), "memory_static_max": str(memory),
          "memory_dynamic_min": str(memory), "memory_dynamic_max": str(memory),
          "VCPUs_max": str(vcpus), "VCPUs_at_startup": str(vcpus),
          "HVM_boot_policy": "BIOS order", "HVM_boot_params": {"order": "cd"},
          "platform": {"viridian": "false"}, "other_config": other_config or {"mac_seed": "x"},
          "tags": [], "VBDs": [], "VIFs": []}
    objects.append({"class": "VM", "id": "Ref:1", "snapshot": vm})
    sr = {"uuid": "sr-1", "name_label": "Local storage", "content_type": "user"}
    iso = {"uuid": "sr-2", "name_label": "ISO library", "content_type": "iso"}
    vdis = []
    for n, (export_id, size, label, device) in enumerate(disks):
        vbd_id = "Ref:%d" % (100 + n)
        vm["VBDs"].append(vbd_id)
        objects.append({"class": "VBD", "id": vbd_id, "snapshot": {
            "VM": "Ref:1", "VDI": export_id, "device": device, "userdevice": str(n),
            "type": "Disk", "mode": "RW", "bootable": n == 0, "empty": False}})
        vdis.append({"class": "VDI", "id": export_id, "snapshot": {
            "uuid": "vdi-%d" % n, "name_label": label, "virtual_size": str(size), "SR": "Ref:50"}})
    if cd:
        vm["VBDs"].append("Ref:120")
        objects.append({"class": "VBD", "id": "Ref:120", "snapshot": {
            "VM": "Ref:1", "VDI": "Ref:121", "device": "xvdd", "userdevice": "3", "type": "CD",
            "mode": "RO", "bootable": False, "empty": False}})
        vdis.append({"class": "VDI", "id": "Ref:121", "snapshot": {
            "uuid": "iso-1", "name_label": "debian.iso", "virtual_size": "400000000",
            "SR": "Ref:51"}})
    for n, (device, network) in enumerate(vifs):
        vif_id, net_id = "Ref:%d" % (200 + n), "Ref:%d" % (300 + n)
        vm["VIFs"].append(vif_id)
        objects.append({"class": "VIF", "id": vif_id, "snapshot": {
            "VM": "Ref:1", "device": device, "network": net_id, "MTU": "1500",
            "MAC": "aa:bb:cc:00:00:%02x" % n}})
        objects.append({"class": "network", "id": net_id, "snapshot": {"name_label": network}})
    objects += vdis
    objects.append({"class": "SR", "id": "Ref:50", "snapshot": sr})
    objects.append({"class": "SR", "id": "Ref:51", "snapshot": iso})
    return {"version": {"hostname": "xcp1", "export_vsn": "2"}, "objects": objects}


def ova_xml(**kw):
    return xmlrpc_value(ova_struct(**kw))


def pretty(ova_bytes):
    """Return ova.xml pretty-printed as vmbackup saves vm-metadata.xml."""
    return xml.dom.minidom.parseString(ova_bytes).toprettyxml(indent="  ").encode()


DISK = Disk(6 * MiB, seed=3, blocks=[0, 40, 50, 87])       # chunks 0, 2, 3, 5 hold data


def make_xva(checksum="xxhash", keepalive=None, disk=DISK, compress=None):
    """Return the bytes of a real XVA of one disk (export id Ref:7), as the simulator writes it."""
    ova = ova_xml(disks=(("Ref:7", disk.virtual_size, "root", "xvda"),))
    stream = sim_xva.xva_stream(ova, [("Ref:7", disk)], checksum=checksum, keepalive=keepalive)
    if compress:
        stream = sim_xva.compress(stream, compress)
    return b"".join(stream)


def tar_members(data):
    archive = tarfile.open(fileobj=io.BytesIO(data))
    return archive, archive.getmembers()


def rewrite_tar(data, drop=(), first=None):
    """Return the tar `data` rewritten by Python's tarfile without the members in `drop`."""
    archive, members = tar_members(data)
    if first:
        members.sort(key=lambda m: m.name != first)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as writer:
        for member in members:
            if member.name not in drop:
                writer.addfile(member, archive.extractfile(member))
    return out.getvalue()


def flip_in_member(data, name, at=100):
    """Return `data` with one byte of member `name`'s content inverted."""
    _, members = tar_members(data)
    member = next(m for m in members if m.name == name)
    out = bytearray(data)
    out[member.offset_data + at] ^= 0xFF
    return bytes(out)


def write_backup(root, files, vm="web01", stamp="2026-11-23-101500", mode="vm-export",
                 disks=(), success=True, metadata=None, compress=None, vdi_format=None):
    """Write a backup folder as vmbackup's backup_vm does (files, vm-metadata.xml, manifest, success)."""
    folder = os.path.join(str(root), vm, "backup-" + stamp)
    os.makedirs(folder)
    files = collections.OrderedDict([("vm-metadata.xml", metadata or pretty(ova_xml()))] + list(files))
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(data)
    manifest = vmbackup.manifest_record(
        {"name": vm, "uuid": "11111111-2222-3333-4444-555555555555", "power_state": "Running"},
        mode, "api", "2026-11-23T10:15:00", "2026-11-23T10:16:00",
        [vmbackup.file_entry(folder, name) for name in files],
        [dict(device=d, userdevice=str(n), vdi_uuid="vdi-%d" % n, name_label=d,
              virtual_size=size, file=f) for n, (d, size, f) in enumerate(disks)],
        compress=compress, vdi_format=vdi_format, pool={"master": "xcp1"})
    with open(os.path.join(folder, vmbackup.MANIFEST), "w") as handle:
        json.dump(manifest, handle, indent=2)
    if success:
        open(os.path.join(folder, vmbackup.SUCCESS_MARKER), "w").close()
    return folder


def rewrite_file(folder, name, data):
    """Replace a backup file's content and record it in the manifest (so only the format check can object)."""
    with open(os.path.join(folder, name), "wb") as handle:
        handle.write(data)
    path = os.path.join(folder, vmbackup.MANIFEST)
    manifest = json.load(open(path))
    manifest["files"] = [vmbackup.file_entry(folder, f["name"]) for f in manifest["files"]]
    json.dump(manifest, open(path, "w"))


def run_cmd(cmd, *args):
    """Run a subcommand function in-process; return (exit code, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cmd([str(a) for a in args])
    return rc, out.getvalue()


def verify(*args, code=0):
    """Run `verify` in-process; assert its exit code; return its output."""
    rc, out = run_cmd(V.cmd_verify, *args)
    assert rc == code, out
    return out


# ---------------------------------------------------------------------------
# XXH64: the pure-Python fallback equals the xxhash package
# ---------------------------------------------------------------------------

def test_pure_xxh64_equals_xxhash_on_every_short_length_and_a_mebibyte():
    rng = random.Random(7)
    samples = [bytes(rng.getrandbits(8) for _ in range(n)) for n in range(101)]
    samples += [bytes(MiB), bytes(rng.getrandbits(8) for _ in range(MiB)),
                bytes(rng.getrandbits(8) for _ in range(MiB - 13))]
    for data in samples:
        for seed in ((0, 1, 2 ** 64 - 1) if len(data) < 1000 else (0,)):
            assert V.xxh64_py(data, seed) == xxhash.xxh64(data, seed=seed).intdigest(), len(data)


def test_xxhash_members_are_checked_without_the_xxhash_package(monkeypatch, tmp_path):
    disk = Disk(3 * MiB, seed=9, blocks=[20])                  # one chunk of data, two of zeros
    good, bad = tmp_path / "good.xva", tmp_path / "bad.xva"
    good.write_bytes(make_xva(disk=disk))
    bad.write_bytes(flip_in_member(make_xva(disk=disk), "Ref:7/00000001"))
    monkeypatch.setattr(V, "_xxhash", None)
    assert V.xxh64_hex(b"abc") == "%016X" % xxhash.xxh64(b"abc").intdigest()
    assert V.check_xva_file(str(good))[0] == []
    assert V.check_xva_file(str(bad))[0] == ["chunk Ref:7/00000001 XXH64 mismatch"]


# ---------------------------------------------------------------------------
# XVA: good exports pass, damaged ones are named
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("checksum", ["xxhash", "sha1"])
@pytest.mark.parametrize("compress", [None, "gzip", "zstd"])
def test_real_xva_exports_are_good(tmp_path, checksum, compress):
    path = tmp_path / ("x.xva" + {None: "", "gzip": ".gz", "zstd": ".zst"}[compress])
    path.write_bytes(make_xva(checksum, compress=compress))
    problems, unchecked, info = V.check_xva_file(str(path), want_sha256=True)
    assert (problems, unchecked) == ([], [])
    assert info["disks"] == {"Ref:7": DISK.virtual_size}
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_keepalive_chunks_count_as_counters_not_offsets(tmp_path):
    data = make_xva(keepalive=0.0)          # an empty chunk before every middle chunk
    empty = [m.name for m in tar_members(data)[1] if m.size == 0 and not m.name.endswith(".xxhash")]
    assert empty, "no keep-alive chunks"
    path = tmp_path / "k.xva"
    path.write_bytes(data)
    problems, _, info = V.check_xva_file(str(path))
    assert problems == [] and info["disks"] == {"Ref:7": DISK.virtual_size}


def test_disk_smaller_than_one_chunk_and_zero_disk(tmp_path):
    small = Disk(300000, seed=1, blocks=[0])
    path = tmp_path / "s.xva"
    path.write_bytes(make_xva(disk=small))
    assert V.check_xva_file(str(path))[0] == []
    empty = Disk.empty(5 * MiB + 4096)      # only the first and the last chunk are written
    path.write_bytes(make_xva(disk=empty))
    assert V.check_xva_file(str(path))[0] == []


GOOD_XVA = make_xva()
GOOD_SHA1_XVA = make_xva("sha1")

DAMAGED_XVA = [
    ("flipped-byte", lambda: flip_in_member(GOOD_XVA, "Ref:7/00000003"),
     r"^chunk Ref:7/00000003 XXH64 mismatch$"),
    ("flipped-byte-sha1", lambda: flip_in_member(GOOD_SHA1_XVA, "Ref:7/00000000"),
     r"^chunk Ref:7/00000000 SHA-1 mismatch$"),
    ("wrong-checksum-text", lambda: flip_in_member(GOOD_XVA, "Ref:7/00000002.xxhash", 3),
     r"^chunk Ref:7/00000002 XXH64 mismatch$"),
    ("truncated-tail", lambda: GOOD_XVA[:-3000], r"^truncated: the tar stream ends inside a member"),
    ("truncated-half", lambda: GOOD_XVA[:len(GOOD_XVA) // 2], r"^truncated"),
    ("end-blocks-missing", lambda: GOOD_XVA[:-1024], r"^truncated: .* without its end-of-archive"),
    ("missing-checksum-member", lambda: rewrite_tar(GOOD_XVA, ["Ref:7/00000002.xxhash"]),
     r"^chunk Ref:7/00000002 has no checksum member$"),
    ("missing-last-chunk", lambda: rewrite_tar(GOOD_XVA, ["Ref:7/00000005", "Ref:7/00000005.xxhash"]),
     r"^disk Ref:7 reassembles to 4194304 bytes, ova.xml says virtual_size 6291456 \(last chunk"),
    ("missing-first-chunk", lambda: rewrite_tar(GOOD_XVA, ["Ref:7/00000000", "Ref:7/00000000.xxhash"]),
     r"^disk Ref:7: first chunk is 00000002, not 00000000$"),
    ("missing-disk", lambda: rewrite_tar(GOOD_XVA, [m.name for m in tar_members(GOOD_XVA)[1]
                                                    if m.name.startswith("Ref:")]),
     r"^disk Ref:7 \(root\) has no data in the XVA$"),
    ("ova-not-first", lambda: rewrite_tar(GOOD_XVA, first="Ref:7/00000000"),
     r"^first member is 'Ref:7/00000000', not ova.xml"),
    ("corrupt-header", lambda: (lambda at: GOOD_XVA[:at] + b"X" + GOOD_XVA[at + 1:])(
        next(m.offset for m in tar_members(GOOD_XVA)[1] if m.name == "Ref:7/00000002") + 3),
     r"^tar header at byte \d+ is corrupt \(checksum mismatch\)$"),
    ("gzip-truncated", lambda: make_xva(compress="gzip")[:-100], r"^gzip stream: truncated"),
    ("gzip-flipped", lambda: (lambda d: d[:5000] + bytes([d[5000] ^ 0xFF]) + d[5001:])(
        make_xva(compress="gzip")), r"^(gzip stream: |chunk Ref:7/\d+ XXH64 mismatch|tar header)"),
    ("zstd-truncated", lambda: make_xva(compress="zstd")[:-100], r"^zstd: "),
]


@pytest.mark.parametrize("damage,pattern", [d[1:] for d in DAMAGED_XVA], ids=[d[0] for d in DAMAGED_XVA])
def test_damaged_xva_is_rejected_with_the_reason(tmp_path, damage, pattern):
    data = damage()
    path = tmp_path / ("d.xva" + (".gz" if data[:2] == b"\x1f\x8b" else
                                  ".zst" if data[:4] == b"\x28\xb5\x2f\xfd" else ""))
    path.write_bytes(data)
    problems, _, _ = V.check_xva_file(str(path))
    assert problems and re.search(pattern, problems[0]), problems


def test_ova_xml_that_does_not_parse(tmp_path):
    data = b"".join(sim_xva.xva_stream(b"<value><struct>", [("Ref:7", DISK)]))
    path = tmp_path / "o.xva"
    path.write_bytes(data)
    problems = V.check_xva_file(str(path))[0]
    assert problems[0].startswith("ova.xml does not parse: not well-formed XML")


def test_zstd_xva_without_zstd_is_unchecked_never_good(tmp_path, monkeypatch):
    folder = write_backup(tmp_path, [("web01.xva.zst", make_xva(compress="zstd"))], compress="zstd",
                          disks=[("xvda", DISK.virtual_size, None)])
    monkeypatch.setattr(V, "find_zstd", lambda: None)
    out = verify(folder, code=1)
    assert "UNCHECKED web01/backup-2026-11-23-101500/web01.xva.zst: zstd is not installed" in out
    assert V.verify_backup(folder).status == "unchecked"


# -- cross-checks with Debian's xva-img (reads the SHA-1 `.checksum` form only)

SHA1_DAMAGE = {
    "good": lambda d: d,
    "flipped-byte": lambda d: flip_in_member(d, "Ref:7/00000003"),
    "flipped-checksum": lambda d: flip_in_member(d, "Ref:7/00000002.checksum", 3),
    "truncated-tail": lambda d: d[:-3000],
    "truncated-half": lambda d: d[:len(d) // 2],
    "missing-checksum-member": lambda d: rewrite_tar(d, ["Ref:7/00000002.checksum"]),
    "missing-last-chunk": lambda d: rewrite_tar(d, ["Ref:7/00000005", "Ref:7/00000005.checksum"]),
    "missing-disk": lambda d: rewrite_tar(d, [m.name for m in tar_members(d)[1] if "/" in m.name]),
}


@pytest.mark.skipif(not shutil.which("xva-img"), reason="needs Debian's xva-img")
@pytest.mark.parametrize("case", sorted(SHA1_DAMAGE))
def test_xva_img_and_verify_agree(tmp_path, case):
    data = SHA1_DAMAGE[case](GOOD_SHA1_XVA)
    path = tmp_path / "x.xva"
    path.write_bytes(data)
    work = tmp_path / "x"
    work.mkdir()
    untar = subprocess.run(["tar", "-xf", str(path), "-C", str(work)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    out = tmp_path / "disk.raw"
    img = subprocess.run(["xva-img", "-s", "disk-export", str(work / "Ref:7") + "/", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    accepted = untar.returncode == 0 and img.returncode == 0
    problems = V.check_xva_file(str(path))[0]
    if not accepted:
        assert problems, "xva-img rejects %s (%s) but verify accepts it" % (case, img.stdout)
    if not problems:
        assert accepted and out.read_bytes() == DISK.read(0, DISK.virtual_size)
    assert (case == "good") == (not problems)


# ---------------------------------------------------------------------------
# VHD and raw
# ---------------------------------------------------------------------------

VDISK = Disk(9 * MiB, seed=5, blocks=[0, 33, 100])
GOOD_VHD = b"".join(sim_vhd.vhd_stream(VDISK))


def patched(data, offset, value, fmt=">I"):
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


END = len(GOOD_VHD) - 512
DAMAGED_VHD = {
    "good": (lambda: GOOD_VHD, None),
    "footer-checksum": (lambda: patched(GOOD_VHD, END + 24, 12345),
                        r"^VHD footer at the end: checksum mismatch$"),
    "both-footers": (lambda: patched(patched(GOOD_VHD, END + 24, 1), 24, 1), r"checksum mismatch"),
    "copy-at-start": (lambda: patched(GOOD_VHD, 24, 777),
                      r"^VHD footer copy at the start: checksum mismatch$"),
    "truncated-tail": (lambda: GOOD_VHD[:-512], r"missing .*truncated\? the copy at the start is sound"),
    "truncated-more": (lambda: GOOD_VHD[:-100000], r"truncated"),
    "header-checksum": (lambda: patched(GOOD_VHD, 512 + 32, 1 << 20),
                        r"^dynamic VHD header checksum mismatch$"),
    "bat-past-end": (lambda: patched(GOOD_VHD, 2048, END // 512 + 10),
                     r"^BAT entry 0 points past the end of the file"),
    # blocks 0, 1 and 3 hold data: point the unused entry 2 at block 0's sectors
    "bat-overlap": (lambda: patched(GOOD_VHD, 2048 + 2 * 4, struct.unpack_from(">I", GOOD_VHD, 2048)[0]),
                    r"^BAT entry 2 \(block at byte \d+\) overlaps the BAT or another block$"),
    "not-a-vhd": (lambda: b"\0" * 4096, r"missing \(no 'conectix' cookie\)"),
    "short": (lambda: b"conectix", r"too short"),
}


def qemu_accepts(path, want):
    """Return True if qemu-img opens and converts the VHD to exactly `want`."""
    opts = "driver=vpc,force_size_calc=current_size,file.filename=" + str(path)
    out = str(path) + ".raw"
    for argv in (["qemu-img", "info", "--image-opts", opts],
                 ["qemu-img", "convert", "-O", "raw", "--image-opts", opts, out]):
        if subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT).returncode:
            return False
    return open(out, "rb").read() == want


@pytest.mark.parametrize("case", sorted(DAMAGED_VHD))
def test_vhd_checks_and_qemu_img_agree(tmp_path, case):
    make, pattern = DAMAGED_VHD[case]
    path = tmp_path / "d.vhd"
    path.write_bytes(make())
    problems = V.check_vhd(str(path), VDISK.virtual_size)
    if pattern is None:
        assert problems == []
    else:
        assert problems and re.search(pattern, problems[0]), problems
    if shutil.which("qemu-img") and case != "short":
        accepted = qemu_accepts(path, VDISK.read(0, VDISK.virtual_size))
        if not accepted:
            assert problems, "qemu-img rejects %s but verify accepts it" % case
        if not problems:
            assert accepted


def test_vhd_virtual_size_must_match_the_disk(tmp_path):
    path = tmp_path / "d.vhd"
    path.write_bytes(GOOD_VHD)
    assert V.check_vhd(str(path), VDISK.virtual_size + MiB) == [
        "VHD virtual size is %d bytes, the disk's virtual_size is %d"
        % (VDISK.virtual_size, VDISK.virtual_size + MiB)]


def test_raw_must_be_exactly_the_virtual_size(tmp_path):
    raw = b"".join(VDISK.iter_raw())
    folder = write_backup(tmp_path, [("web01.raw", raw[:-4096])], mode="vdi-export",
                          vdi_format="raw", disks=[("xvda", VDISK.virtual_size, "web01.raw")])
    out = verify(folder, code=2)
    assert ("BAD web01/backup-2026-11-23-101500/web01.raw: raw image is %d bytes, the disk's "
            "virtual_size is %d (truncated?)" % (len(raw) - 4096, len(raw))) in out
    good = write_backup(tmp_path, [("web01.raw", raw)], stamp="2026-11-24-101500", mode="vdi-export",
                        vdi_format="raw", disks=[("xvda", VDISK.virtual_size, "web01.raw")])
    assert V.verify_backup(good).status == "good"


# ---------------------------------------------------------------------------
# Backup folders: manifest, success marker, sizes and SHA-256
# ---------------------------------------------------------------------------

@pytest.fixture
def vm_backup(tmp_path):
    """A complete vm-export backup of web01 (a real XVA plus metadata), and a vhd vdi-export one."""
    xva_folder = write_backup(tmp_path, [("web01.xva", GOOD_XVA), ("vm.cfg", b"name_label=web01\n")],
                              disks=[("xvda", DISK.virtual_size, None)])
    vhd_folder = write_backup(tmp_path, [("web01.vhd", GOOD_VHD)], stamp="2026-11-24-101500",
                              mode="vdi-export", vdi_format="vhd",
                              disks=[("xvda", VDISK.virtual_size, "web01.vhd")])
    return xva_folder, vhd_folder


def test_good_backups_verify_with_exit_0(vm_backup, tmp_path):
    xva_folder, vhd_folder = vm_backup
    out = verify(xva_folder)
    assert "good web01/backup-2026-11-23-101500: vm-export, 3 files" in out
    out = verify(os.path.join(str(tmp_path), "web01"), "-v")        # the VM folder
    assert "good web01/backup-2026-11-24-101500: vdi-export, 2 files" in out
    assert "  good      web01.vhd (" in out
    assert "verified 2 backups: 2 good" in out
    result = V.verify_backup(xva_folder)
    assert result.status == "good" and result.problems == () and result.complete


def test_verify_json_has_per_backup_results(vm_backup, tmp_path):
    xva_folder, _ = vm_backup
    flip = flip_in_member(GOOD_XVA, "Ref:7/00000003")
    with open(os.path.join(xva_folder, "web01.xva"), "wb") as handle:
        handle.write(flip)
    report = tmp_path / "r.json"
    verify(str(tmp_path), "--json", report, "-q", code=2)
    data = json.loads(report.read_text())
    assert data["exit_code"] == 2 and data["summary"] == {"bad": 1, "good": 1}
    bad = next(b for b in data["backups"] if b["status"] == "bad")
    assert bad["problems"] == [
        {"file": "web01.xva", "message": "sha256 mismatch: the file changed since the backup"},
        {"file": "web01.xva", "message": "chunk Ref:7/00000003 XXH64 mismatch"}]
    assert bad["unchecked"] == [] and bad["name"] == "backup-2026-11-23-101500"


DAMAGED_FOLDER = [
    ("flipped-byte-in-chunk",
     lambda f: rewrite_file(f, "web01.xva", flip_in_member(GOOD_XVA, "Ref:7/00000003")),
     "BAD web01/backup-2026-11-23-101500/web01.xva: chunk Ref:7/00000003 XXH64 mismatch"),
    ("truncated-tail", lambda f: rewrite_file(f, "web01.xva", GOOD_XVA[:-2000]),
     "BAD web01/backup-2026-11-23-101500/web01.xva: truncated: the tar stream ends inside a "),
    ("missing-checksum",
     lambda f: rewrite_file(f, "web01.xva", rewrite_tar(GOOD_XVA, ["Ref:7/00000003.xxhash"])),
     "BAD web01/backup-2026-11-23-101500/web01.xva: chunk Ref:7/00000003 has no checksum member"),
    ("sha256-mismatch", lambda f: open(os.path.join(f, "vm.cfg"), "wb").write(b"name_label=web02\n"),
     "BAD web01/backup-2026-11-23-101500/vm.cfg: sha256 mismatch: the file changed since the backup"),
    ("size-mismatch", lambda f: open(os.path.join(f, "web01.xva"), "ab").write(b"\0" * 512),
     "BAD web01/backup-2026-11-23-101500/web01.xva: size is %d bytes, the manifest says %d"
     % (len(GOOD_XVA) + 512, len(GOOD_XVA))),
    ("truncated-file", lambda f: open(os.path.join(f, "web01.xva"), "r+b").truncate(len(GOOD_XVA) - 512),
     "BAD web01/backup-2026-11-23-101500/web01.xva: size is %d bytes, the manifest says %d (truncated?)"
     % (len(GOOD_XVA) - 512, len(GOOD_XVA))),
    ("missing-file", lambda f: os.unlink(os.path.join(f, "web01.xva")),
     "BAD web01/backup-2026-11-23-101500/web01.xva: missing (listed in backup.json)"),
    ("missing-success", lambda f: os.unlink(os.path.join(f, "success")),
     "INCOMPLETE web01/backup-2026-11-23-101500: no success marker: the backup did not finish"),
    ("manifest-garbage", lambda f: open(os.path.join(f, "backup.json"), "w").write("{"),
     "BAD web01/backup-2026-11-23-101500/backup.json: backup.json does not parse"),
    ("metadata-garbage", lambda f: rewrite_file(f, "vm-metadata.xml", b"<value><struct>"),
     "BAD web01/backup-2026-11-23-101500/vm-metadata.xml: vm-metadata.xml does not parse"),
]


@pytest.mark.parametrize("damage,line", [d[1:] for d in DAMAGED_FOLDER], ids=[d[0] for d in DAMAGED_FOLDER])
def test_damaged_backup_is_rejected_with_one_line_saying_why(vm_backup, damage, line):
    folder = vm_backup[0]
    damage(folder)
    out = verify(folder, code=2)
    assert line in out, out
    assert V.verify_backup(folder).status in ("bad", "incomplete")


def test_interrupted_backup_without_manifest_is_incomplete(tmp_path):
    folder = tmp_path / "web01" / "backup-2026-11-25-101500"
    folder.mkdir(parents=True)
    (folder / "web01.xva.part").write_bytes(GOOD_XVA[:5000])
    out = verify(folder, code=2)
    assert ("INCOMPLETE web01/backup-2026-11-25-101500: no backup.json and no success marker: "
            "the backup did not finish") in out


def make_legacy(root, xva=GOOD_XVA, success="success", name="backup-2025-01-05-(10:00:00)"):
    """A NAUbackup VmBackup.py vm-export folder: no manifest, colons in its name."""
    folder = os.path.join(str(root), "web01", name)
    os.makedirs(os.path.join(folder, "DISK-xvda"))
    with open(os.path.join(folder, "web01.xva"), "wb") as handle:
        handle.write(xva)
    with open(os.path.join(folder, "vm-metadata.xml"), "wb") as handle:
        handle.write(pretty(ova_xml()))
    with open(os.path.join(folder, "DISK-xvda", "vdi.cfg"), "w") as handle:
        handle.write("name_label=root\nvirtual_size=%d\n" % DISK.virtual_size)
    if success:
        open(os.path.join(folder, success), "w").close()
    return folder


def test_legacy_nau_backup_is_checked_by_format(tmp_path):
    good = make_legacy(tmp_path)
    out = verify(good)
    assert ("good web01/backup-2025-01-05-(10:00:00): vm-export, 2 files, %s, legacy NAUbackup "
            "backup: no manifest" % vmbackup.human_size(len(GOOD_XVA) + len(pretty(ova_xml())))) in out
    bad = make_legacy(tmp_path, xva=GOOD_XVA[:-3000], name="backup-2025-01-06-(10:00:00)")
    out = verify(bad, code=2)
    assert "BAD web01/backup-2025-01-06-(10:00:00)/web01.xva: truncated" in out
    result = V.verify_backup(bad)
    assert result.legacy and result.status == "bad"
    big = make_legacy(tmp_path, success="success_compress", name="backup-2025-01-07-(10:00:00)")
    assert V.verify_backup(big).status == "good"     # NAUbackup's marker for files over 60 GiB
    unfinished = make_legacy(tmp_path, success=None, name="backup-2025-01-08-(10:00:00)")
    assert "INCOMPLETE web01/backup-2025-01-08-(10:00:00): legacy NAUbackup backup: no manifest" in verify(
        unfinished, code=2)


def test_loose_files_get_their_format_checked(tmp_path):
    (tmp_path / "a.xva").write_bytes(GOOD_XVA)
    (tmp_path / "b.vhd").write_bytes(GOOD_VHD[:-512])
    (tmp_path / "c.raw").write_bytes(bytes(4096))
    out = verify(tmp_path / "a.xva", tmp_path / "b.vhd", tmp_path / "c.raw", code=2)
    assert "good %s/a.xva: 1 file, %s" % (tmp_path.name, vmbackup.human_size(len(GOOD_XVA))) in out
    assert "BAD %s/b.vhd: VHD footer at the end: missing" % tmp_path.name in out
    assert "UNCHECKED %s/c.raw: the disk's virtual size is not recorded" % tmp_path.name in out
    assert "verified 3 backups: 1 good, 1 bad, 1 unchecked" in out


def test_legacy_raw_size_comes_from_vdi_cfg(tmp_path):
    folder = make_legacy(tmp_path)
    os.unlink(os.path.join(folder, "web01.xva"))
    with open(os.path.join(folder, "web01.raw"), "wb") as handle:
        handle.write(bytes(DISK.virtual_size - 512))
    out = verify(folder, code=2)
    assert "web01.raw: raw image is %d bytes, the disk's virtual_size is %d" % (
        DISK.virtual_size - 512, DISK.virtual_size) in out


def pool_and_host_files(root):
    meta = os.path.join(str(root), "METADATA_xcp1")
    host = os.path.join(str(root), "HOST_xcp1")
    os.makedirs(meta)
    os.makedirs(host)
    with open(os.path.join(meta, "pool_db_20261123-102000.dump"), "wb") as handle:
        handle.write(b'<?xml version="1.0"?><database><manifest/><table name="VM"/></database>')
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        info = tarfile.TarInfo("etc/hostname")
        info.size = 5
        archive.addfile(info, io.BytesIO(b"xcp1\n"))
    with open(os.path.join(host, "host_20261123-102000.xbk"), "wb") as handle:
        handle.write(gzip.compress(raw.getvalue()))
    return meta, host


def test_verify_backup_dir_checks_pool_db_and_host_backups(tmp_path, vm_backup):
    meta, host = pool_and_host_files(tmp_path)
    out = verify(tmp_path)
    assert "good METADATA_xcp1/pool_db_20261123-102000.dump" in out
    assert "good HOST_xcp1/host_20261123-102000.xbk" in out
    assert "verified 4 backups: 4 good" in out
    dump = os.path.join(meta, "pool_db_20261123-102000.dump")
    open(dump, "r+b").truncate(40)
    xbk = os.path.join(host, "host_20261123-102000.xbk")
    open(xbk, "r+b").truncate(30)
    out = verify(tmp_path, "-q", code=2)
    assert "BAD METADATA_xcp1/pool_db_20261123-102000.dump: pool database dump is not complete XML" in out
    assert "BAD HOST_xcp1/host_20261123-102000.xbk: gzip stream: truncated" in out
    assert "good " not in out


def test_verify_bad_paths_are_usage_errors(tmp_path):
    with pytest.raises(vmbackup.UsageError, match="no such file or folder"):
        V.cmd_verify([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(vmbackup.UsageError, match="no backups found"):
        V.cmd_verify([str(tmp_path / "empty")])


def test_verify_accepts_what_vmbackup_writes(transport, sim_pool, backup_dir):
    """Real backups through the simulator, both transports: every mode and format verifies good."""
    connect = transport(sim_pool)
    runs = [["-e", "web01", "-E", "db01:4:xvda;xvdb", "--vdi-format", "vhd", "--compress", "zstd",
             "-m", "win2022", "--pool-db-backup"]]
    expected = [("web01", "vm-export"), ("db01", "vdi-export"), ("win2022", "meta-export")]
    if transport.kind == "api":     # the rest once is enough: xe runs are slow
        runs.append(["-e", "name.with.dots", "-E", "my VM with spaces", "--host-backup"])
        expected += [("name.with.dots", "vm-export"), ("my VM with spaces", "vdi-export")]
    for args in runs:
        run_vmbackup("-d", backup_dir, "-q", *(connect + args))
    out = verify(backup_dir, "-q")
    assert out == ""                            # -q: nothing wrong, nothing printed
    results = [V.verify_backup(os.path.join(str(backup_dir), vm, b))
               for vm, _ in expected for b in os.listdir(os.path.join(str(backup_dir), vm))]
    assert [(r.vm, r.mode, r.status) for r in results] == [e + ("good",) for e in expected]
    files = {f.name for r in results for f in r.files}
    assert {"web01.xva.zst", "db01.vhd", "db01-xvdb.vhd"} <= files
    if transport.kind == "api":
        assert {"name.with.dots.xva", "my VM with spaces.raw"} <= files


# ---------------------------------------------------------------------------
# list
# ---------------------------------------------------------------------------

@pytest.fixture
def listing_dir(tmp_path):
    root = tmp_path / "backups"
    write_backup(root, [("web01.xva", GOOD_XVA)], stamp="2026-11-23-101500",
                 disks=[("xvda", DISK.virtual_size, None)])
    write_backup(root, [("web01.xva", GOOD_XVA[:4096])], stamp="2026-11-24-101500", success=False,
                 disks=[("xvda", DISK.virtual_size, None)])
    wrong = write_backup(root, [("web01.xva", GOOD_XVA)], stamp="2026-11-22-101500",
                         disks=[("xvda", DISK.virtual_size, None)])
    open(os.path.join(wrong, "web01.xva"), "r+b").truncate(1024)
    make_legacy(root)
    write_backup(root, [("db 01.vhd", GOOD_VHD)], vm="db 01", mode="vdi-export", vdi_format="vhd",
                 disks=[("xvda", VDISK.virtual_size, "db 01.vhd")])
    pool_and_host_files(root)
    return root


def test_list_shows_each_backup_newest_first(listing_dir):
    rc, out = run_cmd(V.cmd_list, "-d", listing_dir)
    assert rc == 0
    lines = out.splitlines()
    start = lines.index("web01: 3 complete backups, 1 incomplete")
    rows = [re.split(r"\s{2,}", l.strip()) for l in lines[start + 2:start + 6]]
    assert [r[0] for r in rows] == ["2026-11-24 10:15:00", "2026-11-23 10:15:00",
                                    "2026-11-22 10:15:00", "2025-01-05 10:00:00"]
    assert rows[0][4:] == ["INCOMPLETE", "sizes ok"]
    assert rows[1][1:] == ["vm-export", "2", vmbackup.human_size(len(GOOD_XVA) + len(pretty(ova_xml()))),
                           "complete", "sizes ok"]
    assert rows[2][4] == "complete"
    assert rows[2][5].startswith("BAD: web01.xva: size is 1024 bytes, the manifest says")
    assert rows[3][1] == "vm-export" and rows[3][4:] == ["complete", "not verified (legacy NAUbackup)"]
    assert "db 01: 1 complete backup" in lines
    assert "pool database: METADATA_xcp1 (1 file)" in lines
    assert any(l.split()[:3] == ["2026-11-23", "10:20:00", "host_20261123-102000.xbk"] for l in lines)


def test_list_json_regex_and_backup_dir_sources(listing_dir, tmp_path, monkeypatch):
    rc, out = run_cmd(V.cmd_list, "web", "-d", listing_dir, "--json", "-")
    assert json.loads(out)["vms"] == []         # a plain name selects exactly, as in vm-export=
    rc, out = run_cmd(V.cmd_list, "w.b", "-d", listing_dir, "--json", "-")
    data = json.loads(out)
    assert [vm["name"] for vm in data["vms"]] == ["web01"]
    assert data["pool_db"] == [] and data["hosts"] == []        # a VM filter shows VMs only
    first = data["vms"][0]["backups"][0]
    assert (first["name"], first["complete"], first["check"], first["legacy"]) == (
        "backup-2026-11-24-101500", False, "sizes ok", False)
    assert data["vms"][0]["backups"][-1]["legacy"] is True
    monkeypatch.setenv("VMBACKUP_BACKUP_DIR", str(listing_dir))
    rc, out = run_cmd(V.cmd_list, "--json", "-")
    assert [vm["name"] for vm in json.loads(out)["vms"]] == ["db 01", "web01"]
    assert json.loads(out)["pool_db"][0]["file"] == "pool_db_20261123-102000.dump"
    cfg = tmp_path / "weekly.cfg"
    cfg.write_text("backup_dir=%s\nmax_backups=3\nvm-export=web01\n" % (listing_dir / "db 01"))
    rc, out = run_cmd(V.cmd_list, "-c", cfg)
    assert out.startswith("backup_dir %s\n" % (listing_dir / "db 01")) and "no backups" in out
    with pytest.raises(vmbackup.BackupDirError, match="does not exist"):
        V.cmd_list(["-d", str(tmp_path / "nope")])
    with pytest.raises(vmbackup.UsageError, match="invalid regex"):
        V.cmd_list(["web(", "-d", str(listing_dir)])


# ---------------------------------------------------------------------------
# diff
# ---------------------------------------------------------------------------

def test_diff_names_memory_an_added_disk_and_a_moved_vif(tmp_path):
    a = write_backup(tmp_path, [], mode="meta-export", metadata=pretty(ova_xml()))
    b = write_backup(tmp_path, [], mode="meta-export", stamp="2026-11-24-101500", metadata=pretty(ova_xml(
        memory=2 * GiB, disks=(("Ref:7", 6 * MiB, "root", "xvda"), ("Ref:8", 2 * GiB, "data", "xvdb")),
        vifs=(("0", NET1),), other_config={"mac_seed": "x", "owner": "ops"})))
    rc, out = run_cmd(V.cmd_diff, a, b)
    assert rc == 0
    assert out.splitlines() == [
        "web01/backup-2026-11-23-101500 -> web01/backup-2026-11-24-101500",
        "  memory_static_min: 512.0M -> 1.0G",
        "  memory_static_max: 1.0G -> 2.0G",
        "  memory_dynamic_min: 1.0G -> 2.0G",
        "  memory_dynamic_max: 1.0G -> 2.0G",
        '  disk xvdb added (2.0G, "data", SR "Local storage")',
        '  VIF 0: network "%s" -> "storage"' % NET0,
        '  other_config: owner added ("ops")']
    rc, out = run_cmd(V.cmd_diff, os.path.join(str(tmp_path), "web01"), "--json", "-")
    changes = json.loads(out)["changes"]
    assert {"field": "memory_dynamic_max", "change": "changed", "old": GiB, "new": 2 * GiB,
            "text": "memory_dynamic_max: 1.0G -> 2.0G"} in changes
    assert [c["field"] for c in changes if c["change"] == "added"] == ["disks.xvdb", "other_config.owner"]


def test_diff_of_identical_configs_and_unreadable_input(tmp_path):
    a = write_backup(tmp_path, [], mode="meta-export")
    b = write_backup(tmp_path, [], mode="meta-export", stamp="2026-11-24-101500")
    rc, out = run_cmd(V.cmd_diff, a, b)
    assert rc == 0 and out.splitlines()[1] == "  no configuration changes"
    with open(os.path.join(b, "vm-metadata.xml"), "w") as handle:
        handle.write("<value><struct>")
    with pytest.raises(vmbackup.BackupDirError,
                       match="cannot read the VM metadata of .*not well-formed") as err:
        V.cmd_diff([a, b])
    assert err.value.exit_code == 2
    with pytest.raises(vmbackup.UsageError, match="1 backup with vm-metadata.xml; diff needs two"):
        os.unlink(os.path.join(b, "vm-metadata.xml"))
        V.cmd_diff([os.path.join(str(tmp_path), "web01")])


def test_diff_of_metadata_exported_by_the_simulator(sim_pool, xapi, tmp_path):
    """/export_metadata before and after the VM changed: memory, a disk added, a VIF moved."""
    x = xapi.xenapi
    ref, _ = sim_pool.vm("db01")

    def metadata(path):
        url = "%sexport_metadata?session_id=%s&ref=%s" % (sim_pool.url, xapi._session, ref)
        data = urllib.request.urlopen(url).read()
        ova = tarfile.open(fileobj=io.BytesIO(data)).extractfile("ova.xml").read()
        path.write_bytes(pretty(ova))
        return str(path)

    before = metadata(tmp_path / "a.xml")
    sim_pool.db.tables["VM"][ref]["memory_dynamic_max"] *= 2    # no setter in the simulator
    vif_ref = x.VM.get_VIFs(ref)[0]
    vif = x.VIF.get_record(vif_ref)
    other = next(n for n in x.network.get_all() if n != vif["network"])
    x.VIF.destroy(vif_ref)
    x.VIF.create(dict(device=vif["device"], network=other, VM=ref, MAC=vif["MAC"], MTU=vif["MTU"],
                      other_config={}, qos_algorithm_type="", qos_algorithm_params={}))
    sr = x.VDI.get_SR(x.VBD.get_VDI(x.VM.get_VBDs(ref)[0]))
    vdi = x.VDI.create(dict(SR=sr, virtual_size=str(2 * GiB), name_label="db01 extra", type="user",
                            sharable=False, read_only=False, other_config={}))
    x.VBD.create(dict(VM=ref, VDI=vdi, userdevice="5", bootable=False, mode="RW", type="Disk",
                      empty=False, other_config={}, qos_algorithm_type="", qos_algorithm_params={}))
    after = metadata(tmp_path / "b.xml")
    rc, out = run_cmd(V.cmd_diff, before, after)
    assert rc == 0
    assert out.splitlines()[1:] == [
        "  memory_dynamic_max: 4.0G -> 8.0G",
        '  disk xvdf added (2.0G, "db01 extra", SR "%s")' % x.SR.get_name_label(sr),
        '  VIF %s: network "%s" -> "%s"' % (vif["device"], x.network.get_name_label(vif["network"]),
                                          x.network.get_name_label(other))]
