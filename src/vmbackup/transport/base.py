"""What both transports share: objects, the tool's tags, retried destroys, the quiesce fallback.

Owns: Obj, TAG_KEY/PENDING_KEY, BUSY_CODES/GONE_CODES, error_code,
quiesce_unavailable, Transport (the interface and its shared methods).
Imports: errors, util, xapi.
"""

import copy
import datetime
import time
import typing

from vmbackup.errors import CallFailed, ExportFailed, log
from vmbackup.util import printable
from vmbackup.xapi import XapiFailure


class Obj(typing.NamedTuple):
    """A XAPI object by reference and uuid (the API speaks refs, xe speaks uuids)."""
    ref: str
    uuid: str


#: other_config key that marks the snapshots and VDIs this tool made; its value
#: starts with the object's own uuid, so a copy (a restored VM, a snapshot of a
#: restored VM) never looks like ours.
TAG_KEY = "vmbackup_snapshot"


#: other_config key a run puts on a VM (or disk) just before snapshotting it: the snapshot
#: copies other_config, so a snapshot made while the run is killed still says whose it is.
PENDING_KEY = "vmbackup_pending"


#: The last word of a run note ('host pid start beat'): the run keeps a heartbeat in the
#: pool (leftovers.PoolBeat), so any host can tell when it is over.
BEAT_WORD = "beat"


#: A pending-marked snapshot counts as the run's only if taken this soon after the mark.
PENDING_WINDOW = datetime.timedelta(minutes=30)


#: XAPI errors that mean "busy right now": an export still holds the object.
BUSY_CODES = ("OTHER_OPERATION_IN_PROGRESS", "VDI_IN_USE")


#: XAPI errors that mean the object is already gone.
GONE_CODES = ("HANDLE_INVALID", "UUID_INVALID")


def quiesce_unavailable(exc):
    """Return True if a quiesced snapshot failed in a way a normal snapshot can replace.

    MESSAGE_REMOVED: the pool is Citrix Hypervisor 8.1 or newer; VM_SNAPSHOT_WITH_QUIESCE_*:
    the guest has no working VSS provider (OnyxBackupVM falls back the same way).
    """
    code = error_code(exc)
    return code == "MESSAGE_REMOVED" or code.startswith("VM_SNAPSHOT_WITH_QUIESCE_")


def error_code(exc):
    """Return the XAPI error code carried by an XapiFailure or XeFailed, else ''."""
    return getattr(exc, "code", "") or ""


class Transport:
    """What both transports share: the session, tagging, retried destroys."""

    name = "?"
    #: How long a destroy keeps retrying while the object is busy (seconds).
    BUSY_WAIT = 120.0
    #: Retrying a busy destroy: the first delay and the longest one (seconds), doubling between.
    BUSY_POLL_FIRST, BUSY_POLL_MAX = 0.2, 5.0

    def __init__(self, xapi, config):
        self.xapi = xapi
        self.config = config

    def tag(self, cls, obj, note):
        """Mark `obj` (a VM snapshot or a VDI) as this tool's own, replacing a copied tag.

        A snapshot copies its source's other_config, and the disks of a VM restored from
        a backup carry the tag of the snapshot that was exported; XAPI's
        add_to_other_config refuses an existing key (MAP_DUPLICATE_KEY), so remove first.
        """
        self.remove_key(cls, obj, TAG_KEY)
        self.xapi.call(cls + ".add_to_other_config", obj.ref, TAG_KEY, "%s %s" % (obj.uuid, note))

    def remove_key(self, cls, obj, key):
        """Remove `key` from `obj`'s other_config (absent, or `obj` gone, is fine)."""
        try:
            self.xapi.call(cls + ".remove_from_other_config", obj.ref, key)
        except XapiFailure as exc:
            if exc.code not in GONE_CODES:
                raise

    def retry_busy(self, what, action):
        """Run `action()` until it stops failing with a busy code; treat gone as done."""
        delay, deadline = self.BUSY_POLL_FIRST, time.monotonic() + self.BUSY_WAIT
        while True:
            try:
                return action()
            except CallFailed as exc:
                code = error_code(exc)
                if code in GONE_CODES:
                    log.debug("%s: already gone", what)
                    return None
                if code not in BUSY_CODES or time.monotonic() > deadline:
                    raise
                log.debug("%s: %s, retrying in %.1fs", what, code, delay)
                time.sleep(delay)
                delay = min(delay * 2, self.BUSY_POLL_MAX)

    def vm_obj(self, ref=None, uuid=None):
        """Return Obj for a VM known by ref or uuid (one call)."""
        if ref is None:
            return Obj(self.xapi.call("VM.get_by_uuid", uuid), uuid)
        return Obj(ref, uuid or self.xapi.call("VM.get_uuid", ref))

    def vdi_obj(self, ref=None, uuid=None):
        """Return Obj for a VDI known by ref or uuid (one call)."""
        if ref is None:
            return Obj(self.xapi.call("VDI.get_by_uuid", uuid), uuid)
        return Obj(ref, uuid or self.xapi.call("VDI.get_uuid", ref))

    def snapshot_disks(self, snap):
        """Return [(vbd Obj, vdi Obj, userdevice)] of a snapshot's Disk VBDs."""
        found = []
        for vbd_ref in self.xapi.call("VM.get_VBDs", snap.ref):
            vbd = self.xapi.call("VBD.get_record", vbd_ref)
            if vbd.get("type") == "Disk" and not vbd.get("empty") and vbd.get("VDI") != "OpaqueRef:NULL":
                found.append((Obj(vbd_ref, vbd["uuid"]), self.vdi_obj(vbd["VDI"]),
                              str(vbd.get("userdevice"))))
        return found

    def snapshot_vm(self, vm, name, quiesce=False, vlog=None):
        """Snapshot `vm`: quiesced if asked and the pool and guest can, else a normal one.

        The fallback is a warning of the VM's (`vlog`, the VM's UnitLog), not of the run.
        """
        if quiesce:
            try:
                return self.take_snapshot(vm, name, quiesce=True)
            except CallFailed as exc:
                if not quiesce_unavailable(exc):
                    raise
                (vlog or log).warning("no quiesced snapshot (%s): taking a normal snapshot "
                                      "(%s)", exc.code, printable(name))
        return self.take_snapshot(vm, name, quiesce=False)

    def take_snapshot(self, vm, name, quiesce):
        """Take one VM snapshot (quiesced or not) and return its Obj."""
        raise NotImplementedError

    def mark_pending(self, cls, obj, note):
        """Put the pending mark on the VM or disk about to be snapshotted."""
        self.unmark_pending(cls, obj)
        self.xapi.call(cls + ".add_to_other_config", obj.ref, PENDING_KEY, note)

    def unmark_pending(self, cls, obj):
        """Remove the pending mark (absent is fine)."""
        self.remove_key(cls, obj, PENDING_KEY)

    def untag_copy(self, vm_ref):
        """Remove the tool's keys from a VM made from a backup and from its disks: they are
        copies, and left in place they would be copied into every later snapshot."""
        for cls, ref in [("VM", vm_ref)] + [("VDI", vdi.ref) for _, vdi, _ in
                                           self.snapshot_disks(Obj(vm_ref, ""))]:
            other = self.xapi.call(cls + ".get_other_config", ref)
            for key in (TAG_KEY, PENDING_KEY):
                if key in other:
                    self.remove_key(cls, Obj(ref, ""), key)

    def check_gone(self, cls, obj):
        """Raise ExportFailed if `obj` still exists: a destroy that 'succeeded' must have worked."""
        try:
            self.xapi.call(cls + ".get_uuid", obj.ref)
        except XapiFailure as exc:
            if exc.code in GONE_CODES:
                return
            raise
        raise ExportFailed("%s %s still exists after it was destroyed" % (cls, obj.uuid))

    def drop_disk(self, vbd, vdi):
        """Remove a disk from a snapshot before its export ([NOBAK]), as Xen Orchestra does."""
        self.retry_busy("destroy VBD", lambda: self.xapi.call("VBD.destroy", vbd.ref))
        self.retry_busy("destroy VDI", lambda: self.xapi.call("VDI.destroy", vdi.ref))

    def plug_vbd(self, vbd_ref):
        """Hot-plug a disk link into its running VM (VBD.plug)."""
        self.xapi.call("VBD.plug", vbd_ref)

    def for_thread(self, xapi):
        """Return this transport speaking through `xapi` (a Xapi.twin: the run's session on a
        connection of its own), for a worker thread: an XML-RPC connection is not shared
        between threads. The copy is never closed; the run's transport is."""
        twin = copy.copy(self)
        twin.xapi = xapi
        return twin

    def close(self):
        """Release what the transport holds (temporary files)."""

    # -- incremental backups (delta-export): what xe cannot do goes through XenAPI on
    # both transports: reading a VDI record, NBD connection details, unplugging a disk.
    def vdi_record(self, vdi):
        """Return a VDI's record now, or None if it is gone."""
        try:
            return self.xapi.call("VDI.get_record", vdi.ref)
        except XapiFailure as exc:
            if exc.code in GONE_CODES:
                return None
            raise

    def vdi_by_uuid(self, uuid):
        """Return (Obj, record) of the VDI `uuid`, or None if it is gone."""
        try:
            ref = self.xapi.call("VDI.get_by_uuid", uuid)
        except XapiFailure as exc:
            if exc.code in GONE_CODES:
                return None
            raise
        record = self.vdi_record(Obj(ref, uuid))
        return None if record is None else (Obj(ref, uuid), record)

    def nbd_info(self, vdi):
        """Return VDI.get_nbd_info's records of `vdi` ([] when no network has an NBD purpose)."""
        return list(self.xapi.call("VDI.get_nbd_info", vdi.ref) or [])

    def network_purposes(self):
        """Return the purposes of the pool's networks (nbd, insecure_nbd) as one set."""
        return {p for rec in self.xapi.call("network.get_all_records").values()
                for p in rec.get("purpose") or ()}

    def keep_disk(self, vbd):
        """Unplug a disk from a snapshot VM so that destroying the snapshot keeps the disk."""
        self.retry_busy("destroy VBD", lambda: self.xapi.call("VBD.destroy", vbd.ref))

    def enable_cbt(self, vdi):
        """Turn Changed Block Tracking on for `vdi` (idempotent)."""
        raise NotImplementedError

    def list_changed_blocks(self, older, newer):
        """Return the base64 bitmap of the 64 KiB blocks that differ between two snapshots."""
        raise NotImplementedError

    def data_destroy(self, vdi):
        """Drop a CBT-enabled snapshot's data, keeping its CBT log (type cbt_metadata)."""
        raise NotImplementedError

    def export_vdi_delta(self, vdi, base, dest):
        """Write the differencing VHD of `vdi` against `base` to a new file `dest`."""
        raise NotImplementedError

    def import_vdi_stream(self, vdi, chunks, size):
        """Write `size` raw bytes, given as an iterable of bytes, into the VDI `vdi`."""
        raise NotImplementedError
