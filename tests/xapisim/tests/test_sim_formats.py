"""Fidelity of the simulator's disk formats (xapisim.disks / xva / vhd), checked with
tools nobody here wrote: GNU tar, Python's tarfile, Debian's xva-img, qemu-img, the
gzip and zstd binaries and the xxhash package."""
import gc
import json
import hashlib
import io
import os
import shutil
import struct
import subprocess
import tarfile
import time

import pytest
import xxhash

from xapisim import disks as disks_mod
from xapisim.disks import BLOCK, Disk
from xapisim.vhd import (VhdError, geometry, parse_footer, parse_header, parse_vhd,
                         vhd_length, vhd_stream)
from xapisim.xva import (CHUNK, XvaError, compress, decompress_reader, parse_xva,
                         xva_members, xva_stream)

MiB = 1 << 20


def need(tool):
    path = shutil.which(tool)
    if not path:
        pytest.skip("%s is not installed" % tool)
    return path


def ova_xml(sizes):
    """A minimal ova.xml (XML-RPC value, as xapi writes it) with VDI records."""
    objs = []
    for export_id, size in sizes.items():
        objs.append(
            "<value><struct>"
            "<member><name>class</name><value>VDI</value></member>"
            "<member><name>id</name><value>%s</value></member>"
            "<member><name>snapshot</name><value><struct>"
            "<member><name>virtual_size</name><value>%d</value></member>"
            "<member><name>name_label</name><value>disk %s</value></member>"
            "</struct></value></member>"
            "</struct></value>" % (export_id, size, export_id))
    return ("<value><struct><member><name>version</name><value><struct>"
            "<member><name>export_vsn</name><value>2</value></member>"
            "</struct></value></member><member><name>objects</name><value><array><data>"
            + "".join(objs) + "</data></array></value></member></struct></value>").encode()


def xva_bytes(disks, **kw):
    return b"".join(xva_stream(ova_xml({k: d.virtual_size for k, d in disks}), disks, **kw))


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            d = f.read(4 * MiB)
            if not d:
                return h.hexdigest()
            h.update(d)


def file_equals_disk(path, disk):
    """Byte equality of a (sparse) file and a Disk without reading the holes:
    data extents (SEEK_DATA/SEEK_HOLE) are compared byte for byte, holes must be
    zero in the Disk."""
    size = os.path.getsize(str(path))
    if size != disk.virtual_size:
        return False
    fd = os.open(str(path), os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:                                   # no data after pos
                data = size
            if not disk.is_zero(pos, data - pos):
                return False
            if data >= size:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            os.lseek(fd, data, os.SEEK_SET)
            off = data
            while off < hole:
                n = min(4 * MiB, hole - off)
                if os.read(fd, n) != disk.read(off, n):
                    return False
                off += n
            pos = hole
        return True
    finally:
        os.close(fd)


def tar_members(data):
    """[(name, size, mtime, uid, gid, bytes)] via Python's tarfile."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as t:
        for m in t:
            out.append((m.name, m.size, m.mtime, m.uid, m.gid, t.extractfile(m).read()))
    return out


# ---------------------------------------------------------------------------
# Disk
# ---------------------------------------------------------------------------

def test_disk_is_deterministic_sparse_and_copy_on_write():
    d = Disk(10 * MiB + 12345, seed=7, blocks=[0, 3, 100, 160])
    assert d.allocated_blocks() == [0, 3, 100, 160]
    assert d.physical_utilisation == 4 * BLOCK
    again = Disk(10 * MiB + 12345, seed=7, blocks=[160, 3, 0, 100])
    assert d.read(3 * BLOCK, BLOCK) == again.read(3 * BLOCK, BLOCK)
    assert d.read(3 * BLOCK, BLOCK) != Disk(BLOCK * 4, seed=8, blocks=[3]).read(3 * BLOCK, BLOCK)
    assert d.read(1 * BLOCK, BLOCK) == bytes(BLOCK)
    assert d.read(0, BLOCK) != d.read(3 * BLOCK, BLOCK)
    assert d.is_zero(BLOCK, 2 * BLOCK) and not d.is_zero(BLOCK, 2 * BLOCK + 1)
    # a block index past the end is ignored; the last block is partial
    assert Disk(BLOCK + 10, blocks=[1, 5]).allocated_blocks() == [1]
    assert len(d.read(d.virtual_size - 5, 100)) == 5

    whole = d.to_bytes()
    assert len(whole) == d.virtual_size
    assert hashlib.sha256(whole).hexdigest() == d.sha256()
    assert Disk.from_bytes(whole) == d
    assert Disk.from_bytes(whole).fingerprint() == d.fingerprint()

    snap = d.clone()
    d.write(3 * BLOCK + 10, b"hello")                  # read-modify-write of one block
    d.write(50 * BLOCK - 2, b"across")                 # spans two zero blocks
    assert d.read(3 * BLOCK + 10, 5) == b"hello"
    assert d.read(3 * BLOCK, 10) == snap.read(3 * BLOCK, 10)
    assert snap.read(3 * BLOCK + 10, 5) == whole[3 * BLOCK + 10:3 * BLOCK + 15]
    assert d.allocated_blocks() == [0, 3, 49, 50, 100, 160]
    assert snap.allocated_blocks() == [0, 3, 100, 160]
    assert snap.sha256() == hashlib.sha256(whole).hexdigest()
    assert d != snap
    snap.write(0, bytes(BLOCK))                        # zeroing frees the block
    assert snap.allocated_blocks() == [3, 100, 160]
    assert d.read(0, BLOCK) == whole[:BLOCK]
    with pytest.raises(ValueError):
        d.write(d.virtual_size - 2, b"abc")
    e = Disk.empty(3 * MiB)
    assert e.allocated_blocks() == [] and e.physical_utilisation == 0


def test_disk_iter_raw_reuses_one_zero_buffer_and_costs_no_memory():
    big = Disk(50 << 30, seed=1, blocks=[0, 1000, 819199])   # 50 GiB
    chunks = big.iter_raw(4 * MiB)
    zero = disks_mod.zeros(4 * MiB)
    n = 0
    nonzero = []
    t = time.monotonic()
    for i, c in enumerate(chunks):
        n += len(c)
        if c is not zero:                                    # not the shared buffer
            assert c.count(0) != len(c)
            nonzero.append(i)
    assert n == 50 << 30
    assert nonzero == [0, 1000 * BLOCK // (4 * MiB), 819199 * BLOCK // (4 * MiB)]
    assert time.monotonic() - t < 30
    assert big.physical_utilisation == 3 * BLOCK
    # partial last chunk and odd chunk sizes
    d = Disk(5 * MiB + 7, seed=2, blocks=[80])
    assert b"".join(d.iter_raw(3 * MiB)) == d.read(0, d.virtual_size)
    assert [len(c) for c in d.iter_raw(2 * MiB)] == [2 * MiB, 2 * MiB, MiB + 7]


# ---------------------------------------------------------------------------
# XVA
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("size", [6 * MiB, 5 * MiB + 3 * 512 + BLOCK])
def test_xva_sha1_is_reassembled_by_xva_img(tmp_path, size):
    need("xva-img")
    tar = need("tar")
    # Ref:10 sorts before Ref:2; one disk's last chunk is zero (still present)
    d2 = Disk(size, seed=3, blocks=[0, 17, 18, 40, (size - 1) // BLOCK])
    d10 = Disk(3 * MiB, seed=4, blocks=[20])
    data = xva_bytes([("Ref:2", d2), ("Ref:10", d10)], checksum="sha1")
    path = tmp_path / "vm.xva"
    path.write_bytes(data)
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run([tar, "-xf", str(path), "-C", str(out)], check=True)
    listing = subprocess.run([tar, "-tf", str(path)], check=True, stdout=subprocess.PIPE,
                             universal_newlines=True).stdout.split()
    assert listing[0] == "ova.xml"
    assert listing == xva_members([("Ref:2", d2), ("Ref:10", d10)], "sha1")
    assert listing.index("Ref:10/00000000") < listing.index("Ref:2/00000000")
    assert "Ref:2/00000005" in listing                          # zero, but last
    assert "Ref:2/00000003" not in listing and "Ref:2/00000004" not in listing
    for export_id, disk in (("Ref:2", d2), ("Ref:10", d10)):
        raw = tmp_path / (export_id.replace(":", "_") + ".raw")
        subprocess.run(["xva-img", "-s", "disk-export", str(out / export_id) + "/", str(raw)],
                       check=True, stdout=subprocess.DEVNULL)
        assert raw.stat().st_size == disk.virtual_size
        assert sha256_file(raw) == disk.sha256()
    ova, parsed = parse_xva(io.BytesIO(data))
    assert ova == (out / "ova.xml").read_bytes()
    assert sorted(parsed) == ["Ref:10", "Ref:2"]
    assert parsed["Ref:2"] == d2 and parsed["Ref:10"] == d10


def test_xva_xxhash_members_and_tar_headers():
    size = 7 * MiB + 4096
    d = Disk(size, seed=9, blocks=[16 * 3, 16 * 3 + 1, 16 * 5 + 2])
    t0 = int(time.time())
    data = xva_bytes([("Ref:5", d)])
    assert data.endswith(bytes(1024)) and len(data) % 512 == 0
    members = tar_members(data)
    names = [m[0] for m in members]
    assert names[0] == "ova.xml"
    assert abs(members[0][2] - t0) <= 5                      # ova.xml mtime = now
    assert names[1:] == ["Ref:5/00000000", "Ref:5/00000000.xxhash",
                         "Ref:5/00000003", "Ref:5/00000003.xxhash",
                         "Ref:5/00000005", "Ref:5/00000005.xxhash",
                         "Ref:5/00000007", "Ref:5/00000007.xxhash"]
    byname = {m[0]: m for m in members}
    for name, size_, mtime, uid, gid, body in members[1:]:
        assert (mtime, uid, gid) == (0, 0, 0)
        if name.endswith(".xxhash"):
            chunk = byname[name[:-len(".xxhash")]][5]
            assert body == xxhash.xxh64(chunk).hexdigest().upper().encode()
            assert len(body) == 16
        else:
            n = int(name.split("/")[1])
            assert body == d.read(n * CHUNK, CHUNK)
    assert byname["Ref:5/00000000"][5] == bytes(CHUNK)           # zero, but first
    assert byname["Ref:5/00000007"][1] == 4096                   # partial last chunk
    # GNU tar reads the same members
    if shutil.which("tar"):
        p = subprocess.run(["tar", "-tvf", "-"], input=data, stdout=subprocess.PIPE, check=True)
        assert p.stdout.decode().count("1970-01-01") == len(members) - 1


def test_xva_keepalive_chunks_are_counters_not_offsets(tmp_path):
    size = 6 * MiB
    d = Disk(size, seed=11, blocks=[16 * 2, 16 * 4 + 3])
    # keepalive=0: before every chunk position that is neither first nor last
    data = xva_bytes([("Ref:1", d)], keepalive=0)
    names = [m[0] for m in tar_members(data) if not m[0].endswith(".xxhash")]
    sizes = {m[0]: m[1] for m in tar_members(data)}
    # positions 1..4 each get a keep-alive (counter advances), zero 1 and 3 skipped
    assert names == ["ova.xml", "Ref:1/00000000",
                     "Ref:1/00000001",                   # keep-alive before position 1
                     "Ref:1/00000003",                   # keep-alive before position 2
                     "Ref:1/00000004",                   # position 2 (data)
                     "Ref:1/00000005",                   # keep-alive before position 3
                     "Ref:1/00000007",                   # keep-alive before position 4
                     "Ref:1/00000008",                   # position 4 (data)
                     "Ref:1/00000009"]                   # position 5 = last, no keep-alive
    assert [sizes[n] for n in names[2:]] == [0, 0, CHUNK, 0, 0, CHUNK, CHUNK]
    assert sizes["Ref:1/00000001.xxhash"] == 16
    _, parsed = parse_xva(io.BytesIO(data))
    assert parsed["Ref:1"] == d and parsed["Ref:1"].sha256() == d.sha256()

    # a naive reader (offset = counter * 1 MiB) gets it wrong
    naive = bytearray(size + 10 * MiB)
    for name, n, _, _, _, body in tar_members(data):
        if name.startswith("Ref:1/") and not name.endswith(".xxhash"):
            off = int(name.split("/")[1]) * CHUNK
            naive[off:off + n] = body
    assert hashlib.sha256(bytes(naive[:size])).hexdigest() != d.sha256()

    # a slow consumer makes them appear with a real timeout
    gen = xva_stream(ova_xml({"Ref:1": size}), [("Ref:1", d)], keepalive=0.05)
    pieces = []
    for piece in gen:
        pieces.append(piece)
        if len(pieces) < 8:
            time.sleep(0.08)
    slow = b"".join(pieces)
    assert any(m[1] == 0 and not m[0].endswith(".xxhash") for m in tar_members(slow))
    assert parse_xva(io.BytesIO(slow))[1]["Ref:1"] == d


@pytest.mark.parametrize("algo,tool", [("gzip", "gzip"), ("zstd", "zstd")])
def test_compress_matches_binaries_and_parses(tmp_path, algo, tool):
    need(tool)
    d = Disk(4 * MiB + 512, seed=5, blocks=[1, 2, 40, 64])
    disks = [("Ref:3", d)]
    plain = xva_bytes(disks)
    z = b"".join(compress(iter([plain[i:i + 100000] for i in range(0, len(plain), 100000)]),
                          algo))
    assert z[:4] != plain[:4]
    out = subprocess.run([tool, "-dc"], input=z, stdout=subprocess.PIPE, check=True).stdout
    assert out == plain
    assert decompress_reader(io.BytesIO(z)).read() == plain
    ova, parsed = parse_xva(io.BytesIO(z))
    assert parsed["Ref:3"] == d
    # streaming from a real pipe-like file object
    path = tmp_path / "vm.xva"
    with open(path, "wb") as f:
        for piece in compress(xva_stream(ova, disks), algo):
            f.write(piece)
    with open(path, "rb") as f:
        assert parse_xva(f)[1]["Ref:3"].sha256() == d.sha256()
    # a damaged compressed stream is an XvaError
    bad = z[:len(z) // 2]
    with pytest.raises(XvaError):
        parse_xva(io.BytesIO(bad))


@pytest.mark.parametrize("algo", ["gzip", "zstd"])
def test_compress_closed_early_kills_the_compressor(algo):
    need(algo)
    d = Disk(64 * MiB, seed=6, blocks=range(0, 1024))       # dense: 64 MiB
    closed = []

    def source():
        try:
            for piece in xva_stream(ova_xml({"Ref:1": d.virtual_size}), [("Ref:1", d)]):
                yield piece
        finally:
            closed.append(True)

    gen = compress(source(), algo)
    first = next(gen)
    assert first
    pid = compress.last_pid
    assert os.path.exists("/proc/%d" % pid)
    gen.close()
    gc.collect()
    # the process is gone and reaped (no zombie); the input iterator was closed
    deadline = time.monotonic() + 5
    while os.path.exists("/proc/%d" % pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists("/proc/%d" % pid)
    deadline = time.monotonic() + 5
    while not closed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert closed


def test_parse_xva_accepts_tars_written_by_other_tools(tmp_path):
    tar = need("tar")
    d1 = Disk(3 * MiB, seed=1, blocks=[5, 33])
    d2 = Disk(2 * MiB + 512, seed=2, blocks=[32])
    data = xva_bytes([("Ref:1", d1), ("Ref:22", d2)], checksum="sha1")
    names = [m[0] for m in tar_members(data)]
    src = tmp_path / "x"
    src.mkdir()
    subprocess.run([tar, "-xf", "-", "-C", str(src)], input=data, check=True)
    # GNU tar (gnu format) with the members in xapi's order
    gnu = tmp_path / "gnu.xva"
    subprocess.run([tar, "-cf", str(gnu), "--no-recursion", "-C", str(src)] + names,
                   check=True)
    with open(str(gnu), "rb") as f:
        _, parsed = parse_xva(f)
    assert parsed["Ref:1"] == d1 and parsed["Ref:22"] == d2
    # Python's tarfile in pax format, gzip-compressed
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as t:
        for name in names:
            t.add(str(src / name), arcname=name)
    _, parsed = parse_xva(io.BytesIO(buf.getvalue()))
    assert parsed["Ref:1"] == d1 and parsed["Ref:22"] == d2
    # what xapi's importer rejects: ./ prefixes, directory entries, wrong order
    for members, match in (
            (["./" + n for n in names], "ova.xml"),
            (names[:1] + ["Ref:1"] + names[1:], "unexpected member"),
            (names[:1] + [n for n in names if n.startswith("Ref:22")]
             + [n for n in names if n.startswith("Ref:1/")], "lexicographic"),
            (names[:2] + names[3:], "followed by")):
        bad = tmp_path / "bad.xva"
        subprocess.run([tar, "-cf", str(bad), "--no-recursion", "-C", str(src)] + members,
                       check=True)
        with pytest.raises(XvaError, match=match):
            with open(str(bad), "rb") as f:
                parse_xva(f)


def test_parse_xva_rejects_damaged_input():
    d = Disk(3 * MiB, seed=1, blocks=[20, 40])
    good = xva_bytes([("Ref:1", d)])
    # flipped byte inside chunk 1's data
    members = tar_members(good)
    pos = good.index(d.read(CHUNK + 4 * BLOCK, 64))
    bad = bytearray(good)
    bad[pos + 10] ^= 0x40
    with pytest.raises(XvaError, match="checksum mismatch"):
        parse_xva(io.BytesIO(bytes(bad)))
    # force: verify=False imports it anyway
    _, parsed = parse_xva(io.BytesIO(bytes(bad)), verify=False)
    assert parsed["Ref:1"] != d
    # truncated tail: inside a member, and at a member boundary (last chunk missing)
    with pytest.raises(XvaError, match="truncated"):
        parse_xva(io.BytesIO(good[:len(good) - 3000]))
    last = good.index(b"Ref:1/00000002\0")
    with pytest.raises(XvaError, match="truncated"):
        parse_xva(io.BytesIO(good[:last]))
    # like xapi, a missing end-of-archive marker alone is accepted
    assert parse_xva(io.BytesIO(good[:len(good) - 1024]))[1]["Ref:1"] == d
    # the checksum text must match exactly (xapi compares strings)
    lower = good.replace(xxhash.xxh64(d.read(0, CHUNK)).hexdigest().upper().encode(),
                         xxhash.xxh64(d.read(0, CHUNK)).hexdigest().encode())
    assert lower != good
    with pytest.raises(XvaError, match="checksum mismatch"):
        parse_xva(io.BytesIO(lower))
    # first member not ova.xml
    other = tar_members(good)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, _, _, _, _, body in reversed(other):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            t.addfile(info, io.BytesIO(body))
    with pytest.raises(XvaError, match="ova.xml"):
        parse_xva(io.BytesIO(buf.getvalue()))
    # a damaged tar header
    hdr = bytearray(good)
    hdr[512 * ((len(members[0][5]) + 511) // 512 + 1) + 5] ^= 1
    with pytest.raises(XvaError, match="header"):
        parse_xva(io.BytesIO(bytes(hdr)))
    with pytest.raises(XvaError):
        parse_xva(io.BytesIO(b""))


def test_xva_of_a_1gib_sparse_disk_through_xva_img(tmp_path):
    need("xva-img")
    d = Disk(1 << 30, seed=12, blocks=[0, 7, 5000, 16383])
    path = tmp_path / "big.xva"
    t = time.monotonic()
    with open(str(path), "wb") as f:
        for piece in xva_stream(ova_xml({"Ref:9": d.virtual_size}), [("Ref:9", d)],
                                checksum="sha1"):
            f.write(piece)
    assert time.monotonic() - t < 10
    assert path.stat().st_size < 6 * MiB
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["tar", "-xf", str(path), "-C", str(out)], check=True)
    raw = tmp_path / "big.raw"
    subprocess.run(["xva-img", "-s", "disk-export", str(out / "Ref:9") + "/", str(raw)],
                   check=True, stdout=subprocess.DEVNULL)
    assert raw.stat().st_size == 1 << 30
    assert file_equals_disk(raw, d)
    for off in (7 * BLOCK + 5, 300 * MiB):                  # in data, in a hole
        other = d.clone()
        other.write(off, b"\x01")
        assert not file_equals_disk(raw, other)
    with open(str(path), "rb") as f:
        assert parse_xva(f)[1]["Ref:9"] == d


# ---------------------------------------------------------------------------
# VHD
# ---------------------------------------------------------------------------

def qemu_opts(path):
    return "driver=vpc,force_size_calc=current_size,file.filename=%s" % path


@pytest.mark.parametrize("size", [64 * MiB, 5 * MiB + 512 * 7])
def test_vhd_stream_is_read_by_qemu_img(tmp_path, size):
    qemu = need("qemu-img")
    d = Disk(size, seed=21, blocks=[0, 1, 33, 64, (size - 1) // BLOCK])
    data = b"".join(vhd_stream(d))
    assert len(data) == vhd_length(d)
    path = tmp_path / "disk.vhd"
    path.write_bytes(data)
    info = subprocess.run([qemu, "info", "--output=json", "--image-opts", qemu_opts(path)],
                          stdout=subprocess.PIPE, check=True, universal_newlines=True).stdout
    info = json.loads(info)
    assert info["format"] == "vpc"
    assert info["virtual-size"] == size
    raw = tmp_path / "disk.raw"
    subprocess.run([qemu, "convert", "--image-opts", qemu_opts(path), "-O", "raw", str(raw)],
                   check=True)
    assert sha256_file(raw) == d.sha256()
    subprocess.run([qemu, "compare", "--image-opts", "driver=raw,file.filename=%s" % raw,
                    qemu_opts(path)], check=True, stdout=subprocess.DEVNULL)
    d2 = d.clone()
    d2.write(3 * MiB, b"x")
    raw.write_bytes(d2.to_bytes())
    p = subprocess.run([qemu, "compare", "--image-opts", "driver=raw,file.filename=%s" % raw,
                        qemu_opts(path)], stdout=subprocess.PIPE)
    assert p.returncode == 1                                  # images differ
    assert parse_vhd(io.BytesIO(data)) == d


def test_vhd_layout_matches_vhd_tool():
    size = 9 * MiB + 512
    d = Disk(size, seed=3, blocks=[40, 100])                  # VHD blocks 1 and 3
    data = b"".join(vhd_stream(d, uid="12345678-1234-5678-1234-567812345678"))
    footer = parse_footer(data[:512])
    assert data[:512] == data[-512:]
    assert footer["creator_app"] == b"caml" and footer["creator_version"] == 1
    assert footer["creator_os"] == 0 and footer["features"] == 2
    assert footer["disk_type"] == 3 and footer["data_offset"] == 512
    assert footer["current_size"] == footer["original_size"] == size
    assert str(footer["uid"]) == "12345678-1234-5678-1234-567812345678"
    assert footer["geometry"] == geometry(size)
    header = parse_header(data[512:1536])
    assert header["table_offset"] == 2048 and header["block_size"] == 2 * MiB
    assert header["max_table_entries"] == 5
    assert data[1536:2048] == bytes(512)
    bat = struct.unpack(">128I", data[2048:2560])
    assert bat[0] == bat[2] == bat[4] == 0xFFFFFFFF
    assert bat[1] == 2560 // 512 and bat[3] == (2560 + 512 + 2 * MiB) // 512
    assert set(bat[5:]) == {0xFFFFFFFF}                       # padding: 0xFF
    assert data[2560:3072] == b"\xff" * 512                   # all-ones bitmap
    assert data[3072:3072 + 2 * MiB] == d.read(2 * MiB, 2 * MiB)
    assert len(data) == 2560 + 2 * (512 + 2 * MiB) + 512
    # two streams differ only in the random uid (and so the checksum)
    a, b = b"".join(vhd_stream(d)), b"".join(vhd_stream(d))
    assert a[:64] == b[:64] and a[68:84] != b[68:84] and a[512:-512] == b[512:-512]
    # geometry as the VHD spec's CHS algorithm computes it (worked by hand)
    assert geometry(64 * MiB) == (963, 8, 17)
    assert geometry(2040 << 30) == (65535, 16, 255)


def test_vhd_geometry_is_what_qemu_sees_without_force_size_calc(tmp_path):
    """vhd-tool's creator 'caml' makes qemu size the disk from the CHS geometry
    (facts section 13): our geometry must be the spec's, i.e. the same qemu reads."""
    qemu = need("qemu-img")
    for size in (64 * MiB, 1000 * MiB + 512, 40 << 30):
        d = Disk(size, seed=1, blocks=[0])
        path = tmp_path / "g.vhd"
        with open(str(path), "wb") as f:
            for piece in vhd_stream(d):
                f.write(piece)
        info = json.loads(subprocess.run([qemu, "info", "--output=json", "-f", "vpc", str(path)],
                                         stdout=subprocess.PIPE, check=True).stdout)
        c, h, s = geometry(size)
        assert info["virtual-size"] == c * h * s * 512 < size
        # the spec rounds down: one more cylinder would exceed the size
        assert (c + 1) * h * s * 512 > size


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_parse_vhd_reads_qemu_images(tmp_path, subformat):
    qemu = need("qemu-img")
    size = 7 * MiB
    d = Disk(size, seed=31, blocks=[0, 32, 33, 80, 111])
    raw = tmp_path / "in.raw"
    raw.write_bytes(d.to_bytes())
    vhd = tmp_path / "out.vhd"
    subprocess.run([qemu, "convert", "-f", "raw", "-O", "vpc", "-o",
                    "subformat=%s,force_size=on" % subformat, str(raw), str(vhd)], check=True)
    with open(str(vhd), "rb") as f:
        got = parse_vhd(f)
    assert got.virtual_size == size
    assert got.sha256() == d.sha256()
    # from a non-seekable pipe too
    with subprocess.Popen(["cat", str(vhd)], stdout=subprocess.PIPE) as p:
        assert parse_vhd(p.stdout) == d


def test_vhd_of_a_2gib_sparse_disk_round_trips_through_qemu(tmp_path):
    qemu = need("qemu-img")
    d = Disk(2 << 30, seed=41, blocks=[1, 4000, 32767])
    path = tmp_path / "big.vhd"
    with open(str(path), "wb") as f:
        for piece in vhd_stream(d):
            f.write(piece)
    assert path.stat().st_size == vhd_length(d) < 8 * MiB
    raw = tmp_path / "big.raw"
    subprocess.run([qemu, "convert", "--image-opts", qemu_opts(path), "-O", "raw", str(raw)],
                   check=True)
    assert raw.stat().st_size == 2 << 30
    assert file_equals_disk(raw, d)
    subprocess.run([qemu, "compare", "--image-opts", "driver=raw,file.filename=%s" % raw,
                    qemu_opts(path)], check=True, stdout=subprocess.DEVNULL)
    with open(str(path), "rb") as f:
        assert parse_vhd(f) == d


def test_parse_vhd_rejects_damaged_input():
    d = Disk(5 * MiB, seed=2, blocks=[3, 50])
    good = b"".join(vhd_stream(d))
    bad = bytearray(good)
    bad[40] ^= 1                                            # original_size in the copy
    with pytest.raises(VhdError, match="footer checksum"):
        parse_vhd(io.BytesIO(bytes(bad)))
    bad = bytearray(good)
    bad[512 + 100] ^= 1                                     # dynamic header
    with pytest.raises(VhdError, match="header checksum"):
        parse_vhd(io.BytesIO(bytes(bad)))
    bad = bytearray(good)
    bad[512:520] = b"xxsparse"
    with pytest.raises(VhdError, match="cookie"):
        parse_vhd(io.BytesIO(bytes(bad)))
    with pytest.raises(VhdError, match="truncated"):
        parse_vhd(io.BytesIO(good[:len(good) - 1000]))
    with pytest.raises(VhdError, match="truncated"):
        parse_vhd(io.BytesIO(good[:len(good) - 512]))      # no trailing footer
    with pytest.raises(VhdError):
        parse_vhd(io.BytesIO(b"not a vhd at all" * 100))
    bad = bytearray(good)
    bad[-512 + 64] ^= 1                                     # trailing footer checksum
    with pytest.raises(VhdError, match="footer checksum"):
        parse_vhd(io.BytesIO(bytes(bad)))


def test_parse_vhd_differencing_applies_onto_base():
    base = Disk(4 * MiB, seed=1, blocks=[0, 40])
    child = base.clone()
    child.write(BLOCK * 40 + 512, b"y" * 512)
    # hand-made differencing VHD: footer type 4, one block with only sector 1+... set
    from xapisim.vhd import make_footer, make_header, SECTOR
    footer = make_footer(base.virtual_size, disk_type=4)
    header = make_header(base.virtual_size)
    bat = bytearray(b"\xff" * 512)
    struct.pack_into(">I", bat, 4, (2048 + 512) // SECTOR)   # VHD block 1 (2-4 MiB)
    bitmap = bytearray(512)
    sec = (BLOCK * 40 + 512 - 2 * MiB) // 512
    bitmap[sec >> 3] |= 0x80 >> (sec & 7)
    block = child.read(2 * MiB, 2 * MiB)
    data = footer + header + bytes(512) + bytes(bat) + bytes(bitmap) + block + footer
    got = parse_vhd(io.BytesIO(data), base=base)
    assert got == child
    assert base.read(BLOCK * 40 + 512, 1) != b"y"


def test_disk_module_has_no_big_allocations():
    # generated blocks come from a fixed pool: a 64 KiB read is cheap and stable
    a = disks_mod.generate_block(1, 2)
    assert a == disks_mod._make_block(1, 2) and len(a) == BLOCK
    assert a != disks_mod._make_block(2, 1)
