"""Where a run's log goes besides stderr: a log file, syslog, and the run's own lines for its mail.

Owns: syslog_frame (RFC 3164 framing, pure), SyslogHandler, RunLines, log_sinks (the
context manager a run is inside), run_lines (what the mail quotes), write_problem and sink_problems (what the preview
checks without opening anything). A sink that cannot
be opened or written is a problem noted on RunLines; the run records it as a warning
when it reports (notify.send_reports), so it counts in W and the exit code.
Imports: errors.
"""

import contextlib
import datetime
import errno
import logging
import os
import socket

from vmbackup.errors import VmBackupError, log


#: syslog facilities by name (RFC 3164 section 4.1.1).
FACILITIES = {"user": 1, "daemon": 3, "local0": 16, "local1": 17, "local2": 18, "local3": 19,
              "local4": 20, "local5": 21, "local6": 22, "local7": 23}


#: logging level -> syslog severity: err 3, warning 4, info 6, debug 7 (crit 2).
SEVERITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
              (logging.INFO, 6), (0, 7))


#: RFC 3164's TIMESTAMP months, whatever the locale.
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


#: RFC 3164 section 4.1: a packet is at most 1024 bytes.
SYSLOG_MAX = 1024


SYSLOG_IDENT = "vmbackup"


#: Seconds one line may wait for a full syslog socket before it is dropped (and said).
SYSLOG_TIMEOUT = 5.0


def syslog_severity(levelno):
    """Return the syslog severity of a logging level: ERROR -> 3, WARNING -> 4, INFO -> 6."""
    return next(sev for level, sev in SEVERITIES if levelno >= level)


def syslog_frame(facility, levelno, when, message, pid, hostname=None, ident=SYSLOG_IDENT):
    """Return one RFC 3164 packet: `<PRI>Mmm dd hh:mm:ss [HOSTNAME ]TAG[PID]: MSG`, UTF-8.

    The HOSTNAME is left out on the local socket, as the C library's syslog() does (the
    local daemon adds it). A packet longer than SYSLOG_MAX bytes is cut there.

    >>> syslog_frame("user", logging.ERROR, datetime.datetime(2026, 12, 6, 9, 5, 1), "x", 42)
    b'<11>Dec  6 09:05:01 vmbackup[42]: x'
    """
    pri = FACILITIES[facility] * 8 + syslog_severity(levelno)
    head = "<%d>%s %2d %02d:%02d:%02d %s%s[%d]: " % (
        pri, MONTHS[when.month - 1], when.day, when.hour, when.minute, when.second,
        hostname + " " if hostname else "", ident, pid)
    packet = (head + message).encode("utf-8", "backslashreplace")
    if len(packet) > SYSLOG_MAX:
        packet = packet[:SYSLOG_MAX].decode("utf-8", "ignore").encode("utf-8")
    return packet


def syslog_target(address):
    """Return (family, address) of a syslog_address: '/dev/log' or 'host:port' (UDP).

    >>> syslog_target("/dev/log"), syslog_target("logs.example.org:514")
    ((1, '/dev/log'), (2, ('logs.example.org', 514)))
    """
    host, _, port = address.rpartition(":")
    if host and port.isdigit() and not address.startswith("/"):
        return socket.AF_INET, (host.strip("[]"), int(port))
    return socket.AF_UNIX, address


class SyslogHandler(logging.Handler):
    """Sends each log line to syslog as one RFC 3164 datagram; never raises into the run."""

    def __init__(self, address, facility, problems):
        logging.Handler.__init__(self)
        family, self.target = syslog_target(address)
        self.address, self.facility, self.problems = address, facility, problems
        self.hostname = socket.gethostname().split(".")[0] if family == socket.AF_INET else None
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.settimeout(SYSLOG_TIMEOUT)   # a stuck daemon costs lines, never the run
        try:
            self.sock.connect(self.target)
        except OSError:
            self.sock.close()
            raise

    def emit(self, record):
        try:
            when = datetime.datetime.fromtimestamp(record.created)
            for line in self.format(record).splitlines() or [""]:
                self.sock.send(syslog_frame(self.facility, record.levelno, when, line,
                                            os.getpid(), self.hostname))
        except OSError as exc:
            if not any(p.startswith("syslog") for p in self.problems):
                self.problems.append("syslog %s: a line was not sent: %s"
                                     % (self.address, exc.strerror or exc))

    def close(self):
        self.sock.close()
        logging.Handler.close(self)


class RunLines(logging.Handler):
    """Keeps the run's log lines (as stderr shows them) for its mail; notes the sinks' problems."""

    #: Lines kept at most (the last ones win): a mail quotes lines, it is not the log.
    LIMIT = 20000

    def __init__(self):
        logging.Handler.__init__(self, logging.INFO)
        self.lines = []
        self.problems = []      # what a sink could not do: warnings of the run

    def emit(self, record):
        self.lines.append(self.format(record))
        if len(self.lines) > self.LIMIT:
            del self.lines[: len(self.lines) - self.LIMIT]


def console_handler():
    """Return the stderr handler report.setup_logging installed (None before it ran)."""
    return next((h for h in log.handlers if getattr(h, "_vmbackup_console", False)), None)


@contextlib.contextmanager
def log_sinks(config):
    """Attach the log file, syslog and the RunLines for the block; yield the RunLines.

    The log file gets the lines stderr shows, in the same format, from info up even with
    -q (debug with -vv): -q quiets the terminal (cron's mail), not the record.
    """
    console = console_handler()
    formatter = console.formatter if console else logging.Formatter(
        "%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    level = min(logging.INFO, console.level) if console else logging.INFO
    lines = RunLines()
    lines.setFormatter(formatter)
    handlers = [lines]
    if config.log_file:
        try:
            handler = logging.FileHandler(config.log_file, "a", encoding="utf-8")
            handler.setFormatter(formatter)
            handler.setLevel(level)
            handlers.append(handler)
        except OSError as exc:
            lines.problems.append("cannot append to log_file %s: %s"
                                  % (config.log_file, exc.strerror or exc))
    if config.syslog:
        try:
            handler = SyslogHandler(config.syslog_address, config.syslog_facility, lines.problems)
            handler.setFormatter(logging.Formatter("%(message)s"))
            handler.setLevel(level)
            handlers.append(handler)
        except OSError as exc:
            lines.problems.append("cannot send to syslog at %s: %s"
                                  % (config.syslog_address, exc.strerror or exc))
    for handler in handlers:
        handler._vmbackup_sink = True
        log.addHandler(handler)
    try:
        yield lines
    except VmBackupError as exc:
        # a run that could not start: stderr gets its reason after the block, the log file
        # and syslog get it here (the mail has it already)
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (str(exc),), None)
        for handler in handlers[1:]:
            handler.handle(record)
        raise
    finally:
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()


def write_problem(path):
    """Return why a file could not be opened for writing at `path` (strerror), or None;
    creates nothing."""
    if os.path.isdir(path):
        return os.strerror(errno.EISDIR)
    if os.path.exists(path):
        return None if os.access(path, os.W_OK) else os.strerror(errno.EACCES)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return os.strerror(errno.ENOENT)
    return None if os.access(folder, os.W_OK | os.X_OK) else os.strerror(errno.EACCES)


def sink_problems(config):
    """Return the problems log_sinks would note for `config`'s log file and syslog, in its
    words, without writing anything (a unix syslog socket is connected to, nothing sent)."""
    problems = []
    if config.log_file and write_problem(config.log_file):
        problems.append("cannot append to log_file %s: %s"
                        % (config.log_file, write_problem(config.log_file)))
    if config.syslog:
        try:
            SyslogHandler(config.syslog_address, config.syslog_facility, problems).close()
        except OSError as exc:
            problems.append("cannot send to syslog at %s: %s"
                            % (config.syslog_address, exc.strerror or exc))
    return problems


def run_lines():
    """Return the RunLines of the run in progress (None outside log_sinks)."""
    return next((h for h in log.handlers if isinstance(h, RunLines)), None)
