"""The transport over XenAPI and XAPI's HTTP handlers (/export, /export_raw_vdi, /import...).

Owns: ApiTransport.
Imports: errors, util, xapi, transport.base.
"""

import hashlib
import http.client
import os
import socket
import ssl
import time
import urllib.parse

from vmbackup.errors import ExportFailed, ExportStalled, VmBackupError, log, xapi_error_text
from vmbackup.transport.base import GONE_CODES, Transport
from vmbackup.util import human_size, one_line
from vmbackup.xapi import CONNECTION_ERRORS, XapiFailure, xapi_value


class ApiTransport(Transport):
    """XenAPI calls, and data streamed from XAPI's HTTP handlers straight to the file."""

    name = "api"
    BUFSIZE = 1 << 20

    def __init__(self, xapi, config, password=None):
        Transport.__init__(self, xapi, config, password)
        self.endpoint = xapi.endpoint

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
        record = self.upload("/import", {"sr_id": sr.ref, "restore": "true" if preserve else "false"},
                             src, "import of %s" % os.path.basename(src))
        return list(xapi_value(record.get("result")) or [])

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

    def upload(self, path, params, src, what):
        """Stream the file `src` to PUT `path` under a task; return the task's record.

        XAPI answers (200, or 302 to the host that sees the SR) before it reads the
        body, so the status line is read first and the body sent after it.
        """
        task = self.xapi.call("task.create", "vmbackup: " + what, "")
        size = os.path.getsize(src)
        endpoint = self.endpoint
        target = path + "?" + urllib.parse.urlencode(dict(params, session_id=self.xapi.ref,
                                                          task_id=task))
        try:
            for _ in range(4):
                conn = endpoint.connection(timeout=self.config.stall_timeout)
                response = None
                try:
                    conn.putrequest("PUT", target, skip_accept_encoding=True)
                    conn.putheader("Content-Length", str(size))
                    conn.endheaders()
                    # Read the answer ourselves: conn.getresponse() would drop the socket
                    # of a Connection: close answer before the body is sent.
                    sock = conn.sock
                    response = http.client.HTTPResponse(sock, method="PUT")
                    response.begin()
                    if response.status in (301, 302, 303, 307) and response.getheader("Location"):
                        parts = urllib.parse.urlsplit(response.getheader("Location"))
                        endpoint = endpoint._replace(scheme=parts.scheme or endpoint.scheme,
                                                     host=parts.hostname, port=parts.port)
                        target = parts.path + ("?" + parts.query if parts.query else "")
                        continue
                    if response.status != 200:
                        raise ExportFailed("PUT %s: HTTP %d %s" % (path, response.status,
                                                                    response.reason))
                    with open(src, "rb") as handle:
                        for block in iter(lambda: handle.read(self.BUFSIZE), b""):
                            sock.sendall(block)
                    record = self.wait_task(task, what, timeout=max(600, self.config.stall_timeout))
                finally:
                    conn.close()
                    if response is not None:
                        response.close()
                if record["status"] != "success":
                    raise ExportFailed("%s failed: task %s: %s" % (
                        what, record["status"], xapi_error_text(record.get("error_info"))))
                return record
            raise ExportFailed("PUT %s: too many redirects" % path)
        except ssl.SSLError as exc:
            raise ExportFailed("PUT %s: TLS: %s" % (path, one_line(exc)))
        except CONNECTION_ERRORS as exc:
            raise ExportFailed("PUT %s on %s: %s" % (path, endpoint.url, one_line(exc)))
        finally:
            try:
                self.xapi.call("task.destroy", task)
            except VmBackupError as exc:
                log.debug("task.destroy: %s", exc)

    def backup_host(self, host, dest):
        return self.download("/host_backup", {}, dest, "backup of host %s" % host["name_label"],
                             endpoint=self.endpoint.with_host(host["address"]))

    def download(self, path, params, dest, what, endpoint=None, sparse=False):
        """Stream GET `path` into a new file `dest` under a task; return (bytes, sha256).

        XAPI sends no Content-Length, so a cut stream looks finished: success needs
        the end of the stream AND the task's status `success`.
        """
        task = self.xapi.call("task.create", "vmbackup: " + what, "")
        try:
            query = dict(params, session_id=self.xapi.ref, task_id=task)
            try:
                response, conn = self.open(endpoint or self.endpoint, "GET", path, query)
            except ExportFailed as exc:
                # XAPI's error page is HTML; the task says why in XAPI's own words
                reason = self.xapi.call("task.get_record", task).get("error_info")
                if reason:
                    raise ExportFailed("%s refused: %s" % (what, xapi_error_text(reason)))
                raise exc
            try:
                nbytes, digest = self.stream(response, dest, what, sparse)
            finally:
                response.close()
                conn.close()
            record = self.wait_task(task, what)
            if record["status"] != "success":
                raise ExportFailed("%s failed: task %s: %s" % (
                    what, record["status"], xapi_error_text(record.get("error_info")) or "no reason"))
            return nbytes, digest
        except BaseException:
            self.cancel_task(task)
            raise
        finally:
            try:
                self.xapi.call("task.destroy", task)
            except VmBackupError as exc:
                log.debug("task.destroy: %s", exc)

    def open(self, endpoint, method, path, query, redirects=3):
        """Return (response, connection) for a 200 answer, following XAPI's 302 redirects."""
        target = path + "?" + urllib.parse.urlencode(query)
        for _ in range(redirects + 1):
            conn = endpoint.connection(timeout=self.config.stall_timeout)
            try:
                conn.request(method, target)
                response = conn.getresponse()
            except ssl.SSLError as exc:
                conn.close()
                raise ExportFailed("%s %s: TLS: %s" % (method, path, one_line(exc)))
            except CONNECTION_ERRORS as exc:
                conn.close()
                raise ExportFailed("%s %s on %s: %s" % (method, path, endpoint.url, one_line(exc)))
            if response.status in (301, 302, 303, 307) and response.getheader("Location"):
                location = response.getheader("Location")
                response.close()
                conn.close()
                parts = urllib.parse.urlsplit(location)
                endpoint = endpoint._replace(scheme=parts.scheme or endpoint.scheme,
                                             host=parts.hostname, port=parts.port)
                target = parts.path + ("?" + parts.query if parts.query else "")
                log.debug("%s %s redirected to %s", method, path, endpoint.url)
                continue
            if response.status != 200:
                snippet = response.read(2048).decode("utf-8", "replace")
                response.close()
                conn.close()
                raise ExportFailed("%s %s: HTTP %d %s: %s" % (method, path, response.status,
                                                               response.reason, one_line(snippet, 200)))
            return response, conn
        raise ExportFailed("%s %s: too many redirects" % (method, path))

    def stream(self, response, dest, what, sparse=False):
        """Copy the response body into a new file `dest`; return (bytes, sha256 hex).

        All-zero blocks of a raw disk are skipped with a seek, so the file stays sparse.
        """
        digest = hashlib.sha256()
        buf = bytearray(self.BUFSIZE)
        view = memoryview(buf)
        zero = bytes(self.BUFSIZE)
        total, last_log = 0, time.monotonic()
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as out:
            while True:
                try:
                    n = response.readinto(buf)
                except socket.timeout:
                    raise ExportStalled(what, self.config.stall_timeout)
                except CONNECTION_ERRORS as exc:
                    raise ExportFailed("%s: connection lost after %s: %s"
                                       % (what, human_size(total), one_line(exc)))
                if not n:
                    break
                chunk = view[:n]
                digest.update(chunk)
                if sparse and n == self.BUFSIZE and buf == zero:
                    out.seek(n, os.SEEK_CUR)
                else:
                    out.write(chunk)
                total += n
                if time.monotonic() - last_log > 60:
                    last_log = time.monotonic()
                    log.info("%s: %s so far", what, human_size(total))
            out.truncate(total)
            out.flush()
            os.fsync(out.fileno())
        return total, digest.hexdigest()

    def wait_task(self, task, what, timeout=None):
        """Return the task's record once it has left `pending`."""
        deadline = time.monotonic() + (timeout or self.config.stall_timeout)
        delay = 0.05
        while True:
            record = self.xapi.call("task.get_record", task)
            if record.get("status") not in ("pending", "cancelling"):
                return record
            if time.monotonic() > deadline:
                raise ExportFailed("%s: the task did not finish" % what)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def cancel_task(self, task):
        """Cancel a task that may still run, best effort (the export is being abandoned)."""
        try:
            if self.xapi.call("task.get_status", task) == "pending":
                self.xapi.call("task.cancel", task)
        except VmBackupError as exc:
            log.debug("task.cancel: %s", exc)
