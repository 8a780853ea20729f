"""XVA files: ova.xml, the disk chunks and their checksums, gzip and zstd, completeness.

Owns: parse_ova_xml/ova_objects/ova_disks, check_xva_stream/check_xva_file,
xva_compression, the zstd reader, ova_xml_from_tar, xva_is_complete.
Imports: errors, util, formats.xxh64, formats.tar.
"""

import base64
import collections
import contextlib
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import threading
import xml.etree.ElementTree
import xml.parsers.expat
import xmlrpc.client
import zlib

from vmbackup.errors import BadFile, ExportFailed
from vmbackup.formats.tar import TarStream, _HashingReader
from vmbackup.formats.xxh64 import xxh64_hex
from vmbackup.util import one_line, printable


#: The most ova.xml the tool reads: a VM's metadata is kilobytes; this bounds a hostile file.
MAX_OVA_XML = 256 << 20


def first_ova_xml(tar):
    """Return the body of ova.xml, the first member of an XVA's tar; raise BadFile."""
    first = tar.next()
    if first is None:
        raise BadFile("empty tar: no ova.xml")
    if first.name != "ova.xml":
        raise BadFile("first member is %r, not ova.xml: not an XVA" % first.name)
    return tar.read_body(limit=MAX_OVA_XML)


@contextlib.contextmanager
def xva_reader(path):
    """Open an XVA (.xva, .xva.gz, .xva.zst, or a metadata export's tar): yield its tar bytes."""
    algo = xva_compression(path)
    with open(path, "rb") as handle:
        if algo == "gzip":
            yield gzip.GzipFile(fileobj=handle, mode="rb")
        elif algo == "zstd":
            zstd = find_zstd()
            if zstd is None:
                raise BadFile("zstd is not installed: %s cannot be read here" % printable(path))
            stream = _ZstdStream(handle, zstd)
            try:
                yield stream
            finally:
                stream.kill()
        else:
            yield handle


def read_ova_xml(path):
    """Return the ova.xml bytes at the start of an XVA or a metadata export; raise BadFile."""
    try:
        with xva_reader(path) as stream:
            return first_ova_xml(TarStream(stream))
    except (EOFError, zlib.error) as exc:
        raise BadFile("gzip stream: %s" % (one_line(exc) or "truncated"))


def ova_xml_from_tar(path):
    """Return the ova.xml bytes of a metadata export (a tar holding ova.xml)."""
    try:
        return read_ova_xml(path)
    except (BadFile, OSError) as exc:
        raise ExportFailed("metadata export is not a tar with ova.xml: %s" % one_line(exc))


def xva_is_complete(path):
    """Return True if an uncompressed XVA ends as a complete tar (two zero blocks)."""
    size = os.path.getsize(path)
    if size < 2048 or size % 512:
        return False
    with open(path, "rb") as handle:
        handle.seek(size - 1024)
        if handle.read(1024) != bytes(1024):
            return False
        handle.seek(0)
        head = handle.read(512)
    return head[:7] == b"ova.xml"


# -- ova.xml: one XML-RPC value ----------------------------------------------
def _plain(value):
    """Turn xmlrpc.client's DateTime and Binary into the text they came from, recursively."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, xmlrpc.client.DateTime):
        return value.value
    if isinstance(value, xmlrpc.client.Binary):
        return base64.b64encode(value.data).decode("ascii")
    return value


def xmlrpc_value(data):
    """Return the Python value of one XML-RPC <value> document, by the standard library's parser."""
    body = re.sub(br"^\s*<\?xml[^>]*\?>", b"", data if isinstance(data, bytes) else data.encode())
    parser, unmarshaller = xmlrpc.client.getparser()
    parser.feed(b"<params><param>" + body + b"</param></params>")
    parser.close()
    (value,) = unmarshaller.close()
    return _plain(value)


def parse_ova_xml(data):
    """Return the struct of an ova.xml / vm-metadata.xml; raise ValueError if it does not parse.

    b"<value><struct><member><name>objects</name>..." -> {"objects": [...], "version": {...}}
    """
    try:
        root = xml.etree.ElementTree.fromstring(data)
    except xml.etree.ElementTree.ParseError as exc:
        raise ValueError("not well-formed XML: %s" % exc)
    if root.tag != "value":
        raise ValueError("root element is <%s>, not an XML-RPC <value>" % root.tag)
    try:
        ova = xmlrpc_value(data)
    except (ValueError, TypeError, xml.parsers.expat.ExpatError, xmlrpc.client.Error) as exc:
        raise ValueError("not an XML-RPC value: %s" % exc)
    if not isinstance(ova, dict) or not isinstance(ova.get("objects"), list):
        raise ValueError("no 'objects' list: not XAPI export metadata")
    return ova


def ova_objects(ova):
    """Return {class: {id: record}} of a parsed ova.xml."""
    tables = collections.defaultdict(dict)
    for obj in ova.get("objects", ()):
        if isinstance(obj, dict) and isinstance(obj.get("snapshot"), dict):
            tables[str(obj.get("class", ""))][str(obj.get("id", ""))] = obj["snapshot"]
    return tables


def _int(value, default=0):
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def ova_disks(ova):
    """Return {export id: (virtual_size, name_label)} of the VDIs whose data an XVA carries.

    As XAPI's export: VDIs of non-CD VBDs on SRs whose content_type is not iso.
    """
    tables = ova_objects(ova)
    disks = {}
    for vbd in tables.get("VBD", {}).values():
        vdi = tables.get("VDI", {}).get(str(vbd.get("VDI")))
        if vdi is None or vbd.get("type") == "CD":
            continue
        sr = tables.get("SR", {}).get(str(vdi.get("SR")), {})
        if sr.get("content_type") == "iso":
            continue
        disks[str(vbd.get("VDI"))] = (_int(vdi.get("virtual_size"), -1), vdi.get("name_label", ""))
    return disks


# -- XVA ----------------------------------------------------------------------

#: Ref:7/00000003 (a chunk), Ref:7/00000003.xxhash or .checksum (its checksum).
XVA_CHUNK_RE = re.compile(r"^(Ref:[^/]+)/(\d{8,})(\.xxhash|\.checksum)?$")


#: A chunk larger than this is not one XAPI wrote (it writes 1 MiB chunks).
MAX_CHUNK = 64 << 20


#: Stop listing a file's problems after this many.
MAX_PROBLEMS = 20


class _DiskChunks(object):
    """Where one XVA disk's chunks put it, by the counter rule of XAPI's importer."""

    def __init__(self):
        self.prev = None
        self.first_len = 0
        self.end = 0
        self.chunks = 0


def place_chunk(disk, counter, length):
    """Advance `disk` (a _DiskChunks) by one chunk; return a problem text or None.

    offset += (counter - previous - 1) * first chunk length, then += length:
    skipped zero chunks leave gaps in the counter; keep-alive chunks are empty.
    """
    disk.chunks += 1
    if disk.prev is None:
        disk.prev, disk.first_len, disk.end = counter, length, counter * length + length
        return None if counter == 0 else "first chunk is %08d, not 00000000" % counter
    if counter <= disk.prev:
        return "chunk %08d comes after %08d (out of order)" % (counter, disk.prev)
    disk.end += (counter - disk.prev - 1) * disk.first_len + length
    disk.prev = counter
    return None


def check_xva_stream(stream):
    """Check an uncompressed XVA tar read from `stream`; return (problems, info); raise BadFile.

    Problems are one-line texts; info has the disks found {id: bytes} and ova.xml's struct.
    """
    tar = TarStream(stream)
    problems = []
    body = first_ova_xml(tar)
    ova, expected = None, {}
    try:
        ova = parse_ova_xml(body)
        expected = ova_disks(ova)
    except ValueError as exc:
        problems.append("ova.xml does not parse: %s" % exc)
    disks = collections.OrderedDict()
    pending = None      # (member name, chunk bytes) waiting for its checksum member
    while True:
        member = tar.next()
        if member is None:
            break
        match = XVA_CHUNK_RE.match(member.name)
        if pending and not (match and match.group(3) and member.name.startswith(pending[0] + ".")):
            problems.append("chunk %s has no checksum member" % pending[0])
            pending = None
        if not match:
            continue  # other members (directories, future additions) carry no disk data
        ref, counter, ext = match.groups()
        if ext is None:
            disk = disks.setdefault(ref, _DiskChunks())
            data = tar.read_body(limit=MAX_CHUNK)
            issue = place_chunk(disk, int(counter), len(data))
            if issue:
                problems.append("disk %s: %s" % (ref, issue))
            pending = (member.name, data)
            continue
        if pending is None:
            problems.append("checksum member %s has no chunk before it" % member.name)
            continue
        stored = tar.read_body(limit=4096).strip().decode("ascii", "replace").upper()
        name, data = pending
        pending = None
        if ext == ".xxhash":
            if stored != xxh64_hex(data):
                problems.append("chunk %s XXH64 mismatch" % name)
        elif stored != hashlib.sha1(data).hexdigest().upper():
            problems.append("chunk %s SHA-1 mismatch" % name)
    if pending:
        problems.append("chunk %s has no checksum member" % pending[0])
    tar.skip_rest()
    if ova is not None:
        problems += disk_problems(disks, expected)
    return problems, {"disks": {ref: d.end for ref, d in disks.items()}, "ova": ova,
                      "chunks": sum(d.chunks for d in disks.values())}


def disk_problems(disks, expected):
    """Return how the disks found in an XVA ({ref: _DiskChunks}) differ from ova.xml's VDIs."""
    problems = []
    for ref, disk in disks.items():
        size, _ = expected.get(ref, (None, ""))
        if size is None:
            problems.append("disk %s has data but no VDI in ova.xml" % ref)
        elif disk.end != size:
            problems.append("disk %s reassembles to %d bytes, ova.xml says virtual_size %d%s"
                            % (ref, disk.end, size, " (last chunk missing?)" if disk.end < size else ""))
    for ref, (size, label) in sorted(expected.items()):
        if ref not in disks:
            problems.append("disk %s%s has no data in the XVA"
                            % (ref, " (%s)" % printable(label) if label else ""))
    return problems


def find_zstd():
    """Return the path of the zstd binary, or None."""
    return shutil.which("zstd") or next(
        (p for p in ("/usr/bin/zstd", "/bin/zstd") if os.access(p, os.X_OK)), None)


class _ZstdStream(object):
    """`zstd -d` fed from `reader` by a thread; read() gives the decompressed bytes."""

    def __init__(self, reader, zstd):
        self.proc = subprocess.Popen([zstd, "-d", "-c", "-q"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.reader = reader
        self.feed_error = None
        self.thread = threading.Thread(target=self._feed)
        self.thread.daemon = True
        self.thread.start()

    def _feed(self):
        try:
            while True:
                data = self.reader.read(1 << 20)
                if not data:
                    break
                self.proc.stdin.write(data)
        except (BrokenPipeError, ValueError):  # zstd stopped reading (bad input); its rc says why
            pass
        except OSError as exc:
            self.feed_error = exc
        finally:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def read(self, size=-1):
        return self.proc.stdout.read(size)

    def finish(self):
        """Wait for zstd; return its error text ('' if it succeeded)."""
        self.proc.stdout.close()
        err = self.proc.stderr.read().decode("utf-8", "replace")
        rc = self.proc.wait()
        self.thread.join()
        if self.feed_error is not None:
            return "cannot read the file: %s" % self.feed_error
        return "" if rc == 0 else "zstd: %s" % (one_line(err) or "exit code %d" % rc)

    def kill(self):
        """Stop zstd and the feeding thread."""
        if self.proc.poll() is None:
            self.proc.kill()
        for pipe in (self.proc.stdout, self.proc.stderr):
            pipe.close()
        self.proc.wait()
        self.thread.join()


def xva_compression(name):
    """Return None, 'gzip' or 'zstd' for an XVA file name (.xva, .xva.gz, .xva.zst)."""
    if name.endswith(".gz"):
        return "gzip"
    if name.endswith((".zst", ".zstd")):
        return "zstd"
    return None


def _check_xva_guarded(stream):
    """Return (problems, info) of check_xva_stream, reading `stream` to its end; never raises BadFile."""
    try:
        return check_xva_stream(stream)
    except BadFile as exc:
        return [str(exc)], {}
    except EOFError:
        return ["gzip stream: truncated (ends before its end marker)"], {}
    except zlib.error as exc:
        return ["gzip stream: %s" % exc], {}
    except OSError as exc:
        if getattr(exc, "errno", None) is not None:  # a real I/O error, not a bad gzip stream
            raise
        return ["gzip stream: %s" % exc], {}


def check_xva_file(path, want_sha256=False):
    """Check an XVA file (.xva/.xva.gz/.xva.zst) in one pass; return (problems, unchecked, info).

    info["sha256"] is the file's SHA-256 when `want_sha256`. A zstd file on a host
    without zstd is unchecked (only its SHA-256 is computed), never called good.
    """
    algo = xva_compression(path)
    problems, unchecked, info = [], [], {}
    with open(path, "rb") as handle:
        raw = _HashingReader(handle)
        zstd = find_zstd() if algo == "zstd" else None
        if algo == "zstd" and zstd is None:
            unchecked.append("zstd is not installed: the compressed XVA cannot be checked here")
        elif algo == "zstd":
            stream = _ZstdStream(raw, zstd)
            try:
                problems, info = _check_xva_guarded(stream)
                while stream.read(1 << 20):  # let zstd see all its input: its exit code judges it
                    pass
            except BaseException:
                stream.kill()
                raise
            error = stream.finish()
            if error:
                problems.insert(0, error)
        elif algo == "gzip":
            problems, info = _check_xva_guarded(gzip.GzipFile(fileobj=raw, mode="rb"))
        else:
            problems, info = _check_xva_guarded(raw)
        if want_sha256:
            raw.drain()
            info["sha256"] = raw.digest.hexdigest()
    return problems[:MAX_PROBLEMS], unchecked, info
