"""Dynamic VHDs as ``vhd-tool stream`` writes them for /export_raw_vdi?format=vhd,
and a streaming VHD reader for /import_raw_vdi?format=vhd.

Layout (facts §6, ``vhd_format/f.ml`` ``vhd_common``): bytes 0-511 footer copy,
512-1535 dynamic header, 1536-2047 an empty sector, BAT at 2048 (big-endian
sector offsets, 0xFFFFFFFF = absent, padded with 0xFF to a sector boundary),
then for every included 2 MiB block in increasing order a 512-byte all-ones
sector bitmap and the 2 MiB of data, then the footer again.
"""

import struct
import uuid as _uuid

from .disks import BLOCK, Disk, zeros

SECTOR = 512
VHD_BLOCK = 2 << 20                     # 2 MiB (block_size_sectors_shift = 12)
BITMAP_SIZE = VHD_BLOCK // SECTOR // 8  # 512 bytes
DATA_OFFSET = 512
TABLE_OFFSET = 2048
MAX_VHD_SIZE = 2040 << 30
UNUSED = 0xFFFFFFFF
FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
DISK_FIXED, DISK_DYNAMIC, DISK_DIFFERENCING = 2, 3, 4
VHD_EPOCH = 946684800                   # 2000-01-01T00:00:00Z in Unix time

_FOOTER = struct.Struct(">8sIIQI4sIIQQHBBII16sB")      # 85 bytes, then 427 zero
_HEADER = struct.Struct(">8sQQIIII16sII")               # 64 bytes before the name


class VhdError(Exception):
    """A damaged or unsupported VHD."""


def checksum(buf):
    """VHD checksum: ones' complement of the byte sum (checksum field zeroed)."""
    return (~sum(buf)) & 0xFFFFFFFF


def geometry(size):
    """(cylinders, heads, sectors per track) for ``size`` bytes, as the VHD spec's
    CHS algorithm (and vhd_format's Geometry.of_sectors) computes it."""
    secs = min(size // SECTOR, 65535 * 16 * 255)
    if secs > 65535 * 16 * 63:
        spt = 255
        heads = 16
        cth = secs // spt
    else:
        spt = 17
        cth = secs // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt = 31
            heads = 16
            cth = secs // spt
        if cth >= heads * 1024:
            spt = 63
            heads = 16
            cth = secs // spt
    return cth // heads, heads, spt


def _uid_bytes(uid):
    if uid is None:
        return _uuid.uuid4().bytes
    if isinstance(uid, _uuid.UUID):
        return uid.bytes
    if isinstance(uid, (bytes, bytearray)) and len(uid) == 16:
        return bytes(uid)
    return _uuid.UUID(str(uid)).bytes


def make_footer(size, disk_type=DISK_DYNAMIC, uid=None, data_offset=DATA_OFFSET,
                timestamp=0, creator_app=b"caml", creator_version=1, creator_os=0):
    """A 512-byte VHD footer.  vhd-tool leaves ``time_stamp`` at 0 (= 2000-01-01)."""
    c, h, s = geometry(size)
    fields = [FOOTER_COOKIE, 2, 0x00010000, data_offset, timestamp & 0xFFFFFFFF,
              creator_app, creator_version, creator_os, size, size, c, h, s,
              disk_type, 0, _uid_bytes(uid), 0]
    buf = bytearray(_FOOTER.pack(*fields) + bytes(512 - _FOOTER.size))
    struct.pack_into(">I", buf, 64, checksum(buf))
    return bytes(buf)


PARENT_NAME_OFFSET = 64                 # UTF-16BE, 512 bytes
PARENT_LOCATOR_OFFSET = 576             # 8 entries of 24 bytes
LOCATOR_DATA_OFFSET = 1536              # the "empty sector" before the BAT
_LOCATOR = struct.Struct(">4sIIIQ")     # code, data space (sectors), length, reserved, offset


def make_header(size, table_offset=TABLE_OFFSET, parent=None):
    """A 1024-byte dynamic disk header.  ``parent`` (a differencing disk's) is a
    dict ``{"uid", "name", "timestamp"}``: as vhd-tool writes it (vhd_format
    f.ml ``Header.create`` with ``Parent_locator.from_filename``), the parent's
    footer uid, its file name in UTF-16BE, its modification time, and one MacX
    locator of the ``file://`` URI pointing at byte 1536 (a sector vhd-tool's
    stream leaves empty)."""
    entries = (size + VHD_BLOCK - 1) // VHD_BLOCK
    puid, pts = bytes(16), 0
    if parent:
        puid, pts = _uid_bytes(parent["uid"]), int(parent.get("timestamp", 0)) & 0xFFFFFFFF
    buf = bytearray(_HEADER.pack(HEADER_COOKIE, 0xFFFFFFFFFFFFFFFF, table_offset,
                                 0x00010000, entries, VHD_BLOCK, 0, puid, pts, 0)
                    + bytes(1024 - _HEADER.size))
    if parent:
        name = parent.get("name", "").encode("utf-16-be")[:512]
        buf[PARENT_NAME_OFFSET:PARENT_NAME_OFFSET + len(name)] = name
        uri = ("file://" + parent.get("name", "")).encode("utf-8")
        _LOCATOR.pack_into(buf, PARENT_LOCATOR_OFFSET, b"MacX", 1, len(uri), 0,
                           LOCATOR_DATA_OFFSET)
    struct.pack_into(">I", buf, 36, checksum(buf))
    return bytes(buf)


def _included_blocks(disk, blocks=None):
    """Sorted 2 MiB block indices: those holding allocated 64 KiB blocks, or (for
    a differencing disk) those containing any of the 64 KiB ``blocks`` given."""
    per = VHD_BLOCK // BLOCK
    if blocks is None:
        blocks = disk.allocated_blocks()
    entries = (disk.virtual_size + VHD_BLOCK - 1) // VHD_BLOCK
    return sorted({b // per for b in blocks if b // per < entries})


def _bat_size(entries):
    return (entries * 4 + SECTOR - 1) // SECTOR * SECTOR


def vhd_length(disk, blocks=None):
    """The exact byte length of ``vhd_stream(disk, blocks=blocks)``."""
    entries = (disk.virtual_size + VHD_BLOCK - 1) // VHD_BLOCK
    n = len(_included_blocks(disk, blocks))
    return TABLE_OFFSET + _bat_size(entries) + n * (BITMAP_SIZE + VHD_BLOCK) + SECTOR


def vhd_stream(disk, uid=None, timestamp=0, parent=None, blocks=None):
    """Yield a dynamic VHD of ``disk`` (bytes pieces), vhd-tool style.  With
    ``parent`` (see make_header) and ``blocks`` (64 KiB block indices) it is a
    differencing VHD (disk type 4) holding the 2 MiB blocks that contain them,
    as ``/export_raw_vdi?format=vhd&base=`` sends."""
    size = disk.virtual_size
    if size > MAX_VHD_SIZE:
        raise VhdError("VDI_TOO_LARGE: %d bytes is more than the 2040 GiB a VHD can hold"
                       % size)
    footer = make_footer(size, DISK_DIFFERENCING if parent else DISK_DYNAMIC, uid=uid,
                         timestamp=timestamp)
    header = make_header(size, parent=parent)
    entries = (size + VHD_BLOCK - 1) // VHD_BLOCK
    blocks = _included_blocks(disk, blocks)
    bat = bytearray(b"\xff" * _bat_size(entries))
    pos = TABLE_OFFSET + len(bat)
    for b in blocks:
        struct.pack_into(">I", bat, b * 4, pos // SECTOR)
        pos += BITMAP_SIZE + VHD_BLOCK
    yield footer + header + zeros(SECTOR) + bytes(bat)
    bitmap = b"\xff" * BITMAP_SIZE
    for b in blocks:
        off = b * VHD_BLOCK
        n = min(VHD_BLOCK, size - off)
        yield bitmap
        if n == VHD_BLOCK:
            yield disk.read(off, n)
        else:
            yield disk.read(off, n) + zeros(VHD_BLOCK - n)
    yield footer


def raw_diff_stream(disk, blocks):
    """``virtual_size`` raw bytes where only the 2 MiB blocks containing the 64
    KiB ``blocks`` carry data and every other block reads as zero: vhd-tool's
    raw output relative to a base (``Vhd_input.raw ?from``, ``Empty`` extents
    written as zeros), i.e. ``/export_raw_vdi?format=raw&base=``."""
    size = disk.virtual_size
    keep = set(_included_blocks(disk, blocks))
    for i in range((size + VHD_BLOCK - 1) // VHD_BLOCK):
        off = i * VHD_BLOCK
        n = min(VHD_BLOCK, size - off)
        yield disk.read(off, n) if i in keep else zeros(n)


# ---------------------------------------------------------------------------
# reader
# ---------------------------------------------------------------------------

def parse_footer(buf):
    """Decode and check a 512-byte footer; returns a dict."""
    if len(buf) < 512:
        raise VhdError("truncated VHD: footer shorter than 512 bytes")
    buf = bytes(buf[:512])
    f = _FOOTER.unpack_from(buf)
    if f[0] != FOOTER_COOKIE:
        raise VhdError("bad VHD footer cookie %r (expected %r)" % (f[0], FOOTER_COOKIE))
    stored = f[14]
    calc = checksum(buf[:64] + b"\0\0\0\0" + buf[68:])
    if stored != calc:
        raise VhdError("bad VHD footer checksum: stored %08x, computed %08x" % (stored, calc))
    if f[2] != 0x00010000:
        raise VhdError("unsupported VHD version %08x" % f[2])
    return {"features": f[1], "data_offset": f[3], "timestamp": f[4],
            "creator_app": f[5], "creator_version": f[6], "creator_os": f[7],
            "original_size": f[8], "current_size": f[9],
            "geometry": (f[10], f[11], f[12]), "disk_type": f[13], "checksum": stored,
            "uid": _uuid.UUID(bytes=f[15]), "saved_state": f[16]}


def parse_header(buf):
    """Decode and check a 1024-byte dynamic disk header; returns a dict."""
    if len(buf) < 1024:
        raise VhdError("truncated VHD: dynamic header shorter than 1024 bytes")
    buf = bytes(buf[:1024])
    h = _HEADER.unpack_from(buf)
    if h[0] != HEADER_COOKIE:
        raise VhdError("bad VHD dynamic header cookie %r (expected %r)" % (h[0], HEADER_COOKIE))
    stored = h[6]
    calc = checksum(buf[:36] + b"\0\0\0\0" + buf[40:])
    if stored != calc:
        raise VhdError("bad VHD header checksum: stored %08x, computed %08x" % (stored, calc))
    bs = h[5]
    if bs < SECTOR or bs & (bs - 1) or bs % SECTOR:
        raise VhdError("bad VHD block size %d" % bs)
    return {"table_offset": h[2], "version": h[3], "max_table_entries": h[4],
            "block_size": bs, "checksum": stored, "parent_uid": _uuid.UUID(bytes=h[7]),
            "parent_timestamp": h[8]}


class _Stream(object):
    def __init__(self, f):
        self.f = f
        self.pos = 0

    def read(self, n):
        parts = []
        got = 0
        while got < n:
            d = self.f.read(min(n - got, 4 << 20))
            if not d:
                break
            parts.append(d)
            got += len(d)
        self.pos += got
        return b"".join(parts)

    def read_exact(self, n, what):
        d = self.read(n)
        if len(d) < n:
            raise VhdError("truncated VHD: end of stream while reading %s at byte %d"
                           % (what, self.pos))
        return d

    def skip_to(self, target, what):
        if target < self.pos:
            raise VhdError("VHD %s at byte %d overlaps data already read (position %d)"
                           % (what, target, self.pos))
        while self.pos < target:
            self.read_exact(min(target - self.pos, 4 << 20), what)


def parse_vhd(fileobj, base=None):
    """Read a fixed, dynamic or differencing VHD from a (possibly non-seekable)
    stream into a :class:`Disk` of the footer's ``current_size``.

    Without ``base`` the result starts all-zero; with ``base`` (a Disk) it starts
    as a copy of ``base`` and only the sectors the VHD holds are applied (for a
    differencing VHD, sectors whose bitmap bit is clear come from ``base``).
    Raises :class:`VhdError` on bad cookies, checksums or truncation.
    """
    s = _Stream(fileobj)
    first = s.read(SECTOR)
    if len(first) < SECTOR:
        raise VhdError("truncated VHD: only %d bytes" % len(first))
    if first[:8] == FOOTER_COOKIE:
        footer = parse_footer(first)
        if footer["disk_type"] in (DISK_DYNAMIC, DISK_DIFFERENCING):
            return _parse_dynamic(s, footer, base)
        if footer["disk_type"] != DISK_FIXED:
            raise VhdError("unsupported VHD disk type %d" % footer["disk_type"])
        # a fixed disk has no leading footer copy: this sector is disk data that
        # happens to start with the cookie -- fall through
    return _parse_fixed(s, first, base)


def _new_disk(size, base):
    if base is None:
        return Disk.empty(size)
    d = base.clone()
    if d.virtual_size != size:
        d.resize(size)
    return d


def _parse_dynamic(s, footer, base):
    size = footer["current_size"]
    if size > MAX_VHD_SIZE:
        raise VhdError("VHD of %d bytes is larger than 2040 GiB" % size)
    s.skip_to(footer["data_offset"], "dynamic header")
    header = parse_header(s.read_exact(1024, "the dynamic header"))
    bs = header["block_size"]
    entries = header["max_table_entries"]
    if entries * bs < size:
        raise VhdError("VHD BAT (%d entries of %d bytes) does not cover %d bytes"
                       % (entries, bs, size))
    s.skip_to(header["table_offset"], "BAT")
    bat = s.read_exact(entries * 4, "the BAT")
    bitmap_len = (bs // SECTOR // 8 + SECTOR - 1) // SECTOR * SECTOR
    located = []
    for i in range(entries):
        (v,) = struct.unpack_from(">I", bat, i * 4)
        if v != UNUSED:
            located.append((v * SECTOR, i))
    located.sort()
    disk = _new_disk(size, base)
    differencing = footer["disk_type"] == DISK_DIFFERENCING
    sectors_per_block = bs // SECTOR
    for pos, i in located:
        s.skip_to(pos, "block %d" % i)
        bitmap = s.read_exact(bitmap_len, "the bitmap of block %d" % i)
        data = s.read_exact(bs, "block %d" % i)
        start = i * bs
        if start >= size:
            continue
        n = min(bs, size - start)
        full = bitmap[:sectors_per_block // 8].count(0xFF) == sectors_per_block // 8
        if full:
            disk.write(start, data[:n])
            continue
        # apply sector runs according to the bitmap
        mv = memoryview(data)
        j = 0
        while j < sectors_per_block:
            bit = (bitmap[j >> 3] >> (7 - (j & 7))) & 1
            k = j
            while k < sectors_per_block and ((bitmap[k >> 3] >> (7 - (k & 7))) & 1) == bit:
                k += 1
            a = j * SECTOR
            e = min(k * SECTOR, n)
            if a < e:
                if bit:
                    disk.write(start + a, mv[a:e].tobytes())
                elif not differencing:
                    disk.write(start + a, zeros(e - a))
            j = k
    # the rest: the trailing footer, the last 512 bytes of the stream
    tail = b""
    while True:
        d = s.read(4 << 20)
        if not d:
            break
        tail = (tail + d)[-SECTOR:]
    if len(tail) < SECTOR:
        raise VhdError("truncated VHD: the trailing footer is missing")
    trailer = parse_footer(tail)
    if trailer["current_size"] != size:
        raise VhdError("VHD footer copy and trailing footer disagree on the size "
                       "(%d vs %d)" % (size, trailer["current_size"]))
    return disk


def _parse_fixed(s, first, base):
    """Fixed VHD: raw data followed by a footer.  The size is known only at the end,
    so data is staged into a maximal disk and cut down afterwards."""
    stage = Disk.empty(MAX_VHD_SIZE + SECTOR)
    buf = first
    written = 0
    while True:
        d = s.read(4 << 20)
        if d:
            buf += d
        if len(buf) > SECTOR + (4 << 20) or (not d and len(buf) > SECTOR):
            n = len(buf) - SECTOR if not d else (len(buf) - SECTOR) // BLOCK * BLOCK
            piece = buf[:n]
            if piece.count(0) != len(piece):
                if written + len(piece) > stage.virtual_size:
                    raise VhdError("fixed VHD larger than 2040 GiB")
                stage.write(written, piece)
            written += len(piece)
            buf = buf[n:]
        if not d:
            break
    if len(buf) < SECTOR:
        raise VhdError("not a VHD: too short")
    if buf[:8] != FOOTER_COOKIE:
        raise VhdError("not a VHD: no %r cookie in the first or the last sector"
                       % FOOTER_COOKIE)
    footer = parse_footer(buf)
    if footer["disk_type"] != DISK_FIXED:
        raise VhdError("VHD footer at the end says disk type %d but there is no "
                       "leading footer copy (truncated dynamic VHD?)" % footer["disk_type"])
    size = footer["current_size"]
    if size != written:
        raise VhdError("fixed VHD holds %d data bytes but its footer says %d"
                       % (written, size))
    stage.resize(size)
    return stage        # a fixed VHD defines every byte: ``base`` does not matter
