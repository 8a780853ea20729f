"""Writing and reading VHD files on the backup storage: dynamic fulls, differencing deltas, chains.

A delta-export chain is a dynamic VHD (the full) and one differencing VHD per later point,
each naming its parent by the parent's footer uid and its path relative to the child's
folder, so libvhdi (vhdiinfo, pyvhdi) and Xen Orchestra's VHD library can read it.

Layout of the files this module writes: footer copy at 0, dynamic header at 512, the
parent locator's data (differencing only) from 1536, the BAT after it (padded to a
sector), then the blocks in the order they were first written, each a 512-byte sector
bitmap followed by 2 MiB of data, then the footer. The bitmap marks exactly the sectors
written: in a differencing file the others come from the parent.

Owns: VHD_BLOCK, SECTOR, CBT_BLOCK, ParentRef, VhdInfo, VhdWriter, write_vhd_from_raw,
reparent_vhd, vhd_info, read_vhd_layout, VhdLayout, ChainReader, sector_runs.
Imports: errors, util, formats.vhd.
"""

import os
import re
import struct
import time
import uuid as uuidlib
from typing import NamedTuple, Optional

from vmbackup.errors import BadFile, ChainBroken
from vmbackup.formats.vhd import VHD_FOOTER, VHD_HEADER, vhd_checksum, vhd_footer_problem


#: A VHD block (what one BAT entry allocates): 2 MiB, as vhd-tool and blktap write them.
VHD_BLOCK = 2 * 1024 * 1024

#: A VHD sector; every offset and length in a VHD is a multiple of it.
SECTOR = 512

#: The granularity of a CBT bitmap (one bit per 64 KiB of disk, facts §7).
CBT_BLOCK = 64 * 1024

#: Sectors in one VHD block, and the size of its sector bitmap (one bit each, in whole sectors).
BLOCK_SECTORS = VHD_BLOCK // SECTOR
BITMAP_BYTES = (BLOCK_SECTORS // 8 + SECTOR - 1) // SECTOR * SECTOR

#: A bitmap with every sector of a block present.
FULL_BITMAP = b"\xff" * (BLOCK_SECTORS // 8) + bytes(BITMAP_BYTES - BLOCK_SECTORS // 8)

#: Seconds between the Unix epoch and the VHD epoch (2000-01-01T00:00:00Z).
VHD_EPOCH = 946684800

#: A BAT entry for a block that is not allocated.
VHD_NO_BLOCK = 0xFFFFFFFF

VHD_DYNAMIC, VHD_DIFFERENCING = 3, 4

#: What this tool writes as the footer's creator application.
VHD_CREATOR = b"vmbk"

#: Offsets inside the dynamic header: parent unicode name (UTF-16BE, 512 bytes), 8 locators.
PARENT_NAME_AT, LOCATORS_AT, LOCATOR = 64, 576, struct.Struct(">4sIIIQ")

_ZERO_BLOCK = bytes(VHD_BLOCK)
_FULL_MASK = (1 << BLOCK_SECTORS) - 1


class ParentRef(NamedTuple):
    """The parent of a differencing VHD: its footer uid, its path relative to the child's
    folder (e.g. '../backup-2026-12-01-000000/xvda.vhd') and its footer timestamp (VHD epoch)."""
    uuid: str
    path: str
    timestamp: int = 0


class VhdInfo(NamedTuple):
    """What a VHD file is: uid, virtual size, disk type (3 dynamic, 4 differencing), its
    parent's uid and relative path (None for a dynamic VHD), allocated 2 MiB blocks and
    bytes of data (sectors present * 512)."""
    uuid: str
    size: int
    disk_type: int
    parent_uuid: Optional[str]
    parent_path: Optional[str]
    blocks: int
    data_bytes: int


def vhd_geometry(size):
    """Return the footer's packed CHS geometry for `size` bytes (the VHD specification's rule)."""
    sectors = min(size // SECTOR, 65535 * 16 * 255)
    if sectors >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cyl_heads = sectors // spt
    else:
        spt = 17
        cyl_heads = sectors // spt
        heads = max((cyl_heads + 1023) // 1024, 4)
        if cyl_heads >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cyl_heads = sectors // spt
        if cyl_heads >= heads * 1024:
            spt, heads = 63, 16
            cyl_heads = sectors // spt
    return ((cyl_heads // heads) << 16) | (heads << 8) | spt


def vhd_footer_bytes(size, disk_type, uid, timestamp):
    """Return a 512-byte footer of a dynamic or differencing VHD (data offset 512)."""
    block = bytearray(512)
    VHD_FOOTER.pack_into(block, 0, b"conectix", 2, 0x00010000, 512, timestamp & 0xFFFFFFFF,
                         struct.unpack(">I", VHD_CREATOR)[0], 0x00010000, 0x5769326B,
                         size, size, vhd_geometry(size), disk_type, 0, uid, 0)
    struct.pack_into(">I", block, 64, vhd_checksum(block, 64))
    return bytes(block)


def vhd_header_bytes(entries, table_offset, parent=None, locator_at=0):
    """Return a 1024-byte dynamic header; for a differencing VHD the parent's uid, timestamp,
    name and one W2ru locator (relative path, UTF-16LE) whose data sits at `locator_at`."""
    block = bytearray(1024)
    puid = uuidlib.UUID(parent.uuid).bytes if parent else bytes(16)
    VHD_HEADER.pack_into(block, 0, b"cxsparse", 0xFFFFFFFFFFFFFFFF, table_offset, 0x00010000,
                         entries, VHD_BLOCK, 0)
    struct.pack_into(">16sI", block, 40, puid, (parent.timestamp if parent else 0) & 0xFFFFFFFF)
    if parent:
        name = parent.path.encode("utf-16-be")[:512]
        block[PARENT_NAME_AT:PARENT_NAME_AT + len(name)] = name
        data = parent.path.encode("utf-16-le")
        LOCATOR.pack_into(block, LOCATORS_AT, b"W2ru", vhd_sectors(len(data)), len(data), 0,
                          locator_at)
    struct.pack_into(">I", block, 36, vhd_checksum(block, 36))
    return bytes(block)


def vhd_sectors(nbytes):
    """Return how many whole sectors hold `nbytes`."""
    return (nbytes + SECTOR - 1) // SECTOR


def vhd_uid_text(raw):
    """Return a 16-byte VHD uid as a uuid string."""
    return str(uuidlib.UUID(bytes=bytes(raw)))


def sector_runs(mask):
    """Return [(first, end)] runs of set bits of a block's sector mask (bit 0 = the last
    sector, as int.from_bytes(bitmap, 'big') gives it), in sector order."""
    text = format(mask, "0%db" % BLOCK_SECTORS)
    return [(m.start(), m.end()) for m in re.finditer("1+", text)]


def bitmap_mask(bitmap):
    """Return a block's sector bitmap as an int mask (see sector_runs)."""
    return int.from_bytes(bytes(bitmap[:BLOCK_SECTORS // 8]), "big")


def mask_bitmap(mask):
    """Return the on-disk sector bitmap (BITMAP_BYTES) of an int mask."""
    return mask.to_bytes(BLOCK_SECTORS // 8, "big") + bytes(BITMAP_BYTES - BLOCK_SECTORS // 8)


def _range_mask(first, end):
    """Return the mask of sectors first..end-1 of a block."""
    return ((1 << (end - first)) - 1) << (BLOCK_SECTORS - end)


class VhdWriter:
    """Write a dynamic (no parent) or differencing (parent=ParentRef) VHD into a seekable file.

    `write(offset, data)` in any order, offsets and lengths multiples of 512 inside `size`;
    a block is allocated on its first write and its bitmap marks exactly the sectors
    written. `close()` writes the BAT, the bitmaps, the header and both footers and
    returns the VhdInfo.
    """

    def __init__(self, fileobj, size, uuid=None, parent=None):
        if size <= 0 or size % SECTOR:
            raise ValueError("VHD size %d is not a positive multiple of 512" % size)
        self.fileobj, self.size, self.parent = fileobj, size, parent
        self.uid = uuidlib.UUID(uuid).bytes if uuid else uuidlib.uuid4().bytes
        self.entries = -(-size // VHD_BLOCK)
        self.locator = parent.path.encode("utf-16-le") if parent else b""
        self.table_offset = 1536 + vhd_sectors(len(self.locator)) * SECTOR
        self.end = self.table_offset + vhd_sectors(self.entries * 4) * SECTOR
        self.bat = {}           # block index -> file offset of its bitmap
        self.masks = {}         # block index -> sectors present (int mask)
        self.closed = False

    def _block_at(self, index):
        """Return the file offset of block `index`'s data, allocating it at the end."""
        at = self.bat.get(index)
        if at is None:
            at = self.bat[index] = self.end
            self.masks[index] = 0
            self.end += BITMAP_BYTES + VHD_BLOCK
        return at + BITMAP_BYTES

    def write(self, offset, data):
        """Write `data` at disk byte `offset` (both multiples of 512, inside the disk)."""
        length = len(data)
        if offset % SECTOR or length % SECTOR or offset < 0 or offset + length > self.size:
            raise ValueError("VHD write of %d bytes at %d: not whole sectors inside %d bytes"
                             % (length, offset, self.size))
        view = memoryview(data)
        done = 0
        while done < length:
            pos = offset + done
            index, within = divmod(pos, VHD_BLOCK)
            piece = min(length - done, VHD_BLOCK - within)
            at = self._block_at(index)
            self.fileobj.seek(at + within)
            self.fileobj.write(view[done:done + piece])
            self.masks[index] |= _range_mask(within // SECTOR, (within + piece) // SECTOR)
            done += piece

    def close(self):
        """Write the metadata (BAT, bitmaps, header, footers); return the VhdInfo."""
        if self.closed:
            raise ValueError("VHD writer already closed")
        self.closed = True
        handle = self.fileobj
        timestamp = int(time.time()) - VHD_EPOCH
        bat = bytearray(b"\xff" * (vhd_sectors(self.entries * 4) * SECTOR))
        for index, at in self.bat.items():
            struct.pack_into(">I", bat, index * 4, at // SECTOR)
            handle.seek(at)
            handle.write(mask_bitmap(self.masks[index]))
        handle.seek(self.table_offset)
        handle.write(bat)
        footer = vhd_footer_bytes(self.size, VHD_DIFFERENCING if self.parent else VHD_DYNAMIC, self.uid,
                             timestamp)
        handle.seek(0)
        handle.write(footer)
        handle.write(vhd_header_bytes(self.entries, self.table_offset, self.parent, 1536))
        if self.locator:
            handle.write(self.locator + bytes(vhd_sectors(len(self.locator)) * SECTOR
                                              - len(self.locator)))
        handle.seek(self.end)
        handle.write(footer)
        handle.truncate(self.end + SECTOR)
        handle.flush()
        present = sum(bin(m).count("1") for m in self.masks.values())
        return VhdInfo(vhd_uid_text(self.uid), self.size, VHD_DIFFERENCING if self.parent else VHD_DYNAMIC,
                       self.parent.uuid if self.parent else None,
                       self.parent.path if self.parent else None,
                       len(self.bat), present * SECTOR)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None and not self.closed:
            self.close()
        return False


def _read_into(reader, buf):
    """Fill `buf` from `reader` (readinto or read); return how many bytes came."""
    view = memoryview(buf)
    got = 0
    readinto = getattr(reader, "readinto", None)
    while got < len(buf):
        if readinto is not None:
            n = readinto(view[got:])
        else:
            data = reader.read(len(buf) - got)
            n = len(data)
            view[got:got + n] = data
        if not n:
            break
        got += n
    return got


def write_vhd_from_raw(reader, fileobj, size, uuid=None):
    """Copy `size` raw bytes from `reader` into a dynamic VHD in `fileobj`, leaving all-zero
    2 MiB blocks unallocated; return the VhdInfo. Raises BadFile if the stream is short."""
    writer = VhdWriter(fileobj, size, uuid=uuid)
    buf = bytearray(VHD_BLOCK)
    offset = 0
    while offset < size:
        want = min(VHD_BLOCK, size - offset)
        view = memoryview(buf)[:want]
        got = _read_into(reader, view)
        if got < want:
            raise BadFile("raw disk stream ended at byte %d of %d" % (offset + got, size))
        # bytearray == bytes is a memcmp; a memoryview comparison goes byte by byte
        if (buf if want == VHD_BLOCK else buf[:want]) != _ZERO_BLOCK[:want]:
            writer.write(offset, view)
        offset += want
    return writer.close()


def _parse_footer(block, where):
    """Return the footer fields of a sound 512-byte footer; raise BadFile naming `where`."""
    problem = vhd_footer_problem(block, "of " + where)
    if problem:
        raise BadFile(problem)
    fields = VHD_FOOTER.unpack_from(block)
    if fields[11] not in (VHD_DYNAMIC, VHD_DIFFERENCING):
        raise BadFile("%s: VHD disk type %d is neither dynamic nor differencing"
                      % (where, fields[11]))
    return fields


def _parse_header(block, where):
    """Return (table_offset, entries, block_size, parent uid bytes, parent timestamp)."""
    if len(block) < 1024 or block[:8] != b"cxsparse":
        raise BadFile("%s: no dynamic VHD header (no 'cxsparse' cookie)" % where)
    _, _, table_offset, _, entries, block_size, checksum = VHD_HEADER.unpack_from(block)
    if checksum != vhd_checksum(block[:1024], 36):
        raise BadFile("%s: dynamic VHD header checksum mismatch" % where)
    if block_size != VHD_BLOCK:
        raise BadFile("%s: VHD block size %d (only 2 MiB blocks are supported)"
                      % (where, block_size))
    puid, pstamp = struct.unpack_from(">16sI", block, 40)
    return table_offset, entries, block_size, puid, pstamp


class VhdLayout(NamedTuple):
    """A VHD file's metadata as read_vhd_layout finds it."""
    path: str
    uuid: str
    size: int
    disk_type: int
    parent_uuid: Optional[str]
    parent_path: Optional[str]
    bat: tuple                  # file offset of each block's bitmap, or None
    footer_at: int              # where the trailing footer starts
    table_offset: int
    timestamp: int


def _parent_path(handle, header):
    """Return the parent path a differencing header names (W2ru, W2ku, MacX, then the name)."""
    found = {}
    for n in range(8):
        code, _, length, _, at = LOCATOR.unpack_from(header, LOCATORS_AT + 24 * n)
        if code in (b"W2ru", b"W2ku", b"MacX") and 0 < length <= 65536:
            handle.seek(at)
            data = handle.read(length)
            try:
                text = data.decode("utf-8" if code == b"MacX" else "utf-16-le")
            except UnicodeDecodeError:
                continue
            found[code] = text[len("file://"):] if text.startswith("file://") else text
    for code in (b"W2ru", b"W2ku", b"MacX"):
        if found.get(code):
            return found[code]
    name = bytes(header[PARENT_NAME_AT:PARENT_NAME_AT + 512]).decode("utf-16-be", "replace")
    return name.rstrip("\0") or None


def read_vhd_layout(path):
    """Return the VhdLayout of a dynamic or differencing VHD file; raise BadFile naming it."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        total = handle.tell()
        if total < 2048 or total % SECTOR:
            raise BadFile("%s: %d bytes is not a dynamic VHD" % (path, total))
        handle.seek(total - SECTOR)
        footer = handle.read(SECTOR)
        fields = _parse_footer(footer, path)
        handle.seek(fields[3])
        header = handle.read(1024)
        table_offset, entries, _, puid, _ = _parse_header(header, path)
        size, disk_type = fields[9], fields[11]
        if entries * VHD_BLOCK < size:
            raise BadFile("%s: the BAT covers %d bytes, less than the disk's %d"
                          % (path, entries * VHD_BLOCK, size))
        if table_offset + entries * 4 > total - SECTOR:
            raise BadFile("%s: the BAT runs past the end of the file (truncated?)" % path)
        handle.seek(table_offset)
        raw = struct.unpack(">%dI" % entries, handle.read(entries * 4))
        bat = tuple(None if e == VHD_NO_BLOCK else e * SECTOR for e in raw)
        for index, at in enumerate(bat):
            if at is not None and at + BITMAP_BYTES + VHD_BLOCK > total - SECTOR:
                raise BadFile("%s: block %d lies past the end of the file (truncated?)"
                              % (path, index))
        parent_uuid = parent_path = None
        if disk_type == VHD_DIFFERENCING:
            parent_uuid = vhd_uid_text(puid)
            parent_path = _parent_path(handle, header)
    return VhdLayout(path, vhd_uid_text(fields[13]), size, disk_type, parent_uuid, parent_path,
                     bat, total - SECTOR, table_offset, fields[4])


def vhd_info(path):
    """Return the VhdInfo of a VHD file (reads its BAT and every bitmap); raise BadFile."""
    layout = read_vhd_layout(path)
    present = 0
    with open(path, "rb") as handle:
        for at in layout.bat:
            if at is not None:
                handle.seek(at)
                present += bin(bitmap_mask(handle.read(BITMAP_BYTES))).count("1")
    return VhdInfo(layout.uuid, layout.size, layout.disk_type, layout.parent_uuid,
                   layout.parent_path, sum(1 for at in layout.bat if at is not None),
                   present * SECTOR)


class _VhdStream:
    """A forward-only reader that counts its position (for vhd-tool's sequential stream)."""

    def __init__(self, reader):
        self.reader, self.pos = reader, 0

    def read_exact(self, length, what):
        buf = bytearray(length)
        got = _read_into(self.reader, buf)
        self.pos += got
        if got < length:
            raise BadFile("VHD stream ended at byte %d while reading %s" % (self.pos, what))
        return buf

    def skip_to(self, target, what):
        if target < self.pos:
            raise BadFile("VHD stream: %s at byte %d lies before byte %d already read"
                          % (what, target, self.pos))
        while self.pos < target:
            self.read_exact(min(target - self.pos, VHD_BLOCK), what)


def reparent_vhd(reader, fileobj, parent, uuid=None):
    """Read a VHD stream laid out as vhd-tool writes it (footer, header, BAT, blocks in
    increasing order, footer; dynamic or differencing) and write its sectors into `fileobj`
    as a differencing VHD of `parent` (a dynamic one if `parent` is None); return the VhdInfo.

    The stream's own parent fields are ignored. Its bitmaps say which sectors it holds:
    those are written, zero or not; the others come from `parent`. Raises BadFile on a
    damaged or short stream.
    """
    stream = _VhdStream(reader)
    fields = _parse_footer(stream.read_exact(SECTOR, "the footer copy"), "VHD stream")
    size = fields[9]
    stream.skip_to(fields[3], "the dynamic header")
    table_offset, entries, _, _, _ = _parse_header(stream.read_exact(1024, "the header"),
                                                   "VHD stream")
    if entries * VHD_BLOCK < size:
        raise BadFile("VHD stream: the BAT covers %d bytes, less than the disk's %d"
                      % (entries * VHD_BLOCK, size))
    stream.skip_to(table_offset, "the BAT")
    raw = struct.unpack(">%dI" % entries, stream.read_exact(entries * 4, "the BAT"))
    located = sorted((e * SECTOR, index) for index, e in enumerate(raw) if e != VHD_NO_BLOCK)
    writer = VhdWriter(fileobj, size, uuid=uuid, parent=parent)
    for at, index in located:
        stream.skip_to(at, "block %d" % index)
        mask = bitmap_mask(stream.read_exact(BITMAP_BYTES, "the bitmap of block %d" % index))
        data = memoryview(stream.read_exact(VHD_BLOCK, "block %d" % index))
        start = index * VHD_BLOCK
        for first, end in sector_runs(mask):
            last = min(start + end * SECTOR, size)
            if start + first * SECTOR < last:
                writer.write(start + first * SECTOR, data[first * SECTOR:last - start])
    tail, buf = b"", bytearray(1 << 20)
    while True:
        got = _read_into(stream.reader, buf)
        tail = (tail + bytes(buf[:got]))[-SECTOR:]
        if got < len(buf):
            break
    trailer = _parse_footer(tail, "VHD stream (trailing footer; truncated?)")
    if trailer[9] != size:
        raise BadFile("VHD stream: its two footers disagree on the size (%d and %d)"
                      % (size, trailer[9]))
    return writer.close()


class ChainReader:
    """Read a VHD chain (paths oldest first: the full, then each delta) as one raw disk.

    Checks that every child names the previous file's uid as its parent and has its size,
    else raises ChainBroken naming the file. `read(offset, length)`, `iter_raw(chunk)`.
    """

    def __init__(self, paths):
        if not paths:
            raise ChainBroken("an empty VHD chain")
        self.layouts = []
        for n, path in enumerate(paths):
            try:
                layout = read_vhd_layout(path)
            except (BadFile, OSError) as exc:
                raise ChainBroken("VHD chain: %s" % exc)
            if n == 0 and layout.disk_type != VHD_DYNAMIC:
                raise ChainBroken("VHD chain: %s is the chain's base but is not a dynamic VHD"
                                  % path)
            if n:
                prior = self.layouts[-1]
                if layout.disk_type != VHD_DIFFERENCING or layout.parent_uuid != prior.uuid:
                    raise ChainBroken("VHD chain: %s names parent uuid %s, but %s has uuid %s"
                                      % (path, layout.parent_uuid, prior.path, prior.uuid))
                if layout.size != prior.size:
                    raise ChainBroken("VHD chain: %s is %d bytes, its parent %s is %d bytes"
                                      % (path, layout.size, prior.path, prior.size))
            self.layouts.append(layout)
        self.size = self.layouts[0].size
        self.handles = [open(path, "rb") for path in paths]

    def _block(self, index):
        """Return block `index` of the disk (VHD_BLOCK bytes, the last one too)."""
        wanted = _FULL_MASK
        pieces = []             # (mask, handle, data offset), newest first
        for layout, handle in zip(reversed(self.layouts), reversed(self.handles)):
            at = layout.bat[index]
            if at is None:
                continue
            if layout.disk_type == VHD_DYNAMIC:
                mask = _FULL_MASK       # a dynamic VHD's data is its content, as qemu reads it
            else:
                handle.seek(at)
                mask = bitmap_mask(handle.read(BITMAP_BYTES))
            take = mask & wanted
            if take:
                pieces.append((take, handle, at + BITMAP_BYTES))
                wanted &= ~take
            if not wanted:
                break
        if not pieces:
            return _ZERO_BLOCK
        if len(pieces) == 1 and pieces[0][0] == _FULL_MASK:
            _, handle, at = pieces[0]
            handle.seek(at)
            return handle.read(VHD_BLOCK)
        out = bytearray(VHD_BLOCK)
        for take, handle, at in pieces:
            for first, end in sector_runs(take):
                handle.seek(at + first * SECTOR)
                out[first * SECTOR:end * SECTOR] = handle.read((end - first) * SECTOR)
        return out

    def read(self, offset, length):
        """Return `length` bytes of the disk from `offset` (cut at the disk's end)."""
        end = min(offset + length, self.size)
        parts = []
        while offset < end:
            index, within = divmod(offset, VHD_BLOCK)
            piece = min(end - offset, VHD_BLOCK - within)
            block = self._block(index)
            whole = piece == VHD_BLOCK and isinstance(block, bytes)
            parts.append(block if whole else bytes(block[within:within + piece]))
            offset += piece
        return b"".join(parts)

    def iter_raw(self, chunk=4 * 1024 * 1024):
        """Yield the whole disk as raw bytes, in order, `chunk` bytes at a time."""
        offset = 0
        while offset < self.size:
            length = min(chunk, self.size - offset)
            yield self.read(offset, length)
            offset += length

    def close(self):
        """Close the files."""
        for handle in self.handles:
            handle.close()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False
