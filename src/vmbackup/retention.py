"""Which old backups to delete, as a pure decision, and deleting them through the Store.

Owns: plan_retention (pure, table-tested), prune_vm_backups, prune_dated_files.
Imports: errors, store.
"""

import os

from vmbackup.errors import log
from vmbackup.store import parse_dated_file


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


def prune_vm_backups(store, vm, keep, drop_incomplete=True, vlog=None):
    """Delete what plan_retention says among the backups of `vm` in `store`; return the names deleted."""
    vlog = vlog or log
    folders = {f.name: f for f in store.backups(vm)}
    doomed = plan_retention([(f.name, f.when, f.complete) for f in folders.values()], keep,
                            drop_incomplete)
    for name in doomed:
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
