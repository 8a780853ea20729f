"""Snapshots left by earlier, killed runs: recognising them and destroying them.

Owns: is_leftover, run_is_dead, clean_leftovers, forget_pending; the run's heartbeat in
the pool (PoolBeat, read_beats), which tells another host's live run from a dead one.
Imports: errors, util, store, xapi, transport.base, backup, delta (the chains' references).
"""

import datetime
import os
import re
import socket
import threading

from vmbackup.backup import signals_deferred
from vmbackup.delta import ChainReferences, kept_reference, recorded_references
from vmbackup.errors import VmBackupError, log
from vmbackup.store import LocalStore, pid_alive, start_thread
from vmbackup.transport.base import BEAT_WORD, Obj, PENDING_KEY, PENDING_WINDOW, TAG_KEY
from vmbackup.util import printable


#: A tool snapshot older than this is a leftover whoever made it (XAPI caps an export at 24 h).
LEFTOVER_AGE = datetime.timedelta(hours=25)


#: pool.other_config keys "vmbackup_alive <host> <pid> <start> <beat time>": each live run
#: adds a new one every BEAT_EVERY seconds, then removes its previous one.
BEAT_PREFIX = "vmbackup_alive "


#: Seconds between a run's heartbeats; a run whose last one is older than BEAT_STALE is over.
BEAT_EVERY = 60.0
BEAT_STALE = datetime.timedelta(minutes=10)


def is_leftover(record, now=None, beats=None):
    """Return True if a VM/VDI record is a snapshot this tool made and no live run still uses.

    It must be a snapshot and either carry our tag whose first word is its own uuid (so
    a restored copy never qualifies), or -- made by a run killed before it could tag it --
    carry the pending mark that run put on its source, and have been taken within
    PENDING_WINDOW of that mark (so a person's later snapshot never qualifies). And the
    run must be over (run_is_dead, with the pool's heartbeats `beats`).
    """
    if not record.get("is_a_snapshot"):
        return False
    other = record.get("other_config") or {}
    words = other.get(TAG_KEY, "").split()
    if len(words) >= 4 and words[0] == record.get("uuid"):
        note = words[1:5]
    else:
        note = other.get(PENDING_KEY, "").split()[:4]
        taken = xapi_time(record.get("snapshot_time"))
        marked = note_time(note)
        if len(note) < 3 or taken is None or marked is None \
                or not datetime.timedelta(0) <= taken - marked <= PENDING_WINDOW:
            return False
    return run_is_dead(note, now, beats)


def note_time(note):
    """Return the UTC datetime of a run note ['host', 'pid', 'time'], or None."""
    try:
        return datetime.datetime.strptime(note[2][:19], "%Y-%m-%dT%H:%M:%S")
    except (IndexError, ValueError):
        return None


def xapi_time(value):
    """Return a naive UTC datetime for an XAPI datetime ('20261123T20:55:00Z'), or None."""
    digits = re.sub(r"\D", "", str(value or ""))[:14]
    try:
        return datetime.datetime.strptime(digits, "%Y%m%d%H%M%S")
    except ValueError:
        return None


def run_is_dead(note, now=None, beats=None, me=None):
    """Return True if the run a note ['host', 'pid', 'start'(, 'beat')] names is provably over.

    Any host: a run that beats (its note ends with BEAT_WORD) is over when its last
    heartbeat in `beats` ({(host, pid, start): time}) is missing or older than BEAT_STALE.
    This host: its pid is gone, or it is this very pid with another start (a container's
    pid 1). Any run: started more than LEFTOVER_AGE ago (runs of versions without heartbeats).
    """
    now = now or datetime.datetime.utcnow()
    host, pid = note[0], note[1]
    me = me or run_identity()
    if host == me[0] and pid.isdigit() and (not pid_alive(int(pid)) or
                                            (pid == me[1] and me[2] is not None and note[2:3] != [me[2]])):
        return True
    if len(note) >= 4 and note[3] == BEAT_WORD and beats is not None:
        last = beats.get(tuple(note[:3]))
        return last is None or now - last > BEAT_STALE
    made = note_time(note)
    return made is not None and now - made > LEFTOVER_AGE


#: (host, pid, start) of this run: set by PoolBeat; a process outside a run has none.
_ME = []


def run_identity():
    """Return this run's (host, pid, start), or (host, pid, None) outside a run."""
    return _ME[-1] if _ME else (socket.gethostname(), str(os.getpid()), None)


def read_beats(other_config):
    """Return {(host, pid, start): newest beat time} from pool.other_config (pure).

    {"vmbackup_alive h 7 2026-11-23T20:00:00 2026-11-23T20:05:00": ""}
      -> {("h", "7", "2026-11-23T20:00:00"): datetime(2026, 11, 23, 20, 5)}
    """
    beats = {}
    for key in other_config or {}:
        words = key[len(BEAT_PREFIX):].split() if key.startswith(BEAT_PREFIX) else []
        when = note_time(["", "", words[3]]) if len(words) == 4 else None
        if when is not None:
            run = tuple(words[:3])
            beats[run] = max(when, beats.get(run, when))
    return beats


def pool_beats(xapi):
    """Return (pool ref, its other_config, read_beats of it), read now (not from the view)."""
    pool = xapi.call("pool.get_all")[0]
    other = xapi.call("pool.get_other_config", pool)
    return pool, other, read_beats(other)


class PoolBeat:
    """This run's heartbeat in pool.other_config (start() ... stop()), so that a run on any
    host can tell that this one lives and, once it stops beating, that it is over.

    A thread on its own connection (Xapi.twin) adds a key with the time every BEAT_EVERY
    seconds, then removes the previous one (never a moment without one); the last key
    goes at stop(). A run killed with -9 leaves one: it goes stale, and the next run
    removes it (forget_beats).
    """

    def __init__(self, xapi, note, clock=datetime.datetime.utcnow):
        self.xapi, self.note, self.clock = xapi.twin(), note, clock
        self.run = tuple(note.split()[:3])
        self.key, self.pool = None, None
        self.stopped, self.thread = threading.Event(), None

    def beat(self):
        """Add a new heartbeat key, then remove the previous one."""
        key = "%s%s %s" % (BEAT_PREFIX, " ".join(self.run),
                           self.clock().replace(microsecond=0).isoformat())
        if key != self.key:
            self.xapi.call("pool.add_to_other_config", self.pool, key, "")
            old, self.key = self.key, key
            if old is not None:
                self.xapi.call("pool.remove_from_other_config", self.pool, old)

    def _keep_beating(self):
        while not self.stopped.wait(BEAT_EVERY):
            try:
                self.beat()
            except VmBackupError as exc:
                log.warning("cannot refresh the run's heartbeat in the pool: %s", exc)

    def start(self):
        """Beat once (before any snapshot: a run without a beat yet is never seen as dead),
        then keep beating in a thread."""
        self.pool = self.xapi.call("pool.get_all")[0]
        self.beat()
        _ME.append(self.run)
        self.thread = start_thread(self._keep_beating, "vmbackup-beat")

    def stop(self):
        """Stop beating and remove the last heartbeat (safe to call when start() failed)."""
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()
        if self.run in _ME:
            _ME.remove(self.run)
        if self.key is not None:
            try:
                self.xapi.call("pool.remove_from_other_config", self.pool, self.key)
            except VmBackupError as exc:
                log.debug("removing the run's heartbeat: %s", exc)


def forget_beats(ctx, pool, other_config, beats, now=None):
    """Remove the heartbeat keys of runs that are over (killed runs leave their last one)."""
    now = now or datetime.datetime.utcnow()
    for key in other_config:
        words = key[len(BEAT_PREFIX):].split() if key.startswith(BEAT_PREFIX) else []
        if len(words) == 4 and now - beats[tuple(words[:3])] > BEAT_STALE:
            try:
                ctx.transport.xapi.call("pool.remove_from_other_config", pool, key)
            except VmBackupError as exc:
                log.debug("removing a dead run's heartbeat: %s", exc)


def sources_of_marked_snapshots(ctx):
    """Return {ref: VDI record} of the disks whose snapshots carry a pending mark and that
    the view lacks (a view of few VMs reads only their disks, and every snapshot VDI)."""
    found = {}
    for rec in ctx.view.vdis.values():
        source = rec.get("snapshot_of", "OpaqueRef:NULL")
        if rec.get("is_a_snapshot") and PENDING_KEY in (rec.get("other_config") or {}) \
                and source not in ctx.view.vdis and source not in found \
                and source != "OpaqueRef:NULL":
            try:
                found[source] = ctx.transport.xapi.call("VDI.get_record", source)
            except VmBackupError as exc:
                log.debug("reading the source of a marked disk snapshot: %s", exc)
    return found


def forget_pending(ctx, beats=None):
    """Remove pending marks that dead runs left on VMs and disks (not snapshots)."""
    vdis = dict(ctx.view.vdis)
    vdis.update(sources_of_marked_snapshots(ctx))
    for cls, records in (("VM", ctx.view.vms), ("VDI", vdis)):
        for ref, rec in records.items():
            note = (rec.get("other_config") or {}).get(PENDING_KEY, "").split()
            if note and not rec.get("is_a_snapshot") and len(note) >= 3 \
                    and run_is_dead(note, beats=beats):
                ctx.transport.unmark_pending(cls, Obj(ref, rec.get("uuid", "")))


def run_log(ctx):
    """Return where the run's own problems are recorded (the module log outside a run)."""
    return ctx.record.log if getattr(ctx, "record", None) is not None else log


def stop_exports(ctx, rec):
    """Cancel the tasks still at work on a leftover (the export of a killed run whose xe or
    connection lives on), so that its destroy can succeed; say what the destroy waits for."""
    for task, operation in sorted((rec.get("current_operations") or {}).items()):
        log.info("leftover %s is still busy (%s, task %s): cancelling that task; the destroy "
                 "waits up to %ds for it to end", rec["uuid"], operation, task,
                 ctx.transport.BUSY_WAIT)
        try:
            ctx.transport.xapi.call("task.cancel", task)
        except VmBackupError as exc:
            log.debug("task.cancel %s: %s", task, exc)


def clean_leftovers(ctx):
    """Destroy the tool's snapshots and VDI snapshots left by a killed run; return how many.

    Destroying one is housekeeping (info); failing to is an error of the run.
    """
    count, now = 0, datetime.datetime.utcnow()
    # read after the view: a run that started since then already beats
    pool, other_config, beats = pool_beats(ctx.transport.xapi)
    for ref, rec in ctx.view.vms.items():
        if is_leftover(rec, now, beats):
            log.info("destroying leftover snapshot %r (%s) of an interrupted run",
                        printable(rec["name_label"]), rec["uuid"])
            try:
                stop_exports(ctx, rec)
                with signals_deferred():   # a destroy cut in half leaves orphan disks
                    ctx.transport.destroy_snapshot(Obj(ref, rec["uuid"]))
                count += 1
            except VmBackupError as exc:
                run_log(ctx).error("cannot destroy leftover snapshot %s: %s", rec["uuid"], exc)
    references = []      # read from backup_dir once, when a leftover disk is met

    def kept(rec):
        if not references:
            references.append(chain_references(ctx))
        return kept_reference(rec, references[0])
    for ref, rec in ctx.view.vdis.items():
        if is_leftover(rec, now, beats) and not rec.get("VBDs") and not kept(rec):
            log.info("destroying leftover disk snapshot %r (%s) of an interrupted run",
                        printable(rec.get("name_label", "")), rec["uuid"])
            try:
                stop_exports(ctx, rec)
                with signals_deferred():
                    ctx.transport.destroy_vdi(Obj(ref, rec["uuid"]))
                count += 1
            except VmBackupError as exc:
                run_log(ctx).error("cannot destroy leftover disk snapshot %s: %s", rec["uuid"], exc)
    forget_pending(ctx, beats)
    forget_beats(ctx, pool, other_config, beats, now)
    return count


def chain_references(ctx):
    """Return the ChainReferences of backup_dir's delta-export chains (snapshots the tool
    keeps on purpose; none when backup_dir is unreadable)."""
    try:
        return recorded_references(LocalStore(ctx.config.backup_dir))
    except OSError as exc:
        log.debug("reading the chains' references: %s", exc)
        return ChainReferences(frozenset(), frozenset())
