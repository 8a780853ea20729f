"""Chains of delta-export points on the backup storage: following, verifying, merging them.

A delta-export point is a backup folder whose manifest gives each disk a `chain` entry
(chain_entry): the chain's id, the point's position, its VHD's uid and its parent (the
previous point's folder, file, VHD uid and sha256; None for the chain's base, a dynamic
VHD). Every other file of a chain is a differencing VHD of its parent.

Retention on chains (plan_chain_retention, pure): keeping N points never deletes a file a
kept point needs; when the oldest point falls out and the next one needs it, the next
point's delta is merged into the old full on the storage (merge_points): the full's file
is patched in place with the delta's sectors, takes the delta's VHD uid (so the next
delta's parent uid stays right and its file is untouched) and replaces the delta in the
next point's folder; that point becomes the chain's base. A delta that GFS rules drop
between two kept points is merged the same way into the next delta, which then names the
dropped point's parent. A merge first writes a journal (.chain-merge.json in the VM's
folder) naming everything it will change; every step after it can be done again, so a
merge a kill interrupted is finished by finish_merges, which every prune calls first.

Owns: chain_entry/chain_parent (the manifest's chain fields, written down once),
chain_links, chain_paths, verify_chain, plan_chain_retention (ChainPoint, ChainAction,
incoming_point), merge_points, finish_merges, MERGE_JOURNAL, MERGE_HOOKS.
Imports: errors, util, store, formats.vhdfile.
"""

import json
import os
import struct
import typing
import uuid as uuidlib

from vmbackup.errors import BadFile, ChainBroken, log
from vmbackup.formats.vhdfile import (
    BITMAP_BYTES, SECTOR, VHD_BLOCK, VHD_DIFFERENCING, VHD_DYNAMIC, bitmap_mask, mask_bitmap,
    read_vhd_layout, sector_runs, vhd_footer_bytes)
from vmbackup.store import MANIFEST, inside, manifest_text, read_backup_folder
from vmbackup.util import fsync_dir, sha256_file


#: The mode whose backups are chains.
DELTA_MODE = "delta-export"

#: The journal of a merge in progress, in the VM's folder.
MERGE_JOURNAL = ".chain-merge.json"

#: Called with a step's name before every change a merge makes (tests kill a merge here).
MERGE_HOOKS = []


# -- the manifest's chain fields -------------------------------------------------------
def chain_parent(backup, file, vhd_uuid, sha256):
    """Return a chain entry's `parent`: the parent point's folder name, file, VHD uid, sha256."""
    return {"backup": backup, "file": file, "vhd_uuid": vhd_uuid, "sha256": sha256}


def chain_entry(chain_id, position, vhd_uuid, parent=None, reference=None, method="full",
                reason=None, changed_bytes=0):
    """Return the `chain` field of a delta-export disk entry (the one place its shape is written).

    `parent` is chain_parent(...) or None for a full; `reference` is
    {"vdi_uuid", "kind": "cbt_metadata"|"snapshot"} or None; `method` is full, cbt-nbd,
    cbt-export or export; `reason` says why a point is a full.
    """
    return {"id": chain_id, "position": position, "vhd_uuid": vhd_uuid, "parent": parent,
            "reference": reference, "method": method, "reason": reason,
            "changed_bytes": changed_bytes}


class ChainLink(typing.NamedTuple):
    """One disk of one delta-export point, as its manifest records it."""
    backup: str                     # the point's folder name
    device: str
    file: str
    vhd_uuid: str
    chain_id: str
    position: int
    parent: typing.Optional[dict]   # chain_parent(...) or None (the chain's base)
    sha256: typing.Optional[str]    # the file's, from the manifest's files
    size: typing.Optional[int]      # the file's size in bytes, from the manifest's files
    virtual_size: typing.Optional[int]


def chain_links(folder):
    """Return {device: ChainLink} of a BackupFolder ({} unless it is a delta-export point)."""
    manifest = folder.manifest
    if not manifest or manifest.get("mode") != DELTA_MODE:
        return {}
    files = {f.get("name"): f for f in manifest.get("files", ()) if isinstance(f, dict)}
    links = {}
    for disk in manifest.get("disks", ()):
        chain = disk.get("chain") if isinstance(disk, dict) else None
        if not isinstance(chain, dict) or not disk.get("file"):
            continue
        entry = files.get(disk["file"], {})
        parent = chain.get("parent") if isinstance(chain.get("parent"), dict) else None
        links[str(disk.get("device"))] = ChainLink(
            folder.name, str(disk.get("device")), str(disk["file"]), str(chain.get("vhd_uuid")),
            str(chain.get("id")), chain.get("position"), parent, entry.get("sha256"),
            entry.get("size"), disk.get("virtual_size"))
    return links


def _link_of_file(links, file):
    """Return the ChainLink of `links` whose file is `file`, or None."""
    return next((link for link in links.values() if link.file == file), None)


def chain_folders(vm_dir, name, device):
    """Return [(BackupFolder, ChainLink)] from the chain's base to the point `name`'s disk
    `device`, following the manifests' parent links; raise ChainBroken naming the missing link."""
    found, seen = [], set()
    want_device, want_file = device, None
    while True:
        if name in seen:
            raise ChainBroken("VHD chain of %s: the parent links loop at %s" % (device, name))
        seen.add(name)
        needed = " (needed by %s)" % found[-1][0].name if found else ""
        try:
            folder = read_backup_folder(inside(vm_dir, name))
        except OSError:
            raise ChainBroken("VHD chain of %s: backup %s is missing%s" % (device, name, needed))
        if not folder.complete:
            raise ChainBroken("VHD chain of %s: backup %s is incomplete%s" % (device, name, needed))
        links = chain_links(folder)
        link = _link_of_file(links, want_file) if want_file else links.get(want_device)
        if link is None:
            raise ChainBroken("VHD chain of %s: backup %s has no delta-export disk %s%s"
                              % (device, name, want_file or want_device, needed))
        if found and found[-1][1].parent.get("vhd_uuid") != link.vhd_uuid:
            raise ChainBroken("VHD chain of %s: backup %s names parent VHD uuid %s, the manifest "
                              "of %s records %s" % (device, found[-1][0].name,
                                                    found[-1][1].parent.get("vhd_uuid"), name,
                                                    link.vhd_uuid))
        found.append((folder, link))
        if link.parent is None:
            return list(reversed(found))
        name, want_file = str(link.parent.get("backup")), str(link.parent.get("file"))


def chain_paths(store, vm_folder, backup_name, device):
    """Return the absolute paths of the VHD chain of one disk of a point, the full first;
    raise ChainBroken naming the missing link (or an unfinished merge of the chain)."""
    vm_dir = inside(store.root, vm_folder)
    journal = read_journal(vm_dir)
    chain = chain_folders(vm_dir, backup_name, device)
    if journal and {journal.get("from"), journal.get("into")} & {f.name for f, _ in chain}:
        raise ChainBroken("VHD chain of %s in %s: a merge of %s into %s was interrupted; the "
                          "next backup run of this VM finishes it" % (
                              device, backup_name, journal.get("from"), journal.get("into")))
    return [inside(folder.path, link.file) for folder, link in chain]


# -- verifying -----------------------------------------------------------------------------
#: What verify already read of chain files in this process (sha256, VHD layouts), by
#: (what, path, size, mtime): a VM folder's points share their ancestors' files.
_DIGESTS = {}


def _memo(memo, what, path, compute):
    """Return compute(path), once per process for an unchanged file."""
    st = os.stat(path)
    key = (what, path, st.st_size, st.st_mtime_ns)
    if key not in memo:
        memo[key] = compute(path)
    return memo[key]


def file_digest(path, digests):
    """Return the sha256 of `path`, once per run for an unchanged file (`digests` is the memo)."""
    return _memo(digests, "sha256", path, sha256_file)


def verify_chain(backup, quick=False, digests=None):
    """Return [(file, message)] of what is wrong with the chains of a delta-export BackupFolder.

    Every link down to the base: the parent point exists and is complete, its manifest
    records the VHD uid and sha256 the child names, its file still has that sha256
    (unless `quick`), and the VHD files agree: the child's header names the parent's uid,
    sizes are equal, the base is dynamic. `file` is relative to the backup folder.
    """
    digests = _DIGESTS if digests is None else digests
    vm_dir = os.path.dirname(os.path.abspath(backup.path))
    problems = []
    journal = read_journal(vm_dir)
    if journal and backup.name in (journal.get("from"), journal.get("into")):
        problems.append(("", "a merge of %s into %s was interrupted: the next backup run of "
                             "this VM finishes it" % (journal.get("from"), journal.get("into"))))
    for device, link in sorted(chain_links(backup).items()):
        try:
            chain = chain_folders(vm_dir, backup.name, device)
        except ChainBroken as exc:
            problems.append((link.file, str(exc)))
            continue
        layouts = []
        for n, (folder, own) in enumerate(chain):
            rel = os.path.relpath(inside(folder.path, own.file), backup.path)
            path = inside(folder.path, own.file)
            if n:
                parent_folder, parent = chain[n - 1]
                want = own.parent
                if want.get("sha256") != parent.sha256:
                    problems.append((rel, "names its parent's sha256 %s, the manifest of %s "
                                          "records %s" % (str(want.get("sha256"))[:12],
                                                          parent_folder.name,
                                                          str(parent.sha256)[:12])))
            if quick:
                continue
            if folder.name != backup.name:
                try:
                    if file_digest(path, digests) != own.sha256:
                        problems.append((rel, "sha256 mismatch: the file changed since the backup"))
                except OSError as exc:
                    problems.append((rel, "cannot read: %s" % (exc.strerror or exc)))
                    break
            try:
                layout = _memo(digests, "layout", path, read_vhd_layout)
            except (BadFile, OSError) as exc:
                problems.append((rel, "not a readable VHD: %s" % exc))
                break
            problems += _layout_problems(rel, layout, own, layouts[-1] if layouts else None)
            layouts.append(layout)
    return problems


def _layout_problems(rel, layout, link, parent):
    """Return [(rel, message)] where a chain file's VHD disagrees with its manifest or parent."""
    found = []
    if layout.uuid != link.vhd_uuid:
        found.append((rel, "VHD uuid %s, the manifest records %s" % (layout.uuid, link.vhd_uuid)))
    if link.virtual_size is not None and str(layout.size) != str(link.virtual_size):
        found.append((rel, "VHD virtual size %d, the manifest records %s"
                      % (layout.size, link.virtual_size)))
    if parent is None:
        if layout.disk_type != VHD_DYNAMIC:
            found.append((rel, "the chain's base is not a dynamic VHD"))
    elif layout.disk_type != VHD_DIFFERENCING or layout.parent_uuid != parent.uuid:
        found.append((rel, "its VHD names parent uuid %s, its parent's VHD has uuid %s"
                      % (layout.parent_uuid, parent.uuid)))
    elif layout.size != parent.size:
        found.append((rel, "VHD virtual size %d, its parent's is %d" % (layout.size, parent.size)))
    return found


# -- retention on chains (pure) ------------------------------------------------------------
def chain_point(folder):
    """Return the ChainPoint of a BackupFolder."""
    links = chain_links(folder) if folder.mode == DELTA_MODE else None
    if links is not None:
        links = {device: (link.parent or {}).get("backup") for device, link in links.items()}
    return ChainPoint(folder.name, folder.when, folder.complete, links)


def incoming_point(folders, mode, when):
    """Return the ChainPoint of the backup a run is about to make (named None, at `when`): in
    delta-export, a delta of the newest complete point's disks (a preview cannot know that a
    full will be needed); None in another mode."""
    if mode != DELTA_MODE:
        return None
    last = next((chain_point(f) for f in reversed(list(folders))
                 if f.complete and f.mode == DELTA_MODE), None)
    return ChainPoint(None, when, True,
                      {device: last.name for device in (last.links or {})} if last else {})


class ChainPoint(typing.NamedTuple):
    """One backup folder of a retention group, as plan_chain_retention sees it."""
    name: str
    when: object                    # datetime, from the name
    complete: bool
    links: typing.Optional[dict]    # delta-export: {device: parent folder name or None}; else None


class ChainAction(typing.NamedTuple):
    """One step of retention: delete a folder, or merge its disks `devices` into `into` (the
    next point of their chains, which needs them; it takes their parent, None for a full),
    and delete it."""
    kind: str                       # "delete" or "merge"
    name: str
    into: typing.Optional[str] = None
    devices: typing.Tuple[str, ...] = ()
    then_delete: bool = True        # False while another merge still needs the folder

    def describe(self):
        """Return what the step does, in words."""
        if self.kind == "merge":
            return "%s (merged into %s: %s)" % (self.name, self.into, ", ".join(self.devices))
        return self.name


def plan_chain_retention(points, doomed):
    """Return the [ChainAction] that remove the folders `doomed` (retention's verdict) from
    `points` [ChainPoint], oldest first: a doomed folder a kept point's chain runs through is
    merged into the next point on that chain (never deleted while needed), any other is
    deleted. Pure.
    """
    doomed = set(doomed)
    by_name = {p.name: p for p in points}
    needed = set()                  # (folder, device) a kept point's chain runs through
    next_on_path = {}               # (folder, device) -> the child on that path
    for point in points:
        if point.name in doomed or not point.complete or not point.links:
            continue
        for device in point.links:
            child, parent = point.name, point.links[device]
            while parent in by_name and (parent, device) not in needed:
                up = by_name[parent]
                if not up.complete or not up.links or device not in up.links:
                    break
                needed.add((parent, device))
                next_on_path[(parent, device)] = child
                child, parent = parent, up.links[device]
    actions = []
    for point in sorted((by_name[n] for n in doomed), key=lambda p: (p.when, p.name)):
        into = {}
        for device in sorted(point.links or ()):
            if (point.name, device) in needed:
                into.setdefault(next_on_path[(point.name, device)], []).append(device)
        if not into:
            actions.append(ChainAction("delete", point.name))
        for n, (child, devices) in enumerate(sorted(into.items())):
            actions.append(ChainAction("merge", point.name, child, tuple(devices),
                                       n == len(into) - 1))
    return actions


# -- merging ---------------------------------------------------------------------------------
def _step(what):
    """Announce one change of a merge to MERGE_HOOKS."""
    for hook in MERGE_HOOKS:
        hook(what)


def read_journal(vm_dir):
    """Return the merge journal of a VM folder as a dict, or None."""
    try:
        with open(os.path.join(vm_dir, MERGE_JOURNAL), encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ChainBroken("%s: the merge journal does not parse: %s"
                          % (os.path.join(vm_dir, MERGE_JOURNAL), exc))


def _write_journal(vm_dir, journal):
    """Write the journal atomically: from now on the merge is finished, never undone."""
    path = os.path.join(vm_dir, MERGE_JOURNAL)
    _step("journal")
    with open(path + ".part", "w", encoding="utf-8") as handle:
        json.dump(journal, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(path + ".part", path)
    fsync_dir(vm_dir)


def plan_merge(vm_dir, name, into, devices):
    """Return the journal of merging the disks `devices` of point `name` into point `into`;
    raise ChainBroken if they do not form a sound link (nothing is changed)."""
    base, child = (read_backup_folder(inside(vm_dir, n)) for n in (name, into))
    base_links, child_links = chain_links(base), chain_links(child)
    disks = []
    for device in devices:
        low, high = base_links.get(device), child_links.get(device)
        if low is None or high is None or not high.parent \
                or high.parent.get("backup") != name or high.parent.get("file") != low.file:
            raise ChainBroken("cannot merge disk %s of %s into %s: %s is not its parent"
                              % (device, name, into, name))
        full_path, delta_path = inside(base.path, low.file), inside(child.path, high.file)
        try:
            full, delta = read_vhd_layout(full_path), read_vhd_layout(delta_path)
        except (BadFile, OSError) as exc:
            raise ChainBroken("cannot merge disk %s of %s into %s: %s" % (device, name, into, exc))
        kind = VHD_DYNAMIC if low.parent is None else VHD_DIFFERENCING
        if full.disk_type != kind or delta.disk_type != VHD_DIFFERENCING \
                or delta.parent_uuid != full.uuid or delta.size != full.size \
                or delta.uuid != high.vhd_uuid:
            raise ChainBroken("cannot merge disk %s of %s into %s: the VHD files do not link "
                              "(%s is not the parent of %s)" % (device, name, into, full_path,
                                                                  delta_path))
        if sha256_file(delta_path) != high.sha256:
            raise ChainBroken("cannot merge disk %s of %s into %s: %s changed since the backup "
                              "(sha256 mismatch)" % (device, name, into, delta_path))
        new_blocks = [i for i, at in enumerate(delta.bat)
                      if at is not None and full.bat[i] is None]
        absorbed = next((d.get("chain", {}).get("merged") for d in base.manifest["disks"]
                         if d.get("device") == device), None) or []
        disks.append({"device": device, "merged": sorted(set(absorbed) | {name}),
                      "disk_type": kind, "parent": low.parent,
                      "from_file": low.file, "into_file": high.file,
                      "uuid": delta.uuid, "size": full.size, "data_end": full.footer_at,
                      "timestamp": delta.timestamp, "new_blocks": new_blocks})
    return {"format": 1, "from": name, "into": into, "disks": disks}


def merge_points(store, vm_folder, name, into, devices, vlog=None, delete=True):
    """Merge the disks `devices` of point `name` into point `into` (their next delta), which
    takes their parent (a full: becomes the base), then (if `delete`) delete `name`;
    crash-safe (see the module)."""
    vm_dir = inside(store.root, vm_folder)
    pending = read_journal(vm_dir)
    if pending:
        raise ChainBroken("cannot merge %s into %s: the merge of %s into %s is not finished"
                          % (name, into, pending.get("from"), pending.get("into")))
    journal = plan_merge(vm_dir, name, into, devices)
    journal["delete"] = delete
    _write_journal(vm_dir, journal)
    _carry_out(store, vm_dir, journal)
    (vlog or log).info("retention: merged %s into %s (%s)", name, into, ", ".join(devices))


def finish_merges(store, vm_folder, vlog=None):
    """Finish the merge a kill interrupted in a VM's folder (its journal says what is left);
    return the names of the points merged ([] if none was pending)."""
    vm_dir = inside(store.root, vm_folder)
    if os.path.lexists(os.path.join(vm_dir, MERGE_JOURNAL + ".part")):
        os.unlink(os.path.join(vm_dir, MERGE_JOURNAL + ".part"))     # never started
    journal = read_journal(vm_dir) if os.path.isdir(vm_dir) else None
    if not journal:
        return []
    _carry_out(store, vm_dir, journal)
    (vlog or log).info("retention: finished merging %s into %s (an earlier merge was "
                       "interrupted)", journal["from"], journal["into"])
    return [journal["from"]]


def _carry_out(store, vm_dir, journal):
    """Do every step of a journaled merge that is not done yet; each can be done again."""
    base_dir, into_dir = inside(vm_dir, journal["from"]), inside(vm_dir, journal["into"])
    for disk in journal["disks"]:
        full_path = os.path.join(base_dir, disk["from_file"])
        delta_path = os.path.join(into_dir, disk["into_file"])
        if os.path.exists(full_path):
            _patch_full(full_path, delta_path, disk)
            _step("rename")
            os.replace(full_path, delta_path)
            fsync_dir(into_dir)
            fsync_dir(base_dir)
        else:
            try:
                done = read_vhd_layout(delta_path)
            except (BadFile, OSError) as exc:
                raise ChainBroken("merge of %s into %s: %s" % (journal["from"], journal["into"], exc))
            if done.disk_type != disk["disk_type"] or done.uuid != disk["uuid"]:
                raise ChainBroken("merge of %s into %s: %s is gone and %s is not the merged full"
                                  % (journal["from"], journal["into"], full_path, delta_path))
    _rewrite_manifests(store, vm_dir, journal)
    if journal.get("delete", True) and os.path.isdir(base_dir):
        _step("delete")
        store.delete(base_dir)
    store.finish_deletes(os.path.basename(vm_dir))
    _step("forget")
    os.unlink(os.path.join(vm_dir, MERGE_JOURNAL))
    fsync_dir(vm_dir)


def _patch_full(full_path, delta_path, disk):
    """Write the delta's sectors into the older file (the full, or a delta GFS dropped) in
    place, new blocks where the journal says, then its BAT and both footers with the delta's
    uid: the older file becomes the merged point. Every write can be done again."""
    span = BITMAP_BYTES + VHD_BLOCK
    new_at = {b: disk["data_end"] + k * span for k, b in enumerate(disk["new_blocks"])}
    delta = read_vhd_layout(delta_path)
    with open(full_path, "r+b") as full, open(delta_path, "rb") as source:
        full.seek(512)                  # this tool's VHDs: the header follows the footer copy
        header = full.read(1024)
        table_offset, _, entries = struct.unpack_from(">QII", header, 16)
        full.seek(table_offset)
        bat = list(struct.unpack(">%dI" % entries, full.read(entries * 4)))
        for index, at in enumerate(delta.bat):
            if at is None:
                continue
            source.seek(at)
            mask = bitmap_mask(source.read(BITMAP_BYTES))
            if index in new_at:
                # appended past the old end of the file: what is not written reads as zero
                where, have = new_at[index], 0
                bat[index] = where // SECTOR
            elif bat[index] == 0xFFFFFFFF:
                raise ChainBroken("merge into %s: block %d is neither in the full nor planned"
                                  % (full_path, index))
            else:
                where = bat[index] * SECTOR
                full.seek(where)
                have = bitmap_mask(full.read(BITMAP_BYTES))
            _step("block")
            for first, end in sector_runs(mask):
                source.seek(at + BITMAP_BYTES + first * SECTOR)
                full.seek(where + BITMAP_BYTES + first * SECTOR)
                full.write(source.read((end - first) * SECTOR))
            full.seek(where)
            full.write(mask_bitmap(have | mask))
        _step("bat")
        full.seek(table_offset)
        full.write(struct.pack(">%dI" % entries, *bat))
        footer = vhd_footer_bytes(disk["size"], disk["disk_type"],
                                  uuidlib.UUID(disk["uuid"]).bytes, disk["timestamp"])
        end = disk["data_end"] + len(new_at) * span
        _step("footer")
        full.seek(end)
        full.write(footer)
        full.truncate(end + SECTOR)
        full.flush()
        os.fsync(full.fileno())
        full.seek(0)
        full.write(footer)
        full.flush()
        os.fsync(full.fileno())


def _rewrite_manifests(store, vm_dir, journal):
    """Give `into`'s merged disks the parent of `from` in its manifest (None: it is the
    chain's base), with the new sha256 and size of their files, and give its children
    that sha256 for their parent."""
    into = read_backup_folder(inside(vm_dir, journal["into"]))
    manifest = into.manifest
    merged = {d["into_file"]: d for d in journal["disks"]}
    digests = {}
    for entry in manifest["files"]:
        if entry.get("name") in merged:
            path = inside(into.path, entry["name"])
            digests[entry["name"]] = entry["sha256"] = sha256_file(path)
            entry["size"] = os.path.getsize(path)
    for disk in manifest.get("disks", ()):
        if disk.get("file") in merged:
            chain = disk["chain"]
            chain["parent"] = merged[disk["file"]]["parent"]
            chain["merged"] = merged[disk["file"]]["merged"]
    _step("manifest")
    store.write_file(into.path, MANIFEST, manifest_text(manifest))
    for name in sorted(os.listdir(vm_dir)):
        if name in (journal["into"], journal["from"]) or not name.startswith("backup-"):
            continue
        try:
            folder = read_backup_folder(inside(vm_dir, name))
        except OSError:
            continue
        changed = False
        for disk in (folder.manifest or {}).get("disks", ()):
            parent = (disk.get("chain") or {}).get("parent") if isinstance(disk, dict) else None
            if parent and parent.get("backup") == journal["into"] and parent.get("file") in digests \
                    and parent.get("sha256") != digests[parent["file"]]:
                parent["sha256"] = digests[parent["file"]]
                changed = True
        if changed:
            _step("manifest")
            store.write_file(folder.path, MANIFEST, manifest_text(folder.manifest))
