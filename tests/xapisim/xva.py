"""XVA streams as xapi's /export writes them, and a reader like xapi's /import.

Layout (facts §5): an uncompressed tar of old-style (v7) headers as written by
ocaml-tar: ``ova.xml`` first, then per exported VDI -- directories in
lexicographic order of the export id ``Ref:N`` -- 1 MiB chunk members
``Ref:N/%08d`` each followed by a checksum member (``.xxhash``: XXH64 as 16
uppercase hex digits, or ``.checksum``: SHA-1 hex), all-zero chunks omitted
except the first and the last, zero-length keep-alive chunks advancing the
counter but not the disk offset, and two zero blocks at the end.
"""

import gzip
import hashlib
import os
import shutil
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
import zlib

import xxhash

from .disks import BLOCK, Disk, zeros

CHUNK = 1 << 20
TAR_BLOCK = 512
# Header.make in ocaml-tar: uid 0, gid 0, mtime 0 for chunk members; the file mode
# default is UNCONFIRMED for current ocaml-tar (0 in the old one) -- readers must
# ignore it; 0o400 keeps chunks readable after a non-root `tar x`.
CHUNK_MODE = 0o400
XXH_EMPTY = "%016X" % xxhash.xxh64(b"").intdigest()

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class XvaError(Exception):
    """A damaged or unreadable XVA stream."""


# ---------------------------------------------------------------------------
# tar headers
# ---------------------------------------------------------------------------

def _octal(value, width):
    s = "%o" % value
    if len(s) > width - 1:
        raise XvaError("value %d does not fit a %d-byte tar field" % (value, width))
    return (s.rjust(width - 1, "0") + "\0").encode("ascii")


def tar_header(name, size, mtime=0, mode=CHUNK_MODE):
    """One 512-byte v7 tar header, as ocaml-tar's Header.marshal writes it."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise XvaError("tar member name too long: %r" % name)
    buf = bytearray(TAR_BLOCK)
    buf[0:len(raw)] = raw
    buf[100:108] = _octal(mode, 8)
    buf[108:116] = _octal(0, 8)
    buf[116:124] = _octal(0, 8)
    buf[124:136] = _octal(size, 12)
    buf[136:148] = _octal(int(mtime), 12)
    buf[148:156] = b" " * 8
    buf[156:157] = b"0"
    csum = sum(buf)
    buf[148:156] = _octal(csum, 8)
    return bytes(buf)


def _padding(size):
    return zeros((-size) % TAR_BLOCK)


def _member(name, data, mtime=0):
    return tar_header(name, len(data), mtime) + data + _padding(len(data))


def _checksum_member(name, chunk, checksum):
    if checksum == "sha1":
        return _member(name + ".checksum",
                       hashlib.sha1(chunk).hexdigest().encode("ascii"))
    return _member(name + ".xxhash",
                   ("%016X" % xxhash.xxh64(chunk).intdigest()).encode("ascii"))


# ---------------------------------------------------------------------------
# writer
# ---------------------------------------------------------------------------

def _nonzero_chunks(disk):
    """Sorted indices of 1 MiB chunks that may contain non-zero bytes."""
    per = CHUNK // BLOCK
    out = []
    last = -1
    for b in disk.allocated_blocks():
        c = b // per
        if c != last:
            out.append(c)
            last = c
    return out


def _export_id_key(item):
    return item[0]


def xva_stream(ova_xml, disks, checksum="xxhash", keepalive=None, mtime=None):
    """Yield the uncompressed XVA tar (bytes pieces).

    ``disks`` is a list of ``(export_id, Disk)``.  ``checksum`` is "xxhash"
    (default, as xapi >= 1.170 writes) or "sha1" (``.checksum`` members).
    ``keepalive`` (seconds or None): when more than that has passed since the
    previous member was handed to the consumer, a zero-length chunk and its
    checksum are emitted before the next chunk (never for the first or the last
    chunk of a disk); the counter advances, the disk offset does not.
    """
    if checksum not in ("xxhash", "sha1"):
        raise ValueError("checksum must be 'xxhash' or 'sha1'")
    if isinstance(ova_xml, str):
        ova_xml = ova_xml.encode("utf-8")
    if mtime is None:
        mtime = int(time.time())
    state = {"last": time.monotonic()}
    yield _member("ova.xml", ova_xml, mtime=mtime)

    for export_id, disk in sorted(disks, key=_export_id_key):
        for piece in _disk_members(export_id, disk, checksum, keepalive, state):
            yield piece
    yield zeros(2 * TAR_BLOCK)


def _disk_members(prefix, disk, checksum, keepalive, state):
    size = disk.virtual_size
    if size <= 0:
        return
    last_chunk = (size - 1) // CHUNK
    nonzero = set(_nonzero_chunks(disk))
    counter = 0
    chunk_no = 0
    while chunk_no <= last_chunk:
        offset = chunk_no * CHUNK
        n = min(CHUNK, size - offset)
        first_or_last = chunk_no == 0 or chunk_no == last_chunk
        if (keepalive is not None and not first_or_last
                and time.monotonic() - state["last"] > keepalive):
            name = "%s/%08d" % (prefix, counter)
            state["last"] = time.monotonic()
            yield tar_header(name, 0) + _checksum_member(name, b"", checksum)
            counter += 1
        if chunk_no in nonzero:
            data = disk.read(offset, n)
            if data.count(0) == n:
                data = None
        else:
            data = None
        if data is None and first_or_last:
            data = zeros(n)
        if data is not None:
            name = "%s/%08d" % (prefix, counter)
            state["last"] = time.monotonic()
            yield tar_header(name, n)
            yield data
            yield _padding(n) + _checksum_member(name, data, checksum)
        counter += 1
        chunk_no += 1


def xva_members(disks, checksum="xxhash"):
    """Names of the members xva_stream writes without keep-alives (for tests)."""
    names = ["ova.xml"]
    ext = ".xxhash" if checksum == "xxhash" else ".checksum"
    for export_id, disk in sorted(disks, key=_export_id_key):
        size = disk.virtual_size
        if size <= 0:
            continue
        last = (size - 1) // CHUNK
        nz = set(_nonzero_chunks(disk))
        for c in range(last + 1):
            if c == 0 or c == last or (
                    c in nz and not disk.is_zero(c * CHUNK, CHUNK)):
                names.append("%s/%08d" % (export_id, c))
                names.append("%s/%08d%s" % (export_id, c, ext))
    return names


# ---------------------------------------------------------------------------
# compression
# ---------------------------------------------------------------------------

def _compressor_argv(algo):
    if algo == "gzip":
        exe = "/bin/gzip" if os.path.exists("/bin/gzip") else shutil.which("gzip")
        return [exe, "-c"]
    if algo == "zstd":
        exe = "/usr/bin/zstd" if os.path.exists("/usr/bin/zstd") else shutil.which("zstd")
        return [exe, "-c", "-q"]
    raise ValueError("unknown compression %r" % (algo,))


def compress(iterator, algo, bufsize=1 << 20):
    """Pipe ``iterator`` through ``gzip -c`` / ``zstd -c -q`` (None: unchanged).

    Streams: a feeder thread writes the input to the compressor while this
    generator yields its output.  Closing the generator early kills the
    compressor and closes the input iterator.
    """
    if algo in (None, "", "none", False):
        for piece in iterator:
            yield piece
        return
    argv = _compressor_argv(algo)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, bufsize=0, close_fds=True)
    compress.last_pid = proc.pid
    errors = []
    stop = threading.Event()

    def feed():
        it = iter(iterator)
        try:
            for piece in it:
                if stop.is_set():
                    break
                if piece:
                    proc.stdin.write(piece)
        except (BrokenPipeError, OSError, ValueError) as e:
            if not stop.is_set():
                errors.append(e)
        except BaseException as e:  # an error of the input iterator
            errors.append(e)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    pass
            try:
                proc.stdin.close()
            except Exception:
                pass

    feeder = threading.Thread(target=feed, name="xva-compress-feed", daemon=True)
    feeder.start()
    finished = False
    try:
        fd = proc.stdout.fileno()
        while True:
            data = os.read(fd, bufsize)
            if not data:
                break
            yield data
        feeder.join()
        rc = proc.wait()
        finished = True
        if errors:
            raise errors[0]
        if rc != 0:
            raise XvaError("%s exited with status %d" % (argv[0], rc))
    finally:
        if not finished:
            stop.set()
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            feeder.join(10)
        try:
            proc.stdout.close()
        except Exception:
            pass


compress.last_pid = None


class _PrefixReader(object):
    """A read-only stream that first returns ``prefix`` then reads ``raw``."""

    def __init__(self, prefix, raw):
        self._prefix = prefix
        self._raw = raw

    def read(self, n=-1):
        if self._prefix:
            if n is None or n < 0:
                rest = self._raw.read()
                data, self._prefix = self._prefix + (rest or b""), b""
                return data
            data = self._prefix[:n]
            self._prefix = self._prefix[n:]
            if len(data) < n:
                more = self._raw.read(n - len(data))
                if more:
                    data += more
            return data
        return self._raw.read(n)

    def readable(self):
        return True

    def close(self):
        pass


class _ZstdReader(object):
    """Decompresses a zstd stream through the ``zstd -dc`` binary."""

    def __init__(self, raw):
        exe = "/usr/bin/zstd" if os.path.exists("/usr/bin/zstd") else shutil.which("zstd")
        if not exe:
            raise XvaError("zstd binary not found: cannot decompress")
        self._proc = subprocess.Popen([exe, "-dc", "-q"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      bufsize=0, close_fds=True)
        self._raw = raw
        self._stop = False
        self._eof = False
        self._thread = threading.Thread(target=self._feed, name="zstd-feed", daemon=True)
        self._thread.start()

    def _feed(self):
        try:
            while not self._stop:
                data = self._raw.read(1 << 20)
                if not data:
                    break
                self._proc.stdin.write(data)
        except (BrokenPipeError, OSError, ValueError):
            pass
        finally:
            try:
                self._proc.stdin.close()
            except Exception:
                pass

    def read(self, n=-1):
        if self._eof:
            return b""
        if n is None or n < 0:
            parts = []
            while True:
                d = self.read(1 << 20)
                if not d:
                    return b"".join(parts)
                parts.append(d)
        data = self._proc.stdout.read(n)
        if not data:
            self._eof = True
            self._thread.join()
            rc = self._proc.wait()
            if rc != 0:
                err = self._proc.stderr.read().decode("utf-8", "replace").strip()
                raise XvaError("zstd decompression failed (status %d): %s" % (rc, err))
        return data

    def readable(self):
        return True

    def close(self):
        self._stop = True
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._thread.join(10)
        for f in (self._proc.stdout, self._proc.stderr):
            try:
                f.close()
            except Exception:
                pass


class _GzipReader(object):
    def __init__(self, raw):
        self._g = gzip.GzipFile(fileobj=raw, mode="rb")

    def read(self, n=-1):
        try:
            return self._g.read(n)
        except (OSError, EOFError, zlib.error) as e:
            raise XvaError("gzip decompression failed: %s" % (e,))

    def readable(self):
        return True

    def close(self):
        self._g.close()


def _read_exact(f, n):
    parts = []
    got = 0
    while got < n:
        d = f.read(n - got)
        if not d:
            break
        parts.append(d)
        got += len(d)
    return b"".join(parts)


def decompress_reader(fileobj):
    """Return a readable stream of the tar inside ``fileobj`` (gzip, zstd or plain)."""
    head = _read_exact(fileobj, 4)
    pre = _PrefixReader(head, fileobj)
    if head[:2] == GZIP_MAGIC:
        return _GzipReader(pre)
    if head[:4] == ZSTD_MAGIC:
        return _ZstdReader(pre)
    return pre


# ---------------------------------------------------------------------------
# reader
# ---------------------------------------------------------------------------

def _parse_octal(field, what):
    if field and field[0] & 0x80:          # GNU base-256
        v = int.from_bytes(field[1:], "big")
        if field[0] & 0x40:
            raise XvaError("negative tar %s" % what)
        return v
    s = field.split(b"\0", 1)[0].strip(b" \0")
    if not s:
        return 0
    try:
        return int(s, 8)
    except ValueError:
        raise XvaError("bad tar %s field %r" % (what, field))


EOF = "EOF"


class _TarReader(object):
    """A minimal streaming tar reader (v7, ustar, GNU long names, pax paths)."""

    def __init__(self, f):
        self.f = f
        self.offset = 0

    def _read(self, n):
        data = _read_exact(self.f, n)
        self.offset += len(data)
        return data

    def _skip(self, n):
        while n > 0:
            d = self._read(min(n, 1 << 20))
            if not d:
                raise XvaError("truncated XVA: unexpected end of stream inside a member")
            n -= len(d)

    def next(self):
        """Return (name, size, typeflag) of the next file member, None at an
        end-of-archive zero block, or EOF when the stream ends at a header boundary."""
        long_name = None
        pax_path = None
        while True:
            hdr = self._read(TAR_BLOCK)
            if len(hdr) == 0:
                if long_name is not None or pax_path is not None:
                    raise XvaError("truncated XVA: end of stream after an extended header")
                return EOF
            if len(hdr) < TAR_BLOCK:
                raise XvaError("truncated XVA: partial tar header at byte %d"
                               % (self.offset - len(hdr)))
            if hdr.count(0) == TAR_BLOCK:
                return None
            stored = _parse_octal(hdr[148:156], "checksum")
            calc = sum(hdr[:148]) + 8 * 32 + sum(hdr[156:])
            if stored != calc:
                # some writers use signed chars
                signed = sum((b - 256 if b > 127 else b) for b in hdr[:148]) + 256 + \
                    sum((b - 256 if b > 127 else b) for b in hdr[156:])
                if stored != signed:
                    raise XvaError("bad tar header checksum at byte %d"
                                   % (self.offset - TAR_BLOCK))
            size = _parse_octal(hdr[124:136], "size")
            typeflag = hdr[156:157]
            name = hdr[0:100].split(b"\0", 1)[0]
            if hdr[257:262] == b"ustar" and hdr[263:265] != b" \0":
                prefix = hdr[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = prefix + b"/" + name
            if typeflag == b"L":                      # GNU long name
                data = self._read_body(size)
                long_name = data.split(b"\0", 1)[0]
                continue
            if typeflag in (b"x", b"g"):              # pax
                data = self._read_body(size)
                if typeflag == b"x":
                    pax_path = _pax_path(data) or pax_path
                continue
            if long_name is not None:
                name = long_name
            if pax_path is not None:
                name = pax_path
            return name.decode("utf-8", "replace"), size, typeflag

    def _read_body(self, size):
        data = self._read(size)
        if len(data) < size:
            raise XvaError("truncated XVA: unexpected end of stream inside a member")
        self._skip((-size) % TAR_BLOCK)
        return data

    def read_body(self, size):
        return self._read_body(size)

    def skip_body(self, size):
        self._skip(size + ((-size) % TAR_BLOCK))


def _pax_path(data):
    path = None
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        try:
            length = int(data[pos:sp])
        except ValueError:
            break
        rec = data[sp + 1:pos + length - 1]
        k, _, v = rec.partition(b"=")
        if k == b"path":
            path = v
        pos += length
    return path


def _xmlrpc_value(elem):
    """Decode an XML-RPC <value> element (strings, ints, structs, arrays...)."""
    children = list(elem)
    if not children:
        return elem.text or ""
    c = children[0]
    tag = c.tag
    if tag == "struct":
        out = {}
        for m in c.findall("member"):
            nm = m.find("name")
            v = m.find("value")
            out[(nm.text or "") if nm is not None else ""] = \
                _xmlrpc_value(v) if v is not None else ""
        return out
    if tag == "array":
        data = c.find("data")
        return [_xmlrpc_value(v) for v in (data.findall("value") if data is not None else [])]
    if tag in ("int", "i4", "i8"):
        return int((c.text or "0").strip())
    if tag == "boolean":
        return (c.text or "0").strip() == "1"
    if tag == "double":
        return float((c.text or "0").strip())
    return c.text or ""


def parse_ova_xml(ova_xml):
    """Parse ova.xml into a dict {"version": {...}, "objects": [...]}."""
    try:
        root = ET.fromstring(ova_xml)
    except ET.ParseError as e:
        raise XvaError("ova.xml is not well-formed XML: %s" % (e,))
    if root.tag != "value":
        raise XvaError("ova.xml does not hold an XML-RPC <value> (root is <%s>)" % root.tag)
    v = _xmlrpc_value(root)
    if not isinstance(v, dict) or "objects" not in v:
        raise XvaError("ova.xml has no 'objects' member")
    return v


def vdi_sizes(ova_xml):
    """{export_id: virtual_size} of the VDI records in ova.xml."""
    out = {}
    for obj in parse_ova_xml(ova_xml).get("objects") or []:
        if not isinstance(obj, dict) or obj.get("class") != "VDI":
            continue
        snap = obj.get("snapshot") or {}
        try:
            out[obj.get("id")] = int(snap.get("virtual_size"))
        except (TypeError, ValueError):
            raise XvaError("VDI %s in ova.xml has no valid virtual_size" % obj.get("id"))
    return out


def parse_xva(fileobj, verify=True):
    """Read an XVA (plain, gzip or zstd) into ``(ova_xml, {export_id: Disk})``.

    Follows xapi's importer (``stream_vdi.ml`` ``recv_all_vdi``), including what
    it rejects:
    - the first member must be named exactly ``ova.xml``;
    - disk directories come one after the other in lexicographic order of their
      ids; member names are exact (no ``./`` prefix, no directory entries);
    - every chunk ``Ref:N/<counter>`` is immediately followed by its checksum
      member (``.xxhash`` = "%016X" of XXH64, ``.checksum`` = SHA-1 hex), whose
      content must equal the recomputed value exactly (skipped when
      ``verify=False``, xapi's ``force=true``);
    - counters increase; ``offset += (counter - previous - 1) * L`` where ``L`` is
      the length of the first chunk of the whole archive (xapi keeps it for all
      disks), then the chunk is written and ``offset += len(chunk)``;
    - every disk must be filled up to its ``virtual_size`` from ova.xml (its last
      chunk present); chunks past the end are errors.
    The end-of-archive blocks may be missing (xapi stops reading after the last
    disk).  Only disks that have a data directory are returned.
    """
    reader = decompress_reader(fileobj)
    try:
        return _parse_tar(_TarReader(reader), verify)
    except (OSError, EOFError, zlib.error) as e:
        raise XvaError("cannot read XVA stream: %s" % (e,))
    finally:
        close = getattr(reader, "close", None)
        if close is not None and reader is not fileobj:
            close()


def _check_complete(prefix, disk, offset):
    if offset < disk.virtual_size:
        raise XvaError("truncated XVA: disk %s has data up to byte %d of %d "
                       "(its last chunk is missing)" % (prefix, offset, disk.virtual_size))


def _parse_tar(tar, verify):
    first = tar.next()
    if first is None or first is EOF:
        raise XvaError("empty XVA: no ova.xml")
    name, size, _ = first
    if name != "ova.xml":
        raise XvaError("the first member of an XVA must be ova.xml, got %r" % name)
    if size > (256 << 20):
        raise XvaError("ova.xml too large (%d bytes)" % size)
    ova_xml = tar.read_body(size)
    sizes = vdi_sizes(ova_xml)

    disks = {}
    first_len = None        # xapi: length of the first chunk of the archive
    cur = None              # [prefix, disk, last_counter, offset]
    while True:
        m = tar.next()
        if m is None or m is EOF:
            break
        name, size, typeflag = m
        prefix, _, leaf = name.partition("/")
        if cur is None or prefix != cur[0]:
            if cur is not None:
                _check_complete(cur[0], cur[1], cur[3])
                if prefix <= cur[0]:
                    raise XvaError("disk directory %r comes after %r: directories must be "
                                   "in lexicographic order, each one contiguous"
                                   % (prefix, cur[0]))
            if prefix not in sizes:
                raise XvaError("unexpected member %r: %r is not the export id of a VDI "
                               "in ova.xml" % (name, prefix))
            disk = disks[prefix] = Disk.empty(sizes[prefix])
            cur = [prefix, disk, -1, 0]
        disk = cur[1]
        if not leaf.isdigit() or typeflag not in (b"0", b"\0", b"7"):
            raise XvaError("unexpected member %r in disk %s (expected a chunk named "
                           "%s/<counter>)" % (name, prefix, prefix))
        counter = int(leaf)
        if counter <= cur[2]:
            raise XvaError("chunk counter of %s does not increase (%s after %08d)"
                           % (prefix, leaf, cur[2]))
        if cur[3] >= disk.virtual_size:
            raise XvaError("chunk %s past the end of the %d-byte disk" % (name, disk.virtual_size))
        if first_len is None:
            first_len = size
        offset = cur[3] + (counter - cur[2] - 1) * first_len
        if offset + size > disk.virtual_size:
            raise XvaError("chunk %s ends at byte %d, past the end of the %d-byte disk"
                           % (name, offset + size, disk.virtual_size))
        data = tar.read_body(size)
        if size and data.count(0) != size:
            disk.write(offset, data)
        cur[2] = counter
        cur[3] = offset + size
        # the checksum member must follow
        c = tar.next()
        if c is None or c is EOF:
            raise XvaError("truncated XVA: chunk %s is not followed by its checksum" % name)
        cname, csize, _ = c
        if cname == name + ".xxhash":
            want = "%016X" % xxhash.xxh64(data).intdigest()
        elif cname == name + ".checksum":
            want = hashlib.sha1(data).hexdigest()
        else:
            raise XvaError("chunk %s is followed by %r instead of %s.xxhash or %s.checksum"
                           % (name, cname, name, name))
        if csize > 4096:
            raise XvaError("checksum member %s too large (%d bytes)" % (cname, csize))
        body = tar.read_body(csize)
        if verify and body != want.encode("ascii"):
            raise XvaError("checksum mismatch for %s: member says %r, data gives %r"
                           % (name, body.decode("ascii", "replace"), want))
    if cur is not None:
        _check_complete(cur[0], cur[1], cur[3])
    return ova_xml, disks
