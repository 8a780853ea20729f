"""Backing up one VM: snapshot, export, metadata, manifest, success, retention; and the dated files.

Owns: Context, VmLog (a VM's UnitLog), tool_snapshot (the snapshot's lifetime), export_vm_mode/
export_vdi_mode, export_with_retries, build_manifest, backup_vm/backup_vm_safely (a failure
becomes a VmResult), backup_pool_db/backup_hosts, run_note.
Imports: everything below it (errors .. report).
"""

import contextlib
import datetime
import os
import signal
import socket
import sys
import time
import typing

from vmbackup.config import Config
from vmbackup.delta import chain_entries, delta_point, finish_point
from vmbackup.errors import (
    CallFailed, ExportFailed, Terminated, VmBackupError, XapiCallFailed, log)
from vmbackup.formats.xva import xva_is_complete
from vmbackup.metadata import (
    file_entry, manifest_record, pool_info, save_vm_metadata, write_cfg_files)
from vmbackup.progress import check_stop, exporting
from vmbackup.report import RunRecord, UnitLog, VmResult, status_size
from vmbackup.retention import keep_for, prune_dated_files, prune_vm_backups
from vmbackup.selection import PoolView
from vmbackup.store import XVA_SUFFIXES, LocalStore, check_space, inside, safe_dirname, stamp
from vmbackup.transport.base import BEAT_WORD, Obj, Transport
from vmbackup.util import human_size, one_line, partial_file, printable


class VmLog(UnitLog):
    """The log of one VM: lines prefixed `vm=<name>: `; its warnings and errors go in its VmResult;
    the uuids of the snapshots taken for it (`snapshots`)."""

    def __init__(self, name=""):
        UnitLog.__init__(self, name)
        self.snapshots = []


class Context(typing.NamedTuple):
    """What every step of a run needs."""
    config: Config
    transport: Transport
    view: PoolView
    run_note: str               # host pid time, recorded in snapshot tags
    record: typing.Optional[RunRecord] = None   # the run's outcome so far


def snapshot_label(vm_name, moment):
    """Return the name given to the tool's snapshots: vmbackup_<vm>_<stamp>."""
    return "vmbackup_%s_%s" % (printable(vm_name), stamp(moment))


@contextlib.contextmanager
def signals_deferred(signals=(signal.SIGTERM, signal.SIGHUP, signal.SIGINT)):
    """Hold `signals` during the block; they are delivered (and raise) when it ends."""
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    except (AttributeError, OSError, ValueError):  # pragma: no cover - not Linux / not main thread
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


class tool_snapshot:
    """`with tool_snapshot(ctx, "VM"|"VDI", source, take, vlog) as snap:` the snapshot of
    `source` that `take()` makes, tagged as this tool's, destroyed (and checked gone) on
    every way out: errors and signals; and, should the run be killed, recognisable by the
    next run (see is_leftover)."""

    def __init__(self, ctx, cls, source, take, vlog):
        self.ctx, self.cls, self.source, self.take, self.vlog = ctx, cls, source, take, vlog
        self.snap = None

    def __enter__(self):
        check_stop()    # a run asked to stop (jobs) takes no new snapshot
        began, t, note = time.monotonic(), self.ctx.transport, self.ctx.run_note
        try:
            # A signal between "snapshot made" and "snapshot tagged" would leave a snapshot
            # no run may recognise as its own: hold signals until it is tagged. (SIGKILL
            # cannot be held: the pending mark, copied into the snapshot, covers it.)
            with signals_deferred():
                t.mark_pending(self.cls, self.source, note)
                try:
                    self.snap = self.take()
                    t.tag(self.cls, self.snap, note)
                    if self.cls == "VM":   # so its disks are found even if only they remain
                        for _, vdi, _ in t.snapshot_disks(self.snap):
                            t.tag("VDI", vdi, note)
                    t.unmark_pending(self.cls, self.snap)
                    if isinstance(self.vlog, VmLog):
                        self.vlog.snapshots.append(self.snap.uuid)
                    if self.ctx.record is not None:
                        self.ctx.record.open_snapshots[self.snap.uuid] = self.vlog.unit
                finally:
                    t.unmark_pending(self.cls, self.source)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        self.vlog.info("%s snapshot %s taken in %.1fs", self.cls, self.snap.uuid,
                       time.monotonic() - began)
        return self.snap

    def __exit__(self, *exc):
        if self.snap is None:
            return False
        t = self.ctx.transport
        try:
            with signals_deferred():   # a destroy cut in half leaves orphan disks
                (t.destroy_snapshot if self.cls == "VM" else t.destroy_vdi)(self.snap)
                t.check_gone(self.cls, self.snap)
            if self.ctx.record is not None:
                self.ctx.record.open_snapshots.pop(self.snap.uuid, None)
            self.vlog.info("%s snapshot %s destroyed", self.cls, self.snap.uuid)
        except VmBackupError as err:
            self.vlog.error("could not destroy %s snapshot %s: %s (the next run retries)",
                            self.cls, self.snap.uuid, err)
            if exc[0] is None:
                raise
        return False


def vm_snapshot(ctx, vm, vlog, moment):
    """Return the context manager of a VM snapshot named vmbackup_<vm>_<stamp>."""
    quiesce = ctx.config.quiesce or wants_quiesce(ctx.view.vms[vm.ref])
    source = Obj(vm.ref, vm.uuid)
    return tool_snapshot(ctx, "VM", source, lambda: ctx.transport.snapshot_vm(
        source, snapshot_label(vm.name, moment), quiesce, vlog), vlog)


def vdi_snapshot(ctx, disk, label, vlog):
    """Return the context manager of a snapshot of one disk."""
    source = Obj(disk.vdi_ref, disk.vdi["uuid"])
    return tool_snapshot(ctx, "VDI", source, lambda: ctx.transport.snapshot_vdi(source, label), vlog)


def wants_quiesce(vm_record):
    """Return True if the VM asks for quiesced snapshots (other_config or tag vmbackup:quiesce)."""
    flag = (vm_record.get("other_config") or {}).get("vmbackup:quiesce", "")
    return flag.lower() in ("1", "true", "yes") or "vmbackup:quiesce" in (vm_record.get("tags") or ())


def export_vm_mode(ctx, plan, folder, moment, vlog):
    """vm-export: snapshot, leave out [NOBAK] disks, export the .xva; return file entries."""
    compress = ctx.config.compress
    dest = os.path.join(folder, safe_dirname(plan.vm.name) + XVA_SUFFIXES[compress])
    with vm_snapshot(ctx, plan.vm, vlog, moment) as snap:
        if plan.skipped:
            skip = {d.userdevice for d in plan.skipped}
            for vbd, vdi, userdevice in ctx.transport.snapshot_disks(snap):
                if userdevice in skip:
                    ctx.transport.drop_disk(vbd, vdi)
            vlog.info("left out of the export ([NOBAK]): %s",
                      ", ".join(d.device for d in plan.skipped))
        ctx.transport.prepare_snapshot(snap)
        began = time.monotonic()
        with partial_file(dest) as tmp, exporting(os.path.basename(dest), estimate_size(plan)):
            nbytes, digest = ctx.transport.export_vm(snap, tmp, compress)
            if nbytes <= 0 or (compress is None and not xva_is_complete(tmp)):
                raise ExportFailed("export of %s is incomplete (%d bytes)" % (snap.uuid, nbytes))
        vlog.info("exported %s (%s) in %.1fs", os.path.basename(dest), human_size(nbytes),
                  time.monotonic() - began)
    return [file_entry(folder, os.path.basename(dest), digest)]


def disk_file_name(vm_name, disk, fmt):
    """Return the file a vdi-export writes for `disk`: <vm>.raw for the root disk, else <vm>-<dev>.raw."""
    suffix = "" if disk.userdevice == "0" else "-" + safe_dirname(disk.device)
    return "%s%s.%s" % (safe_dirname(vm_name), suffix, fmt)


def export_vdi_mode(ctx, plan, folder, moment, vlog):
    """vdi-export: per selected disk, snapshot and export it raw or vhd; return file entries."""
    fmt = ctx.config.vdi_export_format
    entries = []
    for disk in plan.disks:
        dest = os.path.join(folder, disk_file_name(plan.vm.name, disk, fmt))
        label = "vmbackup_%s_%s_%s" % (printable(plan.vm.name), disk.device, stamp(moment))
        began = time.monotonic()
        with vdi_snapshot(ctx, disk, label, vlog) as snap:
            with partial_file(dest) as tmp, exporting(disk.device, disk_estimate(disk, fmt)):
                nbytes, digest = ctx.transport.export_vdi(snap, tmp, fmt)
                want = int(disk.vdi.get("virtual_size", 0))
                if fmt == "raw" and nbytes != want:
                    raise ExportFailed("export of disk %s is %d bytes, the disk is %d"
                                       % (disk.device, nbytes, want))
                if nbytes <= 0:
                    raise ExportFailed("export of disk %s is empty" % disk.device)
            vlog.info("exported disk %s to %s (%s) in %.1fs", disk.device, os.path.basename(dest),
                      human_size(nbytes), time.monotonic() - began)
        entries.append(file_entry(folder, os.path.basename(dest), digest))
    if plan.skipped:
        vlog.info("left out ([NOBAK]): %s", ", ".join(d.device for d in plan.skipped))
    return entries


def export_delta_mode(ctx, plan, folder, moment, vlog):
    """delta-export: one point of each disk's chain, from one VM snapshot (delta.delta_point)."""
    return delta_point(ctx, plan, folder, vlog, vm_snapshot(ctx, plan.vm, vlog, moment))


EXPORTERS = {"vm-export": export_vm_mode, "vdi-export": export_vdi_mode,
             "meta-export": lambda ctx, plan, folder, moment, vlog: [],
             "delta-export": export_delta_mode}


def export_with_retries(ctx, plan, folder, moment, vlog):
    """Save the VM's metadata and run its exporter; return the manifest's file entries.

    On failure, start again (metadata, then a new snapshot) up to `retries` times.
    """
    vm = plan.vm
    attempts = ctx.config.retries + 1
    for attempt in range(1, attempts + 1):
        try:
            files = [file_entry(folder, rel) for rel in
                     [save_vm_metadata(ctx.transport, Obj(vm.ref, vm.uuid), folder)]
                     + write_cfg_files(folder, ctx.view, vm.ref)]
            return files, EXPORTERS[vm.mode](ctx, plan, folder, moment, vlog)
        except (ExportFailed, CallFailed, XapiCallFailed) as exc:
            if attempt == attempts:
                raise
            vlog.warning("export attempt %d of %d failed (%s); retrying with a new snapshot",
                         attempt, attempts, exc)
            moment = datetime.datetime.now().replace(microsecond=0)
    raise AssertionError("unreachable")  # pragma: no cover


def disk_estimate(disk, fmt):
    """Return the bytes a vdi-export of `disk` writes: its size raw, its physical use in vhd."""
    key = "virtual_size" if fmt == "raw" else "physical_utilisation"
    return int(disk.vdi.get(key) or disk.vdi.get("virtual_size") or 0)


#: An XVA carries a disk in chunks of 1 MiB; a chunk of zeros is left out, except the first
#: and the last, and each chunk brings a tar header, a checksum member's header and body.
XVA_CHUNK, XVA_CHUNK_OVERHEAD = 1 << 20, 3 * 512


def estimate_size(plan, previous=0):
    """Return the bytes a VM's export may take (pure).

    Each exported disk's physical utilisation -- for an XVA in whole 1 MiB chunks, its
    first and last chunk included -- and never less than `previous`, what the VM's last
    complete backup in this mode took: data spread thinly over a disk makes an XVA of
    many chunks that XAPI's physical utilisation does not show.
    """
    total = 0
    for disk in plan.disks:
        size = int(disk.vdi.get("virtual_size") or 0)
        used = int(disk.vdi.get("physical_utilisation") or size)
        if plan.vm.mode == "vm-export":
            chunks = min(-(-size // XVA_CHUNK), -(-used // XVA_CHUNK) + 2)
            used = chunks * (XVA_CHUNK + XVA_CHUNK_OVERHEAD)
        total += used
    return max(total, previous)


def last_backup_bytes(store, vm_folder, mode):
    """Return the bytes of the files of a VM folder's newest complete backup in `mode`
    (0: none)."""
    for backup in reversed(store.backups(vm_folder)):
        if backup.complete and backup.mode == mode and backup.manifest is not None:
            return sum(int(f.get("size") or 0) for f in backup.manifest["files"]
                       if isinstance(f, dict))
    return 0


def build_manifest(ctx, plan, started, files):
    """Return the backup.json of one VM's backup: what was backed up, how, and every file."""
    config, vm = ctx.config, plan.vm
    record = ctx.view.vms[vm.ref]
    disks = [{"device": d.device, "userdevice": d.userdevice, "vdi_uuid": d.vdi["uuid"],
              "name_label": d.vdi.get("name_label", ""),
              "virtual_size": int(d.vdi.get("virtual_size", 0)),
              "file": (disk_file_name(vm.name, d, config.vdi_export_format)
                       if vm.mode == "vdi-export" else None)} for d in plan.disks]
    if vm.mode == "delta-export":
        files, disks = chain_entries(files, disks)
    return manifest_record(
        {"name": vm.name, "uuid": vm.uuid, "power_state": record.get("power_state")},
        vm.mode, ctx.transport.name, started.isoformat(), datetime.datetime.now().isoformat(),
        files, disks, [d.device for d in plan.skipped], config.compress,
        config.vdi_export_format, pool_info(ctx.view))


def backup_vm(ctx, plan, vlog):
    """Back up one VM into a new dated folder; return its VmResult; raise VmBackupError."""
    config, vm = ctx.config, plan.vm
    if plan.problems:
        raise ExportFailed("; ".join(plan.problems))
    began = time.monotonic()
    store, vm_folder = LocalStore(config.backup_dir), safe_dirname(vm.name)
    check_space(config, estimate_size(plan, last_backup_bytes(store, vm_folder, vm.mode)),
                "VM %s" % printable(vm.name))     # a VM refused leaves no folder behind
    os.makedirs(inside(config.backup_dir, vm_folder), exist_ok=True)
    if config.pre_clean and vm.mode != "meta-export":
        prune_vm_backups(store, vm_folder, keep_for(config, vm), drop_incomplete=False, vlog=vlog,
                         mode=vm.mode, uuid=vm.uuid, incoming=datetime.datetime.now())
    folder, moment = store.new_folder(vm_folder)
    vlog.info("%s to %s", vm.mode, folder)
    started = datetime.datetime.now()
    files, exported = export_with_retries(ctx, plan, folder, moment, vlog)
    manifest = build_manifest(ctx, plan, started, files + exported)
    store.commit(folder, manifest)
    note = finish_point(ctx, folder, manifest, vlog) if vm.mode == "delta-export" else ""
    prune_vm_backups(store, vm_folder, keep_for(config, vm), vlog=vlog, mode=vm.mode, uuid=vm.uuid)
    total = sum(f["size"] for f in exported)
    if vm.mode == "delta-export":     # a sparse VHD's apparent size is 2 MiB per changed block
        total = sum(int((f.get("chain") or {}).get("changed_bytes") or 0) for f in exported)
    if vlog.errors:
        return VmResult(vm.name, vm.uuid, vm.mode, "error", folder, total,
                        time.monotonic() - began, "; ".join(vlog.errors), tuple(vlog.warnings))
    return VmResult(vm.name, vm.uuid, vm.mode, "warning" if vlog.warnings else "success", folder,
                    total, time.monotonic() - began, "; ".join(vlog.warnings) or note,
                    tuple(vlog.warnings))


def backup_vm_safely(ctx, plan, status_log):
    """Run backup_vm, turning any failure into an error VmResult: one VM never stops the others."""
    vm = plan.vm
    vlog = VmLog(vm.name)
    status_log.line(vm.mode, "begin", printable(vm.name))
    began = time.monotonic()
    try:
        result = backup_vm(ctx, plan, vlog)
    except (VmBackupError, OSError) as exc:
        message = str(exc) if isinstance(exc, VmBackupError) else "%s: %s" % (
            getattr(exc, "filename", "") or "backup_dir", exc.strerror or exc)
        result = failed_result(vm, vlog, message, began)
    except Exception as exc:  # noqa: BLE001 - a bug met by one VM must not stop the others
        vlog.debug("traceback", exc_info=True)
        result = failed_result(vm, vlog, "internal error: %s: %s (run with -v for the traceback)"
                               % (type(exc).__name__, one_line(exc)), began)
    except Terminated as exc:   # the run is stopping: this VM is a failed unit of it
        result = failed_result(vm, vlog, cut_short(ctx, vlog, exc), began)
    if result.status == "error":
        status_log.line(vm.mode, "end", "%s-FAIL %s" % (vm.mode.upper(), printable(vm.name)))
    else:
        status_log.line(vm.mode, "end", "SUCCESS %s,elapse:%d size:%s" % (
            printable(vm.name), round(result.seconds / 60.0), status_size(result.bytes)))
    return result


def cut_short(ctx, vlog, exc):
    """Return what to say of a VM whose backup a signal stopped: the signal, and what
    became of its snapshots (only the truth: those still open are named)."""
    said = "terminated by %s before it finished" % (exc.args[0] if exc.args else "a signal")
    left = sorted(uuid for uuid, unit in (ctx.record.open_snapshots.items() if ctx.record
                                          else ()) if unit == vlog.unit)
    if left:
        return "%s; snapshot %s left (the next run destroys it)" % (said, ", ".join(left))
    if vlog.snapshots:
        return "%s; snapshot%s destroyed" % (said, "s" if len(vlog.snapshots) > 1 else "")
    return said


def failed_result(vm, vlog, message, began):
    """Return the error VmResult of a VM whose backup raised `message` (plus what it logged)."""
    vlog.failed(message)
    message = "; ".join([message] + vlog.errors)
    return VmResult(vm.name, vm.uuid, vm.mode, "error", None, 0, time.monotonic() - began,
                    message, tuple(vlog.warnings))


def backup_dated_file(ctx, folder_name, file_name, what, fetch):
    """Write one pool_db_/host_ backup file via `fetch(tmp)`, prune its folder; return VmResult."""
    began, ulog = time.monotonic(), UnitLog(what)
    try:
        folder = inside(ctx.config.backup_dir, safe_dirname(folder_name))
        os.makedirs(folder, exist_ok=True)
        dest = os.path.join(folder, file_name)
        with partial_file(dest) as tmp:
            nbytes, _ = fetch(tmp)
            if not nbytes:
                raise ExportFailed("%s is empty: XAPI sent nothing" % what)
        prune_dated_files(LocalStore(ctx.config.backup_dir), safe_dirname(folder_name),
                          ctx.config.max_backups)
        log.info("%s: %s (%s)", what, dest, human_size(nbytes))
        return VmResult(what, "", "pool", "success", dest, nbytes, time.monotonic() - began)
    except (VmBackupError, OSError) as exc:
        ulog.failed(str(exc))
        return VmResult(what, "", "pool", "error", None, 0, time.monotonic() - began, str(exc))


def pool_db_folder(view):
    """Return the folder name of the pool database dumps: METADATA_<master's hostname>."""
    return "METADATA_" + (view.master.get("hostname") or view.master.get("name_label", "master"))


def host_folder(ref, host):
    """Return (folder name, host name) of a host's dom0 backups: HOST_<hostname>."""
    name = host.get("hostname") or host.get("name_label", ref)
    return "HOST_" + name, name


def backup_pool_db(ctx, moment):
    """Dump the pool database to METADATA_<master>/pool_db_<stamp>.dump."""
    return backup_dated_file(ctx, pool_db_folder(ctx.view),
                             "pool_db_%s.dump" % moment.strftime("%Y%m%d-%H%M%S"),
                             "pool database", ctx.transport.dump_pool_db)


def backup_hosts(ctx, moment):
    """Back up every host's dom0 to HOST_<hostname>/host_<stamp>.xbk (one request per host)."""
    results = []
    for ref, host in sorted(ctx.view.hosts.items(), key=lambda item: item[1].get("name_label", "")):
        folder, name = host_folder(ref, host)
        results.append(backup_dated_file(
            ctx, folder, "host_%s.xbk" % moment.strftime("%Y%m%d-%H%M%S"),
            "host backup of %s" % name, lambda tmp, h=host: ctx.transport.backup_host(h, tmp)))
    return results


def run_note():
    """Return what the tool's tags record about this run: 'host pid UTC-time beat'
    (beat: the run keeps a heartbeat in the pool, see leftovers.PoolBeat)."""
    return "%s %d %s %s" % (socket.gethostname(), os.getpid(),
                            datetime.datetime.utcnow().replace(microsecond=0).isoformat(), BEAT_WORD)
