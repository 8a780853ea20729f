"""VHD files on the backup storage: the writer, the reader of XAPI's stream, the chain reader.

Every file is checked by tools nobody here wrote: `vhdiinfo` (libvhdi-utils) reads its
header and parent link, libvhdi (Debian's python3-libvhdi, run by the system Python in a
subprocess) reads a differencing file on top of its parent, and `qemu-img compare` reads
dynamic ones (it cannot read a differencing VHD, facts §13).
"""
import io
import json
import os
import random
import subprocess

import pytest

import vmbackup
from vmbackup import (BadFile, ChainBroken, ChainReader, ParentRef, VhdWriter, reparent_vhd,
                      vhd_info, write_vhd_from_raw)
from xapisim.disks import Disk
from xapisim.vhd import vhd_stream

MIB = 1024 * 1024
SYSTEM_PYTHON = "/usr/bin/python3"

#: Reads a chain with libvhdi: argv = output file, then the VHDs oldest first.
LIBVHDI_READ = """
import sys, pyvhdi
files = []
for path in sys.argv[2:]:
    f = pyvhdi.file()
    f.open(path)
    if files:
        f.set_parent(files[-1])
    files.append(f)
top = files[-1]
size = top.get_media_size()
with open(sys.argv[1], "wb") as out:
    offset = 0
    while offset < size:
        n = min(4 << 20, size - offset)
        out.write(top.read_buffer_at_offset(n, offset))
        offset += n
"""


def libvhdi_bytes(tmp_path, *paths):
    """Return the disk libvhdi reads from a chain (full first)."""
    out = tmp_path / "libvhdi.raw"
    subprocess.run([SYSTEM_PYTHON, "-c", LIBVHDI_READ, str(out)] + [str(p) for p in paths],
                   check=True)
    return out.read_bytes()


XO_READ = os.path.join(os.path.dirname(os.path.abspath(__file__)), "xo-vhd", "read_chain.js")


def xo_bytes(tmp_path, newest):
    """Return the disk Xen Orchestra's VHD library (vhd-lib) reads from the chain ending at
    `newest`: it follows each parent name down to the full, into one synthetic VHD, which
    qemu-img then reads raw."""
    synthetic, raw = tmp_path / "xo-synthetic.vhd", tmp_path / "xo.raw"
    subprocess.run(["node", XO_READ, str(newest), str(synthetic)], check=True)
    subprocess.run(["qemu-img", "convert", "-O", "raw", "--image-opts",
                    "driver=vpc,force_size_calc=current_size,file.filename=%s" % synthetic,
                    str(raw)], check=True)
    return raw.read_bytes()


def vhdiinfo(path):
    """Return vhdiinfo's fields of a VHD as a dict (it must read the file cleanly)."""
    proc = subprocess.run(["vhdiinfo", str(path)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True)
    assert proc.returncode == 0, proc.stdout
    fields = {}
    for line in proc.stdout.splitlines():
        if ":" in line and line.startswith("\t"):
            key, value = line.split(":", 1)
            fields[key.strip()] = value.strip()
    return fields


def qemu_same(vhd, raw):
    """True if qemu-img reads the dynamic VHD as exactly the raw file's bytes."""
    proc = subprocess.run(
        ["qemu-img", "compare", "-q", "--image-opts",
         "driver=vpc,force_size_calc=current_size,file.filename=%s" % vhd,
         "driver=raw,file.filename=%s" % raw])
    return proc.returncode == 0


def write_vhd(path, size, writes, parent=None, uuid=None):
    """Write a VHD of `writes` [(offset, bytes)]; return its VhdInfo."""
    with open(str(path), "wb") as handle:
        writer = VhdWriter(handle, size, uuid=uuid, parent=parent)
        for offset, data in writes:
            writer.write(offset, data)
        return writer.close()


def scattered(rng, size, count, sectors_max, align=1):
    """Return `count` writes [(offset, data)] of whole sectors at random places; each run
    ends on a multiple of `align` sectors."""
    writes = []
    for _ in range(count):
        sectors = rng.randint(1, sectors_max)
        end = rng.randrange(sectors, size // 512 + 1)
        end -= end % align
        start = max(0, end - sectors)
        if end > start:
            writes.append((start * 512, rng.randbytes((end - start) * 512)))
    return writes


def apply(disk, writes):
    """Return a copy of the bytearray `disk` with `writes` applied."""
    out = bytearray(disk)
    for offset, data in writes:
        out[offset:offset + len(data)] = data
    return out


def test_dynamic_vhd_holds_exactly_the_sectors_written(tmp_path):
    rng = random.Random(1)
    size = 9 * MIB + 3 * 512                        # the last block is partial
    writes = scattered(rng, size, 40, 300) + [(0, rng.randbytes(512)),
                                              (size - 512, rng.randbytes(512))]
    expected = apply(bytearray(size), writes)
    info = write_vhd(tmp_path / "full.vhd", size, writes)
    (tmp_path / "full.raw").write_bytes(expected)

    assert info == vhd_info(str(tmp_path / "full.vhd"))
    assert (info.size, info.disk_type, info.parent_uuid) == (size, 3, None)
    fields = vhdiinfo(tmp_path / "full.vhd")
    assert fields["Disk type"] == "Dynamic"
    assert fields["Identifier"] == info.uuid
    assert "(%d bytes)" % size in fields["Media size"]
    assert qemu_same(tmp_path / "full.vhd", tmp_path / "full.raw")
    assert libvhdi_bytes(tmp_path, tmp_path / "full.vhd") == expected
    with ChainReader([str(tmp_path / "full.vhd")]) as chain:
        assert b"".join(chain.iter_raw(3 * MIB)) == expected
    written = set()
    for offset, data in writes:
        written.update(range(offset // 512, (offset + len(data)) // 512))
    assert info.data_bytes == len(written) * 512


def test_a_differencing_chain_reads_through_libvhdi_as_each_point(tmp_path):
    """A full and three deltas: libvhdi, following each file's parent, reads every point."""
    rng = random.Random(2)
    size = 12 * MIB
    # libvhdi (up to 20240303 at least) misreads a bitmap byte in which a run of present
    # sectors ends before the byte does, so runs end on 8 sectors here; CBT's 64 KiB
    # ranges always do. ChainReader is checked at any sector in the next test.
    disk = bytearray(size)
    full_writes = scattered(rng, size, 30, 2000, align=8)
    disk = apply(disk, full_writes)
    (tmp_path / "p0").mkdir()
    info = write_vhd(tmp_path / "p0" / "xvda.vhd", size, full_writes)
    points, states = [tmp_path / "p0" / "xvda.vhd"], [bytes(disk)]
    for n in range(1, 4):
        (tmp_path / ("p%d" % n)).mkdir()
        writes = scattered(rng, size, 25, 600, align=8)
        disk = apply(disk, writes)
        parent = ParentRef(info.uuid, "../p%d/xvda.vhd" % (n - 1))
        info = write_vhd(tmp_path / ("p%d" % n) / "xvda.vhd", size, writes, parent=parent)
        assert (info.disk_type, info.parent_uuid, info.parent_path) == (4, parent.uuid,
                                                                        parent.path)
        fields = vhdiinfo(points[-1])
        points.append(tmp_path / ("p%d" % n) / "xvda.vhd")
        states.append(bytes(disk))
        child = vhdiinfo(points[-1])
        assert child["Disk type"] == "Differential"
        assert child["Parent identifier"] == fields["Identifier"]
        assert child["Parent filename"] == parent.path
    for n in range(4):
        assert libvhdi_bytes(tmp_path, *points[:n + 1]) == states[n], "point %d" % n
        assert xo_bytes(tmp_path, points[n]) == states[n], "point %d" % n
        with ChainReader([str(p) for p in points[:n + 1]]) as chain:
            assert chain.size == size
            assert b"".join(chain.iter_raw()) == states[n]


@pytest.mark.parametrize("runs", [
    [(1, 1)], [(0, 3), (5, 2)], [(4095, 1)], [(7, 9), (100, 4000)], [(0, 4096)],
], ids=["one-sector", "two-runs-in-a-byte", "last-sector", "long-run", "whole-block"])
def test_chain_reader_takes_only_the_sectors_a_delta_holds(tmp_path, runs):
    """ChainReader and Xen Orchestra's VHD library agree at any sector (libvhdi misreads
    runs that end inside a bitmap byte: see the chain test above)."""
    rng = random.Random(3)
    size = 4 * MIB
    base = bytes(rng.randbytes(size))
    full = write_vhd(tmp_path / "full.vhd", size, [(0, base)])
    writes = [(s * 512, rng.randbytes(n * 512)) for s, n in runs]
    write_vhd(tmp_path / "delta.vhd", size, writes, parent=ParentRef(full.uuid, "full.vhd"))
    expected = bytes(apply(bytearray(base), writes))
    assert xo_bytes(tmp_path, tmp_path / "delta.vhd") == expected
    with ChainReader([str(tmp_path / "full.vhd"), str(tmp_path / "delta.vhd")]) as chain:
        assert chain.read(0, size) == expected
        assert chain.read(512, 1024) == bytes(apply(bytearray(base), writes)[512:1536])


def test_write_vhd_from_raw_leaves_zero_blocks_out(tmp_path):
    rng = random.Random(4)
    size = 10 * MIB
    raw = bytearray(size)
    raw[3 * MIB:3 * MIB + 4096] = rng.randbytes(4096)
    raw[size - 512:] = rng.randbytes(512)
    (tmp_path / "disk.raw").write_bytes(raw)
    with open(str(tmp_path / "disk.raw"), "rb") as src, open(str(tmp_path / "d.vhd"), "wb") as out:
        info = write_vhd_from_raw(src, out, size)
    assert info.blocks == 2
    assert os.path.getsize(str(tmp_path / "d.vhd")) < 5 * MIB
    assert qemu_same(tmp_path / "d.vhd", tmp_path / "disk.raw")
    assert vhdiinfo(tmp_path / "d.vhd")["Identifier"] == info.uuid
    with pytest.raises(BadFile, match="ended at byte"):
        write_vhd_from_raw(io.BytesIO(bytes(raw[:5 * MIB])), io.BytesIO(), size)


def sim_disk(size, seed, blocks):
    """A simulator disk with the given 64 KiB blocks filled."""
    return Disk(size, seed=seed, blocks=blocks)


def test_reparent_vhd_makes_xapis_differencing_export_a_link_of_the_chain(tmp_path):
    """/export_raw_vdi?format=vhd&base= as the simulator sends it, re-parented onto our full."""
    size = 16 * MIB
    disk = sim_disk(size, 7, range(0, 256, 5))
    (tmp_path / "full.raw").write_bytes(disk.to_bytes())
    with open(str(tmp_path / "full.raw"), "rb") as src, \
            open(str(tmp_path / "full.vhd"), "wb") as out:
        full = write_vhd_from_raw(src, out, size)
    snap = disk.clone()
    disk.write(3 * 65536, os.urandom(65536))
    disk.write(size - 65536, os.urandom(65536))
    changed = disk.changed_blocks(snap)
    stream = b"".join(vhd_stream(disk, parent={"uid": full.uuid, "name": "/dev/sm/whatever"},
                                 blocks=changed))
    parent = ParentRef(full.uuid, "full.vhd")
    with open(str(tmp_path / "delta.vhd"), "wb") as out:
        info = reparent_vhd(io.BytesIO(stream), out, parent)
    assert (info.disk_type, info.parent_uuid, info.parent_path) == (4, full.uuid, "full.vhd")
    assert info.blocks == 2 and info.data_bytes == 2 * 2 * MIB
    child = vhdiinfo(tmp_path / "delta.vhd")
    assert child["Parent identifier"] == full.uuid and child["Parent filename"] == "full.vhd"
    assert libvhdi_bytes(tmp_path, tmp_path / "full.vhd", tmp_path / "delta.vhd") == \
        disk.to_bytes()
    assert xo_bytes(tmp_path, tmp_path / "delta.vhd") == disk.to_bytes()
    with ChainReader([str(tmp_path / "full.vhd"), str(tmp_path / "delta.vhd")]) as chain:
        assert b"".join(chain.iter_raw()) == disk.to_bytes()


def test_reparent_vhd_of_a_dynamic_stream_without_parent_is_a_full(tmp_path):
    size = 6 * MIB + 4096
    disk = sim_disk(size, 9, [0, 1, 40, 96])
    (tmp_path / "disk.raw").write_bytes(disk.to_bytes())
    with open(str(tmp_path / "d.vhd"), "wb") as out:
        info = reparent_vhd(io.BytesIO(b"".join(vhd_stream(disk))), out, None)
    assert (info.disk_type, info.parent_uuid, info.size) == (3, None, size)
    assert qemu_same(tmp_path / "d.vhd", tmp_path / "disk.raw")


@pytest.mark.parametrize("cut", [100, 1600, 2048 + 40, -600, -10],
                         ids=["in-footer", "in-header", "in-bat", "in-last-block", "in-trailer"])
def test_reparent_vhd_refuses_a_cut_stream(cut):
    disk = sim_disk(4 * MIB, 1, [0, 33])
    stream = b"".join(vhd_stream(disk))
    with pytest.raises(BadFile):
        reparent_vhd(io.BytesIO(stream[:cut]), io.BytesIO(), ParentRef("12345678-1234-5678-1234-567812345678", "x"))


def test_chain_reader_refuses_a_broken_chain(tmp_path):
    size = 4 * MIB
    full = write_vhd(tmp_path / "full.vhd", size, [(0, b"\1" * 512)])
    other = write_vhd(tmp_path / "other.vhd", size, [(0, b"\2" * 512)])
    write_vhd(tmp_path / "d1.vhd", size, [(512, b"\3" * 512)],
              parent=ParentRef(other.uuid, "other.vhd"))
    write_vhd(tmp_path / "big.vhd", 2 * size, [(512, b"\3" * 512)],
              parent=ParentRef(full.uuid, "full.vhd"))
    cases = [([tmp_path / "full.vhd", tmp_path / "d1.vhd"], "d1.vhd names parent uuid"),
             ([tmp_path / "full.vhd", tmp_path / "big.vhd"], "big.vhd is 8388608 bytes"),
             ([tmp_path / "d1.vhd"], "d1.vhd is the chain's base but is not a dynamic"),
             ([tmp_path / "full.vhd", tmp_path / "gone.vhd"], "gone.vhd")]
    for paths, message in cases:
        with pytest.raises(ChainBroken, match=message) as caught:
            ChainReader([str(p) for p in paths])
        assert caught.value.exit_code == vmbackup.EXIT_ERROR
    data = (tmp_path / "full.vhd").read_bytes()
    (tmp_path / "cut.vhd").write_bytes(data[:-700])
    with pytest.raises(ChainBroken, match="cut.vhd"):
        ChainReader([str(tmp_path / "cut.vhd")])


def test_writer_refuses_writes_that_are_not_whole_sectors_inside_the_disk():
    writer = VhdWriter(io.BytesIO(), 4 * MIB)
    for offset, length in [(1, 512), (0, 100), (4 * MIB, 512), (-512, 512)]:
        with pytest.raises(ValueError):
            writer.write(offset, bytes(length))
    with pytest.raises(ValueError):
        VhdWriter(io.BytesIO(), 1000)


def test_vhd_info_is_json_friendly(tmp_path):
    info = write_vhd(tmp_path / "a.vhd", MIB, [(0, b"x" * 512)],
                     uuid="12345678-1234-5678-1234-567812345678")
    assert json.loads(json.dumps(info._asdict()))["uuid"] == "12345678-1234-5678-1234-567812345678"
