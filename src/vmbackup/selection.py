"""Which VMs and disks a run backs up, and the plan for each: pure decisions over pool records.

Owns: select_vms (selectors over VM records), vm_disks/pick_disks, PoolView/read_pool
(one read of the pool; only the selected VMs' disks and networks when they are few),
wanted_by, VmPlan/plan_vm.
Imports: errors, util, config.
"""

import collections
import typing

from vmbackup.config import DEFAULT_MAX_BACKUPS, MODES, Selector
from vmbackup.errors import CallFailed
from vmbackup.store import safe_dirname
from vmbackup.util import UNNUMBERED, printable


class Selected(typing.NamedTuple):
    """One VM chosen for backup, with what was asked of it."""
    ref: str
    name: str
    uuid: str
    mode: str
    max_backups: int
    devices: typing.Tuple[str, ...]
    selector: Selector


class Selection(typing.NamedTuple):
    """The outcome of selection: what runs, what is left out, and why."""
    vms: typing.List[Selected]
    excluded: typing.List[typing.Tuple[str, str]]      # (name, uuid)
    not_selected: typing.List[typing.Tuple[str, str]]  # (name, uuid)
    warnings: typing.List[str]
    errors: typing.List[str]


def is_candidate(record):
    """Return True for a real VM: not a template, not a snapshot, not a control domain."""
    return not (record.get("is_a_template") or record.get("is_a_snapshot")
                or record.get("is_control_domain"))


def select_vms(vm_records, selectors, max_backups=DEFAULT_MAX_BACKUPS, max_meta_backups=None):
    """Return the Selection that `selectors` make of `vm_records` ({ref: VM record}).

    The contract: candidates are real VMs (is_candidate); plain names are matched
    exactly and win over regexes; excludes win over everything; vdi-export wins over
    delta-export, which wins over vm-export, which wins over meta-export; within the winning mode the last
    definition sets max_backups and devices (a meta-export's default is
    max_meta_backups, else max_backups); two candidates with one name are an error for
    that name, and so are two chosen VMs whose names make one folder (safe_dirname);
    a selector that matches nothing is a warning.
    """
    candidates = sorted(((ref, rec) for ref, rec in vm_records.items() if is_candidate(rec)),
                        key=lambda item: (item[1]["name_label"], item[1]["uuid"]))
    by_name = collections.defaultdict(list)
    for ref, rec in candidates:
        by_name[rec["name_label"]].append((ref, rec))
    warnings, errors = [], []
    plain_defs = collections.defaultdict(list)
    regex_defs = collections.defaultdict(list)
    excluded_refs = set()
    for sel in selectors:
        hits = [ref for ref, rec in candidates if sel.matches(rec["name_label"])]
        if not hits:
            warnings.append("vm not found: %s (%s)" % (sel.text, sel.origin))
        if sel.mode == "exclude":
            excluded_refs.update(hits)
            continue
        for ref in hits:
            (plain_defs if sel.is_plain else regex_defs)[ref].append(sel)
    chosen, duplicates = [], {}
    for ref, rec in candidates:
        defs = plain_defs.get(ref) or regex_defs.get(ref)
        if not defs or ref in excluded_refs:
            continue
        twins = by_name[rec["name_label"]]
        if len(twins) > 1:
            duplicates[rec["name_label"]] = twins
            continue
        mode = next(m for m in MODES if any(d.mode == m for d in defs))
        last = [d for d in defs if d.mode == mode][-1]
        default = (max_meta_backups or max_backups) if mode == "meta-export" else max_backups
        chosen.append(Selected(ref, rec["name_label"], rec["uuid"], mode,
                               last.max_backups or default, last.devices, last))
    chosen, clashes = split_folder_clashes(chosen)
    for folder, vms in clashes:
        errors.append("VMs %s all make the backup folder %r (uuids %s): none of them is backed "
                      "up until one is renamed" % (", ".join(repr(printable(v.name)) for v in vms),
                                                   printable(folder), ", ".join(v.uuid for v in vms)))
    for name, twins in sorted(duplicates.items()):
        errors.append("%d VMs are named %r (uuids %s): none of them is backed up until the "
                      "names are unique" % (len(twins), printable(name),
                                            ", ".join(rec["uuid"] for _, rec in twins)))
    chosen_refs = {s.ref for s in chosen}
    excluded = [(rec["name_label"], rec["uuid"]) for ref, rec in candidates if ref in excluded_refs]
    not_selected = [(rec["name_label"], rec["uuid"]) for ref, rec in candidates
                    if ref not in chosen_refs and ref not in excluded_refs
                    and rec["name_label"] not in duplicates]
    return Selection(chosen, excluded, not_selected, warnings, errors)


def split_folder_clashes(chosen):
    """Return (chosen without clashes, [(folder, [Selected])]): VMs whose different names
    make one backup folder ('a/b', 'a:b', 'a_b' -> 'a_b') would share, and prune, one folder."""
    by_folder = collections.defaultdict(list)
    for vm in chosen:
        by_folder[safe_dirname(vm.name)].append(vm)
    clashes = [(folder, vms) for folder, vms in sorted(by_folder.items()) if len(vms) > 1]
    clashing = {vm.ref for _, vms in clashes for vm in vms}
    return [vm for vm in chosen if vm.ref not in clashing], clashes


class VmDisk(typing.NamedTuple):
    """One disk of a VM as a backup sees it."""
    device: str        # xvda, xvdb, ... (from the VBD, or derived from userdevice)
    userdevice: str
    vbd_ref: str
    vdi_ref: str
    vdi: dict          # the VDI record
    nobak: bool        # name_label holds [NOBAK]: left out of every backup


def device_name(vbd):
    """Return a VBD's device name: its `device` if set, else xvd<letter> from userdevice.

    >>> device_name({"device": "", "userdevice": "1"})
    'xvdb'
    """
    if vbd.get("device"):
        return vbd["device"]
    try:
        return "xvd" + "abcdefghijklmnopqrstuvwxyz"[int(vbd.get("userdevice", "0"))]
    except (ValueError, IndexError):
        return "userdevice" + str(vbd.get("userdevice"))


def vm_disks(vm, vbds, vdis):
    """Return the VM's disks (Disk VBDs with a VDI), ordered by userdevice."""
    disks = []
    for vbd_ref in vm.get("VBDs", ()):
        vbd = vbds.get(vbd_ref)
        if not vbd or vbd.get("type") != "Disk" or vbd.get("empty"):
            continue
        vdi = vdis.get(vbd.get("VDI"))
        if vdi is None:
            continue
        disks.append(VmDisk(device_name(vbd), str(vbd.get("userdevice", "")), vbd_ref,
                            vbd["VDI"], vdi, "[NOBAK]" in vdi.get("name_label", "")))
    return sorted(disks, key=lambda d: (_userdevice_key(d.userdevice), d.device))


def _userdevice_key(text):
    try:
        return int(text)
    except ValueError:
        return UNNUMBERED


def pick_disks(disks, devices):
    """Return (chosen, missing) for a vdi-export: `devices` by name or userdevice, else the root disk.

    The root disk is xvda / userdevice 0 (NAUbackup's only choice).
    """
    if not devices:
        root = [d for d in disks if d.userdevice == "0" or d.device in ("xvda", "hda", "sda")]
        return root[:1], ([] if root else ["xvda"])
    chosen, missing = [], []
    for want in devices:
        hit = [d for d in disks if want in (d.device, d.userdevice)]
        if hit:
            if hit[0] not in chosen:
                chosen.append(hit[0])
        else:
            missing.append(want)
    return chosen, missing


class PoolView(typing.NamedTuple):
    """The pool's records, read in a constant number of calls (one per class)."""
    pool: dict
    hosts: dict
    vms: dict
    vbds: dict
    vdis: dict
    vifs: dict
    networks: dict
    srs: dict
    guest_metrics: dict

    @property
    def master(self):
        return self.hosts.get(self.pool.get("master"), {})


#: A selection whose VMs reference at most this many records (VBDs, VDIs, VIFs, networks,
#: guest metrics) is read record by record; a larger one reads the whole tables. One
#: get_record costs a round trip; a whole table costs bytes: on a 10,000-VM pool the five
#: tables are about twice the VM table, so a few dozen round trips are the cheaper side.
FEW_RECORDS = 64

#: The VDIs leftover cleanup needs whatever the selection: every snapshot VDI.
SNAPSHOT_VDIS = 'field "is_a_snapshot"="true"'

NULL_REF = "OpaqueRef:NULL"


def read_pool(xapi, wanted=None):
    """Return a PoolView in a bounded number of calls, whatever the pool's size.

    `wanted(vm_records)` returns the refs of the VMs the caller needs in full (None or
    no `wanted`: every VM). The pool, host, VM and SR tables are read whole; the disks,
    networks and guest metrics only of the wanted VMs when they are few (FEW_RECORDS),
    plus every snapshot VDI (leftover cleanup looks for them); otherwise whole tables.
    """
    pools = xapi.call("pool.get_all_records")
    base = dict(pool=next(iter(pools.values()), {}), hosts=xapi.call("host.get_all_records"),
                vms=xapi.call("VM.get_all_records"), srs=xapi.call("SR.get_all_records"))
    refs = wanted(base["vms"]) if wanted else None
    if refs is not None and records_of_cost(base["vms"], refs) <= FEW_RECORDS:
        base.update(read_records_of(xapi, base["vms"], refs))
    else:
        base.update(vbds=xapi.call("VBD.get_all_records"), vdis=xapi.call("VDI.get_all_records"),
                    vifs=xapi.call("VIF.get_all_records"),
                    networks=xapi.call("network.get_all_records"),
                    guest_metrics=xapi.call("VM_guest_metrics.get_all_records"))
    return PoolView(**base)


def records_of_cost(vms, refs):
    """Return an upper bound of the get_record calls read_records_of makes for `refs`."""
    return sum(2 * len(vms[r].get("VBDs", ())) + 2 * len(vms[r].get("VIFs", ())) + 1
               for r in refs if r in vms)


def read_records_of(xapi, vms, refs):
    """Return {vbds, vdis, vifs, networks, guest_metrics} of the VMs `refs`, one record a call."""
    def each(cls, wanted):
        found = {}
        for ref in sorted(set(wanted) - {NULL_REF, ""}):
            try:
                found[ref] = xapi.call(cls + ".get_record", ref)
            except CallFailed as exc:
                if exc.code != "HANDLE_INVALID":   # gone since the VM table was read
                    raise
        return found
    chosen = [vms[r] for r in refs if r in vms]
    vbds = each("VBD", [v for vm in chosen for v in vm.get("VBDs", ())])
    vdis = xapi.call("VDI.get_all_records_where", SNAPSHOT_VDIS)
    vdis.update(each("VDI", [vbd.get("VDI", NULL_REF) for vbd in vbds.values()]))
    vifs = each("VIF", [v for vm in chosen for v in vm.get("VIFs", ())])
    return dict(vbds=vbds, vdis=vdis, vifs=vifs,
                networks=each("network", [vif.get("network", NULL_REF) for vif in vifs.values()]),
                guest_metrics=each("VM_guest_metrics",
                                   [vm.get("guest_metrics", NULL_REF) for vm in chosen]))


def wanted_by(config):
    """Return read_pool's `wanted` for a run with these settings: the VMs it selects."""
    return lambda vms: [s.ref for s in select_vms(vms, config.selectors, config.max_backups).vms]


class VmPlan(typing.NamedTuple):
    """What the run will do for one selected VM, worked out from the pool's records."""
    vm: Selected
    disks: typing.List[VmDisk]      # disks whose data is exported
    skipped: typing.List[VmDisk]    # [NOBAK] disks left out
    problems: typing.List[str]      # reasons the VM cannot be backed up as asked


def plan_vm(selected, view):
    """Return the VmPlan of `selected` against the pool's records (pure)."""
    record = view.vms[selected.ref]
    disks = vm_disks(record, view.vbds, view.vdis)
    problems = []
    if selected.mode == "meta-export":
        return VmPlan(selected, [], [], problems)
    if selected.mode == "vdi-export" or (selected.mode == "delta-export" and selected.devices):
        chosen, missing = pick_disks(disks, selected.devices)
        for device in missing:
            problems.append("no disk %s on VM %s" % (device, printable(selected.name)))
        return VmPlan(selected, [d for d in chosen if not d.nobak],
                      [d for d in chosen if d.nobak], problems)
    return VmPlan(selected, [d for d in disks if not d.nobak], [d for d in disks if d.nobak], problems)
