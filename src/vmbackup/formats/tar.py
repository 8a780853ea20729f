"""A strict streaming tar reader, the one the product uses for XVA files.

Owns: TarStream, TarMember, _read_exact, _HashingReader.
Imports: errors, formats.xxh64.
"""

import collections
import hashlib

from vmbackup.errors import BadFile
from vmbackup.formats.xxh64 import _ZEROS


class _HashingReader(object):
    """Sequential reads of a binary file that also feed a SHA-256."""

    def __init__(self, handle):
        self.handle = handle
        self.digest = hashlib.sha256()

    def read(self, size=-1):
        data = self.handle.read(size)
        self.digest.update(data)
        return data

    def readable(self):
        return True

    def drain(self, bufsize=1 << 20):
        """Read to the end of the file (so the digest covers all of it); return the bytes read."""
        total = 0
        while True:
            data = self.read(bufsize)
            if not data:
                return total
            total += len(data)


def _read_exact(stream, size):
    """Return exactly `size` bytes of `stream`, or fewer only at its end."""
    data = stream.read(size)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = stream.read(size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


TarMember = collections.namedtuple("TarMember", "name size type offset")


_TAR_BLOCK = 512


def _tar_number(field, what, offset):
    """Return a tar header number (octal, or GNU base-256); raise BadFile."""
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        value = 0
        for byte in bytearray(field[1:]):
            value = (value << 8) | byte
        return value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise BadFile("tar header at byte %d is corrupt (%s %r)" % (offset, what, text[:16]))


class TarStream(object):
    """A tar archive read strictly in order from a stream: `next()` members, `read_body()` them.

    Raises BadFile for a corrupt header, a member cut short, or an archive that
    ends without its two zero end-of-archive blocks (a truncated download).
    """

    def __init__(self, stream):
        self.stream = stream
        self.pos = 0            # bytes consumed from the stream
        self.left = 0           # unread body + padding of the current member
        self.body_left = 0

    def _read(self, size):
        data = _read_exact(self.stream, size)
        self.pos += len(data)
        return data

    def _skip(self, size):
        while size > 0:
            data = self._read(min(size, 1 << 20))
            if not data:
                raise BadFile("truncated: the tar stream ends inside a member (at byte %d)"
                              % self.pos)
            size -= len(data)

    def next(self):
        """Return the next TarMember, or None at the end-of-archive marker; raise BadFile."""
        self._skip(self.left)
        self.left = self.body_left = 0
        long_name = None
        while True:
            offset = self.pos
            block = self._read(_TAR_BLOCK)
            if not block:
                raise BadFile("truncated: the tar stream ends at byte %d without its "
                              "end-of-archive blocks" % offset)
            if len(block) < _TAR_BLOCK:
                raise BadFile("truncated: the tar stream ends inside a header (at byte %d)" % offset)
            if block == _ZEROS[:_TAR_BLOCK]:
                second = self._read(_TAR_BLOCK)
                if second != _ZEROS[:_TAR_BLOCK]:
                    raise BadFile("truncated or corrupt: a lone zero block at byte %d instead "
                                  "of the two end-of-archive blocks" % offset)
                return None
            stored = _tar_number(block[148:156], "checksum", offset)
            plain = block[:148] + b"        " + block[156:]
            if stored not in (sum(bytearray(plain)),
                              sum(b - 256 if b > 127 else b for b in bytearray(plain))):
                raise BadFile("tar header at byte %d is corrupt (checksum mismatch)" % offset)
            size = _tar_number(block[124:136], "size", offset)
            kind = block[156:157]
            name = block[:100].split(b"\0", 1)[0]
            if block[257:262] == b"ustar" and block[345:346] != b"\0":
                name = block[345:500].split(b"\0", 1)[0] + b"/" + name
            if kind in (b"L", b"x", b"g"):  # GNU long name, pax headers: read and apply
                body = self._read(size)
                if len(body) < size:
                    raise BadFile("truncated: the tar stream ends inside a header (at byte %d)"
                                  % offset)
                self._skip(-size % _TAR_BLOCK)
                if kind == b"L":
                    long_name = body.split(b"\0", 1)[0]
                elif kind == b"x":
                    for record in body.split(b"\n"):
                        if b" path=" in record:
                            long_name = record.split(b" path=", 1)[1]
                continue
            name = long_name if long_name is not None else name
            self.left = size + (-size % _TAR_BLOCK) if kind not in (b"1", b"2", b"5") else 0
            self.body_left = size if self.left else 0
            return TarMember(name.decode("utf-8", "replace"), size if self.left else 0,
                             kind.decode("ascii", "replace") or "0", offset)

    def read_body(self, limit=None):
        """Return the current member's whole body (at most `limit` bytes); raise BadFile."""
        size = self.body_left
        if limit is not None and size > limit:
            raise BadFile("member is %d bytes, more than the %d expected" % (size, limit))
        data = self._read(size)
        if len(data) < size:
            raise BadFile("truncated: the tar stream ends inside a member (at byte %d)" % self.pos)
        self.left -= size
        self.body_left = 0
        return data

    def skip_rest(self):
        """Read everything after the end-of-archive marker (padding); return its length."""
        total = 0
        while True:
            data = self._read(1 << 20)
            if not data:
                return total
            total += len(data)
