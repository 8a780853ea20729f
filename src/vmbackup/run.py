"""The whole backup run, as a list of named steps; and the preview.

Owns: run_backup, back_up_everything, select_for_run, preview.
Imports: everything below it.
"""

import datetime
import os
import sys

from vmbackup.backup import Context, backup_hosts, backup_pool_db, backup_vm_safely, run_note
from vmbackup.errors import EXIT_ERROR, EXIT_OK, EXIT_WARNING, PROG, log
from vmbackup.leftovers import PoolBeat, clean_leftovers
from vmbackup.report import (
    RunProblems, StatusLog, VmResult, exit_code_for, format_preview, preview_data,
    run_summary, tally, write_json)
from vmbackup.selection import plan_vm, read_pool, select_vms
from vmbackup.store import RunLock, check_backup_dir, check_backup_dir_readonly, log_df
from vmbackup.transport.choose import make_transport
from vmbackup.xapi import login


def preview(config, endpoint, password, json_target=None):
    """Print what a run would do; return EXIT_OK if it would start, else EXIT_ERROR."""
    problems = check_backup_dir_readonly(config)
    xapi = login(endpoint, config.username, password)
    try:
        view = read_pool(xapi)
    finally:
        xapi.logout()
    selection = select_vms(view.vms, config.selectors, config.max_backups)
    plans = [plan_vm(vm, view) for vm in selection.vms]
    data = preview_data(config, selection, plans, problems)
    if json_target:
        write_json(json_target, data)
    if json_target != "-":
        sys.stdout.write(format_preview(data, config))
    return EXIT_ERROR if data["status"] == "error" else EXIT_OK


def select_for_run(config, view):
    """Return the Selection for a run (metadata_only turns every VM into meta-export)."""
    selection = select_vms(view.vms, config.selectors, config.max_backups)
    if config.metadata_only:
        selection = selection._replace(vms=[vm._replace(mode="meta-export") for vm in selection.vms])
    return selection


def run_backup(config, endpoint, password, inv):
    """The run: check, lock, log in, clean leftovers, back up each VM, pool, hosts, report."""
    started = datetime.datetime.now().replace(microsecond=0)
    problems = RunProblems()
    log.addHandler(problems)
    try:
        check_backup_dir(config)
        status_log = StatusLog(config.status_log, config.where("status_log"))
        results, selection = [], None
        old_umask = os.umask(config.umask)
        try:
            with RunLock(config.backup_dir):
                status_log.line(PROG, "begin")
                code = EXIT_ERROR  # until the run gets through: a login error, a signal...
                try:
                    results, selection = back_up_everything(config, endpoint, password, status_log,
                                                            started)
                    code = exit_code_for(results, problems.warnings, problems.errors)
                finally:
                    word = {EXIT_OK: "SUCCESS", EXIT_WARNING: "WARNING"}.get(code, "ERROR")
                    status_log.line(PROG, "end", word, tally(results, problems.warnings))
        finally:
            os.umask(old_umask)
        log_df(config.backup_dir, "after")
        log.info("done: %s, exit %d", tally(results, problems.warnings), code)
    finally:
        log.removeHandler(problems)
    if inv.json:
        write_json(inv.json, run_summary(config, selection, results, problems.warnings, started, code))
    return code


def back_up_everything(config, endpoint, password, status_log, started):
    """Log in, clean leftovers, back up each selected VM, the pool and the hosts; return (results, selection)."""
    xapi = login(endpoint, config.username, password)
    try:
        transport = make_transport(config, xapi, password)
        beat = PoolBeat(xapi, run_note())   # any host can tell this run lives
        try:
            beat.start()
            view = read_pool(xapi)
            ctx = Context(config, transport, view, beat.note)
            clean_leftovers(ctx)
            selection = select_for_run(config, view)
            for warning in selection.warnings:
                log.warning("%s", warning)
            results = [VmResult("selection", "", "-", "error", message=e) for e in selection.errors]
            for message in selection.errors:
                log.error("%s", message, extra={"vm": "selection"})
            log.info("%d VMs selected, transport %s", len(selection.vms), transport.name)
            for vm in selection.vms:
                results.append(backup_vm_safely(ctx, plan_vm(vm, view), status_log))
            if config.pool_db_backup:
                results.append(backup_pool_db(ctx, started))
            if config.host_backup:
                results.extend(backup_hosts(ctx, started))
            return results, selection
        finally:
            beat.stop()
            transport.close()
    finally:
        xapi.logout()
