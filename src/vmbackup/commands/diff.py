"""`vmbackup.py diff`: configuration changes between backups of a VM.

Imports: errors, util, selection, store, metadata, formats, report, check.
"""

import argparse
import collections
import json
import os
import sys
import zlib

from vmbackup.check import display_path
from vmbackup.errors import BackupDirError, BadFile, EXIT_OK, PROG, UsageError
from vmbackup.formats.xva import MAX_OVA_XML, _int, ova_objects, parse_ova_xml, read_ova_xml
from vmbackup.report import write_json
from vmbackup.selection import device_name
from vmbackup.store import METADATA_FILE, LocalStore, file_kind, group_by_vm, read_backup_folder
from vmbackup.util import UNNUMBERED, human_size, one_line, printable


#: VM fields diff compares, in the order it reports them; memory fields print as sizes.
DIFF_FIELDS = ("name_label", "name_description", "power_state",
               "memory_static_min", "memory_static_max", "memory_dynamic_min", "memory_dynamic_max",
               "VCPUs_max", "VCPUs_at_startup", "domain_type", "HVM_boot_policy", "PV_bootloader",
               "is_a_template", "ha_restart_priority")


#: VM map fields diff compares key by key.
DIFF_MAPS = ("HVM_boot_params", "platform", "VCPUs_params", "other_config")


def pick_vm(tables, uuid=None):
    """Return the (id, record) of the backed-up VM in an ova.xml's tables; raise ValueError.

    The VM with `uuid` if given, else the one that is not a snapshot (metadata
    exports include the VM's snapshots too).
    """
    vms = list(tables.get("VM", {}).items())
    for ref, record in vms:
        if uuid and record.get("uuid") == uuid:
            return ref, record
    plain = [(ref, r) for ref, r in vms if not r.get("is_a_snapshot") and not r.get("is_control_domain")]
    if plain or vms:
        return (plain or vms)[0]
    raise ValueError("no VM in the metadata")


def vm_config(ova, uuid=None):
    """Return the comparable configuration of the VM in a parsed ova.xml (pure).

    {"name_label": ..., "memory_dynamic_max": 1073741824, ..., "platform": {...},
     "disks": {"xvda": {...}}, "VIFs": {"0": {"network": "eth0", "MAC": ..., "MTU": 1500}}}
    """
    tables = ova_objects(ova)
    ref, vm = pick_vm(tables, uuid)
    config = collections.OrderedDict((f, vm.get(f)) for f in DIFF_FIELDS if f in vm)
    for field in DIFF_FIELDS:
        if field.startswith(("memory_", "VCPUs_")) and field in config:
            config[field] = _int(config[field], config[field])
    for field in DIFF_MAPS:
        config[field] = dict(vm.get(field) or {})
    config["tags"] = sorted(vm.get("tags") or [])
    config["uuid"] = vm.get("uuid")
    disks = {}
    for vbd in tables.get("VBD", {}).values():
        if str(vbd.get("VM")) != ref:
            continue
        vdi = tables.get("VDI", {}).get(str(vbd.get("VDI")))
        sr = tables.get("SR", {}).get(str((vdi or {}).get("SR")), {})
        disks[device_name(vbd)] = collections.OrderedDict([
            ("type", vbd.get("type")), ("userdevice", vbd.get("userdevice")),
            ("virtual_size", _int(vdi.get("virtual_size"), None) if vdi else None),
            ("name_label", vdi.get("name_label") if vdi else None),
            ("SR", sr.get("name_label")), ("mode", vbd.get("mode")),
            ("bootable", vbd.get("bootable"))])
    config["disks"] = disks
    vifs = {}
    for vif in tables.get("VIF", {}).values():
        if str(vif.get("VM")) != ref:
            continue
        network = tables.get("network", {}).get(str(vif.get("network")), {})
        vifs[str(vif.get("device"))] = collections.OrderedDict([
            ("network", network.get("name_label")), ("MAC", vif.get("MAC")),
            ("MTU", _int(vif.get("MTU"), vif.get("MTU")))])
    config["VIFs"] = vifs
    return config


def _shown(field, value):
    """Return a value as diff prints it: memory as 1.0G, text quoted."""
    if value is None:
        return "(none)"
    if field.startswith("memory_") or field == "virtual_size":
        return human_size(value) if isinstance(value, int) else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _change(field, kind, old, new, text):
    return collections.OrderedDict([("field", field), ("change", kind), ("old", old),
                                    ("new", new), ("text", text)])


def _describe_disk(disk):
    parts = [human_size(disk["virtual_size"]) if disk["virtual_size"] is not None else "no VDI"]
    if disk.get("name_label"):
        parts.append(json.dumps(disk["name_label"], ensure_ascii=False))
    if disk.get("SR"):
        parts.append("SR " + json.dumps(disk["SR"], ensure_ascii=False))
    return ", ".join(parts)


def diff_vm_configs(old, new):
    """Return the changes from VM configuration `old` to `new` (vm_config dicts), in report order (pure).

    Each change: {"field", "change": changed|added|removed, "old", "new", "text"};
    e.g. text "memory_dynamic_max: 1.0G -> 2.0G", 'disk xvdb added (2.0G, "data")'.
    """
    changes = []
    for field in DIFF_FIELDS + ("uuid",):
        a, b = old.get(field), new.get(field)
        if a != b:
            changes.append(_change(field, "changed", a, b, "%s: %s -> %s"
                                   % (field, _shown(field, a), _shown(field, b))))
    for device in sorted(set(old["disks"]) | set(new["disks"])):
        a, b = old["disks"].get(device), new["disks"].get(device)
        what = "CD" if (a or b)["type"] == "CD" else "disk"
        if a is None:
            changes.append(_change("disks." + device, "added", None, b, "%s %s added (%s)"
                                   % (what, device, _describe_disk(b))))
        elif b is None:
            changes.append(_change("disks." + device, "removed", a, None, "%s %s removed (%s)"
                                   % (what, device, _describe_disk(a))))
        else:
            for key in a:
                if a[key] != b.get(key):
                    changes.append(_change("disks.%s.%s" % (device, key), "changed", a[key],
                                           b.get(key), "%s %s: %s %s -> %s" % (
                                               what, device, key, _shown(key, a[key]),
                                               _shown(key, b.get(key)))))
    for device in sorted(set(old["VIFs"]) | set(new["VIFs"]), key=lambda d: (_int(d, UNNUMBERED), d)):
        a, b = old["VIFs"].get(device), new["VIFs"].get(device)
        if a is None or b is None:
            kind, vif = ("added", b) if a is None else ("removed", a)
            changes.append(_change("VIFs." + device, kind, a, b, "VIF %s %s (network %s, MAC %s)"
                                   % (device, kind, _shown("network", vif["network"]), vif["MAC"])))
            continue
        for key in a:
            if a[key] != b.get(key):
                changes.append(_change("VIFs.%s.%s" % (device, key), "changed", a[key], b.get(key),
                                       "VIF %s: %s %s -> %s" % (device, key, _shown(key, a[key]),
                                                                _shown(key, b.get(key)))))
    for field in DIFF_MAPS:
        a, b = old.get(field) or {}, new.get(field) or {}
        for key in sorted(set(a) | set(b)):
            if key not in a:
                changes.append(_change("%s.%s" % (field, key), "added", None, b[key],
                                       "%s: %s added (%s)" % (field, key, _shown(key, b[key]))))
            elif key not in b:
                changes.append(_change("%s.%s" % (field, key), "removed", a[key], None,
                                       "%s: %s removed (was %s)" % (field, key, _shown(key, a[key]))))
            elif a[key] != b[key]:
                changes.append(_change("%s.%s" % (field, key), "changed", a[key], b[key],
                                       "%s[%s]: %s -> %s" % (field, key, _shown(key, a[key]),
                                                             _shown(key, b[key]))))
    if old.get("tags") != new.get("tags"):
        changes.append(_change("tags", "changed", old.get("tags"), new.get("tags"),
                               "tags: %s -> %s" % (", ".join(old.get("tags") or []) or "(none)",
                                                   ", ".join(new.get("tags") or []) or "(none)")))
    return changes


def read_backup_metadata(path):
    """Return (ova.xml struct, manifest or None, display name) of a backup, vm-metadata.xml or .xva[.gz].

    Raises BackupDirError if there is nothing readable to compare.
    """
    manifest, source = None, path
    try:
        if os.path.isdir(path):
            backup = read_backup_folder(path)
            manifest, source = backup.manifest, os.path.join(path, METADATA_FILE)
            if METADATA_FILE not in backup.entries:
                raise BackupDirError("%s has no %s to compare" % (path, METADATA_FILE))
        if file_kind(source) == "xva":
            data = read_ova_xml(source)
        else:
            with open(source, "rb") as handle:
                data = handle.read(MAX_OVA_XML)
        return parse_ova_xml(data), manifest, display_path(path)
    except (OSError, EOFError, zlib.error, BadFile, ValueError) as exc:
        raise BackupDirError("cannot read the VM metadata of %s: %s"
                             % (path, one_line(getattr(exc, "strerror", None) or exc)))


def diff_inputs(paths):
    """Return the two things `diff` compares; raise UsageError.

    The two paths given, or a VM folder's two newest backups that have vm-metadata.xml.
    """
    if len(paths) == 2:
        return paths
    if len(paths) != 1:
        raise UsageError("diff takes BACKUP_A BACKUP_B, or one VM folder")
    folder = paths[0]
    if not os.path.isdir(folder):
        raise UsageError("%s: no such folder" % folder)
    vm_dir = os.path.abspath(folder)
    store = LocalStore(os.path.dirname(vm_dir))
    backups = [b for b in store.backups(os.path.basename(vm_dir)) if METADATA_FILE in b.entries]
    # the newest backup's VM only: a folder may hold two VMs' backups (store.group_by_vm)
    found = [b.path for b in next((g for g in group_by_vm(backups) if g[-1] is backups[-1]), [])]
    if len(found) < 2:
        raise UsageError("%s: %d backup%s with %s; diff needs two"
                         % (folder, len(found), "" if len(found) == 1 else "s", METADATA_FILE))
    return found[-2:]


def cmd_diff(argv):
    """Run `vmbackup.py diff BACKUP_A BACKUP_B | VM_FOLDER [--json FILE|-]`; return the exit code."""
    parser = argparse.ArgumentParser(
        prog=PROG + " diff", description="Show what changed in a VM's configuration between two "
        "backups (from their vm-metadata.xml): memory, VCPUs, disks, VIFs, other_config, ...")
    opt = parser.add_argument
    opt("paths", nargs="+", metavar="BACKUP", help="two backup folders, or one VM folder")
    opt("--json", metavar="FILE", help="write the changes as JSON ('-': stdout)")
    args = parser.parse_args(argv)
    path_a, path_b = diff_inputs(args.paths)
    (ova_a, man_a, name_a), (ova_b, man_b, name_b) = (read_backup_metadata(path_a),
                                                      read_backup_metadata(path_b))
    try:
        old = vm_config(ova_a, ((man_a or {}).get("vm") or {}).get("uuid"))
        new = vm_config(ova_b, ((man_b or {}).get("vm") or {}).get("uuid"))
    except ValueError as exc:
        raise BackupDirError("cannot compare %s and %s: %s" % (path_a, path_b, exc))
    changes = diff_vm_configs(old, new)
    if args.json:
        write_json(args.json, collections.OrderedDict([
            ("a", {"path": path_a, "vm": old.get("name_label"), "uuid": old.get("uuid")}),
            ("b", {"path": path_b, "vm": new.get("name_label"), "uuid": new.get("uuid")}),
            ("changes", changes)]))
    if args.json != "-":
        lines = ["%s -> %s" % (name_a, name_b)]
        lines += ["  " + c["text"] for c in changes] or ["  no configuration changes"]
        sys.stdout.write("".join(printable(line) + "\n" for line in lines))
    return EXIT_OK
