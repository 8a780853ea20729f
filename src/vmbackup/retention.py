"""Which old backups to delete, as a pure decision, and deleting them.

Owns: plan_retention (pure, table-tested), prune_vm_backups, prune_dated_files.
Imports: errors, store.
"""

import os
import shutil

from vmbackup.errors import log
from vmbackup.store import inside, parse_dated_file, vm_backups


def plan_retention(entries, keep, drop_incomplete=True):
    """Return the names to delete from `entries` [(name, datetime, complete)], newest kept.

    The `keep` newest complete backups stay; older complete ones go; incomplete
    ones go when `drop_incomplete`. Never returns the newest complete backup.
    Pure: works from names and markers, never from mtimes.
    """
    complete = sorted((e for e in entries if e[2]), key=lambda e: e[1], reverse=True)
    keep = max(1, keep)
    doomed = [name for name, _, _ in complete[keep:]]
    if drop_incomplete:
        doomed += [name for name, _, done in entries if not done]
    return sorted(doomed)


def prune_vm_backups(vm_dir, keep, drop_incomplete=True, vlog=None):
    """Delete what plan_retention says in `vm_dir`; return the names deleted."""
    vlog = vlog or log
    entries = vm_backups(vm_dir)
    doomed = plan_retention(entries, keep, drop_incomplete)
    complete = {name for name, _, done in entries if done}
    for name in doomed:
        if name in complete:
            vlog.info("retention: deleting %s", name)
        else:
            vlog.warning("deleting incomplete backup %s (no success marker)", name)
        shutil.rmtree(inside(vm_dir, name), ignore_errors=False)
    return doomed


def prune_dated_files(folder, keep):
    """Delete the oldest pool_db_/host_ backup files in `folder` beyond `keep`; return them."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    entries = [(n, parse_dated_file(n), True) for n in names if parse_dated_file(n)]
    doomed = plan_retention(entries, keep)
    for name in doomed:
        log.info("retention: deleting %s", os.path.join(os.path.basename(folder), name))
        os.unlink(inside(folder, name))
    return doomed
