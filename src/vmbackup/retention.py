"""Which old backups to delete, as a pure decision, and deleting them through the Store.

Owns: Keep and keep_for (how many backups a VM keeps: max_backups, and the GFS rules
keep_daily/weekly/monthly/yearly), gfs_kept and plan_retention (pure, table-tested),
retention_group and in_retention (which folders one VM's retention may count and delete),
plan_vm_retention (the one plan the run, pre_clean and --preview share), retention_steps
(delta-export chains: merge, never delete what a kept point needs), prune_vm_backups,
plan_dated_retention, prune_dated_files.
Imports: errors, store, chain.
"""

import os
import typing

from vmbackup.chain import chain_point, finish_merges, merge_points, plan_chain_retention
from vmbackup.errors import ChainBroken, log
from vmbackup.store import SUCCESS_MARKER, backup_vm_uuid, parse_dated_file


class Keep(typing.NamedTuple):
    """How many complete backups one VM keeps, as borg prune's rules: the `last` newest
    (max_backups), then the newest backup of each of `daily` more days, `weekly` more weeks,
    `monthly` more months and `yearly` more years (0: the rule is off; -1: no limit)."""
    last: int
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def __str__(self):
        """'4', or '4+7d+4w+12m+2y' as a selector's MAX field writes it."""
        gfs = "".join("+%d%s" % (n, unit) for n, unit in zip(self[1:], "dwmy") if n)
        return "%d%s" % (self.last, gfs)


#: The GFS rules in the order they apply, each with the period a backup's time falls in.
#: The times are the folder names' wall-clock local times (store.stamp), never converted:
#: a day is a calendar day of the host that made the backups, a DST change included;
#: weeks are ISO weeks, Monday to Sunday (31 Dec 2026 and 1 Jan 2027 share week 2026-W53).
GFS_PERIODS = (
    ("daily", lambda when: when.date()),
    ("weekly", lambda when: when.isocalendar()[:2]),
    ("monthly", lambda when: (when.year, when.month)),
    ("yearly", lambda when: when.year),
)


def keep_for(config, vm):
    """Return the Keep of a selected VM (selection.Selected): its max_backups, and the GFS
    rules its selector's MAX field gives ('web01:4+7d+4w'), else the keep_* settings."""
    gfs = vm.selector.gfs
    if gfs is None:
        gfs = (config.keep_daily, config.keep_weekly, config.keep_monthly, config.keep_yearly)
    return Keep(vm.max_backups, *gfs)


def gfs_kept(backups, keep):
    """Return {name: (rule, n)}: which of the complete `backups` [(name, datetime)] `keep`
    keeps, and the rule that keeps each (pure).

    borg prune's semantics: the rules apply in the order last, daily, weekly, monthly,
    yearly; each walks the backups newest first and, for each new period, keeps its newest
    backup unless an earlier rule already kept it, in which case the period is used up and
    does not count (keep_weekly=4 beside keep_daily=7 keeps 4 more weeks); a rule that runs
    out of backups before its count also keeps the oldest backup, so the first backup ages
    on until newer ones replace it. The newest backup is always kept.
    """
    newest_first = sorted(backups, key=lambda b: (b[1], b[0] is None, b[0] or ""), reverse=True)
    kept = {}
    rules = (("last", lambda when: object()),) + GFS_PERIODS
    for (rule, period_of), count in zip(rules, (max(1, keep.last),) + tuple(keep[1:])):
        if count == 0 or not newest_first:
            continue
        found, last_period = 0, None
        for name, when in newest_first:
            period = period_of(when)
            if period == last_period:
                continue
            last_period = period
            if name not in kept:
                found += 1
                kept[name] = (rule, found)
                if found == count:
                    break
        oldest = newest_first[-1][0]
        if 0 < count and found < count and oldest not in kept:
            kept[oldest] = (rule + " (oldest)", found + 1)
    return kept


def plan_retention(entries, keep, drop_incomplete=True):
    """Return the names to delete from `entries` [(name, datetime, complete)], newest kept.

    `keep` is a Keep, or a number (the newest backups kept: Keep(keep)). Complete
    backups that no rule keeps (gfs_kept) go; incomplete ones go when `drop_incomplete`.
    An entry named None stands for the backup a run is about to make (--preview,
    pre_clean): it is planned as complete, and never returned. Never returns the newest
    complete backup (with an entry named None, that is the run's own). Pure: works from
    names and markers (store.is_complete), never from mtimes.
    """
    keep = keep if isinstance(keep, Keep) else Keep(keep)
    kept = gfs_kept([(name, when) for name, when, done in entries if done], keep)
    doomed = [name for name, _, done in entries
              if name is not None and (not done and drop_incomplete or done and name not in kept)]
    return sorted(doomed)


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
        owner = backup_vm_uuid(folder)
        return same and (uuid is None or owner in (None, uuid))
    if folder.legacy:
        return same
    return not folder.complete and SUCCESS_MARKER not in folder.entries and not folder.manifest_error


def plan_vm_retention(folders, keep, mode=None, uuid=None, drop_incomplete=True, incoming=None):
    """Return the names plan_retention deletes among the BackupFolders `folders` that the
    retention of VM `uuid` in `mode` may count (in_retention) (pure): what a run deletes
    after its backup, pre_clean before it, and --preview lists."""
    entries = [(f.name, f.when, f.complete) for f in folders if in_retention(f, mode, uuid)]
    if incoming is not None:     # the backup the run makes: planned as done at `incoming`
        entries.append((None, incoming, True))
    return plan_retention(entries, keep, drop_incomplete)


def retention_steps(folders, doomed, mode=None, uuid=None, incoming=None):
    """Return the chain.ChainAction steps that delete `doomed` among the BackupFolders
    `folders` of VM `uuid` in `mode` (in_retention): a delta-export point that a kept point's
    chain (or the `incoming` ChainPoint's, the run's own) runs through is merged into the next
    point of that chain instead of deleted (pure)."""
    points = [chain_point(f) for f in folders if in_retention(f, mode, uuid)]
    return plan_chain_retention(points + ([incoming] if incoming else []), doomed)


def prune_vm_backups(store, vm, keep, drop_incomplete=True, vlog=None, mode=None, uuid=None,
                     incoming=None):
    """Delete what plan_vm_retention says among the backups of VM `uuid` in `mode` filed
    under the folder `vm` of `store`; return the names deleted. `keep`: a Keep or a number.

    With `incoming` (pre_clean, before the export) it deletes what retention will delete
    once the backup of that time is made, except the newest complete backup: the export
    may yet fail, and the last good backup always stays.
    """
    vlog = vlog or log
    for name in store.finish_deletes(vm):
        vlog.info("retention: finished deleting %s (an earlier delete was interrupted)", name)
    finish_merges(store, vm, vlog)
    folders = {f.name: f for f in store.backups(vm)}
    doomed = plan_vm_retention(folders.values(), keep, mode, uuid, drop_incomplete, incoming)
    if incoming is not None:
        good = [f for f in folders.values() if f.complete and in_retention(f, mode, uuid)]
        last_good = max(good, key=lambda f: f.when).name if good else None
        doomed = [name for name in doomed if name != last_good]
    deleted = []
    for step in retention_steps(folders.values(), doomed, mode, uuid):
        name = step.name
        if step.kind == "merge":
            try:
                merge_points(store, vm, name, step.into, step.devices, vlog, step.then_delete)
            except ChainBroken as exc:
                vlog.warning("retention: %s is kept: %s", name, exc)
                continue
            except OSError as exc:      # a full disk, say: the journal lets the next run finish
                vlog.warning("retention: merging %s into %s stopped (%s); the next run "
                             "finishes it", name, step.into, exc)
                break
            if step.then_delete:
                deleted.append(name)
            continue
        deleted.append(name)
        if folders[name].complete:
            vlog.info("retention: deleting %s", name)
        else:
            # housekeeping: the run that left it already reported its failure
            vlog.info("deleting incomplete backup %s (no success marker)", name)
        store.delete(folders[name].path)
    return deleted


def plan_dated_retention(names, keep, incoming=None):
    """Return the pool_db_/host_ file names to delete among `names`, the `keep` newest kept
    (pure); with `incoming`, a datetime, as if the file a run is about to write stood beside
    them (--preview)."""
    entries = [(name, parse_dated_file(name), True) for name in names]
    if incoming is not None:
        entries.append((None, incoming, True))
    return plan_retention(entries, keep)


def prune_dated_files(store, folder, keep):
    """Delete the oldest pool_db_/host_ files in `store`'s `folder` beyond `keep`; return their names."""
    paths = {os.path.basename(p): p for p in store.dated_files(folder)}
    doomed = plan_dated_retention(paths, keep)
    for name in doomed:
        log.info("retention: deleting %s", os.path.join(folder, name))
        store.delete(paths[name])
    return doomed
