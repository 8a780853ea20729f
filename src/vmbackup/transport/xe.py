"""The transport over the xe command line, as NAUbackup used on a pool host.

Owns: XeTransport, XeFailed (and the xe sentences mapped back to XAPI codes), find_xe,
die_with_parent (an xe child never outlives vmbackup).
Imports: errors, util, transport.base.
"""

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

from vmbackup.errors import CallFailed, ExportStalled, VmBackupError, log
from vmbackup.progress import current_meter
from vmbackup.store import RUN_SIGNALS
from vmbackup.transport.base import Transport
from vmbackup.util import fsync_path, one_line


#: Where xe lives on a pool host (then: the first xe on PATH).
DEFAULT_XE_PATHS = ("/opt/xensource/bin/xe", "/usr/bin/xe")


#: The sentence real xe prints for an API error (the datamodel's doc string), mapped
#: back to its code, for the errors the tool acts on; others print "Error code: X".
XE_ERROR_SENTENCES = {
    "Another operation involving the object is currently in progress": "OTHER_OPERATION_IN_PROGRESS",
    "this VDI is in use by some other operation": "VDI_IN_USE",
    "The uuid you supplied was invalid": "UUID_INVALID",
    "You gave an invalid object reference": "HANDLE_INVALID",
    "This function is no longer available": "MESSAGE_REMOVED",
    "The SR backend does not support the operation": "SR_OPERATION_NOT_SUPPORTED",
    "The SR is full": "SR_FULL",
    "You attempted an operation that was explicitly blocked": "OPERATION_BLOCKED",
    "not in an appropriate power state": "VM_BAD_POWER_STATE",
    "The credentials given by the user are incorrect": "SESSION_AUTHENTICATION_FAILED",
    "The server failed to handle your request, due to an internal error": "INTERNAL_ERROR",
}


#: prctl(2) option: the signal the kernel sends a process when its parent dies.
PR_SET_PDEATHSIG = 1


def _load_prctl():
    """Return libc's prctl, or None where there is none (not Linux)."""
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):  # pragma: no cover - not Linux
        return None


def die_with_parent():
    """Return a preexec_fn that makes a child die (SIGKILL) when vmbackup dies, even by
    `kill -9`, or None where the system has no PR_SET_PDEATHSIG.

    Without it a killed run leaves `xe vm-export` downloading into its .part file and
    holding the snapshot, so the next run's destroy waits on OTHER_OPERATION_IN_PROGRESS.
    (Where it is missing, the next run cancels the export's task; see leftovers.)
    """
    prctl, parent = _load_prctl(), os.getpid()
    if prctl is None:  # pragma: no cover - not Linux
        return None

    def preexec():
        # a worker thread holds the run's signals blocked; xe must die of them as usual
        signal.pthread_sigmask(signal.SIG_UNBLOCK, RUN_SIGNALS)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:   # vmbackup died before the call took effect
            os._exit(127)
    return preexec


class XeFailed(CallFailed):
    """xe {} failed (exit {}): {}"""

    def __init__(self, argv, rc, stderr):
        self.argv, self.rc, self.stderr = argv, rc, stderr
        text = one_line(stderr) or "no message"
        if self.code and self.code not in text:
            text = self.code + ": " + text
        VmBackupError.__init__(self, argv[1] if len(argv) > 1 else "?", rc, text)

    @property
    def code(self):
        """The XAPI error code behind xe's message, if it can be told."""
        match = re.search(r"Error code: (\S+)", self.stderr)
        if match:
            return match.group(1)
        for sentence, code in XE_ERROR_SENTENCES.items():
            if sentence in self.stderr:
                return code
        return ""


class XeTransport(Transport):
    """The xe command, as NAUbackup used it on the pool host; XenAPI only for reading and tags."""

    name = "xe"
    #: Seconds between looks at a downloading xe's file (has it grown?).
    POLL = 0.5
    #: Seconds an aborted xe gets to exit on SIGTERM before it is killed.
    TERM_GRACE = 10
    #: Seconds between looks at the progress of a downloading xe's task.
    TASK_PROGRESS_EVERY = 2.0

    def __init__(self, xapi, config, password=None, xe_path=None):
        Transport.__init__(self, xapi, config)
        self.xe_path = xe_path
        self.connect_args = []
        self.secret = None
        endpoint = xapi.endpoint
        if not endpoint.is_local:
            # xe's -pwf: the user, then the password. It reaches xe through a pipe
            # (-pwf /dev/fd/N), never on its command line nor in a file that a killed
            # run would leave behind.
            self.secret = ("%s\n%s\n" % (xapi.username, password or "")).encode("utf-8")
            self.connect_args = ["-s", endpoint.host, "-u", xapi.username]
            if endpoint.port:
                self.connect_args[2:2] = ["-p", str(endpoint.port)]
            if endpoint.scheme == "http":
                self.connect_args.append("--nossl")

    def argv(self, command, *flags, **params):
        """Return xe's argument list: xe("vm-export", uuid=u) -> [XE, 'vm-export', 'uuid=u']."""
        args = [self.xe_path, command]
        for key, value in params.items():
            if value is None:
                continue
            if isinstance(value, bool):
                value = "true" if value else "false"
            args.append("%s=%s" % (key.replace("_", "-"), value))
        return args + list(flags) + self.connect_args

    def start_xe(self, args, **kwargs):
        """Start xe with `args` (plus -pwf /dev/fd/N when it needs the password); return the
        Popen. The child dies with vmbackup (die_with_parent)."""
        read_fd = None
        if self.secret is not None:
            read_fd, write_fd = os.pipe()   # a few bytes: the pipe holds them, no writer blocks
            try:
                os.write(write_fd, self.secret)
            finally:
                os.close(write_fd)
            args = args + ["-pwf", "/dev/fd/%d" % read_fd]
        try:
            return subprocess.Popen(args, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent(),
                                    pass_fds=(read_fd,) if read_fd is not None else (), **kwargs)
        finally:
            if read_fd is not None:
                os.close(read_fd)

    def xe(self, command, *flags, **params):
        """Run xe and return its stdout; raise XeFailed with its stderr."""
        args = self.argv(command, *flags, **params)
        log.debug("run %s", args[:2])
        proc = self.start_xe(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True)
        try:
            out, err = proc.communicate()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if proc.returncode != 0:
            raise XeFailed(args, proc.returncode, err or out)
        return out

    def xe_long(self, dest, what, command, progress_of=None, **params):
        """Run a downloading xe command, aborting it if `dest` stops growing for stall_timeout.

        Its progress: the bytes in `dest`, and the fraction XAPI gives the task that
        exports `progress_of` ((class, Obj): xe prints none). A stop request of the run
        ends xe (Terminated).
        """
        args = self.argv(command, **params)
        log.debug("run %s", args[:2])
        with tempfile.TemporaryFile() as err, current_meter(what) as meter:
            proc = self.start_xe(args, stdout=subprocess.DEVNULL, stderr=err)
            try:
                size, moved = -1, time.monotonic()
                asked = moved
                while proc.poll() is None:
                    time.sleep(self.POLL)
                    meter.check()
                    now_size = os.path.getsize(dest) if os.path.exists(dest) else 0
                    meter.done = now_size
                    if now_size != size:
                        size, moved = now_size, time.monotonic()
                    elif time.monotonic() - moved > self.config.stall_timeout:
                        raise ExportStalled(what, self.config.stall_timeout)
                    if progress_of and meter.board \
                            and time.monotonic() - asked > self.TASK_PROGRESS_EVERY:
                        asked = time.monotonic()
                        meter.fraction = self.task_progress(*progress_of)
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(self.TERM_GRACE)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            if proc.returncode != 0:
                meter.check()
                err.seek(0)
                raise XeFailed(args, proc.returncode, err.read().decode("utf-8", "replace"))
        fsync_path(dest)
        return os.path.getsize(dest), None

    def task_progress(self, cls, obj):
        """Return the progress (0..1) of the task exporting `obj` (a VM or VDI), or None."""
        try:
            for task in self.xapi.call(cls + ".get_current_operations", obj.ref):
                progress = float(self.xapi.call("task.get_progress", task))
                if 0.0 <= progress <= 1.0:
                    return progress
        except (VmBackupError, ValueError) as exc:
            log.debug("progress of %s: %s", obj.uuid, exc)
        return None

    # -- snapshots
    def take_snapshot(self, vm, name, quiesce):
        command = "vm-snapshot-with-quiesce" if quiesce else "vm-snapshot"
        return self.vm_obj(uuid=self.xe(command, uuid=vm.uuid, new_name_label=name).strip())

    def prepare_snapshot(self, snap):
        self.xe("template-param-set", uuid=snap.uuid, is_a_template=False, ha_always_run=False)

    def destroy_snapshot(self, snap):
        # snapshot-uninstall, not vm-uninstall: vm-uninstall finds nothing while the
        # snapshot is still a template (e.g. when the export never started).
        self.retry_busy("snapshot-uninstall",
                        lambda: self.xe("snapshot-uninstall", uuid=snap.uuid, force=True))

    def snapshot_vdi(self, vdi, name):
        snap = self.vdi_obj(uuid=self.xe("vdi-snapshot", uuid=vdi.uuid).strip())
        self.xe("vdi-param-set", uuid=snap.uuid, name_label=name)
        return snap

    def destroy_vdi(self, vdi):
        self.retry_busy("vdi-destroy", lambda: self.xe("vdi-destroy", uuid=vdi.uuid))

    # -- data
    def export_vm(self, snap, dest, compress=None):
        # xe matches compress= exactly: only true/gzip/zstd compress ("True" would not).
        return self.xe_long(dest, "export of %s" % snap.uuid, "vm-export", ("VM", snap),
                            uuid=snap.uuid, filename=dest, compress=compress or "false")

    def export_vdi(self, vdi, dest, fmt):
        return self.xe_long(dest, "export of VDI %s" % vdi.uuid, "vdi-export", ("VDI", vdi),
                            uuid=vdi.uuid, filename=dest, format=fmt)

    def export_metadata(self, vm, dest):
        return self.xe_long(dest, "metadata export of %s" % vm.uuid, "vm-export", uuid=vm.uuid,
                            filename=dest, metadata=True)

    def dump_pool_db(self, dest):
        return self.xe_long(dest, "pool database dump", "pool-dump-database", file_name=dest)

    def import_vm(self, src, sr, preserve=False):
        out = self.xe("vm-import", filename=src, sr_uuid=sr.uuid, preserve=preserve or None)
        return [self.vm_obj(uuid=u).ref for u in re.split(r"[\s,]+", out.strip()) if u]

    def import_vdi(self, vdi, src, fmt):
        self.xe("vdi-import", uuid=vdi.uuid, filename=src, format=fmt)

    def create_vdi(self, sr, name, size):
        return self.vdi_obj(uuid=self.xe("vdi-create", sr_uuid=sr.uuid, name_label=name,
                                         virtual_size=size, type="user").strip())

    def plug_vbd(self, vbd_ref):
        self.xe("vbd-plug", uuid=self.xapi.call("VBD.get_uuid", vbd_ref))

    def backup_host(self, host, dest):
        return self.xe_long(dest, "backup of host %s" % host["name_label"], "host-backup",
                            host=host["uuid"], file_name=dest)

    # -- incremental backups: xe has every CBT command; NBD details and unplugging a
    # disk from a snapshot go through XenAPI (Transport).
    def enable_cbt(self, vdi):
        self.xe("vdi-enable-cbt", uuid=vdi.uuid)

    def list_changed_blocks(self, older, newer):
        return self.xe("vdi-list-changed-blocks", vdi_from_uuid=older.uuid,
                       vdi_to_uuid=newer.uuid).strip()

    def data_destroy(self, vdi):
        self.xe("vdi-data-destroy", uuid=vdi.uuid)

    def export_vdi_delta(self, vdi, base, dest):
        return self.xe_long(dest, "differencing export of VDI %s" % vdi.uuid, "vdi-export",
                            uuid=vdi.uuid, filename=dest, format="vhd", base=base.uuid)

    def import_vdi_stream(self, vdi, chunks, size):
        """xe vdi-import reads a file: write the bytes to a sparse temporary file first."""
        with tempfile.NamedTemporaryFile(prefix="vmbackup-restore-", suffix=".raw") as tmp:
            for chunk in chunks:
                if chunk.count(0) == len(chunk):
                    tmp.seek(len(chunk), os.SEEK_CUR)
                else:
                    tmp.write(chunk)
            tmp.truncate(size)
            tmp.flush()
            self.xe("vdi-import", uuid=vdi.uuid, filename=tmp.name, format="raw")

    def close(self):
        self.secret = None


def find_xe(config):
    """Return the xe binary to use, or None: xe_path, then /opt/xensource/bin/xe, then PATH."""
    if config.xe_path:
        return config.xe_path
    for path in DEFAULT_XE_PATHS:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("xe")
