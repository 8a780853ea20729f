"""Checking VHD files (fixed, dynamic, differencing) as /export_raw_vdi?format=vhd writes them.

Owns: VHD_FOOTER/VHD_HEADER layouts, vhd_checksum, vhd_footer_problem, check_vhd.
Imports: errors, formats.tar.
"""

import os
import struct

from vmbackup.formats.tar import _read_exact


# -- VHD ------------------------------------------------------------------------

#: cookie, features, version, data offset, timestamp, creator app/version/OS, original size,
#: current size, geometry, disk type, checksum, uid, saved state (the footer's first 85 bytes)
VHD_FOOTER = struct.Struct(">8sIIQIIIIQQIII16sB")


VHD_HEADER = struct.Struct(">8sQQIIII")             # cookie .. checksum (first 40 bytes)


VHD_TYPES = {2: "fixed", 3: "dynamic", 4: "differencing"}


def vhd_checksum(block, at):
    """Return the VHD checksum of `block` (ones' complement of its byte sum without bytes at..at+4)."""
    return ~(sum(bytearray(block[:at])) + sum(bytearray(block[at + 4:]))) & 0xFFFFFFFF


def vhd_footer_problem(block, where):
    """Return what is wrong with a 512-byte VHD footer ('VHD footer <where>: ...'), or None."""
    if len(block) < 512 or block[:8] != b"conectix":
        return "VHD footer %s: missing (no 'conectix' cookie)" % where
    fields = VHD_FOOTER.unpack_from(block)
    if fields[12] != vhd_checksum(block[:512], 64):
        return "VHD footer %s: checksum mismatch" % where
    if fields[11] not in VHD_TYPES:
        return "VHD footer %s: unknown disk type %d" % (where, fields[11])
    return None


def check_vhd(path, virtual_size=None):
    """Return the problems of a VHD file: footers, dynamic header, BAT bounds, virtual size."""
    size = os.path.getsize(path)
    if size < 512:
        return ["%d bytes: too short to be a VHD" % size]
    problems = []
    with open(path, "rb") as handle:
        handle.seek(size - 512)
        footer = handle.read(512)
        handle.seek(0)
        head = handle.read(1536)
        bad = vhd_footer_problem(footer, "at the end")
        if bad:
            # a dynamic VHD keeps a copy at 0: if that one is sound, the tail was cut off
            cut = footer[:8] != b"conectix" and vhd_footer_problem(head[:512], "") is None
            return [bad + (" (truncated? the copy at the start is sound)" if cut else "")]
        fields = VHD_FOOTER.unpack_from(footer)
        data_offset, current_size, disk_type = fields[3], fields[9], fields[11]
        if virtual_size is not None and current_size != virtual_size:
            problems.append("VHD virtual size is %d bytes, the disk's virtual_size is %d"
                            % (current_size, virtual_size))
        if disk_type == 2:
            if size != current_size + 512:
                problems.append("fixed VHD is %d bytes, expected %d" % (size, current_size + 512))
            return problems
        if size % 512:
            problems.append("file size %d is not a multiple of 512 (truncated?)" % size)
        if head[:512] != footer:
            problems.append(vhd_footer_problem(head[:512], "copy at the start")
                            or "VHD footer copy at the start differs from the footer at the end")
        if data_offset + 1024 > size - 512:
            return problems + ["dynamic header offset %d is outside the file" % data_offset]
        handle.seek(data_offset)
        header = handle.read(1024)
        if header[:8] != b"cxsparse":
            return problems + ["no dynamic VHD header at byte %d (cookie is not 'cxsparse')"
                               % data_offset]
        _, _, table_offset, _, entries, block_size, checksum = VHD_HEADER.unpack_from(header)
        if checksum != vhd_checksum(header, 36):
            return problems + ["dynamic VHD header checksum mismatch"]
        if block_size < 512 or block_size % 512:
            return problems + ["VHD block size %d is not a multiple of 512" % block_size]
        if entries * block_size < current_size:
            problems.append("BAT covers %d bytes, less than the disk's %d"
                            % (entries * block_size, current_size))
        table_end = table_offset + entries * 4
        if table_end > size - 512:
            return problems + ["BAT (%d entries at byte %d) runs past the end of the file"
                               % (entries, table_offset)]
        handle.seek(table_offset)
        bat = struct.unpack(">%dI" % entries, _read_exact(handle, entries * 4))
    return problems + bat_problems(bat, block_size, table_end, size)


def bat_problems(bat, block_size, table_end, size):
    """Return the problems of a dynamic VHD's block table: blocks past the end or overlapping."""
    bitmap = (-(-(block_size // 512) // 8) + 511) & ~511   # one bit per sector, in whole sectors
    span = bitmap + block_size
    used = sorted((sector * 512, index) for index, sector in enumerate(bat) if sector != 0xFFFFFFFF)
    previous_end = table_end
    for start, index in used:
        if start + span > size - 512:
            return ["BAT entry %d points past the end of the file (block at byte %d; "
                    "truncated?)" % (index, start)]
        if start < previous_end:
            return ["BAT entry %d (block at byte %d) overlaps the BAT or another block"
                    % (index, start)]
        previous_end = start + span
    return []
