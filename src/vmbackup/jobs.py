"""Backing up the selected VMs several at a time (jobs=N): which VM starts next under the
caps (pure), and the worker threads that back them up.

Owns: Caps, JobKey, serving_host/job_key (which host serves a VM's export, after XAPI's
redirect, and which SRs it reads), next_job (pure), DeferredStatusLog, back_up_vms.

Each VM is backed up in a worker thread of its own, with its own snapshot, export and
cleanup (backup.backup_vm_safely), on the run's session over a connection of its own
(Xapi.twin: no more sessions, no XML-RPC connection shared between threads). Results and
status-log lines are handed over in the selection's order, whatever order the VMs end in.
Signals reach only the main thread: there, Terminated or Ctrl-C asks the progress board
to stop; every worker raises Terminated in its own thread at its next block (downloads
blocked in a read have their socket shut), so its `with` blocks destroy its snapshots;
the main thread waits for all of them, then lets the signal go on.
Imports: errors, util, config, store, progress, report, selection, transport, backup.
"""

import collections
import datetime
import queue
import sys
import typing

from vmbackup.backup import backup_vm_safely
from vmbackup.errors import Terminated, VmBackupError, log
from vmbackup.progress import ProgressBoard, UnitFilter, bound, live_terminal
from vmbackup.report import VmResult
from vmbackup.selection import NULL_REF
from vmbackup.store import start_thread
from vmbackup.util import one_line, printable


#: Seconds the main thread waits for a worker between looks (signals are handled between).
WAIT_SLICE = 0.5

#: glibc's mallopt parameter M_ARENA_MAX, and the arenas a run of several jobs allows.
M_ARENA_MAX, JOB_ARENAS = -8, 2


def limit_malloc_arenas():
    """Keep glibc from giving each worker thread a malloc arena of its own: the buffers
    freed in one would stay there, and peak memory would grow with -j. Nothing where
    there is no glibc."""
    try:
        import ctypes
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, JOB_ARENAS)
    except (ImportError, OSError, AttributeError):  # pragma: no cover - not glibc
        pass


class Caps(typing.NamedTuple):
    """How many exports may run at once: in all, per serving host, per SR (0: no cap)."""
    jobs: int = 1
    per_host: int = 0
    per_sr: int = 0


class JobKey(typing.NamedTuple):
    """What one VM's backup loads: the hosts that serve its exports, the SRs they read."""
    hosts: typing.FrozenSet[str] = frozenset()
    srs: typing.FrozenSet[str] = frozenset()


def next_job(pending, running, caps):
    """Return the index in `pending` (JobKeys, selection order) of the first job that fits
    beside `running` (JobKeys) under `caps`, or None when none may start now.

    A job fits while fewer than caps.jobs run, and each host it loads serves fewer than
    caps.per_host running jobs, and each SR it reads is read by fewer than caps.per_sr.
    """
    if len(running) >= caps.jobs:
        return None
    hosts = collections.Counter(h for key in running for h in key.hosts)
    srs = collections.Counter(s for key in running for s in key.srs)
    for index, key in enumerate(pending):
        if caps.per_host and any(hosts[h] >= caps.per_host for h in key.hosts):
            continue
        if caps.per_sr and any(srs[s] >= caps.per_sr for s in key.srs):
            continue
        return index
    return None


def serving_host(srs, master, sees):
    """Return the host XAPI has serve an export reading `srs`: the master when it sees them
    all (shared storage), else the first host (by ref) that does, as /export's redirect
    does; None when no host sees them all (the export fails anyway)."""
    if master in sees and srs <= sees[master]:
        return master
    for host in sorted(sees):
        if srs <= sees[host]:
            return host
    return None


def job_key(plan, view, sees):
    """Return the JobKey of a VmPlan: vm-export is served by one host for all its disks,
    vdi-export by a host per disk; a meta-export reads no disk."""
    srs = frozenset(d.vdi.get("SR") for d in plan.disks) - {None, "", NULL_REF}
    master = view.pool.get("master")
    if sees is None:
        return JobKey(frozenset(), srs)
    if plan.vm.mode == "vdi-export":
        hosts = {serving_host(frozenset([sr]), master, sees) for sr in srs}
    else:
        hosts = {serving_host(srs, master, sees)} if srs else set()
    return JobKey(frozenset(hosts - {None}), srs)


def pool_sight(xapi):
    """Return {host ref: frozenset of the SR refs it has a PBD for} (one call); None when
    the PBDs cannot be read (then only the SR caps and `jobs` hold)."""
    sees = collections.defaultdict(set)
    try:
        pbds = xapi.call("PBD.get_all_records")
    except VmBackupError as exc:
        log.info("cannot tell which host serves each export (%s): jobs_per_host not applied",
                 exc)
        return None
    for pbd in pbds.values():
        sees[pbd.get("host")].add(pbd.get("SR"))
    return {host: frozenset(srs) for host, srs in sees.items()}


class DeferredStatusLog:
    """A VM's status-log lines, kept with their time until the run writes them in order."""

    def __init__(self):
        self.lines = []

    def line(self, what, *fields):
        self.lines.append((datetime.datetime.now(), what, fields))

    def write_to(self, status_log):
        for when, what, fields in self.lines:
            status_log.line(what, *fields, when=when)
        self.lines = []


class Workers:
    """The worker threads of one run and what they hand back."""

    def __init__(self, ctx, plans, board):
        self.ctx, self.plans, self.board = ctx, plans, board
        self.done = queue.Queue()
        self.running = {}               # plan index -> JobKey
        self.logs = [DeferredStatusLog() for _ in plans]

    def start(self, index, key):
        self.running[index] = key
        start_thread(lambda: self.work(index), "vm-%d" % index)

    def work(self, index):
        """Back up one VM in this thread; hand (index, VmResult or None, exception) back."""
        plan = self.plans[index]
        try:
            with bound(self.board, plan.vm.name):
                self.board.check_stop()
                xapi = self.ctx.transport.xapi.twin()
                ctx = self.ctx._replace(transport=self.ctx.transport.for_thread(xapi))
                result = backup_vm_safely(ctx, plan, self.logs[index])
            self.done.put((index, result, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, never lost
            self.done.put((index, None, exc))
        finally:
            self.board.unit_done()

    def wait_one(self):
        """Return the next (index, result, exception) a worker hands back."""
        while True:
            try:
                item = self.done.get(timeout=WAIT_SLICE)
            except queue.Empty:
                continue
            self.running.pop(item[0], None)
            return item

    def stop(self, reason):
        """Ask every worker to stop, cut their transfers, wait for each to clean up; return
        what they handed back. A further signal only says that the run is still stopping."""
        found = []
        while True:
            try:
                self.board.request_stop(reason)
                self.board.abort_all()
                while self.running:
                    found.append(self.wait_one())
                return found
            except (Terminated, KeyboardInterrupt):
                log.warning("stopping: waiting for %d VM backups to destroy their snapshots",
                            len(self.running))


def back_up_vms(ctx, plans, status_log, results):
    """Back up every VmPlan, up to `jobs` at once under the host and SR caps; append each
    VmResult to `results` and write its status-log lines, in the plans' order.

    One VM's failure is its result; a signal stops every worker, waits for each to clean
    up, writes what finished, and is raised again.
    """
    config = ctx.config
    caps = Caps(config.jobs, config.jobs_per_host, config.jobs_per_sr)
    if caps.jobs > 1 and plans:
        limit_malloc_arenas()
        sees = pool_sight(ctx.transport.xapi)
        keys = [job_key(plan, ctx.view, sees) for plan in plans]
        log.info("up to %d VMs at once (jobs_per_host=%s, jobs_per_sr=%s)", caps.jobs,
                 caps.per_host or "no limit", caps.per_sr or "no limit")
    else:
        keys = [JobKey() for _ in plans]
    board = ProgressBoard(sys.stderr, live_terminal(sys.stderr), config.progress_interval,
                          len(plans))
    workers = Workers(ctx, plans, board)
    finished = {}
    written = [0]

    def write_in_order(final=False):
        while written[0] < len(plans) and (final or written[0] in finished):
            index = written[0]
            workers.logs[index].write_to(status_log)
            if finished.get(index) is not None:
                results.append(finished[index])
            written[0] += 1

    unit_filter = UnitFilter()
    log.addFilter(unit_filter)
    try:
        with board:
            pending = list(range(len(plans)))
            try:
                while pending or workers.running:
                    while pending:
                        pick = next_job([keys[i] for i in pending],
                                        list(workers.running.values()), caps)
                        if pick is None:
                            break
                        index = pending.pop(pick)
                        workers.start(index, keys[index])
                    index, result, exc = workers.wait_one()
                    finished[index] = handed_back(plans[index], result, exc)
                    write_in_order()
            except BaseException as exc:
                for index, result, error in workers.stop(stop_reason(exc)):
                    finished[index] = handed_back(plans[index], result, error)
                write_in_order(final=True)
                raise
    finally:
        log.removeFilter(unit_filter)


def handed_back(plan, result, exc):
    """Return the VmResult a worker handed back: None for one stopped by the run's stop
    request before its VM began (a VM cut once begun is the error backup_vm_safely made
    of it), an error for any other exception that got past backup_vm_safely."""
    if exc is None:
        return result
    if isinstance(exc, Terminated):
        return None
    vm = plan.vm
    log.error("vm=%s: FAILED: internal error: %s: %s", printable(vm.name), type(exc).__name__,
              one_line(exc))
    return VmResult(vm.name, vm.uuid, vm.mode, "error", message="internal error: %s: %s"
                    % (type(exc).__name__, one_line(exc)))


def stop_reason(exc):
    """Return the name of what stopped the run: the signal of a Terminated, else SIGINT."""
    if isinstance(exc, Terminated) and exc.args:
        return exc.args[0]
    return "SIGINT" if isinstance(exc, KeyboardInterrupt) else type(exc).__name__
