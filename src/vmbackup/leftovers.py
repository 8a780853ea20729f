"""Snapshots left by earlier, killed runs: recognising them and destroying them.

Owns: is_leftover, run_is_dead, clean_leftovers, forget_pending.
Imports: errors, util, store, transport.base, backup.
"""

import datetime
import re
import socket

from vmbackup.backup import signals_deferred
from vmbackup.errors import VmBackupError, log
from vmbackup.store import pid_alive
from vmbackup.transport.base import Obj, PENDING_KEY, PENDING_WINDOW, TAG_KEY
from vmbackup.util import printable


#: A tool snapshot older than this is a leftover whoever made it (XAPI caps an export at 24 h).
LEFTOVER_AGE = datetime.timedelta(hours=25)


def is_leftover(record, now=None):
    """Return True if a VM/VDI record is a snapshot this tool made and no live run still uses.

    It must be a snapshot and either carry our tag whose first word is its own uuid (so
    a restored copy never qualifies), or -- made by a run killed before it could tag it --
    carry the pending mark that run put on its source, and have been taken within
    PENDING_WINDOW of that mark (so a person's later snapshot never qualifies). And the
    run must be dead: a pid gone on this host, or older than LEFTOVER_AGE.
    """
    if not record.get("is_a_snapshot"):
        return False
    other = record.get("other_config") or {}
    words = other.get(TAG_KEY, "").split()
    if len(words) >= 4 and words[0] == record.get("uuid"):
        note = words[1:4]
    else:
        note = other.get(PENDING_KEY, "").split()[:3]
        taken = xapi_time(record.get("snapshot_time"))
        marked = note_time(note)
        if len(note) < 3 or taken is None or marked is None \
                or not datetime.timedelta(0) <= taken - marked <= PENDING_WINDOW:
            return False
    return run_is_dead(note, now)


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


def run_is_dead(note, now=None):
    """Return True if the run a note names has ended: its pid is gone here, or it is too old."""
    host, pid = note[0], note[1]
    if host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
        return True
    made = note_time(note)
    return made is not None and (now or datetime.datetime.utcnow()) - made > LEFTOVER_AGE


def forget_pending(ctx):
    """Remove pending marks that dead runs left on VMs and disks (not snapshots)."""
    for cls, records in (("VM", ctx.view.vms), ("VDI", ctx.view.vdis)):
        for ref, rec in records.items():
            note = (rec.get("other_config") or {}).get(PENDING_KEY, "").split()
            if note and not rec.get("is_a_snapshot") and len(note) >= 3 and run_is_dead(note):
                ctx.transport.unmark_pending(cls, Obj(ref, rec.get("uuid", "")))


def clean_leftovers(ctx):
    """Destroy the tool's snapshots and VDI snapshots left by a killed run; return how many."""
    count = 0
    for ref, rec in ctx.view.vms.items():
        if is_leftover(rec):
            log.warning("destroying leftover snapshot %r (%s) of an interrupted run",
                        printable(rec["name_label"]), rec["uuid"])
            try:
                with signals_deferred():   # a destroy cut in half leaves orphan disks
                    ctx.transport.destroy_snapshot(Obj(ref, rec["uuid"]))
                count += 1
            except VmBackupError as exc:
                log.error("cannot destroy leftover snapshot %s: %s", rec["uuid"], exc)
    for ref, rec in ctx.view.vdis.items():
        if is_leftover(rec) and not rec.get("VBDs"):
            log.warning("destroying leftover disk snapshot %r (%s) of an interrupted run",
                        printable(rec.get("name_label", "")), rec["uuid"])
            try:
                with signals_deferred():
                    ctx.transport.destroy_vdi(Obj(ref, rec["uuid"]))
                count += 1
            except VmBackupError as exc:
                log.error("cannot destroy leftover disk snapshot %s: %s", rec["uuid"], exc)
    forget_pending(ctx)
    return count
