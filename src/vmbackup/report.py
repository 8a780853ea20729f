"""The run's outcome and everything that prints it: results, tallies, exit code, summary, preview, JSON.

Owns: VmResult, RunProblems, StatusLog, exit_code_for, tally, run_summary,
settings_summary, preview_data/format_preview, write_json, setup_logging.
Imports: errors, util, config.
"""

import collections
import datetime
import json
import logging
import os
import socket
import sys
import typing

from vmbackup import __version__
from vmbackup.config import SETTINGS
from vmbackup.errors import BackupDirError, EXIT_ERROR, EXIT_OK, EXIT_WARNING, log
from vmbackup.util import printable


def settings_summary(config):
    """Return [(key, shown value, origin)] of the effective settings (no secrets)."""
    rows = []
    for key in SETTINGS:
        value = getattr(config, key)
        if key == "umask":
            value = "%03o" % value
        rows.append((key, value, config.where(key)))
    return rows


def preview_data(config, selection, plans, problems):
    """Return the preview as a JSON-ready dict."""
    errors = list(problems) + list(selection.errors)
    for plan in plans:
        errors.extend(plan.problems)
    return {
        "preview": True,
        "version": __version__,
        "status": "error" if errors else ("warning" if selection.warnings else "ok"),
        "settings": {key: value for key, value, _ in settings_summary(config)},
        "vms": [{"name": p.vm.name, "uuid": p.vm.uuid, "mode": p.vm.mode,
                 "max_backups": p.vm.max_backups,
                 "disks": [d.device for d in p.disks],
                 "skipped_disks": [d.device for d in p.skipped],
                 "selector": p.vm.selector.text, "origin": p.vm.selector.origin}
                for p in plans],
        "excluded": [{"name": n, "uuid": u} for n, u in selection.excluded],
        "not_selected": [{"name": n, "uuid": u} for n, u in selection.not_selected],
        "warnings": list(selection.warnings),
        "errors": errors,
    }


def format_preview(data, config):
    """Return the human preview text for `data` (from preview_data)."""
    out = ["vmbackup %s preview: nothing is snapshotted, exported or deleted." % __version__, "",
           "Settings:"]
    for key, value, origin in settings_summary(config):
        out.append("  %-18s %-28s (%s)" % (key, "-" if value is None else value, origin))
    out.append("")
    out.append("Selected VMs (%d):" % len(data["vms"]))
    for vm in data["vms"]:
        disks = ", ".join(vm["disks"]) or "-"
        if vm["skipped_disks"]:
            disks += "  (left out, [NOBAK]: %s)" % ", ".join(vm["skipped_disks"])
        out.append("  %-24s %-11s max_backups=%-3d disks: %s  [%s]"
                   % (printable(vm["name"]), vm["mode"], vm["max_backups"], disks, vm["uuid"]))
    for title, key in (("Excluded", "excluded"), ("Not selected", "not_selected")):
        out.append("%s (%d):" % (title, len(data[key])))
        out.extend("  %-24s [%s]" % (printable(v["name"]), v["uuid"]) for v in data[key])
    for warning in data["warnings"]:
        out.append("***WARNING - " + warning)
    for error in data["errors"]:
        out.append("***ERROR - " + error)
    verdict = {"ok": "valid", "warning": "valid, with warnings",
               "error": "INVALID: the run would not start"}[data["status"]]
    out.append("Preview %s: %d VMs selected, %d warnings, %d errors."
               % (verdict, len(data["vms"]), len(data["warnings"]), len(data["errors"])))
    return "\n".join(out) + "\n"


def write_json(target, data):
    """Write `data` as JSON to the file `target` ('-': stdout)."""
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        with open(target, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        raise BackupDirError("cannot write --json file %s: %s" % (target, exc.strerror))


class VmResult(typing.NamedTuple):
    """The outcome of one unit of work (a VM, the pool database, a host)."""
    name: str
    uuid: str
    mode: str
    status: str                 # success, warning or error
    path: typing.Optional[str] = None
    bytes: int = 0
    seconds: float = 0.0
    message: str = ""


class RunProblems(logging.Handler):
    """Collects the run's own warnings and errors (not a VM's: those are in its result)."""

    def __init__(self):
        logging.Handler.__init__(self, logging.WARNING)
        self.warnings, self.errors = [], []

    def emit(self, record):
        if getattr(record, "vm", None) is None:
            (self.errors if record.levelno >= logging.ERROR else self.warnings).append(
                record.getMessage())


class StatusLog:
    """NAUbackup's status log: `YYYY/MM/DD HH:MM:SS,<what>,<host>,<fields...>` lines, appended."""

    def __init__(self, path, origin="default"):
        self.path = path
        self.host = socket.gethostname()
        if path and origin.startswith("default") and not os.path.isdir(os.path.dirname(path) or "."):
            log.info("status log %s not written: its folder does not exist", path)
            self.path = None

    def line(self, what, *fields):
        if not self.path:
            return
        text = ",".join([datetime.datetime.now().strftime("%Y/%m/%d %H:%M:%S"), what, self.host]
                        + [str(f) for f in fields])
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(text + "\n")
        except OSError as exc:
            log.warning("cannot append to status log %s: %s", self.path, exc.strerror)
            self.path = None


def exit_code_for(results, warnings=(), errors=()):
    """Return the run's exit code: the most severe of its results and problems (borg's max_ec)."""
    statuses = {r.status for r in results}
    if "error" in statuses or errors:
        return EXIT_ERROR
    if "warning" in statuses or warnings:
        return EXIT_WARNING
    return EXIT_OK


def tally(results, warnings=()):
    """Return 'S:n W:n E:n' for the summary line and the status log."""
    count = collections.Counter(r.status for r in results)
    return "S:%d W:%d E:%d" % (count["success"], count["warning"] + len(warnings), count["error"])


def run_summary(config, selection, results, warnings, started, code):
    """Return the JSON summary of a run."""
    return {
        "preview": False, "version": __version__,
        "status": {EXIT_OK: "ok", EXIT_WARNING: "warning"}.get(code, "error"),
        "exit_code": code, "started": started.isoformat(),
        "finished": datetime.datetime.now().isoformat(),
        "settings": {key: value for key, value, _ in settings_summary(config)},
        "vms": [{"name": r.name, "uuid": r.uuid, "mode": r.mode, "status": r.status,
                 "path": r.path, "bytes": r.bytes, "seconds": round(r.seconds, 3),
                 "message": r.message} for r in results],
        "excluded": [{"name": n, "uuid": u} for n, u in (selection.excluded if selection else [])],
        "not_selected": [{"name": n, "uuid": u} for n, u in
                         (selection.not_selected if selection else [])],
        "warnings": list(warnings),
        "errors": [r.message for r in results if r.status == "error"],
        "summary": tally(results, warnings),
    }


def setup_logging(verbosity):
    """Send log lines to stderr: warnings and up with -q, debug with -vv."""
    level = {-2: logging.ERROR, -1: logging.WARNING, 0: logging.INFO}.get(
        max(-2, min(verbosity, 0)), logging.INFO)
    if verbosity >= 2:
        level = logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                           "%Y-%m-%d %H:%M:%S"))
    for old in [h for h in log.handlers if getattr(h, "_vmbackup_console", False)]:
        log.removeHandler(old)
    handler._vmbackup_console = True
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    handler.setLevel(level)
    log.propagate = False
