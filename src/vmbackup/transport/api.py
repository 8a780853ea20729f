"""The transport over XenAPI and XAPI's HTTP handlers (/export, /export_raw_vdi, /import...).

Owns: ApiTransport, BlockHasher (sha256 in a second thread), Pacer (max_rate).
Imports: errors, util, xapi, transport.base.
"""

import hashlib
import os
import queue
import threading
import time

from vmbackup.progress import Meter, current_meter, shut_socket
from vmbackup.transport.base import GONE_CODES, Transport
from vmbackup.xapi import (
    CONNECTION_ERRORS, TLS_ERRORS, XapiFailure, XapiTask, close_http, transfer_error)


#: Bytes read or sent per block; also the unit a raw disk's all-zero blocks are skipped in.
BUFSIZE = 1 << 20


#: Buffers shared by the reader and the hashing thread: an export holds NBUFFERS * BUFSIZE.
NBUFFERS = 4

#: ... and when several exports run at once (jobs > 1): two smaller ones, which still
#: overlap reading and hashing, so memory stays flat whatever -j (bench/jobs_scaling.py).
JOB_NBUFFERS, JOB_BUFSIZE = 2, 1 << 19

#: All-zero blocks, the ones a raw disk's blocks are compared with (shared, read-only;
#: never written, so their pages stay the kernel's zero page).
ZERO_BLOCKS = {BUFSIZE: bytes(BUFSIZE), JOB_BUFSIZE: bytes(JOB_BUFSIZE)}


class ApiTransport(Transport):
    """XenAPI calls, and data streamed between XAPI's HTTP handlers and the files."""

    name = "api"
    nbuffers, bufsize = NBUFFERS, BUFSIZE

    def __init__(self, xapi, config):
        Transport.__init__(self, xapi, config)
        self.endpoint = xapi.endpoint
        if getattr(config, "jobs", 1) > 1:
            self.nbuffers, self.bufsize = JOB_NBUFFERS, JOB_BUFSIZE

    # -- snapshots
    def take_snapshot(self, vm, name, quiesce):
        method = "VM.snapshot_with_quiesce" if quiesce else "VM.snapshot"
        return self.vm_obj(self.xapi.call(method, vm.ref, name))

    def prepare_snapshot(self, snap):
        self.xapi.call("VM.set_is_a_template", snap.ref, False)
        self.xapi.call("VM.set_ha_always_run", snap.ref, False)

    def destroy_snapshot(self, snap):
        """Destroy a snapshot VM and the VDIs it owns (what `xe vm-uninstall` does)."""
        try:
            owned = []
            for vbd_ref in self.xapi.call("VM.get_VBDs", snap.ref):
                vbd = self.xapi.call("VBD.get_record", vbd_ref)
                if "owner" in vbd.get("other_config", {}) and vbd.get("VDI") != "OpaqueRef:NULL":
                    owned.append(vbd["VDI"])
        except XapiFailure as exc:
            if exc.code in GONE_CODES:
                return
            raise
        self.retry_busy("destroy snapshot", lambda: self.xapi.call("VM.destroy", snap.ref))
        for vdi_ref in owned:
            self.retry_busy("destroy VDI", lambda ref=vdi_ref: self.xapi.call("VDI.destroy", ref))

    def snapshot_vdi(self, vdi, name):
        snap = self.vdi_obj(self.xapi.call("VDI.snapshot", vdi.ref, {}))
        self.xapi.call("VDI.set_name_label", snap.ref, name)
        return snap

    def destroy_vdi(self, vdi):
        self.retry_busy("destroy VDI", lambda: self.xapi.call("VDI.destroy", vdi.ref))

    # -- data
    def export_vm(self, snap, dest, compress=None):
        return self.download("/export", {"ref": snap.ref, "use_compression": compress or "false"},
                             dest, "export of %s" % snap.uuid)

    def export_vdi(self, vdi, dest, fmt):
        return self.download("/export_raw_vdi", {"vdi": vdi.ref, "format": fmt}, dest,
                             "export of VDI %s" % vdi.uuid, sparse=(fmt == "raw"))

    def export_metadata(self, vm, dest):
        return self.download("/export_metadata", {"ref": vm.ref, "export_snapshots": "false"},
                             dest, "metadata export of %s" % vm.uuid)

    def dump_pool_db(self, dest):
        return self.download("/pool/xmldbdump", {}, dest, "pool database dump")

    def import_vm(self, src, sr, preserve=False):
        """PUT an .xva to /import; return the refs of the VMs it created."""
        task = self.upload("/import", {"sr_id": sr.ref, "restore": "true" if preserve else "false"},
                           src, "import of %s" % os.path.basename(src))
        return list(task.result or [])

    def create_vdi(self, sr, name, size):
        """Create an empty VDI of `size` bytes on `sr`; return its Obj."""
        ref = self.xapi.call("VDI.create", {
            "name_label": name, "name_description": "restored by vmbackup", "SR": sr.ref,
            "virtual_size": str(size), "type": "user", "sharable": False, "read_only": False,
            "other_config": {}, "xenstore_data": {}, "sm_config": {}, "tags": []})
        return self.vdi_obj(ref)

    def import_vdi(self, vdi, src, fmt):
        """PUT a raw or vhd disk image into an existing VDI."""
        self.upload("/import_raw_vdi", {"vdi": vdi.ref, "format": fmt}, src,
                    "import of %s" % os.path.basename(src))

    def backup_host(self, host, dest):
        return self.download("/host_backup", {}, dest, "backup of host %s" % host["name_label"],
                             endpoint=self.endpoint.with_host(host["address"]))

    # -- incremental backups
    def enable_cbt(self, vdi):
        self.xapi.call("VDI.enable_cbt", vdi.ref)

    def list_changed_blocks(self, older, newer):
        return self.xapi.call("VDI.list_changed_blocks", older.ref, newer.ref)

    def data_destroy(self, vdi):
        self.xapi.call("VDI.data_destroy", vdi.ref)

    def export_vdi_delta(self, vdi, base, dest):
        return self.download("/export_raw_vdi", {"vdi": vdi.ref, "format": "vhd", "base": base.ref},
                             dest, "differencing export of VDI %s" % vdi.uuid)

    def import_vdi_stream(self, vdi, chunks, size):
        """PUT `size` raw bytes from `chunks` to /import_raw_vdi, under a task."""
        what = "import into VDI %s" % vdi.uuid
        with XapiTask(self.xapi, what, self.config.stall_timeout) as task:
            response, conn = task.http(self.endpoint, "PUT", "/import_raw_vdi",
                                       {"vdi": vdi.ref, "format": "raw"}, content_length=size)
            try:
                sent = 0
                for chunk in chunks:
                    try:
                        conn.sock.sendall(chunk)
                    except TLS_ERRORS + CONNECTION_ERRORS as exc:
                        raise transfer_error(what, exc, sent, self.config.stall_timeout)
                    sent += len(chunk)
                task.finish()
            finally:
                close_http(response, conn)

    def download(self, path, params, dest, what, endpoint=None, sparse=False):
        """Stream GET `path` into a new file `dest` under a task; return (bytes, sha256).

        XAPI sends no Content-Length, so a cut stream looks finished: success needs
        the end of the stream AND the task's status `success` (XapiTask checks it).
        """
        with XapiTask(self.xapi, what, self.config.stall_timeout) as task, \
                current_meter(what) as meter:
            response, conn = task.http(endpoint or self.endpoint, "GET", path, params)
            meter.abort = shut_socket(conn.sock)   # a stop cuts a read that waits
            try:
                nbytes, digest = self.stream(response, dest, what, sparse, meter)
            finally:
                meter.abort = None
                close_http(response, conn)
        return nbytes, digest

    def upload(self, path, params, src, what):
        """Stream the file `src` to PUT `path` under a task; return the finished task.

        XAPI answers (200, or 302 to the host that sees the SR) before it reads the
        body, so http_request reads the status line first and the body goes after it.
        """
        with XapiTask(self.xapi, what, self.config.stall_timeout) as task:
            response, conn = task.http(self.endpoint, "PUT", path, params,
                                       content_length=os.path.getsize(src))
            try:
                self.send(conn.sock, src, what)
                task.finish()  # before the close: XAPI may still be reading the last blocks
            finally:
                close_http(response, conn)
        return task

    def send(self, sock, src, what):
        """Send the file `src` on `sock`; raise ExportStalled or ExportFailed if the connection fails."""
        sent = 0
        with open(src, "rb") as handle:
            for block in iter(lambda: handle.read(BUFSIZE), b""):
                try:
                    sock.sendall(block)
                except TLS_ERRORS + CONNECTION_ERRORS as exc:
                    raise transfer_error(what, exc, sent, self.config.stall_timeout)
                sent += len(block)

    def stream(self, response, dest, what, sparse=False, meter=None):
        """Copy the response body into a new file `dest`; return (bytes, sha256 hex).

        One reused set of buffers: the body is read into one (readinto), written from it
        (os.write, no copy) and hashed in BlockHasher's thread while the next is read.
        All-zero blocks of a raw disk are skipped with a seek, so the file stays sparse.
        """
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with BlockHasher(self.nbuffers, self.bufsize) as hasher:
                total = self.copy_blocks(response, fd, hasher, what, sparse, meter)
                digest = hasher.hexdigest()
            os.ftruncate(fd, total)
            os.fsync(fd)
        finally:
            os.close(fd)
        return total, digest

    def copy_blocks(self, response, fd, hasher, what, sparse, meter=None):
        """Read `response` into the hasher's buffers and write them to `fd`; return the bytes.

        Every block is counted on `meter`; a stop request of the run ends the copy
        (Terminated) at the next block, or at once when its socket was shut.
        """
        zero = ZERO_BLOCKS[self.bufsize] if sparse else None
        pacer = Pacer(self.config.max_rate)
        meter = meter or Meter(None, "", what, None)
        total = 0
        while True:
            buf = hasher.buffer()
            try:
                n = response.readinto(buf)
            except TLS_ERRORS + CONNECTION_ERRORS as exc:
                hasher.give_back(buf)
                meter.check()
                raise transfer_error(what, exc, total, self.config.stall_timeout)
            if not n:
                hasher.give_back(buf)
                meter.check()
                return total
            if zero is not None and n == self.bufsize and buf == zero:
                os.lseek(fd, n, os.SEEK_CUR)
            else:
                write_all(fd, buf, n)
            hasher.hash(buf, n)
            total += n
            meter.add(n)
            meter.check()
            pacer.pace(total)


class Pacer:
    """Keeps a transfer at or under `rate` bytes/s (None: no limit), like XO's maxExportRate.

    pace(total) sleeps until `total` bytes are due (start + total/rate): the average rate
    since the start never exceeds `rate`, whatever the block sizes.
    """

    def __init__(self, rate):
        self.rate = rate
        self.start = time.monotonic()

    def pace(self, total):
        if self.rate:
            ahead = self.start + total / float(self.rate) - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)


def write_all(fd, buf, n):
    """Write the first `n` bytes of `buf` to `fd`, without copying them."""
    with memoryview(buf) as whole:
        view = whole[:n]
        while view:
            view = view[os.write(fd, view):]


class BlockHasher:
    """`with BlockHasher() as h:` sha256 of the blocks handed to h.hash, in a thread of its own.

    hashlib releases the GIL on large buffers, so hashing one block runs beside reading
    and writing the next. The blocks are NBUFFERS reused buffers (h.buffer() waits for a
    free one), so memory stays flat whatever the export's size.
    """

    def __init__(self, nbuffers=None, size=BUFSIZE):
        self.sha = hashlib.sha256()
        self.free = queue.Queue()
        for _ in range(nbuffers or NBUFFERS):
            self.free.put(bytearray(size))
        self.work = queue.Queue()
        self.thread = threading.Thread(target=self.run, name="sha256", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.stop()
        return False

    def buffer(self):
        """Return a free buffer (waits while every one is still being hashed)."""
        return self.free.get()

    def give_back(self, buf):
        """Return an unused buffer to the pool."""
        self.free.put(buf)

    def hash(self, buf, n):
        """Hash the first `n` bytes of `buf`; the buffer comes back to the pool afterwards."""
        self.work.put((buf, n))

    def run(self):
        while True:
            item = self.work.get()
            if item is None:
                return
            buf, n = item
            with memoryview(buf) as whole:
                self.sha.update(whole[:n])
            self.free.put(buf)

    def stop(self):
        if self.thread.is_alive():
            self.work.put(None)
            self.thread.join()

    def hexdigest(self):
        """Wait for the blocks handed so far; return their sha256 in hex."""
        self.stop()
        return self.sha.hexdigest()
