"""Changed Block Tracking: per-VDI change logs, ``VDI.list_changed_blocks``,
``VDI.data_destroy``, and the storage operations that touch the logs
(``VDI.resize``, ``VDI.pool_migrate``).

Followed from xapi-project/sm and xen-api (facts §7 for the outline):

* A log is a bitmap of 64 KiB blocks (``cbt-util``: ``ceil(ceil(size/64K)/8)``
  bytes) with ``parent``/``child`` pointers and a ``size``, named after its
  VDI (``libs/sm/VDI.py``, blktap ``cbt-util``).  ``enable_cbt`` creates an
  all-zero log for the VDI; every write marks it.  ``VDI.snapshot`` renames
  the VDI's log to the snapshot (so the snapshot's log holds the blocks written
  since the previous snapshot, or since CBT was enabled), links it as the
  parent of a fresh log for the VDI, and the snapshot VDI gets ``cbt_enabled``.
* ``list_changed_blocks(vdi_from, vdi_to)`` starts at the log *after*
  ``vdi_from`` and ORs the logs along ``child`` pointers until ``vdi_to``;
  bit *i* (most significant bit first) is 64 KiB block *i*, covering
  ``vdi_to``'s size.  No path → ``SR_BACKEND_FAILURE_460`` ("unrelated"),
  the same VDI → 460 ("same"), sizes that shrink or a size that grows while
  its bitmap does not → ``SR_BACKEND_FAILURE_459`` (sm ``VDI.list_changed_blocks``).
* ``disable_cbt`` deletes the VDI's own log and clears its parent's ``child``
  (older snapshots keep theirs); destroying a VDI with a log links its parent
  and child and ORs its bitmap into the child's (``VDI.delete`` coalesce);
  ``data_destroy`` keeps the log, drops the data and makes the VDI
  ``cbt_metadata``.
* ``VDI.resize`` grows the log with unmarked blocks (``resize_cbt`` →
  ``cbt-util set -s``); a storage migration is refused while CBT is on
  (``VDI_CBT_ENABLED``) and the migrated VDI is new: it has no log.

Timing, deterministic: ``CbtState.in_use_window`` (pool description
``"cbt": {"in_use_window": s}``, default 0) is how long ``data_destroy`` still
answers ``VDI_IN_USE [vdi, "data_destroy"]`` after the VDI's last VBD went
(xapi's fixed 4 s wait for the unplug is not always enough: XO #7826);
``data_destroy_timeout`` (default 4.0, xapi's) is how long it waits for VBDs
that still exist.  Both count on ``CbtState.now()``, a monotonic clock that
``advance(seconds)`` moves forward, so tests need no sleeps.
"""
import base64
import time
import uuid as uuidlib

from xapisim import model
from xapisim.disks import BLOCK, Disk
from xapisim.model import ApiError

CBT_BLOCK = BLOCK                          # 64 KiB (sm VDI.CBT_BLOCK_SIZE)
# SR types whose SM driver has the VDI_CONFIG_CBT capability (sm: FileSR, EXTSR,
# NFSSR, SMBSR, LVHDSR, LVHDoISCSISR, LVHDoHBASR)
CBT_SR_TYPES = {"file", "ext", "nfs", "smb", "cifs", "lvm", "lvmoiscsi", "lvmohba"}
INCONSISTENT = ("SR_BACKEND_FAILURE_459", "",
                "Changed block tracking log is in an inconsistent state. "
                "[opterr=Inconsistent bitmaps]", "")
_FAILED = "Failed to calculate changed blocks for given VDIs. [opterr=%s]"
FIRST_API = (2, 8)                         # inverness = XenServer 7.3
_VHD_UID_NS = uuidlib.UUID("6d0d1b2a-61c4-4d0f-9a55-cb7c0e2f4a11")


def bitmap_bits(size):
    """Bits in a log of a ``size``-byte disk (cbt-util rounds up to whole bytes)."""
    return (size + CBT_BLOCK - 1) // CBT_BLOCK + 7 & ~7


def encode_bitmap(blocks, nbits):
    """base64 of the bitmap: bit i = block i, most significant bit first."""
    buf = bytearray(nbits // 8)
    for b in blocks:
        if 0 <= b < nbits:
            buf[b >> 3] |= 0x80 >> (b & 7)
    return base64.b64encode(bytes(buf)).decode("ascii")


def decode_bitmap(text):
    """The set of block indices whose bits are set (for tests and tools)."""
    raw = base64.b64decode(text)
    return {i * 8 + j for i, byte in enumerate(raw) for j in range(8) if byte & (0x80 >> j)}


def is_cbt_metadata(db, vdi):
    """True for a VDI whose data ``VDI.data_destroy`` removed: it has no content to
    export or serve over NBD (xapi answers ``incompatible(vdi)``:
    VDI_INCOMPATIBLE_TYPE [vdi, "CBT metadata"])."""
    rec = db.tables["VDI"].get(vdi)
    return bool(rec) and rec["type"] == "cbt_metadata"


# Record_util.vdi_type_to_string (xapi-cli-server/record_util.ml): how xapi names a
# VDI type in VDI_INCOMPATIBLE_TYPE's second parameter
TYPE_NAMES = {"system": "System", "user": "User", "ephemeral": "Ephemeral",
              "suspend": "Suspend", "crashdump": "Crashdump", "ha_statefile": "HA statefile",
              "metadata": "Metadata", "redo_log": "Redo log", "rrd": "rrd",
              "pvs_cache": "PVS cache", "cbt_metadata": "CBT metadata"}


def incompatible(vdi, vdi_type="cbt_metadata"):
    """VDI_INCOMPATIBLE_TYPE [vdi, "CBT metadata"] (or another type's name)."""
    return ApiError("VDI_INCOMPATIBLE_TYPE", vdi, TYPE_NAMES.get(vdi_type, vdi_type))


def vhd_uid(db, vdi):
    """The footer uid of the VDI's VHD file on the host (stable per VDI; what a
    differencing export names as its parent).  Exports of that VDI carry a fresh
    uid of their own, as vhd-tool writes them."""
    return uuidlib.uuid5(_VHD_UID_NS, db.tables["VDI"][vdi]["uuid"])


def vhd_path(db, vdi):
    """The VDI's VHD on the host, as vhd-tool sees it (FileSR / LVHD naming)."""
    rec = db.tables["VDI"][vdi]
    sr = db.tables["SR"][rec["SR"]]
    if sr["type"].startswith("lvm"):
        return "/dev/VG_XenStorage-%s/VHD-%s" % (sr["uuid"], rec["uuid"])
    return "/var/run/sr-mount/%s/%s.vhd" % (sr["uuid"], rec["uuid"])


class Log(object):
    """One CBT log.  A live log (the VDI's own) reads its bits from the disk's
    write history after ``marker``; a snapshot's log is frozen."""

    def __init__(self, uuid, size, parent=None, child=None, bits=None, vdi=None, marker=None):
        self.uuid, self.size, self.parent, self.child = uuid, size, parent, child
        self.frozen = None if bits is None else set(bits)
        self.vdi, self.marker = vdi, marker
        self.extra = set()                 # bits coalesced in from a destroyed parent

    def bits(self, db):
        if self.frozen is not None:
            return self.frozen | self.extra
        disk = db.content.get(self.vdi)
        live = disk.written_since(self.marker) if disk is not None else set()
        return live | self.extra

    def freeze(self, db):
        self.frozen = self.bits(db)
        self.extra = set()
        self.vdi = self.marker = None


class CbtState(object):
    def __init__(self, settings=None):
        s = dict(settings or {})
        self.logs = {}                     # VDI uuid -> Log
        self.in_use_window = float(s.get("in_use_window", 0.0))
        self.data_destroy_timeout = float(s.get("data_destroy_timeout", 4.0))
        self.busy_until = {}               # VDI ref -> now() before which data_destroy is refused
        self._offset = 0.0

    def now(self):
        return time.monotonic() + self._offset

    def advance(self, seconds):
        """Move this pool's CBT clock forward (tests: no sleeping)."""
        self._offset += float(seconds)


def state(db):
    st = getattr(db, "cbt", None)
    if st is None:
        st = db.cbt = CbtState()
    return st


def configure(db, settings):
    db.cbt = CbtState(settings)
    return db.cbt


# ---------------------------------------------------------------------------
# Hooks called by model.py
# ---------------------------------------------------------------------------
def on_snapshot(db, src, snap):
    """VDI.snapshot of a VDI with a log (sm ``_cbt_snapshot``)."""
    st = state(db)
    srec, nrec = db.tables["VDI"][src], db.tables["VDI"][snap]
    log = st.logs.get(srec["uuid"])
    if log is None or log.vdi != src:
        return
    log.freeze(db)
    del st.logs[srec["uuid"]]
    log.uuid = nrec["uuid"]
    old_child = log.child
    log.child = srec["uuid"]
    st.logs[log.uuid] = log
    if log.parent in st.logs:
        st.logs[log.parent].child = log.uuid
    st.logs[srec["uuid"]] = Log(srec["uuid"], srec["virtual_size"], parent=log.uuid,
                                child=old_child, vdi=src, marker=db.content[src].mark())
    nrec["cbt_enabled"] = True


def on_destroy(db, vdi):
    """VDI.destroy: link the log's parent and child and coalesce (sm ``delete``)."""
    st = state(db)
    st.busy_until.pop(vdi, None)
    rec = db.tables["VDI"][vdi]
    log = st.logs.pop(rec["uuid"], None)
    if log is None:
        return
    parent, child = st.logs.get(log.parent), st.logs.get(log.child)
    if parent is not None:
        parent.child = log.child if child is not None else None
    if child is not None:
        child.parent = log.parent if parent is not None else None
        child.extra |= log.bits(db)


def on_vbd_gone(db, vdi):
    st = state(db)
    if st.in_use_window > 0 and vdi in db.tables["VDI"]:
        st.busy_until[vdi] = st.now() + st.in_use_window


# ---------------------------------------------------------------------------
# Checks (xapi_vdi.ml check_operation_error, message_forwarding.ml)
# ---------------------------------------------------------------------------
def _check_release(ctx):
    if tuple(ctx.sim.release["api"]) < FIRST_API:
        raise ApiError("MESSAGE_METHOD_UNKNOWN", ctx.method)


def _check_common(db, vdi, op):
    rec = db.get("VDI", vdi)
    for task, o in rec["current_operations"].items():
        if o != "copy":
            raise ApiError("OTHER_OPERATION_IN_PROGRESS", "VDI", vdi, o, task)
    sr = db.tables["SR"].get(rec["SR"])
    if sr is None or sr["type"] not in CBT_SR_TYPES or sr["content_type"] == "iso":
        raise ApiError("SR_OPERATION_NOT_SUPPORTED", rec["SR"])
    return rec


def _attached_vbds(db, vdi, ignore_snapshot_vms=False):
    out = []
    for vbd in db.tables["VDI"][vdi]["VBDs"]:
        b = db.tables["VBD"].get(vbd)
        if not b or not b["currently_attached"]:
            continue
        vm = db.tables["VM"].get(b["VM"])
        if ignore_snapshot_vms and vm and vm["is_a_snapshot"]:
            continue
        out.append(vbd)
    return out


def set_cbt(ctx, vdi, enable):
    db = ctx.db
    _check_release(ctx)
    op = "enable_cbt" if enable else "disable_cbt"
    rec = _check_common(db, vdi, op)
    if rec["type"] == "cbt_metadata":
        raise incompatible(vdi)
    if rec["is_a_snapshot"]:
        raise ApiError("OPERATION_NOT_ALLOWED", "VDI is a snapshot: %s" % vdi)
    if rec["type"] not in ("user", "system"):
        raise incompatible(vdi, rec["type"])
    if rec["on_boot"] == "reset":
        raise ApiError("VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION")
    if enable and db.pool()["restrictions"].get("restrict_cbt") == "true":
        raise ApiError("LICENCE_RESTRICTION", "CBT")
    if rec["cbt_enabled"] == enable:
        return ""
    st = state(db)
    if enable:
        st.logs[rec["uuid"]] = Log(rec["uuid"], rec["virtual_size"], vdi=vdi,
                                   marker=db.content[vdi].mark())
    else:
        log = st.logs.pop(rec["uuid"], None)
        if log is not None and log.parent in st.logs:
            st.logs[log.parent].child = None
    rec["cbt_enabled"] = enable
    db.touch()
    return ""


def list_changed_blocks(ctx, vdi_from, vdi_to):
    db = ctx.db
    _check_release(ctx)
    frec = db.get("VDI", vdi_from)
    trec = _check_common(db, vdi_to, "list_changed_blocks")
    if db.in_use.get(vdi_to) or _attached_vbds(db, vdi_to, ignore_snapshot_vms=True):
        raise ApiError("VDI_IN_USE", vdi_to, "list_changed_blocks")
    if frec["uuid"] == trec["uuid"]:
        raise ApiError("SR_BACKEND_FAILURE_460", "", _FAILED % "Source and target VDI are same", "")
    logs = state(db).logs
    if frec["uuid"] in logs and trec["uuid"] in logs:
        merged, nbits, size = None, 0, 0
        cur = frec["uuid"]
        seen = set()
        while True:
            nxt = logs[cur].child
            if nxt not in logs or nxt in seen:
                break
            cur = nxt
            seen.add(cur)
            log = logs[cur]
            bits, cbits = log.bits(db), bitmap_bits(log.size)
            if merged is None:
                merged, nbits, size = set(bits), cbits, log.size
            else:
                if log.size < size or cbits < nbits or (log.size > size and cbits <= nbits):
                    raise ApiError(*INCONSISTENT)
                if log.size > size:
                    size, nbits = log.size, cbits
                merged |= {b for b in bits if b < nbits}
            if cur == trec["uuid"]:
                return encode_bitmap(merged, nbits)
    raise ApiError("SR_BACKEND_FAILURE_460", "", _FAILED % "Source and target VDI are unrelated", "")


def data_destroy(ctx, vdi):
    db = ctx.db
    _check_release(ctx)
    rec = _check_common(db, vdi, "data_destroy")
    if not rec["is_a_snapshot"]:
        raise ApiError("OPERATION_NOT_ALLOWED", "VDI is not a snapshot: %s" % vdi)
    if not rec["cbt_enabled"]:
        raise ApiError("VDI_NO_CBT_METADATA", vdi)
    if rec["type"] == "cbt_metadata":
        return ""
    st = state(db)
    # xapi_vdi.ml wait_for_vbds_to_be_unplugged_and_destroyed: up to the timeout
    deadline = st.now() + st.data_destroy_timeout
    while rec["VBDs"] and st.now() < deadline:
        db.lock.release()
        try:
            time.sleep(0.05)
        finally:
            db.lock.acquire()
        rec = db.get("VDI", vdi)
    if rec["VBDs"] or st.busy_until.get(vdi, 0) > st.now():
        raise ApiError("VDI_IN_USE", vdi, "data_destroy")
    st.busy_until.pop(vdi, None)
    old = db.content.get(vdi)
    model.sr_charge(db, rec["SR"], -rec["physical_utilisation"], 0)
    rec.update(type="cbt_metadata", physical_utilisation=0)
    db.content[vdi] = Disk.empty(old.virtual_size if old is not None else rec["virtual_size"])
    db.touch()
    return ""


def get_cbt_enabled(ctx, vdi):
    _check_release(ctx)
    return ctx.db.get("VDI", vdi)["cbt_enabled"]


# ---------------------------------------------------------------------------
# Storage operations that change a log
# ---------------------------------------------------------------------------
def resize(ctx, vdi, size):
    """VDI.resize: VHD sizes round up to 2 MiB, shrinking is refused (sm FileSR /
    LVHDSR ``resize``), the log grows with unmarked blocks (``resize_cbt``)."""
    db = ctx.db
    rec = db.get("VDI", vdi)
    size = model.coerce("VDI", "virtual_size", size)
    if rec["type"] == "cbt_metadata":
        raise incompatible(vdi)
    if db.in_use.get(vdi) or _attached_vbds(db, vdi):
        raise ApiError("VDI_IN_USE", vdi, "resize")
    if db.tables["SR"][rec["SR"]]["content_type"] == "iso":
        raise ApiError("SR_OPERATION_NOT_SUPPORTED", rec["SR"])
    if size < rec["virtual_size"]:
        raise ApiError("SR_BACKEND_FAILURE_79", "", "VDI Invalid size [opterr=shrinking not allowed]", "")
    if size == rec["virtual_size"]:
        return ""
    size = (max(size, 2 << 20) + (2 << 20) - 1) // (2 << 20) * (2 << 20)
    db.content[vdi].resize(size)
    model.sr_charge(db, rec["SR"], 0, size - rec["virtual_size"])
    rec["virtual_size"] = size
    log = state(db).logs.get(rec["uuid"])
    if log is not None and log.vdi == vdi:
        log.size = size
    db.touch()
    return ""


def pool_migrate(ctx, vdi, sr, options):
    """VDI.pool_migrate (message_forwarding.ml, xapi_vm_migrate.ml
    ``vdi_pool_migrate``): the VDI moves to ``sr`` as a new VDI (new ref and
    uuid, no CBT log) and its VBDs follow it; returns the new ref."""
    db = ctx.db
    rec = db.get("VDI", vdi)
    if not rec["VBDs"]:
        raise ApiError("VDI_NEEDS_VM_FOR_MIGRATE", vdi)
    if rec["type"] == "cbt_metadata":
        raise incompatible(vdi)
    if rec["cbt_enabled"]:
        raise ApiError("VDI_CBT_ENABLED", vdi)
    dest = db.get("SR", sr)
    if dest["content_type"] == "iso":
        raise ApiError("SR_OPERATION_NOT_SUPPORTED", sr)
    vm = db.tables["VBD"][rec["VBDs"][0]]["VM"]
    if not any(db.host_sees_srs(h, [sr]) for h in db.tables["host"]):
        raise ApiError("VM_REQUIRES_SR", vm, sr)
    old = db.content[vdi]
    disk = Disk(old.virtual_size)          # a new VHD chain: a full copy of the data
    for b in old.allocated_blocks():
        data = old.read(b * BLOCK, BLOCK)
        if data.count(0) != len(data):
            disk.write(b * BLOCK, data)
    model.sr_check_space(db, {sr: disk.physical_utilisation})
    fields = {k: (v.copy() if isinstance(v, (dict, list)) else v) for k, v in rec.items()
              if k in ("name_label", "name_description", "type", "sharable", "read_only",
                       "other_config", "sm_config", "xenstore_data", "tags", "on_boot",
                       "allow_caching")}
    new = model.new_vdi(db, sr, disk, **fields)
    nrec = db.tables["VDI"][new]
    for vbd in list(rec["VBDs"]):
        db.tables["VBD"][vbd]["VDI"] = new
        nrec["VBDs"].append(vbd)
    rec["VBDs"] = []
    for s in list(rec["snapshots"]):
        if s in db.tables["VDI"]:
            db.tables["VDI"][s]["snapshot_of"] = new
            nrec["snapshots"].append(s)
    rec["snapshots"] = []
    if vdi in db.client_created:
        db.client_created.add(new)
    model.destroy_vdi(db, vdi)
    return new


# ---------------------------------------------------------------------------
# XAPI messages (registered by rpc.py)
# ---------------------------------------------------------------------------
def register(action):
    action("VDI.enable_cbt")(lambda ctx, self: set_cbt(ctx, self, True))
    action("VDI.disable_cbt")(lambda ctx, self: set_cbt(ctx, self, False))
    action("VDI.get_cbt_enabled", async_ok=False)(lambda ctx, self: get_cbt_enabled(ctx, self))
    action("VDI.list_changed_blocks")(
        lambda ctx, vdi_from, vdi_to: list_changed_blocks(ctx, vdi_from, vdi_to))
    action("VDI.data_destroy")(lambda ctx, self: data_destroy(ctx, self))
    action("VDI.resize")(lambda ctx, vdi, size: resize(ctx, vdi, size))
    action("VDI.pool_migrate")(lambda ctx, vdi, sr, options: pool_migrate(ctx, vdi, sr, options))


# ---------------------------------------------------------------------------
# /export_raw_vdi?base= (export_raw_vdi.ml, vhd_tool_wrapper.ml, vhd-tool)
# ---------------------------------------------------------------------------
def export_base(db, vdi, base):
    """For a differencing export of ``vdi`` relative to ``base`` (ref or uuid, as
    ``Importexport.base_vdi_of_req`` takes it): (the 64 KiB blocks written in one
    VHD chain and not the other, the parent fields of the differencing header).
    Neither VDI may be ``cbt_metadata`` (nothing to attach)."""
    if base in db.tables["VDI"]:
        bref = base
    else:
        bref = db.ref_of_uuid("VDI", base)
    for v in (vdi, bref):
        if is_cbt_metadata(db, v):
            raise incompatible(v)
    brec = db.tables["VDI"][bref]
    blocks = db.content[vdi].changed_blocks(db.content[bref])
    stamp = brec["snapshot_time"] if brec["is_a_snapshot"] else model.BUILD_TIME
    parent = {"uid": vhd_uid(db, bref), "name": vhd_path(db, bref),
              "timestamp": max(0, int((stamp - model.EPOCH).total_seconds()) - 946684800)}
    return blocks, parent
