"""Which old backups to delete, as a pure decision, and deleting them through the Store.

Owns: plan_retention (pure, table-tested), retention_group and owned_by (which folders
one VM's retention may count and delete), retention_steps (chains: merge, never delete what
a kept point needs), prune_vm_backups, prune_dated_files.
Imports: errors, store, chain.
"""

import os

from vmbackup.chain import chain_point, finish_merges, merge_points, plan_chain_retention
from vmbackup.errors import ChainBroken, log
from vmbackup.store import SUCCESS_MARKER, parse_dated_file


def retention_group(mode):
    """Return which backups count together: "metadata" for meta-export, "data" for every mode
    with disk data (vm-export and vdi-export count together, as NAUbackup's did), None if unknown."""
    if mode is None:
        return None
    return "metadata" if mode == "meta-export" else "data"


def in_retention(folder, mode, uuid):
    """Return True if `folder` (a BackupFolder) is among the backups the retention of VM
    `uuid` in `mode` may count and delete (pure).

    Never a folder whose manifest names another VM (two VMs whose names map to one
    folder), nor one of the other group (metadata-only vs data); a legacy folder counts
    for its mode; an unfinished folder (no manifest, no success) may go; a vmbackup
    folder with `success` but no manifest (damaged) is never counted nor deleted.
    """
    same = mode is None or retention_group(folder.mode) == retention_group(mode)
    if folder.manifest is not None:
        owner = (folder.manifest.get("vm") or {}).get("uuid")
        return same and (uuid is None or owner in (None, uuid))
    if folder.legacy:
        return same
    return not folder.complete and SUCCESS_MARKER not in folder.entries and not folder.manifest_error


def plan_retention(entries, keep, drop_incomplete=True):
    """Return the names to delete from `entries` [(name, datetime, complete)], newest kept.

    The `keep` newest complete backups stay; older complete ones go; incomplete
    ones go when `drop_incomplete`. Never returns the newest complete backup.
    Pure: works from names and markers (store.is_complete), never from mtimes.
    """
    complete = sorted((e for e in entries if e[2]), key=lambda e: e[1], reverse=True)
    keep = max(1, keep)
    doomed = [name for name, _, _ in complete[keep:]]
    if drop_incomplete:
        doomed += [name for name, _, done in entries if not done]
    return sorted(doomed)


def retention_steps(folders, keep, drop_incomplete=True):
    """Return the chain.ChainAction steps (delete, or merge then delete) of retention over
    the BackupFolders of one group: plan_retention's verdict, with delta-export points a
    kept point needs merged into it instead of deleted (pure)."""
    doomed = plan_retention([(f.name, f.when, f.complete) for f in folders], keep,
                            drop_incomplete)
    return plan_chain_retention([chain_point(f) for f in folders], doomed)


def prune_vm_backups(store, vm, keep, drop_incomplete=True, vlog=None, mode=None, uuid=None):
    """Delete what plan_retention says among the backups of VM `uuid` in `mode` filed under
    the folder `vm` of `store` (in_retention), merging delta-export points a kept point
    needs (retention_steps); return the names deleted."""
    vlog = vlog or log
    for name in store.finish_deletes(vm):
        vlog.info("retention: finished deleting %s (an earlier delete was interrupted)", name)
    finish_merges(store, vm, vlog)
    folders = {f.name: f for f in store.backups(vm) if in_retention(f, mode, uuid)}
    doomed = []
    for step in retention_steps(list(folders.values()), keep, drop_incomplete):
        name = step.name
        if step.kind == "merge":
            try:
                merge_points(store, vm, name, step.into, step.devices, vlog)
            except ChainBroken as exc:
                vlog.warning("retention: %s is kept: %s", name, exc)
                continue
            doomed.append(name)
            continue
        doomed.append(name)
        if folders[name].complete:
            vlog.info("retention: deleting %s", name)
        else:
            # housekeeping: the run that left it already reported its failure
            vlog.info("deleting incomplete backup %s (no success marker)", name)
        store.delete(folders[name].path)
    return doomed


def prune_dated_files(store, folder, keep):
    """Delete the oldest pool_db_/host_ files in `store`'s `folder` beyond `keep`; return their names."""
    paths = {os.path.basename(p): p for p in store.dated_files(folder)}
    doomed = plan_retention([(n, parse_dated_file(n), True) for n in paths], keep)
    for name in doomed:
        log.info("retention: deleting %s", os.path.join(folder, name))
        store.delete(paths[name])
    return doomed
