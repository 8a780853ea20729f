"""`vmbackup.py list`: what backups exist, newest first, as typed results (Listing).

Imports: errors, util, config, store, chain, report, check.
"""

import argparse
import collections
import os
import re
import sys
import typing

from vmbackup.chain import chain_links
from vmbackup.check import check_backup
from vmbackup.config import DEFAULT_BACKUP_DIR, PLAIN_NAME_RE, Selector, read_config_file
from vmbackup.errors import BackupDirError, EXIT_OK, PROG, UsageError
from vmbackup.report import write_json
from vmbackup.store import LocalStore, backup_vm_uuid, group_by_vm, parse_dated_file
from vmbackup.util import human_size, printable


class BackupSummary(typing.NamedTuple):
    """What `list` shows of one backup folder."""
    name: str
    path: str
    date: typing.Optional[str]
    mode: typing.Optional[str]
    files: int
    size: int
    complete: bool
    legacy: bool
    check: str                  # sizes ok, BAD: ..., not verified (...)
    vm_name: typing.Optional[str]
    chain: typing.Tuple[dict, ...] = ()   # delta-export: one chain_point_summary per disk

    def to_json(self):
        """Return the summary as list --json writes it."""
        return self._asdict()


def chain_point_summary(link):
    """Return what `list` shows of one disk of a delta-export point (a chain.ChainLink)."""
    chain = {"device": link.device, "chain": link.chain_id, "position": link.position,
             "parent": (link.parent or {}).get("backup"), "base": link.parent is None,
             "vhd_uuid": link.vhd_uuid, "size": link.size}
    return chain


def chain_line(disk):
    """Return one line of `list` for one disk of a delta-export point."""
    what = "base of the chain (full)" if disk["base"] else "delta of %s" % disk["parent"]
    return "      %-6s chain %-8s point %-3s %s, %s" % (
        disk["device"], str(disk["chain"])[:8], disk["position"], what,
        human_size(disk["size"] or 0))


class VmListing(typing.NamedTuple):
    """One VM's backups in its folder, newest first (a folder may hold two VMs': store.group_by_vm)."""
    name: str
    folder: str
    backups: typing.Tuple[BackupSummary, ...]
    uuid: typing.Optional[str] = None       # the VM's, from the manifests; None: not recorded

    def counts(self):
        """Return (complete, incomplete): the backups that can be restored, and the others."""
        complete = sum(1 for b in self.backups if b.complete)
        return complete, len(self.backups) - complete

    def to_json(self):
        """Return {"name", "folder", "uuid", "complete", "incomplete", "backups": [...]}."""
        complete, incomplete = self.counts()
        return collections.OrderedDict([("name", self.name), ("folder", self.folder),
                                        ("uuid", self.uuid),
                                        ("complete", complete), ("incomplete", incomplete),
                                        ("backups", [b.to_json() for b in self.backups])])


class DatedListing(typing.NamedTuple):
    """One pool database dump or host backup file."""
    folder: str
    file: str
    date: str
    size: int

    def to_json(self):
        """Return {"folder", "file", "date", "size"}."""
        return self._asdict()


class Listing(typing.NamedTuple):
    """What backup_dir holds, as `list` reports it."""
    backup_dir: str
    vms: typing.Tuple[VmListing, ...]
    pool_db: typing.Tuple[DatedListing, ...]
    hosts: typing.Tuple[DatedListing, ...]

    def to_json(self):
        """Return {"backup_dir", "vms", "pool_db", "hosts"} as list --json writes it."""
        return collections.OrderedDict(
            [("backup_dir", self.backup_dir)]
            + [(key, [item.to_json() for item in getattr(self, key)])
               for key in ("vms", "pool_db", "hosts")])


def backup_summary(store, backup):
    """Return the BackupSummary of a BackupFolder: date, mode, files, size, complete, check.

    Files and size are the manifest's files; without a manifest, everything in the folder.
    """
    result = check_backup(backup, quick=True)
    if result.mode and not result.legacy:
        count, total = len(result.files), sum(f.size for f in result.files)
    else:
        count, total = store.usage(backup.path)
    if result.legacy:
        check = "not verified (legacy NAUbackup)"
    elif result.problems:
        check = "BAD: " + "; ".join("%s: %s" % (p.file, p.message) for p in result.problems[:3])
    elif result.mode is None:
        check = "not verified"
    else:
        check = "sizes ok"
    return BackupSummary(result.name, backup.path, result.date, result.mode, count, total,
                         result.complete, result.legacy, check,
                         result.vm if result.mode and not result.legacy else None,
                         tuple(chain_point_summary(link) for _, link in
                               sorted(chain_links(backup).items())))


def scan_backup_dir(root, pattern=None):
    """Return the Listing of backup_dir: per VM, pool database and host backups, newest first.

    `pattern` selects VMs like a vm-export selector (a plain name exactly, else a
    regex matched at the start), against the VM's name or its folder's name.
    """
    selector = Selector("vm-export", pattern) if pattern else None
    store = LocalStore(root)
    vms, dated = [], {"pool_db": [], "hosts": []}
    for name in store.vm_folders():
        folders = list(reversed(store.backups(name)))
        for group in group_by_vm(folders):   # one listing per VM, whatever folder they share
            backups = tuple(backup_summary(store, b) for b in group)
            vm_name = next((b.vm_name for b in backups if b.vm_name), name)
            if not selector or selector.matches(vm_name) or selector.matches(name):
                uuid = next((backup_vm_uuid(b) for b in group if backup_vm_uuid(b)), None)
                vms.append(VmListing(vm_name, name, backups, uuid))
        if folders:
            continue
        for path in reversed(store.dated_files(name)):
            file = os.path.basename(path)
            dated["pool_db" if file.startswith("pool_db_") else "hosts"].append(DatedListing(
                name, file, parse_dated_file(file).isoformat(), os.path.getsize(path)))
    if selector:
        dated = {"pool_db": [], "hosts": []}
    return Listing(root, tuple(vms), tuple(dated["pool_db"]), tuple(dated["hosts"]))


def format_list(data):
    """Return the human table of a Listing."""
    out = ["backup_dir %s" % data.backup_dir]
    row = "  %-19s  %-12s %5s  %8s  %-10s  %s"
    shared = collections.Counter(vm.folder for vm in data.vms)
    for vm in data.vms:
        shown = printable(vm.name)
        if shared[vm.folder] > 1:
            shown += "  (folder %s, shared with another VM; uuid %s)" % (printable(vm.folder),
                                                                       vm.uuid or "not recorded")
        elif vm.folder != vm.name:
            shown += "  (folder %s)" % printable(vm.folder)
        complete, incomplete = vm.counts()
        out += ["", "%s: %d complete backup%s%s" % (shown, complete, "" if complete == 1 else "s",
                                                    ", %d incomplete" % incomplete if incomplete
                                                    else ""),
                row % ("DATE", "MODE", "FILES", "SIZE", "STATE", "CHECK")]
        for b in vm.backups:
            out.append(row % ((b.date or "?").replace("T", " "), b.mode or "?", b.files,
                              human_size(b.size),
                              "complete" if b.complete else "INCOMPLETE", b.check))
            out += [chain_line(disk) for disk in b.chain]
    for key, title in (("pool_db", "pool database"), ("hosts", "host backup")):
        folders = collections.OrderedDict()
        for entry in getattr(data, key):
            folders.setdefault(entry.folder, []).append(entry)
        for folder, entries in folders.items():
            out += ["", "%s: %s (%d file%s)" % (title, printable(folder), len(entries),
                                               "" if len(entries) == 1 else "s")]
            out += ["  %-19s  %-30s %8s" % (e.date.replace("T", " "), e.file,
                                            human_size(e.size)) for e in entries]
    if not (data.vms or data.pool_db or data.hosts):
        out.append("no backups")
    return "\n".join(out) + "\n"


def list_backup_dir(args):
    """Return the backup_dir `list` reads: -d, -c's backup_dir, $VMBACKUP_BACKUP_DIR, or the default."""
    if args.backup_dir:
        return args.backup_dir
    if args.config:
        parsed = read_config_file(args.config, ignore_extra_keys=True)
        if parsed.values.get("backup_dir"):
            return parsed.values["backup_dir"]
    return os.environ.get("VMBACKUP_BACKUP_DIR") or DEFAULT_BACKUP_DIR


def cmd_list(argv):
    """Run `vmbackup.py list [VM-REGEX] [-d BACKUP_DIR] [-c CONFIG] [--json FILE|-]`; return the exit code."""
    parser = argparse.ArgumentParser(
        prog=PROG + " list", description="Show the backups in backup_dir: per VM, newest first "
        "(date, mode, files, size, complete or not, sizes checked against the manifest); "
        "pool database and host backups too.")
    opt = parser.add_argument
    opt("pattern", nargs="?", metavar="VM-REGEX", help="only VMs this name or regex selects")
    opt("-d", "--backup-dir", metavar="DIR")
    opt("-c", "--config", metavar="FILE", help="take backup_dir from this config file")
    opt("--json", metavar="FILE", help="write the listing as JSON ('-': stdout)")
    args = parser.parse_args(argv)
    if args.pattern and not PLAIN_NAME_RE.match(args.pattern):
        try:
            re.compile(args.pattern)
        except re.error as exc:
            raise UsageError("invalid regex %r: %s" % (args.pattern, exc))
    root = list_backup_dir(args)
    if not os.path.isdir(root):
        raise BackupDirError("backup_dir %s does not exist" % root)
    data = scan_backup_dir(root, args.pattern)
    if args.json:
        write_json(args.json, data.to_json())
    if args.json != "-":
        sys.stdout.write(format_list(data))
    return EXIT_OK
