"""The whole backup run, as a list of named steps; and the preview, the same run without side effects.

Owns: run_backup, back_up_everything, select_for_run, report_run, report_cannot_start,
preview (and what it plans: planned_deletions, planned_dated_deletions, planned_destroys).
Imports: everything below it.
"""

import contextlib
import datetime
import os
import sys

from vmbackup.backup import (
    Context, backup_hosts, backup_pool_db, estimate_size, host_folder, last_backup_bytes,
    pool_db_folder, run_note)
from vmbackup.errors import PROG, Terminated, VmBackupError, log
from vmbackup.delta import kept_reference
from vmbackup.jobs import back_up_vms
from vmbackup.leftovers import PoolBeat, chain_references, clean_leftovers, is_leftover
from vmbackup.notify import report_problems, send_reports
from vmbackup.report import (
    PreviewPlan, RunRecord, StatusLog, VmResult, exit_code_for, format_preview, preview_data,
    recap, run_summary, status_end_fields, tally, write_json)
from vmbackup.chain import incoming_point
from vmbackup.retention import keep_for, plan_dated_retention, plan_vm_retention, retention_steps
from vmbackup.selection import plan_vm, read_pool, select_vms, wanted_by
from vmbackup.store import (
    LocalStore, RunLock, check_backup_dir, check_backup_dir_readonly, check_space, log_df,
    safe_dirname)
from vmbackup.transport.choose import make_transport
from vmbackup.util import printable
from vmbackup.xapi import login


def run_backup(config, endpoint, password, inv):
    """The run: check, lock, log in, clean leftovers, back up each VM, pool, hosts, report.

    Returns the exit code of its Outcome; a run that cannot start reports too (status
    log, --json) and then raises its error, as a signal does.
    """
    record = RunRecord()
    status_log = StatusLog(config.status_log, config.where("status_log"), record.log)
    try:
        check_backup_dir(config)
        with umask(config.umask), RunLock(config.backup_dir):
            status_log.line(PROG, "begin")
            record.begun = True
            back_up_everything(config, endpoint, password, status_log, record)
    except VmBackupError as exc:
        record.cannot_start = str(exc)
        raise
    except Terminated as exc:
        record.terminated = exc.args[0] if exc.args else "a signal"
        exc.args = (record.terminated, record.terminated_note())
        raise
    except KeyboardInterrupt:
        record.terminated = "SIGINT"
        raise
    finally:
        report_run(config, record, status_log, inv.json)
    return exit_code_for(record.outcome())


@contextlib.contextmanager
def umask(mask):
    """Set the process umask for the block."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def back_up_everything(config, endpoint, password, status_log, record):
    """Log in, clean leftovers, back up each selected VM, the pool and the hosts into `record`."""
    xapi = login(endpoint, config.username, password)
    try:
        transport = make_transport(config, xapi, password)
        beat = PoolBeat(xapi, run_note())   # any host can tell this run lives
        try:
            beat.start()
            view = read_pool(xapi, wanted_by(config))
            record.pool = view.pool.get("name_label")
            ctx = Context(config, transport, view, beat.note, record)
            clean_leftovers(ctx)
            selection = select_for_run(config, view, record)
            log.info("%d VMs selected, transport %s", len(selection.vms), transport.name)
            back_up_vms(ctx, [plan_vm(vm, view) for vm in selection.vms], status_log,
                        record.results)
            if config.pool_db_backup:
                record.results.append(backup_pool_db(ctx, record.started))
            if config.host_backup:
                record.results.extend(backup_hosts(ctx, record.started))
        finally:
            beat.stop()
            transport.close()
    finally:
        xapi.logout()


def select_for_run(config, view, record):
    """Return the Selection (metadata_only turns every VM into meta-export); record its problems."""
    selection = select_vms(view.vms, config.selectors, config.max_backups, config.max_meta_backups)
    if config.metadata_only:   # counted apart from the data backups: max_meta_backups, keep_*
        keep = config.max_meta_backups or config.max_backups
        selection = selection._replace(vms=[vm if vm.mode == "meta-export" else vm._replace(
            mode="meta-export", max_backups=keep, selector=vm.selector._replace(gfs=None))
            for vm in selection.vms])
    record.selection = selection
    for warning in selection.warnings:
        record.log.warning("%s", warning)
    for message in selection.errors:
        record.log.error("%s", message)
    if not selection.vms and not selection.errors \
            and not config.pool_db_backup and not config.host_backup:
        record.log.warning("nothing to back up: %s", "every VM excluded" if selection.excluded
                           else "no VM selected")
    return selection


def report_run(config, record, status_log, json_target):
    """Print and write the run's Outcome: mail, metrics, status log `end`, summary, recap, --json."""
    send_reports(config, record)     # what cannot be sent is a warning of this run
    outcome = record.outcome()
    if not record.begun and status_log.folder_exists():
        status_log.line(PROG, "begin")      # a run that cannot start still leaves its pair
        record.begun = True
    if record.begun:
        status_log.line(PROG, *status_end_fields(outcome))
    if outcome.cannot_start is None:
        if os.path.isdir(config.backup_dir):
            log_df(config.backup_dir, "after")
        log.info("done: %s, exit %d", tally(outcome), exit_code_for(outcome))
        for line in recap(outcome):
            (log.error if line.startswith("FAILED") else log.warning)("recap: %s", line)
    if json_target:
        write_json(json_target, run_summary(config, record.outcome()))


def report_cannot_start(json_target, reason, config=None):
    """Write the --json of a run stopped before it began (a config error; with `config`,
    its settings read, also the status log's begin/end pair)."""
    record = RunRecord()
    record.cannot_start = reason
    if config is not None:
        report_run(config, record, StatusLog(config.status_log, config.where("status_log"),
                                             record.log), json_target)
    elif json_target:
        write_json(json_target, run_summary(None, record.outcome()))


# -- the preview: the same checks, nothing changed --------------------------------

def preview(config, endpoint, password, json_target=None):
    """Print what a run would do; return the exit code the run would have (0/1/2)."""
    record = RunRecord()
    found = PreviewPlan()
    try:
        problems = check_backup_dir_readonly(config)
        if problems:
            record.cannot_start = problems[0]
        else:
            check_space(config)
        found = preview_pool(config, endpoint, password, record)
    except VmBackupError as exc:
        record.cannot_start = record.cannot_start or str(exc)
    for problem in report_problems(config, exit_code_for(record.outcome())):
        record.log.warning("%s", problem)
    outcome = record.outcome()
    data = preview_data(config, outcome, found)
    if json_target:
        write_json(json_target, data)
    if json_target != "-":
        sys.stdout.write(format_preview(data, config))
    return exit_code_for(outcome)


def preview_pool(config, endpoint, password, record):
    """Log in, check the transport, read the pool, select and plan; return the PreviewPlan."""
    xapi = login(endpoint, config.username, password)
    try:
        make_transport(config, xapi, password).close()
        view = read_pool(xapi, wanted_by(config))
    finally:
        xapi.logout()
    selection = select_for_run(config, view, record)
    plans = [with_space_check(config, plan_vm(vm, view)) for vm in selection.vms]
    for plan in plans:
        vm = plan.vm
        record.results.append(VmResult(vm.name, vm.uuid, vm.mode,
                                       "error" if plan.problems else "success",
                                       message="; ".join(plan.problems)))
    if config.pool_db_backup:
        record.results.append(VmResult("pool database", "", "pool", "success"))
    if config.host_backup:
        record.results.extend(VmResult("host backup of %s" % (h.get("hostname") or ref), "",
                                       "pool", "success") for ref, h in view.hosts.items())
    deletions = () if record.cannot_start else \
        planned_deletions(config, plans) + planned_dated_deletions(config, view)
    keep = chain_references(Context(config, None, view, ""))
    return PreviewPlan(tuple(plans), deletions, planned_destroys(view, keep))


def with_space_check(config, plan):
    """Return `plan` with the run's refusal of its VM for space among its problems: the
    run checks backup_dir's free space against the VM's estimated size before its snapshot."""
    if plan.problems or not os.path.isdir(config.backup_dir):
        return plan
    previous = last_backup_bytes(LocalStore(config.backup_dir), safe_dirname(plan.vm.name),
                                 plan.vm.mode)
    try:
        check_space(config, estimate_size(plan, previous), "VM %s" % printable(plan.vm.name))
    except VmBackupError as exc:
        return plan._replace(problems=[str(exc)])
    return plan


def planned_deletions(config, plans, now=None):
    """Return [(VM folder, backup)] retention would delete after each plan's new backup
    (made `now`): the run's own plan (retention.plan_vm_retention), this VM's and mode's only;
    a delta-export point a kept point needs reads "NAME (merged into NEXT: DEVICES)"."""
    store, found = LocalStore(config.backup_dir), []
    now = now or datetime.datetime.now().replace(microsecond=0)
    for plan in plans:
        if plan.problems:
            continue
        vm, folder = plan.vm, safe_dirname(plan.vm.name)
        folders = store.backups(folder)
        doomed = plan_vm_retention(folders, keep_for(config, vm), vm.mode, vm.uuid, incoming=now)
        found.extend((folder, step.describe()) for step in retention_steps(
            folders, doomed, vm.mode, vm.uuid, incoming_point(folders, vm.mode, now)))
    return tuple(found)


def planned_dated_deletions(config, view, now=None):
    """Return [(folder, file name)] of the pool database dumps and host backups retention
    would delete after the run writes its own (retention.plan_dated_retention)."""
    store, found = LocalStore(config.backup_dir), []
    now = now or datetime.datetime.now().replace(microsecond=0)
    folders = [pool_db_folder(view)] if config.pool_db_backup else []
    if config.host_backup:
        folders += [host_folder(ref, host)[0] for ref, host in sorted(view.hosts.items())]
    for folder in map(safe_dirname, folders):
        names = [os.path.basename(p) for p in store.dated_files(folder)]
        found.extend((folder, name) for name in plan_dated_retention(names, config.max_backups, now))
    return tuple(found)


def planned_destroys(view, keep=None):
    """Return [(VM|VDI, name, uuid)] of the leftover snapshots the run would destroy (never
    the references the delta-export chains keep: `keep`, a ChainReferences)."""
    found = [("VM", rec.get("name_label", ""), rec.get("uuid", ""))
             for rec in view.vms.values() if is_leftover(rec)]
    found += [("VDI", rec.get("name_label", ""), rec.get("uuid", ""))
              for rec in view.vdis.values() if is_leftover(rec) and not rec.get("VBDs")
              and not (keep and kept_reference(rec, keep))]
    return tuple(sorted(found))
