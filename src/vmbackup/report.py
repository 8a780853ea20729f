"""The run's outcome and everything that prints it: results, tallies, exit code, summary, preview, JSON.

Owns: RunProblem, VmResult, Outcome (the one record of a run: every warning and error once,
attributed to its VM or to the run), UnitLog and RunRecord (what builds it), the pure
readers of an Outcome (tally, exit_code_for, status_word, recap, run_summary,
status_end_fields), StatusLog, settings_summary, preview_data/format_preview,
write_json, setup_logging. Nothing here infers anything from which logger a line
went through: the exit code, the tally, the status log and the JSON all read the
Outcome.
Imports: errors, util, config, retention.
"""

import datetime
import json
import logging
import os
import socket
import sys
import typing

from vmbackup import __version__
from vmbackup.config import SETTINGS
from vmbackup.errors import (
    BackupDirError, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_WARNING, log)
from vmbackup.retention import keep_for
from vmbackup.util import mask_credentials, printable


def settings_summary(config):
    """Return [(key, shown value, origin)] of the effective settings (no secrets)."""
    rows = []
    for key in SETTINGS:
        value = getattr(config, key)
        if key == "umask":
            value = "%03o" % value
        elif key == "server" and value:
            value = mask_credentials(value)
        rows.append((key, value, config.where(key)))
    return rows


# -- the outcome record ---------------------------------------------------------

class RunProblem(typing.NamedTuple):
    """One warning or error, attributed to a unit (a VM, 'pool database', ...) or to the run ('')."""
    severity: str               # warning or error
    unit: str                   # '' for the run itself
    message: str

    def __str__(self):
        return "%s: %s" % (printable(self.unit), self.message) if self.unit else self.message


class VmResult(typing.NamedTuple):
    """The outcome of one unit of work (a VM, the pool database, a host)."""
    name: str
    uuid: str
    mode: str
    status: str                 # success, warning or error
    path: typing.Optional[str] = None
    bytes: int = 0
    seconds: float = 0.0
    message: str = ""           # the error (error); the warnings joined (warning)
    warnings: typing.Tuple[str, ...] = ()

    def problems(self):
        """Return this unit's Problems: each warning, then its failure."""
        found = [RunProblem("warning", self.name, w) for w in self.warnings]
        if self.status == "error":
            found.append(RunProblem("error", self.name, self.message))
        return found


class Outcome(typing.NamedTuple):
    """The one record of a run (or of a preview): what every printer of it reads."""
    started: datetime.datetime
    finished: datetime.datetime
    results: typing.Tuple[VmResult, ...] = ()
    problems: typing.Tuple[RunProblem, ...] = ()       # the run's own, in the order met
    excluded: typing.Tuple[typing.Tuple[str, str], ...] = ()
    not_selected: typing.Tuple[typing.Tuple[str, str], ...] = ()
    cannot_start: typing.Optional[str] = None        # why the run never got going
    terminated: typing.Optional[str] = None          # the signal that stopped it

    def all_problems(self):
        """Return every RunProblem of the run: the units' in their order, then the run's."""
        found = [p for r in self.results for p in r.problems()] + list(self.problems)
        if self.cannot_start:
            found.append(RunProblem("error", "", self.cannot_start))
        if self.terminated:
            found.append(RunProblem("error", "", "terminated by %s" % self.terminated))
        return found


class Tally(typing.NamedTuple):
    """S: units that succeeded (with or without warnings); W: warnings; E: failures.

    The run's own problems count too: its warnings in W, its errors (a leftover that
    cannot be destroyed, a duplicate VM name, a run that cannot start or is
    terminated) in E.
    """
    succeeded: int
    warnings: int
    errors: int

    def __str__(self):
        return "S:%d W:%d E:%d" % self


def tally(outcome):
    """Return the Tally of an Outcome."""
    problems = outcome.all_problems()
    return Tally(sum(1 for r in outcome.results if r.status != "error"),
                 sum(1 for p in problems if p.severity == "warning"),
                 sum(1 for p in problems if p.severity == "error"))


def exit_code_for(outcome):
    """Return the exit code: 2 if anything failed, 1 if anything warned, else 0 (borg's max_ec);
    130 for a run interrupted by Ctrl-C (SIGINT), as the shell expects."""
    if outcome.terminated == "SIGINT":
        return EXIT_INTERRUPTED
    counts = tally(outcome)
    if counts.errors:
        return EXIT_ERROR
    return EXIT_WARNING if counts.warnings else EXIT_OK


def status_word(code):
    """Return the status log's word for an exit code: SUCCESS, WARNING or ERROR."""
    return {EXIT_OK: "SUCCESS", EXIT_WARNING: "WARNING"}.get(code, "ERROR")


def status_end_fields(outcome):
    """Return the fields of the run's `end` status-log line: ['end', 'SUCCESS', 'S:1 W:0 E:0']."""
    return ["end", status_word(exit_code_for(outcome)), str(tally(outcome))]


def recap(outcome):
    """Return one line per failed or warned unit (and run problem), with its reason."""
    lines = []
    for problem in outcome.all_problems():
        word = "FAILED" if problem.severity == "error" else "WARNING"
        lines.append("%s %s: %s" % (word, printable(problem.unit) if problem.unit else "(run)",
                                    problem.message))
    return lines


class UnitLog(logging.LoggerAdapter):
    """The log of one unit (lines prefixed `vm=<name>: `) or of the run (no prefix).

    Its `warning()` and `error()` are how a problem enters the run's Outcome: each is
    recorded here, once, in the order met. Lines logged any other way are only lines.
    """

    def __init__(self, name=""):
        logging.LoggerAdapter.__init__(self, log, {})
        self.unit = name
        self.prefix = "vm=%s: " % printable(name) if name else ""
        self.met = []

    def process(self, msg, kwargs):
        return self.prefix + msg, kwargs

    def _record(self, severity, msg, args):
        self.met.append(RunProblem(severity, self.unit, msg % args if args else msg))

    def warning(self, msg, *args, **kwargs):
        self._record("warning", msg, args)
        logging.LoggerAdapter.warning(self, msg, *args, **kwargs)

    def error(self, msg, *args, **kwargs):
        self._record("error", msg, args)
        logging.LoggerAdapter.error(self, msg, *args, **kwargs)

    def failed(self, message):
        """Log a unit's failure without recording it: its VmResult carries it."""
        logging.LoggerAdapter.error(self, "FAILED: %s", message)

    @property
    def warnings(self):
        return [p.message for p in self.met if p.severity == "warning"]

    @property
    def errors(self):
        return [p.message for p in self.met if p.severity == "error"]


class RunRecord:
    """What a run (or a preview) has met so far; outcome() freezes it into the Outcome."""

    def __init__(self, started=None):
        self.started = started or datetime.datetime.now().replace(microsecond=0)
        self.log = UnitLog()
        self.results = []
        self.selection = None
        self.cannot_start = None
        self.terminated = None
        self.begun = False              # the status log has its `begin` line
        self.open_snapshots = {}        # uuid -> unit: taken and not yet destroyed
        self.pool = None                # the pool's name_label, once read (the mail's subject)

    def outcome(self):
        sel = self.selection
        return Outcome(self.started, datetime.datetime.now().replace(microsecond=0),
                       tuple(self.results), tuple(self.log.met),
                       tuple(sel.excluded) if sel else (), tuple(sel.not_selected) if sel else (),
                       self.cannot_start, self.terminated)

    def terminated_note(self):
        """Return what to say about the snapshots after a signal: only the truth."""
        if not self.open_snapshots:
            return "snapshots cleaned up"
        return "snapshot %s left (the next run destroys it)" % ", ".join(sorted(self.open_snapshots))


# -- what prints it -------------------------------------------------------------

class StatusLog:
    """NAUbackup's status log: `YYYY/MM/DD HH:MM:SS,<what>,<host>,<fields...>` lines, appended."""

    def __init__(self, path, origin="default", runlog=None):
        self.path = path
        self.host = socket.gethostname()
        self.runlog = runlog or log
        if path and not self.folder_exists():
            if origin.startswith("default"):
                log.info("status log %s not written: its folder does not exist", path)
                self.path = None

    def folder_exists(self):
        return bool(self.path) and os.path.isdir(os.path.dirname(self.path) or ".")

    def line(self, what, *fields, when=None):
        """Append one line (`when`: the time it records, default now)."""
        if not self.path:
            return
        text = ",".join([(when or datetime.datetime.now()).strftime("%Y/%m/%d %H:%M:%S"), what,
                         self.host] + [str(f) for f in fields])
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(text + "\n")
        except OSError as exc:
            self.runlog.warning("cannot append to status log %s: %s", self.path, exc.strerror)
            self.path = None


def status_size(nbytes):
    """Return the status log's size field as NAUbackup 3.25 writes it: whole GiB, '3G'."""
    return "%dG" % (nbytes // 2 ** 30)


def unit_json(result):
    return {"name": result.name, "uuid": result.uuid, "mode": result.mode,
            "status": result.status, "path": result.path, "bytes": result.bytes,
            "seconds": round(result.seconds, 3), "message": result.message,
            "warnings": list(result.warnings)}


def problems_json(outcome):
    """Return the JSON keys every summary shares: warnings, errors, problems, summary, status."""
    problems = outcome.all_problems()
    code = exit_code_for(outcome)
    return {
        "status": {EXIT_OK: "ok", EXIT_WARNING: "warning"}.get(code, "error"),
        "exit_code": code,
        "warnings": [str(p) for p in problems if p.severity == "warning"],
        "errors": [str(p) for p in problems if p.severity == "error"],
        "problems": [p._asdict() for p in problems],
        "summary": str(tally(outcome)),
        "reason": outcome.cannot_start,
        "terminated": outcome.terminated,
    }


def run_summary(config, outcome):
    """Return the JSON summary of a run (config None: it failed before its settings were read)."""
    data = {
        "preview": False, "version": __version__,
        "started": outcome.started.isoformat(), "finished": outcome.finished.isoformat(),
        "settings": ({key: value for key, value, _ in settings_summary(config)}
                     if config else {}),
        "vms": [unit_json(r) for r in outcome.results],
        "excluded": [{"name": n, "uuid": u} for n, u in outcome.excluded],
        "not_selected": [{"name": n, "uuid": u} for n, u in outcome.not_selected],
    }
    data.update(problems_json(outcome))
    return data


class PreviewPlan(typing.NamedTuple):
    """What a preview found the run would do, beside its Outcome."""
    plans: typing.Tuple = ()                        # selection.Plan of each selected VM
    deletions: typing.Tuple[typing.Tuple[str, str], ...] = ()   # (VM folder, backup name)
    destroys: typing.Tuple[typing.Tuple[str, str, str], ...] = ()   # (VM|VDI, name, uuid)


def preview_data(config, outcome, found):
    """Return the preview as a JSON-ready dict: the Outcome the run would have, and its plan."""
    data = {
        "preview": True,
        "version": __version__,
        "would_start": outcome.cannot_start is None,
        "settings": {key: value for key, value, _ in settings_summary(config)},
        "vms": [{"name": p.vm.name, "uuid": p.vm.uuid, "mode": p.vm.mode,
                 "max_backups": p.vm.max_backups, "retention": str(keep_for(config, p.vm)),
                 "disks": [d.device for d in p.disks],
                 "skipped_disks": [d.device for d in p.skipped],
                 "problems": list(p.problems),
                 "selector": p.vm.selector.text, "origin": p.vm.selector.origin}
                for p in found.plans],
        "excluded": [{"name": n, "uuid": u} for n, u in outcome.excluded],
        "not_selected": [{"name": n, "uuid": u} for n, u in outcome.not_selected],
        "delete": [{"vm": vm, "backup": name} for vm, name in found.deletions],
        "destroy": [{"class": cls, "name": name, "uuid": uuid}
                    for cls, name, uuid in found.destroys],
    }
    data.update(problems_json(outcome))
    return data


def preview_verdict(data):
    """Return the preview's last line: what the run would do and how it would exit."""
    if not data["would_start"]:
        return "Preview: the run would not start (exit 2): %s" % data["reason"]
    word = {0: "succeed", 1: "end with warnings", 2: "start, but end with errors"}[data["exit_code"]]
    return "Preview: the run would %s (exit %d, %s): %d VMs selected." % (
        word, data["exit_code"], data["summary"], len(data["vms"]))


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
        gfs = "retention %s  " % vm["retention"] if "+" in vm["retention"] else ""
        out.append("  %-24s %-11s max_backups=%-3d %sdisks: %s  [%s]"
                   % (printable(vm["name"]), vm["mode"], vm["max_backups"], gfs, disks, vm["uuid"]))
    for title, key in (("Excluded", "excluded"), ("Not selected", "not_selected")):
        out.append("%s (%d):" % (title, len(data[key])))
        out.extend("  %-24s [%s]" % (printable(v["name"]), v["uuid"]) for v in data[key])
    out.append("Retention would delete (%d):" % len(data["delete"]))
    out.extend("  %s/%s" % (printable(d["vm"]), d["backup"]) for d in data["delete"])
    out.append("Leftover snapshots the run would destroy (%d):" % len(data["destroy"]))
    out.extend("  %s %-24s [%s]" % (d["class"], printable(d["name"]), d["uuid"])
               for d in data["destroy"])
    out.extend("***WARNING - " + w for w in data["warnings"])
    out.extend("***ERROR - " + e for e in data["errors"])
    out.append(preview_verdict(data))
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
