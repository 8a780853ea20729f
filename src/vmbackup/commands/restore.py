"""`vmbackup.py restore`: import a backup as a new VM (or in place with --preserve).

Imports: everything below commands, and commands.options.
"""

import argparse
import datetime
import glob
import os
import sys
import time
import typing

from vmbackup.chain import MERGE_JOURNAL, chain_paths, finish_merges
from vmbackup.check import check_backup, verify_lines
from vmbackup.commands.options import (
    EXIT_STATUS_TEXT, connection_options, load_config, output_options, settings_from_args)
from vmbackup.errors import EXIT_OK, EXIT_WARNING, PROG, RestoreError, UsageError, VmBackupError, log
from vmbackup.formats.vhdfile import ChainReader
from vmbackup.report import write_json
from vmbackup.selection import is_candidate
from vmbackup.store import (
    LocalStore, backup_folders, backup_vm_uuid, file_kind, group_by_vm, parse_backup_name, read_backup_folder,
    read_cfg)
from vmbackup.transport.base import Obj
from vmbackup.transport.choose import make_transport
from vmbackup.util import human_size, printable
from vmbackup.xapi import login, parse_endpoint


def newest_complete(vm_dir):
    """Return the newest complete BackupFolder of a VM folder that has disks to restore,
    passing over newer metadata-only backups (an hourly -m beside a weekly export), else the
    newest complete one; raise RestoreError if none, or if the folder holds more than one
    VM's backups (their names made one folder): then the message names the newest backup of
    each, to restore by its path."""
    store = LocalStore(os.path.dirname(vm_dir))
    complete = [b for b in reversed(store.backups(os.path.basename(vm_dir))) if b.complete]
    if not complete:
        raise RestoreError(nothing_to_restore(vm_dir))
    groups = group_by_vm(complete)
    if len(groups) > 1:
        raise RestoreError("%s holds the backups of %d VMs (their names make one folder); "
                           "restore one by its backup folder: %s" % (
                               vm_dir, len(groups), "; ".join(
                                   "%s [%s]: %s" % (printable(g[0].vm), backup_vm_uuid(g[0]) or
                                                    "uuid not recorded", g[0].path) for g in groups)))
    return next((b for b in complete if b.mode != "meta-export"), complete[0])


def how_chosen(path, backup):
    """Return why `backup` is the one restored from `path`, for the log line."""
    if path == backup.path:
        return "as named"
    store = LocalStore(os.path.dirname(path))
    newest = [b for b in store.backups(os.path.basename(path)) if b.complete][-1]
    if newest.path == backup.path:
        return "the newest complete backup in %s" % path
    return "the newest complete backup with disks in %s: newer ones are metadata-only" % path


#: How many VM folders a message names before "...".
NAMED_FOLDERS = 5


def nothing_to_restore(vm_dir):
    """Return why a folder with no complete backup gives nothing to restore: a backup_dir
    (its subfolders hold backup folders) is said to be one, naming its first VM folders."""
    top = LocalStore(vm_dir)
    if backup_folders(vm_dir):
        return "%s holds no complete backup" % vm_dir
    vms = [name for name in top.vm_folders() if backup_folders(os.path.join(vm_dir, name))]
    if not vms:
        return "%s holds no complete backup" % vm_dir
    more = ", ..." if len(vms) > NAMED_FOLDERS else ""
    return "%s is a backup_dir, not a VM folder: give one of its VM folders (or a backup " \
        "folder in one): %s%s (%d VM folders)" % (
            vm_dir, ", ".join(printable(n) for n in vms[:NAMED_FOLDERS]), more, len(vms))


def resolve_backup(path):
    """Return the BackupFolder `path` names: a backup folder, or a VM folder (its newest)."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise RestoreError("%s is not a backup folder" % path)
    if parse_backup_name(os.path.basename(path)) is not None:
        return read_backup_folder(path)
    return newest_complete(path)


class RestoreItem(typing.NamedTuple):
    """One thing a restore creates: a VM from an .xva, or a disk from a .raw/.vhd."""
    kind: str                   # vm or disk
    file: str                   # path in the backup
    name: str                   # name_label to give it
    fmt: str                    # xva, raw, vhd, or chain (a delta-export point's VHD chain)
    virtual_size: int = 0
    userdevice: str = ""
    device: str = ""


def plan_restore(folder, manifest, new_name=None, preserve=False, today=None):
    """Return the [RestoreItem] that restoring `folder` creates (pure; raises RestoreError)."""
    if manifest is None:
        manifest = legacy_manifest(read_backup_folder(folder))
    vm_name = (manifest.get("vm") or {}).get("name") or os.path.basename(os.path.dirname(folder))
    day = (today or datetime.date.today()).isoformat()
    name = new_name or (vm_name if preserve else "%s (restored %s)" % (vm_name, day))
    mode = manifest.get("mode")
    if mode == "vm-export":
        xvas = [f["name"] for f in manifest["files"] if file_kind(f["name"]) == "xva"]
        if len(xvas) != 1:
            raise RestoreError("%s: expected one .xva file, found %d" % (folder, len(xvas)))
        return [RestoreItem("vm", os.path.join(folder, xvas[0]), name, "xva")]
    if mode == "vdi-export":
        items = []
        for disk in manifest.get("disks", ()):
            fmt = file_kind(disk["file"])
            if fmt not in ("raw", "vhd"):
                raise RestoreError("%s: disk %s: %s is not a .raw or .vhd file"
                                   % (folder, disk.get("device", ""), disk["file"]))
            items.append(RestoreItem("disk", os.path.join(folder, disk["file"]),
                                     "%s %s" % (name, disk.get("device", "")),
                                     fmt, int(disk["virtual_size"]), str(disk.get("userdevice", "")),
                                     disk.get("device", "")))
        if not items:
            raise RestoreError("%s: the manifest lists no disks" % folder)
        return items
    if mode == "delta-export":
        items = [RestoreItem("disk", os.path.join(folder, disk["file"]),
                             "%s %s" % (name, disk.get("device", "")), "chain",
                             int(disk["virtual_size"]), str(disk.get("userdevice", "")),
                             disk.get("device", ""))
                 for disk in manifest.get("disks", ()) if disk.get("file")]
        if not items:
            raise RestoreError("%s: the manifest lists no disks" % folder)
        return items
    if mode == "meta-export":
        raise RestoreError("%s is a metadata-only backup: there is no disk to restore "
                           "(compare it with `vmbackup.py diff`)" % folder)
    raise RestoreError("%s: unknown backup mode %r" % (folder, mode))


def legacy_manifest(backup):
    """Return a manifest-like dict for a NAUbackup BackupFolder: its .xva, or its .raw/.vhd
    files and the disk each holds (store.legacy_disk_files)."""
    xvas = backup.names_of("xva")
    if xvas:
        return {"mode": "vm-export", "files": [{"name": n} for n in xvas], "vm": {}}
    files = backup.names_of("raw") + backup.names_of("vhd")
    if files and all(backup.disk_files.get(f) is not None for f in files):
        disks, files = [], sorted(files, key=lambda f: backup.disk_files[f].device)
        for name in files:
            disk = backup.disk_files[name]
            if disk.virtual_size is None:
                raise RestoreError("%s: DISK-%s/vdi.cfg records no virtual_size for %s"
                                   % (backup.path, disk.device, name))
            disks.append({"file": name, "device": disk.device, "userdevice": disk.userdevice,
                          "virtual_size": disk.virtual_size})
        return {"mode": "vdi-export", "vm": {}, "disks": disks,
                "files": [{"name": n} for n in files]}
    raise RestoreError("%s: legacy NAUbackup folder with nothing this tool can restore"
                       % backup.path)


class BackupIdentity(typing.NamedTuple):
    """Who the backed-up VM was: what a --preserve restore would bring back into the pool."""
    name: str
    uuid: str
    macs: typing.Tuple[str, ...]


def backup_identity(backup, manifest):
    """Return the BackupIdentity of a BackupFolder: the manifest's (or vm.cfg's) name and
    uuid, and the MAC of every VIF its VIFs/*.cfg files record."""
    vm = (manifest or {}).get("vm") or {}
    cfg = read_cfg(os.path.join(backup.path, "vm.cfg"))
    macs = []
    for path in sorted(glob.glob(os.path.join(glob.escape(backup.path), "VIFs", "*.cfg"))):
        mac = read_cfg(path).get("MAC", "").strip().lower()
        if mac and mac not in macs:
            macs.append(mac)
    return BackupIdentity(vm.get("name") or cfg.get("name_label") or backup.vm,
                          vm.get("uuid") or cfg.get("orig_uuid", ""), tuple(macs))


def preserve_conflicts(identity, vms, vifs):
    """Return one line per real VM of the pool a --preserve restore of `identity` would
    clash with: the same uuid, the same name, or one of its MACs (pure).

    `vms` and `vifs` are {ref: record} as VM.get_all_records and VIF.get_all_records give.
    """
    lines = []
    for rec in sorted((r for r in vms.values() if is_candidate(r)),
                      key=lambda r: (r.get("name_label", ""), r.get("uuid", ""))):
        why = []
        if identity.uuid and rec.get("uuid") == identity.uuid:
            why.append("it is the backed-up VM itself")
        if rec.get("name_label") == identity.name:
            why.append("it has the same name")
        macs = {vifs[v].get("MAC", "").lower() for v in rec.get("VIFs", ()) if v in vifs}
        shared = [m for m in identity.macs if m in macs]
        if shared:
            why.append("it uses MAC %s" % ", ".join(shared))
        if why:
            lines.append("VM %s (%s, %s): %s" % (printable(repr(rec.get("name_label", ""))),
                                                 rec.get("uuid", ""),
                                                 str(rec.get("power_state", "")).lower(),
                                                 "; ".join(why)))
    return lines


def free_name(wanted, taken):
    """Return `wanted`, or `wanted 2`, `wanted 3`... : the first not in `taken` (pure)."""
    name, n = wanted, 1
    while name in taken:
        n += 1
        name = "%s %d" % (wanted, n)
    return name


def attach_conflicts(items, target_name, vbds):
    """Return one line per disk of `items` whose userdevice the VM `target_name` already
    uses (`vbds`: the target's VBD records) (pure)."""
    used = {str(v.get("userdevice")): v for v in vbds}
    lines = []
    for item in items:
        vbd = used.get(item.userdevice) if item.userdevice else None
        if vbd is not None:
            what = "empty CD drive" if vbd.get("empty") else str(vbd.get("type", "disk")).lower()
            lines.append("--attach-to %s: userdevice %s (for %s) is taken by its %s %s"
                         % (printable(target_name), item.userdevice, item.device or item.name,
                            what, vbd.get("device") or "(no device name)"))
    return lines


def older_good_backup(backup):
    """Return the newest complete backup with disks (not metadata-only) older than `backup`
    in its VM folder that verifies (good or unchecked), or None."""
    vm_dir = os.path.dirname(os.path.abspath(backup.path))
    store = LocalStore(os.path.dirname(vm_dir))
    for older in reversed(store.backups(os.path.basename(vm_dir))):
        if older.complete and older.mode != "meta-export" and older.when and backup.when \
                and older.when < backup.when and check_backup(older).status in ("good", "unchecked"):
            return older
    return None


def refuse_bad_backup(backup, check):
    """Log what is wrong with `backup` and raise RestoreError naming the newest good one."""
    for line in verify_lines(check, verbosity=-1):
        log.error("%s", printable(line))
    good = older_good_backup(backup)
    hint = ("; the newest good backup is %s: restore it with `%s restore %s`"
            % (good.path, PROG, good.path) if good else "; no older backup of this VM verifies")
    raise RestoreError("%s is %s: refusing to restore it (see `vmbackup.py verify`)%s"
                       % (backup.path, check.status, hint))


def check_pool_for(xapi, items, identity, args):
    """Refuse (RestoreError) what would clash in the pool, unless --force; return the items
    with a VM's default name made free. Runs in the preview as in the restore."""
    problems = []
    vm_items = [i for i in items if i.kind == "vm"]
    if vm_items:
        vms = xapi.call("VM.get_all_records")
        taken = {r.get("name_label") for r in vms.values() if is_candidate(r)}
        if args.preserve:
            problems += ["--preserve: %s" % line for line in
                         preserve_conflicts(identity, vms, xapi.call("VIF.get_all_records"))]
        elif args.name and args.name in taken:
            problems.append("--name %s: a VM of that name is in the pool" % printable(args.name))
        elif not args.name:
            items = [i._replace(name=free_name(i.name, taken)) if i.kind == "vm" else i
                     for i in items]
    if problems and args.force:
        for line in problems:
            log.warning("%s (going ahead: --force)", line)
        return items
    if problems:
        raise RestoreError("refusing to restore %s: %s (the restored VM would make duplicate "
                           "names or MACs in the pool; remove or rename the other VM, or give "
                           "--force)" % (printable(identity.name), "; ".join(problems)))
    return items


def find_sr(xapi, wanted):
    """Return (ref, record) of the SR named or uuid'd `wanted`, or the pool's default SR."""
    srs = xapi.call("SR.get_all_records")
    if not wanted:
        pool = next(iter(xapi.call("pool.get_all_records").values()))
        ref = pool.get("default_SR")
        if ref in srs:
            return ref, srs[ref]
        raise RestoreError("the pool has no default SR: name one with --sr")
    hits = [(r, rec) for r, rec in srs.items() if wanted in (rec["uuid"], rec["name_label"])]
    if len(hits) != 1:
        raise RestoreError("--sr %s: %s" % (wanted, "no such SR" if not hits else
                                            "%d SRs have that name; give its uuid" % len(hits)))
    return hits[0]


def find_vm(xapi, wanted):
    """Return (ref, record) of the one real VM named or uuid'd `wanted`; raise RestoreError."""
    hits = [(r, rec) for r, rec in xapi.call("VM.get_all_records").items()
            if is_candidate(rec) and wanted in (rec["uuid"], rec["name_label"])]
    if len(hits) != 1:
        raise RestoreError("--attach-to %s: %s" % (wanted, "no such VM" if not hits else
                                                   "%d VMs have that name; give its uuid" % len(hits)))
    return hits[0]


def restore_vm(transport, item, sr, preserve, start):
    """Import an .xva as a new VM named item.name; return its (ref, uuid)."""
    refs = transport.import_vm(item.file, sr, preserve)
    vms = [ref for ref in refs if not transport.xapi.call("VM.get_is_a_snapshot", ref)] or refs
    if not vms:
        raise RestoreError("import of %s created no VM" % item.file)
    ref = vms[0]
    xapi = transport.xapi
    xapi.call("VM.set_name_label", ref, item.name)
    transport.untag_copy(ref)   # the exported snapshot's tags came along in the .xva
    if xapi.call("VM.get_is_a_template", ref):
        xapi.call("VM.set_is_a_template", ref, False)
    if start:
        xapi.call("VM.start", ref, False, False)
    return ref, xapi.call("VM.get_uuid", ref)


def restore_disk(transport, item, sr, attach_to=None):
    """Create a VDI of the recorded size on `sr`, import the disk into it; return (ref, uuid)."""
    vdi = transport.create_vdi(sr, item.name, item.virtual_size)
    try:
        if item.fmt == "chain":
            import_chain(transport, vdi, item)
        else:
            transport.import_vdi(vdi, item.file, item.fmt)
        if attach_to is not None:
            transport.xapi.call("VBD.create", {
                "VM": attach_to, "VDI": vdi.ref, "userdevice": item.userdevice or "autodetect",
                "bootable": item.userdevice == "0", "mode": "RW", "type": "Disk",
                "unpluggable": False, "empty": False, "other_config": {},
                "qos_algorithm_type": "", "qos_algorithm_params": {}})
    except BaseException:
        try:
            transport.destroy_vdi(vdi)
        except VmBackupError as exc:
            log.error("could not remove the half-restored disk %s: %s", vdi.uuid, exc)
        raise
    return vdi.ref, vdi.uuid


def plug_restored(transport, vm_ref, vdi_ref, item):
    """Plug a restored disk's link into its VM if the VM runs (a halted VM plugs it when it
    starts); return False if the plug was refused (a warning: the disk is restored and
    linked all the same)."""
    xapi = transport.xapi
    (vbd,) = xapi.call("VDI.get_VBDs", vdi_ref)
    state = xapi.call("VM.get_power_state", vm_ref)
    device = item.userdevice or "autodetect"
    if state != "Running":
        log.info("disk %r linked to the %s VM as device %s: plugged when it starts",
                 item.name, state.lower(), device)
        return True
    try:
        transport.plug_vbd(vbd)
    except VmBackupError as exc:
        log.warning("disk %r linked to the running VM as device %s but not plugged: %s "
                    "(it is plugged when the VM next starts)", item.name, device, exc)
        return False
    log.info("disk %r plugged into the running VM as device %s", item.name, device)
    return True


def import_chain(transport, vdi, item):
    """Stream the disk of a delta-export point (its VHD chain, the full first, read as raw)
    into `vdi`; raise ChainBroken if a link is missing or wrong."""
    folder = os.path.dirname(item.file)
    vm_dir = os.path.dirname(folder)
    paths = chain_paths(LocalStore(os.path.dirname(vm_dir)), os.path.basename(vm_dir),
                        os.path.basename(folder), item.device)
    with ChainReader(paths) as reader:
        if reader.size != item.virtual_size:
            raise RestoreError("%s: the chain's disk is %d bytes, the manifest says %d"
                               % (item.file, reader.size, item.virtual_size))
        log.info("disk %s: a chain of %d file(s), %s", item.device, len(paths),
                 human_size(reader.size))
        transport.import_vdi_stream(vdi, reader.iter_raw(), reader.size)


def build_restore_parser():
    """Return the parser of `vmbackup.py restore`."""
    parser = argparse.ArgumentParser(
        prog=PROG + " restore", formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[connection_options(), output_options("write what was restored as JSON")],
        description="Restore a backup into the pool: a vm-export backup becomes a new VM, a "
                    "vdi-export backup or a delta-export point becomes new disks (a point's "
                    "chain is read back to its full). The backup is verified first.",
        epilog="examples:\n"
               "  vmbackup.py restore /backups/web01              newest backup, as 'web01 (restored DATE)'\n"
               "  vmbackup.py restore /backups/web01/backup-2026-11-20-001001 --sr 'NFS storage' --start\n"
               "  vmbackup.py restore /backups/web01 --preserve   same name and MACs (the original is gone)\n"
               "  vmbackup.py restore /backups/db01 --attach-to db01-new   disks attached to a VM\n\n"
               + EXIT_STATUS_TEXT)
    opt = parser.add_argument
    opt("backup", metavar="BACKUP", help="a backup folder, or a VM folder (its newest complete backup)")
    opt("--sr", metavar="SR", help="SR name or uuid (default: the pool's default SR)")
    opt("--name", metavar="NAME", help="name of the new VM (default: '<name> (restored DATE)')")
    opt("--preserve", action="store_true",
        help="keep the MAC addresses and the VM's name, for disaster recovery when the original is gone")
    opt("--start", action="store_true", help="start the restored VM")
    opt("--force", action="store_true",
        help="restore even when a VM of the same name, uuid or MAC is in the pool")
    opt("--attach-to", metavar="VM",
        help="vdi-export, delta-export: attach the restored disks to this VM")
    opt("--preview", "--dry-run", action="store_true", help="show what would be created; change nothing")
    return parser


def finish_killed_merge(folder):
    """Finish, under the run lock, a retention merge a killed run left in the VM folder of
    `folder` (the chain's points read as bad until then); return True if there was one."""
    vm_dir = os.path.dirname(os.path.abspath(folder))
    if not os.path.exists(os.path.join(vm_dir, MERGE_JOURNAL)):
        return False
    store = LocalStore(os.path.dirname(vm_dir))
    with store.lock():
        finish_merges(store, os.path.basename(vm_dir))
    return True


def cmd_restore(argv):
    """`vmbackup.py restore BACKUP ...`: verify, then import; return the exit code."""
    args = build_restore_parser().parse_args(argv)
    config, password = load_config(settings_from_args(args))
    backup = resolve_backup(args.backup)
    folder = backup.path
    log.info("restoring from %s (%s)", folder, how_chosen(os.path.abspath(args.backup), backup))
    if not args.preview and finish_killed_merge(folder):
        backup = resolve_backup(args.backup)
    check = check_backup(backup)
    if check.status in ("bad", "incomplete"):
        refuse_bad_backup(backup, check)
    if check.status == "unchecked":
        log.warning("%s could not be fully checked here (%s); restoring anyway",
                    check.display, printable("; ".join(str(u) for u in check.unchecked)))
    else:
        log.info("verified %s: every file's size and SHA-256 match the manifest", check.display
                 if not backup.legacy else check.display + " (legacy: each file's format)")
    manifest = legacy_manifest(backup) if backup.legacy else backup.manifest
    items = plan_restore(folder, manifest, args.name, args.preserve)
    if args.attach_to and items[0].kind != "disk":
        raise UsageError("--attach-to is for vdi-export and delta-export backups; %s holds a "
                         "whole VM" % folder)
    endpoint = parse_endpoint(config.server, config.tls_ca_file, config.tls_fingerprint,
                              config.tls_insecure)
    xapi = login(endpoint, config.username, password)
    done, code = [], EXIT_OK
    try:
        sr_ref, sr = find_sr(xapi, args.sr)
        items = check_pool_for(xapi, items, backup_identity(backup, manifest), args)
        attach = None
        if args.attach_to:
            attach, target = find_vm(xapi, args.attach_to)
            clash = attach_conflicts(items, target["name_label"],
                                     [xapi.call("VBD.get_record", v) for v in target["VBDs"]])
            if clash:
                raise RestoreError("; ".join(clash))
        for item in items:
            log.info("%s %s -> %s %r on SR %r", "would restore" if args.preview else "restoring",
                     os.path.relpath(item.file, os.path.dirname(os.path.dirname(folder))),
                     "VM" if item.kind == "vm" else "disk", item.name, sr["name_label"])
        if args.preview and args.json:
            write_json(args.json, {"preview": True, "backup": folder, "would_restore": [
                {"kind": item.kind, "name": item.name, "file": item.file, "sr": sr["uuid"]}
                for item in items]})
        if args.preview and args.json != "-":
            sys.stdout.write("".join("%s %s -> new %s %r (%s) on SR %r\n" % (
                "would restore", item.file, "VM" if item.kind == "vm" else "disk", item.name,
                human_size(item.virtual_size) if item.virtual_size else item.fmt, sr["name_label"])
                for item in items))
        if args.preview:
            return EXIT_OK
        transport = make_transport(config, xapi, password)
        try:
            for item in items:
                began = time.monotonic()
                if item.kind == "vm":
                    ref, uuid = restore_vm(transport, item, Obj(sr_ref, sr["uuid"]), args.preserve,
                                           args.start)
                else:
                    ref, uuid = restore_disk(transport, item, Obj(sr_ref, sr["uuid"]), attach)
                    if attach is not None and not plug_restored(transport, attach, ref, item):
                        code = EXIT_WARNING
                log.info("restored %s %r (%s) in %.1fs", item.kind, item.name, uuid,
                         time.monotonic() - began)
                done.append({"kind": item.kind, "name": item.name, "uuid": uuid,
                             "file": item.file, "sr": sr["uuid"]})
        finally:
            transport.close()
    finally:
        xapi.logout()
    for entry in done if args.json != "-" else ():     # --json -: stdout is the JSON alone
        sys.stdout.write("restored %s %s %s\n" % (entry["kind"], entry["uuid"], printable(entry["name"])))
    if args.json:
        write_json(args.json, {"restored": done, "backup": folder})
    return code
