"""The run as Prometheus metrics: a textfile for node_exporter's textfile collector.

Owns: escape_label, History and backup_history (what backup_dir says of a unit's last
good backup), metrics_text (pure: an Outcome and histories -> the exposition text),
write_metrics (temp + rename).

The run's figures (start, end, exit code, S/W/E, each unit's status, size and time) are
read from the run's Outcome; "last successful backup" and "backups kept" are read from
the backup folders themselves (complete folders, their manifests), so they survive a
run in which the VM failed, a lost metrics file, and runs of other config files.
Imports: errors, util, store, report.
"""

import datetime
import os
import time
import typing

from vmbackup.errors import VmBackupError, log
from vmbackup.report import exit_code_for, tally
from vmbackup.store import LocalStore, parse_dated_file, safe_dirname
from vmbackup.util import partial_file, printable


STATUS_CODES = {"success": 0, "warning": 1, "error": 2}


def escape_label(value):
    r"""Return a label value escaped for the text format: backslash, double quote, newline.

    >>> escape_label('quote\'s "double"\nback\\slash')
    'quote\'s \\"double\\"\\nback\\\\slash'
    """
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def labels(**pairs):
    """Return '{a="x",b="y"}' (sorted by name) for the non-None pairs."""
    return "{%s}" % ",".join('%s="%s"' % (k, escape_label(v))
                             for k, v in sorted(pairs.items()) if v is not None)


def epoch(moment):
    """Return the Unix time of a naive local datetime."""
    return time.mktime(moment.timetuple()) + moment.microsecond / 1e6


def local_time(text):
    """Return the naive datetime of a manifest's ISO time ('2026-12-06T13:05:01.123'), or None."""
    text = str(text)
    try:
        return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f" if "." in text
                                          else "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return None


class History(typing.NamedTuple):
    """What backup_dir says of one unit: its last complete backup, and how many are kept."""
    last_success: typing.Optional[float] = None    # Unix time it finished
    size: int = 0                                   # its bytes
    seconds: typing.Optional[float] = None          # how long it took (vmbackup's manifest)
    kept: int = 0                                   # complete backups of this mode


def vm_history(store, result):
    """Return the History of a VM result's folder: complete backups of its mode (and uuid)."""
    mine = [f for f in store.backups(safe_dirname(result.name))
            if f.complete and f.mode == result.mode
            and ((f.manifest or {}).get("vm") or {}).get("uuid", result.uuid) == result.uuid]
    if not mine:
        return History()
    last = mine[-1]
    manifest = last.manifest or {}
    started, finished = local_time(manifest.get("started")), local_time(manifest.get("finished"))
    when = finished or last.when
    return History(epoch(when) if when else None, store.usage(last.path)[1],
                   (finished - started).total_seconds() if started and finished else None,
                   len(mine))


def dated_history(store, prefix):
    """Return the History of the pool_db_/host_ files in the folders starting `prefix`."""
    found = [(parse_dated_file(os.path.basename(p)), p) for folder in store.vm_folders()
             if folder.startswith(prefix) for p in store.dated_files(folder)]
    if not found:
        return History()
    when, path = max(found)
    kept = len([p for p in found if os.path.dirname(p[1]) == os.path.dirname(path)])
    return History(epoch(when), os.path.getsize(path), None, kept)


def backup_history(config, outcome):
    """Return {unit name: History} for every unit of the Outcome, read from backup_dir."""
    store, found = LocalStore(config.backup_dir), {}
    if not os.path.isdir(config.backup_dir):
        return found
    for result in outcome.results:
        try:
            if result.mode != "pool":
                found[result.name] = vm_history(store, result)
            elif result.name == "pool database":
                found[result.name] = dated_history(store, "METADATA_")
            else:
                host = result.name[len("host backup of "):]
                found[result.name] = dated_history(store, safe_dirname("HOST_" + host))
        except (OSError, VmBackupError) as exc:  # unreadable folder: no history
            log.debug("metrics: cannot read the backups of %s: %s", printable(result.name), exc)
    return found


class Family:
    """One metric family: HELP, TYPE gauge and its samples."""

    def __init__(self, name, text):
        self.name, self.text, self.samples = name, text, []

    def add(self, value, **pairs):
        if value is not None:
            self.samples.append("%s%s %s" % (self.name, labels(**pairs) if pairs else "",
                                              format_value(value)))

    def lines(self):
        if not self.samples:
            return []
        return (["# HELP %s %s" % (self.name, self.text), "# TYPE %s gauge" % self.name]
                + self.samples)


def format_value(value):
    """Return a sample value: integers as integers, else repr of the float."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int) or float(value).is_integer():
        return "%d" % value
    return repr(float(value))


def metrics_text(outcome, history, job=""):
    """Return the textfile of a run: the run's figures, then each unit's, grouped by family.

    `history` is backup_history's {unit name: History}; `job` (the config file's name) is
    the `config` label of every sample, so the runs of several config files can share a
    collector (`job` itself is Prometheus's own target label).
    """
    code, counts = exit_code_for(outcome), tally(outcome)
    run = [
        Family("vmbackup_last_run_start_timestamp_seconds", "When the last run started."),
        Family("vmbackup_last_run_end_timestamp_seconds", "When the last run ended."),
        Family("vmbackup_last_run_exit_code",
               "Exit code of the last run: 0 ok, 1 warnings, 2 failures."),
        Family("vmbackup_last_run_succeeded", "Units (VMs, pool database, hosts) that succeeded "
                                              "in the last run (S)."),
        Family("vmbackup_last_run_warnings", "Warnings of the last run (W)."),
        Family("vmbackup_last_run_errors", "Failures of the last run (E)."),
    ]
    for family, value in zip(run, (epoch(outcome.started), epoch(outcome.finished), code)
                             + tuple(counts)):
        family.add(value, config=job)
    vm = [
        Family("vmbackup_vm_last_run_status",
               "Status of the VM in the last run: 0 success, 1 warning, 2 error."),
        Family("vmbackup_vm_last_run_size_bytes", "Bytes exported for the VM in the last run."),
        Family("vmbackup_vm_last_run_duration_seconds", "Seconds the VM took in the last run."),
        Family("vmbackup_vm_last_success_timestamp_seconds",
               "When the VM's last complete backup of this mode finished (0: none in backup_dir)."),
        Family("vmbackup_vm_last_success_size_bytes", "Bytes of the VM's last complete backup."),
        Family("vmbackup_vm_last_success_duration_seconds",
               "Seconds the VM's last complete backup took."),
        Family("vmbackup_vm_backups_kept", "Complete backups of the VM (this mode) in backup_dir."),
    ]
    pool = [
        Family("vmbackup_pool_backup_last_run_status",
               "Status of the pool database or host backup in the last run: 0 success, 2 error."),
        Family("vmbackup_pool_backup_last_run_size_bytes",
               "Bytes of the pool database or host backup in the last run."),
        Family("vmbackup_pool_backup_last_run_duration_seconds",
               "Seconds the pool database or host backup took in the last run."),
        Family("vmbackup_pool_backup_last_success_timestamp_seconds",
               "When the last pool database or host backup in backup_dir was taken (0: none)."),
        Family("vmbackup_pool_backup_last_success_size_bytes",
               "Bytes of the last pool database or host backup in backup_dir."),
        Family("vmbackup_pool_backup_kept", "Pool database or host backups in backup_dir."),
    ]
    for result in outcome.results:
        past = history.get(result.name, History())
        if result.mode != "pool":
            key = dict(config=job, vm=result.name, uuid=result.uuid, mode=result.mode)
            values = (STATUS_CODES[result.status], result.bytes, result.seconds,
                      past.last_success or 0, past.size if past.kept else None, past.seconds,
                      past.kept)
            families = vm
        else:
            key = dict(config=job, unit=result.name)
            values = (STATUS_CODES[result.status], result.bytes, result.seconds,
                      past.last_success or 0, past.size if past.kept else None, past.kept)
            families = pool
        for family, value in zip(families, values):
            family.add(value, **key)
    out = []
    for family in run + vm + pool:
        out.extend(family.lines())
    return "\n".join(out) + "\n"


def write_metrics(path, text):
    """Write the textfile at `path` atomically (NAME.part, then rename), mode 0644."""
    with partial_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8", errors="backslashreplace") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
