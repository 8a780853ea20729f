"""What a running export reports and what it obeys: its progress meter on the run's board,
and the run's request to stop.

Owns: eta_seconds and progress_text (pure), Meter (one export's bytes, rate, ETA),
ProgressBoard (every running export: live lines on a terminal; off one, a log line per
export every progress_interval; the request to stop), bound (ties a worker thread to the
board and to its VM), exporting (names the export the thread is about to make),
current_meter, check_stop, UnitFilter (every line a worker logs names its VM).

A run's exports run in worker threads; signals reach only the main thread. The main
thread asks the board to stop (`request_stop`): each worker notices at its next block
(or poll of xe) and raises Terminated in its own thread, so its `with` blocks destroy its
snapshots; `abort_all` shuts the sockets of downloads blocked in a read.
Imports: errors, util, store.
"""

import logging
import shutil
import socket
import threading
import time

from vmbackup.errors import Terminated, log
from vmbackup.store import start_thread
from vmbackup.util import human_size, printable


#: Seconds between redraws of the live lines on a terminal.
LIVE_EVERY = 0.5

#: Seconds between looks at a meter off a terminal (its lines come every progress_interval).
TICK_EVERY = 1.0


def eta_seconds(done, expected, fraction, elapsed):
    """Return the seconds an export still needs, or None when it cannot be told.

    From the task's progress `fraction` (0..1) when XAPI gives one, else from the
    `expected` size (the disks' physical utilisation) and the rate so far.
    """
    if fraction is not None and 0.0 < fraction < 1.0 and elapsed > 0:
        return elapsed * (1.0 - fraction) / fraction
    if expected and done and elapsed > 0 and expected > done:
        return (expected - done) / (done / elapsed)
    return None


def clock_text(seconds):
    """Return '1:02:03' or '2:03' for a number of seconds."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return ("%d:%02d:%02d" % (hours, rest // 60, rest % 60)) if hours else "%d:%02d" % divmod(rest, 60)


def progress_text(label, done, expected, fraction, elapsed):
    """Return one export's progress: 'xvda: 120.0M of ~1.0G, 20.1M/s, ETA 0:44'."""
    text = "%s: %s" % (label, human_size(done))
    if expected and expected >= done:
        text += " of ~%s" % human_size(expected)
    if fraction is not None and 0.0 < fraction <= 1.0:
        text += " (%d%%)" % int(fraction * 100)
    if elapsed > 0:
        text += ", %s/s" % human_size(done / elapsed)
    eta = eta_seconds(done, expected, fraction, elapsed)
    return text + (", ETA %s" % clock_text(eta) if eta is not None else "")


class Meter:
    """One running export: its bytes so far and, when known, its expected size or the
    fraction its task reports. The worker writes it; the board reads it."""

    def __init__(self, board, unit, label, expected):
        self.board, self.unit, self.label, self.expected = board, unit, label, expected
        self.done = 0
        self.fraction = None
        self.began = self.logged = time.monotonic()
        self.abort = None       # callable that cuts the transfer (a download's socket)

    def add(self, nbytes):
        self.done += nbytes

    def check(self):
        """Raise Terminated in this (worker) thread if the run was asked to stop."""
        if self.board is not None:
            self.board.check_stop()

    def text(self, now=None):
        elapsed = (now or time.monotonic()) - self.began
        return progress_text(self.label, self.done, self.expected, self.fraction, elapsed)


class _Local(threading.local):
    board = None
    unit = ""
    label = None
    expected = None


_local = _Local()


class bound:
    """`with bound(board, vm_name):` the exports of this thread report to `board` as `vm_name`."""

    def __init__(self, board, unit):
        self.board, self.unit = board, unit

    def __enter__(self):
        _local.board, _local.unit = self.board, self.unit
        return self.board

    def __exit__(self, *exc):
        _local.board, _local.unit = None, ""
        return False


class exporting:
    """`with exporting("xvda", expected_bytes):` names the export this thread makes next."""

    def __init__(self, label, expected=None):
        self.label, self.expected = label, expected

    def __enter__(self):
        _local.label, _local.expected = self.label, self.expected
        return self

    def __exit__(self, *exc):
        _local.label = _local.expected = None
        return False


class current_meter:
    """`with current_meter(what) as meter:` the meter of the export this thread starts now,
    on the board it is bound to (a meter on no board when it is bound to none)."""

    def __init__(self, what):
        self.what = what
        self.meter = None

    def __enter__(self):
        board = _local.board
        self.meter = Meter(board, _local.unit, _local.label or self.what, _local.expected)
        if board is not None:
            board.add(self.meter)
        return self.meter

    def __exit__(self, *exc):
        if self.meter.board is not None:
            self.meter.board.remove(self.meter)
        return False


def check_stop():
    """Raise Terminated if the board this thread is bound to was asked to stop."""
    if _local.board is not None:
        _local.board.check_stop()


class UnitFilter(logging.Filter):
    """Prefixes `vm=<name>: ` to the lines a worker thread logs without naming its VM."""

    def filter(self, record):
        unit = _local.unit
        if unit and isinstance(record.msg, str) and not record.msg.startswith("vm="):
            record.msg = "vm=%s: " % printable(unit).replace("%", "%%") + record.msg
        return True


def live_terminal(stream):
    """Return True when live lines belong on `stream`: a terminal that the console log
    writes info lines to (not with -q)."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        return False
    return tty and any(getattr(h, "_vmbackup_console", False) and h.level <= logging.INFO
                       and getattr(h, "stream", None) is stream for h in log.handlers)


class LiveStream:
    """The console log handler's stream while live lines are shown: a log line first erases
    the live lines, which are drawn again below it."""

    def __init__(self, board, real):
        self.board, self.real = board, real

    def write(self, text):
        with self.board.lock:
            self.board.erase()
            self.real.write(text)

    def flush(self):
        with self.board.lock:
            self.real.flush()
            self.board.draw()


class ProgressBoard:
    """Every running export of a run, and the run's request to stop.

    On a terminal (`live`): one line per running export (VM, disk, bytes, rate, ETA)
    and the run's totals, redrawn every LIVE_EVERY seconds below the log. Otherwise
    only log lines: one per export every `interval` seconds once it has run that long.
    """

    def __init__(self, stream, live, interval, units=0):
        self.stream, self.live, self.interval, self.units = stream, live, interval, units
        self.lock = threading.RLock()
        self.meters = []
        self.finished = 0           # units (VMs) done
        self.finished_bytes = 0     # bytes of finished exports
        self.began = time.monotonic()
        self.drawn = 0              # live lines on the screen now
        self.stop_reason = None
        self.stopped = threading.Event()
        self.thread = None
        self.handlers = []

    # -- what the workers and the scheduler call
    def add(self, meter):
        with self.lock:
            self.meters.append(meter)

    def remove(self, meter):
        with self.lock:
            if meter in self.meters:
                self.meters.remove(meter)
                self.finished_bytes += meter.done

    def unit_done(self):
        with self.lock:
            self.finished += 1

    def request_stop(self, reason):
        """Ask every worker to stop at its next block (the first reason stays)."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def check_stop(self):
        if self.stop_reason is not None:
            raise Terminated(self.stop_reason)

    def abort_all(self):
        """Cut every running transfer that can be cut (its worker then raises Terminated)."""
        with self.lock:
            aborts = [m.abort for m in self.meters if m.abort is not None]
        for abort in aborts:
            try:
                abort()
            except OSError as exc:
                log.debug("abort: %s", exc)

    # -- what is shown
    def totals_text(self, now):
        with self.lock:
            running = list(self.meters)
            done = self.finished_bytes + sum(m.done for m in running)
        elapsed = now - self.began
        rate = ", %s/s" % human_size(done / elapsed) if elapsed > 0 else ""
        return "vmbackup: %d of %d VMs done, %d exports running, %s%s" % (
            self.finished, self.units, len(running), human_size(done), rate)

    def lines(self, now):
        with self.lock:
            running = list(self.meters)
        return ["vm=%s: %s" % (printable(m.unit), m.text(now)) for m in running] + [
            self.totals_text(now)]

    def erase(self):
        """Erase the live lines (the caller holds the lock)."""
        if self.drawn:
            self.stream.write("\x1b[%dA\x1b[J" % self.drawn)
            self.drawn = 0

    def draw(self):
        """Draw the live lines below the log (the caller holds the lock)."""
        if not self.live or self.stopped.is_set():
            return
        self.erase()
        width = max(20, shutil.get_terminal_size((100, 24)).columns - 1)
        lines = [line[:width] for line in self.lines(time.monotonic())]
        self.stream.write("".join(line + "\n" for line in lines))
        self.stream.flush()
        self.drawn = len(lines)

    def tick(self):
        """Redraw the live lines, or log the progress of each export that is due."""
        now = time.monotonic()
        if self.live:
            with self.lock:
                self.draw()
            return
        with self.lock:
            due = [m for m in self.meters if now - m.logged >= self.interval]
        for meter in due:
            meter.logged = now
            log.info("vm=%s: progress %s", printable(meter.unit), meter.text(now))

    def run(self):
        period = LIVE_EVERY if self.live else min(TICK_EVERY, self.interval)
        while not self.stopped.wait(period):
            self.tick()

    # -- its lifetime: `with board:`
    def __enter__(self):
        if self.live:
            for handler in log.handlers:
                if getattr(handler, "_vmbackup_console", False) and handler.stream is self.stream:
                    handler.stream = LiveStream(self, self.stream)
                    self.handlers.append(handler)
        self.thread = start_thread(self.run, "vmbackup-progress")
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()
        with self.lock:
            for handler in self.handlers:
                handler.stream = self.stream
            self.erase()
        return False


def shut_socket(sock):
    """Return a callable that shuts `sock` down, so a read blocked on it returns at once."""
    def abort():
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    return abort
