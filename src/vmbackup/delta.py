"""Incremental backups, the pool's side (delta-export): whether a disk's point is a full or a
delta and why, finding and reading the changed blocks, and the reference snapshots kept
on the pool between runs.

A chain (formats.vhdfile, chain) is a dynamic VHD full plus one differencing VHD per later
point. Between runs the pool keeps, per disk, the snapshot VDI of the last point: the
*reference* the next run compares with. In order of preference:

* CBT + NBD: VDI.list_changed_blocks(reference, new snapshot) names the changed 64 KiB
  blocks, read over NBD (TLS, the certificate of get_nbd_info checked); the reference's
  data is then destroyed (VDI.data_destroy): only a cbt_metadata VDI stays on the SR.
* CBT without NBD, or no CBT: /export_raw_vdi?format=vhd&base=<reference> (whole 2 MiB
  blocks), so the reference keeps its data.

A reference is a snapshot VDI tagged like every snapshot the tool makes (TAG_KEY): once
its run is over it is a leftover (leftovers.is_leftover) unless kept_reference says it
stays: the newest complete point of its VM records it, or it belongs to a chain of another
backup_dir (CHAIN_KEY, set once its point is committed). A killed run's references go,
the current chain's stay.

Owns: CHAIN_KEY, STORE_KEY, ChainReferences and kept_reference (pure), PreviousDisk, ReferenceState, DiskFacts, DiskPlan, plan_delta and changed_ranges (pure);
previous_point, recorded_references, enable_cbt_once, read_ranges_nbd, delta_point (one VM's
point), chain_entries (manifest disks), finish_point, drop_old_references, point_note.
Imports: errors, util, store, metadata, chain, nbd, formats.vhdfile, transport.base.
"""

import base64
import os
import queue
import socket
import threading
import time
import typing
import uuid as uuidlib

from vmbackup.chain import chain_entry, chain_links, chain_parent, finish_merges
from vmbackup.errors import BadFile, CallFailed, ExportFailed, VmBackupError, log
from vmbackup.formats.vhdfile import (
    CBT_BLOCK, VHD_BLOCK, ParentRef, VhdWriter, reparent_vhd, write_vhd_from_raw)
from vmbackup.metadata import file_entry
from vmbackup.nbd import NbdError, connect_info
from vmbackup.progress import check_stop
from vmbackup.store import LocalStore, safe_dirname
from vmbackup.transport.base import BUSY_CODES, GONE_CODES, Obj, error_code
from vmbackup.util import human_size, partial_file, printable


#: NBD connections per disk: xapi-nbd accepts 16 per host and has a listen backlog of 5,
#: so a few, opened one after another (as Xen Orchestra's @vates/nbd-client does).
NBD_CONNECTIONS = 4


#: Attempts at one range over NBD (a new connection each time) before the point fails.
NBD_ATTEMPTS = 3

#: Seconds between looks at the run's stop request while NBD reads are awaited.
STOP_POLL = 0.2


#: Seconds VDI.data_destroy is retried while it answers VDI_IN_USE: XAPI unplugs the
#: snapshot's disks a few seconds after the snapshot is gone (Xen Orchestra #7826).
DATA_DESTROY_WAIT = 30.0


#: How the changed blocks of a delta point were found (the manifest's chain.method).
METHODS = ("full", "cbt-nbd", "cbt-export", "export")


class PreviousDisk(typing.NamedTuple):
    """A disk of the newest complete delta-export point: the parent of the next point."""
    backup: str                 # the point's folder name
    file: str                   # xvda.vhd
    sha256: str
    vdi_uuid: str               # the disk backed up then
    virtual_size: int
    chain_id: str
    position: int
    vhd_uuid: str
    reference_uuid: typing.Optional[str]
    reference_kind: typing.Optional[str]
    complete: bool = True       # the point is complete and its file is there


class ReferenceState(typing.NamedTuple):
    """The recorded reference VDI as the pool has it now."""
    uuid: str
    snapshot_of: str            # ref of the disk it is a snapshot of
    cbt_enabled: bool
    has_data: bool              # False once data_destroy made it cbt_metadata


class DiskFacts(typing.NamedTuple):
    """What plan_delta decides from, for one disk."""
    vdi_ref: str
    vdi_uuid: str
    virtual_size: int
    cbt: bool                                   # CBT is on for the disk now
    cbt_problem: typing.Optional[str]           # why not
    nbd: bool                                   # get_nbd_info offers a server
    previous: typing.Optional[PreviousDisk]
    reference: typing.Optional[ReferenceState]  # None: gone (or none recorded)


class DiskPlan(typing.NamedTuple):
    """What one disk's point will be."""
    method: str                 # full, cbt-nbd, cbt-export, export
    reason: typing.Optional[str]    # why a full (None for a delta)
    reference_kind: str         # what the new reference becomes: cbt_metadata or snapshot

    @property
    def full(self):
        return self.method == "full"


def plan_delta(facts, full_interval):
    """Return the DiskPlan of one disk (pure): a delta when the chain can go on, else a full
    with the reason. Never a delta whose reference is not provably this chain's.

    The new reference is data-destroyed (cbt_metadata) only where the next run can read
    over NBD; a reference with data is what a differencing export needs as its base.
    """
    kind = "cbt_metadata" if facts.cbt and facts.nbd else "snapshot"
    prev, ref = facts.previous, facts.reference

    def full(reason):
        return DiskPlan("full", reason, kind)
    if prev is None:
        return full("first run: no earlier point of this disk")
    if not prev.complete:
        return full("the previous point %s is incomplete" % prev.backup)
    if full_interval and prev.position + 1 >= full_interval:
        return full("full_interval reached (%d points since the full)" % (prev.position + 1))
    if not prev.reference_uuid:
        return full("the previous point kept no reference snapshot")
    if prev.vdi_uuid != facts.vdi_uuid:
        return full("the disk is another VDI than the chain's (%s, was %s): storage migration "
                    "or a replaced disk" % (facts.vdi_uuid, prev.vdi_uuid))
    if ref is None:
        return full("reference snapshot %s is gone" % prev.reference_uuid)
    if ref.uuid != prev.reference_uuid or ref.snapshot_of != facts.vdi_ref:
        return full("reference %s is not the chain's recorded snapshot of this disk" % ref.uuid)
    if prev.virtual_size != facts.virtual_size:
        return full("disk size changed from %d to %d bytes (resize)"
                    % (prev.virtual_size, facts.virtual_size))
    if facts.cbt and facts.nbd and ref.cbt_enabled:
        return DiskPlan("cbt-nbd", None, kind)
    if not ref.has_data:
        why = ("no network offers NBD" if facts.cbt
               else facts.cbt_problem or "CBT is off on the disk")
        return full("the reference holds only CBT metadata and %s" % why)
    return DiskPlan("cbt-export" if facts.cbt else "export", None, kind)


def changed_ranges(bitmap, size, block=CBT_BLOCK, limit=VHD_BLOCK):
    """Return [(offset, length)] of the changed blocks a CBT bitmap names (pure).

    Bit i (most significant first) is block i; adjacent blocks are merged up to `limit`
    bytes without crossing a multiple of `limit` (a VHD block); the last is cut at `size`.
    >>> changed_ranges(bytes([0b01100000]), 8 << 16)
    [(65536, 131072)]
    """
    found = []
    for index in range(min(len(bitmap) * 8, (size + block - 1) // block)):
        if not bitmap[index >> 3] & (0x80 >> (index & 7)):
            continue
        offset = index * block
        length = min(block, size - offset)
        if found:
            last_offset, last_length = found[-1]
            if last_offset + last_length == offset and last_length + length <= limit \
                    and last_offset // limit == offset // limit:
                found[-1] = (last_offset, last_length + length)
                continue
        found.append((offset, length))
    return found


def decode_bitmap(text):
    """Return the bytes of list_changed_blocks' base64 answer; raise ExportFailed if garbled."""
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (ValueError, TypeError) as exc:
        raise ExportFailed("list_changed_blocks answered no base64 bitmap: %s" % exc)


# -- the store's side: the previous point, the recorded references -------------------

def delta_points(store, vm_folder, vm_uuid=None):
    """Return the complete delta-export BackupFolders of a VM folder (of VM `vm_uuid`), oldest first."""
    return [b for b in store.backups(vm_folder)
            if b.complete and b.mode == "delta-export" and b.manifest is not None
            and (vm_uuid is None or (b.manifest.get("vm") or {}).get("uuid") in (None, vm_uuid))]


def previous_disks(backup):
    """Return {device: PreviousDisk} of a delta-export BackupFolder (chain.chain_links, plus
    the disk and its reference)."""
    links = chain_links(backup)
    found = {}
    for disk in backup.manifest.get("disks", ()):
        link = links.get(str(disk.get("device")))
        if link is None:
            continue
        reference = disk["chain"].get("reference") or {}
        found[link.device] = PreviousDisk(
            link.backup, link.file, link.sha256 or "", disk.get("vdi_uuid", ""),
            int(disk.get("virtual_size") or 0), link.chain_id, int(link.position or 0),
            link.vhd_uuid, reference.get("vdi_uuid"), reference.get("kind"),
            link.file in backup.entries and bool(link.sha256))
    return found


def previous_point(store, vm_folder, vm_uuid):
    """Return (BackupFolder or None, {device: PreviousDisk}) of the VM's newest complete point."""
    points = delta_points(store, vm_folder, vm_uuid)
    if not points:
        return None, {}
    return points[-1], previous_disks(points[-1])


#: other_config key a reference gets once its point is committed: the chain's id, so that
#: a run backing up into another backup_dir (which does not know that chain) leaves it be.
CHAIN_KEY = "vmbackup_chain"


#: other_config key a reference gets beside CHAIN_KEY: the backup_dir (real path) holding its
#: chain, so that once retention has deleted the chain's last point the reference is known
#: as this backup_dir's leftover, not another backup_dir's.
STORE_KEY = "vmbackup_backup_dir"


class ChainReferences(typing.NamedTuple):
    """What a store says about the reference VDIs on the pool."""
    recorded: typing.FrozenSet[str]     # the references the chains go on from
    chains: typing.FrozenSet[str]       # every chain id this store holds a point of
    backup_dir: typing.Optional[str] = None   # the store's real path (None: not all read)


def recorded_references(store):
    """Return the ChainReferences of `store`: the reference VDIs the newest complete
    delta-export point of every VM folder records, and the ids of its chains."""
    recorded, chains = set(), set()
    root = getattr(store, "root", None)
    backup_dir = os.path.realpath(root) if root else None
    for vm_folder in store.vm_folders():
        try:
            points = delta_points(store, vm_folder)
        except OSError as exc:
            log.debug("reading %s: %s", vm_folder, exc)
            backup_dir = None       # a chain not read is not known to be gone
            continue
        newest = {}       # per VM: two VMs whose names make one folder each have a chain
        for point in points:
            chains.update(link.chain_id for link in chain_links(point).values())
            newest[(point.manifest.get("vm") or {}).get("uuid")] = point
        for point in newest.values():
            recorded.update(p.reference_uuid for p in previous_disks(point).values()
                            if p.reference_uuid)
    return ChainReferences(frozenset(recorded), frozenset(chains), backup_dir)


def kept_reference(record, references):
    """Return True if the VDI `record`, a leftover by the tags, must stay (pure): a reference
    the store's chains go on from, or a committed reference (CHAIN_KEY) of a chain the store
    does not hold -- another backup_dir's. A reference of a point never committed (a killed
    run), one its chain has moved past, or one of a chain this backup_dir held (STORE_KEY)
    whose last point retention deleted is not kept."""
    if record.get("uuid") in references.recorded:
        return True
    other_config = record.get("other_config") or {}
    chain = other_config.get(CHAIN_KEY)
    if not chain or chain in references.chains:
        return False
    return not (references.backup_dir and other_config.get(STORE_KEY) == references.backup_dir)


# -- the pool's side -------------------------------------------------------------

def enable_cbt_once(transport, disk, vlog):
    """Return (True, None) if CBT is on for `disk` (turning it on the first time, logged
    once), else (False, why): unlicensed, an SR without CBT, a pool before XenServer 7.3."""
    if disk.vdi.get("cbt_enabled"):
        return True, None
    try:
        transport.enable_cbt(Obj(disk.vdi_ref, disk.vdi["uuid"]))
    except CallFailed as exc:
        why = "CBT unavailable (%s)" % (error_code(exc) or exc)
        vlog.info("disk %s: %s: its deltas come from differencing exports, against a reference "
                  "snapshot that keeps its data on the SR", disk.device, why)
        return False, why
    vlog.info("disk %s: Changed Block Tracking enabled (VDI %s): XAPI now records the blocks "
              "written to it", disk.device, disk.vdi["uuid"])
    return True, None


def reference_state(transport, uuid):
    """Return (Obj, ReferenceState) of the reference VDI `uuid`, or (None, None) if it is gone."""
    if not uuid:
        return None, None
    found = transport.vdi_by_uuid(uuid)
    if found is None:
        return None, None
    obj, rec = found
    return obj, ReferenceState(uuid, rec.get("snapshot_of", ""), bool(rec.get("cbt_enabled")),
                               rec.get("type") != "cbt_metadata")


def pick_nbd_infos(infos, purposes):
    """Return the get_nbd_info records to connect to, each with the certificate to check,
    or none ("cert": "") for plain NBD: only where the pool's networks offer only the
    purpose insecure_nbd (delta_point warns when it reads so). XAPI's answer carries a certificate either
    way, so the networks' purposes (read through XAPI, not from the NBD server, which an
    attacker could make refuse STARTTLS) decide."""
    if not infos or "nbd" in purposes:
        return list(infos)
    if "insecure_nbd" not in purposes:
        return []
    return [dict(info, cert="") for info in infos]


def open_nbd(infos, timeout):
    """Return an NbdClient on the first of `infos` that answers; raise NbdError if none does."""
    errors = []
    for info in infos:
        try:
            return connect_info(info, allow_insecure=True, timeout=timeout)
        except NbdError as exc:
            errors.append(str(exc))
    raise NbdError("no NBD server of the pool answered: %s" % "; ".join(errors or ["none offered"]))


class NbdStats:
    """What an NBD read moved (for the log and the tests' ratios)."""

    def __init__(self):
        self.bytes, self.ranges, self.connections, self.reconnects = 0, 0, 0, 0
        self.lock = threading.Lock()


def read_ranges_nbd(infos, ranges, timeout, connections=NBD_CONNECTIONS, stats=None):
    """Yield (offset, data) for every range, read over NBD with at most `connections`
    connections, opened one after another. A dropped connection is replaced and the range
    read again (NBD_ATTEMPTS); then NbdError."""
    if not ranges:
        return
    stats = stats or NbdStats()
    work = queue.Queue()
    for item in ranges:
        work.put(item)
    done = queue.Queue(maxsize=4 * connections)
    stop = threading.Event()
    clients = []
    try:
        for _ in range(min(connections, len(ranges))):
            clients.append(open_nbd(infos, timeout))
            stats.connections += 1
    except BaseException:
        for client in clients:
            client.close()
        raise

    live = set(clients)        # the open connections, shut down at once when the read stops

    def connect():
        client = open_nbd(infos, timeout)
        with stats.lock:
            stats.connections += 1
            stats.reconnects += 1
            live.add(client)
        if stop.is_set():
            drop(client)
            raise NbdError("stopped")
        return client

    def drop(client):
        with stats.lock:
            live.discard(client)
        client.close()

    def worker(client):
        try:
            while not stop.is_set():
                try:
                    offset, length = work.get_nowait()
                except queue.Empty:
                    return
                for attempt in range(1, NBD_ATTEMPTS + 1):
                    try:
                        if client is None:
                            client = connect()
                        data = client.read(offset, length)
                        break
                    except NbdError as exc:
                        if client is not None:
                            drop(client)
                            client = None
                        if attempt == NBD_ATTEMPTS:
                            raise NbdError("%s (range %d+%d, %d attempts)"
                                           % (exc, offset, length, attempt))
                        log.debug("NBD read of %d+%d failed (%s): reconnecting", offset, length, exc)
                put(("data", offset, data))
        except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
            put(("error", exc, None))
        finally:
            if client is not None:
                drop(client)

    def put(item):
        while not stop.is_set():
            try:
                done.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    threads = [threading.Thread(target=worker, args=(c,), name="nbd-%d" % i, daemon=True)
               for i, c in enumerate(clients)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(len(ranges)):
            kind, first, data = next_done(done)
            if kind == "error":
                raise first
            stats.bytes += len(data)
            stats.ranges += 1
            yield first, data
    finally:
        stop.set()
        with stats.lock:
            for client in live:     # wake the threads blocked in a read (error, signal)
                try:
                    client.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for thread in threads:
            thread.join()


def next_done(done):
    """Return the next item of `done`; raise Terminated as soon as the run is asked to stop
    (the reading thread is a job's worker: signals reach only the main thread)."""
    while True:
        check_stop()
        try:
            return done.get(timeout=STOP_POLL)
        except queue.Empty:
            continue


def destroy_data(transport, vdi, vlog):
    """data_destroy the new reference, retrying VDI_IN_USE for DATA_DESTROY_WAIT seconds;
    return True, or False (with a warning: the reference then keeps its data)."""
    delay, deadline = 0.5, time.monotonic() + DATA_DESTROY_WAIT
    while True:
        try:
            transport.data_destroy(vdi)
            return True
        except CallFailed as exc:
            if error_code(exc) in BUSY_CODES and time.monotonic() < deadline:
                log.debug("data_destroy of %s: %s, retrying in %.1fs", vdi.uuid, error_code(exc), delay)
                time.sleep(delay)
                delay = min(delay * 2, 4.0)
                continue
            vlog.warning("the reference snapshot %s keeps its data on the SR: data_destroy "
                         "failed (%s)", vdi.uuid, exc)
            return False


def destroy_reference(transport, vdi, vlog, why):
    """Destroy a reference VDI, best effort (a failure leaves a leftover the next run removes)."""
    try:
        transport.destroy_vdi(vdi)
        log.debug("reference %s destroyed (%s)", vdi.uuid, why)
    except VmBackupError as exc:
        if error_code(exc) not in GONE_CODES:
            vlog.warning("could not destroy the reference snapshot %s (%s): %s (the next run "
                         "retries)", vdi.uuid, why, exc)


class DiskPoint(typing.NamedTuple):
    """One disk's part of a point: its file entry and the manifest's chain record."""
    device: str
    entry: dict
    chain: dict


def export_then_convert(what, export, convert, dest):
    """`export(path)` into a hidden file beside `dest`, then `convert(src, out)` it into
    `dest` (written whole or not at all); return what convert returns. A damaged stream
    (BadFile) is an ExportFailed naming `what`; the hidden file goes either way."""
    tmp_in = os.path.join(os.path.dirname(dest), "." + os.path.basename(dest) + ".export.part")
    try:
        export(tmp_in)
        with partial_file(dest) as tmp, open(tmp_in, "rb") as src, open(tmp, "wb") as out:
            return convert(src, out)
    except BadFile as exc:
        raise ExportFailed("%s: %s" % (what, exc))
    finally:
        if os.path.lexists(tmp_in):
            os.unlink(tmp_in)


def write_full(ctx, new, size, dest):
    """Export the snapshot raw and write it as a dynamic VHD; return its VhdInfo."""
    def export(path):
        nbytes, _ = ctx.transport.export_vdi(new, path, "raw")
        if nbytes != size:
            raise ExportFailed("raw export of VDI %s is %d bytes, the disk is %d"
                               % (new.uuid, nbytes, size))
    return export_then_convert("raw export of VDI %s" % new.uuid, export,
                               lambda src, out: write_vhd_from_raw(src, out, size), dest)


def write_differencing_export(ctx, new, reference, parent, dest):
    """Export the snapshot's differencing VHD against `reference` and re-parent it onto the
    previous point's file; return its VhdInfo."""
    return export_then_convert(
        "differencing export of VDI %s" % new.uuid,
        lambda path: ctx.transport.export_vdi_delta(new, reference, path),
        lambda src, out: reparent_vhd(src, out, parent), dest)


def write_nbd_delta(ctx, infos, ranges, size, parent, dest, stats):
    """Read `ranges` of the snapshot over NBD into a differencing VHD; return its VhdInfo."""
    blocks = read_ranges_nbd(infos, ranges, ctx.config.stall_timeout, stats=stats)
    try:   # closed at once on error: its connections hold the snapshot's disk
        with partial_file(dest) as tmp, open(tmp, "wb") as out:
            writer = VhdWriter(out, size, parent=parent)
            for offset, data in blocks:
                writer.write(offset, data)
            return writer.close()
    finally:
        blocks.close()


def nbd_unreachable(facts, exc):
    """Return the DiskPlan that replaces cbt-nbd when no NBD connection opens (pure): the
    differencing export where the reference has data, else a full; either way the new
    reference keeps its data, so the next run has a base without NBD."""
    if facts.reference is not None and facts.reference.has_data:
        return DiskPlan("cbt-export", None, "snapshot")
    return DiskPlan("full", "NBD unreachable: %s" % exc, "snapshot")


def disk_point(ctx, disk, new, facts, plan, ref_obj, infos, folder, vlog):
    """Write one disk's file of the point; return (DiskPoint, DiskPlan actually followed)."""
    prev = facts.previous
    size = facts.virtual_size
    name = safe_dirname(disk.device) + ".vhd"
    dest = os.path.join(folder, name)
    began = time.monotonic()
    ranges = None
    if plan.method == "cbt-nbd":
        try:
            bitmap = decode_bitmap(ctx.transport.list_changed_blocks(ref_obj, new))
            ranges = changed_ranges(bitmap, size)
        except CallFailed as exc:
            plan = DiskPlan("full", "CBT cannot tell the blocks changed since the reference "
                            "(%s): its log was reset" % (error_code(exc) or exc),
                            plan.reference_kind)
    parent = None if plan.full else ParentRef(prev.vhd_uuid, "../%s/%s" % (prev.backup, prev.file))
    stats = NbdStats()
    if plan.full:
        vlog.info("disk %s: full (%s)", disk.device, plan.reason)
        info = write_full(ctx, new, size, dest)
    elif plan.method == "cbt-nbd":
        try:
            info = write_nbd_delta(ctx, infos, ranges, size, parent, dest, stats)
        except NbdError as exc:
            if stats.connections:    # it read, then failed even on new connections: fail
                raise
            plan = nbd_unreachable(facts, exc)
            vlog.warning("disk %s: NBD unreachable (%s): %s instead, and the new reference "
                         "keeps its data", disk.device, exc,
                         "a full" if plan.full else "a differencing export")
            info = (write_full(ctx, new, size, dest) if plan.full else
                    write_differencing_export(ctx, new, ref_obj, parent, dest))
    else:
        info = write_differencing_export(ctx, new, ref_obj, parent, dest)
    if plan.method == "cbt-nbd":
        vlog.info("disk %s: delta over NBD (%s): %d changed ranges, %s read on %d connection(s)"
                  "%s in %.1fs", disk.device, "TLS" if any(i.get("cert") for i in infos) else
                  "plain", stats.ranges, human_size(stats.bytes), stats.connections,
                  " (%d reconnects)" % stats.reconnects if stats.reconnects else "",
                  time.monotonic() - began)
    elif not plan.full:
        vlog.info("disk %s: delta from a differencing export (%s): %s in %.1fs", disk.device,
                  plan.method, human_size(info.data_bytes), time.monotonic() - began)
    chain = chain_entry(
        str(uuidlib.uuid4()) if plan.full else prev.chain_id,
        0 if plan.full else prev.position + 1, info.uuid,
        None if plan.full else chain_parent(prev.backup, prev.file, prev.vhd_uuid, prev.sha256),
        {"vdi_uuid": new.uuid, "kind": plan.reference_kind}, plan.method, plan.reason,
        stats.bytes if plan.method == "cbt-nbd" else info.data_bytes)
    return DiskPoint(disk.device, file_entry(folder, name), chain), plan


def delta_point(ctx, plan, folder, vlog, snapshot):
    """delta-export of one VM: `snapshot` (the VM's tool_snapshot) and, per disk, a full or
    a delta file; the disks' snapshot VDIs are kept as the next run's references. Return
    the file entries, each disk's carrying `device` and `chain` (see chain_entries).

    On any failure the references this attempt kept are destroyed again.
    """
    store = LocalStore(ctx.config.backup_dir)
    vm_folder = os.path.basename(os.path.dirname(folder))
    finish_merges(store, vm_folder, vlog)     # a merge a kill interrupted: the chain as it is meant
    _, previous = previous_point(store, vm_folder, plan.vm.uuid)
    cbt = {d.device: enable_cbt_once(ctx.transport, d, vlog) for d in plan.disks}
    purposes = ctx.transport.network_purposes() if any(on for on, _ in cbt.values()) else set()
    kept, points, plain = [], [], []
    try:
        with snapshot as snap:
            snap_disks = {userdevice: (vbd, vdi) for vbd, vdi, userdevice
                          in ctx.transport.snapshot_disks(snap)}
            for disk in plan.disks:
                if disk.userdevice not in snap_disks:
                    raise ExportFailed("the snapshot has no disk %s" % disk.device)
                vbd, new = snap_disks[disk.userdevice]
                record = ctx.transport.vdi_record(new) or {}
                on, problem = cbt[disk.device]
                infos = pick_nbd_infos(ctx.transport.nbd_info(new), purposes) if on else []
                prev = previous.get(disk.device)
                ref_obj, ref_state = reference_state(ctx.transport, prev and prev.reference_uuid)
                facts = DiskFacts(disk.vdi_ref, disk.vdi["uuid"],
                                  int(record.get("virtual_size") or disk.vdi.get("virtual_size", 0)),
                                  on, problem, bool(infos), prev, ref_state)
                disk_plan = plan_delta(facts, ctx.config.full_interval)
                if disk_plan.method == "cbt-nbd" and not infos[0].get("cert") and not plain:
                    plain.append(disk.device)
                    vlog.warning("the pool offers only insecure NBD (network purpose "
                                 "insecure_nbd): disk blocks travel unencrypted; give the "
                                 "network the purpose nbd for TLS")
                point, disk_plan = disk_point(ctx, disk, new, facts, disk_plan, ref_obj, infos,
                                              folder, vlog)
                points.append((point, vbd, new, disk_plan))
            for point, vbd, new, _ in points:
                ctx.transport.keep_disk(vbd)
                kept.append(new)
                ctx.transport.xapi.call("VDI.set_name_label", new.ref, "vmbackup reference: %s %s"
                                        % (printable(plan.vm.name), point.device))
        for point, _, new, disk_plan in points:
            if disk_plan.reference_kind == "cbt_metadata" \
                    and not destroy_data(ctx.transport, new, vlog):
                point.chain["reference"]["kind"] = "snapshot"
            elif disk_plan.reference_kind == "snapshot":
                vlog.info("disk %s: the reference snapshot %s keeps its data on the SR (no "
                          "CBT with NBD): it costs about the disk's used space", point.device,
                          new.uuid)
    except BaseException:
        for vdi in kept:
            destroy_reference(ctx.transport, vdi, vlog, "this attempt failed")
        raise
    if plan.skipped:
        vlog.info("left out ([NOBAK]): %s", ", ".join(d.device for d in plan.skipped))
    return [dict(point.entry, device=point.device, chain=point.chain) for point, _, _, _ in points]


def chain_entries(files, disks):
    """Return (files, disks) of a delta-export manifest: the `device`/`chain` that
    delta_point put on its file entries move to the disks (with their file name)."""
    chains = {}
    clean = []
    for entry in files:
        if "chain" in entry:
            entry = dict(entry)
            chains[entry.pop("device")] = (entry["name"], entry.pop("chain"))
        clean.append(entry)
    out = []
    for disk in disks:
        disk = dict(disk)
        if disk.get("device") in chains:
            disk["file"], disk["chain"] = chains[disk["device"]]
        out.append(disk)
    return clean, out


def finish_point(ctx, folder, manifest, vlog):
    """After the point at `folder` is committed: log what it holds, destroy the references
    it replaced; return its note for the run's summary (point_note)."""
    note = point_note(manifest)
    vlog.info("point %s: %s", os.path.basename(folder), note)
    try:       # the point is complete: what follows is housekeeping, its failure a warning
        for disk in manifest.get("disks", ()):
            chain = disk.get("chain") or {}
            found = ctx.transport.vdi_by_uuid((chain.get("reference") or {}).get("vdi_uuid"))
            if found is not None:
                ctx.transport.remove_key("VDI", found[0], STORE_KEY)
                ctx.transport.xapi.call("VDI.add_to_other_config", found[0].ref, STORE_KEY,
                                        os.path.realpath(ctx.config.backup_dir))
                ctx.transport.remove_key("VDI", found[0], CHAIN_KEY)
                ctx.transport.xapi.call("VDI.add_to_other_config", found[0].ref, CHAIN_KEY,
                                        chain.get("id", ""))
        drop_old_references(ctx, folder, vlog)
    except VmBackupError as exc:
        vlog.warning("point %s is complete, but its references could not be marked or the "
                     "old ones destroyed: %s (the next run retries)", os.path.basename(folder), exc)
    return note


def drop_old_references(ctx, folder, vlog):
    """Destroy the references the complete point before `folder` recorded and the point at
    `folder` does not (the chain moved on)."""
    store = LocalStore(ctx.config.backup_dir)
    vm_folder = os.path.basename(os.path.dirname(folder))
    points = delta_points(store, vm_folder)
    names = [p.name for p in points]
    if os.path.basename(folder) not in names:
        return
    owner = (points[names.index(os.path.basename(folder))].manifest.get("vm") or {}).get("uuid")
    points = delta_points(store, vm_folder, owner)     # not another VM's in the same folder
    names = [p.name for p in points]
    at = names.index(os.path.basename(folder))
    if at == 0:
        return
    now = {p.reference_uuid for p in previous_disks(points[at]).values()}
    for prev in previous_disks(points[at - 1]).values():
        if prev.reference_uuid and prev.reference_uuid not in now:
            found = ctx.transport.vdi_by_uuid(prev.reference_uuid)
            if found is not None:
                destroy_reference(ctx.transport, found[0], vlog, "replaced by the new point's")


def point_note(manifest):
    """Return the summary's word on a delta-export point: each disk's method, and why a full."""
    parts = []
    for disk in manifest.get("disks", ()):
        chain = disk.get("chain") or {}
        if chain.get("method") == "full":
            parts.append("%s full (%s)" % (disk.get("device"), chain.get("reason")))
        elif chain:
            parts.append("%s delta %s, %s" % (disk.get("device"), chain.get("method"),
                                              human_size(chain.get("changed_bytes") or 0)))
    return "; ".join(parts)
