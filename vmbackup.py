#!/usr/bin/env python3
"""vmbackup: back up the VMs of a XenServer / XCP-ng pool.

Snapshots the selected VMs, exports them (vm-export to .xva, or vdi-export of
chosen disks to .raw/.vhd), saves their metadata, prunes old backups, backs up
the pool database and the hosts, and reports the truth in its exit code.
Runs from a root crontab on a pool host (shelling out to xe) or from any
machine that reaches the pool (XenAPI plus XAPI's HTTP export handlers).

Usage (modern):
    vmbackup.py -c weekly.cfg
    vmbackup.py -e 'PRD-.*' -x PRD-PRINT -d /backups --max-backups 3 --preview
    vmbackup.py --server https://pool-master --password-file /root/.xapi.pw -e web01

Other commands (each has --help):
    vmbackup.py list ['web.*'] -d /backups          what backups exist, newest first
    vmbackup.py verify /backups                     check backups without a server
    vmbackup.py restore /backups/web01 [--preview]  import the newest backup as a new VM
    vmbackup.py diff /backups/web01                 configuration changes between backups

Usage (NAUbackup VmBackup.py compatible):
    vmbackup.py <password|password-file> <config-file|vm-selector> [preview]
                [compress=True|False] [ignore_extra_keys=True|False]
                [pre_clean=True|False]
    vmbackup.py <password> create-password-file=FILE
    vmbackup.py help|config|example

EXIT STATUS
    0  all selected work succeeded, nothing warned
    1  finished, with warnings (a VM's, or the run's: a selector matched no VM,
       nothing to back up)
    2  something failed (a VM, the pool or host backup, or the run itself), the
       run could not start (usage, configuration, login, unusable backup_dir),
       or it was terminated (SIGTERM)
    --preview exits with the code the run would have.
    Summary S:n W:n E:n: S units that succeeded (with or without warnings),
    W warnings, E failures; the run's own problems count in W or E.
  130  interrupted (Ctrl-C)
"""

# Built by tools/build.py from src/vmbackup/: edit the modules there and run `make`.


__version__ = "0.1.0"


import argparse
import base64
import collections
import contextlib
import copy
import datetime
import email.charset
import email.header
import email.mime.text
import email.utils
import errno
import glob
import gzip
import hashlib
import http.client
import json
import logging
import os
import queue
import re
import shlex
import shutil
import signal
import smtplib
import socket
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import typing
import unicodedata
import urllib.parse
import uuid as uuidlib
import xml.dom.minidom
import xml.etree.ElementTree
import xml.parsers.expat
import xmlrpc.client
import zlib
from typing import NamedTuple, Optional


# === vmbackup/errors.py =====================================================
# The errors vmbackup raises, each carrying its message and exit code, and the exit codes.
#
# Owns: EXIT_* codes, the `log` logger, VmBackupError and its kinds (usage, config,
# login, backup_dir, lock, XAPI calls, exports, restore, broken VHD chains), Terminated, BadFile.
# Imports: the standard library only. Every other module may import it.

PROG = "vmbackup.py"


EXIT_OK, EXIT_WARNING, EXIT_ERROR = 0, 1, 2


EXIT_INTERRUPTED = 130


log = logging.getLogger("vmbackup")


class VmBackupError(Exception):
    """{}"""

    exit_code = EXIT_ERROR

    def __str__(self):
        return self.__doc__.format(*self.args)


class UsageError(VmBackupError):
    """{}"""


class ConfigError(VmBackupError):
    """{}"""


class LoginError(VmBackupError):
    """cannot log in to {}: {}"""


class BackupDirError(VmBackupError):
    """{}"""


class LockHeld(VmBackupError):
    """backup_dir {} is in use by another vmbackup run (pid {}; its lock {} was refreshed {} ago); try again when it has finished (a lock not refreshed for 5 minutes is taken over)"""


class XapiCallFailed(VmBackupError):
    """XAPI {} failed: {}"""


class CallFailed(VmBackupError):
    """{}"""

    #: The XAPI error code behind the failure ('' when it cannot be told).
    code = ""


class Terminated(BaseException):
    """Raised by SIGTERM/SIGHUP so every `finally` and `with` cleans up; stops the whole run."""


def xapi_error_text(details):
    """Return one line for a XenAPI.Failure's ErrorDescription list."""
    if not details:
        return "unknown XAPI error"
    code, params = str(details[0]), [str(p) for p in details[1:] if str(p)]
    return code + (" " + ", ".join(params) if params else "")


class ExportFailed(VmBackupError):
    """{}"""


class ExportStalled(ExportFailed):
    """{} made no progress for {} seconds (stall_timeout): aborted"""


class BadFile(Exception):
    """A file that is not what it claims to be; str() is the one-line reason."""


class RestoreError(VmBackupError):
    """{}"""


class ChainBroken(VmBackupError):
    """{}"""


# === vmbackup/formats/xxh64.py ==============================================
# XXH64, the checksum XVA chunks carry: the C `xxhash` module when installed, else pure Python.
#
# Owns: xxh64_py, xxh64_hex.
# Imports: the standard library only.

try:  # fast C XXH64 when installed; dom0 usually lacks it, hence xxh64_py below
    import xxhash as _xxhash
except ImportError:  # pragma: no cover - depends on the host
    _xxhash = None


_P1, _P2, _P3 = 11400714785074694791, 14029467366897019727, 1609587929392839161


_P4, _P5 = 9650029242287828579, 2870177450012600261


_M64 = (1 << 64) - 1


#: One shared buffer of zeros: zero chunks are common and their hashes are cached.
_ZEROS = bytes(1 << 20)


_ZERO_XXH = {}


def _rotl64(value, bits):
    return ((value << bits) | (value >> (64 - bits))) & _M64


def _xxh_round(acc, word):
    acc = (acc + word * _P2) & _M64
    return (_rotl64(acc, 31) * _P1) & _M64


def xxh64_py(data, seed=0):
    """Return the XXH64 of `data` as an int, in pure Python (for hosts without `xxhash`).

    >>> "%016X" % xxh64_py(b"")
    'EF46DB3751D8E999'
    """
    data = bytes(data)
    n, pos = len(data), 0
    if n >= 32:
        stripes = n // 32
        words = struct.unpack_from("<%dQ" % (stripes * 4), data)
        lanes = []
        for lane, start in enumerate(((seed + _P1 + _P2) & _M64, (seed + _P2) & _M64,
                                      seed & _M64, (seed - _P1) & _M64)):
            acc = start
            for word in words[lane::4]:  # one lane at a time: the hot loop stays tiny
                acc = (acc + word * _P2) & _M64
                acc = ((((acc << 31) | (acc >> 33)) & _M64) * _P1) & _M64
            lanes.append(acc)
        v1, v2, v3, v4 = lanes
        h = (_rotl64(v1, 1) + _rotl64(v2, 7) + _rotl64(v3, 12) + _rotl64(v4, 18)) & _M64
        for lane in lanes:
            h = ((h ^ _xxh_round(0, lane)) * _P1 + _P4) & _M64
        pos = stripes * 32
    else:
        h = (seed + _P5) & _M64
    h = (h + n) & _M64
    while pos + 8 <= n:
        (word,) = struct.unpack_from("<Q", data, pos)
        h ^= _xxh_round(0, word)
        h = (_rotl64(h, 27) * _P1 + _P4) & _M64
        pos += 8
    if pos + 4 <= n:
        (word,) = struct.unpack_from("<I", data, pos)
        h ^= (word * _P1) & _M64
        h = (_rotl64(h, 23) * _P2 + _P3) & _M64
        pos += 4
    while pos < n:
        h ^= (data[pos] * _P5) & _M64
        h = (_rotl64(h, 11) * _P1) & _M64
        pos += 1
    h ^= h >> 33
    h = (h * _P2) & _M64
    h ^= h >> 29
    h = (h * _P3) & _M64
    return h ^ (h >> 32)


def xxh64_hex(data):
    """Return the XXH64 of `data` as XAPI writes it in `.xxhash` members: 16 uppercase hex digits."""
    if _xxhash is not None:
        return "%016X" % _xxhash.xxh64(data).intdigest()
    if len(data) <= len(_ZEROS) and _ZEROS.startswith(data):
        if len(data) not in _ZERO_XXH:
            _ZERO_XXH[len(data)] = "%016X" % xxh64_py(data)
        return _ZERO_XXH[len(data)]
    return "%016X" % xxh64_py(data)


# === vmbackup/util.py =======================================================
# Small helpers every layer uses: value parsers, human sizes, printable names, durable writes.
#
# Owns: parse_bool/int/percent/rate/compress/umask/fingerprint/text/addresses, human_size, one_line,
# display_width, printable, mask_credentials, partial_file (write to .part, rename on success), fsync, write_text,
# sha256_file, free_space.
# Imports: errors.

#: Sorts after every real device number (a userdevice that is not a number).
UNNUMBERED = 1 << 30


def parse_bool(text):
    """Return True/False for 1/0, true/false, yes/no, on/off; raise ValueError otherwise."""
    word = str(text).strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def parse_int(text, minimum=None):
    """Return int(text); raise ValueError naming the rule it breaks."""
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ValueError("not a whole number")
    if minimum is not None and value < minimum:
        raise ValueError("must be at least %d" % minimum)
    return value


def parse_percent(text):
    """Return a float percentage 0..100; raise ValueError otherwise."""
    try:
        value = float(str(text).strip().rstrip("%"))
    except ValueError:
        raise ValueError("not a number")
    if not 0 <= value <= 100:
        raise ValueError("must be between 0 and 100")
    return value


def parse_rate(text):
    """Return bytes per second for a rate like 100M (K, M, G, T are powers of 1024), or None.

    >>> parse_rate("100M"), parse_rate("1.5G/s"), parse_rate("2048"), parse_rate("0")
    (104857600, 1610612736, 2048, None)
    """
    word = str(text).strip().upper()
    match = re.match(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?(?:/S)?$", word)
    if not match:
        raise ValueError("expected a rate such as 100M (bytes per second; 0 means no limit)")
    value = float(match.group(1)) * 1024 ** " KMGT".index(match.group(2) or " ")
    return int(value) or None


def parse_compress(text):
    """Return None, 'gzip' or 'zstd' for a compress setting.

    >>> parse_compress("True"), parse_compress("zstd"), parse_compress("0")
    ('gzip', 'zstd', None)
    """
    word = str(text).strip().lower()
    if word in ("zstd", "gzip"):
        return word
    if word == "none":
        return None
    try:
        return "gzip" if parse_bool(word) else None
    except ValueError:
        raise ValueError("expected false, true, gzip or zstd")


def choice(*allowed):
    """Return a parser accepting one of `allowed` (case-insensitive)."""
    def parse(text):
        word = str(text).strip().lower()
        if word not in allowed:
            raise ValueError("expected one of " + ", ".join(allowed))
        return word
    return parse


def parse_umask(text):
    """Return an int umask from an octal string like '077'."""
    try:
        value = int(str(text).strip(), 8)
    except ValueError:
        raise ValueError("not an octal umask like 077")
    if not 0 <= value <= 0o777:
        raise ValueError("not an octal umask like 077")
    return value


def parse_fingerprint(text):
    """Return a normalised SHA-256 fingerprint (64 lowercase hex digits)."""
    digits = re.sub(r"[^0-9a-fA-F]", "", str(text).split("=")[-1]).lower()
    if len(digits) != 64:
        raise ValueError("expected a SHA-256 fingerprint (64 hex digits)")
    return digits


def parse_text(text):
    """Return the value as given, stripped."""
    return str(text).strip()


def parse_addresses(text):
    """Return the mail addresses of a comma-separated list; raise ValueError if one is not one.

    >>> parse_addresses("ops@example.org, Backup Team <backup@example.org>")
    ('ops@example.org', 'Backup Team <backup@example.org>')
    """
    found = tuple(a.strip() for a in str(text).split(",") if a.strip())
    for address in found:
        if not re.match(r"^(?:[^<>@]*<)?[^<>@\s]+@[^<>@\s]+>?$", address):
            raise ValueError("%r is not a mail address" % address)
    if not found:
        raise ValueError("expected one or more mail addresses, comma-separated")
    return found


def human_size(nbytes):
    """Return '1.5G'-style text for a byte count."""
    value = float(nbytes)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return ("%d%s" % (value, unit)) if unit == "B" else ("%.1f%s" % (value, unit))
        value /= 1024.0
    return "%dB" % nbytes  # pragma: no cover


def one_line(text, limit=300):
    """Return `text` on one line, cut to `limit` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def printable(name):
    """Return a VM name safe to print on one line (control characters escaped)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(name))


def display_width(text):
    """Return the columns `text` takes on a terminal: wide East Asian characters take two,
    combining marks none (`display_width("日本") == 4`)."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF"
               else 1 for c in text)


class partial_file:
    """`with partial_file(path) as tmp:` write tmp; renamed to path on success, removed on error."""

    def __init__(self, path):
        self.path = path
        self.tmp = path + ".part"

    def __enter__(self):
        if os.path.lexists(self.tmp):
            os.unlink(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            fsync_path(self.tmp)
            os.replace(self.tmp, self.path)
            fsync_dir(os.path.dirname(self.path))
        elif os.path.lexists(self.tmp):
            os.unlink(self.tmp)
        return False


def fsync_path(path):
    """Flush a file that another process wrote to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path):
    """Flush a folder's entries (renames) to stable storage, where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - some network file systems refuse
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_text(path, text):
    """Write `text` to `path` (UTF-8) and flush it to disk."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def sha256_file(path, bufsize=1 << 20):
    """Return the SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(bufsize), b""):
            digest.update(block)
    return digest.hexdigest()


def free_space(path):
    """Return (free bytes, total bytes, percent free) of the file system holding `path`."""
    st = os.statvfs(path)
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    return free, total, (100.0 * free / total) if total else 0.0


def mask_credentials(url):
    """Return `url` with any user:password@ replaced: 'https://root:pw@h/' -> 'https://***@h/'."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    netloc, slash, tail = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return scheme + sep + netloc + slash + tail


# === vmbackup/config.py =====================================================
# The settings: NAUbackup's .cfg keys, the selectors, the merged Config, example.cfg, password files.
#
# Owns: SETTINGS (every key, its default, parser and help), Selector and parse_selector,
# Config, parse_config/read_config_file/build_config, example_config,
# read_password_file/write_password_file.
# Imports: errors, util.

#: NAUbackup's documented defaults, kept so its config files mean the same here.
DEFAULT_BACKUP_DIR = "/snapshots/BACKUPS"


DEFAULT_STATUS_LOG = "/snapshots/NAUbackup/status.log"


DEFAULT_MAX_BACKUPS = 4


#: A selector made only of these characters is a plain name, compared literally.
PLAIN_NAME_RE = re.compile(r"^[A-Za-z0-9 _-]+$")


#: Selection modes, strongest first: a VM chosen for vdi-export is not also
#: vm-exported, and a full export already carries the metadata. delta-export (disk
#: chains: a full, then the changed blocks) stands between vdi-export and vm-export.
MODES = ("vdi-export", "delta-export", "vm-export", "meta-export")


#: Modes whose selectors name disks: NAME_OR_REGEX[:MAX[:DEV;DEV]].
DISK_MODES = ("vdi-export", "delta-export")


Setting = collections.namedtuple("Setting", "default parse help")


def parse_syslog_address(text):
    """Return a syslog_address: a unix socket path (absolute), or host:port (UDP, a port
    from 1 to 65535); raise ValueError for anything else ("host:notaport" is no path)."""
    value = str(text).strip()
    if value.startswith("/"):
        return value
    host, _, port = value.rpartition(":")
    if host.strip("[]") and port.isdigit() and 0 < int(port) < 65536:
        return value
    raise ValueError("expected a unix socket path (/dev/log) or host:port with a port from "
                     "1 to 65535")


#: Every scalar configuration key: default, parser, and the line example.cfg shows.
SETTINGS = collections.OrderedDict([
    ("backup_dir", Setting(DEFAULT_BACKUP_DIR, parse_text,
                           "folder that receives the backups (must exist)")),
    ("max_backups", Setting(DEFAULT_MAX_BACKUPS, lambda v: parse_int(v, 1),
                            "successful backups kept per VM (>= 1)")),
    ("max_meta_backups", Setting(None, lambda v: parse_int(v, 1),
                                 "metadata-only backups kept per VM, counted apart from the "
                                 "backups with disk data (default: max_backups)")),
    ("keep_daily", Setting(0, lambda v: parse_int(v, -1),
                           "GFS, as borg prune: beside the max_backups newest, also keep the "
                           "newest backup of each of this many more days (0: off, -1: all)")),
    ("keep_weekly", Setting(0, lambda v: parse_int(v, -1),
                            "GFS: then the newest of each of this many more weeks, Monday to "
                            "Sunday (0: off, -1: all)")),
    ("keep_monthly", Setting(0, lambda v: parse_int(v, -1),
                             "GFS: then the newest of each of this many more months (0: off, -1: all)")),
    ("keep_yearly", Setting(0, lambda v: parse_int(v, -1),
                            "GFS: then the newest of each of this many more years (0: off, -1: all)")),
    ("vdi_export_format", Setting("raw", choice("raw", "vhd"),
                                  "disk format of vdi-export: raw or vhd")),
    ("pool_db_backup", Setting(False, parse_bool, "back up the pool database (0|1)")),
    ("host_backup", Setting(False, parse_bool, "back up every host's dom0 (0|1)")),
    ("compress", Setting(None, parse_compress, "vm-export compression: false, true (gzip), gzip, zstd")),
    ("pre_clean", Setting(False, parse_bool,
                          "delete old backups down to max_backups-1 before exporting")),
    ("metadata_only", Setting(False, parse_bool, "save only metadata, no snapshot or disk export")),
    ("quiesce", Setting(False, parse_bool, "quiesced snapshots where the pool still supports them")),
    ("status_log", Setting(None, parse_text, "NAUbackup-style status log, appended per run")),
    ("space_threshold", Setting(5.0, parse_percent, "minimum %% free in backup_dir before each VM")),
    ("retries", Setting(0, lambda v: parse_int(v, 0), "retries of a failed export, with a new snapshot")),
    ("stall_timeout", Setting(600, lambda v: parse_int(v, 1),
                              "seconds without export progress before it is aborted")),
    ("max_rate", Setting(None, parse_rate, "bandwidth limit per export, e.g. 100M (bytes/s; 0: none)")),
    ("progress_interval", Setting(60, lambda v: parse_int(v, 1),
                                  "seconds between progress lines of an export when not on a terminal")),
    ("umask", Setting(0o077, parse_umask, "umask for backup files and folders (077: 0600/0700)")),
    ("server", Setting(None, parse_text, "https://host, http://host or unix:/path (default: this host)")),
    ("username", Setting("root", parse_text, "XAPI user")),
    ("password_file", Setting(None, parse_text, "file holding the XAPI password (mode 0600)")),
    ("transport", Setting("auto", choice("auto", "xe", "api"), "auto, xe or api")),
    ("xe_path", Setting(None, parse_text, "the xe binary (default /opt/xensource/bin/xe, then PATH)")),
    ("tls_ca_file", Setting(None, parse_text, "CA bundle that signed the pool's certificate")),
    ("tls_fingerprint", Setting(None, parse_fingerprint, "pinned SHA-256 fingerprint of the pool's certificate")),
    ("tls_insecure", Setting(False, parse_bool, "do not verify the pool's certificate (warns)")),
    # -- reports: log file, syslog, metrics, mail (notify, logsinks, metrics) --
    ("log_file", Setting(None, parse_text, "append the log (the lines stderr shows, info and up "
                                           "even with -q) to this file")),
    ("syslog", Setting(False, parse_bool, "send the log to syslog (ident vmbackup; journald "
                                          "reads /dev/log too) (0|1)")),
    ("syslog_address", Setting("/dev/log", parse_syslog_address,
                               "syslog socket: a unix datagram socket path, or host:port (UDP)")),
    ("syslog_facility", Setting("user", choice("user", "daemon", "local0", "local1", "local2",
                                               "local3", "local4", "local5", "local6", "local7"),
                                "syslog facility: user, daemon or local0..local7")),
    ("metrics_file", Setting(None, parse_text, "Prometheus textfile written after every run, e.g. "
                             "/var/lib/node_exporter/textfile_collector/vmbackup.prom")),
    ("mail_to", Setting(None, parse_addresses, "mail the run's report to these addresses "
                                               "(comma-separated)")),
    ("mail_from", Setting(None, parse_text, "sender address (default vmbackup@this host)")),
    ("mail_on", Setting("error", choice("always", "warning", "error"),
                        "when to mail: always, warning (warnings or errors), error")),
    ("mail_subject_prefix", Setting("[vmbackup]", parse_text, "first word of the subject")),
    ("smtp_server", Setting("localhost", parse_text, "SMTP server")),
    ("smtp_port", Setting(None, lambda v: parse_int(v, 1),
                          "SMTP port (default 25, 587 with starttls, 465 with ssl)")),
    ("smtp_security", Setting("none", choice("none", "starttls", "ssl"),
                              "none, starttls or ssl; starttls and ssl verify the server's "
                              "certificate and name")),
    ("smtp_ca_file", Setting(None, parse_text, "CA bundle for the SMTP server's certificate "
                                               "(default: the system's)")),
    ("smtp_username", Setting(None, parse_text, "SMTP AUTH user (needs starttls or ssl, "
                                                "or a server on this host)")),
    ("smtp_password_file", Setting(None, parse_text, "file holding the SMTP password "
                                                     "(mode 0600)")),
    ("smtp_timeout", Setting(30, lambda v: parse_int(v, 1),
                             "seconds an SMTP connection may wait; 3 tries in all")),
    ("full_interval", Setting(7, lambda v: parse_int(v, 0),
                              "delta-export: a new full every N points of a chain (0: never)")),
    ("jobs", Setting(1, lambda v: parse_int(v, 1), "VMs backed up at once (each its own snapshot)")),
    ("jobs_per_host", Setting(2, lambda v: parse_int(v, 0),
                              "exports one host serves at once (0: no limit besides jobs)")),
    ("jobs_per_sr", Setting(2, lambda v: parse_int(v, 0),
                            "exports reading one SR at once (0: no limit besides jobs)")),
])


#: Repeatable selector keys; underscore and hyphen spellings are the same key.
SELECTOR_KEYS = {"vm_export": "vm-export", "vdi_export": "vdi-export",
                 "meta_export": "meta-export", "exclude": "exclude",
                 "delta_export": "delta-export"}


#: Keys accepted on a NAUbackup command line as `key=value` words.
LEGACY_WORD_KEYS = ("compress", "ignore_extra_keys", "pre_clean")


class Selector(typing.NamedTuple):
    """One vm-export/vdi-export/meta-export/exclude line, parsed."""
    mode: str                   # vm-export, vdi-export, delta-export, meta-export or exclude
    pattern: str                # the name or regex as written
    max_backups: typing.Optional[int] = None   # None: the global max_backups
    devices: typing.Tuple[str, ...] = ()       # vdi-export disks, () = root disk; delta-export, () = all
    origin: str = "command line"               # "file:line" or "command line"
    gfs: typing.Optional[typing.Tuple[int, int, int, int]] = None   # its own keep_daily,
    # keep_weekly, keep_monthly, keep_yearly ('web01:4+7d+4w'); None: the global keep_* settings

    @property
    def is_plain(self):
        return bool(PLAIN_NAME_RE.match(self.pattern))

    @property
    def text(self):
        """The selector as a config line would write it."""
        return "%s=%s" % (self.mode, self.pattern)

    def matches(self, name):
        """Return True if this selector picks a VM called `name`."""
        if self.is_plain:
            return name == self.pattern
        return re.match(self.pattern, name) is not None


_SELECTOR_TAIL = {
    # NAME:MAX:DEV;DEV  (the regex part may itself hold colons, so split from the right)
    "vdi-export": re.compile(r"^(?P<name>.+?)(?::(?P<max>[-+0-9dwmy]*)(?::(?P<devs>[A-Za-z0-9;, ]*))?)?$",
                             re.S),
    "other": re.compile(r"^(?P<name>.+?)(?::(?P<max>[-+0-9dwmy]*))?$", re.S),
}


#: A selector's MAX field: MAX_BACKUPS, then GFS terms ('4+7d+4w+12m+2y', '12m'), the keep_daily,
#: keep_weekly, keep_monthly and keep_yearly of its VMs. Before these terms a MAX with a letter
#: or a '+' was an error, so no config that worked changes meaning.
_KEEP_FIELD = re.compile(r"^(?P<count>(?:-?\d+)?)(?P<gfs>(?:(?:^|\+)-?\d+[dwmy])*)$")


#: The GFS term letters, in the order of Selector.gfs.
GFS_UNITS = "dwmy"


def parse_keep_field(text, raw):
    """Return (max_backups or None, gfs or None) of the MAX field `text` of selector `raw`;
    raise ValueError. "4" -> (4, None); "4+7d+2y" -> (4, (7, 0, 0, 2)); "12m" -> (None, (0, 0, 12, 0))."""
    match = _KEEP_FIELD.match(text or "")
    if not match:
        raise ValueError("MAX %r in %r: write a number, or a number and GFS terms like "
                         "4+7d+4w+12m+2y (days, weeks, months, years)" % (text, raw))
    count, terms = match.group("count"), match.group("gfs")
    max_backups = None
    if count not in ("", "-1"):
        max_backups = int(count)
        if max_backups < 1:
            raise ValueError("max_backups in %r must be at least 1 (or -1 for the default)" % raw)
    if not terms:
        return max_backups, None
    gfs = [None] * len(GFS_UNITS)
    for term in terms.split("+"):
        if not term:
            continue
        slot = GFS_UNITS.index(term[-1])
        if gfs[slot] is not None:
            raise ValueError("MAX %r in %r gives the %r term twice" % (text, raw, term[-1]))
        gfs[slot] = int(term[:-1])
        if gfs[slot] < -1:
            raise ValueError("%r in %r must be at least -1 (-1: every period)" % (term, raw))
    return max_backups, tuple(n or 0 for n in gfs)


#: What a selector with a mistyped MAX looks like ('web01:abc', 'DEV-web3:x:xvda'): a word
#: after the last (or, for vdi-export, the last but one) colon. Regex syntax never ends so.
_BAD_MAX = {
    "vdi-export": re.compile(r"^.*?[^:]:(?P<max>[A-Za-z0-9_+.-]*[A-Za-z_+.][A-Za-z0-9_+.-]*)"
                             r"(?::[A-Za-z0-9;, ]*)?$", re.S),
    "other": re.compile(r"^.*[^:]:(?P<max>[A-Za-z0-9_+.-]*[A-Za-z_+.][A-Za-z0-9_+.-]*)$", re.S),
}


def parse_selector(text, mode, origin="command line"):
    """Return a Selector for 'NAME_OR_REGEX[:MAX[:DEV;DEV]]'; raise ValueError if invalid.

    >>> parse_selector("DEV-web3:7:xvda;xvdb", "vdi-export")[1:4]
    ('DEV-web3', 7, ('xvda', 'xvdb'))
    """
    raw = text.strip()
    if not raw:
        raise ValueError("empty selector")
    form = "vdi-export" if mode in DISK_MODES else "other"
    match = _SELECTOR_TAIL[form].match(raw)
    name, max_text = match.group("name"), match.group("max")
    devs = match.groupdict().get("devs") or ""
    bad = _BAD_MAX[form].match(name)
    if bad and not PLAIN_NAME_RE.match(name):
        raise ValueError("MAX_BACKUPS %r in %r is not a whole number (NAME_OR_REGEX[:MAX%s], "
                         "MAX = N or N+7d+4w+12m+2y)"
                         % (bad.group("max"), raw, "[:DEV;DEV]" if mode in DISK_MODES else ""))
    max_backups, gfs = parse_keep_field(max_text, raw)
    devices = tuple(d.strip() for d in re.split(r"[;,]", devs) if d.strip())
    if not PLAIN_NAME_RE.match(name):
        try:
            re.compile(name)
        except re.error as exc:
            raise ValueError("invalid regex: %s=%s (%s)" % (mode, raw, exc))
    return Selector(mode, name, max_backups, devices, origin, gfs)


class Config(typing.NamedTuple):
    """The effective settings of one run: defaults < config file < command line."""
    backup_dir: str = DEFAULT_BACKUP_DIR
    max_backups: int = DEFAULT_MAX_BACKUPS
    max_meta_backups: typing.Optional[int] = None
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    vdi_export_format: str = "raw"
    pool_db_backup: bool = False
    host_backup: bool = False
    compress: typing.Optional[str] = None
    pre_clean: bool = False
    metadata_only: bool = False
    quiesce: bool = False
    status_log: typing.Optional[str] = None
    space_threshold: float = 5.0
    retries: int = 0
    stall_timeout: int = 600
    max_rate: typing.Optional[int] = None
    progress_interval: int = 60
    umask: int = 0o077
    server: typing.Optional[str] = None
    username: str = "root"
    password_file: typing.Optional[str] = None
    transport: str = "auto"
    xe_path: typing.Optional[str] = None
    tls_ca_file: typing.Optional[str] = None
    tls_fingerprint: typing.Optional[str] = None
    tls_insecure: bool = False
    log_file: typing.Optional[str] = None
    syslog: bool = False
    syslog_address: str = "/dev/log"
    syslog_facility: str = "user"
    metrics_file: typing.Optional[str] = None
    mail_to: typing.Optional[typing.Tuple[str, ...]] = None
    mail_from: typing.Optional[str] = None
    mail_on: str = "error"
    mail_subject_prefix: str = "[vmbackup]"
    smtp_server: str = "localhost"
    smtp_port: typing.Optional[int] = None
    smtp_security: str = "none"
    smtp_ca_file: typing.Optional[str] = None
    smtp_username: typing.Optional[str] = None
    smtp_password_file: typing.Optional[str] = None
    smtp_timeout: int = 30
    full_interval: int = 7
    jobs: int = 1
    jobs_per_host: int = 2
    jobs_per_sr: int = 2
    selectors: typing.Tuple[Selector, ...] = ()
    config_file: typing.Optional[str] = None
    origins: typing.Dict[str, str] = {}   # key -> "file:line" or "command line"

    def where(self, key):
        """Return where a setting came from, for error messages."""
        return self.origins.get(key, "default")


class ParsedFile(typing.NamedTuple):
    """What a config file says: scalar settings, selectors, and where each came from."""
    values: typing.Dict[str, typing.Any]
    selectors: typing.List[Selector]
    origins: typing.Dict[str, str]


def normalise_key(key):
    """Return the canonical spelling of a config key ('vm_export' -> 'vm-export')."""
    k = key.strip().lower().replace("-", "_")
    return SELECTOR_KEYS.get(k, k)


def parse_config(text, filename="<config>", ignore_extra_keys=False):
    """Return a ParsedFile for NAUbackup-style `key=value` text; raise ConfigError naming file:line.

    `#` starts a comment line, blank lines are skipped, and values may contain `=`:
    "vm-export=PRD-.*:5" -> Selector("vm-export", "PRD-.*", 5).
    """
    values, selectors, origins = {}, [], {}
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = "%s:%d" % (filename, lineno)
        if "=" not in stripped:
            raise ConfigError("%s: not a key=value line: %r" % (where, stripped))
        key, value = (part.strip() for part in stripped.split("=", 1))
        canon = normalise_key(key)
        if canon in SELECTOR_KEYS.values():
            try:
                selectors.append(parse_selector(value, canon, where))
            except ValueError as exc:
                raise ConfigError("%s: %s=%s: %s" % (where, key, value, exc))
        elif canon in SETTINGS:
            try:
                values[canon] = SETTINGS[canon].parse(value)
            except ValueError as exc:
                raise ConfigError("%s: %s=%s: %s" % (where, key, value, exc))
            origins[canon] = where
        elif not ignore_extra_keys:
            raise ConfigError("%s: unknown key %r (ignore_extra_keys=true skips unknown keys)"
                              % (where, key))
    return ParsedFile(values, selectors, origins)


def read_config_file(path, ignore_extra_keys=False):
    """Return the ParsedFile of the config file at `path`; raise ConfigError if unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("cannot read config file %s: %s" % (path, getattr(exc, "strerror", exc)))
    return parse_config(text, path, ignore_extra_keys)


def build_config(file=None, cli_values=None, cli_selectors=(), config_file=None):
    """Return the Config of defaults < file < command line.

    Command-line export selectors replace the file's; command-line excludes add to them.
    """
    values = {key: setting.default for key, setting in SETTINGS.items()}
    origins = {}
    selectors = []
    if file is not None:
        values.update(file.values)
        origins.update(file.origins)
        selectors = list(file.selectors)
        if config_file and "status_log" not in file.values:
            values["status_log"] = DEFAULT_STATUS_LOG  # NAUbackup logs config-file runs
            origins["status_log"] = "default for config-file runs"
    for key, value in (cli_values or {}).items():
        if value is not None:
            values[key] = value
            origins[key] = "command line"
    cli_selectors = list(cli_selectors)
    if any(s.mode != "exclude" for s in cli_selectors):
        selectors = [s for s in selectors if s.mode == "exclude"]
    selectors.extend(cli_selectors)
    return Config(selectors=tuple(selectors), config_file=config_file, origins=origins, **values)


def example_config():
    """Return the text of example.cfg: every key with a comment."""
    lines = [
        "# vmbackup configuration: key=value lines, '#' comments, blank lines ignored.",
        "# NAUbackup VmBackup.py config files work unchanged.",
        "#",
        "# Selectors (repeatable): NAME_OR_REGEX[:MAX_BACKUPS] for vm-export, meta-export and",
        "# exclude; NAME_OR_REGEX[:MAX_BACKUPS[:DEV;DEV...]] for vdi-export (default disk: xvda).",
        "# A plain name (letters, digits, spaces, - and _) matches exactly that VM; anything else",
        "# is a Python regex matched at the start of the name (re.match): end it with $ to anchor.",
        "# Plain names win over regexes, excludes win over everything, vdi-export wins over",
        "# delta-export, which wins over vm-export, and the last line for the same VM sets its",
        "# MAX_BACKUPS. Order does not matter.",
        "# MAX_BACKUPS may carry GFS terms, that VM's own keep_daily/weekly/monthly/yearly:",
        "# PRD-db.*:4+7d+4w+12m keeps the 4 newest backups, then the newest of each of 7 more",
        "# days, 4 more weeks and 12 more months ('+2y': 2 more years; a term left out is 0).",
        "#",
        "# The selectors below are examples, commented out: as printed, this file backs up",
        "# nothing (the run says so). Uncomment and edit the ones you want.",
        "",
        "#exclude=DEV-phishing-test",
        "#exclude=PRD-PRINT$",
        "#vdi-export=DEV-web3:7",
        "#vdi-export=DEV-.*[Tt]est.*:3:xvda;xvdb",
        "#vm-export=PRD-.*",
        "#vm-export=.*SAVE$:5",
        "#vm-export=my-third-vm:3",
        "#vm-export=PRD-db.*:4+7d+4w+12m",
        "# incremental: a full image, then only the changed blocks (CBT, NBD), disk chains;",
        "# NAME_OR_REGEX[:MAX_BACKUPS[:DEV;DEV...]] (default: every disk but [NOBAK] ones)",
        "#delta-export=PRD-db.*:14",
        "# metadata only (no snapshot, no disk export): cheap enough to run hourly; its",
        "# backups are counted apart from the data backups (max_meta_backups)",
        "#meta-export=DEV-.*",
        "",
    ]
    for key, setting in SETTINGS.items():
        lines.append("# " + setting.help.replace("%%", "%"))
        default = setting.default
        if key == "umask":
            shown = "%03o" % default
        elif isinstance(default, bool):
            shown = "1" if default else "0"
        elif default is None:
            shown = None
        else:
            shown = str(default)
        if key == "compress":
            shown = "false"
        lines.append("%s=%s" % (key, shown) if shown is not None else "#%s=" % key)
        lines.append("")
    return "\n".join(lines)


def read_password_file(path, legacy=False):
    """Return the password held in `path`; raise ConfigError if unreadable or exposed.

    A modern password file holds the password on its first line and must not be
    readable by group or others. NAUbackup's files hold it base64-encoded
    ("obscured", which protects nothing): accepted with a warning if exposed.
    """
    try:
        st = os.stat(path)
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ConfigError("cannot read password file %s: %s" % (path, exc.strerror))
    exposed = st.st_mode & (stat.S_IRWXG | stat.S_IRWXO)
    if exposed and not legacy:
        raise ConfigError("password file %s is readable by other users (mode %03o); run: chmod 600 %s"
                          % (path, stat.S_IMODE(st.st_mode), path))
    if exposed:
        log.warning("password file %s is readable by other users (mode %03o): chmod 600 it",
                    path, stat.S_IMODE(st.st_mode))
    text = data.decode("utf-8", "replace").strip()
    if legacy:
        try:
            return base64.b64decode(text.encode("ascii"), validate=True).decode("utf-8")
        except (ValueError, UnicodeError):
            pass  # not base64: a plain password file
    return text.splitlines()[0] if text else ""


def write_password_file(path, password):
    """Write NAUbackup's base64 password file at `path` with mode 0600; refuse to overwrite."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise ConfigError("cannot create password file %s: %s" % (path, exc.strerror))
    with os.fdopen(fd, "wb") as handle:
        handle.write(base64.b64encode(password.encode("utf-8")) + b"\n")


# === vmbackup/formats/tar.py ================================================
# A strict streaming tar reader, the one the product uses for XVA files.
#
# Owns: TarStream, TarMember, _read_exact, _HashingReader.
# Imports: errors, formats.xxh64.

class _HashingReader(object):
    """Sequential reads of a binary file that also feed a SHA-256."""

    def __init__(self, handle):
        self.handle = handle
        self.digest = hashlib.sha256()

    def read(self, size=-1):
        data = self.handle.read(size)
        self.digest.update(data)
        return data

    def readable(self):
        return True

    def drain(self, bufsize=1 << 20):
        """Read to the end of the file (so the digest covers all of it); return the bytes read."""
        total = 0
        while True:
            data = self.read(bufsize)
            if not data:
                return total
            total += len(data)


def _read_exact(stream, size):
    """Return exactly `size` bytes of `stream`, or fewer only at its end."""
    data = stream.read(size)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = stream.read(size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


TarMember = collections.namedtuple("TarMember", "name size type offset")


_TAR_BLOCK = 512


def _tar_number(field, what, offset):
    """Return a tar header number (octal, or GNU base-256); raise BadFile."""
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        value = 0
        for byte in bytearray(field[1:]):
            value = (value << 8) | byte
        return value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise BadFile("tar header at byte %d is corrupt (%s %r)" % (offset, what, text[:16]))


class TarStream(object):
    """A tar archive read strictly in order from a stream: `next()` members, `read_body()` them.

    Raises BadFile for a corrupt header, a member cut short, or an archive that
    ends without its two zero end-of-archive blocks (a truncated download).
    """

    def __init__(self, stream):
        self.stream = stream
        self.pos = 0            # bytes consumed from the stream
        self.left = 0           # unread body + padding of the current member
        self.body_left = 0

    def _read(self, size):
        data = _read_exact(self.stream, size)
        self.pos += len(data)
        return data

    def _skip(self, size):
        while size > 0:
            data = self._read(min(size, 1 << 20))
            if not data:
                raise BadFile("truncated: the tar stream ends inside a member (at byte %d)"
                              % self.pos)
            size -= len(data)

    def next(self):
        """Return the next TarMember, or None at the end-of-archive marker; raise BadFile."""
        self._skip(self.left)
        self.left = self.body_left = 0
        long_name = None
        while True:
            offset = self.pos
            block = self._read(_TAR_BLOCK)
            if not block:
                raise BadFile("truncated: the tar stream ends at byte %d without its "
                              "end-of-archive blocks" % offset)
            if len(block) < _TAR_BLOCK:
                raise BadFile("truncated: the tar stream ends inside a header (at byte %d)" % offset)
            if block == _ZEROS[:_TAR_BLOCK]:
                second = self._read(_TAR_BLOCK)
                if second != _ZEROS[:_TAR_BLOCK]:
                    raise BadFile("truncated or corrupt: a lone zero block at byte %d instead "
                                  "of the two end-of-archive blocks" % offset)
                return None
            stored = _tar_number(block[148:156], "checksum", offset)
            plain = block[:148] + b"        " + block[156:]
            if stored not in (sum(bytearray(plain)),
                              sum(b - 256 if b > 127 else b for b in bytearray(plain))):
                raise BadFile("tar header at byte %d is corrupt (checksum mismatch)" % offset)
            size = _tar_number(block[124:136], "size", offset)
            kind = block[156:157]
            name = block[:100].split(b"\0", 1)[0]
            if block[257:262] == b"ustar" and block[345:346] != b"\0":
                name = block[345:500].split(b"\0", 1)[0] + b"/" + name
            if kind in (b"L", b"x", b"g"):  # GNU long name, pax headers: read and apply
                body = self._read(size)
                if len(body) < size:
                    raise BadFile("truncated: the tar stream ends inside a header (at byte %d)"
                                  % offset)
                self._skip(-size % _TAR_BLOCK)
                if kind == b"L":
                    long_name = body.split(b"\0", 1)[0]
                elif kind == b"x":
                    for record in body.split(b"\n"):
                        if b" path=" in record:
                            long_name = record.split(b" path=", 1)[1]
                continue
            name = long_name if long_name is not None else name
            self.left = size + (-size % _TAR_BLOCK) if kind not in (b"1", b"2", b"5") else 0
            self.body_left = size if self.left else 0
            return TarMember(name.decode("utf-8", "replace"), size if self.left else 0,
                             kind.decode("ascii", "replace") or "0", offset)

    def read_body(self, limit=None):
        """Return the current member's whole body (at most `limit` bytes); raise BadFile."""
        size = self.body_left
        if limit is not None and size > limit:
            raise BadFile("member is %d bytes, more than the %d expected" % (size, limit))
        data = self._read(size)
        if len(data) < size:
            raise BadFile("truncated: the tar stream ends inside a member (at byte %d)" % self.pos)
        self.left -= size
        self.body_left = 0
        return data

    def skip_rest(self):
        """Read everything after the end-of-archive marker (padding); return its length."""
        total = 0
        while True:
            data = self._read(1 << 20)
            if not data:
                return total
            total += len(data)


# === vmbackup/logsinks.py ===================================================
# Where a run's log goes besides stderr: a log file, syslog, and the run's own lines for its mail.
#
# Owns: syslog_frame (RFC 3164 framing, pure), SyslogHandler, RunLines, log_sinks (the
# context manager a run is inside), run_lines (what the mail quotes), write_problem and sink_problems (what the preview
# checks without opening anything). A sink that cannot
# be opened or written is a problem noted on RunLines; the run records it as a warning
# when it reports (notify.send_reports), so it counts in W and the exit code.
# Imports: errors.

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


# === vmbackup/nbd.py ========================================================
# The one NBD client: reads a snapshot's blocks from XAPI's NBD server (xapi-nbd).
#
# Owns: NbdClient (fixed newstyle handshake, NBD_OPT_STARTTLS with the certificate that
# VDI.get_nbd_info returns pinned and checked, NBD_OPT_EXPORT_NAME, NBD_CMD_READ,
# NBD_CMD_DISC), NbdError, nbd_tls_context, connect_info.
# xapi-nbd speaks only NBD_OPT_EXPORT_NAME (no GO/INFO, no structured replies), so this
# client asks for nothing else (facts §7; the simulator's `protocol: xapi`).
# Imports: errors; the standard library.

NBD_MAGIC = b"NBDMAGIC"
NBD_IHAVEOPT = b"IHAVEOPT"
NBD_REPLY_MAGIC = 0x3E889045565A9
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_FLAG_FIXED_NEWSTYLE = 1
NBD_FLAG_NO_ZEROES = 2
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_STARTTLS = 5
NBD_REP_ACK = 1
NBD_CMD_READ = 0
NBD_CMD_DISC = 2
#: one read request at most this long (xapi-nbd and nbdkit accept 32 MiB; stay well below)
MAX_READ = 4 << 20


class NbdError(VmBackupError):
    """NBD {}"""


def nbd_tls_context(cert_pem):
    """Return an SSLContext that trusts exactly the PEM certificate `cert_pem`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    try:
        ctx.load_verify_locations(cadata=cert_pem)
    except (ssl.SSLError, ValueError) as e:
        raise NbdError("certificate from get_nbd_info unreadable: {}".format(e))
    return ctx


def _recv_exact(sock, n):
    """Return exactly n bytes from sock; raise NbdError if the peer closes first."""
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(min(n - len(buf), 1 << 20))
        except OSError as e:
            raise NbdError("connection failed: {}".format(e))
        if not chunk:
            raise NbdError("server closed the connection ({} of {} bytes)".format(len(buf), n))
        buf += chunk
    return bytes(buf)


class NbdClient:
    """One NBD connection to one export; a context manager that sends NBD_CMD_DISC on exit.

    NbdClient(address, port, exportname, cert=PEM, subject=name) uses TLS and checks the
    server's certificate against `cert` (hostname `subject`); cert=None means plain NBD.
    """

    def __init__(self, address, port, exportname, cert=None, subject=None, timeout=60.0):
        self.size = None
        self.tls = cert is not None
        self._handle = 0
        try:
            self.sock = socket.create_connection((address, int(port)), timeout=timeout)
        except OSError as e:
            raise NbdError("cannot connect to {}:{}: {}".format(address, port, e))
        try:
            self._handshake(exportname, cert, subject or address)
        except BaseException:
            self.sock.close()
            raise

    def _handshake(self, exportname, cert, hostname):
        """Negotiate (fixed newstyle), STARTTLS if cert, then EXPORT_NAME; sets self.size."""
        head = _recv_exact(self.sock, 18)
        if head[:16] != NBD_MAGIC + NBD_IHAVEOPT:
            raise NbdError("server is not a newstyle NBD server")
        (server_flags,) = struct.unpack(">H", head[16:])
        if not server_flags & NBD_FLAG_FIXED_NEWSTYLE:
            raise NbdError("server does not speak fixed newstyle")
        flags = NBD_FLAG_FIXED_NEWSTYLE | (server_flags & NBD_FLAG_NO_ZEROES)
        self.sock.sendall(struct.pack(">I", flags))
        if cert is not None:
            self._starttls(cert, hostname)
        name = exportname.encode("utf-8")
        self.sock.sendall(NBD_IHAVEOPT + struct.pack(">II", NBD_OPT_EXPORT_NAME, len(name)) + name)
        reply = _recv_exact(self.sock, 10)
        self.size, self.flags = struct.unpack(">QH", reply)
        if not flags & NBD_FLAG_NO_ZEROES:
            _recv_exact(self.sock, 124)

    def _starttls(self, cert, hostname):
        """Ask for TLS and wrap the socket; raise NbdError if refused or the cert differs."""
        self.sock.sendall(NBD_IHAVEOPT + struct.pack(">II", NBD_OPT_STARTTLS, 0))
        magic, opt, rtype, length = struct.unpack(">QIII", _recv_exact(self.sock, 20))
        _recv_exact(self.sock, length)
        if magic != NBD_REPLY_MAGIC or opt != NBD_OPT_STARTTLS or rtype != NBD_REP_ACK:
            raise NbdError("server refused STARTTLS (reply {:#x})".format(rtype))
        ctx = nbd_tls_context(cert)
        try:
            self.sock = ctx.wrap_socket(self.sock, server_hostname=hostname)
        except (ssl.SSLError, ssl.CertificateError, OSError) as e:
            raise NbdError("TLS with the certificate from get_nbd_info failed: {}".format(e))
        pinned = ssl.PEM_cert_to_DER_cert(cert.strip() + "\n")
        if self.sock.getpeercert(binary_form=True) != pinned:
            raise NbdError("server certificate is not the one get_nbd_info named")

    def _request(self, cmd, offset, length):
        self._handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, cmd,
                                      self._handle, offset, length))
        return self._handle

    def read(self, offset, length):
        """Return `length` bytes at `offset`; raise NbdError on any error reply or drop."""
        out = bytearray()
        while length > 0:
            n = min(length, MAX_READ)
            handle = self._request(NBD_CMD_READ, offset, n)
            magic, error, got = struct.unpack(">IIQ", _recv_exact(self.sock, 16))
            if magic != NBD_SIMPLE_REPLY_MAGIC or got != handle:
                raise NbdError("bad reply from server (magic {:#x})".format(magic))
            if error:
                raise NbdError("read of {} bytes at {} failed: error {}".format(n, offset, error))
            out += _recv_exact(self.sock, n)
            offset, length = offset + n, length - n
        return bytes(out)

    def close(self):
        """Send NBD_CMD_DISC (best effort) and close the socket."""
        try:
            self._request(NBD_CMD_DISC, 0, 0)
        except OSError:
            pass
        finally:
            self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect_info(info, allow_insecure=False, timeout=60.0):
    """Return an NbdClient for one get_nbd_info record (TLS when it carries a cert)."""
    cert = info.get("cert") or None
    if cert is None and not allow_insecure:
        raise NbdError("server {} offers only insecure NBD".format(info.get("address")))
    return NbdClient(info["address"], info["port"], info["exportname"], cert=cert,
                     subject=info.get("subject") or None, timeout=timeout)


# === vmbackup/store.py ======================================================
# The backup directory and the one model of a backup folder in it.
#
# Owns: safe_dirname, inside, stamp and the backup-folder/dated-file names; the backup
# folder model (BackupFolder, read_backup_folder) and its rules, each written once:
# is_complete (is this folder a finished backup?), file_kind (is this file an XVA?),
# legacy_root_disk and legacy_disk_files (which DISK-* does a NAUbackup disk file hold?),
# backup_vm_uuid and group_by_vm (whose backups does a VM folder hold?); MANIFEST and the
# success markers, read_manifest/read_cfg/manifest_text; the Store interface and LocalStore; RunLock;
# check_backup_dir/check_space/log_df, folder_size.
# Imports: errors, util.

def check_backup_dir_readonly(config):
    """Return problems with backup_dir found without writing anything (for preview)."""
    path = config.backup_dir
    where = config.where("backup_dir")
    if not os.path.exists(path):
        return ["backup_dir=%s (%s): the folder does not exist" % (path, where)]
    if not os.path.isdir(path):
        return ["backup_dir=%s (%s): not a folder" % (path, where)]
    if not os.access(path, os.W_OK | os.X_OK):
        return ["backup_dir=%s (%s): not writable" % (path, where)]
    return []


#: Characters that break SMB/NTFS shares or paths; NAUbackup's ':' in folder
#: names broke SMB (its issue #4).
UNSAFE_CHARS = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')


#: backup-YYYY-MM-DD-HHMMSS, and NAUbackup's backup-YYYY-MM-DD-(HH:MM:SS).
BACKUP_DIR_RE = re.compile(r"^backup-(\d{4})-(\d\d)-(\d\d)-(?:(\d\d)(\d\d)(\d\d)|\((\d\d):(\d\d):(\d\d)\))$")


#: pool_db_YYYYMMDD-HHMMSS.dump and host_YYYYMMDD-HHMMSS.xbk
DATED_FILE_RE = re.compile(r"^(?:pool_db|host)_(\d{8})-(\d{6})\.(?:dump|xbk)$")


#: The marker vmbackup writes last, after the manifest: the backup is complete.
SUCCESS_MARKER = "success"


#: The markers of a complete NAUbackup backup (no manifest). VmBackup.py v3.25 wrote
#: `success`, or `success_compress` when the export was over 60 GiB (for a server-side
#: compression script, which leaves `success_compressing`/`success_restore`); its own
#: check (get_last_backup_dir_that_failed) counts all four as complete.
LEGACY_SUCCESS_MARKERS = (SUCCESS_MARKER, "success_compress", "success_compressing",
                          "success_restore")


#: The prefix a backup folder is renamed to before it is removed (store.LocalStore.delete).
DELETING = ".deleting-"


#: vmbackup's manifest: its presence makes a folder a vmbackup backup, not a legacy one.
MANIFEST = "backup.json"


#: The VM's metadata (the ova.xml of a metadata export) in every backup folder.
METADATA_FILE = "vm-metadata.xml"


#: The file a vm-export writes, by the `compress` setting.
XVA_SUFFIXES = {None: ".xva", "gzip": ".xva.gz", "zstd": ".xva.zst"}


#: What a backup file is, by how its name ends; verify checks each kind its own way.
FILE_KINDS = (("xva", (".xva", ".xva.gz", ".xva.zst")), ("vhd", (".vhd",)), ("raw", (".raw",)),
              ("metadata", (METADATA_FILE,)))


def safe_dirname(name):
    """Return `name` made safe as one path component.

    No '/', '\\', ':' or control characters, no leading dot, never '.' or '..'
    or empty, at most 200 bytes: "../../etc" -> "_._.._etc".
    """
    text = UNSAFE_CHARS.sub("_", str(name)).strip()
    text = re.sub(r"^\.", "_", text).rstrip(". ")
    while len(text.encode("utf-8")) > 200:
        text = text[:-1]
    return text if text not in ("", ".", "..") else "_"


def inside(root, *parts):
    """Return root/parts, refusing any result that resolves outside `root`."""
    base = os.path.realpath(root)
    path = os.path.realpath(os.path.join(base, *parts))
    if path != base and not path.startswith(base + os.sep):
        raise BackupDirError("refusing to write outside backup_dir: %r" % (parts,))
    return path


def stamp(moment):
    """Return the folder stamp of a datetime: 2026-11-23-184501."""
    return moment.strftime("%Y-%m-%d-%H%M%S")


def parse_backup_name(name):
    """Return the datetime a backup folder name encodes, or None if it is not one."""
    match = BACKUP_DIR_RE.match(name)
    if not match:
        return None
    g = match.groups()
    hms = g[3:6] if g[3] is not None else g[6:9]
    try:
        return datetime.datetime(*(int(x) for x in g[:3] + tuple(hms)))
    except ValueError:
        return None


def parse_dated_file(name):
    """Return the datetime of a pool_db_/host_ backup file name, or None."""
    match = DATED_FILE_RE.match(name)
    if not match:
        return None
    try:
        return datetime.datetime.strptime(match.group(1) + match.group(2), "%Y%m%d%H%M%S")
    except ValueError:
        return None


# -- the backup folder model: each rule once ----------------------------------------
def is_nau_name(name):
    """Return True if `name` is NAUbackup's backup-YYYY-MM-DD-(HH:MM:SS) folder name."""
    match = BACKUP_DIR_RE.match(name)
    return bool(match) and match.group(7) is not None


def is_complete(entries):
    """Return True if a backup folder holding `entries` (its file names) is a finished backup.

    The one rule. A vmbackup folder (it has backup.json) is complete with `success`,
    which vmbackup writes only after the manifest. A NAUbackup folder (no manifest) is
    complete with any of NAUbackup's markers, success_compress included.
    """
    if MANIFEST in entries:
        return SUCCESS_MARKER in entries
    return any(marker in entries for marker in LEGACY_SUCCESS_MARKERS)


def is_legacy_folder(name, entries):
    """Return True if NAUbackup wrote the folder `name` holding `entries`: no manifest and a
    NAUbackup name, backup-YYYY-MM-DD-(HH:MM:SS). vmbackup never names a folder so; a
    vmbackup folder without backup.json is a damaged (or unfinished) backup, not a legacy one."""
    return MANIFEST not in entries and is_nau_name(name)


def file_kind(name):
    """Return the kind of a backup file by its name: xva, vhd, raw, metadata, or None.

    "web01.xva.zst" -> "xva", "db01-xvdb.vhd" -> "vhd", "web01.xva.part" -> None.
    """
    for kind, endings in FILE_KINDS:
        if name.endswith(endings):
            return kind
    return None


def legacy_mode(kinds):
    """Return the mode of a NAUbackup folder from its files' kinds (in name order):
    an .xva makes vm-export, a .vhd/.raw vdi-export, neither meta-export."""
    modes = {"xva": "vm-export", "vhd": "vdi-export", "raw": "vdi-export"}
    return next((modes[k] for k in kinds if k in modes), "meta-export")


class LegacyDisk(typing.NamedTuple):
    """The disk a NAUbackup vdi-export wrote, as its DISK-<device>/*.cfg files record it."""
    device: str
    userdevice: str
    virtual_size: typing.Optional[int]    # None when vdi.cfg does not record it


#: NAUbackup's vdi-export exports the disk whose VBD device is xvda, and no other.
LEGACY_ROOT_DEVICE = "xvda"


def legacy_root_disk(disks):
    """Return the LegacyDisk a NAUbackup .raw/.vhd holds, from {device: (vbd.cfg, vdi.cfg)}.

    The one rule: NAUbackup snapshots "the xvda disk only" (VmBackup.py's gather_vm_meta
    picks `vbd_record['device'] == 'xvda'`) and writes its .cfg files to DISK-<device>,
    so the root disk is DISK-xvda whatever its userdevice; no DISK-xvda, no root disk.
    {"xvda": ({"userdevice": "0"}, {"virtual_size": "10737418240"})} -> ("xvda", "0", 10737418240)
    """
    if LEGACY_ROOT_DEVICE not in disks:
        return None
    return legacy_disk(LEGACY_ROOT_DEVICE, *disks[LEGACY_ROOT_DEVICE])


def legacy_disk(device, vbd, vdi):
    """Return the LegacyDisk of DISK-<device> from its vbd.cfg and vdi.cfg pairs."""
    size = vdi.get("virtual_size", "").strip()
    return LegacyDisk(device, vbd.get("userdevice", "0") or "0",
                      int(size) if size.isdigit() else None)


def legacy_disk_files(vm, names, disks):
    """Return {disk file: LegacyDisk or None}: which DISK-<device> each .raw/.vhd file among
    `names` of a NAUbackup folder in the VM folder `vm` holds, from {device: (vbd.cfg, vdi.cfg)}.

    The one rule: `<vm>.raw` (or the folder's only disk file) holds the root disk
    (legacy_root_disk); `<vm>-<device>.raw` holds DISK-<device>, each checked against its
    own vdi.cfg; any other disk file holds no disk we know (its size goes unchecked).
    ("web01", ["web01.raw", "web01-xvdb.raw"], {xvda, xvdb}) -> {web01.raw: xvda, web01-xvdb.raw: xvdb}
    """
    files = [n for n in names if file_kind(n) in ("raw", "vhd")]
    found = {}
    for name in files:
        stem = name[:-len(".raw")]   # .raw and .vhd are as long
        device = stem[len(vm) + 1:] if stem.startswith(vm + "-") else None
        if device in disks:
            found[name] = legacy_disk(device, *disks[device])
        elif stem == vm or len(files) == 1:
            found[name] = legacy_root_disk(disks)
        else:
            found[name] = None
    return found


class BackupFile(typing.NamedTuple):
    """One file of a backup: its name in the folder and its kind (file_kind)."""
    name: str
    kind: typing.Optional[str]


class BackupFolder(typing.NamedTuple):
    """One backup folder as read once by read_backup_folder; every command looks, none recounts."""
    path: str
    name: str                                   # backup-2026-11-23-184501
    vm: str                                     # the manifest's VM name, else the VM folder's
    when: typing.Optional[datetime.datetime]    # from the name
    complete: bool                              # is_complete
    legacy: bool                                # is_legacy_folder: NAUbackup wrote it
    mode: typing.Optional[str]                  # vm-export, vdi-export, meta-export; None: unknown
    manifest: typing.Optional[dict]             # backup.json; None if absent or broken
    manifest_error: typing.Optional[str]        # why backup.json is broken
    files: typing.Tuple[BackupFile, ...]        # the manifest's files, or (legacy) the folder's
    entries: typing.FrozenSet[str]              # every name in the folder
    disk_files: typing.Dict[str, typing.Optional[LegacyDisk]] = {}  # legacy only: legacy_disk_files

    def names_of(self, kind):
        """Return the names of this backup's files of `kind` (xva, vhd, raw, metadata)."""
        return [f.name for f in self.files if f.kind == kind]


def backup_vm_uuid(backup):
    """Return the uuid of the VM a BackupFolder's manifest names, or None (legacy, damaged)."""
    return ((backup.manifest or {}).get("vm") or {}).get("uuid")


def group_by_vm(backups):
    """Return the BackupFolders `backups` split by the VM their manifests name, in the order
    each VM first appears (pure): one VM folder may hold two VMs' backups (their names made
    one folder). Backups that name no VM (legacy, damaged, unfinished) join the one VM when
    there is one, else form a group of their own."""
    groups = collections.OrderedDict()    # Python 3.6: a dict's order is not promised
    for backup in backups:
        groups.setdefault(backup_vm_uuid(backup), []).append(backup)
    named = [g for uuid, g in groups.items() if uuid is not None]
    if len(named) == 1 and None in groups:
        return [list(backups)]
    return list(groups.values())


def read_cfg(path):
    """Return the key=value pairs of a NAUbackup .cfg file as a dict ({} if unreadable)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return dict(line.rstrip("\n").split("=", 1) for line in handle if "=" in line)
    except OSError:
        return {}


def read_manifest(folder):
    """Return the backup.json of a backup folder as a dict, or None if absent; raise BadFile."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BadFile("%s does not parse: %s" % (MANIFEST, one_line(exc)))
    if not isinstance(manifest, dict) or manifest.get("tool") != "vmbackup" \
            or not isinstance(manifest.get("files"), list):
        raise BadFile("%s is not a vmbackup manifest" % MANIFEST)
    if manifest.get("format") != 1:
        raise BadFile("%s has format %r; this vmbackup reads format 1"
                      % (MANIFEST, manifest.get("format")))
    return manifest


def manifest_text(manifest):
    """Return the text of a backup.json (the one way it is written)."""
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def read_legacy_disks(folder, entries):
    """Return {device: (vbd.cfg, vdi.cfg)} of a NAUbackup folder's DISK-<device> folders."""
    return {name[len("DISK-"):]: (read_cfg(os.path.join(folder, name, "vbd.cfg")),
                                  read_cfg(os.path.join(folder, name, "vdi.cfg")))
            for name in entries if name.startswith("DISK-")}


def read_backup_folder(path):
    """Return the BackupFolder at `path`: its names, markers and manifest, read once; raise OSError."""
    name = os.path.basename(os.path.normpath(path))
    entries = frozenset(os.listdir(path))
    vm = os.path.basename(os.path.dirname(os.path.abspath(path)))
    manifest = error = None
    if MANIFEST in entries:
        try:
            manifest = read_manifest(path)
        except BadFile as exc:
            error = str(exc)
    legacy = is_legacy_folder(name, entries)
    mode, names, disk_files = None, [], {}
    if manifest is not None:
        names = [str(f.get("name", "")) for f in manifest["files"] if isinstance(f, dict)]
        mode, vm = manifest.get("mode"), (manifest.get("vm") or {}).get("name", vm)
    elif legacy:
        names = sorted(n for n in entries.difference(LEGACY_SUCCESS_MARKERS)
                       if os.path.isfile(os.path.join(path, n)))
        mode = legacy_mode(file_kind(n) for n in names)
        disks = read_legacy_disks(path, entries)
        disk_files = legacy_disk_files(os.path.basename(os.path.dirname(os.path.abspath(path))),
                                       names, disks)
    complete = is_complete(entries) and (legacy or MANIFEST in entries)
    return BackupFolder(path, name, vm, parse_backup_name(name), complete, legacy, mode,
                        manifest, error, tuple(BackupFile(n, file_kind(n)) for n in names),
                        entries, disk_files)


#: A run touches its lock's mtime this often (seconds) while it lives.
LOCK_REFRESH = 60.0


#: A lock not touched for this long (seconds) is stale, whichever host wrote it: its run
#: is over (killed, its host rebooted, its container gone).
LOCK_STALE = 300.0


#: The signals that end a run: only the main thread takes them (see backup.signals_deferred).
RUN_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def start_thread(target, name):
    """Start a daemon thread that never takes RUN_SIGNALS (it inherits them blocked), so a
    signal the main thread holds off is never delivered to it instead; return the thread."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, RUN_SIGNALS)
    except (AttributeError, OSError, ValueError):  # pragma: no cover - not Linux / not main thread
        old = None
    try:
        thread.start()
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return thread


def lock_verdict(holder, age, my_host, alive=None):
    """Return "stale" or "held" for a lock that `holder` (pid, host) last touched `age` seconds ago.

    Pure. A lock not touched for LOCK_STALE is stale whatever host wrote it; a fresh one
    is held unless it names a pid of this host that is gone. An unreadable lock is held
    while it is fresh (its run may be writing it), stale after.
    (123, "h1", 30, "h1", dead) -> "stale"; (123, "h2", 30, "h1") -> "held"
    """
    pid, host = holder
    if age > LOCK_STALE:
        return "stale"
    if pid is not None and host == my_host and alive is not None and not alive(pid):
        return "stale"
    if pid is None and age > 5:
        return "stale"
    return "held"


def read_lock(path):
    """Return ((pid, host), started, age in seconds) of a lock file; pid None if unreadable."""
    try:
        age = time.time() - os.stat(path).st_mtime
        with open(path) as handle:
            words = handle.read().split()
        return (int(words[0]), words[1] if len(words) > 1 else ""), " ".join(words[2:3]), age
    except (OSError, ValueError, IndexError):
        return (None, ""), "", 0.0


class RunLock:
    """`with RunLock(backup_dir):` one run at a time per backup_dir, across hosts.

    The lock file holds 'pid host start-time'; a thread touches its mtime every
    LOCK_REFRESH seconds while the run lives, so a lock is stale once it has not been
    touched for LOCK_STALE (whatever host wrote it, e.g. an NFS backup_dir shared by two
    hosts, or a container with a new hostname) or names a dead pid of this host; a stale
    lock is taken over with a warning naming its file.
    """

    NAME = ".vmbackup.lock"

    def __init__(self, folder):
        self.path = os.path.join(folder, self.NAME)
        self.me = "%d %s %s\n" % (os.getpid(), socket.gethostname(),
                                   datetime.datetime.utcnow().replace(microsecond=0).isoformat())
        self.stopped = threading.Event()
        self.thread = None

    def __enter__(self):
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(self.me)
            self.thread = start_thread(self._keep_fresh, "vmbackup-lock")
            return self
        raise LockHeld(os.path.dirname(self.path), "unknown", self.path, "?")

    def _keep_fresh(self):
        """Touch the lock every LOCK_REFRESH seconds until the run ends (a thread)."""
        while not self.stopped.wait(LOCK_REFRESH):
            try:
                os.utime(self.path)
            except OSError as exc:
                log.warning("cannot refresh the run lock %s: %s", self.path, exc)

    def _take_over_if_stale(self):
        (pid, host), started, age = read_lock(self.path)
        if lock_verdict((pid, host), age, socket.gethostname(), pid_alive) == "held":
            who = "%s on host %s" % (pid, host) if host != socket.gethostname() else pid
            raise LockHeld(os.path.dirname(self.path), who, self.path, "%ds" % age)
        # housekeeping after a killed run, like destroying its leftovers: not a problem of this run
        log.info("taking over stale lock %s (pid %s on host %s%s, last refreshed %ds ago: "
                 "its run is over)", self.path, pid, host or "?",
                 ", started " + started if started else "", age)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __exit__(self, *exc):
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()
        try:
            with open(self.path) as handle:
                if handle.read() == self.me:
                    os.unlink(self.path)
        except OSError:
            pass
        return False


def pid_alive(pid):
    """Return True if a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_backup_dir(config):
    """Raise BackupDirError unless backup_dir is a writable folder with space_threshold % free."""
    problems = check_backup_dir_readonly(config)
    if problems:
        raise BackupDirError(problems[0])
    probe = os.path.join(config.backup_dir, ".vmbackup-write-test-%d" % os.getpid())
    try:
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as exc:
        raise BackupDirError("backup_dir=%s (%s): not writable: %s"
                             % (config.backup_dir, config.where("backup_dir"), exc.strerror))
    log_df(config.backup_dir, "before")
    check_space(config)


def check_space(config, need=0, what="the run"):
    """Raise BackupDirError if backup_dir is below space_threshold % free or lacks `need` bytes."""
    free, total, percent = free_space(config.backup_dir)
    if percent < config.space_threshold:
        raise BackupDirError("backup_dir %s has %.1f%% free, below space_threshold=%s%%: %s "
                             "not started" % (config.backup_dir, percent,
                                              config.space_threshold, what))
    if need and need > free:
        raise BackupDirError("backup_dir %s has %s free, %s needs about %s"
                             % (config.backup_dir, human_size(free), what, human_size(need)))


def log_df(path, when):
    """Log the backup file system's usage like NAUbackup's `df` lines."""
    free, total, percent = free_space(path)
    log.info("df %s (%s): %s free of %s (%.1f%% free)", path, when, human_size(free),
             human_size(total), percent)


def backup_folders(vm_dir):
    """Return the backup folders in a VM's folder, oldest first."""
    found = []
    for name in os.listdir(vm_dir):
        when = parse_backup_name(name)
        path = os.path.join(vm_dir, name)
        if when is not None and os.path.isdir(path) and not os.path.islink(path):
            found.append((when, name, path))
    return [path for _, _, path in sorted(found)]


def dated_files(folder):
    """Return the pool_db_/host_ backup files in a METADATA_/HOST_ folder, oldest first."""
    found = sorted((parse_dated_file(n), n) for n in os.listdir(folder) if parse_dated_file(n))
    return [os.path.join(folder, n) for _, n in found]


def folder_size(path):
    """Return (number of files, total bytes) under a folder."""
    count = total = 0
    for top, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(top, name)).st_size
                count += 1
            except OSError:
                pass
    return count, total


def new_backup_folder(vm_dir, now=datetime.datetime.now):
    """Create and return (path, moment) of a new backup-YYYY-MM-DD-HHMMSS folder in `vm_dir`.

    On a clash with an existing folder it waits for the clock's next second (three tries).
    """
    for _ in range(3):
        moment = now().replace(microsecond=0)
        path = os.path.join(vm_dir, "backup-" + stamp(moment))
        try:
            os.mkdir(path, 0o777)
            return path, moment
        except FileExistsError:
            time.sleep(1.05 - now().microsecond / 1e6)
    raise BackupDirError("cannot create a new backup folder in %s" % vm_dir)


# -- the Store seam ----------------------------------------------------------------
class Store:
    """Where backup folders live: what the tool asks of its storage, and nothing more.

    A VM's backups are filed under `vm`, the VM's folder name (a safe_dirname); a
    backup folder is named by the `path` the store hands out. A backup is written
    with new_folder, write_file (each file appears whole or not at all) and commit
    (the manifest, then `success` last). LocalStore is the one implementation; an
    object-storage target implements the same methods.
    """

    def vm_folders(self):
        """Return the names of the VM (and METADATA_/HOST_) folders, sorted."""
        raise NotImplementedError

    def backups(self, vm):
        """Return the [BackupFolder] of a VM's folder, oldest first."""
        raise NotImplementedError

    def dated_files(self, vm):
        """Return the paths of the pool_db_/host_ files in a METADATA_/HOST_ folder, oldest first."""
        raise NotImplementedError

    def read(self, path):
        """Return the BackupFolder at `path`."""
        raise NotImplementedError

    def new_folder(self, vm):
        """Create a new, empty backup folder for `vm`; return (path, moment)."""
        raise NotImplementedError

    def write_file(self, path, rel, text):
        """Write `text` as the file `rel` of the backup folder `path`, atomically."""
        raise NotImplementedError

    def commit(self, path, manifest):
        """Write the manifest, then the success marker: the backup at `path` is complete."""
        raise NotImplementedError

    def delete(self, path):
        """Delete a backup folder or a dated file."""
        raise NotImplementedError

    def finish_deletes(self, vm):
        """Finish the deletes a crash interrupted in `vm`'s folder; return their names."""
        raise NotImplementedError

    def usage(self, path):
        """Return (number of files, total bytes) of a backup folder."""
        raise NotImplementedError

    def lock(self):
        """Return the context manager that holds the store for one run."""
        raise NotImplementedError


class LocalStore(Store):
    """The Store in a local (or NFS/SMB-mounted) folder: backup_dir."""

    def __init__(self, root):
        self.root = root

    def _vm_dir(self, vm):
        return inside(self.root, vm)

    def vm_folders(self):
        try:
            names = os.listdir(self.root)
        except OSError:
            return []
        return sorted(n for n in names if os.path.isdir(os.path.join(self.root, n))
                      and not os.path.islink(os.path.join(self.root, n)))

    def backups(self, vm):
        vm_dir = self._vm_dir(vm)
        if not os.path.isdir(vm_dir):
            return []
        return [read_backup_folder(path) for path in backup_folders(vm_dir)]

    def dated_files(self, vm):
        vm_dir = self._vm_dir(vm)
        return dated_files(vm_dir) if os.path.isdir(vm_dir) else []

    def read(self, path):
        return read_backup_folder(path)

    def new_folder(self, vm, now=datetime.datetime.now):
        vm_dir = self._vm_dir(vm)
        os.makedirs(vm_dir, exist_ok=True)
        return new_backup_folder(vm_dir, now)

    def write_file(self, path, rel, text):
        dest = inside(path, rel)
        with partial_file(dest) as tmp:
            write_text(tmp, text)
        return dest

    def commit(self, path, manifest):
        self.write_file(path, MANIFEST, manifest_text(manifest))
        write_text(os.path.join(path, SUCCESS_MARKER), "")
        fsync_dir(path)

    def delete(self, path):
        """Delete a backup folder by renaming it aside (.deleting-<name>: never counted, never
        listed) and then removing it, so that a crash half-way never leaves a folder that
        still has `success` but lacks files; finish_deletes ends what a crash interrupted."""
        target = inside(self.root, os.path.relpath(path, self.root))
        if target == os.path.realpath(self.root):
            raise BackupDirError("refusing to delete backup_dir itself: %s" % path)
        if os.path.isdir(target) and not os.path.islink(target):
            aside = os.path.join(os.path.dirname(target), DELETING + os.path.basename(target))
            os.rename(target, aside)
            fsync_dir(os.path.dirname(target))
            shutil.rmtree(aside)
        else:
            os.unlink(target)

    def finish_deletes(self, vm):
        """Remove what an interrupted delete left in a VM's folder; return the names removed."""
        vm_dir = self._vm_dir(vm)
        names = sorted(n for n in os.listdir(vm_dir) if n.startswith(DELETING)) \
            if os.path.isdir(vm_dir) else []
        for name in names:
            shutil.rmtree(os.path.join(vm_dir, name), ignore_errors=True)
        return names

    def usage(self, path):
        return folder_size(path)

    def lock(self):
        return RunLock(self.root)


# === vmbackup/xapi.py =======================================================
# Talking to XAPI: endpoints, TLS pinning, the XML-RPC session and login, HTTP, tasks.
#
# Owns: Endpoint/parse_endpoint (https, http, the local socket), the pinned and unix
# HTTP connections, Xapi (one session, calls, XapiFailure), login, xapi_value, the one
# timeout policy and the one mapping of TLS/connection errors, http_request (the one
# path to XAPI's HTTP handlers, following its redirects) and XapiTask (the one owner
# of a XAPI task: create, cancel on error, wait, destroy).
# Imports: errors, util; XenAPI (the official client) when installed.

try:  # the official client; dom0 ships it, elsewhere: pip install XenAPI
    import XenAPI
except ImportError:  # pragma: no cover - exercised only where XenAPI is absent
    XenAPI = None


#: dom0's local XAPI socket; root needs no password on it.
LOCAL_XAPI_SOCKET = "/var/lib/xcp/xapi"


# The timeout policy, in one place. An HTTP transfer's socket gives up after the
# run's stall_timeout without a byte; an XML-RPC call after XMLRPC_TIMEOUT; a task
# is waited for max(TASK_WAIT_MIN, stall_timeout) once its data has moved.

#: Seconds one XML-RPC call may take (XAPI answers a VM.snapshot only once it is done).
XMLRPC_TIMEOUT = 300

#: Seconds a task is waited for at least once its data has moved: an import still
#: writes its disks after the last byte is in.
TASK_WAIT_MIN = 600

#: Polling a task: the first delay and the longest one (seconds), doubling between.
TASK_POLL_FIRST, TASK_POLL_MAX = 0.05, 1.0

#: Seconds the login may take, connecting included: a hung or wrong server is named
#: quickly, not after XMLRPC_TIMEOUT. (XAPI answers a wrong password after ~5 s.)
LOGIN_TIMEOUT = 30

#: Seconds fetching a certificate's fingerprint for an error message may take.
FINGERPRINT_TIMEOUT = 10

#: HOST_IS_SLAVE answers followed at login (a member, then a master that just moved).
LOGIN_HOPS = 2

#: Redirects one HTTP request follows. XAPI redirects once, to a host that sees the
#: VM's or the disk's SRs; more hops than this is a loop.
MAX_REDIRECTS = 3

#: HTTP answers that send the client elsewhere (XAPI sends 302).
REDIRECT_STATUSES = (301, 302, 303, 307)

#: Bytes of an HTTP error page read, and characters of it quoted in the error.
ERROR_PAGE_READ, ERROR_PAGE_QUOTE = 2048, 200


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (dom0's local xapi), for XML-RPC and the export handlers."""

    def __init__(self, path, timeout=None):
        http.client.HTTPConnection.__init__(self, "localhost", timeout=timeout)
        self.socket_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.timeout is not None:
            sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS that accepts exactly one certificate, by SHA-256 fingerprint.

    XenServer ships a self-signed certificate; pinning it is safer than switching
    verification off.
    """

    def __init__(self, host, port=None, fingerprint=None, timeout=None):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        http.client.HTTPSConnection.__init__(self, host, port, timeout=timeout, context=context)
        self.fingerprint = fingerprint

    def connect(self):
        http.client.HTTPSConnection.connect(self)
        seen = hashlib.sha256(self.sock.getpeercert(binary_form=True)).hexdigest()
        if seen != self.fingerprint:
            self.close()
            raise ssl.SSLError("certificate fingerprint %s does not match tls_fingerprint %s"
                               % (seen, self.fingerprint))


class Endpoint(typing.NamedTuple):
    """Where XAPI answers: a unix socket, or http(s)://host:port."""
    scheme: str                 # unix, http or https
    host: str                   # host name or address; the socket path for unix
    port: typing.Optional[int]
    ca_file: typing.Optional[str] = None
    fingerprint: typing.Optional[str] = None
    insecure: bool = False

    @property
    def url(self):
        if self.scheme == "unix":
            return "unix:" + self.host
        default = 443 if self.scheme == "https" else 80
        port = "" if self.port in (None, default) else ":%d" % self.port
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s://%s%s/" % (self.scheme, host, port)

    @property
    def is_local(self):
        return self.scheme == "unix"

    def redirected(self, location):
        """Return (endpoint, "path?query") that a Location header points to (same TLS settings)."""
        parts = urllib.parse.urlsplit(location)
        endpoint = self
        if parts.hostname:
            endpoint = self._replace(scheme=parts.scheme or self.scheme, host=parts.hostname,
                                     port=parts.port)
        return endpoint, parts.path + ("?" + parts.query if parts.query else "")

    def with_host(self, host):
        """Return this endpoint pointed at another pool host (same scheme, port and TLS)."""
        if self.scheme == "unix":
            return Endpoint("https", host, None, self.ca_file, self.fingerprint, self.insecure)
        return self._replace(host=host)

    def connection(self, timeout=None):
        """Return a new, unconnected http.client connection to this endpoint."""
        if self.scheme == "unix":
            return UnixHTTPConnection(self.host, timeout=timeout)
        if self.scheme == "http":
            return http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        if self.fingerprint:
            return PinnedHTTPSConnection(self.host, self.port, self.fingerprint, timeout=timeout)
        return http.client.HTTPSConnection(self.host, self.port, timeout=timeout,
                                           context=self.ssl_context())

    def ssl_context(self):
        if self.insecure:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        return ssl.create_default_context(cafile=self.ca_file)


def parse_endpoint(server, ca_file=None, fingerprint=None, insecure=False):
    """Return the Endpoint for a --server value; None means this host's local socket.

    >>> parse_endpoint("pool1.example.org").url
    'https://pool1.example.org/'
    """
    if not server:
        return Endpoint("unix", LOCAL_XAPI_SOCKET, None)
    if server.startswith("unix:"):
        path = server[len("unix:"):]
        if path.startswith("//"):
            path = path[2:]
        return Endpoint("unix", path, None)
    if "://" not in server:
        server = "https://" + server
    parts = urllib.parse.urlsplit(server)
    if "@" in parts.netloc:
        raise ConfigError("server=%s: a user or password in the URL is refused (it would show in "
                          "process lists and logs); use username= and password_file="
                          % mask_credentials(server))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("server=%s: expected https://host, http://host or unix:/path" % server)
    try:
        port = parts.port
    except ValueError:
        raise ConfigError("server=%s: bad port" % server)
    return Endpoint(parts.scheme, parts.hostname, port, ca_file, fingerprint, insecure)


class EndpointTransport(xmlrpc.client.Transport):
    """xmlrpc transport that opens its connections through an Endpoint."""

    def __init__(self, endpoint, timeout=None):
        xmlrpc.client.Transport.__init__(self)
        self.endpoint = endpoint
        self.timeout = timeout

    def set_timeout(self, timeout):
        """Use `timeout` from now on, on the open connection too (after login: XMLRPC_TIMEOUT)."""
        self.timeout = timeout
        conn = self._connection[1] if self._connection else None
        if conn is not None:
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)

    def make_connection(self, host):
        if self._connection and self._connection[0] == host:
            return self._connection[1]
        self._connection = host, self.endpoint.connection(timeout=self.timeout)
        return self._connection[1]

    def single_request(self, host, handler, request_body, verbose=False):
        try:
            return xmlrpc.client.Transport.single_request(self, host, handler, request_body,
                                                          verbose)
        except BaseException:
            # xmlrpc.client drops a connection after an Exception but keeps it after
            # KeyboardInterrupt or Terminated, half-way through a request: the cleanup
            # calls that follow (task.cancel, VM.destroy) need a fresh one.
            self.close()
            raise


class XapiFailure(CallFailed):
    """{}"""

    def __init__(self, method, details):
        VmBackupError.__init__(self, "%s: %s" % (method, xapi_error_text(details)))
        self.method = method
        self.details = [str(d) for d in details]

    @property
    def code(self):
        return self.details[0] if self.details else ""


#: Errors of the connection itself, as opposed to XAPI's answers.
CONNECTION_ERRORS = (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError)


#: TLS failures (before Python 3.7 a certificate for the wrong host is a ValueError).
TLS_ERRORS = (ssl.SSLError, ssl.CertificateError)


def connection_error_text(exc):
    """Return one line for a TLS or connection error: the one wording every caller uses.

    ConnectionRefusedError(111, 'Connection refused') -> 'Connection refused'
    ssl.SSLError('[SSL: CERTIFICATE_VERIFY_FAILED] ...') -> 'TLS: [SSL: CERTIFICATE_VERIFY_FAILED] ...'
    """
    if isinstance(exc, TLS_ERRORS):
        return "TLS: " + one_line(exc)
    return one_line(getattr(exc, "strerror", None) or exc)


def transfer_error(what, exc, done, stall_timeout):
    """Return the tool's error for a connection lost (or silent) after `done` bytes of a transfer."""
    if isinstance(exc, socket.timeout):
        return ExportStalled(what, stall_timeout)
    return ExportFailed("%s: connection lost after %s: %s"
                        % (what, human_size(done), connection_error_text(exc)))


class Xapi:
    """A logged-in XAPI session: `call("VM.get_all_records")`, retries, logout."""

    #: Read-only calls are retried on a dropped connection or a 5xx, with backoff.
    RETRIES, BACKOFF = 3, 1.0

    def __init__(self, endpoint, session, username):
        self.endpoint = endpoint
        self.session = session
        self.username = username

    @property
    def ref(self):
        return self.session._session

    def call(self, method, *args, retry=None):
        """Return XAPI's answer to `method(*args)`; raise XapiFailure or XapiCallFailed."""
        if retry is None:
            retry = ".get_" in method or method.endswith((".get_all", ".get_record"))
        attempts = self.RETRIES + 1 if retry else 1
        for attempt in range(attempts):
            try:
                target = self.session.xenapi
                for part in method.split("."):
                    target = getattr(target, part)
                return target(*args)
            except XenAPI.Failure as exc:
                raise XapiFailure(method, exc.details)
            except socket.timeout:
                raise XapiCallFailed(method, "no answer within %d s (the XAPI call timeout)"
                                     % XMLRPC_TIMEOUT)
            except (TLS_ERRORS + CONNECTION_ERRORS + (xmlrpc.client.Fault,)) as exc:
                if attempt + 1 >= attempts:
                    raise XapiCallFailed(method, connection_error_text(exc))
                log.info("XAPI %s: %s; retrying", method, connection_error_text(exc))
                time.sleep(self.BACKOFF * (2 ** attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def twin(self):
        """Return a Xapi on this session over a connection of its own, for another thread
        (an xmlrpc connection is not shared between threads). Never log a twin out."""
        uri = "http://localhost/" if self.endpoint.is_local else self.endpoint.url
        session = XenAPI.Session(uri, transport=EndpointTransport(self.endpoint,
                                                                  timeout=XMLRPC_TIMEOUT))
        session._session = self.session._session
        return Xapi(self.endpoint, session, self.username)

    def logout(self):
        """Log out, ignoring errors: the run is over either way."""
        try:
            self.session.xenapi.session.logout()
        except Exception as exc:  # noqa: BLE001 - logout failure must not mask the run's result
            log.debug("logout: %s", exc)


def login(endpoint, username, password, _hops=LOGIN_HOPS):
    """Return a Xapi session; follow HOST_IS_SLAVE to the master; raise LoginError."""
    if XenAPI is None:
        raise LoginError(endpoint.url, "the XenAPI package is missing (pip install XenAPI)")
    if not endpoint.is_local and not password:
        raise LoginError(endpoint.url, "no password given: use --password-file FILE (mode 0600), "
                                       "password_file= in the config file, or VMBACKUP_PASSWORD")
    uri = "http://localhost/" if endpoint.is_local else endpoint.url
    transport = EndpointTransport(endpoint, timeout=LOGIN_TIMEOUT)
    session = XenAPI.Session(uri, transport=transport)
    try:
        session.xenapi.login_with_password(username, password or "", "2.0",
                                           "vmbackup/" + __version__)
    except XenAPI.Failure as exc:
        details = [str(d) for d in exc.details]
        if details[:1] == ["HOST_IS_SLAVE"] and len(details) > 1 and _hops > 0:
            master = endpoint.with_host(details[1])
            log.info("%s is a pool member; logging in to the master %s", endpoint.url, master.url)
            return login(master, username, password, _hops - 1)
        if details[:1] == ["SESSION_AUTHENTICATION_FAILED"]:
            raise LoginError(endpoint.url, "authentication failed for user %r%s"
                             % (username, base64_hint(password)))
        raise LoginError(endpoint.url, xapi_error_text(details))
    except socket.timeout:
        raise LoginError(endpoint.url, "no answer within %d s (the login timeout): is it a "
                                       "XAPI server, and reachable?" % LOGIN_TIMEOUT)
    except TLS_ERRORS + CONNECTION_ERRORS + (xmlrpc.client.Fault,) as exc:
        raise LoginError(endpoint.url, first_contact_text(endpoint, exc))
    transport.set_timeout(XMLRPC_TIMEOUT)
    return Xapi(endpoint, session, username)


def base64_hint(password):
    """Return a hint when a password looks like NAUbackup's base64 password file ('' if not)."""
    text = (password or "").strip()
    if len(text) < 8 or len(text) % 4 or not re.match(r"^[A-Za-z0-9+/]+=*$", text):
        return ""
    try:
        base64.b64decode(text, validate=True).decode("utf-8")
    except (ValueError, UnicodeError):
        return ""
    return (" (the password looks base64-encoded: this looks like NAUbackup's base64 password "
            "file; give it as the first argument of the NAUbackup command line, or put the plain "
            "password in --password-file)")


def first_contact_text(endpoint, exc):
    """Return the one line for a connection or TLS failure at login, with what to do about it."""
    text = connection_error_text(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        seen = server_fingerprint(endpoint)
        if seen:
            return ("%s; the server's certificate has SHA-256 fingerprint %s: check it on the "
                    "host (openssl x509 -noout -fingerprint -sha256 -in /etc/xensource/xapi-ssl.pem) "
                    "and pin it with --tls-fingerprint %s (tls_fingerprint=)" % (text, seen, seen))
        return text + "; pin the server's certificate with --tls-fingerprint SHA256"
    if "WRONG_VERSION_NUMBER" in text or "UNKNOWN_PROTOCOL" in text:
        return ("%s: the server does not speak TLS on this port; if it serves plain HTTP, use "
                "http://%s" % (text, endpoint.url.split("://", 1)[-1]))
    if endpoint.scheme == "http" and isinstance(exc, (http.client.HTTPException, ConnectionError)) \
            and not isinstance(exc, ConnectionRefusedError):
        return ("%s: no HTTP answer; if the server speaks HTTPS on this port, use https://%s"
                % (text, endpoint.url.split("://", 1)[-1]))
    return text


def server_fingerprint(endpoint):
    """Return the SHA-256 fingerprint (AB:CD:...) of the certificate the server shows, or None."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((endpoint.host, endpoint.port or 443),
                                      timeout=FINGERPRINT_TIMEOUT) as sock:
            with context.wrap_socket(sock, server_hostname=endpoint.host) as tls:
                der = tls.getpeercert(binary_form=True)
    except (OSError, ValueError):
        return None
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def xapi_value(text):
    """Return the Python value of a task result: XAPI stores it XML-RPC encoded.

    '<value><array><data><value>OpaqueRef:1</value></data></array></value>' -> ['OpaqueRef:1']
    """
    if not text:
        return None
    wrapped = "<methodResponse><params><param>%s</param></params></methodResponse>" % text
    return xmlrpc.client.loads(wrapped)[0][0]


def http_request(endpoint, method, path, query, stall_timeout, content_length=None):
    """Return (response, connection) of XAPI's 200 answer to `method path?query`.

    The one HTTP path to XAPI: it follows up to MAX_REDIRECTS redirects, gives the
    socket stall_timeout, and raises ExportFailed for a TLS or connection error, an
    answer other than 200 (quoting the page) or a redirect loop. A PUT sends only its
    headers here: XAPI answers (200, or 302 to the host that sees the SR) before it
    reads the body, so the caller sends the content_length bytes after this returns.
    The caller closes both.
    """
    target = path + "?" + urllib.parse.urlencode(query)
    for _ in range(MAX_REDIRECTS + 1):
        conn = endpoint.connection(timeout=stall_timeout)
        response = None
        try:
            response = _send_head(conn, method, target, content_length)
            location = response.getheader("Location")
            if response.status in REDIRECT_STATUSES and location:
                close_http(response, conn)
                endpoint, target = endpoint.redirected(location)
                log.debug("%s %s redirected to %s", method, path, endpoint.url)
                continue
            if response.status != http.client.OK:
                page = response.read(ERROR_PAGE_READ).decode("utf-8", "replace")
                raise ExportFailed("%s %s: HTTP %d %s: %s" % (method, path, response.status,
                                                               response.reason,
                                                               one_line(page, ERROR_PAGE_QUOTE)))
            return response, conn
        except TLS_ERRORS + CONNECTION_ERRORS as exc:
            close_http(response, conn)
            raise ExportFailed("%s %s on %s: %s" % (method, path, endpoint.url,
                                                    connection_error_text(exc)))
        except BaseException:
            close_http(response, conn)
            raise
    raise ExportFailed("%s %s: too many redirects (more than %d)" % (method, path, MAX_REDIRECTS))


def _send_head(conn, method, target, content_length):
    """Send the request line and headers (no body); return the response, its status read."""
    conn.putrequest(method, target)
    if content_length is not None:
        conn.putheader("Content-Length", str(content_length))
    conn.endheaders()
    # Read the answer on the socket ourselves: conn.getresponse() would drop the socket
    # of a Connection: close answer, and a PUT's body is sent after the answer.
    response = http.client.HTTPResponse(conn.sock, method=method)
    response.begin()
    return response


def close_http(response, conn):
    """Close a response (None: not read yet) and its connection."""
    if response is not None:
        response.close()
    conn.close()


class XapiTask:
    """The one owner of a XAPI task around an HTTP transfer: create, cancel on error, wait, destroy.

        with XapiTask(xapi, "export of web01", stall_timeout) as task:
            response, conn = task.http(endpoint, "GET", "/export", {"ref": ref})
            ...
        task.record      # the finished task's record; its status is "success"

    Leaving the block normally waits for the task (unless `finish()` was called inside
    it) and raises ExportFailed unless the task succeeded: XAPI sends no Content-Length,
    so a cut stream looks finished and only the task tells. Leaving it by any exception,
    KeyboardInterrupt and Terminated included, cancels the task if it still runs. The
    task is destroyed either way.
    """

    def __init__(self, xapi, what, stall_timeout):
        self.xapi, self.what, self.stall_timeout = xapi, what, stall_timeout
        self.ref = None
        self.record = None

    def __enter__(self):
        self.ref = self.xapi.call("task.create", "vmbackup: " + self.what, "")
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is not None:
                self.cancel()
            elif self.record is None:
                try:
                    self.finish()
                except BaseException:
                    self.cancel()
                    raise
        finally:
            self.destroy()
        return False

    def http(self, endpoint, method, path, params, content_length=None):
        """Return (response, connection) of http_request for `path` run under this task.

        XAPI's error page is HTML; when the handler failed the task, the error says why
        in XAPI's own words.
        """
        query = dict(params, session_id=self.xapi.ref, task_id=self.ref)
        try:
            return http_request(endpoint, method, path, query, self.stall_timeout, content_length)
        except ExportFailed:
            reason = self.xapi.call("task.get_record", self.ref).get("error_info")
            if reason:
                raise ExportFailed("%s refused: %s" % (self.what, xapi_error_text(reason)))
            raise

    def finish(self):
        """Wait for the task; return its record; raise ExportFailed unless it succeeded."""
        record = self.wait()
        if record["status"] != "success":
            raise ExportFailed("%s failed: task %s: %s" % (
                self.what, record["status"], xapi_error_text(record.get("error_info"))))
        self.record = record
        return record

    @property
    def result(self):
        """The finished task's result as a Python value (e.g. the refs an import made)."""
        return xapi_value(self.record.get("result")) if self.record else None

    def wait(self):
        """Return the task's record once it has left `pending`; raise ExportFailed if it never does."""
        timeout = max(TASK_WAIT_MIN, self.stall_timeout)
        deadline = time.monotonic() + timeout
        delay = TASK_POLL_FIRST
        while True:
            record = self.xapi.call("task.get_record", self.ref)
            if record.get("status") not in ("pending", "cancelling"):
                return record
            if time.monotonic() > deadline:
                raise ExportFailed("%s: the task did not finish within %d seconds"
                                   % (self.what, timeout))
            time.sleep(delay)
            delay = min(delay * 2, TASK_POLL_MAX)

    def cancel(self):
        """Cancel the task if it still runs, best effort: the transfer is being abandoned."""
        try:
            if self.xapi.call("task.get_status", self.ref) == "pending":
                self.xapi.call("task.cancel", self.ref)
        except VmBackupError as exc:
            log.debug("task.cancel: %s", exc)

    def destroy(self):
        """Destroy the task, best effort (XAPI would keep it for an hour)."""
        try:
            self.xapi.call("task.destroy", self.ref)
        except VmBackupError as exc:
            log.debug("task.destroy: %s", exc)


# === vmbackup/commands/options.py ===========================================
# What the commands share on the command line, so each is declared once.
#
# Owns: EXIT_STATUS_TEXT; the argparse parents every command that talks to a pool
# (connection_options) or writes a report (output_options) is built from;
# CLI_SETTINGS and settings_from_args (parsed options -> config values);
# load_config (defaults < file < environment < command line, and the password);
# verbosity (the one count of -v/-q).
# Imports: errors, util, config.

EXIT_STATUS_TEXT = __doc__[__doc__.index("EXIT STATUS"):]


#: Modern option -> (config key, parser of its text).
CLI_SETTINGS = {
    "backup_dir": ("backup_dir", parse_text),
    "max_backups": ("max_backups", lambda v: parse_int(v, 1)),
    "max_meta_backups": ("max_meta_backups", lambda v: parse_int(v, 1)),
    "keep_daily": ("keep_daily", lambda v: parse_int(v, -1)),
    "keep_weekly": ("keep_weekly", lambda v: parse_int(v, -1)),
    "keep_monthly": ("keep_monthly", lambda v: parse_int(v, -1)),
    "keep_yearly": ("keep_yearly", lambda v: parse_int(v, -1)),
    "compress": ("compress", parse_compress),
    "vdi_format": ("vdi_export_format", choice("raw", "vhd")),
    "pool_db_backup": ("pool_db_backup", bool),
    "host_backup": ("host_backup", bool),
    "pre_clean": ("pre_clean", bool),
    "metadata_only": ("metadata_only", bool),
    "quiesce": ("quiesce", bool),
    "server": ("server", parse_text),
    "username": ("username", parse_text),
    "password_file": ("password_file", parse_text),
    "transport": ("transport", choice("auto", "xe", "api")),
    "xe_path": ("xe_path", parse_text),
    "tls_ca_file": ("tls_ca_file", parse_text),
    "tls_fingerprint": ("tls_fingerprint", parse_fingerprint),
    "tls_insecure": ("tls_insecure", bool),
    "space_threshold": ("space_threshold", parse_percent),
    "retries": ("retries", lambda v: parse_int(v, 0)),
    "stall_timeout": ("stall_timeout", lambda v: parse_int(v, 1)),
    "max_rate": ("max_rate", parse_rate),
    "progress_interval": ("progress_interval", lambda v: parse_int(v, 1)),
    "umask": ("umask", parse_umask),
    "status_log": ("status_log", parse_text),
    "log_file": ("log_file", parse_text),
    "syslog": ("syslog", bool),
    "metrics_file": ("metrics_file", parse_text),
    "full_interval": ("full_interval", lambda v: parse_int(v, 0)),
    "jobs": ("jobs", lambda v: parse_int(v, 1)),
    "jobs_per_host": ("jobs_per_host", lambda v: parse_int(v, 0)),
    "jobs_per_sr": ("jobs_per_sr", lambda v: parse_int(v, 0)),
}


def connection_options():
    """The parent parser of every command that talks to a pool: where and how to log in."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    opt = group.add_argument
    opt("-s", "--server", metavar="URL",
        help="https://host, http://host or unix:/path (default: $VMBACKUP_SERVER, else this "
             "host's local xapi)")
    opt("-u", "--username", metavar="USER", help="XAPI user (default root)")
    opt("--password-file", metavar="FILE",
        help="file with the XAPI password (or set VMBACKUP_PASSWORD); never on the command line")
    opt("--transport", choices=("auto", "xe", "api"),
        help="xe: shell out to xe on the pool host; api: XenAPI + HTTP (default: auto)")
    opt("--xe", metavar="PATH", dest="xe_path", help="the xe binary (default /opt/xensource/bin/xe)")
    opt("--tls-ca-file", metavar="FILE", help="CA bundle for the pool's certificate")
    opt("--tls-fingerprint", metavar="SHA256", help="pin the pool's certificate by fingerprint")
    opt("--insecure", action="store_const", const=True, dest="tls_insecure",
        help="do not verify the pool's certificate (warns; prefer --tls-fingerprint)")
    return parent


def output_options(json_help, quiet_help="less output", verbose_help="more output (-vv: debug)"):
    """The parent parser of every command's report: --json FILE|- and -q/-v."""
    parent = argparse.ArgumentParser(add_help=False)
    opt = parent.add_argument
    opt("--json", metavar="FILE", help=json_help + " ('-': stdout)")
    opt("-q", "--quiet", action="count", default=0, help=quiet_help)
    opt("-v", "--verbose", action="count", default=0, help=verbose_help)
    return parent


def settings_from_args(args):
    """Return {config key: value} for the settings options given in parsed `args`.

    Raises UsageError naming the option and its value when a value does not parse.
    """
    values = {}
    for option, (key, parse) in CLI_SETTINGS.items():
        raw = getattr(args, option, None)
        if raw is None:
            continue
        try:
            values[key] = parse(raw)
        except ValueError as exc:
            raise UsageError("--%s %s: %s" % (option.replace("_", "-"), raw, exc))
    return values


def load_config(values, parsed=None, selectors=(), config_file=None, password=None):
    """Return (Config, password): defaults < config file < $VMBACKUP_SERVER < command line.

    The password comes from password_file when one is set, else from `password` (the
    legacy command line's), else from $VMBACKUP_PASSWORD.
    """
    values = dict(values)
    env_server = os.environ.get("VMBACKUP_SERVER")
    if env_server and "server" not in values and not (parsed and "server" in parsed.values):
        values["server"] = env_server
    config = build_config(parsed, values, selectors, config_file)
    try:
        if config.password_file:
            password = read_password_file(config.password_file)
        elif password is None:
            password = os.environ.get("VMBACKUP_PASSWORD")
    except VmBackupError as exc:
        exc.config = config     # the settings were read: a run that cannot start reports
        raise
    return config, password


def verbosity(argv):
    """Return the verbosity argv asks for: each -v (or --verbose) +1, each -q (--quiet) -1."""
    level = 0
    for arg in argv:
        if arg == "--":
            break
        if arg in ("--verbose", "--quiet"):
            level += 1 if arg == "--verbose" else -1
        elif re.match(r"^-[vq]+$", arg):
            level += arg.count("v") - arg.count("q")
    return level


# === vmbackup/formats/vhd.py ================================================
# Checking VHD files (fixed, dynamic, differencing) as /export_raw_vdi?format=vhd writes them.
#
# Owns: VHD_FOOTER/VHD_HEADER layouts, vhd_checksum, vhd_footer_problem, check_vhd.
# Imports: errors, formats.tar.

# -- VHD ------------------------------------------------------------------------

#: cookie, features, version, data offset, timestamp, creator app/version/OS, original size,
#: current size, geometry, disk type, checksum, uid, saved state (the footer's first 85 bytes)
VHD_FOOTER = struct.Struct(">8sIIQIIIIQQIII16sB")


VHD_HEADER = struct.Struct(">8sQQIIII")             # cookie .. checksum (first 40 bytes)


VHD_TYPES = {2: "fixed", 3: "dynamic", 4: "differencing"}


def vhd_checksum(block, at):
    """Return the VHD checksum of `block` (ones' complement of its byte sum without bytes at..at+4)."""
    return ~(sum(bytearray(block[:at])) + sum(bytearray(block[at + 4:]))) & 0xFFFFFFFF


def vhd_footer_problem(block, where):
    """Return what is wrong with a 512-byte VHD footer ('VHD footer <where>: ...'), or None."""
    if len(block) < 512 or block[:8] != b"conectix":
        return "VHD footer %s: missing (no 'conectix' cookie)" % where
    fields = VHD_FOOTER.unpack_from(block)
    if fields[12] != vhd_checksum(block[:512], 64):
        return "VHD footer %s: checksum mismatch" % where
    if fields[11] not in VHD_TYPES:
        return "VHD footer %s: unknown disk type %d" % (where, fields[11])
    return None


def check_vhd(path, virtual_size=None):
    """Return the problems of a VHD file: footers, dynamic header, BAT bounds, virtual size."""
    size = os.path.getsize(path)
    if size < 512:
        return ["%d bytes: too short to be a VHD" % size]
    problems = []
    with open(path, "rb") as handle:
        handle.seek(size - 512)
        footer = handle.read(512)
        handle.seek(0)
        head = handle.read(1536)
        bad = vhd_footer_problem(footer, "at the end")
        if bad:
            # a dynamic VHD keeps a copy at 0: if that one is sound, the tail was cut off
            cut = footer[:8] != b"conectix" and vhd_footer_problem(head[:512], "") is None
            return [bad + (" (truncated? the copy at the start is sound)" if cut else "")]
        fields = VHD_FOOTER.unpack_from(footer)
        data_offset, current_size, disk_type = fields[3], fields[9], fields[11]
        if virtual_size is not None and current_size != virtual_size:
            problems.append("VHD virtual size is %d bytes, the disk's virtual_size is %d"
                            % (current_size, virtual_size))
        if disk_type == 2:
            if size != current_size + 512:
                problems.append("fixed VHD is %d bytes, expected %d" % (size, current_size + 512))
            return problems
        if size % 512:
            problems.append("file size %d is not a multiple of 512 (truncated?)" % size)
        if head[:512] != footer:
            problems.append(vhd_footer_problem(head[:512], "copy at the start")
                            or "VHD footer copy at the start differs from the footer at the end")
        if data_offset + 1024 > size - 512:
            return problems + ["dynamic header offset %d is outside the file" % data_offset]
        handle.seek(data_offset)
        header = handle.read(1024)
        if header[:8] != b"cxsparse":
            return problems + ["no dynamic VHD header at byte %d (cookie is not 'cxsparse')"
                               % data_offset]
        _, _, table_offset, _, entries, block_size, checksum = VHD_HEADER.unpack_from(header)
        if checksum != vhd_checksum(header, 36):
            return problems + ["dynamic VHD header checksum mismatch"]
        if block_size < 512 or block_size % 512:
            return problems + ["VHD block size %d is not a multiple of 512" % block_size]
        if entries * block_size < current_size:
            problems.append("BAT covers %d bytes, less than the disk's %d"
                            % (entries * block_size, current_size))
        table_end = table_offset + entries * 4
        if table_end > size - 512:
            return problems + ["BAT (%d entries at byte %d) runs past the end of the file"
                               % (entries, table_offset)]
        handle.seek(table_offset)
        bat = struct.unpack(">%dI" % entries, _read_exact(handle, entries * 4))
    return problems + bat_problems(bat, block_size, table_end, size)


def bat_problems(bat, block_size, table_end, size):
    """Return the problems of a dynamic VHD's block table: blocks past the end or overlapping."""
    bitmap = (-(-(block_size // 512) // 8) + 511) & ~511   # one bit per sector, in whole sectors
    span = bitmap + block_size
    used = sorted((sector * 512, index) for index, sector in enumerate(bat) if sector != 0xFFFFFFFF)
    previous_end = table_end
    for start, index in used:
        if start + span > size - 512:
            return ["BAT entry %d points past the end of the file (block at byte %d; "
                    "truncated?)" % (index, start)]
        if start < previous_end:
            return ["BAT entry %d (block at byte %d) overlaps the BAT or another block"
                    % (index, start)]
        previous_end = start + span
    return []


# === vmbackup/formats/xva.py ================================================
# XVA files: ova.xml, the disk chunks and their checksums, gzip and zstd, completeness.
#
# Owns: parse_ova_xml/ova_objects/ova_disks, check_xva_stream/check_xva_file,
# xva_compression, the zstd reader, ova_xml_from_tar, xva_is_complete.
# Imports: errors, util, formats.xxh64, formats.tar.

#: The most ova.xml the tool reads: a VM's metadata is kilobytes; this bounds a hostile file.
MAX_OVA_XML = 256 << 20


def first_ova_xml(tar):
    """Return the body of ova.xml, the first member of an XVA's tar; raise BadFile."""
    first = tar.next()
    if first is None:
        raise BadFile("empty tar: no ova.xml")
    if first.name != "ova.xml":
        raise BadFile("first member is %r, not ova.xml: not an XVA" % first.name)
    return tar.read_body(limit=MAX_OVA_XML)


@contextlib.contextmanager
def xva_reader(path):
    """Open an XVA (.xva, .xva.gz, .xva.zst, or a metadata export's tar): yield its tar bytes."""
    algo = xva_compression(path)
    with open(path, "rb") as handle:
        if algo == "gzip":
            yield gzip.GzipFile(fileobj=handle, mode="rb")
        elif algo == "zstd":
            zstd = find_zstd()
            if zstd is None:
                raise BadFile("zstd is not installed: %s cannot be read here" % printable(path))
            stream = _ZstdStream(handle, zstd)
            try:
                yield stream
            finally:
                stream.kill()
        else:
            yield handle


def read_ova_xml(path):
    """Return the ova.xml bytes at the start of an XVA or a metadata export; raise BadFile."""
    try:
        with xva_reader(path) as stream:
            return first_ova_xml(TarStream(stream))
    except (EOFError, zlib.error) as exc:
        raise BadFile("gzip stream: %s" % (one_line(exc) or "truncated"))


def ova_xml_from_tar(path):
    """Return the ova.xml bytes of a metadata export (a tar holding ova.xml)."""
    try:
        return read_ova_xml(path)
    except (BadFile, OSError) as exc:
        raise ExportFailed("metadata export is not a tar with ova.xml: %s" % one_line(exc))


def xva_is_complete(path):
    """Return True if an uncompressed XVA ends as a complete tar (two zero blocks)."""
    size = os.path.getsize(path)
    if size < 2048 or size % 512:
        return False
    with open(path, "rb") as handle:
        handle.seek(size - 1024)
        if handle.read(1024) != bytes(1024):
            return False
        handle.seek(0)
        head = handle.read(512)
    return head[:7] == b"ova.xml"


# -- ova.xml: one XML-RPC value ----------------------------------------------
def _plain(value):
    """Turn xmlrpc.client's DateTime and Binary into the text they came from, recursively."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, xmlrpc.client.DateTime):
        return value.value
    if isinstance(value, xmlrpc.client.Binary):
        return base64.b64encode(value.data).decode("ascii")
    return value


def xmlrpc_value(data):
    """Return the Python value of one XML-RPC <value> document, by the standard library's parser."""
    body = re.sub(br"^\s*<\?xml[^>]*\?>", b"", data if isinstance(data, bytes) else data.encode())
    parser, unmarshaller = xmlrpc.client.getparser()
    parser.feed(b"<params><param>" + body + b"</param></params>")
    parser.close()
    (value,) = unmarshaller.close()
    return _plain(value)


def parse_ova_xml(data):
    """Return the struct of an ova.xml / vm-metadata.xml; raise ValueError if it does not parse.

    b"<value><struct><member><name>objects</name>..." -> {"objects": [...], "version": {...}}
    """
    try:
        root = xml.etree.ElementTree.fromstring(data)
    except xml.etree.ElementTree.ParseError as exc:
        raise ValueError("not well-formed XML: %s" % exc)
    if root.tag != "value":
        raise ValueError("root element is <%s>, not an XML-RPC <value>" % root.tag)
    try:
        ova = xmlrpc_value(data)
    except (ValueError, TypeError, xml.parsers.expat.ExpatError, xmlrpc.client.Error) as exc:
        raise ValueError("not an XML-RPC value: %s" % exc)
    if not isinstance(ova, dict) or not isinstance(ova.get("objects"), list):
        raise ValueError("no 'objects' list: not XAPI export metadata")
    return ova


def ova_objects(ova):
    """Return {class: {id: record}} of a parsed ova.xml."""
    tables = collections.defaultdict(dict)
    for obj in ova.get("objects", ()):
        if isinstance(obj, dict) and isinstance(obj.get("snapshot"), dict):
            tables[str(obj.get("class", ""))][str(obj.get("id", ""))] = obj["snapshot"]
    return tables


def _int(value, default=0):
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def ova_disks(ova):
    """Return {export id: (virtual_size, name_label)} of the VDIs whose data an XVA carries.

    As XAPI's export: VDIs of non-CD VBDs on SRs whose content_type is not iso.
    """
    tables = ova_objects(ova)
    disks = {}
    for vbd in tables.get("VBD", {}).values():
        vdi = tables.get("VDI", {}).get(str(vbd.get("VDI")))
        if vdi is None or vbd.get("type") == "CD":
            continue
        sr = tables.get("SR", {}).get(str(vdi.get("SR")), {})
        if sr.get("content_type") == "iso":
            continue
        disks[str(vbd.get("VDI"))] = (_int(vdi.get("virtual_size"), -1), vdi.get("name_label", ""))
    return disks


# -- XVA ----------------------------------------------------------------------

#: Ref:7/00000003 (a chunk), Ref:7/00000003.xxhash or .checksum (its checksum).
XVA_CHUNK_RE = re.compile(r"^(Ref:[^/]+)/(\d{8,})(\.xxhash|\.checksum)?$")


#: A chunk larger than this is not one XAPI wrote (it writes 1 MiB chunks).
MAX_CHUNK = 64 << 20


#: Stop listing a file's problems after this many.
MAX_PROBLEMS = 20


class _DiskChunks(object):
    """Where one XVA disk's chunks put it, by the counter rule of XAPI's importer."""

    def __init__(self):
        self.prev = None
        self.first_len = 0
        self.end = 0
        self.chunks = 0


def place_chunk(disk, counter, length):
    """Advance `disk` (a _DiskChunks) by one chunk; return a problem text or None.

    offset += (counter - previous - 1) * first chunk length, then += length:
    skipped zero chunks leave gaps in the counter; keep-alive chunks are empty.
    """
    disk.chunks += 1
    if disk.prev is None:
        disk.prev, disk.first_len, disk.end = counter, length, counter * length + length
        return None if counter == 0 else "first chunk is %08d, not 00000000" % counter
    if counter <= disk.prev:
        return "chunk %08d comes after %08d (out of order)" % (counter, disk.prev)
    disk.end += (counter - disk.prev - 1) * disk.first_len + length
    disk.prev = counter
    return None


def check_xva_stream(stream):
    """Check an uncompressed XVA tar read from `stream`; return (problems, info); raise BadFile.

    Problems are one-line texts; info has the disks found {id: bytes} and ova.xml's struct.
    """
    tar = TarStream(stream)
    problems = []
    body = first_ova_xml(tar)
    ova, expected = None, {}
    try:
        ova = parse_ova_xml(body)
        expected = ova_disks(ova)
    except ValueError as exc:
        problems.append("ova.xml does not parse: %s" % exc)
    disks = collections.OrderedDict()
    pending = None      # (member name, chunk bytes) waiting for its checksum member
    while True:
        member = tar.next()
        if member is None:
            break
        match = XVA_CHUNK_RE.match(member.name)
        if pending and not (match and match.group(3) and member.name.startswith(pending[0] + ".")):
            problems.append("chunk %s has no checksum member" % pending[0])
            pending = None
        if not match:
            continue  # other members (directories, future additions) carry no disk data
        ref, counter, ext = match.groups()
        if ext is None:
            disk = disks.setdefault(ref, _DiskChunks())
            data = tar.read_body(limit=MAX_CHUNK)
            issue = place_chunk(disk, int(counter), len(data))
            if issue:
                problems.append("disk %s: %s" % (ref, issue))
            pending = (member.name, data)
            continue
        if pending is None:
            problems.append("checksum member %s has no chunk before it" % member.name)
            continue
        stored = tar.read_body(limit=4096).strip().decode("ascii", "replace").upper()
        name, data = pending
        pending = None
        if ext == ".xxhash":
            if stored != xxh64_hex(data):
                problems.append("chunk %s XXH64 mismatch" % name)
        elif stored != hashlib.sha1(data).hexdigest().upper():
            problems.append("chunk %s SHA-1 mismatch" % name)
    if pending:
        problems.append("chunk %s has no checksum member" % pending[0])
    tar.skip_rest()
    if ova is not None:
        problems += disk_problems(disks, expected)
    return problems, {"disks": {ref: d.end for ref, d in disks.items()}, "ova": ova,
                      "chunks": sum(d.chunks for d in disks.values())}


def disk_problems(disks, expected):
    """Return how the disks found in an XVA ({ref: _DiskChunks}) differ from ova.xml's VDIs."""
    problems = []
    for ref, disk in disks.items():
        size, _ = expected.get(ref, (None, ""))
        if size is None:
            problems.append("disk %s has data but no VDI in ova.xml" % ref)
        elif disk.end != size:
            problems.append("disk %s reassembles to %d bytes, ova.xml says virtual_size %d%s"
                            % (ref, disk.end, size, " (last chunk missing?)" if disk.end < size else ""))
    for ref, (size, label) in sorted(expected.items()):
        if ref not in disks:
            problems.append("disk %s%s has no data in the XVA"
                            % (ref, " (%s)" % printable(label) if label else ""))
    return problems


def find_zstd():
    """Return the path of the zstd binary, or None."""
    return shutil.which("zstd") or next(
        (p for p in ("/usr/bin/zstd", "/bin/zstd") if os.access(p, os.X_OK)), None)


class _ZstdStream(object):
    """`zstd -d` fed from `reader` by a thread; read() gives the decompressed bytes."""

    def __init__(self, reader, zstd):
        self.proc = subprocess.Popen([zstd, "-d", "-c", "-q"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.reader = reader
        self.feed_error = None
        self.thread = threading.Thread(target=self._feed)
        self.thread.daemon = True
        self.thread.start()

    def _feed(self):
        try:
            while True:
                data = self.reader.read(1 << 20)
                if not data:
                    break
                self.proc.stdin.write(data)
        except (BrokenPipeError, ValueError):  # zstd stopped reading (bad input); its rc says why
            pass
        except OSError as exc:
            self.feed_error = exc
        finally:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def read(self, size=-1):
        return self.proc.stdout.read(size)

    def finish(self):
        """Wait for zstd; return its error text ('' if it succeeded)."""
        self.proc.stdout.close()
        err = self.proc.stderr.read().decode("utf-8", "replace")
        rc = self.proc.wait()
        self.thread.join()
        if self.feed_error is not None:
            return "cannot read the file: %s" % self.feed_error
        return "" if rc == 0 else "zstd: %s" % (one_line(err) or "exit code %d" % rc)

    def kill(self):
        """Stop zstd and the feeding thread."""
        if self.proc.poll() is None:
            self.proc.kill()
        for pipe in (self.proc.stdout, self.proc.stderr):
            pipe.close()
        self.proc.wait()
        self.thread.join()


def xva_compression(name):
    """Return None, 'gzip' or 'zstd' for an XVA file name (.xva, .xva.gz, .xva.zst)."""
    if name.endswith(".gz"):
        return "gzip"
    if name.endswith((".zst", ".zstd")):
        return "zstd"
    return None


def _check_xva_guarded(stream):
    """Return (problems, info) of check_xva_stream, reading `stream` to its end; never raises BadFile."""
    try:
        return check_xva_stream(stream)
    except BadFile as exc:
        return [str(exc)], {}
    except EOFError:
        return ["gzip stream: truncated (ends before its end marker)"], {}
    except zlib.error as exc:
        return ["gzip stream: %s" % exc], {}
    except OSError as exc:
        if getattr(exc, "errno", None) is not None:  # a real I/O error, not a bad gzip stream
            raise
        return ["gzip stream: %s" % exc], {}


def check_xva_file(path, want_sha256=False):
    """Check an XVA file (.xva/.xva.gz/.xva.zst) in one pass; return (problems, unchecked, info).

    info["sha256"] is the file's SHA-256 when `want_sha256`. A zstd file on a host
    without zstd is unchecked (only its SHA-256 is computed), never called good.
    """
    algo = xva_compression(path)
    problems, unchecked, info = [], [], {}
    with open(path, "rb") as handle:
        raw = _HashingReader(handle)
        zstd = find_zstd() if algo == "zstd" else None
        if algo == "zstd" and zstd is None:
            unchecked.append("zstd is not installed: the compressed XVA cannot be checked here")
        elif algo == "zstd":
            stream = _ZstdStream(raw, zstd)
            try:
                problems, info = _check_xva_guarded(stream)
                while stream.read(1 << 20):  # let zstd see all its input: its exit code judges it
                    pass
            except BaseException:
                stream.kill()
                raise
            error = stream.finish()
            if error:
                problems.insert(0, error)
        elif algo == "gzip":
            problems, info = _check_xva_guarded(gzip.GzipFile(fileobj=raw, mode="rb"))
        else:
            problems, info = _check_xva_guarded(raw)
        if want_sha256:
            raw.drain()
            info["sha256"] = raw.digest.hexdigest()
    return problems[:MAX_PROBLEMS], unchecked, info


# === vmbackup/progress.py ===================================================
# What a running export reports and what it obeys: its progress meter on the run's board,
# and the run's request to stop.
#
# Owns: eta_seconds and progress_text (pure), Meter (one export's bytes, rate, ETA),
# ProgressBoard (every running export: live lines on a terminal; off one, a log line per
# export every progress_interval; the request to stop), bound (ties a worker thread to the
# board and to its VM), exporting (names the export the thread is about to make),
# current_meter, check_stop, UnitFilter (every line a worker logs names its VM).
#
# A run's exports run in worker threads; signals reach only the main thread. The main
# thread asks the board to stop (`request_stop`): each worker notices at its next block
# (or poll of xe) and raises Terminated in its own thread, so its `with` blocks destroy its
# snapshots; `abort_all` shuts the sockets of downloads blocked in a read.
# Imports: errors, util, store.

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


# === vmbackup/selection.py ==================================================
# Which VMs and disks a run backs up, and the plan for each: pure decisions over pool records.
#
# Owns: select_vms (selectors over VM records), vm_disks/pick_disks, PoolView/read_pool
# (one read of the pool; only the selected VMs' disks and networks when they are few),
# wanted_by, VmPlan/plan_vm.
# Imports: errors, util, config.

class Selected(typing.NamedTuple):
    """One VM chosen for backup, with what was asked of it."""
    ref: str
    name: str
    uuid: str
    mode: str
    max_backups: int
    devices: typing.Tuple[str, ...]
    selector: Selector


class Selection(typing.NamedTuple):
    """The outcome of selection: what runs, what is left out, and why."""
    vms: typing.List[Selected]
    excluded: typing.List[typing.Tuple[str, str]]      # (name, uuid)
    not_selected: typing.List[typing.Tuple[str, str]]  # (name, uuid)
    warnings: typing.List[str]
    errors: typing.List[str]


def is_candidate(record):
    """Return True for a real VM: not a template, not a snapshot, not a control domain."""
    return not (record.get("is_a_template") or record.get("is_a_snapshot")
                or record.get("is_control_domain"))


def select_vms(vm_records, selectors, max_backups=DEFAULT_MAX_BACKUPS, max_meta_backups=None):
    """Return the Selection that `selectors` make of `vm_records` ({ref: VM record}).

    The contract: candidates are real VMs (is_candidate); plain names are matched
    exactly and win over regexes; excludes win over everything; vdi-export wins over
    delta-export, which wins over vm-export, which wins over meta-export; within the winning mode the last
    definition sets max_backups and devices (a meta-export's default is
    max_meta_backups, else max_backups); two candidates with one name are an error for
    that name, and so are two chosen VMs whose names make one folder (safe_dirname);
    a selector that matches nothing is a warning.
    """
    candidates = sorted(((ref, rec) for ref, rec in vm_records.items() if is_candidate(rec)),
                        key=lambda item: (item[1]["name_label"], item[1]["uuid"]))
    by_name = collections.defaultdict(list)
    for ref, rec in candidates:
        by_name[rec["name_label"]].append((ref, rec))
    warnings, errors = [], []
    plain_defs = collections.defaultdict(list)
    regex_defs = collections.defaultdict(list)
    excluded_refs = set()
    for sel in selectors:
        hits = [ref for ref, rec in candidates if sel.matches(rec["name_label"])]
        if not hits:
            warnings.append("vm not found: %s (%s)" % (sel.text, sel.origin))
        if sel.mode == "exclude":
            excluded_refs.update(hits)
            continue
        for ref in hits:
            (plain_defs if sel.is_plain else regex_defs)[ref].append(sel)
    chosen, duplicates = [], {}
    for ref, rec in candidates:
        defs = plain_defs.get(ref) or regex_defs.get(ref)
        if not defs or ref in excluded_refs:
            continue
        twins = by_name[rec["name_label"]]
        if len(twins) > 1:
            duplicates[rec["name_label"]] = twins
            continue
        mode = next(m for m in MODES if any(d.mode == m for d in defs))
        last = [d for d in defs if d.mode == mode][-1]
        default = (max_meta_backups or max_backups) if mode == "meta-export" else max_backups
        chosen.append(Selected(ref, rec["name_label"], rec["uuid"], mode,
                               last.max_backups or default, last.devices, last))
    chosen, clashes = split_folder_clashes(chosen)
    for folder, vms in clashes:
        errors.append("VMs %s all make the backup folder %r (uuids %s): none of them is backed "
                      "up until one is renamed" % (", ".join(repr(printable(v.name)) for v in vms),
                                                   printable(folder), ", ".join(v.uuid for v in vms)))
    for name, twins in sorted(duplicates.items()):
        errors.append("%d VMs are named %r (uuids %s): none of them is backed up until the "
                      "names are unique" % (len(twins), printable(name),
                                            ", ".join(rec["uuid"] for _, rec in twins)))
    chosen_refs = {s.ref for s in chosen}
    excluded = [(rec["name_label"], rec["uuid"]) for ref, rec in candidates if ref in excluded_refs]
    not_selected = [(rec["name_label"], rec["uuid"]) for ref, rec in candidates
                    if ref not in chosen_refs and ref not in excluded_refs
                    and rec["name_label"] not in duplicates]
    return Selection(chosen, excluded, not_selected, warnings, errors)


def split_folder_clashes(chosen):
    """Return (chosen without clashes, [(folder, [Selected])]): VMs whose different names
    make one backup folder ('a/b', 'a:b', 'a_b' -> 'a_b') would share, and prune, one folder."""
    by_folder = collections.defaultdict(list)
    for vm in chosen:
        by_folder[safe_dirname(vm.name)].append(vm)
    clashes = [(folder, vms) for folder, vms in sorted(by_folder.items()) if len(vms) > 1]
    clashing = {vm.ref for _, vms in clashes for vm in vms}
    return [vm for vm in chosen if vm.ref not in clashing], clashes


class VmDisk(typing.NamedTuple):
    """One disk of a VM as a backup sees it."""
    device: str        # xvda, xvdb, ... (from the VBD, or derived from userdevice)
    userdevice: str
    vbd_ref: str
    vdi_ref: str
    vdi: dict          # the VDI record
    nobak: bool        # name_label holds [NOBAK]: left out of every backup


def device_name(vbd):
    """Return a VBD's device name: its `device` if set, else xvd<letter> from userdevice.

    >>> device_name({"device": "", "userdevice": "1"})
    'xvdb'
    """
    if vbd.get("device"):
        return vbd["device"]
    try:
        return "xvd" + "abcdefghijklmnopqrstuvwxyz"[int(vbd.get("userdevice", "0"))]
    except (ValueError, IndexError):
        return "userdevice" + str(vbd.get("userdevice"))


def vm_disks(vm, vbds, vdis):
    """Return the VM's disks (Disk VBDs with a VDI), ordered by userdevice."""
    disks = []
    for vbd_ref in vm.get("VBDs", ()):
        vbd = vbds.get(vbd_ref)
        if not vbd or vbd.get("type") != "Disk" or vbd.get("empty"):
            continue
        vdi = vdis.get(vbd.get("VDI"))
        if vdi is None:
            continue
        disks.append(VmDisk(device_name(vbd), str(vbd.get("userdevice", "")), vbd_ref,
                            vbd["VDI"], vdi, "[NOBAK]" in vdi.get("name_label", "")))
    return sorted(disks, key=lambda d: (_userdevice_key(d.userdevice), d.device))


def _userdevice_key(text):
    try:
        return int(text)
    except ValueError:
        return UNNUMBERED


def pick_disks(disks, devices):
    """Return (chosen, missing) for a vdi-export: `devices` by name or userdevice, else the root disk.

    The root disk is xvda / userdevice 0 (NAUbackup's only choice).
    """
    if not devices:
        root = [d for d in disks if d.userdevice == "0" or d.device in ("xvda", "hda", "sda")]
        return root[:1], ([] if root else ["xvda"])
    chosen, missing = [], []
    for want in devices:
        hit = [d for d in disks if want in (d.device, d.userdevice)]
        if hit:
            if hit[0] not in chosen:
                chosen.append(hit[0])
        else:
            missing.append(want)
    return chosen, missing


class PoolView(typing.NamedTuple):
    """The pool's records, read in a constant number of calls (one per class)."""
    pool: dict
    hosts: dict
    vms: dict
    vbds: dict
    vdis: dict
    vifs: dict
    networks: dict
    srs: dict
    guest_metrics: dict

    @property
    def master(self):
        return self.hosts.get(self.pool.get("master"), {})


#: A selection whose VMs reference at most this many records (VBDs, VDIs, VIFs, networks,
#: guest metrics) is read record by record; a larger one reads the whole tables. One
#: get_record costs a round trip; a whole table costs bytes: on a 10,000-VM pool the five
#: tables are about twice the VM table, so a few dozen round trips are the cheaper side.
FEW_RECORDS = 64

#: The VDIs leftover cleanup needs whatever the selection: every snapshot VDI.
SNAPSHOT_VDIS = 'field "is_a_snapshot"="true"'

NULL_REF = "OpaqueRef:NULL"


def read_pool(xapi, wanted=None):
    """Return a PoolView in a bounded number of calls, whatever the pool's size.

    `wanted(vm_records)` returns the refs of the VMs the caller needs in full (None or
    no `wanted`: every VM). The pool, host, VM and SR tables are read whole; the disks,
    networks and guest metrics only of the wanted VMs when they are few (FEW_RECORDS),
    plus every snapshot VDI (leftover cleanup looks for them); otherwise whole tables.
    """
    pools = xapi.call("pool.get_all_records")
    base = dict(pool=next(iter(pools.values()), {}), hosts=xapi.call("host.get_all_records"),
                vms=xapi.call("VM.get_all_records"), srs=xapi.call("SR.get_all_records"))
    refs = wanted(base["vms"]) if wanted else None
    if refs is not None and records_of_cost(base["vms"], refs) <= FEW_RECORDS:
        base.update(read_records_of(xapi, base["vms"], refs))
    else:
        base.update(vbds=xapi.call("VBD.get_all_records"), vdis=xapi.call("VDI.get_all_records"),
                    vifs=xapi.call("VIF.get_all_records"),
                    networks=xapi.call("network.get_all_records"),
                    guest_metrics=xapi.call("VM_guest_metrics.get_all_records"))
    return PoolView(**base)


def records_of_cost(vms, refs):
    """Return an upper bound of the get_record calls read_records_of makes for `refs`."""
    return sum(2 * len(vms[r].get("VBDs", ())) + 2 * len(vms[r].get("VIFs", ())) + 1
               for r in refs if r in vms)


def read_records_of(xapi, vms, refs):
    """Return {vbds, vdis, vifs, networks, guest_metrics} of the VMs `refs`, one record a call."""
    def each(cls, wanted):
        found = {}
        for ref in sorted(set(wanted) - {NULL_REF, ""}):
            try:
                found[ref] = xapi.call(cls + ".get_record", ref)
            except CallFailed as exc:
                if exc.code != "HANDLE_INVALID":   # gone since the VM table was read
                    raise
        return found
    chosen = [vms[r] for r in refs if r in vms]
    vbds = each("VBD", [v for vm in chosen for v in vm.get("VBDs", ())])
    vdis = xapi.call("VDI.get_all_records_where", SNAPSHOT_VDIS)
    vdis.update(each("VDI", [vbd.get("VDI", NULL_REF) for vbd in vbds.values()]))
    vifs = each("VIF", [v for vm in chosen for v in vm.get("VIFs", ())])
    return dict(vbds=vbds, vdis=vdis, vifs=vifs,
                networks=each("network", [vif.get("network", NULL_REF) for vif in vifs.values()]),
                guest_metrics=each("VM_guest_metrics",
                                   [vm.get("guest_metrics", NULL_REF) for vm in chosen]))


def wanted_by(config):
    """Return read_pool's `wanted` for a run with these settings: the VMs it selects."""
    return lambda vms: [s.ref for s in select_vms(vms, config.selectors, config.max_backups).vms]


class VmPlan(typing.NamedTuple):
    """What the run will do for one selected VM, worked out from the pool's records."""
    vm: Selected
    disks: typing.List[VmDisk]      # disks whose data is exported
    skipped: typing.List[VmDisk]    # [NOBAK] disks left out
    problems: typing.List[str]      # reasons the VM cannot be backed up as asked


def plan_vm(selected, view):
    """Return the VmPlan of `selected` against the pool's records (pure)."""
    record = view.vms[selected.ref]
    disks = vm_disks(record, view.vbds, view.vdis)
    problems = []
    if selected.mode == "meta-export":
        return VmPlan(selected, [], [], problems)
    if selected.mode == "vdi-export" or (selected.mode == "delta-export" and selected.devices):
        chosen, missing = pick_disks(disks, selected.devices)
        for device in missing:
            problems.append("no disk %s on VM %s" % (device, printable(selected.name)))
        return VmPlan(selected, [d for d in chosen if not d.nobak],
                      [d for d in chosen if d.nobak], problems)
    return VmPlan(selected, [d for d in disks if not d.nobak], [d for d in disks if d.nobak], problems)


# === vmbackup/transport/base.py =============================================
# What both transports share: objects, the tool's tags, retried destroys, the quiesce fallback.
#
# Owns: Obj, TAG_KEY/PENDING_KEY, BUSY_CODES/GONE_CODES, error_code,
# quiesce_unavailable, Transport (the interface and its shared methods).
# Imports: errors, util, xapi.

class Obj(typing.NamedTuple):
    """A XAPI object by reference and uuid (the API speaks refs, xe speaks uuids)."""
    ref: str
    uuid: str


#: other_config key that marks the snapshots and VDIs this tool made; its value
#: starts with the object's own uuid, so a copy (a restored VM, a snapshot of a
#: restored VM) never looks like ours.
TAG_KEY = "vmbackup_snapshot"


#: other_config key a run puts on a VM (or disk) just before snapshotting it: the snapshot
#: copies other_config, so a snapshot made while the run is killed still says whose it is.
PENDING_KEY = "vmbackup_pending"


#: The last word of a run note ('host pid start beat'): the run keeps a heartbeat in the
#: pool (leftovers.PoolBeat), so any host can tell when it is over.
BEAT_WORD = "beat"


#: A pending-marked snapshot counts as the run's only if taken this soon after the mark.
PENDING_WINDOW = datetime.timedelta(minutes=30)


#: XAPI errors that mean "busy right now": an export still holds the object.
BUSY_CODES = ("OTHER_OPERATION_IN_PROGRESS", "VDI_IN_USE")


#: XAPI errors that mean the object is already gone.
GONE_CODES = ("HANDLE_INVALID", "UUID_INVALID")


def quiesce_unavailable(exc):
    """Return True if a quiesced snapshot failed in a way a normal snapshot can replace.

    MESSAGE_REMOVED: the pool is Citrix Hypervisor 8.1 or newer; VM_SNAPSHOT_WITH_QUIESCE_*:
    the guest has no working VSS provider (OnyxBackupVM falls back the same way).
    """
    code = error_code(exc)
    return code == "MESSAGE_REMOVED" or code.startswith("VM_SNAPSHOT_WITH_QUIESCE_")


def error_code(exc):
    """Return the XAPI error code carried by an XapiFailure or XeFailed, else ''."""
    return getattr(exc, "code", "") or ""


class Transport:
    """What both transports share: the session, tagging, retried destroys."""

    name = "?"
    #: How long a destroy keeps retrying while the object is busy (seconds).
    BUSY_WAIT = 120.0
    #: Retrying a busy destroy: the first delay and the longest one (seconds), doubling between.
    BUSY_POLL_FIRST, BUSY_POLL_MAX = 0.2, 5.0

    def __init__(self, xapi, config):
        self.xapi = xapi
        self.config = config

    def tag(self, cls, obj, note):
        """Mark `obj` (a VM snapshot or a VDI) as this tool's own, replacing a copied tag.

        A snapshot copies its source's other_config, and the disks of a VM restored from
        a backup carry the tag of the snapshot that was exported; XAPI's
        add_to_other_config refuses an existing key (MAP_DUPLICATE_KEY), so remove first.
        """
        self.remove_key(cls, obj, TAG_KEY)
        self.xapi.call(cls + ".add_to_other_config", obj.ref, TAG_KEY, "%s %s" % (obj.uuid, note))

    def remove_key(self, cls, obj, key):
        """Remove `key` from `obj`'s other_config (absent, or `obj` gone, is fine)."""
        try:
            self.xapi.call(cls + ".remove_from_other_config", obj.ref, key)
        except XapiFailure as exc:
            if exc.code not in GONE_CODES:
                raise

    def retry_busy(self, what, action):
        """Run `action()` until it stops failing with a busy code; treat gone as done."""
        delay, deadline = self.BUSY_POLL_FIRST, time.monotonic() + self.BUSY_WAIT
        while True:
            try:
                return action()
            except CallFailed as exc:
                code = error_code(exc)
                if code in GONE_CODES:
                    log.debug("%s: already gone", what)
                    return None
                if code not in BUSY_CODES or time.monotonic() > deadline:
                    raise
                log.debug("%s: %s, retrying in %.1fs", what, code, delay)
                time.sleep(delay)
                delay = min(delay * 2, self.BUSY_POLL_MAX)

    def vm_obj(self, ref=None, uuid=None):
        """Return Obj for a VM known by ref or uuid (one call)."""
        if ref is None:
            return Obj(self.xapi.call("VM.get_by_uuid", uuid), uuid)
        return Obj(ref, uuid or self.xapi.call("VM.get_uuid", ref))

    def vdi_obj(self, ref=None, uuid=None):
        """Return Obj for a VDI known by ref or uuid (one call)."""
        if ref is None:
            return Obj(self.xapi.call("VDI.get_by_uuid", uuid), uuid)
        return Obj(ref, uuid or self.xapi.call("VDI.get_uuid", ref))

    def snapshot_disks(self, snap):
        """Return [(vbd Obj, vdi Obj, userdevice)] of a snapshot's Disk VBDs."""
        found = []
        for vbd_ref in self.xapi.call("VM.get_VBDs", snap.ref):
            vbd = self.xapi.call("VBD.get_record", vbd_ref)
            if vbd.get("type") == "Disk" and not vbd.get("empty") and vbd.get("VDI") != "OpaqueRef:NULL":
                found.append((Obj(vbd_ref, vbd["uuid"]), self.vdi_obj(vbd["VDI"]),
                              str(vbd.get("userdevice"))))
        return found

    def snapshot_vm(self, vm, name, quiesce=False, vlog=None):
        """Snapshot `vm`: quiesced if asked and the pool and guest can, else a normal one.

        The fallback is a warning of the VM's (`vlog`, the VM's UnitLog), not of the run.
        """
        if quiesce:
            try:
                return self.take_snapshot(vm, name, quiesce=True)
            except CallFailed as exc:
                if not quiesce_unavailable(exc):
                    raise
                (vlog or log).warning("no quiesced snapshot (%s): taking a normal snapshot "
                                      "(%s)", exc.code, printable(name))
        return self.take_snapshot(vm, name, quiesce=False)

    def take_snapshot(self, vm, name, quiesce):
        """Take one VM snapshot (quiesced or not) and return its Obj."""
        raise NotImplementedError

    def mark_pending(self, cls, obj, note):
        """Put the pending mark on the VM or disk about to be snapshotted."""
        self.unmark_pending(cls, obj)
        self.xapi.call(cls + ".add_to_other_config", obj.ref, PENDING_KEY, note)

    def unmark_pending(self, cls, obj):
        """Remove the pending mark (absent is fine)."""
        self.remove_key(cls, obj, PENDING_KEY)

    def untag_copy(self, vm_ref):
        """Remove the tool's keys from a VM made from a backup and from its disks: they are
        copies, and left in place they would be copied into every later snapshot."""
        for cls, ref in [("VM", vm_ref)] + [("VDI", vdi.ref) for _, vdi, _ in
                                           self.snapshot_disks(Obj(vm_ref, ""))]:
            other = self.xapi.call(cls + ".get_other_config", ref)
            for key in (TAG_KEY, PENDING_KEY):
                if key in other:
                    self.remove_key(cls, Obj(ref, ""), key)

    def check_gone(self, cls, obj):
        """Raise ExportFailed if `obj` still exists: a destroy that 'succeeded' must have worked."""
        try:
            self.xapi.call(cls + ".get_uuid", obj.ref)
        except XapiFailure as exc:
            if exc.code in GONE_CODES:
                return
            raise
        raise ExportFailed("%s %s still exists after it was destroyed" % (cls, obj.uuid))

    def drop_disk(self, vbd, vdi):
        """Remove a disk from a snapshot before its export ([NOBAK]), as Xen Orchestra does."""
        self.retry_busy("destroy VBD", lambda: self.xapi.call("VBD.destroy", vbd.ref))
        self.retry_busy("destroy VDI", lambda: self.xapi.call("VDI.destroy", vdi.ref))

    def plug_vbd(self, vbd_ref):
        """Hot-plug a disk link into its running VM (VBD.plug)."""
        self.xapi.call("VBD.plug", vbd_ref)

    def for_thread(self, xapi):
        """Return this transport speaking through `xapi` (a Xapi.twin: the run's session on a
        connection of its own), for a worker thread: an XML-RPC connection is not shared
        between threads. The copy is never closed; the run's transport is."""
        twin = copy.copy(self)
        twin.xapi = xapi
        return twin

    def close(self):
        """Release what the transport holds (temporary files)."""

    # -- incremental backups (delta-export): what xe cannot do goes through XenAPI on
    # both transports: reading a VDI record, NBD connection details, unplugging a disk.
    def vdi_record(self, vdi):
        """Return a VDI's record now, or None if it is gone."""
        try:
            return self.xapi.call("VDI.get_record", vdi.ref)
        except XapiFailure as exc:
            if exc.code in GONE_CODES:
                return None
            raise

    def vdi_by_uuid(self, uuid):
        """Return (Obj, record) of the VDI `uuid`, or None if it is gone."""
        try:
            ref = self.xapi.call("VDI.get_by_uuid", uuid)
        except XapiFailure as exc:
            if exc.code in GONE_CODES:
                return None
            raise
        record = self.vdi_record(Obj(ref, uuid))
        return None if record is None else (Obj(ref, uuid), record)

    def nbd_info(self, vdi):
        """Return VDI.get_nbd_info's records of `vdi` ([] when no network has an NBD purpose)."""
        return list(self.xapi.call("VDI.get_nbd_info", vdi.ref) or [])

    def network_purposes(self):
        """Return the purposes of the pool's networks (nbd, insecure_nbd) as one set."""
        return {p for rec in self.xapi.call("network.get_all_records").values()
                for p in rec.get("purpose") or ()}

    def keep_disk(self, vbd):
        """Unplug a disk from a snapshot VM so that destroying the snapshot keeps the disk."""
        self.retry_busy("destroy VBD", lambda: self.xapi.call("VBD.destroy", vbd.ref))

    def enable_cbt(self, vdi):
        """Turn Changed Block Tracking on for `vdi` (idempotent)."""
        raise NotImplementedError

    def list_changed_blocks(self, older, newer):
        """Return the base64 bitmap of the 64 KiB blocks that differ between two snapshots."""
        raise NotImplementedError

    def data_destroy(self, vdi):
        """Drop a CBT-enabled snapshot's data, keeping its CBT log (type cbt_metadata)."""
        raise NotImplementedError

    def export_vdi_delta(self, vdi, base, dest):
        """Write the differencing VHD of `vdi` against `base` to a new file `dest`."""
        raise NotImplementedError

    def import_vdi_stream(self, vdi, chunks, size):
        """Write `size` raw bytes, given as an iterable of bytes, into the VDI `vdi`."""
        raise NotImplementedError


# === vmbackup/formats/vhdfile.py ============================================
# Writing and reading VHD files on the backup storage: dynamic fulls, differencing deltas, chains.
#
# A delta-export chain is a dynamic VHD (the full) and one differencing VHD per later point,
# each naming its parent by the parent's footer uid and its path relative to the child's
# folder, so libvhdi (vhdiinfo, pyvhdi) and Xen Orchestra's VHD library can read it.
#
# Layout of the files this module writes: footer copy at 0, dynamic header at 512, the
# parent locator's data (differencing only) from 1536, the BAT after it (padded to a
# sector), then the blocks in the order they were first written, each a 512-byte sector
# bitmap followed by 2 MiB of data, then the footer. The bitmap marks exactly the sectors
# written: in a differencing file the others come from the parent.
#
# Owns: VHD_BLOCK, SECTOR, CBT_BLOCK, ParentRef, VhdInfo, VhdWriter, write_vhd_from_raw,
# reparent_vhd, vhd_info, read_vhd_layout, VhdLayout, ChainReader, sector_runs.
# Imports: errors, util, formats.vhd.

#: A VHD block (what one BAT entry allocates): 2 MiB, as vhd-tool and blktap write them.
VHD_BLOCK = 2 * 1024 * 1024

#: A VHD sector; every offset and length in a VHD is a multiple of it.
SECTOR = 512

#: The granularity of a CBT bitmap (one bit per 64 KiB of disk, facts §7).
CBT_BLOCK = 64 * 1024

#: Sectors in one VHD block, and the size of its sector bitmap (one bit each, in whole sectors).
BLOCK_SECTORS = VHD_BLOCK // SECTOR
BITMAP_BYTES = (BLOCK_SECTORS // 8 + SECTOR - 1) // SECTOR * SECTOR

#: A bitmap with every sector of a block present.
FULL_BITMAP = b"\xff" * (BLOCK_SECTORS // 8) + bytes(BITMAP_BYTES - BLOCK_SECTORS // 8)

#: Seconds between the Unix epoch and the VHD epoch (2000-01-01T00:00:00Z).
VHD_EPOCH = 946684800

#: A BAT entry for a block that is not allocated.
VHD_NO_BLOCK = 0xFFFFFFFF

VHD_DYNAMIC, VHD_DIFFERENCING = 3, 4

#: What this tool writes as the footer's creator application.
VHD_CREATOR = b"vmbk"

#: Offsets inside the dynamic header: parent unicode name (UTF-16BE, 512 bytes), 8 locators.
PARENT_NAME_AT, LOCATORS_AT, LOCATOR = 64, 576, struct.Struct(">4sIIIQ")

_ZERO_BLOCK = bytes(VHD_BLOCK)
_FULL_MASK = (1 << BLOCK_SECTORS) - 1


class ParentRef(NamedTuple):
    """The parent of a differencing VHD: its footer uid, its path relative to the child's
    folder (e.g. '../backup-2026-12-01-000000/xvda.vhd') and its footer timestamp (VHD epoch)."""
    uuid: str
    path: str
    timestamp: int = 0


class VhdInfo(NamedTuple):
    """What a VHD file is: uid, virtual size, disk type (3 dynamic, 4 differencing), its
    parent's uid and relative path (None for a dynamic VHD), allocated 2 MiB blocks and
    bytes of data (sectors present * 512)."""
    uuid: str
    size: int
    disk_type: int
    parent_uuid: Optional[str]
    parent_path: Optional[str]
    blocks: int
    data_bytes: int


def vhd_geometry(size):
    """Return the footer's packed CHS geometry for `size` bytes (the VHD specification's rule)."""
    sectors = min(size // SECTOR, 65535 * 16 * 255)
    if sectors >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cyl_heads = sectors // spt
    else:
        spt = 17
        cyl_heads = sectors // spt
        heads = max((cyl_heads + 1023) // 1024, 4)
        if cyl_heads >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cyl_heads = sectors // spt
        if cyl_heads >= heads * 1024:
            spt, heads = 63, 16
            cyl_heads = sectors // spt
    return ((cyl_heads // heads) << 16) | (heads << 8) | spt


def vhd_footer_bytes(size, disk_type, uid, timestamp):
    """Return a 512-byte footer of a dynamic or differencing VHD (data offset 512)."""
    block = bytearray(512)
    VHD_FOOTER.pack_into(block, 0, b"conectix", 2, 0x00010000, 512, timestamp & 0xFFFFFFFF,
                         struct.unpack(">I", VHD_CREATOR)[0], 0x00010000, 0x5769326B,
                         size, size, vhd_geometry(size), disk_type, 0, uid, 0)
    struct.pack_into(">I", block, 64, vhd_checksum(block, 64))
    return bytes(block)


def vhd_header_bytes(entries, table_offset, parent=None, locator_at=0):
    """Return a 1024-byte dynamic header; for a differencing VHD the parent's uid, timestamp,
    name and one W2ru locator (relative path, UTF-16LE) whose data sits at `locator_at`."""
    block = bytearray(1024)
    puid = uuidlib.UUID(parent.uuid).bytes if parent else bytes(16)
    VHD_HEADER.pack_into(block, 0, b"cxsparse", 0xFFFFFFFFFFFFFFFF, table_offset, 0x00010000,
                         entries, VHD_BLOCK, 0)
    struct.pack_into(">16sI", block, 40, puid, (parent.timestamp if parent else 0) & 0xFFFFFFFF)
    if parent:
        name = parent.path.encode("utf-16-be")[:512]
        block[PARENT_NAME_AT:PARENT_NAME_AT + len(name)] = name
        data = parent.path.encode("utf-16-le")
        LOCATOR.pack_into(block, LOCATORS_AT, b"W2ru", vhd_sectors(len(data)), len(data), 0,
                          locator_at)
    struct.pack_into(">I", block, 36, vhd_checksum(block, 36))
    return bytes(block)


def vhd_sectors(nbytes):
    """Return how many whole sectors hold `nbytes`."""
    return (nbytes + SECTOR - 1) // SECTOR


def vhd_uid_text(raw):
    """Return a 16-byte VHD uid as a uuid string."""
    return str(uuidlib.UUID(bytes=bytes(raw)))


def sector_runs(mask):
    """Return [(first, end)] runs of set bits of a block's sector mask (bit 0 = the last
    sector, as int.from_bytes(bitmap, 'big') gives it), in sector order."""
    text = format(mask, "0%db" % BLOCK_SECTORS)
    return [(m.start(), m.end()) for m in re.finditer("1+", text)]


def bitmap_mask(bitmap):
    """Return a block's sector bitmap as an int mask (see sector_runs)."""
    return int.from_bytes(bytes(bitmap[:BLOCK_SECTORS // 8]), "big")


def mask_bitmap(mask):
    """Return the on-disk sector bitmap (BITMAP_BYTES) of an int mask."""
    return mask.to_bytes(BLOCK_SECTORS // 8, "big") + bytes(BITMAP_BYTES - BLOCK_SECTORS // 8)


def _range_mask(first, end):
    """Return the mask of sectors first..end-1 of a block."""
    return ((1 << (end - first)) - 1) << (BLOCK_SECTORS - end)


class VhdWriter:
    """Write a dynamic (no parent) or differencing (parent=ParentRef) VHD into a seekable file.

    `write(offset, data)` in any order, offsets and lengths multiples of 512 inside `size`;
    a block is allocated on its first write and its bitmap marks exactly the sectors
    written. `close()` writes the BAT, the bitmaps, the header and both footers and
    returns the VhdInfo.
    """

    def __init__(self, fileobj, size, uuid=None, parent=None):
        if size <= 0 or size % SECTOR:
            raise ValueError("VHD size %d is not a positive multiple of 512" % size)
        self.fileobj, self.size, self.parent = fileobj, size, parent
        self.uid = uuidlib.UUID(uuid).bytes if uuid else uuidlib.uuid4().bytes
        self.entries = -(-size // VHD_BLOCK)
        self.locator = parent.path.encode("utf-16-le") if parent else b""
        self.table_offset = 1536 + vhd_sectors(len(self.locator)) * SECTOR
        self.end = self.table_offset + vhd_sectors(self.entries * 4) * SECTOR
        self.bat = {}           # block index -> file offset of its bitmap
        self.masks = {}         # block index -> sectors present (int mask)
        self.closed = False

    def _block_at(self, index):
        """Return the file offset of block `index`'s data, allocating it at the end."""
        at = self.bat.get(index)
        if at is None:
            at = self.bat[index] = self.end
            self.masks[index] = 0
            self.end += BITMAP_BYTES + VHD_BLOCK
        return at + BITMAP_BYTES

    def write(self, offset, data):
        """Write `data` at disk byte `offset` (both multiples of 512, inside the disk)."""
        length = len(data)
        if offset % SECTOR or length % SECTOR or offset < 0 or offset + length > self.size:
            raise ValueError("VHD write of %d bytes at %d: not whole sectors inside %d bytes"
                             % (length, offset, self.size))
        view = memoryview(data)
        done = 0
        while done < length:
            pos = offset + done
            index, within = divmod(pos, VHD_BLOCK)
            piece = min(length - done, VHD_BLOCK - within)
            at = self._block_at(index)
            self.fileobj.seek(at + within)
            self.fileobj.write(view[done:done + piece])
            self.masks[index] |= _range_mask(within // SECTOR, (within + piece) // SECTOR)
            done += piece

    def close(self):
        """Write the metadata (BAT, bitmaps, header, footers); return the VhdInfo."""
        if self.closed:
            raise ValueError("VHD writer already closed")
        self.closed = True
        handle = self.fileobj
        timestamp = int(time.time()) - VHD_EPOCH
        bat = bytearray(b"\xff" * (vhd_sectors(self.entries * 4) * SECTOR))
        for index, at in self.bat.items():
            struct.pack_into(">I", bat, index * 4, at // SECTOR)
            handle.seek(at)
            handle.write(mask_bitmap(self.masks[index]))
        handle.seek(self.table_offset)
        handle.write(bat)
        footer = vhd_footer_bytes(self.size, VHD_DIFFERENCING if self.parent else VHD_DYNAMIC, self.uid,
                             timestamp)
        handle.seek(0)
        handle.write(footer)
        handle.write(vhd_header_bytes(self.entries, self.table_offset, self.parent, 1536))
        if self.locator:
            handle.write(self.locator + bytes(vhd_sectors(len(self.locator)) * SECTOR
                                              - len(self.locator)))
        handle.seek(self.end)
        handle.write(footer)
        handle.truncate(self.end + SECTOR)
        handle.flush()
        present = sum(bin(m).count("1") for m in self.masks.values())
        return VhdInfo(vhd_uid_text(self.uid), self.size, VHD_DIFFERENCING if self.parent else VHD_DYNAMIC,
                       self.parent.uuid if self.parent else None,
                       self.parent.path if self.parent else None,
                       len(self.bat), present * SECTOR)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None and not self.closed:
            self.close()
        return False


def _read_into(reader, buf):
    """Fill `buf` from `reader` (readinto or read); return how many bytes came."""
    view = memoryview(buf)
    got = 0
    readinto = getattr(reader, "readinto", None)
    while got < len(buf):
        if readinto is not None:
            n = readinto(view[got:])
        else:
            data = reader.read(len(buf) - got)
            n = len(data)
            view[got:got + n] = data
        if not n:
            break
        got += n
    return got


def write_vhd_from_raw(reader, fileobj, size, uuid=None):
    """Copy `size` raw bytes from `reader` into a dynamic VHD in `fileobj`, leaving all-zero
    2 MiB blocks unallocated; return the VhdInfo. Raises BadFile if the stream is short."""
    writer = VhdWriter(fileobj, size, uuid=uuid)
    buf = bytearray(VHD_BLOCK)
    offset = 0
    while offset < size:
        want = min(VHD_BLOCK, size - offset)
        view = memoryview(buf)[:want]
        got = _read_into(reader, view)
        if got < want:
            raise BadFile("raw disk stream ended at byte %d of %d" % (offset + got, size))
        # bytearray == bytes is a memcmp; a memoryview comparison goes byte by byte
        if (buf if want == VHD_BLOCK else buf[:want]) != _ZERO_BLOCK[:want]:
            writer.write(offset, view)
        offset += want
    return writer.close()


def _parse_footer(block, where):
    """Return the footer fields of a sound 512-byte footer; raise BadFile naming `where`."""
    problem = vhd_footer_problem(block, "of " + where)
    if problem:
        raise BadFile(problem)
    fields = VHD_FOOTER.unpack_from(block)
    if fields[11] not in (VHD_DYNAMIC, VHD_DIFFERENCING):
        raise BadFile("%s: VHD disk type %d is neither dynamic nor differencing"
                      % (where, fields[11]))
    return fields


def _parse_header(block, where):
    """Return (table_offset, entries, block_size, parent uid bytes, parent timestamp)."""
    if len(block) < 1024 or block[:8] != b"cxsparse":
        raise BadFile("%s: no dynamic VHD header (no 'cxsparse' cookie)" % where)
    _, _, table_offset, _, entries, block_size, checksum = VHD_HEADER.unpack_from(block)
    if checksum != vhd_checksum(block[:1024], 36):
        raise BadFile("%s: dynamic VHD header checksum mismatch" % where)
    if block_size != VHD_BLOCK:
        raise BadFile("%s: VHD block size %d (only 2 MiB blocks are supported)"
                      % (where, block_size))
    puid, pstamp = struct.unpack_from(">16sI", block, 40)
    return table_offset, entries, block_size, puid, pstamp


class VhdLayout(NamedTuple):
    """A VHD file's metadata as read_vhd_layout finds it."""
    path: str
    uuid: str
    size: int
    disk_type: int
    parent_uuid: Optional[str]
    parent_path: Optional[str]
    bat: tuple                  # file offset of each block's bitmap, or None
    footer_at: int              # where the trailing footer starts
    table_offset: int
    timestamp: int


def _parent_path(handle, header):
    """Return the parent path a differencing header names (W2ru, W2ku, MacX, then the name)."""
    found = {}
    for n in range(8):
        code, _, length, _, at = LOCATOR.unpack_from(header, LOCATORS_AT + 24 * n)
        if code in (b"W2ru", b"W2ku", b"MacX") and 0 < length <= 65536:
            handle.seek(at)
            data = handle.read(length)
            try:
                text = data.decode("utf-8" if code == b"MacX" else "utf-16-le")
            except UnicodeDecodeError:
                continue
            found[code] = text[len("file://"):] if text.startswith("file://") else text
    for code in (b"W2ru", b"W2ku", b"MacX"):
        if found.get(code):
            return found[code]
    name = bytes(header[PARENT_NAME_AT:PARENT_NAME_AT + 512]).decode("utf-16-be", "replace")
    return name.rstrip("\0") or None


def read_vhd_layout(path):
    """Return the VhdLayout of a dynamic or differencing VHD file; raise BadFile naming it."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        total = handle.tell()
        if total < 2048 or total % SECTOR:
            raise BadFile("%s: %d bytes is not a dynamic VHD" % (path, total))
        handle.seek(total - SECTOR)
        footer = handle.read(SECTOR)
        fields = _parse_footer(footer, path)
        handle.seek(fields[3])
        header = handle.read(1024)
        table_offset, entries, _, puid, _ = _parse_header(header, path)
        size, disk_type = fields[9], fields[11]
        if entries * VHD_BLOCK < size:
            raise BadFile("%s: the BAT covers %d bytes, less than the disk's %d"
                          % (path, entries * VHD_BLOCK, size))
        if table_offset + entries * 4 > total - SECTOR:
            raise BadFile("%s: the BAT runs past the end of the file (truncated?)" % path)
        handle.seek(table_offset)
        raw = struct.unpack(">%dI" % entries, handle.read(entries * 4))
        bat = tuple(None if e == VHD_NO_BLOCK else e * SECTOR for e in raw)
        for index, at in enumerate(bat):
            if at is not None and at + BITMAP_BYTES + VHD_BLOCK > total - SECTOR:
                raise BadFile("%s: block %d lies past the end of the file (truncated?)"
                              % (path, index))
        parent_uuid = parent_path = None
        if disk_type == VHD_DIFFERENCING:
            parent_uuid = vhd_uid_text(puid)
            parent_path = _parent_path(handle, header)
    return VhdLayout(path, vhd_uid_text(fields[13]), size, disk_type, parent_uuid, parent_path,
                     bat, total - SECTOR, table_offset, fields[4])


def vhd_info(path):
    """Return the VhdInfo of a VHD file (reads its BAT and every bitmap); raise BadFile."""
    layout = read_vhd_layout(path)
    present = 0
    with open(path, "rb") as handle:
        for at in layout.bat:
            if at is not None:
                handle.seek(at)
                present += bin(bitmap_mask(handle.read(BITMAP_BYTES))).count("1")
    return VhdInfo(layout.uuid, layout.size, layout.disk_type, layout.parent_uuid,
                   layout.parent_path, sum(1 for at in layout.bat if at is not None),
                   present * SECTOR)


class _VhdStream:
    """A forward-only reader that counts its position (for vhd-tool's sequential stream)."""

    def __init__(self, reader):
        self.reader, self.pos = reader, 0

    def read_exact(self, length, what):
        buf = bytearray(length)
        got = _read_into(self.reader, buf)
        self.pos += got
        if got < length:
            raise BadFile("VHD stream ended at byte %d while reading %s" % (self.pos, what))
        return buf

    def skip_to(self, target, what):
        if target < self.pos:
            raise BadFile("VHD stream: %s at byte %d lies before byte %d already read"
                          % (what, target, self.pos))
        while self.pos < target:
            self.read_exact(min(target - self.pos, VHD_BLOCK), what)


def reparent_vhd(reader, fileobj, parent, uuid=None):
    """Read a VHD stream laid out as vhd-tool writes it (footer, header, BAT, blocks in
    increasing order, footer; dynamic or differencing) and write its sectors into `fileobj`
    as a differencing VHD of `parent` (a dynamic one if `parent` is None); return the VhdInfo.

    The stream's own parent fields are ignored. Its bitmaps say which sectors it holds:
    those are written, zero or not; the others come from `parent`. Raises BadFile on a
    damaged or short stream.
    """
    stream = _VhdStream(reader)
    fields = _parse_footer(stream.read_exact(SECTOR, "the footer copy"), "VHD stream")
    size = fields[9]
    stream.skip_to(fields[3], "the dynamic header")
    table_offset, entries, _, _, _ = _parse_header(stream.read_exact(1024, "the header"),
                                                   "VHD stream")
    if entries * VHD_BLOCK < size:
        raise BadFile("VHD stream: the BAT covers %d bytes, less than the disk's %d"
                      % (entries * VHD_BLOCK, size))
    stream.skip_to(table_offset, "the BAT")
    raw = struct.unpack(">%dI" % entries, stream.read_exact(entries * 4, "the BAT"))
    located = sorted((e * SECTOR, index) for index, e in enumerate(raw) if e != VHD_NO_BLOCK)
    writer = VhdWriter(fileobj, size, uuid=uuid, parent=parent)
    for at, index in located:
        stream.skip_to(at, "block %d" % index)
        mask = bitmap_mask(stream.read_exact(BITMAP_BYTES, "the bitmap of block %d" % index))
        data = memoryview(stream.read_exact(VHD_BLOCK, "block %d" % index))
        start = index * VHD_BLOCK
        for first, end in sector_runs(mask):
            last = min(start + end * SECTOR, size)
            if start + first * SECTOR < last:
                writer.write(start + first * SECTOR, data[first * SECTOR:last - start])
    tail, buf = b"", bytearray(1 << 20)
    while True:
        got = _read_into(stream.reader, buf)
        tail = (tail + bytes(buf[:got]))[-SECTOR:]
        if got < len(buf):
            break
    trailer = _parse_footer(tail, "VHD stream (trailing footer; truncated?)")
    if trailer[9] != size:
        raise BadFile("VHD stream: its two footers disagree on the size (%d and %d)"
                      % (size, trailer[9]))
    return writer.close()


class ChainReader:
    """Read a VHD chain (paths oldest first: the full, then each delta) as one raw disk.

    Checks that every child names the previous file's uid as its parent and has its size,
    else raises ChainBroken naming the file. `read(offset, length)`, `iter_raw(chunk)`.
    """

    def __init__(self, paths):
        if not paths:
            raise ChainBroken("an empty VHD chain")
        self.layouts = []
        for n, path in enumerate(paths):
            try:
                layout = read_vhd_layout(path)
            except (BadFile, OSError) as exc:
                raise ChainBroken("VHD chain: %s" % exc)
            if n == 0 and layout.disk_type != VHD_DYNAMIC:
                raise ChainBroken("VHD chain: %s is the chain's base but is not a dynamic VHD"
                                  % path)
            if n:
                prior = self.layouts[-1]
                if layout.disk_type != VHD_DIFFERENCING or layout.parent_uuid != prior.uuid:
                    raise ChainBroken("VHD chain: %s names parent uuid %s, but %s has uuid %s"
                                      % (path, layout.parent_uuid, prior.path, prior.uuid))
                if layout.size != prior.size:
                    raise ChainBroken("VHD chain: %s is %d bytes, its parent %s is %d bytes"
                                      % (path, layout.size, prior.path, prior.size))
            self.layouts.append(layout)
        self.size = self.layouts[0].size
        self.handles = [open(path, "rb") for path in paths]

    def _block(self, index):
        """Return block `index` of the disk (VHD_BLOCK bytes, the last one too)."""
        wanted = _FULL_MASK
        pieces = []             # (mask, handle, data offset), newest first
        for layout, handle in zip(reversed(self.layouts), reversed(self.handles)):
            at = layout.bat[index]
            if at is None:
                continue
            if layout.disk_type == VHD_DYNAMIC:
                mask = _FULL_MASK       # a dynamic VHD's data is its content, as qemu reads it
            else:
                handle.seek(at)
                mask = bitmap_mask(handle.read(BITMAP_BYTES))
            take = mask & wanted
            if take:
                pieces.append((take, handle, at + BITMAP_BYTES))
                wanted &= ~take
            if not wanted:
                break
        if not pieces:
            return _ZERO_BLOCK
        if len(pieces) == 1 and pieces[0][0] == _FULL_MASK:
            _, handle, at = pieces[0]
            handle.seek(at)
            return handle.read(VHD_BLOCK)
        out = bytearray(VHD_BLOCK)
        for take, handle, at in pieces:
            for first, end in sector_runs(take):
                handle.seek(at + first * SECTOR)
                out[first * SECTOR:end * SECTOR] = handle.read((end - first) * SECTOR)
        return out

    def read(self, offset, length):
        """Return `length` bytes of the disk from `offset` (cut at the disk's end)."""
        end = min(offset + length, self.size)
        parts = []
        while offset < end:
            index, within = divmod(offset, VHD_BLOCK)
            piece = min(end - offset, VHD_BLOCK - within)
            block = self._block(index)
            whole = piece == VHD_BLOCK and isinstance(block, bytes)
            parts.append(block if whole else bytes(block[within:within + piece]))
            offset += piece
        return b"".join(parts)

    def iter_raw(self, chunk=4 * 1024 * 1024):
        """Yield the whole disk as raw bytes, in order, `chunk` bytes at a time."""
        offset = 0
        while offset < self.size:
            length = min(chunk, self.size - offset)
            yield self.read(offset, length)
            offset += length

    def close(self):
        """Close the files."""
        for handle in self.handles:
            handle.close()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False


# === vmbackup/metadata.py ===================================================
# What a backup writes about its VM: vm-metadata, NAUbackup's .cfg files, the manifest's parts.
#
# Owns: write_cfg_files/save_vm_metadata, file_entry/pool_info (manifest parts).
# Reading a backup folder back (manifest, .cfg files, file kinds) is store's.
# Imports: errors, util, selection, store, formats.xva.

def cfg_text(pairs):
    """Return NAUbackup's `key=value` lines, control characters escaped so each stays one line."""
    return "".join("%s=%s\n" % (key, printable(value)) for key, value in pairs)


def os_version(view, vm):
    """Return the guest's OS name from its guest metrics, or ''."""
    metrics = view.guest_metrics.get(vm.get("guest_metrics"), {})
    version = metrics.get("os_version", {}) or {}
    return version.get("name") or version.get("distro") or ""


def write_cfg_files(folder, view, vm_ref):
    """Write vm.cfg, DISK-<dev>/vbd.cfg + vdi.cfg and VIFs/vif-<dev>.cfg; return their paths."""
    vm = view.vms[vm_ref]
    written = []

    def put(rel, pairs):
        path = inside(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_text(path, cfg_text(pairs))
        written.append(rel)

    put("vm.cfg", [("name_label", vm["name_label"]), ("name_description", vm.get("name_description", "")),
                   ("memory_dynamic_max", vm.get("memory_dynamic_max", "")),
                   ("VCPUs_max", vm.get("VCPUs_max", "")),
                   ("VCPUs_at_startup", vm.get("VCPUs_at_startup", "")),
                   ("os_version", os_version(view, vm)), ("orig_uuid", vm["uuid"])])
    for disk in vm_disks(vm, view.vbds, view.vdis):
        vbd, vdi = view.vbds[disk.vbd_ref], disk.vdi
        base = "DISK-" + safe_dirname(disk.device)
        put(base + "/vbd.cfg", [(k, vbd.get(k, "")) for k in
                                ("userdevice", "bootable", "mode", "type", "unpluggable", "empty")]
            + [("orig_uuid", vbd.get("uuid", ""))])
        put(base + "/vdi.cfg", [(k, vdi.get(k, "")) for k in
                                ("name_label", "name_description", "virtual_size", "type",
                                 "sharable", "read_only")]
            + [("orig_uuid", vdi.get("uuid", "")),
               ("orig_sr_uuid", view.srs.get(vdi.get("SR"), {}).get("uuid", ""))])
    for vif_ref in vm.get("VIFs", ()):
        vif = view.vifs.get(vif_ref)
        if not vif:
            continue
        network = view.networks.get(vif.get("network"), {})
        put("VIFs/vif-%s.cfg" % safe_dirname(vif.get("device", "")),
            [("device", vif.get("device", "")), ("network_name_label", network.get("name_label", "")),
             ("MTU", vif.get("MTU", "")), ("MAC", vif.get("MAC", "")),
             ("other_config", vif.get("other_config", {})), ("orig_uuid", vif.get("uuid", ""))])
    return written


def save_vm_metadata(transport, vm, folder):
    """Export the VM's XAPI metadata and save its ova.xml pretty-printed as vm-metadata.xml."""
    tmp = os.path.join(folder, ".metadata.tar.part")
    try:
        transport.export_metadata(vm, tmp)
        raw = ova_xml_from_tar(tmp)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    try:
        pretty = xml.dom.minidom.parseString(raw).toprettyxml(indent="  ")
    except Exception as exc:  # noqa: BLE001 - expat raises several types
        raise ExportFailed("metadata export: ova.xml does not parse: %s" % one_line(exc))
    write_text(os.path.join(folder, METADATA_FILE), pretty)
    return METADATA_FILE


def file_entry(folder, rel, digest=None):
    """Return the manifest entry {name, size, sha256} of a file in a backup folder."""
    path = os.path.join(folder, rel)
    return {"name": rel, "size": os.path.getsize(path), "sha256": digest or sha256_file(path)}


def pool_info(view):
    """Return what the manifest records about the pool's master."""
    master = view.master
    software = master.get("software_version", {}) or {}
    return {"master": master.get("hostname") or master.get("name_label", ""),
            "product_brand": software.get("product_brand", ""),
            "product_version": software.get("product_version", ""),
            "xapi": software.get("xapi", ""),
            "api_version": "%s.%s" % (master.get("API_version_major", "?"),
                                      master.get("API_version_minor", "?"))}


#: The manifest's format: readers refuse a newer one rather than guess.
MANIFEST_FORMAT = 1


def manifest_record(vm, mode, transport, started, finished, files, disks=(), skipped=(),
                    compress=None, vdi_format=None, pool=None):
    """Return a backup.json: what was backed up (vm: name, uuid, power_state), how, and every file.

    `disks` are {device, userdevice, vdi_uuid, name_label, virtual_size, file} and `files`
    are file_entry()s; the one place the manifest's shape is written down.
    """
    return {
        "tool": "vmbackup", "version": __version__, "format": MANIFEST_FORMAT,
        "vm": dict(vm), "mode": mode, "transport": transport,
        "started": started, "finished": finished,
        "compress": compress if mode == "vm-export" else None,
        "vdi_format": vdi_format if mode == "vdi-export" else None,
        "disks": [dict(d) for d in disks], "skipped_disks": list(skipped),
        "files": list(files), "pool": pool or {},
    }


# === vmbackup/transport/api.py ==============================================
# The transport over XenAPI and XAPI's HTTP handlers (/export, /export_raw_vdi, /import...).
#
# Owns: ApiTransport, BlockHasher (sha256 in a second thread), Pacer (max_rate).
# Imports: errors, util, xapi, transport.base.

#: Bytes read or sent per block; also the unit a raw disk's all-zero blocks are skipped in.
BUFSIZE = 1 << 20


#: Buffers shared by the reader and the hashing thread: an export holds NBUFFERS * BUFSIZE.
NBUFFERS = 4

#: ... and when several exports run at once (jobs > 1): two smaller ones, which still
#: overlap reading and hashing, so memory stays flat whatever -j (bench/jobs_scaling.py).
JOB_NBUFFERS, JOB_BUFSIZE = 2, 1 << 19

#: All-zero blocks, the ones a raw disk's blocks are compared with (shared, read-only;
#: never written, so their pages stay the kernel's zero page).
ZERO_BLOCKS = {BUFSIZE: bytes(BUFSIZE), JOB_BUFSIZE: bytes(JOB_BUFSIZE)}


class ApiTransport(Transport):
    """XenAPI calls, and data streamed between XAPI's HTTP handlers and the files."""

    name = "api"
    nbuffers, bufsize = NBUFFERS, BUFSIZE

    def __init__(self, xapi, config):
        Transport.__init__(self, xapi, config)
        self.endpoint = xapi.endpoint
        if getattr(config, "jobs", 1) > 1:
            self.nbuffers, self.bufsize = JOB_NBUFFERS, JOB_BUFSIZE

    # -- snapshots
    def take_snapshot(self, vm, name, quiesce):
        method = "VM.snapshot_with_quiesce" if quiesce else "VM.snapshot"
        return self.vm_obj(self.xapi.call(method, vm.ref, name))

    def prepare_snapshot(self, snap):
        self.xapi.call("VM.set_is_a_template", snap.ref, False)
        self.xapi.call("VM.set_ha_always_run", snap.ref, False)

    def destroy_snapshot(self, snap):
        """Destroy a snapshot VM and the VDIs it owns (what `xe vm-uninstall` does)."""
        try:
            owned = []
            for vbd_ref in self.xapi.call("VM.get_VBDs", snap.ref):
                vbd = self.xapi.call("VBD.get_record", vbd_ref)
                if "owner" in vbd.get("other_config", {}) and vbd.get("VDI") != "OpaqueRef:NULL":
                    owned.append(vbd["VDI"])
        except XapiFailure as exc:
            if exc.code in GONE_CODES:
                return
            raise
        self.retry_busy("destroy snapshot", lambda: self.xapi.call("VM.destroy", snap.ref))
        for vdi_ref in owned:
            self.retry_busy("destroy VDI", lambda ref=vdi_ref: self.xapi.call("VDI.destroy", ref))

    def snapshot_vdi(self, vdi, name):
        snap = self.vdi_obj(self.xapi.call("VDI.snapshot", vdi.ref, {}))
        self.xapi.call("VDI.set_name_label", snap.ref, name)
        return snap

    def destroy_vdi(self, vdi):
        self.retry_busy("destroy VDI", lambda: self.xapi.call("VDI.destroy", vdi.ref))

    # -- data
    def export_vm(self, snap, dest, compress=None):
        return self.download("/export", {"ref": snap.ref, "use_compression": compress or "false"},
                             dest, "export of %s" % snap.uuid)

    def export_vdi(self, vdi, dest, fmt):
        return self.download("/export_raw_vdi", {"vdi": vdi.ref, "format": fmt}, dest,
                             "export of VDI %s" % vdi.uuid, sparse=(fmt == "raw"))

    def export_metadata(self, vm, dest):
        return self.download("/export_metadata", {"ref": vm.ref, "export_snapshots": "false"},
                             dest, "metadata export of %s" % vm.uuid)

    def dump_pool_db(self, dest):
        return self.download("/pool/xmldbdump", {}, dest, "pool database dump")

    def import_vm(self, src, sr, preserve=False):
        """PUT an .xva to /import; return the refs of the VMs it created."""
        task = self.upload("/import", {"sr_id": sr.ref, "restore": "true" if preserve else "false"},
                           src, "import of %s" % os.path.basename(src))
        return list(task.result or [])

    def create_vdi(self, sr, name, size):
        """Create an empty VDI of `size` bytes on `sr`; return its Obj."""
        ref = self.xapi.call("VDI.create", {
            "name_label": name, "name_description": "restored by vmbackup", "SR": sr.ref,
            "virtual_size": str(size), "type": "user", "sharable": False, "read_only": False,
            "other_config": {}, "xenstore_data": {}, "sm_config": {}, "tags": []})
        return self.vdi_obj(ref)

    def import_vdi(self, vdi, src, fmt):
        """PUT a raw or vhd disk image into an existing VDI."""
        self.upload("/import_raw_vdi", {"vdi": vdi.ref, "format": fmt}, src,
                    "import of %s" % os.path.basename(src))

    def backup_host(self, host, dest):
        return self.download("/host_backup", {}, dest, "backup of host %s" % host["name_label"],
                             endpoint=self.endpoint.with_host(host["address"]))

    # -- incremental backups
    def enable_cbt(self, vdi):
        self.xapi.call("VDI.enable_cbt", vdi.ref)

    def list_changed_blocks(self, older, newer):
        return self.xapi.call("VDI.list_changed_blocks", older.ref, newer.ref)

    def data_destroy(self, vdi):
        self.xapi.call("VDI.data_destroy", vdi.ref)

    def export_vdi_delta(self, vdi, base, dest):
        return self.download("/export_raw_vdi", {"vdi": vdi.ref, "format": "vhd", "base": base.ref},
                             dest, "differencing export of VDI %s" % vdi.uuid)

    def import_vdi_stream(self, vdi, chunks, size):
        """PUT `size` raw bytes from `chunks` to /import_raw_vdi, under a task."""
        what = "import into VDI %s" % vdi.uuid
        with XapiTask(self.xapi, what, self.config.stall_timeout) as task:
            response, conn = task.http(self.endpoint, "PUT", "/import_raw_vdi",
                                       {"vdi": vdi.ref, "format": "raw"}, content_length=size)
            try:
                sent = 0
                for chunk in chunks:
                    try:
                        conn.sock.sendall(chunk)
                    except TLS_ERRORS + CONNECTION_ERRORS as exc:
                        raise transfer_error(what, exc, sent, self.config.stall_timeout)
                    sent += len(chunk)
                task.finish()
            finally:
                close_http(response, conn)

    def download(self, path, params, dest, what, endpoint=None, sparse=False):
        """Stream GET `path` into a new file `dest` under a task; return (bytes, sha256).

        XAPI sends no Content-Length, so a cut stream looks finished: success needs
        the end of the stream AND the task's status `success` (XapiTask checks it).
        """
        with XapiTask(self.xapi, what, self.config.stall_timeout) as task, \
                current_meter(what) as meter:
            response, conn = task.http(endpoint or self.endpoint, "GET", path, params)
            meter.abort = shut_socket(conn.sock)   # a stop cuts a read that waits
            try:
                nbytes, digest = self.stream(response, dest, what, sparse, meter)
            finally:
                meter.abort = None
                close_http(response, conn)
        return nbytes, digest

    def upload(self, path, params, src, what):
        """Stream the file `src` to PUT `path` under a task; return the finished task.

        XAPI answers (200, or 302 to the host that sees the SR) before it reads the
        body, so http_request reads the status line first and the body goes after it.
        """
        with XapiTask(self.xapi, what, self.config.stall_timeout) as task:
            response, conn = task.http(self.endpoint, "PUT", path, params,
                                       content_length=os.path.getsize(src))
            try:
                self.send(conn.sock, src, what)
                task.finish()  # before the close: XAPI may still be reading the last blocks
            finally:
                close_http(response, conn)
        return task

    def send(self, sock, src, what):
        """Send the file `src` on `sock`; raise ExportStalled or ExportFailed if the connection fails."""
        sent = 0
        with open(src, "rb") as handle:
            for block in iter(lambda: handle.read(BUFSIZE), b""):
                try:
                    sock.sendall(block)
                except TLS_ERRORS + CONNECTION_ERRORS as exc:
                    raise transfer_error(what, exc, sent, self.config.stall_timeout)
                sent += len(block)

    def stream(self, response, dest, what, sparse=False, meter=None):
        """Copy the response body into a new file `dest`; return (bytes, sha256 hex).

        One reused set of buffers: the body is read into one (readinto), written from it
        (os.write, no copy) and hashed in BlockHasher's thread while the next is read.
        All-zero blocks of a raw disk are skipped with a seek, so the file stays sparse.
        """
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with BlockHasher(self.nbuffers, self.bufsize) as hasher:
                total = self.copy_blocks(response, fd, hasher, what, sparse, meter)
                digest = hasher.hexdigest()
            os.ftruncate(fd, total)
            os.fsync(fd)
        finally:
            os.close(fd)
        return total, digest

    def copy_blocks(self, response, fd, hasher, what, sparse, meter=None):
        """Read `response` into the hasher's buffers and write them to `fd`; return the bytes.

        Every block is counted on `meter`; a stop request of the run ends the copy
        (Terminated) at the next block, or at once when its socket was shut.
        """
        zero = ZERO_BLOCKS[self.bufsize] if sparse else None
        pacer = Pacer(self.config.max_rate)
        meter = meter or Meter(None, "", what, None)
        total = 0
        while True:
            buf = hasher.buffer()
            try:
                n = response.readinto(buf)
            except TLS_ERRORS + CONNECTION_ERRORS as exc:
                hasher.give_back(buf)
                meter.check()
                raise transfer_error(what, exc, total, self.config.stall_timeout)
            if not n:
                hasher.give_back(buf)
                meter.check()
                return total
            if zero is not None and n == self.bufsize and buf == zero:
                os.lseek(fd, n, os.SEEK_CUR)
            else:
                write_all(fd, buf, n)
            hasher.hash(buf, n)
            total += n
            meter.add(n)
            meter.check()
            pacer.pace(total)


class Pacer:
    """Keeps a transfer at or under `rate` bytes/s (None: no limit), like XO's maxExportRate.

    pace(total) sleeps until `total` bytes are due (start + total/rate): the average rate
    since the start never exceeds `rate`, whatever the block sizes.
    """

    def __init__(self, rate):
        self.rate = rate
        self.start = time.monotonic()

    def pace(self, total):
        if self.rate:
            ahead = self.start + total / float(self.rate) - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)


def write_all(fd, buf, n):
    """Write the first `n` bytes of `buf` to `fd`, without copying them."""
    with memoryview(buf) as whole:
        view = whole[:n]
        while view:
            view = view[os.write(fd, view):]


class BlockHasher:
    """`with BlockHasher() as h:` sha256 of the blocks handed to h.hash, in a thread of its own.

    hashlib releases the GIL on large buffers, so hashing one block runs beside reading
    and writing the next. The blocks are NBUFFERS reused buffers (h.buffer() waits for a
    free one), so memory stays flat whatever the export's size.
    """

    def __init__(self, nbuffers=None, size=BUFSIZE):
        self.sha = hashlib.sha256()
        self.free = queue.Queue()
        for _ in range(nbuffers or NBUFFERS):
            self.free.put(bytearray(size))
        self.work = queue.Queue()
        self.thread = threading.Thread(target=self.run, name="sha256", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.stop()
        return False

    def buffer(self):
        """Return a free buffer (waits while every one is still being hashed)."""
        return self.free.get()

    def give_back(self, buf):
        """Return an unused buffer to the pool."""
        self.free.put(buf)

    def hash(self, buf, n):
        """Hash the first `n` bytes of `buf`; the buffer comes back to the pool afterwards."""
        self.work.put((buf, n))

    def run(self):
        while True:
            item = self.work.get()
            if item is None:
                return
            buf, n = item
            with memoryview(buf) as whole:
                self.sha.update(whole[:n])
            self.free.put(buf)

    def stop(self):
        if self.thread.is_alive():
            self.work.put(None)
            self.thread.join()

    def hexdigest(self):
        """Wait for the blocks handed so far; return their sha256 in hex."""
        self.stop()
        return self.sha.hexdigest()


# === vmbackup/transport/xe.py ===============================================
# The transport over the xe command line, as NAUbackup used on a pool host.
#
# Owns: XeTransport, XeFailed (and the xe sentences mapped back to XAPI codes), find_xe,
# die_with_parent (an xe child never outlives vmbackup).
# Imports: errors, util, transport.base.

#: Where xe lives on a pool host (then: the first xe on PATH).
DEFAULT_XE_PATHS = ("/opt/xensource/bin/xe", "/usr/bin/xe")


#: The sentence real xe prints for an API error (the datamodel's doc string), mapped
#: back to its code, for the errors the tool acts on; others print "Error code: X".
XE_ERROR_SENTENCES = {
    "Another operation involving the object is currently in progress": "OTHER_OPERATION_IN_PROGRESS",
    "this VDI is in use by some other operation": "VDI_IN_USE",
    "The uuid you supplied was invalid": "UUID_INVALID",
    "You gave an invalid object reference": "HANDLE_INVALID",
    "This function is no longer available": "MESSAGE_REMOVED",
    "The SR backend does not support the operation": "SR_OPERATION_NOT_SUPPORTED",
    "The SR is full": "SR_FULL",
    "You attempted an operation that was explicitly blocked": "OPERATION_BLOCKED",
    "not in an appropriate power state": "VM_BAD_POWER_STATE",
    "The credentials given by the user are incorrect": "SESSION_AUTHENTICATION_FAILED",
    "The server failed to handle your request, due to an internal error": "INTERNAL_ERROR",
}


#: prctl(2) option: the signal the kernel sends a process when its parent dies.
PR_SET_PDEATHSIG = 1


def _load_prctl():
    """Return libc's prctl, or None where there is none (not Linux)."""
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):  # pragma: no cover - not Linux
        return None


def die_with_parent():
    """Return a preexec_fn that makes a child die (SIGKILL) when vmbackup dies, even by
    `kill -9`, or None where the system has no PR_SET_PDEATHSIG.

    Without it a killed run leaves `xe vm-export` downloading into its .part file and
    holding the snapshot, so the next run's destroy waits on OTHER_OPERATION_IN_PROGRESS.
    (Where it is missing, the next run cancels the export's task; see leftovers.)
    """
    prctl, parent = _load_prctl(), os.getpid()
    if prctl is None:  # pragma: no cover - not Linux
        return None

    def preexec():
        # a worker thread holds the run's signals blocked; xe must die of them as usual
        signal.pthread_sigmask(signal.SIG_UNBLOCK, RUN_SIGNALS)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:   # vmbackup died before the call took effect
            os._exit(127)
    return preexec


class XeFailed(CallFailed):
    """xe {} failed (exit {}): {}"""

    def __init__(self, argv, rc, stderr):
        self.argv, self.rc, self.stderr = argv, rc, stderr
        text = one_line(stderr) or "no message"
        if self.code and self.code not in text:
            text = self.code + ": " + text
        VmBackupError.__init__(self, argv[1] if len(argv) > 1 else "?", rc, text)

    @property
    def code(self):
        """The XAPI error code behind xe's message, if it can be told."""
        match = re.search(r"Error code: (\S+)", self.stderr)
        if match:
            return match.group(1)
        for sentence, code in XE_ERROR_SENTENCES.items():
            if sentence in self.stderr:
                return code
        return ""


class XeTransport(Transport):
    """The xe command, as NAUbackup used it on the pool host; XenAPI only for reading and tags."""

    name = "xe"
    #: Seconds between looks at a downloading xe's file (has it grown?).
    POLL = 0.5
    #: Seconds an aborted xe gets to exit on SIGTERM before it is killed.
    TERM_GRACE = 10
    #: Seconds between looks at the progress of a downloading xe's task.
    TASK_PROGRESS_EVERY = 2.0

    def __init__(self, xapi, config, password=None, xe_path=None):
        Transport.__init__(self, xapi, config)
        self.xe_path = xe_path
        self.connect_args = []
        self.secret = None
        endpoint = xapi.endpoint
        if not endpoint.is_local:
            # xe's -pwf: the user, then the password. It reaches xe through a pipe
            # (-pwf /dev/fd/N), never on its command line nor in a file that a killed
            # run would leave behind.
            self.secret = ("%s\n%s\n" % (xapi.username, password or "")).encode("utf-8")
            self.connect_args = ["-s", endpoint.host, "-u", xapi.username]
            if endpoint.port:
                self.connect_args[2:2] = ["-p", str(endpoint.port)]
            if endpoint.scheme == "http":
                self.connect_args.append("--nossl")

    def argv(self, command, *flags, **params):
        """Return xe's argument list: xe("vm-export", uuid=u) -> [XE, 'vm-export', 'uuid=u']."""
        args = [self.xe_path, command]
        for key, value in params.items():
            if value is None:
                continue
            if isinstance(value, bool):
                value = "true" if value else "false"
            args.append("%s=%s" % (key.replace("_", "-"), value))
        return args + list(flags) + self.connect_args

    def start_xe(self, args, **kwargs):
        """Start xe with `args` (plus -pwf /dev/fd/N when it needs the password); return the
        Popen. The child dies with vmbackup (die_with_parent)."""
        read_fd = None
        if self.secret is not None:
            read_fd, write_fd = os.pipe()   # a few bytes: the pipe holds them, no writer blocks
            try:
                os.write(write_fd, self.secret)
            finally:
                os.close(write_fd)
            args = args + ["-pwf", "/dev/fd/%d" % read_fd]
        try:
            return subprocess.Popen(args, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent(),
                                    pass_fds=(read_fd,) if read_fd is not None else (), **kwargs)
        finally:
            if read_fd is not None:
                os.close(read_fd)

    def xe(self, command, *flags, **params):
        """Run xe and return its stdout; raise XeFailed with its stderr."""
        args = self.argv(command, *flags, **params)
        log.debug("run %s", args[:2])
        proc = self.start_xe(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True)
        try:
            out, err = proc.communicate()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if proc.returncode != 0:
            raise XeFailed(args, proc.returncode, err or out)
        return out

    def xe_long(self, dest, what, command, progress_of=None, **params):
        """Run a downloading xe command, aborting it if `dest` stops growing for stall_timeout.

        Its progress: the bytes in `dest`, and the fraction XAPI gives the task that
        exports `progress_of` ((class, Obj): xe prints none). A stop request of the run
        ends xe (Terminated).
        """
        args = self.argv(command, **params)
        log.debug("run %s", args[:2])
        with tempfile.TemporaryFile() as err, current_meter(what) as meter:
            proc = self.start_xe(args, stdout=subprocess.DEVNULL, stderr=err)
            try:
                size, moved = -1, time.monotonic()
                asked = moved
                while proc.poll() is None:
                    time.sleep(self.POLL)
                    meter.check()
                    now_size = os.path.getsize(dest) if os.path.exists(dest) else 0
                    meter.done = now_size
                    if now_size != size:
                        size, moved = now_size, time.monotonic()
                    elif time.monotonic() - moved > self.config.stall_timeout:
                        raise ExportStalled(what, self.config.stall_timeout)
                    if progress_of and meter.board \
                            and time.monotonic() - asked > self.TASK_PROGRESS_EVERY:
                        asked = time.monotonic()
                        meter.fraction = self.task_progress(*progress_of)
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(self.TERM_GRACE)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            if proc.returncode != 0:
                meter.check()
                err.seek(0)
                raise XeFailed(args, proc.returncode, err.read().decode("utf-8", "replace"))
        fsync_path(dest)
        return os.path.getsize(dest), None

    def task_progress(self, cls, obj):
        """Return the progress (0..1) of the task exporting `obj` (a VM or VDI), or None."""
        try:
            for task in self.xapi.call(cls + ".get_current_operations", obj.ref):
                progress = float(self.xapi.call("task.get_progress", task))
                if 0.0 <= progress <= 1.0:
                    return progress
        except (VmBackupError, ValueError) as exc:
            log.debug("progress of %s: %s", obj.uuid, exc)
        return None

    # -- snapshots
    def take_snapshot(self, vm, name, quiesce):
        command = "vm-snapshot-with-quiesce" if quiesce else "vm-snapshot"
        return self.vm_obj(uuid=self.xe(command, uuid=vm.uuid, new_name_label=name).strip())

    def prepare_snapshot(self, snap):
        self.xe("template-param-set", uuid=snap.uuid, is_a_template=False, ha_always_run=False)

    def destroy_snapshot(self, snap):
        # snapshot-uninstall, not vm-uninstall: vm-uninstall finds nothing while the
        # snapshot is still a template (e.g. when the export never started).
        self.retry_busy("snapshot-uninstall",
                        lambda: self.xe("snapshot-uninstall", uuid=snap.uuid, force=True))

    def snapshot_vdi(self, vdi, name):
        snap = self.vdi_obj(uuid=self.xe("vdi-snapshot", uuid=vdi.uuid).strip())
        self.xe("vdi-param-set", uuid=snap.uuid, name_label=name)
        return snap

    def destroy_vdi(self, vdi):
        self.retry_busy("vdi-destroy", lambda: self.xe("vdi-destroy", uuid=vdi.uuid))

    # -- data
    def export_vm(self, snap, dest, compress=None):
        # xe matches compress= exactly: only true/gzip/zstd compress ("True" would not).
        return self.xe_long(dest, "export of %s" % snap.uuid, "vm-export", ("VM", snap),
                            uuid=snap.uuid, filename=dest, compress=compress or "false")

    def export_vdi(self, vdi, dest, fmt):
        return self.xe_long(dest, "export of VDI %s" % vdi.uuid, "vdi-export", ("VDI", vdi),
                            uuid=vdi.uuid, filename=dest, format=fmt)

    def export_metadata(self, vm, dest):
        return self.xe_long(dest, "metadata export of %s" % vm.uuid, "vm-export", uuid=vm.uuid,
                            filename=dest, metadata=True)

    def dump_pool_db(self, dest):
        return self.xe_long(dest, "pool database dump", "pool-dump-database", file_name=dest)

    def import_vm(self, src, sr, preserve=False):
        out = self.xe("vm-import", filename=src, sr_uuid=sr.uuid, preserve=preserve or None)
        return [self.vm_obj(uuid=u).ref for u in re.split(r"[\s,]+", out.strip()) if u]

    def import_vdi(self, vdi, src, fmt):
        self.xe("vdi-import", uuid=vdi.uuid, filename=src, format=fmt)

    def create_vdi(self, sr, name, size):
        return self.vdi_obj(uuid=self.xe("vdi-create", sr_uuid=sr.uuid, name_label=name,
                                         virtual_size=size, type="user").strip())

    def plug_vbd(self, vbd_ref):
        self.xe("vbd-plug", uuid=self.xapi.call("VBD.get_uuid", vbd_ref))

    def backup_host(self, host, dest):
        return self.xe_long(dest, "backup of host %s" % host["name_label"], "host-backup",
                            host=host["uuid"], file_name=dest)

    # -- incremental backups: xe has every CBT command; NBD details and unplugging a
    # disk from a snapshot go through XenAPI (Transport).
    def enable_cbt(self, vdi):
        self.xe("vdi-enable-cbt", uuid=vdi.uuid)

    def list_changed_blocks(self, older, newer):
        return self.xe("vdi-list-changed-blocks", vdi_from_uuid=older.uuid,
                       vdi_to_uuid=newer.uuid).strip()

    def data_destroy(self, vdi):
        self.xe("vdi-data-destroy", uuid=vdi.uuid)

    def export_vdi_delta(self, vdi, base, dest):
        return self.xe_long(dest, "differencing export of VDI %s" % vdi.uuid, "vdi-export",
                            uuid=vdi.uuid, filename=dest, format="vhd", base=base.uuid)

    def import_vdi_stream(self, vdi, chunks, size):
        """xe vdi-import reads a file: write the bytes to a sparse temporary file first."""
        with tempfile.NamedTemporaryFile(prefix="vmbackup-restore-", suffix=".raw") as tmp:
            for chunk in chunks:
                if chunk.count(0) == len(chunk):
                    tmp.seek(len(chunk), os.SEEK_CUR)
                else:
                    tmp.write(chunk)
            tmp.truncate(size)
            tmp.flush()
            self.xe("vdi-import", uuid=vdi.uuid, filename=tmp.name, format="raw")

    def close(self):
        self.secret = None


def find_xe(config):
    """Return the xe binary to use, or None: xe_path, then /opt/xensource/bin/xe, then PATH."""
    if config.xe_path:
        return config.xe_path
    for path in DEFAULT_XE_PATHS:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("xe")


# === vmbackup/chain.py ======================================================
# Chains of delta-export points on the backup storage: following, verifying, merging them.
#
# A delta-export point is a backup folder whose manifest gives each disk a `chain` entry
# (chain_entry): the chain's id, the point's position, its VHD's uid and its parent (the
# previous point's folder, file, VHD uid and sha256; None for the chain's base, a dynamic
# VHD). Every other file of a chain is a differencing VHD of its parent.
#
# Retention on chains (plan_chain_retention, pure): keeping N points never deletes a file a
# kept point needs; when the oldest point falls out and the next one needs it, the next
# point's delta is merged into the old full on the storage (merge_points): the full's file
# is patched in place with the delta's sectors, takes the delta's VHD uid (so the next
# delta's parent uid stays right and its file is untouched) and replaces the delta in the
# next point's folder; that point becomes the chain's base. A delta that GFS rules drop
# between two kept points is merged the same way into the next delta, which then names the
# dropped point's parent. A merge first writes a journal (.chain-merge.json in the VM's
# folder) naming everything it will change; every step after it can be done again, so a
# merge a kill interrupted is finished by finish_merges, which every prune calls first.
#
# Owns: chain_entry/chain_parent (the manifest's chain fields, written down once),
# chain_links, chain_paths, verify_chain, plan_chain_retention (ChainPoint, ChainAction,
# incoming_point), merge_points, finish_merges, MERGE_JOURNAL, MERGE_HOOKS.
# Imports: errors, util, store, formats.vhdfile.

#: The mode whose backups are chains.
DELTA_MODE = "delta-export"

#: The journal of a merge in progress, in the VM's folder.
MERGE_JOURNAL = ".chain-merge.json"

#: Called with a step's name before every change a merge makes (tests kill a merge here).
MERGE_HOOKS = []


# -- the manifest's chain fields -------------------------------------------------------
def chain_parent(backup, file, vhd_uuid, sha256):
    """Return a chain entry's `parent`: the parent point's folder name, file, VHD uid, sha256."""
    return {"backup": backup, "file": file, "vhd_uuid": vhd_uuid, "sha256": sha256}


def chain_entry(chain_id, position, vhd_uuid, parent=None, reference=None, method="full",
                reason=None, changed_bytes=0):
    """Return the `chain` field of a delta-export disk entry (the one place its shape is written).

    `parent` is chain_parent(...) or None for a full; `reference` is
    {"vdi_uuid", "kind": "cbt_metadata"|"snapshot"} or None; `method` is full, cbt-nbd,
    cbt-export or export; `reason` says why a point is a full.
    """
    return {"id": chain_id, "position": position, "vhd_uuid": vhd_uuid, "parent": parent,
            "reference": reference, "method": method, "reason": reason,
            "changed_bytes": changed_bytes}


class ChainLink(typing.NamedTuple):
    """One disk of one delta-export point, as its manifest records it."""
    backup: str                     # the point's folder name
    device: str
    file: str
    vhd_uuid: str
    chain_id: str
    position: int
    parent: typing.Optional[dict]   # chain_parent(...) or None (the chain's base)
    sha256: typing.Optional[str]    # the file's, from the manifest's files
    size: typing.Optional[int]      # the file's size in bytes, from the manifest's files
    virtual_size: typing.Optional[int]


def chain_links(folder):
    """Return {device: ChainLink} of a BackupFolder ({} unless it is a delta-export point)."""
    manifest = folder.manifest
    if not manifest or manifest.get("mode") != DELTA_MODE:
        return {}
    files = {f.get("name"): f for f in manifest.get("files", ()) if isinstance(f, dict)}
    links = {}
    for disk in manifest.get("disks", ()):
        chain = disk.get("chain") if isinstance(disk, dict) else None
        if not isinstance(chain, dict) or not disk.get("file"):
            continue
        entry = files.get(disk["file"], {})
        parent = chain.get("parent") if isinstance(chain.get("parent"), dict) else None
        links[str(disk.get("device"))] = ChainLink(
            folder.name, str(disk.get("device")), str(disk["file"]), str(chain.get("vhd_uuid")),
            str(chain.get("id")), chain.get("position"), parent, entry.get("sha256"),
            entry.get("size"), disk.get("virtual_size"))
    return links


def _link_of_file(links, file):
    """Return the ChainLink of `links` whose file is `file`, or None."""
    return next((link for link in links.values() if link.file == file), None)


def chain_folders(vm_dir, name, device):
    """Return [(BackupFolder, ChainLink)] from the chain's base to the point `name`'s disk
    `device`, following the manifests' parent links; raise ChainBroken naming the missing link."""
    found, seen = [], set()
    want_device, want_file = device, None
    while True:
        if name in seen:
            raise ChainBroken("VHD chain of %s: the parent links loop at %s" % (device, name))
        seen.add(name)
        needed = " (needed by %s)" % found[-1][0].name if found else ""
        try:
            folder = read_backup_folder(inside(vm_dir, name))
        except OSError:
            raise ChainBroken("VHD chain of %s: backup %s is missing%s" % (device, name, needed))
        if not folder.complete:
            raise ChainBroken("VHD chain of %s: backup %s is incomplete%s" % (device, name, needed))
        links = chain_links(folder)
        link = _link_of_file(links, want_file) if want_file else links.get(want_device)
        if link is None:
            raise ChainBroken("VHD chain of %s: backup %s has no delta-export disk %s%s"
                              % (device, name, want_file or want_device, needed))
        if found and found[-1][1].parent.get("vhd_uuid") != link.vhd_uuid:
            raise ChainBroken("VHD chain of %s: backup %s names parent VHD uuid %s, the manifest "
                              "of %s records %s" % (device, found[-1][0].name,
                                                    found[-1][1].parent.get("vhd_uuid"), name,
                                                    link.vhd_uuid))
        found.append((folder, link))
        if link.parent is None:
            return list(reversed(found))
        name, want_file = str(link.parent.get("backup")), str(link.parent.get("file"))


def chain_paths(store, vm_folder, backup_name, device):
    """Return the absolute paths of the VHD chain of one disk of a point, the full first;
    raise ChainBroken naming the missing link (or an unfinished merge of the chain)."""
    vm_dir = inside(store.root, vm_folder)
    journal = read_journal(vm_dir)
    chain = chain_folders(vm_dir, backup_name, device)
    if journal and {journal.get("from"), journal.get("into")} & {f.name for f, _ in chain}:
        raise ChainBroken("VHD chain of %s in %s: a merge of %s into %s was interrupted; the "
                          "next backup run of this VM finishes it" % (
                              device, backup_name, journal.get("from"), journal.get("into")))
    return [inside(folder.path, link.file) for folder, link in chain]


# -- verifying -----------------------------------------------------------------------------
#: What verify already read of chain files in this process (sha256, VHD layouts), by
#: (what, path, size, mtime): a VM folder's points share their ancestors' files.
_DIGESTS = {}


def _memo(memo, what, path, compute):
    """Return compute(path), once per process for an unchanged file."""
    st = os.stat(path)
    key = (what, path, st.st_size, st.st_mtime_ns)
    if key not in memo:
        memo[key] = compute(path)
    return memo[key]


def file_digest(path, digests):
    """Return the sha256 of `path`, once per run for an unchanged file (`digests` is the memo)."""
    return _memo(digests, "sha256", path, sha256_file)


def verify_chain(backup, quick=False, digests=None):
    """Return [(file, message)] of what is wrong with the chains of a delta-export BackupFolder.

    Every link down to the base: the parent point exists and is complete, its manifest
    records the VHD uid and sha256 the child names, its file still has that sha256
    (unless `quick`), and the VHD files agree: the child's header names the parent's uid,
    sizes are equal, the base is dynamic. `file` is relative to the backup folder.
    """
    digests = _DIGESTS if digests is None else digests
    vm_dir = os.path.dirname(os.path.abspath(backup.path))
    problems = []
    journal = read_journal(vm_dir)
    if journal and backup.name in (journal.get("from"), journal.get("into")):
        problems.append(("", "a merge of %s into %s was interrupted: the next backup run of "
                             "this VM finishes it" % (journal.get("from"), journal.get("into"))))
    for device, link in sorted(chain_links(backup).items()):
        try:
            chain = chain_folders(vm_dir, backup.name, device)
        except ChainBroken as exc:
            problems.append((link.file, str(exc)))
            continue
        layouts = []
        for n, (folder, own) in enumerate(chain):
            rel = os.path.relpath(inside(folder.path, own.file), backup.path)
            path = inside(folder.path, own.file)
            if n:
                parent_folder, parent = chain[n - 1]
                want = own.parent
                if want.get("sha256") != parent.sha256:
                    problems.append((rel, "names its parent's sha256 %s, the manifest of %s "
                                          "records %s" % (str(want.get("sha256"))[:12],
                                                          parent_folder.name,
                                                          str(parent.sha256)[:12])))
            if quick:
                continue
            if folder.name != backup.name:
                try:
                    if file_digest(path, digests) != own.sha256:
                        problems.append((rel, "sha256 mismatch: the file changed since the backup"))
                except OSError as exc:
                    problems.append((rel, "cannot read: %s" % (exc.strerror or exc)))
                    break
            try:
                layout = _memo(digests, "layout", path, read_vhd_layout)
            except (BadFile, OSError) as exc:
                problems.append((rel, "not a readable VHD: %s" % exc))
                break
            problems += _layout_problems(rel, layout, own, layouts[-1] if layouts else None)
            layouts.append(layout)
    return problems


def _layout_problems(rel, layout, link, parent):
    """Return [(rel, message)] where a chain file's VHD disagrees with its manifest or parent."""
    found = []
    if layout.uuid != link.vhd_uuid:
        found.append((rel, "VHD uuid %s, the manifest records %s" % (layout.uuid, link.vhd_uuid)))
    if link.virtual_size is not None and str(layout.size) != str(link.virtual_size):
        found.append((rel, "VHD virtual size %d, the manifest records %s"
                      % (layout.size, link.virtual_size)))
    if parent is None:
        if layout.disk_type != VHD_DYNAMIC:
            found.append((rel, "the chain's base is not a dynamic VHD"))
    elif layout.disk_type != VHD_DIFFERENCING or layout.parent_uuid != parent.uuid:
        found.append((rel, "its VHD names parent uuid %s, its parent's VHD has uuid %s"
                      % (layout.parent_uuid, parent.uuid)))
    elif layout.size != parent.size:
        found.append((rel, "VHD virtual size %d, its parent's is %d" % (layout.size, parent.size)))
    return found


# -- retention on chains (pure) ------------------------------------------------------------
def chain_point(folder):
    """Return the ChainPoint of a BackupFolder."""
    links = chain_links(folder) if folder.mode == DELTA_MODE else None
    if links is not None:
        links = {device: (link.parent or {}).get("backup") for device, link in links.items()}
    return ChainPoint(folder.name, folder.when, folder.complete, links)


def incoming_point(folders, mode, when):
    """Return the ChainPoint of the backup a run is about to make (named None, at `when`): in
    delta-export, a delta of the newest complete point's disks (a preview cannot know that a
    full will be needed); None in another mode."""
    if mode != DELTA_MODE:
        return None
    last = next((chain_point(f) for f in reversed(list(folders))
                 if f.complete and f.mode == DELTA_MODE), None)
    return ChainPoint(None, when, True,
                      {device: last.name for device in (last.links or {})} if last else {})


class ChainPoint(typing.NamedTuple):
    """One backup folder of a retention group, as plan_chain_retention sees it."""
    name: str
    when: object                    # datetime, from the name
    complete: bool
    links: typing.Optional[dict]    # delta-export: {device: parent folder name or None}; else None


class ChainAction(typing.NamedTuple):
    """One step of retention: delete a folder, or merge its disks `devices` into `into` (the
    next point of their chains, which needs them; it takes their parent, None for a full),
    and delete it."""
    kind: str                       # "delete" or "merge"
    name: str
    into: typing.Optional[str] = None
    devices: typing.Tuple[str, ...] = ()
    then_delete: bool = True        # False while another merge still needs the folder

    def describe(self):
        """Return what the step does, in words."""
        if self.kind == "merge":
            return "%s (merged into %s: %s)" % (self.name, self.into, ", ".join(self.devices))
        return self.name


def plan_chain_retention(points, doomed):
    """Return the [ChainAction] that remove the folders `doomed` (retention's verdict) from
    `points` [ChainPoint], oldest first: a doomed folder a kept point's chain runs through is
    merged into the next point on that chain (never deleted while needed), any other is
    deleted. Pure.
    """
    doomed = set(doomed)
    by_name = {p.name: p for p in points}
    needed = set()                  # (folder, device) a kept point's chain runs through
    next_on_path = {}               # (folder, device) -> the child on that path
    for point in points:
        if point.name in doomed or not point.complete or not point.links:
            continue
        for device in point.links:
            child, parent = point.name, point.links[device]
            while parent in by_name and (parent, device) not in needed:
                up = by_name[parent]
                if not up.complete or not up.links or device not in up.links:
                    break
                needed.add((parent, device))
                next_on_path[(parent, device)] = child
                child, parent = parent, up.links[device]
    actions = []
    for point in sorted((by_name[n] for n in doomed), key=lambda p: (p.when, p.name)):
        into = {}
        for device in sorted(point.links or ()):
            if (point.name, device) in needed:
                into.setdefault(next_on_path[(point.name, device)], []).append(device)
        if not into:
            actions.append(ChainAction("delete", point.name))
        for n, (child, devices) in enumerate(sorted(into.items())):
            actions.append(ChainAction("merge", point.name, child, tuple(devices),
                                       n == len(into) - 1))
    return actions


# -- merging ---------------------------------------------------------------------------------
def _step(what):
    """Announce one change of a merge to MERGE_HOOKS."""
    for hook in MERGE_HOOKS:
        hook(what)


def read_journal(vm_dir):
    """Return the merge journal of a VM folder as a dict, or None."""
    try:
        with open(os.path.join(vm_dir, MERGE_JOURNAL), encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ChainBroken("%s: the merge journal does not parse: %s"
                          % (os.path.join(vm_dir, MERGE_JOURNAL), exc))


def _write_journal(vm_dir, journal):
    """Write the journal atomically: from now on the merge is finished, never undone."""
    path = os.path.join(vm_dir, MERGE_JOURNAL)
    _step("journal")
    with open(path + ".part", "w", encoding="utf-8") as handle:
        json.dump(journal, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(path + ".part", path)
    fsync_dir(vm_dir)


def plan_merge(vm_dir, name, into, devices):
    """Return the journal of merging the disks `devices` of point `name` into point `into`;
    raise ChainBroken if they do not form a sound link (nothing is changed)."""
    base, child = (read_backup_folder(inside(vm_dir, n)) for n in (name, into))
    base_links, child_links = chain_links(base), chain_links(child)
    disks = []
    for device in devices:
        low, high = base_links.get(device), child_links.get(device)
        if low is None or high is None or not high.parent \
                or high.parent.get("backup") != name or high.parent.get("file") != low.file:
            raise ChainBroken("cannot merge disk %s of %s into %s: %s is not its parent"
                              % (device, name, into, name))
        full_path, delta_path = inside(base.path, low.file), inside(child.path, high.file)
        try:
            full, delta = read_vhd_layout(full_path), read_vhd_layout(delta_path)
        except (BadFile, OSError) as exc:
            raise ChainBroken("cannot merge disk %s of %s into %s: %s" % (device, name, into, exc))
        kind = VHD_DYNAMIC if low.parent is None else VHD_DIFFERENCING
        if full.disk_type != kind or delta.disk_type != VHD_DIFFERENCING \
                or delta.parent_uuid != full.uuid or delta.size != full.size \
                or delta.uuid != high.vhd_uuid:
            raise ChainBroken("cannot merge disk %s of %s into %s: the VHD files do not link "
                              "(%s is not the parent of %s)" % (device, name, into, full_path,
                                                                  delta_path))
        if sha256_file(delta_path) != high.sha256:
            raise ChainBroken("cannot merge disk %s of %s into %s: %s changed since the backup "
                              "(sha256 mismatch)" % (device, name, into, delta_path))
        new_blocks = [i for i, at in enumerate(delta.bat)
                      if at is not None and full.bat[i] is None]
        absorbed = next((d.get("chain", {}).get("merged") for d in base.manifest["disks"]
                         if d.get("device") == device), None) or []
        disks.append({"device": device, "merged": sorted(set(absorbed) | {name}),
                      "disk_type": kind, "parent": low.parent,
                      "from_file": low.file, "into_file": high.file,
                      "uuid": delta.uuid, "size": full.size, "data_end": full.footer_at,
                      "timestamp": delta.timestamp, "new_blocks": new_blocks})
    return {"format": 1, "from": name, "into": into, "disks": disks}


def merge_points(store, vm_folder, name, into, devices, vlog=None, delete=True):
    """Merge the disks `devices` of point `name` into point `into` (their next delta), which
    takes their parent (a full: becomes the base), then (if `delete`) delete `name`;
    crash-safe (see the module)."""
    vm_dir = inside(store.root, vm_folder)
    pending = read_journal(vm_dir)
    if pending:
        raise ChainBroken("cannot merge %s into %s: the merge of %s into %s is not finished"
                          % (name, into, pending.get("from"), pending.get("into")))
    journal = plan_merge(vm_dir, name, into, devices)
    journal["delete"] = delete
    _write_journal(vm_dir, journal)
    _carry_out(store, vm_dir, journal)
    (vlog or log).info("retention: merged %s into %s (%s)", name, into, ", ".join(devices))


def finish_merges(store, vm_folder, vlog=None):
    """Finish the merge a kill interrupted in a VM's folder (its journal says what is left);
    return the names of the points merged ([] if none was pending)."""
    vm_dir = inside(store.root, vm_folder)
    if os.path.lexists(os.path.join(vm_dir, MERGE_JOURNAL + ".part")):
        os.unlink(os.path.join(vm_dir, MERGE_JOURNAL + ".part"))     # never started
    journal = read_journal(vm_dir) if os.path.isdir(vm_dir) else None
    if not journal:
        return []
    _carry_out(store, vm_dir, journal)
    (vlog or log).info("retention: finished merging %s into %s (an earlier merge was "
                       "interrupted)", journal["from"], journal["into"])
    return [journal["from"]]


def _carry_out(store, vm_dir, journal):
    """Do every step of a journaled merge that is not done yet; each can be done again."""
    base_dir, into_dir = inside(vm_dir, journal["from"]), inside(vm_dir, journal["into"])
    for disk in journal["disks"]:
        full_path = os.path.join(base_dir, disk["from_file"])
        delta_path = os.path.join(into_dir, disk["into_file"])
        if os.path.exists(full_path):
            _patch_full(full_path, delta_path, disk)
            _step("rename")
            os.replace(full_path, delta_path)
            fsync_dir(into_dir)
            fsync_dir(base_dir)
        else:
            try:
                done = read_vhd_layout(delta_path)
            except (BadFile, OSError) as exc:
                raise ChainBroken("merge of %s into %s: %s" % (journal["from"], journal["into"], exc))
            if done.disk_type != disk["disk_type"] or done.uuid != disk["uuid"]:
                raise ChainBroken("merge of %s into %s: %s is gone and %s is not the merged full"
                                  % (journal["from"], journal["into"], full_path, delta_path))
    _rewrite_manifests(store, vm_dir, journal)
    if journal.get("delete", True) and os.path.isdir(base_dir):
        _step("delete")
        store.delete(base_dir)
    store.finish_deletes(os.path.basename(vm_dir))
    _step("forget")
    os.unlink(os.path.join(vm_dir, MERGE_JOURNAL))
    fsync_dir(vm_dir)


def _patch_full(full_path, delta_path, disk):
    """Write the delta's sectors into the older file (the full, or a delta GFS dropped) in
    place, new blocks where the journal says, then its BAT and both footers with the delta's
    uid: the older file becomes the merged point. Every write can be done again."""
    span = BITMAP_BYTES + VHD_BLOCK
    new_at = {b: disk["data_end"] + k * span for k, b in enumerate(disk["new_blocks"])}
    delta = read_vhd_layout(delta_path)
    with open(full_path, "r+b") as full, open(delta_path, "rb") as source:
        full.seek(512)                  # this tool's VHDs: the header follows the footer copy
        header = full.read(1024)
        table_offset, _, entries = struct.unpack_from(">QII", header, 16)
        full.seek(table_offset)
        bat = list(struct.unpack(">%dI" % entries, full.read(entries * 4)))
        for index, at in enumerate(delta.bat):
            if at is None:
                continue
            source.seek(at)
            mask = bitmap_mask(source.read(BITMAP_BYTES))
            if index in new_at:
                # appended past the old end of the file: what is not written reads as zero
                where, have = new_at[index], 0
                bat[index] = where // SECTOR
            elif bat[index] == 0xFFFFFFFF:
                raise ChainBroken("merge into %s: block %d is neither in the full nor planned"
                                  % (full_path, index))
            else:
                where = bat[index] * SECTOR
                full.seek(where)
                have = bitmap_mask(full.read(BITMAP_BYTES))
            _step("block")
            for first, end in sector_runs(mask):
                source.seek(at + BITMAP_BYTES + first * SECTOR)
                full.seek(where + BITMAP_BYTES + first * SECTOR)
                full.write(source.read((end - first) * SECTOR))
            full.seek(where)
            full.write(mask_bitmap(have | mask))
        _step("bat")
        full.seek(table_offset)
        full.write(struct.pack(">%dI" % entries, *bat))
        footer = vhd_footer_bytes(disk["size"], disk["disk_type"],
                                  uuidlib.UUID(disk["uuid"]).bytes, disk["timestamp"])
        end = disk["data_end"] + len(new_at) * span
        _step("footer")
        full.seek(end)
        full.write(footer)
        full.truncate(end + SECTOR)
        full.flush()
        os.fsync(full.fileno())
        full.seek(0)
        full.write(footer)
        full.flush()
        os.fsync(full.fileno())


def _rewrite_manifests(store, vm_dir, journal):
    """Give `into`'s merged disks the parent of `from` in its manifest (None: it is the
    chain's base), with the new sha256 and size of their files, and give its children
    that sha256 for their parent."""
    into = read_backup_folder(inside(vm_dir, journal["into"]))
    manifest = into.manifest
    merged = {d["into_file"]: d for d in journal["disks"]}
    digests = {}
    for entry in manifest["files"]:
        if entry.get("name") in merged:
            path = inside(into.path, entry["name"])
            digests[entry["name"]] = entry["sha256"] = sha256_file(path)
            entry["size"] = os.path.getsize(path)
    for disk in manifest.get("disks", ()):
        if disk.get("file") in merged:
            chain = disk["chain"]
            chain["parent"] = merged[disk["file"]]["parent"]
            chain["merged"] = merged[disk["file"]]["merged"]
    _step("manifest")
    store.write_file(into.path, MANIFEST, manifest_text(manifest))
    for name in sorted(os.listdir(vm_dir)):
        if name in (journal["into"], journal["from"]) or not name.startswith("backup-"):
            continue
        try:
            folder = read_backup_folder(inside(vm_dir, name))
        except OSError:
            continue
        changed = False
        for disk in (folder.manifest or {}).get("disks", ()):
            parent = (disk.get("chain") or {}).get("parent") if isinstance(disk, dict) else None
            if parent and parent.get("backup") == journal["into"] and parent.get("file") in digests \
                    and parent.get("sha256") != digests[parent["file"]]:
                parent["sha256"] = digests[parent["file"]]
                changed = True
        if changed:
            _step("manifest")
            store.write_file(folder.path, MANIFEST, manifest_text(folder.manifest))


# === vmbackup/transport/choose.py ===========================================
# Picking the transport a run uses (api or xe) from the settings.
#
# Owns: make_transport.
# Imports: errors, transport.api, transport.xe.

def make_transport(config, xapi, password):
    """Return the transport for this run: xe on the pool host when xe exists, else api.

    Only xe needs the password (in its -pwf file); the API transport uses the session.
    `xe vm-export` cannot be throttled, so max_rate makes auto pick api.
    """
    name = config.transport
    xe_path = find_xe(config) if name in ("auto", "xe") else None
    if name == "auto":
        name = "xe" if (xapi.endpoint.is_local and xe_path and not config.max_rate) else "api"
    if name == "xe":
        if not xe_path or not os.access(xe_path, os.X_OK):
            raise ConfigError("transport=xe (%s): no xe binary found (xe_path=%s)"
                              % (config.where("transport"), config.xe_path or "-"))
        if config.max_rate:
            log.warning("max_rate is ignored by transport=xe (xe vm-export has no limit); "
                        "use transport=api to limit the exports")
        return XeTransport(xapi, config, password, xe_path)
    return ApiTransport(xapi, config)


# === vmbackup/check.py ======================================================
# Verifying backups without a server: each file, each folder, each dated file, as typed results.
#
# Owns: check_file; the typed results (Problem, FileCheck, CheckResult, each with to_json);
# check_backup/verify_backup/verify_dated_file/verify_single_file, verify_targets,
# verify_lines, verify_exit_code.
# Imports: errors, util, store, metadata, chain, formats.

# -- pool database dumps and host backups -----------------------------------------
def check_pool_dump(path):
    """Return the problems of a pool database dump: empty, not XML, or not a <database>."""
    parser = xml.parsers.expat.ParserCreate()
    roots = []
    parser.StartElementHandler = lambda name, attrs: roots.append(name) if not roots else None
    try:
        with open(path, "rb") as handle:
            empty = True
            for block in iter(lambda: handle.read(1 << 20), b""):
                empty = False
                parser.Parse(block, False)
            if empty:
                return ["empty: XAPI sent nothing"]
            parser.Parse(b"", True)
    except xml.parsers.expat.ExpatError as exc:
        return ["pool database dump is not complete XML: %s" % exc]
    if roots[:1] != ["database"]:
        return ["root element is <%s>, not a XAPI <database>" % (roots[0] if roots else "")]
    return []


def check_host_backup(path):
    """Return the problems of a host backup: a gzip-compressed tar, complete."""
    if os.path.getsize(path) == 0:
        return ["empty: XAPI sent nothing"]
    try:
        with gzip.open(path, "rb") as stream:
            tar = TarStream(stream)
            while tar.next() is not None:
                pass
            tar.skip_rest()
    except BadFile as exc:
        return [str(exc)]
    except EOFError:
        return ["gzip stream: truncated (ends before its end marker)"]
    except (OSError, zlib.error) as exc:
        return ["not a complete gzip-compressed tar: %s" % exc]
    return []


def check_file(path, kind, virtual_size=None, want_sha256=False):
    """Check one backup file by its kind; return (problems, unchecked, sha256 or None).

    xva: tar, ova.xml, every chunk against its checksum, disk sizes; vhd: footers,
    header, BAT; raw: exactly `virtual_size` bytes (unchecked if unknown);
    metadata: ova.xml parses. The SHA-256 is computed in the same pass where possible.
    """
    if kind == "xva":
        problems, unchecked, info = check_xva_file(path, want_sha256)
        return problems, unchecked, info.get("sha256")
    problems, unchecked = [], []
    if kind == "vhd":
        problems = check_vhd(path, virtual_size)
    elif kind == "raw":
        size = os.path.getsize(path)
        if virtual_size is None:
            unchecked.append("the disk's virtual size is not recorded: raw size not checked")
        elif size != virtual_size:
            problems.append("raw image is %d bytes, the disk's virtual_size is %d%s"
                            % (size, virtual_size, " (truncated?)" if size < virtual_size else ""))
    elif kind == "metadata":
        try:
            with open(path, "rb") as handle:
                parse_ova_xml(handle.read())
        except ValueError as exc:
            problems.append("vm-metadata.xml does not parse: %s" % exc)
    return problems, unchecked, (sha256_file(path) if want_sha256 else None)


# -- typed results ------------------------------------------------------------------
class Problem(typing.NamedTuple):
    """One thing wrong with a backup, or one thing not checkable here: which file
    (relative to the backup folder; "" for the backup itself) and what, in words."""
    file: str
    message: str

    def to_json(self):
        """Return {"file": ..., "message": ...}."""
        return self._asdict()

    def __str__(self):
        return "%s: %s" % (self.file, self.message) if self.file else self.message


class FileCheck(typing.NamedTuple):
    """One file of a backup as verify saw it."""
    name: str
    size: int
    status: str                 # good, bad or unchecked

    def to_json(self):
        """Return {"name": ..., "size": ..., "status": ...}."""
        return self._asdict()


class CheckResult(typing.NamedTuple):
    """The verdict on one backup folder, pool database dump, host backup or loose file."""
    path: str
    display: str                # last two path components, as verify prints it
    vm: typing.Optional[str]
    name: str
    date: typing.Optional[str]  # ISO 8601, from the name
    kind: str                   # vm, pool-db, host or file
    mode: typing.Optional[str]
    legacy: bool
    complete: bool
    status: str                 # good, bad, incomplete or unchecked (final_status)
    problems: typing.Tuple[Problem, ...]
    unchecked: typing.Tuple[Problem, ...]
    notes: typing.Tuple[str, ...]
    files: typing.Tuple[FileCheck, ...]

    def to_json(self):
        """Return the result as verify --json writes it (the same keys, in this order)."""
        out = collections.OrderedDict((field, getattr(self, field)) for field in self._fields)
        for field in ("problems", "unchecked", "files"):
            out[field] = [item.to_json() for item in out[field]]
        out["notes"] = list(self.notes)
        return out


def final_status(problems, complete, unchecked):
    """Return a result's status: bad (any problem), incomplete, unchecked, or good."""
    if problems:
        return "bad"
    if not complete:
        return "incomplete"
    if unchecked:
        return "unchecked"
    return "good"


class Findings:
    """What checking one backup finds, gathered file by file; result() makes the CheckResult."""

    def __init__(self):
        self.problems, self.unchecked, self.notes, self.files = [], [], [], []

    def bad(self, rel, message):
        """Record a problem of the file `rel` ("" for the backup itself)."""
        self.problems.append(Problem(rel, message))

    def checked(self, rel, size, problems=(), unchecked=(), listed_as=None):
        """Record one file and what its check said (its problems filed under `rel`, the
        file listed as `listed_as` or `rel`); return its status."""
        for message in problems:
            self.bad(rel, message)
        self.unchecked += [Problem(rel, message) for message in unchecked]
        status = "bad" if problems else "unchecked" if unchecked else "good"
        self.files.append(FileCheck(rel if listed_as is None else listed_as, size, status))
        return status

    def result(self, path, vm, name, when, kind, mode=None, legacy=False, complete=True,
               display=None):
        """Return the CheckResult of what was found."""
        return CheckResult(path, display or display_path(path), vm, name,
                           when.isoformat() if when else None, kind, mode, legacy, complete,
                           final_status(self.problems, complete, self.unchecked),
                           tuple(self.problems), tuple(self.unchecked), tuple(self.notes),
                           tuple(self.files))


def display_path(path):
    """Return how verify names a backup folder or a file: its last two path components."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    return "/".join(p for p in parts[-2:] if p)


def unreadable_result(path, exc):
    """Return the (bad) result of a backup that could not be read at all."""
    found = Findings()
    found.bad("", "cannot read: %s" % (exc.strerror or exc))
    name = os.path.basename(path)
    return found.result(path, os.path.basename(os.path.dirname(path)), name,
                        parse_backup_name(name), "vm", complete=False)


# -- backup folders -------------------------------------------------------------------
def verify_backup(path, quick=False):
    """Return the CheckResult of the backup folder at `path` (see check_backup); raise OSError."""
    return check_backup(read_backup_folder(path), quick)


def check_backup(backup, quick=False):
    """Return the CheckResult of a BackupFolder (status good|bad|incomplete|unchecked).

    Checks the manifest, the success marker, every listed file's size and
    SHA-256 and its format. quick=True checks sizes only (no file is read).
    A legacy NAUbackup folder (no manifest) has its files checked by format.
    """
    found = Findings()
    if backup.manifest_error:
        found.bad(MANIFEST, backup.manifest_error)
    elif backup.manifest is not None:
        _check_manifest_files(found, backup, quick)
    elif not backup.legacy and backup.entries & set(LEGACY_SUCCESS_MARKERS):
        found.bad(MANIFEST, "manifest missing: a vmbackup folder (only NAUbackup's are named "
                            "backup-YYYY-MM-DD-(HH:MM:SS)) with a success marker and no %s" % MANIFEST)
    elif not backup.legacy:
        found.notes.append("no %s and no success marker: the backup did not finish" % MANIFEST)
    else:
        found.notes.append("legacy NAUbackup backup: no manifest")
        _check_legacy_files(found, backup, quick)
    return found.result(backup.path, backup.vm, backup.name, backup.when, "vm", backup.mode,
                        backup.legacy, backup.complete)


def _check_manifest_files(found, backup, quick):
    """Check every file the manifest lists, then that the mode's files are there."""
    manifest = backup.manifest
    sizes = {d.get("file"): _int(d.get("virtual_size"), None)
             for d in manifest.get("disks", ()) if d.get("file")}
    for entry in manifest["files"]:
        if not isinstance(entry, dict):
            found.bad(MANIFEST, "a files entry is not an object")
            continue
        _check_listed_file(found, backup.path, entry, sizes, quick)
    listed = [f.name for f in backup.files]
    if backup.mode == "vm-export" and not backup.names_of("xva"):
        found.bad(MANIFEST, "a vm-export backup without an .xva file")
    if backup.mode == DELTA_MODE:
        for rel, message in verify_chain(backup, quick):
            found.bad(rel, message)
    if backup.mode in ("vdi-export", DELTA_MODE):
        for disk in manifest.get("disks", ()):
            if disk.get("file") not in listed:
                found.bad(MANIFEST, "disk %s: its file %r is not in the backup"
                          % (disk.get("device"), disk.get("file")))
    if METADATA_FILE not in listed:
        found.bad(MANIFEST, "no %s in the backup" % METADATA_FILE)


def _check_listed_file(found, folder, entry, sizes, quick=False):
    """Check one manifest file entry: size, then (unless `quick`) SHA-256 and format."""
    rel = str(entry.get("name", ""))
    try:
        path = inside(folder, rel)
    except BackupDirError:
        return found.bad(rel, "file name leaves the backup folder: refused")
    if not os.path.isfile(path):
        return found.bad(rel, "missing (listed in %s)" % MANIFEST)
    size = os.path.getsize(path)
    if size != entry.get("size"):
        return found.checked(rel, size, ["size is %d bytes, the manifest says %s%s" % (
            size, entry.get("size"), " (truncated?)" if size < _int(entry.get("size"), size) else "")])
    if quick:
        return found.checked(rel, size)
    problems, unchecked, digest = check_file(path, file_kind(rel), sizes.get(rel), True)
    if digest != entry.get("sha256"):
        problems.insert(0, "sha256 mismatch: the file changed since the backup")
    return found.checked(rel, size, problems, unchecked)


def _check_legacy_files(found, backup, quick):
    """Check a NAUbackup folder's files by their format (no manifest: no sizes or SHA-256 to compare)."""
    for item in backup.files:
        path = os.path.join(backup.path, item.name)
        size = os.path.getsize(path)
        if item.kind is None or quick:
            found.checked(item.name, size)
            continue
        disk = backup.disk_files.get(item.name)   # each disk file against its own vdi.cfg
        problems, unchecked, _ = check_file(path, item.kind, disk.virtual_size if disk else None)
        found.checked(item.name, size, problems, unchecked)


# -- dated files and loose files --------------------------------------------------------
def verify_dated_file(path):
    """Return the CheckResult of a pool_db_*.dump or host_*.xbk file."""
    name = os.path.basename(path)
    kind = "pool-db" if name.startswith("pool_db_") else "host"
    found = Findings()
    problems = (check_pool_dump if kind == "pool-db" else check_host_backup)(path)
    found.checked("", os.path.getsize(path), problems, listed_as=name)
    return found.result(path, None, name, parse_dated_file(name), kind)


def verify_single_file(path):
    """Return the CheckResult of one loose .xva/.vhd/.raw file (format checks only)."""
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    found = Findings()
    problems, unchecked, _ = check_file(path, file_kind(name))
    found.checked("", os.path.getsize(path), problems, unchecked, listed_as=name)
    return found.result(path, os.path.basename(os.path.dirname(folder)), name,
                        parse_backup_name(os.path.basename(folder)), "file")


def verify_targets(path):
    """Return [(kind, path)] to verify for a backup, a VM folder, backup_dir or a file; raise UsageError."""
    if os.path.isfile(path):
        name = os.path.basename(path)
        if parse_dated_file(name):
            return [("dated", path)]
        if name in (MANIFEST,) + LEGACY_SUCCESS_MARKERS:
            return verify_targets(os.path.dirname(os.path.abspath(path)))
        if file_kind(name) in ("xva", "vhd", "raw"):
            return [("file", path)]
        raise UsageError("%s: not a backup file (.xva, .xva.gz, .xva.zst, .vhd, .raw, "
                         "pool_db_*.dump or host_*.xbk)" % path)
    if not os.path.isdir(path):
        raise UsageError("%s: no such file or folder" % path)
    if parse_backup_name(os.path.basename(os.path.normpath(path))):
        return [("backup", path)]
    own = backup_folders(path)
    if own:
        return [("backup", p) for p in own]
    targets = []
    for name in sorted(os.listdir(path)):
        sub = os.path.join(path, name)
        if not os.path.isdir(sub) or os.path.islink(sub):
            continue
        targets += [("backup", p) for p in backup_folders(sub)]
        targets += [("dated", p) for p in dated_files(sub)]
    if not targets:
        raise UsageError("%s: no backups found (expected a backup folder, a VM folder or "
                         "backup_dir)" % path)
    return targets


VERIFIERS = {"backup": verify_backup, "dated": verify_dated_file, "file": verify_single_file}


def verify_lines(result, verbosity=0):
    """Return the report lines of one CheckResult: one per bad file, then the verdict.

    verbosity < 0 gives only what is wrong (BAD, UNCHECKED, INCOMPLETE lines).
    """
    shown = result.display
    lines = ["BAD %s: %s" % (_where(shown, p), p.message) for p in result.problems]
    lines += ["UNCHECKED %s: %s" % (_where(shown, p), p.message) for p in result.unchecked]
    detail = "; ".join(result.notes)
    if result.status == "incomplete":
        lines.append("INCOMPLETE %s: %s" % (shown, detail or "no success marker: the backup "
                                            "did not finish"))
    elif verbosity >= 0 and result.status in ("good", "unchecked") or verbosity > 0:
        count = len(result.files)
        what = ", ".join(x for x in (result.mode, "%d file%s" % (count, "" if count == 1 else "s"),
                                     human_size(sum(f.size for f in result.files)), detail) if x)
        lines.append("%s %s: %s" % (result.status, shown, what))
    if verbosity > 0:
        lines += ["  %-9s %s (%s)" % (f.status, f.name, human_size(f.size)) for f in result.files]
    return lines


def _where(shown, problem):
    return shown + ("/" + problem.file if problem.file else "")


def verify_exit_code(results):
    """Return verify's exit code: 2 if any backup is bad or incomplete, 1 if any unchecked, else 0."""
    states = {r.status for r in results}
    if states & {"bad", "incomplete"}:
        return EXIT_ERROR
    return EXIT_WARNING if "unchecked" in states else EXIT_OK


# === vmbackup/delta.py ======================================================
# Incremental backups, the pool's side (delta-export): whether a disk's point is a full or a
# delta and why, finding and reading the changed blocks, and the reference snapshots kept
# on the pool between runs.
#
# A chain (formats.vhdfile, chain) is a dynamic VHD full plus one differencing VHD per later
# point. Between runs the pool keeps, per disk, the snapshot VDI of the last point: the
# *reference* the next run compares with. In order of preference:
#
# * CBT + NBD: VDI.list_changed_blocks(reference, new snapshot) names the changed 64 KiB
#   blocks, read over NBD (TLS, the certificate of get_nbd_info checked); the reference's
#   data is then destroyed (VDI.data_destroy): only a cbt_metadata VDI stays on the SR.
# * CBT without NBD, or no CBT: /export_raw_vdi?format=vhd&base=<reference> (whole 2 MiB
#   blocks), so the reference keeps its data.
#
# A reference is a snapshot VDI tagged like every snapshot the tool makes (TAG_KEY): once
# its run is over it is a leftover (leftovers.is_leftover) unless kept_reference says it
# stays: the newest complete point of its VM records it, or it belongs to a chain of another
# backup_dir (CHAIN_KEY, set once its point is committed). A killed run's references go,
# the current chain's stay.
#
# Owns: CHAIN_KEY, STORE_KEY, ChainReferences and kept_reference (pure), PreviousDisk, ReferenceState, DiskFacts, DiskPlan, plan_delta and changed_ranges (pure);
# previous_point, recorded_references, enable_cbt_once, read_ranges_nbd, delta_point (one VM's
# point), chain_entries (manifest disks), finish_point, drop_old_references, point_note.
# Imports: errors, util, store, metadata, chain, nbd, formats.vhdfile, transport.base.

#: NBD connections per disk: xapi-nbd accepts 16 per host and has a listen backlog of 5,
#: so a few, opened one after another (as Xen Orchestra's @vates/nbd-client does).
NBD_CONNECTIONS = 4


#: Attempts at one range over NBD (a new connection each time) before the point fails.
NBD_ATTEMPTS = 3

#: Seconds between looks at the run's stop request while NBD reads are awaited.
STOP_POLL = 0.2


#: Seconds VDI.data_destroy is retried while it answers VDI_IN_USE: XAPI unplugs the
#: snapshot's disks a few seconds after the snapshot is gone (Xen Orchestra #7826).
DATA_DESTROY_WAIT = 30.0


#: How the changed blocks of a delta point were found (the manifest's chain.method).
METHODS = ("full", "cbt-nbd", "cbt-export", "export")


class PreviousDisk(typing.NamedTuple):
    """A disk of the newest complete delta-export point: the parent of the next point."""
    backup: str                 # the point's folder name
    file: str                   # xvda.vhd
    sha256: str
    vdi_uuid: str               # the disk backed up then
    virtual_size: int
    chain_id: str
    position: int
    vhd_uuid: str
    reference_uuid: typing.Optional[str]
    reference_kind: typing.Optional[str]
    complete: bool = True       # the point is complete and its file is there


class ReferenceState(typing.NamedTuple):
    """The recorded reference VDI as the pool has it now."""
    uuid: str
    snapshot_of: str            # ref of the disk it is a snapshot of
    cbt_enabled: bool
    has_data: bool              # False once data_destroy made it cbt_metadata


class DiskFacts(typing.NamedTuple):
    """What plan_delta decides from, for one disk."""
    vdi_ref: str
    vdi_uuid: str
    virtual_size: int
    cbt: bool                                   # CBT is on for the disk now
    cbt_problem: typing.Optional[str]           # why not
    nbd: bool                                   # get_nbd_info offers a server
    previous: typing.Optional[PreviousDisk]
    reference: typing.Optional[ReferenceState]  # None: gone (or none recorded)


class DiskPlan(typing.NamedTuple):
    """What one disk's point will be."""
    method: str                 # full, cbt-nbd, cbt-export, export
    reason: typing.Optional[str]    # why a full (None for a delta)
    reference_kind: str         # what the new reference becomes: cbt_metadata or snapshot

    @property
    def full(self):
        return self.method == "full"


def plan_delta(facts, full_interval):
    """Return the DiskPlan of one disk (pure): a delta when the chain can go on, else a full
    with the reason. Never a delta whose reference is not provably this chain's.

    The new reference is data-destroyed (cbt_metadata) only where the next run can read
    over NBD; a reference with data is what a differencing export needs as its base.
    """
    kind = "cbt_metadata" if facts.cbt and facts.nbd else "snapshot"
    prev, ref = facts.previous, facts.reference

    def full(reason):
        return DiskPlan("full", reason, kind)
    if prev is None:
        return full("first run: no earlier point of this disk")
    if not prev.complete:
        return full("the previous point %s is incomplete" % prev.backup)
    if full_interval and prev.position + 1 >= full_interval:
        return full("full_interval reached (%d points since the full)" % (prev.position + 1))
    if not prev.reference_uuid:
        return full("the previous point kept no reference snapshot")
    if prev.vdi_uuid != facts.vdi_uuid:
        return full("the disk is another VDI than the chain's (%s, was %s): storage migration "
                    "or a replaced disk" % (facts.vdi_uuid, prev.vdi_uuid))
    if ref is None:
        return full("reference snapshot %s is gone" % prev.reference_uuid)
    if ref.uuid != prev.reference_uuid or ref.snapshot_of != facts.vdi_ref:
        return full("reference %s is not the chain's recorded snapshot of this disk" % ref.uuid)
    if prev.virtual_size != facts.virtual_size:
        return full("disk size changed from %d to %d bytes (resize)"
                    % (prev.virtual_size, facts.virtual_size))
    if facts.cbt and facts.nbd and ref.cbt_enabled:
        return DiskPlan("cbt-nbd", None, kind)
    if not ref.has_data:
        why = ("no network offers NBD" if facts.cbt
               else facts.cbt_problem or "CBT is off on the disk")
        return full("the reference holds only CBT metadata and %s" % why)
    return DiskPlan("cbt-export" if facts.cbt else "export", None, kind)


def changed_ranges(bitmap, size, block=CBT_BLOCK, limit=VHD_BLOCK):
    """Return [(offset, length)] of the changed blocks a CBT bitmap names (pure).

    Bit i (most significant first) is block i; adjacent blocks are merged up to `limit`
    bytes without crossing a multiple of `limit` (a VHD block); the last is cut at `size`.
    >>> changed_ranges(bytes([0b01100000]), 8 << 16)
    [(65536, 131072)]
    """
    found = []
    for index in range(min(len(bitmap) * 8, (size + block - 1) // block)):
        if not bitmap[index >> 3] & (0x80 >> (index & 7)):
            continue
        offset = index * block
        length = min(block, size - offset)
        if found:
            last_offset, last_length = found[-1]
            if last_offset + last_length == offset and last_length + length <= limit \
                    and last_offset // limit == offset // limit:
                found[-1] = (last_offset, last_length + length)
                continue
        found.append((offset, length))
    return found


def decode_bitmap(text):
    """Return the bytes of list_changed_blocks' base64 answer; raise ExportFailed if garbled."""
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (ValueError, TypeError) as exc:
        raise ExportFailed("list_changed_blocks answered no base64 bitmap: %s" % exc)


# -- the store's side: the previous point, the recorded references -------------------

def delta_points(store, vm_folder, vm_uuid=None):
    """Return the complete delta-export BackupFolders of a VM folder (of VM `vm_uuid`), oldest first."""
    return [b for b in store.backups(vm_folder)
            if b.complete and b.mode == "delta-export" and b.manifest is not None
            and (vm_uuid is None or (b.manifest.get("vm") or {}).get("uuid") in (None, vm_uuid))]


def previous_disks(backup):
    """Return {device: PreviousDisk} of a delta-export BackupFolder (chain.chain_links, plus
    the disk and its reference)."""
    links = chain_links(backup)
    found = {}
    for disk in backup.manifest.get("disks", ()):
        link = links.get(str(disk.get("device")))
        if link is None:
            continue
        reference = disk["chain"].get("reference") or {}
        found[link.device] = PreviousDisk(
            link.backup, link.file, link.sha256 or "", disk.get("vdi_uuid", ""),
            int(disk.get("virtual_size") or 0), link.chain_id, int(link.position or 0),
            link.vhd_uuid, reference.get("vdi_uuid"), reference.get("kind"),
            link.file in backup.entries and bool(link.sha256))
    return found


def previous_point(store, vm_folder, vm_uuid):
    """Return (BackupFolder or None, {device: PreviousDisk}) of the VM's newest complete point."""
    points = delta_points(store, vm_folder, vm_uuid)
    if not points:
        return None, {}
    return points[-1], previous_disks(points[-1])


#: other_config key a reference gets once its point is committed: the chain's id, so that
#: a run backing up into another backup_dir (which does not know that chain) leaves it be.
CHAIN_KEY = "vmbackup_chain"


#: other_config key a reference gets beside CHAIN_KEY: the backup_dir (real path) holding its
#: chain, so that once retention has deleted the chain's last point the reference is known
#: as this backup_dir's leftover, not another backup_dir's.
STORE_KEY = "vmbackup_backup_dir"


class ChainReferences(typing.NamedTuple):
    """What a store says about the reference VDIs on the pool."""
    recorded: typing.FrozenSet[str]     # the references the chains go on from
    chains: typing.FrozenSet[str]       # every chain id this store holds a point of
    backup_dir: typing.Optional[str] = None   # the store's real path (None: not all read)


def recorded_references(store):
    """Return the ChainReferences of `store`: the reference VDIs the newest complete
    delta-export point of every VM folder records, and the ids of its chains."""
    recorded, chains = set(), set()
    root = getattr(store, "root", None)
    backup_dir = os.path.realpath(root) if root else None
    for vm_folder in store.vm_folders():
        try:
            points = delta_points(store, vm_folder)
        except OSError as exc:
            log.debug("reading %s: %s", vm_folder, exc)
            backup_dir = None       # a chain not read is not known to be gone
            continue
        newest = {}       # per VM: two VMs whose names make one folder each have a chain
        for point in points:
            chains.update(link.chain_id for link in chain_links(point).values())
            newest[(point.manifest.get("vm") or {}).get("uuid")] = point
        for point in newest.values():
            recorded.update(p.reference_uuid for p in previous_disks(point).values()
                            if p.reference_uuid)
    return ChainReferences(frozenset(recorded), frozenset(chains), backup_dir)


def kept_reference(record, references):
    """Return True if the VDI `record`, a leftover by the tags, must stay (pure): a reference
    the store's chains go on from, or a committed reference (CHAIN_KEY) of a chain the store
    does not hold -- another backup_dir's. A reference of a point never committed (a killed
    run), one its chain has moved past, or one of a chain this backup_dir held (STORE_KEY)
    whose last point retention deleted is not kept."""
    if record.get("uuid") in references.recorded:
        return True
    other_config = record.get("other_config") or {}
    chain = other_config.get(CHAIN_KEY)
    if not chain or chain in references.chains:
        return False
    return not (references.backup_dir and other_config.get(STORE_KEY) == references.backup_dir)


# -- the pool's side -------------------------------------------------------------

def enable_cbt_once(transport, disk, vlog):
    """Return (True, None) if CBT is on for `disk` (turning it on the first time, logged
    once), else (False, why): unlicensed, an SR without CBT, a pool before XenServer 7.3."""
    if disk.vdi.get("cbt_enabled"):
        return True, None
    try:
        transport.enable_cbt(Obj(disk.vdi_ref, disk.vdi["uuid"]))
    except CallFailed as exc:
        why = "CBT unavailable (%s)" % (error_code(exc) or exc)
        vlog.info("disk %s: %s: its deltas come from differencing exports, against a reference "
                  "snapshot that keeps its data on the SR", disk.device, why)
        return False, why
    vlog.info("disk %s: Changed Block Tracking enabled (VDI %s): XAPI now records the blocks "
              "written to it", disk.device, disk.vdi["uuid"])
    return True, None


def reference_state(transport, uuid):
    """Return (Obj, ReferenceState) of the reference VDI `uuid`, or (None, None) if it is gone."""
    if not uuid:
        return None, None
    found = transport.vdi_by_uuid(uuid)
    if found is None:
        return None, None
    obj, rec = found
    return obj, ReferenceState(uuid, rec.get("snapshot_of", ""), bool(rec.get("cbt_enabled")),
                               rec.get("type") != "cbt_metadata")


def pick_nbd_infos(infos, purposes):
    """Return the get_nbd_info records to connect to, each with the certificate to check,
    or none ("cert": "") for plain NBD: only where the pool's networks offer only the
    purpose insecure_nbd (delta_point warns when it reads so). XAPI's answer carries a certificate either
    way, so the networks' purposes (read through XAPI, not from the NBD server, which an
    attacker could make refuse STARTTLS) decide."""
    if not infos or "nbd" in purposes:
        return list(infos)
    if "insecure_nbd" not in purposes:
        return []
    return [dict(info, cert="") for info in infos]


def open_nbd(infos, timeout):
    """Return an NbdClient on the first of `infos` that answers; raise NbdError if none does."""
    errors = []
    for info in infos:
        try:
            return connect_info(info, allow_insecure=True, timeout=timeout)
        except NbdError as exc:
            errors.append(str(exc))
    raise NbdError("no NBD server of the pool answered: %s" % "; ".join(errors or ["none offered"]))


class NbdStats:
    """What an NBD read moved (for the log and the tests' ratios)."""

    def __init__(self):
        self.bytes, self.ranges, self.connections, self.reconnects = 0, 0, 0, 0
        self.lock = threading.Lock()


def read_ranges_nbd(infos, ranges, timeout, connections=NBD_CONNECTIONS, stats=None):
    """Yield (offset, data) for every range, read over NBD with at most `connections`
    connections, opened one after another. A dropped connection is replaced and the range
    read again (NBD_ATTEMPTS); then NbdError."""
    if not ranges:
        return
    stats = stats or NbdStats()
    work = queue.Queue()
    for item in ranges:
        work.put(item)
    done = queue.Queue(maxsize=4 * connections)
    stop = threading.Event()
    clients = []
    try:
        for _ in range(min(connections, len(ranges))):
            clients.append(open_nbd(infos, timeout))
            stats.connections += 1
    except BaseException:
        for client in clients:
            client.close()
        raise

    live = set(clients)        # the open connections, shut down at once when the read stops

    def connect():
        client = open_nbd(infos, timeout)
        with stats.lock:
            stats.connections += 1
            stats.reconnects += 1
            live.add(client)
        if stop.is_set():
            drop(client)
            raise NbdError("stopped")
        return client

    def drop(client):
        with stats.lock:
            live.discard(client)
        client.close()

    def worker(client):
        try:
            while not stop.is_set():
                try:
                    offset, length = work.get_nowait()
                except queue.Empty:
                    return
                for attempt in range(1, NBD_ATTEMPTS + 1):
                    try:
                        if client is None:
                            client = connect()
                        data = client.read(offset, length)
                        break
                    except NbdError as exc:
                        if client is not None:
                            drop(client)
                            client = None
                        if attempt == NBD_ATTEMPTS:
                            raise NbdError("%s (range %d+%d, %d attempts)"
                                           % (exc, offset, length, attempt))
                        log.debug("NBD read of %d+%d failed (%s): reconnecting", offset, length, exc)
                put(("data", offset, data))
        except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
            put(("error", exc, None))
        finally:
            if client is not None:
                drop(client)

    def put(item):
        while not stop.is_set():
            try:
                done.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    threads = [threading.Thread(target=worker, args=(c,), name="nbd-%d" % i, daemon=True)
               for i, c in enumerate(clients)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(len(ranges)):
            kind, first, data = next_done(done)
            if kind == "error":
                raise first
            stats.bytes += len(data)
            stats.ranges += 1
            yield first, data
    finally:
        stop.set()
        with stats.lock:
            for client in live:     # wake the threads blocked in a read (error, signal)
                try:
                    client.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for thread in threads:
            thread.join()


def next_done(done):
    """Return the next item of `done`; raise Terminated as soon as the run is asked to stop
    (the reading thread is a job's worker: signals reach only the main thread)."""
    while True:
        check_stop()
        try:
            return done.get(timeout=STOP_POLL)
        except queue.Empty:
            continue


def destroy_data(transport, vdi, vlog):
    """data_destroy the new reference, retrying VDI_IN_USE for DATA_DESTROY_WAIT seconds;
    return True, or False (with a warning: the reference then keeps its data)."""
    delay, deadline = 0.5, time.monotonic() + DATA_DESTROY_WAIT
    while True:
        try:
            transport.data_destroy(vdi)
            return True
        except CallFailed as exc:
            if error_code(exc) in BUSY_CODES and time.monotonic() < deadline:
                log.debug("data_destroy of %s: %s, retrying in %.1fs", vdi.uuid, error_code(exc), delay)
                time.sleep(delay)
                delay = min(delay * 2, 4.0)
                continue
            vlog.warning("the reference snapshot %s keeps its data on the SR: data_destroy "
                         "failed (%s)", vdi.uuid, exc)
            return False


def destroy_reference(transport, vdi, vlog, why):
    """Destroy a reference VDI, best effort (a failure leaves a leftover the next run removes)."""
    try:
        transport.destroy_vdi(vdi)
        log.debug("reference %s destroyed (%s)", vdi.uuid, why)
    except VmBackupError as exc:
        if error_code(exc) not in GONE_CODES:
            vlog.warning("could not destroy the reference snapshot %s (%s): %s (the next run "
                         "retries)", vdi.uuid, why, exc)


class DiskPoint(typing.NamedTuple):
    """One disk's part of a point: its file entry and the manifest's chain record."""
    device: str
    entry: dict
    chain: dict


def export_then_convert(what, export, convert, dest):
    """`export(path)` into a hidden file beside `dest`, then `convert(src, out)` it into
    `dest` (written whole or not at all); return what convert returns. A damaged stream
    (BadFile) is an ExportFailed naming `what`; the hidden file goes either way."""
    tmp_in = os.path.join(os.path.dirname(dest), "." + os.path.basename(dest) + ".export.part")
    try:
        export(tmp_in)
        with partial_file(dest) as tmp, open(tmp_in, "rb") as src, open(tmp, "wb") as out:
            return convert(src, out)
    except BadFile as exc:
        raise ExportFailed("%s: %s" % (what, exc))
    finally:
        if os.path.lexists(tmp_in):
            os.unlink(tmp_in)


def write_full(ctx, new, size, dest):
    """Export the snapshot raw and write it as a dynamic VHD; return its VhdInfo."""
    def export(path):
        nbytes, _ = ctx.transport.export_vdi(new, path, "raw")
        if nbytes != size:
            raise ExportFailed("raw export of VDI %s is %d bytes, the disk is %d"
                               % (new.uuid, nbytes, size))
    return export_then_convert("raw export of VDI %s" % new.uuid, export,
                               lambda src, out: write_vhd_from_raw(src, out, size), dest)


def write_differencing_export(ctx, new, reference, parent, dest):
    """Export the snapshot's differencing VHD against `reference` and re-parent it onto the
    previous point's file; return its VhdInfo."""
    return export_then_convert(
        "differencing export of VDI %s" % new.uuid,
        lambda path: ctx.transport.export_vdi_delta(new, reference, path),
        lambda src, out: reparent_vhd(src, out, parent), dest)


def write_nbd_delta(ctx, infos, ranges, size, parent, dest, stats):
    """Read `ranges` of the snapshot over NBD into a differencing VHD; return its VhdInfo."""
    blocks = read_ranges_nbd(infos, ranges, ctx.config.stall_timeout, stats=stats)
    try:   # closed at once on error: its connections hold the snapshot's disk
        with partial_file(dest) as tmp, open(tmp, "wb") as out:
            writer = VhdWriter(out, size, parent=parent)
            for offset, data in blocks:
                writer.write(offset, data)
            return writer.close()
    finally:
        blocks.close()


def nbd_unreachable(facts, exc):
    """Return the DiskPlan that replaces cbt-nbd when no NBD connection opens (pure): the
    differencing export where the reference has data, else a full; either way the new
    reference keeps its data, so the next run has a base without NBD."""
    if facts.reference is not None and facts.reference.has_data:
        return DiskPlan("cbt-export", None, "snapshot")
    return DiskPlan("full", "NBD unreachable: %s" % exc, "snapshot")


def disk_point(ctx, disk, new, facts, plan, ref_obj, infos, folder, vlog):
    """Write one disk's file of the point; return (DiskPoint, DiskPlan actually followed)."""
    prev = facts.previous
    size = facts.virtual_size
    name = safe_dirname(disk.device) + ".vhd"
    dest = os.path.join(folder, name)
    began = time.monotonic()
    ranges = None
    if plan.method == "cbt-nbd":
        try:
            bitmap = decode_bitmap(ctx.transport.list_changed_blocks(ref_obj, new))
            ranges = changed_ranges(bitmap, size)
        except CallFailed as exc:
            plan = DiskPlan("full", "CBT cannot tell the blocks changed since the reference "
                            "(%s): its log was reset" % (error_code(exc) or exc),
                            plan.reference_kind)
    parent = None if plan.full else ParentRef(prev.vhd_uuid, "../%s/%s" % (prev.backup, prev.file))
    stats = NbdStats()
    if plan.full:
        vlog.info("disk %s: full (%s)", disk.device, plan.reason)
        info = write_full(ctx, new, size, dest)
    elif plan.method == "cbt-nbd":
        try:
            info = write_nbd_delta(ctx, infos, ranges, size, parent, dest, stats)
        except NbdError as exc:
            if stats.connections:    # it read, then failed even on new connections: fail
                raise
            plan = nbd_unreachable(facts, exc)
            vlog.warning("disk %s: NBD unreachable (%s): %s instead, and the new reference "
                         "keeps its data", disk.device, exc,
                         "a full" if plan.full else "a differencing export")
            info = (write_full(ctx, new, size, dest) if plan.full else
                    write_differencing_export(ctx, new, ref_obj, parent, dest))
    else:
        info = write_differencing_export(ctx, new, ref_obj, parent, dest)
    if plan.method == "cbt-nbd":
        vlog.info("disk %s: delta over NBD (%s): %d changed ranges, %s read on %d connection(s)"
                  "%s in %.1fs", disk.device, "TLS" if any(i.get("cert") for i in infos) else
                  "plain", stats.ranges, human_size(stats.bytes), stats.connections,
                  " (%d reconnects)" % stats.reconnects if stats.reconnects else "",
                  time.monotonic() - began)
    elif not plan.full:
        vlog.info("disk %s: delta from a differencing export (%s): %s in %.1fs", disk.device,
                  plan.method, human_size(info.data_bytes), time.monotonic() - began)
    chain = chain_entry(
        str(uuidlib.uuid4()) if plan.full else prev.chain_id,
        0 if plan.full else prev.position + 1, info.uuid,
        None if plan.full else chain_parent(prev.backup, prev.file, prev.vhd_uuid, prev.sha256),
        {"vdi_uuid": new.uuid, "kind": plan.reference_kind}, plan.method, plan.reason,
        stats.bytes if plan.method == "cbt-nbd" else info.data_bytes)
    return DiskPoint(disk.device, file_entry(folder, name), chain), plan


def delta_point(ctx, plan, folder, vlog, snapshot):
    """delta-export of one VM: `snapshot` (the VM's tool_snapshot) and, per disk, a full or
    a delta file; the disks' snapshot VDIs are kept as the next run's references. Return
    the file entries, each disk's carrying `device` and `chain` (see chain_entries).

    On any failure the references this attempt kept are destroyed again.
    """
    store = LocalStore(ctx.config.backup_dir)
    vm_folder = os.path.basename(os.path.dirname(folder))
    finish_merges(store, vm_folder, vlog)     # a merge a kill interrupted: the chain as it is meant
    _, previous = previous_point(store, vm_folder, plan.vm.uuid)
    cbt = {d.device: enable_cbt_once(ctx.transport, d, vlog) for d in plan.disks}
    purposes = ctx.transport.network_purposes() if any(on for on, _ in cbt.values()) else set()
    kept, points, plain = [], [], []
    try:
        with snapshot as snap:
            snap_disks = {userdevice: (vbd, vdi) for vbd, vdi, userdevice
                          in ctx.transport.snapshot_disks(snap)}
            for disk in plan.disks:
                if disk.userdevice not in snap_disks:
                    raise ExportFailed("the snapshot has no disk %s" % disk.device)
                vbd, new = snap_disks[disk.userdevice]
                record = ctx.transport.vdi_record(new) or {}
                on, problem = cbt[disk.device]
                infos = pick_nbd_infos(ctx.transport.nbd_info(new), purposes) if on else []
                prev = previous.get(disk.device)
                ref_obj, ref_state = reference_state(ctx.transport, prev and prev.reference_uuid)
                facts = DiskFacts(disk.vdi_ref, disk.vdi["uuid"],
                                  int(record.get("virtual_size") or disk.vdi.get("virtual_size", 0)),
                                  on, problem, bool(infos), prev, ref_state)
                disk_plan = plan_delta(facts, ctx.config.full_interval)
                if disk_plan.method == "cbt-nbd" and not infos[0].get("cert") and not plain:
                    plain.append(disk.device)
                    vlog.warning("the pool offers only insecure NBD (network purpose "
                                 "insecure_nbd): disk blocks travel unencrypted; give the "
                                 "network the purpose nbd for TLS")
                point, disk_plan = disk_point(ctx, disk, new, facts, disk_plan, ref_obj, infos,
                                              folder, vlog)
                points.append((point, vbd, new, disk_plan))
            for point, vbd, new, _ in points:
                ctx.transport.keep_disk(vbd)
                kept.append(new)
                ctx.transport.xapi.call("VDI.set_name_label", new.ref, "vmbackup reference: %s %s"
                                        % (printable(plan.vm.name), point.device))
        for point, _, new, disk_plan in points:
            if disk_plan.reference_kind == "cbt_metadata" \
                    and not destroy_data(ctx.transport, new, vlog):
                point.chain["reference"]["kind"] = "snapshot"
            elif disk_plan.reference_kind == "snapshot":
                vlog.info("disk %s: the reference snapshot %s keeps its data on the SR (no "
                          "CBT with NBD): it costs about the disk's used space", point.device,
                          new.uuid)
    except BaseException:
        for vdi in kept:
            destroy_reference(ctx.transport, vdi, vlog, "this attempt failed")
        raise
    if plan.skipped:
        vlog.info("left out ([NOBAK]): %s", ", ".join(d.device for d in plan.skipped))
    return [dict(point.entry, device=point.device, chain=point.chain) for point, _, _, _ in points]


def chain_entries(files, disks):
    """Return (files, disks) of a delta-export manifest: the `device`/`chain` that
    delta_point put on its file entries move to the disks (with their file name)."""
    chains = {}
    clean = []
    for entry in files:
        if "chain" in entry:
            entry = dict(entry)
            chains[entry.pop("device")] = (entry["name"], entry.pop("chain"))
        clean.append(entry)
    out = []
    for disk in disks:
        disk = dict(disk)
        if disk.get("device") in chains:
            disk["file"], disk["chain"] = chains[disk["device"]]
        out.append(disk)
    return clean, out


def finish_point(ctx, folder, manifest, vlog):
    """After the point at `folder` is committed: log what it holds, destroy the references
    it replaced; return its note for the run's summary (point_note)."""
    note = point_note(manifest)
    vlog.info("point %s: %s", os.path.basename(folder), note)
    try:       # the point is complete: what follows is housekeeping, its failure a warning
        for disk in manifest.get("disks", ()):
            chain = disk.get("chain") or {}
            found = ctx.transport.vdi_by_uuid((chain.get("reference") or {}).get("vdi_uuid"))
            if found is not None:
                ctx.transport.remove_key("VDI", found[0], STORE_KEY)
                ctx.transport.xapi.call("VDI.add_to_other_config", found[0].ref, STORE_KEY,
                                        os.path.realpath(ctx.config.backup_dir))
                ctx.transport.remove_key("VDI", found[0], CHAIN_KEY)
                ctx.transport.xapi.call("VDI.add_to_other_config", found[0].ref, CHAIN_KEY,
                                        chain.get("id", ""))
        drop_old_references(ctx, folder, vlog)
    except VmBackupError as exc:
        vlog.warning("point %s is complete, but its references could not be marked or the "
                     "old ones destroyed: %s (the next run retries)", os.path.basename(folder), exc)
    return note


def drop_old_references(ctx, folder, vlog):
    """Destroy the references the complete point before `folder` recorded and the point at
    `folder` does not (the chain moved on)."""
    store = LocalStore(ctx.config.backup_dir)
    vm_folder = os.path.basename(os.path.dirname(folder))
    points = delta_points(store, vm_folder)
    names = [p.name for p in points]
    if os.path.basename(folder) not in names:
        return
    owner = (points[names.index(os.path.basename(folder))].manifest.get("vm") or {}).get("uuid")
    points = delta_points(store, vm_folder, owner)     # not another VM's in the same folder
    names = [p.name for p in points]
    at = names.index(os.path.basename(folder))
    if at == 0:
        return
    now = {p.reference_uuid for p in previous_disks(points[at]).values()}
    for prev in previous_disks(points[at - 1]).values():
        if prev.reference_uuid and prev.reference_uuid not in now:
            found = ctx.transport.vdi_by_uuid(prev.reference_uuid)
            if found is not None:
                destroy_reference(ctx.transport, found[0], vlog, "replaced by the new point's")


def point_note(manifest):
    """Return the summary's word on a delta-export point: each disk's method, and why a full."""
    parts = []
    for disk in manifest.get("disks", ()):
        chain = disk.get("chain") or {}
        if chain.get("method") == "full":
            parts.append("%s full (%s)" % (disk.get("device"), chain.get("reason")))
        elif chain:
            parts.append("%s delta %s, %s" % (disk.get("device"), chain.get("method"),
                                              human_size(chain.get("changed_bytes") or 0)))
    return "; ".join(parts)


# === vmbackup/retention.py ==================================================
# Which old backups to delete, as a pure decision, and deleting them through the Store.
#
# Owns: Keep and keep_for (how many backups a VM keeps: max_backups, and the GFS rules
# keep_daily/weekly/monthly/yearly), gfs_kept and plan_retention (pure, table-tested),
# retention_group and in_retention (which folders one VM's retention may count and delete),
# plan_vm_retention (the one plan the run, pre_clean and --preview share), retention_steps
# (delta-export chains: merge, never delete what a kept point needs), prune_vm_backups,
# plan_dated_retention, prune_dated_files.
# Imports: errors, store, chain.

class Keep(typing.NamedTuple):
    """How many complete backups one VM keeps, as borg prune's rules: the `last` newest
    (max_backups), then the newest backup of each of `daily` more days, `weekly` more weeks,
    `monthly` more months and `yearly` more years (0: the rule is off; -1: no limit)."""
    last: int
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def __str__(self):
        """'4', or '4+7d+4w+12m+2y' as a selector's MAX field writes it."""
        gfs = "".join("+%d%s" % (n, unit) for n, unit in zip(self[1:], "dwmy") if n)
        return "%d%s" % (self.last, gfs)


#: The GFS rules in the order they apply, each with the period a backup's time falls in.
#: The times are the folder names' wall-clock local times (store.stamp), never converted:
#: a day is a calendar day of the host that made the backups, a DST change included;
#: weeks are ISO weeks, Monday to Sunday (31 Dec 2026 and 1 Jan 2027 share week 2026-W53).
GFS_PERIODS = (
    ("daily", lambda when: when.date()),
    ("weekly", lambda when: when.isocalendar()[:2]),
    ("monthly", lambda when: (when.year, when.month)),
    ("yearly", lambda when: when.year),
)


def keep_for(config, vm):
    """Return the Keep of a selected VM (selection.Selected): its max_backups, and the GFS
    rules its selector's MAX field gives ('web01:4+7d+4w'), else the keep_* settings."""
    gfs = vm.selector.gfs
    if gfs is None:
        gfs = (config.keep_daily, config.keep_weekly, config.keep_monthly, config.keep_yearly)
    return Keep(vm.max_backups, *gfs)


def gfs_kept(backups, keep):
    """Return {name: (rule, n)}: which of the complete `backups` [(name, datetime)] `keep`
    keeps, and the rule that keeps each (pure).

    borg prune's semantics: the rules apply in the order last, daily, weekly, monthly,
    yearly; each walks the backups newest first and, for each new period, keeps its newest
    backup unless an earlier rule already kept it, in which case the period is used up and
    does not count (keep_weekly=4 beside keep_daily=7 keeps 4 more weeks); a rule that runs
    out of backups before its count also keeps the oldest backup, so the first backup ages
    on until newer ones replace it. The newest backup is always kept.
    """
    newest_first = sorted(backups, key=lambda b: (b[1], b[0] is None, b[0] or ""), reverse=True)
    kept = {}
    rules = (("last", lambda when: object()),) + GFS_PERIODS
    for (rule, period_of), count in zip(rules, (max(1, keep.last),) + tuple(keep[1:])):
        if count == 0 or not newest_first:
            continue
        found, last_period = 0, None
        for name, when in newest_first:
            period = period_of(when)
            if period == last_period:
                continue
            last_period = period
            if name not in kept:
                found += 1
                kept[name] = (rule, found)
                if found == count:
                    break
        oldest = newest_first[-1][0]
        if 0 < count and found < count and oldest not in kept:
            kept[oldest] = (rule + " (oldest)", found + 1)
    return kept


def plan_retention(entries, keep, drop_incomplete=True):
    """Return the names to delete from `entries` [(name, datetime, complete)], newest kept.

    `keep` is a Keep, or a number (the newest backups kept: Keep(keep)). Complete
    backups that no rule keeps (gfs_kept) go; incomplete ones go when `drop_incomplete`.
    An entry named None stands for the backup a run is about to make (--preview,
    pre_clean): it is planned as complete, and never returned. Never returns the newest
    complete backup (with an entry named None, that is the run's own). Pure: works from
    names and markers (store.is_complete), never from mtimes.
    """
    keep = keep if isinstance(keep, Keep) else Keep(keep)
    kept = gfs_kept([(name, when) for name, when, done in entries if done], keep)
    doomed = [name for name, _, done in entries
              if name is not None and (not done and drop_incomplete or done and name not in kept)]
    return sorted(doomed)


def retention_group(mode):
    """Return which backups count together: "metadata" for meta-export, "data" for every mode
    with disk data (vm-export and vdi-export count together, as NAUbackup's did), None if unknown."""
    if mode is None:
        return None
    return "metadata" if mode == "meta-export" else "data"


def in_retention(folder, mode, uuid):
    """Return True if `folder` (a BackupFolder) is among the backups the retention of VM
    `uuid` in `mode` may count and delete (pure).

    Never a folder whose manifest names another VM (two VMs whose names map to one
    folder), nor one of the other group (metadata-only vs data); a legacy folder counts
    for its mode; an unfinished folder (no manifest, no success) may go; a vmbackup
    folder with `success` but no manifest (damaged) is never counted nor deleted.
    """
    same = mode is None or retention_group(folder.mode) == retention_group(mode)
    if folder.manifest is not None:
        owner = backup_vm_uuid(folder)
        return same and (uuid is None or owner in (None, uuid))
    if folder.legacy:
        return same
    return not folder.complete and SUCCESS_MARKER not in folder.entries and not folder.manifest_error


def plan_vm_retention(folders, keep, mode=None, uuid=None, drop_incomplete=True, incoming=None):
    """Return the names plan_retention deletes among the BackupFolders `folders` that the
    retention of VM `uuid` in `mode` may count (in_retention) (pure): what a run deletes
    after its backup, pre_clean before it, and --preview lists."""
    entries = [(f.name, f.when, f.complete) for f in folders if in_retention(f, mode, uuid)]
    if incoming is not None:     # the backup the run makes: planned as done at `incoming`
        entries.append((None, incoming, True))
    return plan_retention(entries, keep, drop_incomplete)


def retention_steps(folders, doomed, mode=None, uuid=None, incoming=None):
    """Return the chain.ChainAction steps that delete `doomed` among the BackupFolders
    `folders` of VM `uuid` in `mode` (in_retention): a delta-export point that a kept point's
    chain (or the `incoming` ChainPoint's, the run's own) runs through is merged into the next
    point of that chain instead of deleted (pure)."""
    points = [chain_point(f) for f in folders if in_retention(f, mode, uuid)]
    return plan_chain_retention(points + ([incoming] if incoming else []), doomed)


def prune_vm_backups(store, vm, keep, drop_incomplete=True, vlog=None, mode=None, uuid=None,
                     incoming=None):
    """Delete what plan_vm_retention says among the backups of VM `uuid` in `mode` filed
    under the folder `vm` of `store`; return the names deleted. `keep`: a Keep or a number.

    With `incoming` (pre_clean, before the export) it deletes what retention will delete
    once the backup of that time is made, except the newest complete backup: the export
    may yet fail, and the last good backup always stays.
    """
    vlog = vlog or log
    for name in store.finish_deletes(vm):
        vlog.info("retention: finished deleting %s (an earlier delete was interrupted)", name)
    finish_merges(store, vm, vlog)
    folders = {f.name: f for f in store.backups(vm)}
    doomed = plan_vm_retention(folders.values(), keep, mode, uuid, drop_incomplete, incoming)
    if incoming is not None:
        good = [f for f in folders.values() if f.complete and in_retention(f, mode, uuid)]
        last_good = max(good, key=lambda f: f.when).name if good else None
        doomed = [name for name in doomed if name != last_good]
    deleted = []
    for step in retention_steps(folders.values(), doomed, mode, uuid):
        name = step.name
        if step.kind == "merge":
            try:
                merge_points(store, vm, name, step.into, step.devices, vlog, step.then_delete)
            except ChainBroken as exc:
                vlog.warning("retention: %s is kept: %s", name, exc)
                continue
            except OSError as exc:      # a full disk, say: the journal lets the next run finish
                vlog.warning("retention: merging %s into %s stopped (%s); the next run "
                             "finishes it", name, step.into, exc)
                break
            if step.then_delete:
                deleted.append(name)
            continue
        deleted.append(name)
        if folders[name].complete:
            vlog.info("retention: deleting %s", name)
        else:
            # housekeeping: the run that left it already reported its failure
            vlog.info("deleting incomplete backup %s (no success marker)", name)
        store.delete(folders[name].path)
    return deleted


def plan_dated_retention(names, keep, incoming=None):
    """Return the pool_db_/host_ file names to delete among `names`, the `keep` newest kept
    (pure); with `incoming`, a datetime, as if the file a run is about to write stood beside
    them (--preview)."""
    entries = [(name, parse_dated_file(name), True) for name in names]
    if incoming is not None:
        entries.append((None, incoming, True))
    return plan_retention(entries, keep)


def prune_dated_files(store, folder, keep):
    """Delete the oldest pool_db_/host_ files in `store`'s `folder` beyond `keep`; return their names."""
    paths = {os.path.basename(p): p for p in store.dated_files(folder)}
    doomed = plan_dated_retention(paths, keep)
    for name in doomed:
        log.info("retention: deleting %s", os.path.join(folder, name))
        store.delete(paths[name])
    return doomed


# === vmbackup/report.py =====================================================
# The run's outcome and everything that prints it: results, tallies, exit code, summary, preview, JSON.
#
# Owns: RunProblem, VmResult, Outcome (the one record of a run: every warning and error once,
# attributed to its VM or to the run), UnitLog and RunRecord (what builds it), the pure
# readers of an Outcome (tally, exit_code_for, status_word, recap, run_summary,
# status_end_fields), StatusLog, settings_summary, preview_data/format_preview,
# write_json, setup_logging. Nothing here infers anything from which logger a line
# went through: the exit code, the tally, the status log and the JSON all read the
# Outcome.
# Imports: errors, util, config, retention.

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


# === vmbackup/backup.py =====================================================
# Backing up one VM: snapshot, export, metadata, manifest, success, retention; and the dated files.
#
# Owns: Context, VmLog (a VM's UnitLog), tool_snapshot (the snapshot's lifetime), export_vm_mode/
# export_vdi_mode, export_with_retries, build_manifest, backup_vm/backup_vm_safely (a failure
# becomes a VmResult), backup_pool_db/backup_hosts, run_note.
# Imports: everything below it (errors .. report).

class VmLog(UnitLog):
    """The log of one VM: lines prefixed `vm=<name>: `; its warnings and errors go in its VmResult;
    the uuids of the snapshots taken for it (`snapshots`)."""

    def __init__(self, name=""):
        UnitLog.__init__(self, name)
        self.snapshots = []


class Context(typing.NamedTuple):
    """What every step of a run needs."""
    config: Config
    transport: Transport
    view: PoolView
    run_note: str               # host pid time, recorded in snapshot tags
    record: typing.Optional[RunRecord] = None   # the run's outcome so far


def snapshot_label(vm_name, moment):
    """Return the name given to the tool's snapshots: vmbackup_<vm>_<stamp>."""
    return "vmbackup_%s_%s" % (printable(vm_name), stamp(moment))


@contextlib.contextmanager
def signals_deferred(signals=(signal.SIGTERM, signal.SIGHUP, signal.SIGINT)):
    """Hold `signals` during the block; they are delivered (and raise) when it ends."""
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    except (AttributeError, OSError, ValueError):  # pragma: no cover - not Linux / not main thread
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


class tool_snapshot:
    """`with tool_snapshot(ctx, "VM"|"VDI", source, take, vlog) as snap:` the snapshot of
    `source` that `take()` makes, tagged as this tool's, destroyed (and checked gone) on
    every way out: errors and signals; and, should the run be killed, recognisable by the
    next run (see is_leftover)."""

    def __init__(self, ctx, cls, source, take, vlog):
        self.ctx, self.cls, self.source, self.take, self.vlog = ctx, cls, source, take, vlog
        self.snap = None

    def __enter__(self):
        check_stop()    # a run asked to stop (jobs) takes no new snapshot
        began, t, note = time.monotonic(), self.ctx.transport, self.ctx.run_note
        try:
            # A signal between "snapshot made" and "snapshot tagged" would leave a snapshot
            # no run may recognise as its own: hold signals until it is tagged. (SIGKILL
            # cannot be held: the pending mark, copied into the snapshot, covers it.)
            with signals_deferred():
                t.mark_pending(self.cls, self.source, note)
                try:
                    self.snap = self.take()
                    t.tag(self.cls, self.snap, note)
                    if self.cls == "VM":   # so its disks are found even if only they remain
                        for _, vdi, _ in t.snapshot_disks(self.snap):
                            t.tag("VDI", vdi, note)
                    t.unmark_pending(self.cls, self.snap)
                    if isinstance(self.vlog, VmLog):
                        self.vlog.snapshots.append(self.snap.uuid)
                    if self.ctx.record is not None:
                        self.ctx.record.open_snapshots[self.snap.uuid] = self.vlog.unit
                finally:
                    t.unmark_pending(self.cls, self.source)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        self.vlog.info("%s snapshot %s taken in %.1fs", self.cls, self.snap.uuid,
                       time.monotonic() - began)
        return self.snap

    def __exit__(self, *exc):
        if self.snap is None:
            return False
        t = self.ctx.transport
        try:
            with signals_deferred():   # a destroy cut in half leaves orphan disks
                (t.destroy_snapshot if self.cls == "VM" else t.destroy_vdi)(self.snap)
                t.check_gone(self.cls, self.snap)
            if self.ctx.record is not None:
                self.ctx.record.open_snapshots.pop(self.snap.uuid, None)
            self.vlog.info("%s snapshot %s destroyed", self.cls, self.snap.uuid)
        except VmBackupError as err:
            self.vlog.error("could not destroy %s snapshot %s: %s (the next run retries)",
                            self.cls, self.snap.uuid, err)
            if exc[0] is None:
                raise
        return False


def vm_snapshot(ctx, vm, vlog, moment):
    """Return the context manager of a VM snapshot named vmbackup_<vm>_<stamp>."""
    quiesce = ctx.config.quiesce or wants_quiesce(ctx.view.vms[vm.ref])
    source = Obj(vm.ref, vm.uuid)
    return tool_snapshot(ctx, "VM", source, lambda: ctx.transport.snapshot_vm(
        source, snapshot_label(vm.name, moment), quiesce, vlog), vlog)


def vdi_snapshot(ctx, disk, label, vlog):
    """Return the context manager of a snapshot of one disk."""
    source = Obj(disk.vdi_ref, disk.vdi["uuid"])
    return tool_snapshot(ctx, "VDI", source, lambda: ctx.transport.snapshot_vdi(source, label), vlog)


def wants_quiesce(vm_record):
    """Return True if the VM asks for quiesced snapshots (other_config or tag vmbackup:quiesce)."""
    flag = (vm_record.get("other_config") or {}).get("vmbackup:quiesce", "")
    return flag.lower() in ("1", "true", "yes") or "vmbackup:quiesce" in (vm_record.get("tags") or ())


def export_vm_mode(ctx, plan, folder, moment, vlog):
    """vm-export: snapshot, leave out [NOBAK] disks, export the .xva; return file entries."""
    compress = ctx.config.compress
    dest = os.path.join(folder, safe_dirname(plan.vm.name) + XVA_SUFFIXES[compress])
    with vm_snapshot(ctx, plan.vm, vlog, moment) as snap:
        if plan.skipped:
            skip = {d.userdevice for d in plan.skipped}
            for vbd, vdi, userdevice in ctx.transport.snapshot_disks(snap):
                if userdevice in skip:
                    ctx.transport.drop_disk(vbd, vdi)
            vlog.info("left out of the export ([NOBAK]): %s",
                      ", ".join(d.device for d in plan.skipped))
        ctx.transport.prepare_snapshot(snap)
        began = time.monotonic()
        with partial_file(dest) as tmp, exporting(os.path.basename(dest), estimate_size(plan)):
            nbytes, digest = ctx.transport.export_vm(snap, tmp, compress)
            if nbytes <= 0 or (compress is None and not xva_is_complete(tmp)):
                raise ExportFailed("export of %s is incomplete (%d bytes)" % (snap.uuid, nbytes))
        vlog.info("exported %s (%s) in %.1fs", os.path.basename(dest), human_size(nbytes),
                  time.monotonic() - began)
    return [file_entry(folder, os.path.basename(dest), digest)]


def disk_file_name(vm_name, disk, fmt):
    """Return the file a vdi-export writes for `disk`: <vm>.raw for the root disk, else <vm>-<dev>.raw."""
    suffix = "" if disk.userdevice == "0" else "-" + safe_dirname(disk.device)
    return "%s%s.%s" % (safe_dirname(vm_name), suffix, fmt)


def export_vdi_mode(ctx, plan, folder, moment, vlog):
    """vdi-export: per selected disk, snapshot and export it raw or vhd; return file entries."""
    fmt = ctx.config.vdi_export_format
    entries = []
    for disk in plan.disks:
        dest = os.path.join(folder, disk_file_name(plan.vm.name, disk, fmt))
        label = "vmbackup_%s_%s_%s" % (printable(plan.vm.name), disk.device, stamp(moment))
        began = time.monotonic()
        with vdi_snapshot(ctx, disk, label, vlog) as snap:
            with partial_file(dest) as tmp, exporting(disk.device, disk_estimate(disk, fmt)):
                nbytes, digest = ctx.transport.export_vdi(snap, tmp, fmt)
                want = int(disk.vdi.get("virtual_size", 0))
                if fmt == "raw" and nbytes != want:
                    raise ExportFailed("export of disk %s is %d bytes, the disk is %d"
                                       % (disk.device, nbytes, want))
                if nbytes <= 0:
                    raise ExportFailed("export of disk %s is empty" % disk.device)
            vlog.info("exported disk %s to %s (%s) in %.1fs", disk.device, os.path.basename(dest),
                      human_size(nbytes), time.monotonic() - began)
        entries.append(file_entry(folder, os.path.basename(dest), digest))
    if plan.skipped:
        vlog.info("left out ([NOBAK]): %s", ", ".join(d.device for d in plan.skipped))
    return entries


def export_delta_mode(ctx, plan, folder, moment, vlog):
    """delta-export: one point of each disk's chain, from one VM snapshot (delta.delta_point)."""
    return delta_point(ctx, plan, folder, vlog, vm_snapshot(ctx, plan.vm, vlog, moment))


EXPORTERS = {"vm-export": export_vm_mode, "vdi-export": export_vdi_mode,
             "meta-export": lambda ctx, plan, folder, moment, vlog: [],
             "delta-export": export_delta_mode}


def export_with_retries(ctx, plan, folder, moment, vlog):
    """Save the VM's metadata and run its exporter; return the manifest's file entries.

    On failure, start again (metadata, then a new snapshot) up to `retries` times.
    """
    vm = plan.vm
    attempts = ctx.config.retries + 1
    for attempt in range(1, attempts + 1):
        try:
            files = [file_entry(folder, rel) for rel in
                     [save_vm_metadata(ctx.transport, Obj(vm.ref, vm.uuid), folder)]
                     + write_cfg_files(folder, ctx.view, vm.ref)]
            return files, EXPORTERS[vm.mode](ctx, plan, folder, moment, vlog)
        except (ExportFailed, CallFailed, XapiCallFailed) as exc:
            if attempt == attempts:
                raise
            vlog.warning("export attempt %d of %d failed (%s); retrying with a new snapshot",
                         attempt, attempts, exc)
            moment = datetime.datetime.now().replace(microsecond=0)
    raise AssertionError("unreachable")  # pragma: no cover


def disk_estimate(disk, fmt):
    """Return the bytes a vdi-export of `disk` writes: its size raw, its physical use in vhd."""
    key = "virtual_size" if fmt == "raw" else "physical_utilisation"
    return int(disk.vdi.get(key) or disk.vdi.get("virtual_size") or 0)


#: An XVA carries a disk in chunks of 1 MiB; a chunk of zeros is left out, except the first
#: and the last, and each chunk brings a tar header, a checksum member's header and body.
XVA_CHUNK, XVA_CHUNK_OVERHEAD = 1 << 20, 3 * 512


def estimate_size(plan, previous=0):
    """Return the bytes a VM's export may take (pure).

    Each exported disk's physical utilisation -- for an XVA in whole 1 MiB chunks, its
    first and last chunk included -- and never less than `previous`, what the VM's last
    complete backup in this mode took: data spread thinly over a disk makes an XVA of
    many chunks that XAPI's physical utilisation does not show.
    """
    total = 0
    for disk in plan.disks:
        size = int(disk.vdi.get("virtual_size") or 0)
        used = int(disk.vdi.get("physical_utilisation") or size)
        if plan.vm.mode == "vm-export":
            chunks = min(-(-size // XVA_CHUNK), -(-used // XVA_CHUNK) + 2)
            used = chunks * (XVA_CHUNK + XVA_CHUNK_OVERHEAD)
        total += used
    return max(total, previous)


def last_backup_bytes(store, vm_folder, mode):
    """Return the bytes of the files of a VM folder's newest complete backup in `mode`
    (0: none)."""
    for backup in reversed(store.backups(vm_folder)):
        if backup.complete and backup.mode == mode and backup.manifest is not None:
            return sum(int(f.get("size") or 0) for f in backup.manifest["files"]
                       if isinstance(f, dict))
    return 0


def build_manifest(ctx, plan, started, files):
    """Return the backup.json of one VM's backup: what was backed up, how, and every file."""
    config, vm = ctx.config, plan.vm
    record = ctx.view.vms[vm.ref]
    disks = [{"device": d.device, "userdevice": d.userdevice, "vdi_uuid": d.vdi["uuid"],
              "name_label": d.vdi.get("name_label", ""),
              "virtual_size": int(d.vdi.get("virtual_size", 0)),
              "file": (disk_file_name(vm.name, d, config.vdi_export_format)
                       if vm.mode == "vdi-export" else None)} for d in plan.disks]
    if vm.mode == "delta-export":
        files, disks = chain_entries(files, disks)
    return manifest_record(
        {"name": vm.name, "uuid": vm.uuid, "power_state": record.get("power_state")},
        vm.mode, ctx.transport.name, started.isoformat(), datetime.datetime.now().isoformat(),
        files, disks, [d.device for d in plan.skipped], config.compress,
        config.vdi_export_format, pool_info(ctx.view))


def backup_vm(ctx, plan, vlog):
    """Back up one VM into a new dated folder; return its VmResult; raise VmBackupError."""
    config, vm = ctx.config, plan.vm
    if plan.problems:
        raise ExportFailed("; ".join(plan.problems))
    began = time.monotonic()
    store, vm_folder = LocalStore(config.backup_dir), safe_dirname(vm.name)
    check_space(config, estimate_size(plan, last_backup_bytes(store, vm_folder, vm.mode)),
                "VM %s" % printable(vm.name))     # a VM refused leaves no folder behind
    os.makedirs(inside(config.backup_dir, vm_folder), exist_ok=True)
    if config.pre_clean and vm.mode != "meta-export":
        prune_vm_backups(store, vm_folder, keep_for(config, vm), drop_incomplete=False, vlog=vlog,
                         mode=vm.mode, uuid=vm.uuid, incoming=datetime.datetime.now())
    folder, moment = store.new_folder(vm_folder)
    vlog.info("%s to %s", vm.mode, folder)
    started = datetime.datetime.now()
    files, exported = export_with_retries(ctx, plan, folder, moment, vlog)
    manifest = build_manifest(ctx, plan, started, files + exported)
    store.commit(folder, manifest)
    note = finish_point(ctx, folder, manifest, vlog) if vm.mode == "delta-export" else ""
    prune_vm_backups(store, vm_folder, keep_for(config, vm), vlog=vlog, mode=vm.mode, uuid=vm.uuid)
    total = sum(f["size"] for f in exported)
    if vm.mode == "delta-export":     # a sparse VHD's apparent size is 2 MiB per changed block
        total = sum(int((f.get("chain") or {}).get("changed_bytes") or 0) for f in exported)
    if vlog.errors:
        return VmResult(vm.name, vm.uuid, vm.mode, "error", folder, total,
                        time.monotonic() - began, "; ".join(vlog.errors), tuple(vlog.warnings))
    return VmResult(vm.name, vm.uuid, vm.mode, "warning" if vlog.warnings else "success", folder,
                    total, time.monotonic() - began, "; ".join(vlog.warnings) or note,
                    tuple(vlog.warnings))


def backup_vm_safely(ctx, plan, status_log):
    """Run backup_vm, turning any failure into an error VmResult: one VM never stops the others."""
    vm = plan.vm
    vlog = VmLog(vm.name)
    status_log.line(vm.mode, "begin", printable(vm.name))
    began = time.monotonic()
    try:
        result = backup_vm(ctx, plan, vlog)
    except (VmBackupError, OSError) as exc:
        message = str(exc) if isinstance(exc, VmBackupError) else "%s: %s" % (
            getattr(exc, "filename", "") or "backup_dir", exc.strerror or exc)
        result = failed_result(vm, vlog, message, began)
    except Exception as exc:  # noqa: BLE001 - a bug met by one VM must not stop the others
        vlog.debug("traceback", exc_info=True)
        result = failed_result(vm, vlog, "internal error: %s: %s (run with -v for the traceback)"
                               % (type(exc).__name__, one_line(exc)), began)
    except Terminated as exc:   # the run is stopping: this VM is a failed unit of it
        result = failed_result(vm, vlog, cut_short(ctx, vlog, exc), began)
    if result.status == "error":
        status_log.line(vm.mode, "end", "%s-FAIL %s" % (vm.mode.upper(), printable(vm.name)))
    else:
        status_log.line(vm.mode, "end", "SUCCESS %s,elapse:%d size:%s" % (
            printable(vm.name), round(result.seconds / 60.0), status_size(result.bytes)))
    return result


def cut_short(ctx, vlog, exc):
    """Return what to say of a VM whose backup a signal stopped: the signal, and what
    became of its snapshots (only the truth: those still open are named)."""
    said = "terminated by %s before it finished" % (exc.args[0] if exc.args else "a signal")
    left = sorted(uuid for uuid, unit in (ctx.record.open_snapshots.items() if ctx.record
                                          else ()) if unit == vlog.unit)
    if left:
        return "%s; snapshot %s left (the next run destroys it)" % (said, ", ".join(left))
    if vlog.snapshots:
        return "%s; snapshot%s destroyed" % (said, "s" if len(vlog.snapshots) > 1 else "")
    return said


def failed_result(vm, vlog, message, began):
    """Return the error VmResult of a VM whose backup raised `message` (plus what it logged)."""
    vlog.failed(message)
    message = "; ".join([message] + vlog.errors)
    return VmResult(vm.name, vm.uuid, vm.mode, "error", None, 0, time.monotonic() - began,
                    message, tuple(vlog.warnings))


def backup_dated_file(ctx, folder_name, file_name, what, fetch):
    """Write one pool_db_/host_ backup file via `fetch(tmp)`, prune its folder; return VmResult."""
    began, ulog = time.monotonic(), UnitLog(what)
    try:
        folder = inside(ctx.config.backup_dir, safe_dirname(folder_name))
        os.makedirs(folder, exist_ok=True)
        dest = os.path.join(folder, file_name)
        with partial_file(dest) as tmp:
            nbytes, _ = fetch(tmp)
            if not nbytes:
                raise ExportFailed("%s is empty: XAPI sent nothing" % what)
        prune_dated_files(LocalStore(ctx.config.backup_dir), safe_dirname(folder_name),
                          ctx.config.max_backups)
        log.info("%s: %s (%s)", what, dest, human_size(nbytes))
        return VmResult(what, "", "pool", "success", dest, nbytes, time.monotonic() - began)
    except (VmBackupError, OSError) as exc:
        ulog.failed(str(exc))
        return VmResult(what, "", "pool", "error", None, 0, time.monotonic() - began, str(exc))


def pool_db_folder(view):
    """Return the folder name of the pool database dumps: METADATA_<master's hostname>."""
    return "METADATA_" + (view.master.get("hostname") or view.master.get("name_label", "master"))


def host_folder(ref, host):
    """Return (folder name, host name) of a host's dom0 backups: HOST_<hostname>."""
    name = host.get("hostname") or host.get("name_label", ref)
    return "HOST_" + name, name


def backup_pool_db(ctx, moment):
    """Dump the pool database to METADATA_<master>/pool_db_<stamp>.dump."""
    return backup_dated_file(ctx, pool_db_folder(ctx.view),
                             "pool_db_%s.dump" % moment.strftime("%Y%m%d-%H%M%S"),
                             "pool database", ctx.transport.dump_pool_db)


def backup_hosts(ctx, moment):
    """Back up every host's dom0 to HOST_<hostname>/host_<stamp>.xbk (one request per host)."""
    results = []
    for ref, host in sorted(ctx.view.hosts.items(), key=lambda item: item[1].get("name_label", "")):
        folder, name = host_folder(ref, host)
        results.append(backup_dated_file(
            ctx, folder, "host_%s.xbk" % moment.strftime("%Y%m%d-%H%M%S"),
            "host backup of %s" % name, lambda tmp, h=host: ctx.transport.backup_host(h, tmp)))
    return results


def run_note():
    """Return what the tool's tags record about this run: 'host pid UTC-time beat'
    (beat: the run keeps a heartbeat in the pool, see leftovers.PoolBeat)."""
    return "%s %d %s %s" % (socket.gethostname(), os.getpid(),
                            datetime.datetime.utcnow().replace(microsecond=0).isoformat(), BEAT_WORD)


# === vmbackup/commands/diff.py ==============================================
# `vmbackup.py diff`: configuration changes between backups of a VM.
#
# Imports: errors, util, selection, store, metadata, formats, report, check.

#: VM fields diff compares, in the order it reports them; memory fields print as sizes.
DIFF_FIELDS = ("name_label", "name_description", "power_state",
               "memory_static_min", "memory_static_max", "memory_dynamic_min", "memory_dynamic_max",
               "VCPUs_max", "VCPUs_at_startup", "domain_type", "HVM_boot_policy", "PV_bootloader",
               "is_a_template", "ha_restart_priority")


#: VM map fields diff compares key by key.
DIFF_MAPS = ("HVM_boot_params", "platform", "VCPUs_params", "other_config")


def pick_vm(tables, uuid=None):
    """Return the (id, record) of the backed-up VM in an ova.xml's tables; raise ValueError.

    The VM with `uuid` if given, else the one that is not a snapshot (metadata
    exports include the VM's snapshots too).
    """
    vms = list(tables.get("VM", {}).items())
    for ref, record in vms:
        if uuid and record.get("uuid") == uuid:
            return ref, record
    plain = [(ref, r) for ref, r in vms if not r.get("is_a_snapshot") and not r.get("is_control_domain")]
    if plain or vms:
        return (plain or vms)[0]
    raise ValueError("no VM in the metadata")


def vm_config(ova, uuid=None):
    """Return the comparable configuration of the VM in a parsed ova.xml (pure).

    {"name_label": ..., "memory_dynamic_max": 1073741824, ..., "platform": {...},
     "disks": {"xvda": {...}}, "VIFs": {"0": {"network": "eth0", "MAC": ..., "MTU": 1500}}}
    """
    tables = ova_objects(ova)
    ref, vm = pick_vm(tables, uuid)
    config = collections.OrderedDict((f, vm.get(f)) for f in DIFF_FIELDS if f in vm)
    for field in DIFF_FIELDS:
        if field.startswith(("memory_", "VCPUs_")) and field in config:
            config[field] = _int(config[field], config[field])
    for field in DIFF_MAPS:
        config[field] = dict(vm.get(field) or {})
    config["tags"] = sorted(vm.get("tags") or [])
    config["uuid"] = vm.get("uuid")
    disks = {}
    for vbd in tables.get("VBD", {}).values():
        if str(vbd.get("VM")) != ref:
            continue
        vdi = tables.get("VDI", {}).get(str(vbd.get("VDI")))
        sr = tables.get("SR", {}).get(str((vdi or {}).get("SR")), {})
        disks[device_name(vbd)] = collections.OrderedDict([
            ("type", vbd.get("type")), ("userdevice", vbd.get("userdevice")),
            ("virtual_size", _int(vdi.get("virtual_size"), None) if vdi else None),
            ("name_label", vdi.get("name_label") if vdi else None),
            ("SR", sr.get("name_label")), ("mode", vbd.get("mode")),
            ("bootable", vbd.get("bootable"))])
    config["disks"] = disks
    vifs = {}
    for vif in tables.get("VIF", {}).values():
        if str(vif.get("VM")) != ref:
            continue
        network = tables.get("network", {}).get(str(vif.get("network")), {})
        vifs[str(vif.get("device"))] = collections.OrderedDict([
            ("network", network.get("name_label")), ("MAC", vif.get("MAC")),
            ("MTU", _int(vif.get("MTU"), vif.get("MTU")))])
    config["VIFs"] = vifs
    return config


def _shown(field, value):
    """Return a value as diff prints it: memory as 1.0G, text quoted."""
    if value is None:
        return "(none)"
    if field.startswith("memory_") or field == "virtual_size":
        return human_size(value) if isinstance(value, int) else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _change(field, kind, old, new, text):
    return collections.OrderedDict([("field", field), ("change", kind), ("old", old),
                                    ("new", new), ("text", text)])


def _describe_disk(disk):
    parts = [human_size(disk["virtual_size"]) if disk["virtual_size"] is not None else "no VDI"]
    if disk.get("name_label"):
        parts.append(json.dumps(disk["name_label"], ensure_ascii=False))
    if disk.get("SR"):
        parts.append("SR " + json.dumps(disk["SR"], ensure_ascii=False))
    return ", ".join(parts)


def diff_vm_configs(old, new):
    """Return the changes from VM configuration `old` to `new` (vm_config dicts), in report order (pure).

    Each change: {"field", "change": changed|added|removed, "old", "new", "text"};
    e.g. text "memory_dynamic_max: 1.0G -> 2.0G", 'disk xvdb added (2.0G, "data")'.
    """
    changes = []
    for field in DIFF_FIELDS + ("uuid",):
        a, b = old.get(field), new.get(field)
        if a != b:
            changes.append(_change(field, "changed", a, b, "%s: %s -> %s"
                                   % (field, _shown(field, a), _shown(field, b))))
    for device in sorted(set(old["disks"]) | set(new["disks"])):
        a, b = old["disks"].get(device), new["disks"].get(device)
        what = "CD" if (a or b)["type"] == "CD" else "disk"
        if a is None:
            changes.append(_change("disks." + device, "added", None, b, "%s %s added (%s)"
                                   % (what, device, _describe_disk(b))))
        elif b is None:
            changes.append(_change("disks." + device, "removed", a, None, "%s %s removed (%s)"
                                   % (what, device, _describe_disk(a))))
        else:
            for key in a:
                if a[key] != b.get(key):
                    changes.append(_change("disks.%s.%s" % (device, key), "changed", a[key],
                                           b.get(key), "%s %s: %s %s -> %s" % (
                                               what, device, key, _shown(key, a[key]),
                                               _shown(key, b.get(key)))))
    for device in sorted(set(old["VIFs"]) | set(new["VIFs"]), key=lambda d: (_int(d, UNNUMBERED), d)):
        a, b = old["VIFs"].get(device), new["VIFs"].get(device)
        if a is None or b is None:
            kind, vif = ("added", b) if a is None else ("removed", a)
            changes.append(_change("VIFs." + device, kind, a, b, "VIF %s %s (network %s, MAC %s)"
                                   % (device, kind, _shown("network", vif["network"]), vif["MAC"])))
            continue
        for key in a:
            if a[key] != b.get(key):
                changes.append(_change("VIFs.%s.%s" % (device, key), "changed", a[key], b.get(key),
                                       "VIF %s: %s %s -> %s" % (device, key, _shown(key, a[key]),
                                                                _shown(key, b.get(key)))))
    for field in DIFF_MAPS:
        a, b = old.get(field) or {}, new.get(field) or {}
        for key in sorted(set(a) | set(b)):
            if key not in a:
                changes.append(_change("%s.%s" % (field, key), "added", None, b[key],
                                       "%s: %s added (%s)" % (field, key, _shown(key, b[key]))))
            elif key not in b:
                changes.append(_change("%s.%s" % (field, key), "removed", a[key], None,
                                       "%s: %s removed (was %s)" % (field, key, _shown(key, a[key]))))
            elif a[key] != b[key]:
                changes.append(_change("%s.%s" % (field, key), "changed", a[key], b[key],
                                       "%s[%s]: %s -> %s" % (field, key, _shown(key, a[key]),
                                                             _shown(key, b[key]))))
    if old.get("tags") != new.get("tags"):
        changes.append(_change("tags", "changed", old.get("tags"), new.get("tags"),
                               "tags: %s -> %s" % (", ".join(old.get("tags") or []) or "(none)",
                                                   ", ".join(new.get("tags") or []) or "(none)")))
    return changes


def read_backup_metadata(path):
    """Return (ova.xml struct, manifest or None, display name) of a backup, vm-metadata.xml or .xva[.gz].

    Raises BackupDirError if there is nothing readable to compare.
    """
    manifest, source = None, path
    try:
        if os.path.isdir(path):
            backup = read_backup_folder(path)
            manifest, source = backup.manifest, os.path.join(path, METADATA_FILE)
            if METADATA_FILE not in backup.entries:
                raise BackupDirError("%s has no %s to compare" % (path, METADATA_FILE))
        if file_kind(source) == "xva":
            data = read_ova_xml(source)
        else:
            with open(source, "rb") as handle:
                data = handle.read(MAX_OVA_XML)
        return parse_ova_xml(data), manifest, display_path(path)
    except (OSError, EOFError, zlib.error, BadFile, ValueError) as exc:
        raise BackupDirError("cannot read the VM metadata of %s: %s"
                             % (path, one_line(getattr(exc, "strerror", None) or exc)))


def diff_inputs(paths):
    """Return the two things `diff` compares; raise UsageError.

    The two paths given, or a VM folder's two newest backups that have vm-metadata.xml.
    """
    if len(paths) == 2:
        return paths
    if len(paths) != 1:
        raise UsageError("diff takes BACKUP_A BACKUP_B, or one VM folder")
    folder = paths[0]
    if not os.path.isdir(folder):
        raise UsageError("%s: no such folder" % folder)
    vm_dir = os.path.abspath(folder)
    store = LocalStore(os.path.dirname(vm_dir))
    backups = [b for b in store.backups(os.path.basename(vm_dir)) if METADATA_FILE in b.entries]
    # the newest backup's VM only: a folder may hold two VMs' backups (store.group_by_vm)
    found = [b.path for b in next((g for g in group_by_vm(backups) if g[-1] is backups[-1]), [])]
    if len(found) < 2:
        raise UsageError("%s: %d backup%s with %s; diff needs two"
                         % (folder, len(found), "" if len(found) == 1 else "s", METADATA_FILE))
    return found[-2:]


def cmd_diff(argv):
    """Run `vmbackup.py diff BACKUP_A BACKUP_B | VM_FOLDER [--json FILE|-]`; return the exit code."""
    parser = argparse.ArgumentParser(
        prog=PROG + " diff", description="Show what changed in a VM's configuration between two "
        "backups (from their vm-metadata.xml): memory, VCPUs, disks, VIFs, other_config, ...")
    opt = parser.add_argument
    opt("paths", nargs="+", metavar="BACKUP", help="two backup folders, or one VM folder")
    opt("--json", metavar="FILE", help="write the changes as JSON ('-': stdout)")
    args = parser.parse_args(argv)
    path_a, path_b = diff_inputs(args.paths)
    (ova_a, man_a, name_a), (ova_b, man_b, name_b) = (read_backup_metadata(path_a),
                                                      read_backup_metadata(path_b))
    try:
        old = vm_config(ova_a, ((man_a or {}).get("vm") or {}).get("uuid"))
        new = vm_config(ova_b, ((man_b or {}).get("vm") or {}).get("uuid"))
    except ValueError as exc:
        raise BackupDirError("cannot compare %s and %s: %s" % (path_a, path_b, exc))
    changes = diff_vm_configs(old, new)
    if args.json:
        write_json(args.json, collections.OrderedDict([
            ("a", {"path": path_a, "vm": old.get("name_label"), "uuid": old.get("uuid")}),
            ("b", {"path": path_b, "vm": new.get("name_label"), "uuid": new.get("uuid")}),
            ("changes", changes)]))
    if args.json != "-":
        lines = ["%s -> %s" % (name_a, name_b)]
        lines += ["  " + c["text"] for c in changes] or ["  no configuration changes"]
        sys.stdout.write("".join(printable(line) + "\n" for line in lines))
    return EXIT_OK


# === vmbackup/commands/list.py ==============================================
# `vmbackup.py list`: what backups exist, newest first, as typed results (Listing).
#
# Imports: errors, util, config, store, chain, report, check.

class BackupSummary(typing.NamedTuple):
    """What `list` shows of one backup folder."""
    name: str
    path: str
    date: typing.Optional[str]
    mode: typing.Optional[str]
    files: int
    size: int
    complete: bool
    legacy: bool
    check: str                  # sizes ok, BAD: ..., not verified (...)
    vm_name: typing.Optional[str]
    chain: typing.Tuple[dict, ...] = ()   # delta-export: one chain_point_summary per disk

    def to_json(self):
        """Return the summary as list --json writes it."""
        return self._asdict()


def chain_point_summary(link):
    """Return what `list` shows of one disk of a delta-export point (a chain.ChainLink)."""
    chain = {"device": link.device, "chain": link.chain_id, "position": link.position,
             "parent": (link.parent or {}).get("backup"), "base": link.parent is None,
             "vhd_uuid": link.vhd_uuid, "size": link.size}
    return chain


def chain_line(disk):
    """Return one line of `list` for one disk of a delta-export point."""
    what = "base of the chain (full)" if disk["base"] else "delta of %s" % disk["parent"]
    return "      %-6s chain %-8s point %-3s %s, %s" % (
        disk["device"], str(disk["chain"])[:8], disk["position"], what,
        human_size(disk["size"] or 0))


class VmListing(typing.NamedTuple):
    """One VM's backups in its folder, newest first (a folder may hold two VMs': store.group_by_vm)."""
    name: str
    folder: str
    backups: typing.Tuple[BackupSummary, ...]
    uuid: typing.Optional[str] = None       # the VM's, from the manifests; None: not recorded

    def counts(self):
        """Return (complete, incomplete): the backups that can be restored, and the others."""
        complete = sum(1 for b in self.backups if b.complete)
        return complete, len(self.backups) - complete

    def to_json(self):
        """Return {"name", "folder", "uuid", "complete", "incomplete", "backups": [...]}."""
        complete, incomplete = self.counts()
        return collections.OrderedDict([("name", self.name), ("folder", self.folder),
                                        ("uuid", self.uuid),
                                        ("complete", complete), ("incomplete", incomplete),
                                        ("backups", [b.to_json() for b in self.backups])])


class DatedListing(typing.NamedTuple):
    """One pool database dump or host backup file."""
    folder: str
    file: str
    date: str
    size: int

    def to_json(self):
        """Return {"folder", "file", "date", "size"}."""
        return self._asdict()


class Listing(typing.NamedTuple):
    """What backup_dir holds, as `list` reports it."""
    backup_dir: str
    vms: typing.Tuple[VmListing, ...]
    pool_db: typing.Tuple[DatedListing, ...]
    hosts: typing.Tuple[DatedListing, ...]

    def to_json(self):
        """Return {"backup_dir", "vms", "pool_db", "hosts"} as list --json writes it."""
        return collections.OrderedDict(
            [("backup_dir", self.backup_dir)]
            + [(key, [item.to_json() for item in getattr(self, key)])
               for key in ("vms", "pool_db", "hosts")])


def backup_summary(store, backup):
    """Return the BackupSummary of a BackupFolder: date, mode, files, size, complete, check.

    Files and size are the manifest's files; without a manifest, everything in the folder.
    """
    result = check_backup(backup, quick=True)
    if result.mode and not result.legacy:
        count, total = len(result.files), sum(f.size for f in result.files)
    else:
        count, total = store.usage(backup.path)
    if result.legacy:
        check = "not verified (legacy NAUbackup)"
    elif result.problems:
        check = "BAD: " + "; ".join("%s: %s" % (p.file, p.message) for p in result.problems[:3])
    elif result.mode is None:
        check = "not verified"
    else:
        check = "sizes ok"
    return BackupSummary(result.name, backup.path, result.date, result.mode, count, total,
                         result.complete, result.legacy, check,
                         result.vm if result.mode and not result.legacy else None,
                         tuple(chain_point_summary(link) for _, link in
                               sorted(chain_links(backup).items())))


def scan_backup_dir(root, pattern=None):
    """Return the Listing of backup_dir: per VM, pool database and host backups, newest first.

    `pattern` selects VMs like a vm-export selector (a plain name exactly, else a
    regex matched at the start), against the VM's name or its folder's name.
    """
    selector = Selector("vm-export", pattern) if pattern else None
    store = LocalStore(root)
    vms, dated = [], {"pool_db": [], "hosts": []}
    for name in store.vm_folders():
        folders = list(reversed(store.backups(name)))
        for group in group_by_vm(folders):   # one listing per VM, whatever folder they share
            backups = tuple(backup_summary(store, b) for b in group)
            vm_name = next((b.vm_name for b in backups if b.vm_name), name)
            if not selector or selector.matches(vm_name) or selector.matches(name):
                uuid = next((backup_vm_uuid(b) for b in group if backup_vm_uuid(b)), None)
                vms.append(VmListing(vm_name, name, backups, uuid))
        if folders:
            continue
        for path in reversed(store.dated_files(name)):
            file = os.path.basename(path)
            dated["pool_db" if file.startswith("pool_db_") else "hosts"].append(DatedListing(
                name, file, parse_dated_file(file).isoformat(), os.path.getsize(path)))
    if selector:
        dated = {"pool_db": [], "hosts": []}
    return Listing(root, tuple(vms), tuple(dated["pool_db"]), tuple(dated["hosts"]))


def format_list(data):
    """Return the human table of a Listing."""
    out = ["backup_dir %s" % data.backup_dir]
    row = "  %-19s  %-12s %5s  %8s  %-10s  %s"
    shared = collections.Counter(vm.folder for vm in data.vms)
    for vm in data.vms:
        shown = printable(vm.name)
        if shared[vm.folder] > 1:
            shown += "  (folder %s, shared with another VM; uuid %s)" % (printable(vm.folder),
                                                                       vm.uuid or "not recorded")
        elif vm.folder != vm.name:
            shown += "  (folder %s)" % printable(vm.folder)
        complete, incomplete = vm.counts()
        out += ["", "%s: %d complete backup%s%s" % (shown, complete, "" if complete == 1 else "s",
                                                    ", %d incomplete" % incomplete if incomplete
                                                    else ""),
                row % ("DATE", "MODE", "FILES", "SIZE", "STATE", "CHECK")]
        for b in vm.backups:
            out.append(row % ((b.date or "?").replace("T", " "), b.mode or "?", b.files,
                              human_size(b.size),
                              "complete" if b.complete else "INCOMPLETE", b.check))
            out += [chain_line(disk) for disk in b.chain]
    for key, title in (("pool_db", "pool database"), ("hosts", "host backup")):
        folders = collections.OrderedDict()
        for entry in getattr(data, key):
            folders.setdefault(entry.folder, []).append(entry)
        for folder, entries in folders.items():
            out += ["", "%s: %s (%d file%s)" % (title, printable(folder), len(entries),
                                               "" if len(entries) == 1 else "s")]
            out += ["  %-19s  %-30s %8s" % (e.date.replace("T", " "), e.file,
                                            human_size(e.size)) for e in entries]
    if not (data.vms or data.pool_db or data.hosts):
        out.append("no backups")
    return "\n".join(out) + "\n"


def list_backup_dir(args):
    """Return the backup_dir `list` reads: -d, -c's backup_dir, $VMBACKUP_BACKUP_DIR, or the default."""
    if args.backup_dir:
        return args.backup_dir
    if args.config:
        parsed = read_config_file(args.config, ignore_extra_keys=True)
        if parsed.values.get("backup_dir"):
            return parsed.values["backup_dir"]
    return os.environ.get("VMBACKUP_BACKUP_DIR") or DEFAULT_BACKUP_DIR


def cmd_list(argv):
    """Run `vmbackup.py list [VM-REGEX] [-d BACKUP_DIR] [-c CONFIG] [--json FILE|-]`; return the exit code."""
    parser = argparse.ArgumentParser(
        prog=PROG + " list", description="Show the backups in backup_dir: per VM, newest first "
        "(date, mode, files, size, complete or not, sizes checked against the manifest); "
        "pool database and host backups too.")
    opt = parser.add_argument
    opt("pattern", nargs="?", metavar="VM-REGEX", help="only VMs this name or regex selects")
    opt("-d", "--backup-dir", metavar="DIR")
    opt("-c", "--config", metavar="FILE", help="take backup_dir from this config file")
    opt("--json", metavar="FILE", help="write the listing as JSON ('-': stdout)")
    args = parser.parse_args(argv)
    if args.pattern and not PLAIN_NAME_RE.match(args.pattern):
        try:
            re.compile(args.pattern)
        except re.error as exc:
            raise UsageError("invalid regex %r: %s" % (args.pattern, exc))
    root = list_backup_dir(args)
    if not os.path.isdir(root):
        raise BackupDirError("backup_dir %s does not exist" % root)
    data = scan_backup_dir(root, args.pattern)
    if args.json:
        write_json(args.json, data.to_json())
    if args.json != "-":
        sys.stdout.write(format_list(data))
    return EXIT_OK


# === vmbackup/commands/restore.py ===========================================
# `vmbackup.py restore`: import a backup as a new VM (or in place with --preserve).
#
# Imports: everything below commands, and commands.options.

def newest_complete(vm_dir):
    """Return the newest complete BackupFolder of a VM folder that has disks to restore,
    passing over newer metadata-only backups (an hourly -m beside a weekly export), else the
    newest complete one; raise RestoreError if none, or if the folder holds more than one
    VM's backups (their names made one folder): then the message names the newest backup of
    each, to restore by its path."""
    store = LocalStore(os.path.dirname(vm_dir))
    complete = [b for b in reversed(store.backups(os.path.basename(vm_dir))) if b.complete]
    if not complete:
        raise RestoreError(nothing_to_restore(vm_dir))
    groups = group_by_vm(complete)
    if len(groups) > 1:
        raise RestoreError("%s holds the backups of %d VMs (their names make one folder); "
                           "restore one by its backup folder: %s" % (
                               vm_dir, len(groups), "; ".join(
                                   "%s [%s]: %s" % (printable(g[0].vm), backup_vm_uuid(g[0]) or
                                                    "uuid not recorded", g[0].path) for g in groups)))
    return next((b for b in complete if b.mode != "meta-export"), complete[0])


def how_chosen(path, backup):
    """Return why `backup` is the one restored from `path`, for the log line."""
    if path == backup.path:
        return "as named"
    store = LocalStore(os.path.dirname(path))
    newest = [b for b in store.backups(os.path.basename(path)) if b.complete][-1]
    if newest.path == backup.path:
        return "the newest complete backup in %s" % path
    return "the newest complete backup with disks in %s: newer ones are metadata-only" % path


#: How many VM folders a message names before "...".
NAMED_FOLDERS = 5


def nothing_to_restore(vm_dir):
    """Return why a folder with no complete backup gives nothing to restore: a backup_dir
    (its subfolders hold backup folders) is said to be one, naming its first VM folders."""
    top = LocalStore(vm_dir)
    if backup_folders(vm_dir):
        return "%s holds no complete backup" % vm_dir
    vms = [name for name in top.vm_folders() if backup_folders(os.path.join(vm_dir, name))]
    if not vms:
        return "%s holds no complete backup" % vm_dir
    more = ", ..." if len(vms) > NAMED_FOLDERS else ""
    return "%s is a backup_dir, not a VM folder: give one of its VM folders (or a backup " \
        "folder in one): %s%s (%d VM folders)" % (
            vm_dir, ", ".join(printable(n) for n in vms[:NAMED_FOLDERS]), more, len(vms))


def resolve_backup(path):
    """Return the BackupFolder `path` names: a backup folder, or a VM folder (its newest)."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise RestoreError("%s is not a backup folder" % path)
    if parse_backup_name(os.path.basename(path)) is not None:
        return read_backup_folder(path)
    return newest_complete(path)


class RestoreItem(typing.NamedTuple):
    """One thing a restore creates: a VM from an .xva, or a disk from a .raw/.vhd."""
    kind: str                   # vm or disk
    file: str                   # path in the backup
    name: str                   # name_label to give it
    fmt: str                    # xva, raw, vhd, or chain (a delta-export point's VHD chain)
    virtual_size: int = 0
    userdevice: str = ""
    device: str = ""


def plan_restore(folder, manifest, new_name=None, preserve=False, today=None):
    """Return the [RestoreItem] that restoring `folder` creates (pure; raises RestoreError)."""
    if manifest is None:
        manifest = legacy_manifest(read_backup_folder(folder))
    vm_name = (manifest.get("vm") or {}).get("name") or os.path.basename(os.path.dirname(folder))
    day = (today or datetime.date.today()).isoformat()
    name = new_name or (vm_name if preserve else "%s (restored %s)" % (vm_name, day))
    mode = manifest.get("mode")
    if mode == "vm-export":
        xvas = [f["name"] for f in manifest["files"] if file_kind(f["name"]) == "xva"]
        if len(xvas) != 1:
            raise RestoreError("%s: expected one .xva file, found %d" % (folder, len(xvas)))
        return [RestoreItem("vm", os.path.join(folder, xvas[0]), name, "xva")]
    if mode == "vdi-export":
        items = []
        for disk in manifest.get("disks", ()):
            fmt = file_kind(disk["file"])
            if fmt not in ("raw", "vhd"):
                raise RestoreError("%s: disk %s: %s is not a .raw or .vhd file"
                                   % (folder, disk.get("device", ""), disk["file"]))
            items.append(RestoreItem("disk", os.path.join(folder, disk["file"]),
                                     "%s %s" % (name, disk.get("device", "")),
                                     fmt, int(disk["virtual_size"]), str(disk.get("userdevice", "")),
                                     disk.get("device", "")))
        if not items:
            raise RestoreError("%s: the manifest lists no disks" % folder)
        return items
    if mode == "delta-export":
        items = [RestoreItem("disk", os.path.join(folder, disk["file"]),
                             "%s %s" % (name, disk.get("device", "")), "chain",
                             int(disk["virtual_size"]), str(disk.get("userdevice", "")),
                             disk.get("device", ""))
                 for disk in manifest.get("disks", ()) if disk.get("file")]
        if not items:
            raise RestoreError("%s: the manifest lists no disks" % folder)
        return items
    if mode == "meta-export":
        raise RestoreError("%s is a metadata-only backup: there is no disk to restore "
                           "(compare it with `vmbackup.py diff`)" % folder)
    raise RestoreError("%s: unknown backup mode %r" % (folder, mode))


def legacy_manifest(backup):
    """Return a manifest-like dict for a NAUbackup BackupFolder: its .xva, or its .raw/.vhd
    files and the disk each holds (store.legacy_disk_files)."""
    xvas = backup.names_of("xva")
    if xvas:
        return {"mode": "vm-export", "files": [{"name": n} for n in xvas], "vm": {}}
    files = backup.names_of("raw") + backup.names_of("vhd")
    if files and all(backup.disk_files.get(f) is not None for f in files):
        disks, files = [], sorted(files, key=lambda f: backup.disk_files[f].device)
        for name in files:
            disk = backup.disk_files[name]
            if disk.virtual_size is None:
                raise RestoreError("%s: DISK-%s/vdi.cfg records no virtual_size for %s"
                                   % (backup.path, disk.device, name))
            disks.append({"file": name, "device": disk.device, "userdevice": disk.userdevice,
                          "virtual_size": disk.virtual_size})
        return {"mode": "vdi-export", "vm": {}, "disks": disks,
                "files": [{"name": n} for n in files]}
    raise RestoreError("%s: legacy NAUbackup folder with nothing this tool can restore"
                       % backup.path)


class BackupIdentity(typing.NamedTuple):
    """Who the backed-up VM was: what a --preserve restore would bring back into the pool."""
    name: str
    uuid: str
    macs: typing.Tuple[str, ...]


def backup_identity(backup, manifest):
    """Return the BackupIdentity of a BackupFolder: the manifest's (or vm.cfg's) name and
    uuid, and the MAC of every VIF its VIFs/*.cfg files record."""
    vm = (manifest or {}).get("vm") or {}
    cfg = read_cfg(os.path.join(backup.path, "vm.cfg"))
    macs = []
    for path in sorted(glob.glob(os.path.join(glob.escape(backup.path), "VIFs", "*.cfg"))):
        mac = read_cfg(path).get("MAC", "").strip().lower()
        if mac and mac not in macs:
            macs.append(mac)
    return BackupIdentity(vm.get("name") or cfg.get("name_label") or backup.vm,
                          vm.get("uuid") or cfg.get("orig_uuid", ""), tuple(macs))


def preserve_conflicts(identity, vms, vifs):
    """Return one line per real VM of the pool a --preserve restore of `identity` would
    clash with: the same uuid, the same name, or one of its MACs (pure).

    `vms` and `vifs` are {ref: record} as VM.get_all_records and VIF.get_all_records give.
    """
    lines = []
    for rec in sorted((r for r in vms.values() if is_candidate(r)),
                      key=lambda r: (r.get("name_label", ""), r.get("uuid", ""))):
        why = []
        if identity.uuid and rec.get("uuid") == identity.uuid:
            why.append("it is the backed-up VM itself")
        if rec.get("name_label") == identity.name:
            why.append("it has the same name")
        macs = {vifs[v].get("MAC", "").lower() for v in rec.get("VIFs", ()) if v in vifs}
        shared = [m for m in identity.macs if m in macs]
        if shared:
            why.append("it uses MAC %s" % ", ".join(shared))
        if why:
            lines.append("VM %s (%s, %s): %s" % (printable(repr(rec.get("name_label", ""))),
                                                 rec.get("uuid", ""),
                                                 str(rec.get("power_state", "")).lower(),
                                                 "; ".join(why)))
    return lines


def free_name(wanted, taken):
    """Return `wanted`, or `wanted 2`, `wanted 3`... : the first not in `taken` (pure)."""
    name, n = wanted, 1
    while name in taken:
        n += 1
        name = "%s %d" % (wanted, n)
    return name


def attach_conflicts(items, target_name, vbds):
    """Return one line per disk of `items` whose userdevice the VM `target_name` already
    uses (`vbds`: the target's VBD records) (pure)."""
    used = {str(v.get("userdevice")): v for v in vbds}
    lines = []
    for item in items:
        vbd = used.get(item.userdevice) if item.userdevice else None
        if vbd is not None:
            what = "empty CD drive" if vbd.get("empty") else str(vbd.get("type", "disk")).lower()
            lines.append("--attach-to %s: userdevice %s (for %s) is taken by its %s %s"
                         % (printable(target_name), item.userdevice, item.device or item.name,
                            what, vbd.get("device") or "(no device name)"))
    return lines


def older_good_backup(backup):
    """Return the newest complete backup with disks (not metadata-only) older than `backup`
    in its VM folder that verifies (good or unchecked), or None."""
    vm_dir = os.path.dirname(os.path.abspath(backup.path))
    store = LocalStore(os.path.dirname(vm_dir))
    for older in reversed(store.backups(os.path.basename(vm_dir))):
        if older.complete and older.mode != "meta-export" and older.when and backup.when \
                and older.when < backup.when and check_backup(older).status in ("good", "unchecked"):
            return older
    return None


def refuse_bad_backup(backup, check):
    """Log what is wrong with `backup` and raise RestoreError naming the newest good one."""
    for line in verify_lines(check, verbosity=-1):
        log.error("%s", printable(line))
    good = older_good_backup(backup)
    hint = ("; the newest good backup is %s: restore it with `%s restore %s`"
            % (good.path, PROG, good.path) if good else "; no older backup of this VM verifies")
    raise RestoreError("%s is %s: refusing to restore it (see `vmbackup.py verify`)%s"
                       % (backup.path, check.status, hint))


def check_pool_for(xapi, items, identity, args):
    """Refuse (RestoreError) what would clash in the pool, unless --force; return the items
    with a VM's default name made free. Runs in the preview as in the restore."""
    problems = []
    vm_items = [i for i in items if i.kind == "vm"]
    if vm_items:
        vms = xapi.call("VM.get_all_records")
        taken = {r.get("name_label") for r in vms.values() if is_candidate(r)}
        if args.preserve:
            problems += ["--preserve: %s" % line for line in
                         preserve_conflicts(identity, vms, xapi.call("VIF.get_all_records"))]
        elif args.name and args.name in taken:
            problems.append("--name %s: a VM of that name is in the pool" % printable(args.name))
        elif not args.name:
            items = [i._replace(name=free_name(i.name, taken)) if i.kind == "vm" else i
                     for i in items]
    if problems and args.force:
        for line in problems:
            log.warning("%s (going ahead: --force)", line)
        return items
    if problems:
        raise RestoreError("refusing to restore %s: %s (the restored VM would make duplicate "
                           "names or MACs in the pool; remove or rename the other VM, or give "
                           "--force)" % (printable(identity.name), "; ".join(problems)))
    return items


def find_sr(xapi, wanted):
    """Return (ref, record) of the SR named or uuid'd `wanted`, or the pool's default SR."""
    srs = xapi.call("SR.get_all_records")
    if not wanted:
        pool = next(iter(xapi.call("pool.get_all_records").values()))
        ref = pool.get("default_SR")
        if ref in srs:
            return ref, srs[ref]
        raise RestoreError("the pool has no default SR: name one with --sr")
    hits = [(r, rec) for r, rec in srs.items() if wanted in (rec["uuid"], rec["name_label"])]
    if len(hits) != 1:
        raise RestoreError("--sr %s: %s" % (wanted, "no such SR" if not hits else
                                            "%d SRs have that name; give its uuid" % len(hits)))
    return hits[0]


def find_vm(xapi, wanted):
    """Return (ref, record) of the one real VM named or uuid'd `wanted`; raise RestoreError."""
    hits = [(r, rec) for r, rec in xapi.call("VM.get_all_records").items()
            if is_candidate(rec) and wanted in (rec["uuid"], rec["name_label"])]
    if len(hits) != 1:
        raise RestoreError("--attach-to %s: %s" % (wanted, "no such VM" if not hits else
                                                   "%d VMs have that name; give its uuid" % len(hits)))
    return hits[0]


def restore_vm(transport, item, sr, preserve, start):
    """Import an .xva as a new VM named item.name; return its (ref, uuid)."""
    refs = transport.import_vm(item.file, sr, preserve)
    vms = [ref for ref in refs if not transport.xapi.call("VM.get_is_a_snapshot", ref)] or refs
    if not vms:
        raise RestoreError("import of %s created no VM" % item.file)
    ref = vms[0]
    xapi = transport.xapi
    xapi.call("VM.set_name_label", ref, item.name)
    transport.untag_copy(ref)   # the exported snapshot's tags came along in the .xva
    if xapi.call("VM.get_is_a_template", ref):
        xapi.call("VM.set_is_a_template", ref, False)
    if start:
        xapi.call("VM.start", ref, False, False)
    return ref, xapi.call("VM.get_uuid", ref)


def restore_disk(transport, item, sr, attach_to=None):
    """Create a VDI of the recorded size on `sr`, import the disk into it; return (ref, uuid)."""
    vdi = transport.create_vdi(sr, item.name, item.virtual_size)
    try:
        if item.fmt == "chain":
            import_chain(transport, vdi, item)
        else:
            transport.import_vdi(vdi, item.file, item.fmt)
        if attach_to is not None:
            transport.xapi.call("VBD.create", {
                "VM": attach_to, "VDI": vdi.ref, "userdevice": item.userdevice or "autodetect",
                "bootable": item.userdevice == "0", "mode": "RW", "type": "Disk",
                "unpluggable": False, "empty": False, "other_config": {},
                "qos_algorithm_type": "", "qos_algorithm_params": {}})
    except BaseException:
        try:
            transport.destroy_vdi(vdi)
        except VmBackupError as exc:
            log.error("could not remove the half-restored disk %s: %s", vdi.uuid, exc)
        raise
    return vdi.ref, vdi.uuid


def plug_restored(transport, vm_ref, vdi_ref, item):
    """Plug a restored disk's link into its VM if the VM runs (a halted VM plugs it when it
    starts); return False if the plug was refused (a warning: the disk is restored and
    linked all the same)."""
    xapi = transport.xapi
    (vbd,) = xapi.call("VDI.get_VBDs", vdi_ref)
    state = xapi.call("VM.get_power_state", vm_ref)
    device = item.userdevice or "autodetect"
    if state != "Running":
        log.info("disk %r linked to the %s VM as device %s: plugged when it starts",
                 item.name, state.lower(), device)
        return True
    try:
        transport.plug_vbd(vbd)
    except VmBackupError as exc:
        log.warning("disk %r linked to the running VM as device %s but not plugged: %s "
                    "(it is plugged when the VM next starts)", item.name, device, exc)
        return False
    log.info("disk %r plugged into the running VM as device %s", item.name, device)
    return True


def import_chain(transport, vdi, item):
    """Stream the disk of a delta-export point (its VHD chain, the full first, read as raw)
    into `vdi`; raise ChainBroken if a link is missing or wrong."""
    folder = os.path.dirname(item.file)
    vm_dir = os.path.dirname(folder)
    paths = chain_paths(LocalStore(os.path.dirname(vm_dir)), os.path.basename(vm_dir),
                        os.path.basename(folder), item.device)
    with ChainReader(paths) as reader:
        if reader.size != item.virtual_size:
            raise RestoreError("%s: the chain's disk is %d bytes, the manifest says %d"
                               % (item.file, reader.size, item.virtual_size))
        log.info("disk %s: a chain of %d file(s), %s", item.device, len(paths),
                 human_size(reader.size))
        transport.import_vdi_stream(vdi, reader.iter_raw(), reader.size)


def build_restore_parser():
    """Return the parser of `vmbackup.py restore`."""
    parser = argparse.ArgumentParser(
        prog=PROG + " restore", formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[connection_options(), output_options("write what was restored as JSON")],
        description="Restore a backup into the pool: a vm-export backup becomes a new VM, a "
                    "vdi-export backup or a delta-export point becomes new disks (a point's "
                    "chain is read back to its full). The backup is verified first.",
        epilog="examples:\n"
               "  vmbackup.py restore /backups/web01              newest backup, as 'web01 (restored DATE)'\n"
               "  vmbackup.py restore /backups/web01/backup-2026-11-20-001001 --sr 'NFS storage' --start\n"
               "  vmbackup.py restore /backups/web01 --preserve   same name and MACs (the original is gone)\n"
               "  vmbackup.py restore /backups/db01 --attach-to db01-new   disks attached to a VM\n\n"
               + EXIT_STATUS_TEXT)
    opt = parser.add_argument
    opt("backup", metavar="BACKUP", help="a backup folder, or a VM folder (its newest complete backup)")
    opt("--sr", metavar="SR", help="SR name or uuid (default: the pool's default SR)")
    opt("--name", metavar="NAME", help="name of the new VM (default: '<name> (restored DATE)')")
    opt("--preserve", action="store_true",
        help="keep the MAC addresses and the VM's name, for disaster recovery when the original is gone")
    opt("--start", action="store_true", help="start the restored VM")
    opt("--force", action="store_true",
        help="restore even when a VM of the same name, uuid or MAC is in the pool")
    opt("--attach-to", metavar="VM",
        help="vdi-export, delta-export: attach the restored disks to this VM")
    opt("--preview", "--dry-run", action="store_true", help="show what would be created; change nothing")
    return parser


def finish_killed_merge(folder):
    """Finish, under the run lock, a retention merge a killed run left in the VM folder of
    `folder` (the chain's points read as bad until then); return True if there was one."""
    vm_dir = os.path.dirname(os.path.abspath(folder))
    if not os.path.exists(os.path.join(vm_dir, MERGE_JOURNAL)):
        return False
    store = LocalStore(os.path.dirname(vm_dir))
    with store.lock():
        finish_merges(store, os.path.basename(vm_dir))
    return True


def cmd_restore(argv):
    """`vmbackup.py restore BACKUP ...`: verify, then import; return the exit code."""
    args = build_restore_parser().parse_args(argv)
    config, password = load_config(settings_from_args(args))
    backup = resolve_backup(args.backup)
    folder = backup.path
    log.info("restoring from %s (%s)", folder, how_chosen(os.path.abspath(args.backup), backup))
    if not args.preview and finish_killed_merge(folder):
        backup = resolve_backup(args.backup)
    check = check_backup(backup)
    if check.status in ("bad", "incomplete"):
        refuse_bad_backup(backup, check)
    if check.status == "unchecked":
        log.warning("%s could not be fully checked here (%s); restoring anyway",
                    check.display, printable("; ".join(str(u) for u in check.unchecked)))
    else:
        log.info("verified %s: every file's size and SHA-256 match the manifest", check.display
                 if not backup.legacy else check.display + " (legacy: each file's format)")
    manifest = legacy_manifest(backup) if backup.legacy else backup.manifest
    items = plan_restore(folder, manifest, args.name, args.preserve)
    if args.attach_to and items[0].kind != "disk":
        raise UsageError("--attach-to is for vdi-export and delta-export backups; %s holds a "
                         "whole VM" % folder)
    endpoint = parse_endpoint(config.server, config.tls_ca_file, config.tls_fingerprint,
                              config.tls_insecure)
    xapi = login(endpoint, config.username, password)
    done, code = [], EXIT_OK
    try:
        sr_ref, sr = find_sr(xapi, args.sr)
        items = check_pool_for(xapi, items, backup_identity(backup, manifest), args)
        attach = None
        if args.attach_to:
            attach, target = find_vm(xapi, args.attach_to)
            clash = attach_conflicts(items, target["name_label"],
                                     [xapi.call("VBD.get_record", v) for v in target["VBDs"]])
            if clash:
                raise RestoreError("; ".join(clash))
        for item in items:
            log.info("%s %s -> %s %r on SR %r", "would restore" if args.preview else "restoring",
                     os.path.relpath(item.file, os.path.dirname(os.path.dirname(folder))),
                     "VM" if item.kind == "vm" else "disk", item.name, sr["name_label"])
        if args.preview and args.json:
            write_json(args.json, {"preview": True, "backup": folder, "would_restore": [
                {"kind": item.kind, "name": item.name, "file": item.file, "sr": sr["uuid"]}
                for item in items]})
        if args.preview and args.json != "-":
            sys.stdout.write("".join("%s %s -> new %s %r (%s) on SR %r\n" % (
                "would restore", item.file, "VM" if item.kind == "vm" else "disk", item.name,
                human_size(item.virtual_size) if item.virtual_size else item.fmt, sr["name_label"])
                for item in items))
        if args.preview:
            return EXIT_OK
        transport = make_transport(config, xapi, password)
        try:
            for item in items:
                began = time.monotonic()
                if item.kind == "vm":
                    ref, uuid = restore_vm(transport, item, Obj(sr_ref, sr["uuid"]), args.preserve,
                                           args.start)
                else:
                    ref, uuid = restore_disk(transport, item, Obj(sr_ref, sr["uuid"]), attach)
                    if attach is not None and not plug_restored(transport, attach, ref, item):
                        code = EXIT_WARNING
                log.info("restored %s %r (%s) in %.1fs", item.kind, item.name, uuid,
                         time.monotonic() - began)
                done.append({"kind": item.kind, "name": item.name, "uuid": uuid,
                             "file": item.file, "sr": sr["uuid"]})
        finally:
            transport.close()
    finally:
        xapi.logout()
    for entry in done if args.json != "-" else ():     # --json -: stdout is the JSON alone
        sys.stdout.write("restored %s %s %s\n" % (entry["kind"], entry["uuid"], printable(entry["name"])))
    if args.json:
        write_json(args.json, {"restored": done, "backup": folder})
    return code


# === vmbackup/commands/verify.py ============================================
# `vmbackup.py verify`: check backups without a server.
#
# Imports: errors, util, report, check.

def build_verify_parser():
    """Return the parser of `vmbackup.py verify`."""
    parser = argparse.ArgumentParser(
        prog=PROG + " verify", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Check backups without a server: manifest, success marker, every file's "
                    "size and SHA-256, XVA chunk checksums, VHD footers/header/BAT, raw sizes.",
        epilog="exit status: 0 all good, 1 some file could not be checked here (e.g. no zstd), "
               "2 any backup bad or incomplete")
    opt = parser.add_argument
    opt("paths", nargs="+", metavar="PATH", help="a backup folder, a VM folder, or backup_dir")
    opt("--json", metavar="FILE", help="write per-backup results as JSON ('-': stdout)")
    opt("-q", "--quiet", action="count", default=0, help="print only what is wrong")
    opt("-v", "--verbose", action="count", default=0, help="also list every file")
    return parser


def cmd_verify(argv):
    """Run `vmbackup.py verify PATH... [--json FILE|-] [-q|-v]`; return the exit code."""
    args = build_verify_parser().parse_args(argv)
    verbosity = args.verbose - args.quiet
    targets = []
    for path in args.paths:
        targets += verify_targets(path)
    results = []
    out = sys.stderr if args.json == "-" else sys.stdout
    for kind, path in targets:
        try:
            result = VERIFIERS[kind](path)
        except OSError as exc:
            result = unreadable_result(path, exc)
        results.append(result)
        for line in verify_lines(result, verbosity):
            out.write(printable(line) + "\n")
        out.flush()
    code = verify_exit_code(results)
    counts = collections.Counter(r.status for r in results)
    summary = ", ".join("%d %s" % (counts[s], s) for s in ("good", "bad", "incomplete", "unchecked")
                        if counts[s])
    if verbosity >= 0:
        out.write("verified %d backup%s: %s\n" % (len(results), "" if len(results) == 1 else "s",
                                                  summary))
    if args.json:
        write_json(args.json, {"paths": args.paths, "exit_code": code, "summary": dict(counts),
                               "backups": [r.to_json() for r in results]})
    return code


# === vmbackup/metrics.py ====================================================
# The run as Prometheus metrics: a textfile for node_exporter's textfile collector.
#
# Owns: escape_label, History and backup_history (what backup_dir says of a unit's last
# good backup), metrics_text (pure: an Outcome and histories -> the exposition text),
# write_metrics (temp + rename).
#
# The run's figures (start, end, exit code, S/W/E, each unit's status, size and time) are
# read from the run's Outcome; "last successful backup" and "backups kept" are read from
# the backup folders themselves (complete folders, their manifests), so they survive a
# run in which the VM failed, a lost metrics file, and runs of other config files.
# Imports: errors, util, store, report.

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


# === vmbackup/jobs.py =======================================================
# Backing up the selected VMs several at a time (jobs=N): which VM starts next under the
# caps (pure), and the worker threads that back them up.
#
# Owns: Caps, JobKey, serving_host/job_key (which host serves a VM's export, after XAPI's
# redirect, and which SRs it reads), next_job (pure), DeferredStatusLog, back_up_vms.
#
# Each VM is backed up in a worker thread of its own, with its own snapshot, export and
# cleanup (backup.backup_vm_safely), on the run's session over a connection of its own
# (Xapi.twin: no more sessions, no XML-RPC connection shared between threads). Results and
# status-log lines are handed over in the selection's order, whatever order the VMs end in.
# Signals reach only the main thread: there, Terminated or Ctrl-C asks the progress board
# to stop; every worker raises Terminated in its own thread at its next block (downloads
# blocked in a read have their socket shut), so its `with` blocks destroy its snapshots;
# the main thread waits for all of them, then lets the signal go on.
# Imports: errors, util, config, store, progress, report, selection, transport, backup.

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


# === vmbackup/leftovers.py ==================================================
# Snapshots left by earlier, killed runs: recognising them and destroying them.
#
# Owns: is_leftover, run_is_dead, clean_leftovers, forget_pending; the run's heartbeat in
# the pool (PoolBeat, read_beats), which tells another host's live run from a dead one.
# Imports: errors, util, store, xapi, transport.base, backup, delta (the chains' references).

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


# === vmbackup/notify.py =====================================================
# The run's reports to the outside: the mail, the metrics file, and what the log sinks met.
#
# Owns: mail_wanted, mail_subject, mail_body (pure readers of an Outcome), build_mail,
# send_mail (SMTP with none/starttls/ssl, AUTH, retries), MailFailed, test_mail,
# send_reports (what run.report_run calls: each report that cannot be made is a warning
# of the run, never a crash and never a lost backup), report_problems (the preview's check).
# Imports: errors, util, config, store, report, logsinks, metrics.

class MailFailed(VmBackupError):
    """mail to {} not sent: {}"""


#: mail_on -> the lowest exit code that is mailed.
MAIL_ON = {"always": 0, "warning": 1, "error": 2}


#: Tries of one mail, and the seconds waited before the second, third... (times the try).
MAIL_TRIES = 3
MAIL_RETRY_DELAY = 10.0


#: The default port of each smtp_security.
SMTP_PORTS = {"none": 25, "starttls": 587, "ssl": 465}


def mail_wanted(mail_on, code):
    """Return True if a run that exits `code` is mailed under `mail_on`.

    >>> mail_wanted("error", 1), mail_wanted("warning", 1), mail_wanted("always", 0)
    (False, True, True)
    """
    return code >= MAIL_ON[mail_on]


def pool_name(config, record_pool):
    """Return the pool's name for the subject: its name_label, else the server, else this host."""
    if record_pool:
        return record_pool
    server = config.server or ""
    if "://" not in server:     # this host's xapi (none, or unix:/path)
        return socket.gethostname()
    host = server.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]   # never user:password
    return host or socket.gethostname()


def mail_subject(prefix, outcome, pool):
    """Return '[vmbackup] ERROR demo-pool: S:10 W:1 E:2'."""
    return "%s %s %s: %s" % (prefix, status_word(exit_code_for(outcome)), printable(pool),
                             tally(outcome))


def duration(seconds):
    """Return '0:03:12' for 192 seconds."""
    seconds = int(round(seconds or 0))
    return "%d:%02d:%02d" % (seconds // 3600, seconds // 60 % 60, seconds % 60)


def summary_table(outcome):
    """Return the lines of the table of units: VM, mode, status, size, time, message."""
    rows = [("VM", "MODE", "STATUS", "SIZE", "TIME", "MESSAGE")]
    for r in outcome.results:
        rows.append((printable(r.name), r.mode, r.status, human_size(r.bytes) if r.bytes else "-",
                     duration(r.seconds), one_line(r.message, 100) if r.message else ""))
    widths = [min(40, max(display_width(row[i]) for row in rows)) for i in range(5)]
    return [("  ".join(fit(cell, w) for cell, w in zip(row, widths)) + "  " + row[5]).rstrip()
            for row in rows]


def fit(cell, width):
    """Return `cell` padded to `width` columns, or cut to them with an ellipsis (a wide
    character counts two columns, so the table's columns line up for any VM name)."""
    if display_width(cell) <= width:
        return cell + " " * (width - display_width(cell))
    while display_width(cell) > width - 1:
        cell = cell[:-1]
    return cell + " " * (width - 1 - display_width(cell)) + "\u2026"


def unit_lines(lines, unit):
    """Return the log lines of one unit (its `vm=<name>: ` lines), at most the last 40."""
    mark = " vm=%s: " % printable(unit)
    return [line for line in lines if mark in line][-40:]


def problem_groups(problems):
    """Return [(unit, [RunProblem])]: each unit's problems together, units that failed first
    (the run's own problems are one group per problem, unit '')."""
    groups = []
    for problem in problems:
        if problem.unit and groups and groups[-1][0] == problem.unit:
            groups[-1][1].append(problem)
        else:
            groups.append((problem.unit, [problem]))
    return sorted(groups, key=lambda g: 0 if any(p.severity == "error" for p in g[1]) else 1)


def mail_body(config, outcome, pool, lines, space):
    """Return the plain-text report of a run: what failed first, then every unit's row.

    `lines` are the run's log lines (logsinks.RunLines), `space` the (free, total,
    percent) of backup_dir or None; nothing is counted here that the Outcome does not say.
    """
    code = exit_code_for(outcome)
    out = ["vmbackup %s on %s: %s, %s, exit %d" % (__version__, socket.gethostname(),
                                                   status_word(code), tally(outcome), code),
           "pool:     %s" % printable(pool),
           "started:  %s" % outcome.started, "finished: %s (%s)" % (
               outcome.finished, duration((outcome.finished - outcome.started).total_seconds())),
           "config:   %s" % (config.config_file or "(command line)"), ""]
    if outcome.cannot_start:
        out += ["The run did not start: %s" % outcome.cannot_start, ""]
    problems = outcome.all_problems()
    if problems:
        out.append("What failed or warned (%d):" % len(problems))
        for unit, found in problem_groups(problems):
            out.append("")
            for problem in found:
                out.append("%s %s: %s" % ("FAILED" if problem.severity == "error" else "WARNING",
                                          printable(unit) if unit else "(run)", problem.message))
            if unit:
                out.extend("    " + line for line in unit_lines(lines, unit))
        out.append("")
    if outcome.results:
        out += summary_table(outcome) + [""]
    if space:
        free, total, percent = space
        out.append("Space left in backup_dir %s: %s free of %s (%.1f%% free)."
                   % (config.backup_dir, human_size(free), human_size(total), percent))
    else:
        out.append("backup_dir %s: not there, no space to tell." % config.backup_dir)
    out += ["", "To see more:"]
    if config.log_file:
        out += ["  # this run's log", "  less %s" % shlex.quote(config.log_file)]
    if config.syslog:
        out += ["  # this run's log in the journal",
                "  journalctl -t vmbackup --since '%s'" % outcome.started]
    if config.status_log and os.path.isdir(os.path.dirname(config.status_log) or "."):
        out += ["  # the status log (one line per VM and run)",
                "  tail %s" % shlex.quote(config.status_log)]
    out += ["  # every backup in backup_dir, with its status",
            "  %s list -d %s" % (PROG, shlex.quote(config.backup_dir))]
    if config.config_file:      # a command-line run's preview needs that run's arguments
        out += ["  # what the next run would do (changes nothing)",
                "  %s -c %s --preview" % (PROG, shlex.quote(config.config_file))]
    return "\n".join(out) + "\n"


def build_mail(config, subject, body):
    """Return the message (UTF-8 plain text, quoted-printable) from mail_from to mail_to.

    Built with the email package's compat32 classes and headers encoded here: Python 3.6's
    newer policy folds an address list with a non-ASCII name into a header of stray CRs.
    """
    charset = email.charset.Charset("utf-8")
    charset.body_encoding = email.charset.QP
    msg = email.mime.text.MIMEText(body, "plain", charset)
    sender = config.mail_from or "vmbackup@%s" % socket.getfqdn()
    msg["From"] = encode_addresses([sender])
    msg["To"] = encode_addresses(config.mail_to or ())
    msg["Subject"] = encode_text(subject, "Subject")
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["Message-ID"] = email.utils.make_msgid(
        "vmbackup", email.utils.parseaddr(sender)[1].rpartition("@")[2] or None)
    msg["X-Mailer"] = "vmbackup %s" % __version__
    return msg


def encode_text(text, header_name=None):
    """Return a header value: `text` when ASCII, else RFC 2047 encoded words (a Header,
    folded as a header named `header_name`; without one, the encoded text)."""
    try:
        text.encode("ascii")
        return text
    except UnicodeEncodeError:
        header = email.header.Header(text, "utf-8", header_name=header_name)
        return header if header_name else header.encode()


def encode_addresses(addresses):
    """Return 'Name <a@b>, c@d' with non-ASCII names as encoded words."""
    return ", ".join(email.utils.formataddr((encode_text(name) if name else "", addr))
                     for name, addr in email.utils.getaddresses(list(addresses)))


def is_loopback(host):
    """Return True for a server on this host (localhost, 127.x, ::1)."""
    return host in ("localhost", "::1") or host.startswith("127.")


def smtp_connect(config, password):
    """Return a logged-in smtplib connection to smtp_server; raise OSError or SMTPException."""
    security, host = config.smtp_security, config.smtp_server
    port = config.smtp_port or SMTP_PORTS[security]
    context = None
    if security != "none":
        context = ssl.create_default_context(cafile=config.smtp_ca_file)
    if security == "ssl":
        smtp = smtplib.SMTP_SSL(host, port, timeout=config.smtp_timeout, context=context)
    else:
        smtp = smtplib.SMTP(host, port, timeout=config.smtp_timeout)
    try:
        if security == "starttls":
            smtp.starttls(context=context)
        if config.smtp_username:
            smtp_login(smtp, config.smtp_username, password or "")
    except BaseException:
        smtp.close()
        raise
    return smtp


def smtp_login(smtp, username, password):
    """Log in; raise SMTPAuthenticationError. Credentials beyond ASCII go as UTF-8 AUTH PLAIN
    (RFC 4616), which smtplib's login cannot send."""
    try:
        (username + password).encode("ascii")
    except UnicodeEncodeError:
        smtp.ehlo_or_helo_if_needed()
        token = base64.b64encode(("\0%s\0%s" % (username, password)).encode("utf-8"))
        code, reply = smtp.docmd("AUTH", "PLAIN " + token.decode("ascii"))
        if code != 235:
            raise smtplib.SMTPAuthenticationError(code, reply)
        return
    smtp.login(username, password)


def retryable(exc):
    """Return True for what a second try may cure: a refused or dropped connection, a 4xx."""
    if isinstance(exc, (ssl.SSLError, ssl.CertificateError, smtplib.SMTPAuthenticationError)):
        return False
    if isinstance(exc, smtplib.SMTPResponseException):
        return 400 <= exc.smtp_code < 500
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return all(400 <= code < 500 for code, _ in exc.recipients.values())
    return isinstance(exc, (OSError, smtplib.SMTPException))


def failure_text(config, exc):
    """Return one line for an SMTP failure, naming the server and what to check."""
    where = "%s:%s (smtp_security=%s)" % (config.smtp_server,
                                          config.smtp_port or SMTP_PORTS[config.smtp_security],
                                          config.smtp_security)
    if isinstance(exc, (ssl.SSLError, ssl.CertificateError)):
        return ("%s: TLS certificate refused: %s (set smtp_ca_file to the CA that signed it, "
                "and smtp_server to a name the certificate holds)" % (where, one_line(exc)))
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return "%s: login as %s refused: %s %s" % (where, config.smtp_username, exc.smtp_code,
                                                     one_line(exc.smtp_error.decode("utf-8",
                                                                                    "replace")))
    if isinstance(exc, smtplib.SMTPResponseException):
        return "%s: %s %s" % (where, exc.smtp_code,
                              one_line(exc.smtp_error.decode("utf-8", "replace")))
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return "%s: recipients refused: %s" % (where, ", ".join(sorted(exc.recipients)))
    return "%s: %s" % (where, one_line(getattr(exc, "strerror", None) or exc))


def smtp_password(config):
    """Return the SMTP password the settings give (None: no AUTH); raise MailFailed when
    they forbid sending it (in clear to another host, a file others can read)."""
    to = ", ".join(config.mail_to or ())
    try:
        if config.smtp_username:
            if config.smtp_security == "none" and not is_loopback(config.smtp_server):
                raise MailFailed(to, "not sending the SMTP password unencrypted to %s: set "
                                     "smtp_security=starttls or ssl" % config.smtp_server)
            if config.smtp_password_file:
                return read_password_file(config.smtp_password_file)
    except VmBackupError as exc:
        raise MailFailed(to, str(exc)) if not isinstance(exc, MailFailed) else exc
    return None


def send_mail(config, msg, sleep=time.sleep):
    """Send `msg` through smtp_server, trying MAIL_TRIES times; raise MailFailed."""
    to, password = ", ".join(config.mail_to or ()), smtp_password(config)
    for attempt in range(1, MAIL_TRIES + 1):
        try:
            smtp = smtp_connect(config, password)
            try:
                smtp.send_message(msg)
            finally:
                try:
                    smtp.quit()
                except (OSError, smtplib.SMTPException):
                    smtp.close()
            return attempt
        except (OSError, smtplib.SMTPException, ValueError) as exc:
            text = failure_text(config, exc)
            if attempt == MAIL_TRIES or not retryable(exc):
                raise MailFailed(to, "%s (try %d of %d)" % (text, attempt, MAIL_TRIES))
            log.info("mail try %d of %d failed: %s; trying again in %gs",
                     attempt, MAIL_TRIES, text, MAIL_RETRY_DELAY * attempt)
            sleep(MAIL_RETRY_DELAY * attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def mail_report(config, outcome, pool):
    """Mail the run's report if mail_on asks for it; raise MailFailed."""
    code = exit_code_for(outcome)
    if not config.mail_to or not mail_wanted(config.mail_on, code):
        return
    lines = run_lines()
    try:
        space = free_space(config.backup_dir) if os.path.isdir(config.backup_dir) else None
    except OSError:
        space = None
    msg = build_mail(config, mail_subject(config.mail_subject_prefix, outcome, pool),
                     mail_body(config, outcome, pool, lines.lines if lines else [], space))
    tries = send_mail(config, msg)
    log.info("mailed the report to %s (%s)%s", ", ".join(config.mail_to), msg["Subject"],
             "" if tries == 1 else " on try %d" % tries)


def send_reports(config, record):
    """Write the metrics file and mail the report of a run; what fails is a warning of the run.

    Called by run.report_run before it writes the status log's `end` line, so that line,
    the exit code and --json count these warnings. The metrics file is written first, so
    the mail counts a metrics file that cannot be written; a mail that cannot be sent is
    then written into the metrics file again. Only the mail cannot count its own failure.
    """
    lines = run_lines()
    if lines:
        for problem in lines.problems:
            record.log.warning("%s", problem)
        lines.problems[:] = []
    metrics_written = write_run_metrics(config, record)
    pool = pool_name(config, getattr(record, "pool", None))
    try:
        mail_report(config, record.outcome(), pool)
    except MailFailed as exc:
        record.log.warning("%s", exc)
    except Exception as exc:  # noqa: BLE001 - a report never costs the run
        log.debug("traceback", exc_info=True)
        record.log.warning("mail not sent: internal error: %s: %s", type(exc).__name__,
                           one_line(exc))
    else:
        return
    if metrics_written:
        write_run_metrics(config, record)


def report_problems(config, code):
    """Return the warnings a run with `config` ending with exit `code` would get from a log
    file, syslog socket or metrics file it cannot use, or mail settings it refuses (the
    preview's check; nothing is written, no mail is sent)."""
    problems = sink_problems(config)
    if config.metrics_file and write_problem(config.metrics_file):
        problems.append("cannot write metrics_file %s: %s"
                        % (config.metrics_file, write_problem(config.metrics_file)))
    if config.mail_to and mail_wanted(config.mail_on, max(code, EXIT_WARNING if problems else 0)):
        try:
            smtp_password(config)
        except MailFailed as exc:
            problems.append(str(exc))
    return problems


def write_run_metrics(config, record):
    """Write the metrics file of the run so far; return whether it was written (a failure
    is a warning of the run)."""
    if not config.metrics_file:
        return False
    try:
        outcome = record.outcome()
        text = metrics_text(outcome, backup_history(config, outcome),
                            os.path.basename(config.config_file or ""))
        write_metrics(config.metrics_file, text)
        return True
    except OSError as exc:
        record.log.warning("cannot write metrics_file %s: %s", config.metrics_file,
                           exc.strerror or exc)
    except Exception as exc:  # noqa: BLE001 - a report never costs the run
        log.debug("traceback", exc_info=True)
        record.log.warning("cannot write metrics_file %s: internal error: %s: %s",
                           config.metrics_file, type(exc).__name__, one_line(exc))
    return False


def test_mail(config):
    """Send a test message with the mail settings of `config`; return the exit code."""
    if not config.mail_to:
        raise MailFailed("(nobody)", "mail_to is not set in %s" % (config.config_file
                                                                   or "the command line"))
    port = config.smtp_port or SMTP_PORTS[config.smtp_security]
    body = "\n".join([
        "This is a test message from vmbackup %s on %s." % (__version__, socket.gethostname()),
        "",
        "Reports are sent when a run ends with: %s (mail_on=%s)." % (
            {"always": "anything", "warning": "warnings or errors", "error": "errors"}[
                config.mail_on], config.mail_on),
        "smtp_server:   %s:%d" % (config.smtp_server, port),
        "smtp_security: %s" % config.smtp_security,
        "smtp_username: %s" % (config.smtp_username or "-"),
        "config:        %s" % (config.config_file or "(command line)"),
        "sent at:       %s" % datetime.datetime.now().replace(microsecond=0), ""])
    msg = build_mail(config, "%s TEST %s: mail settings work" % (
        config.mail_subject_prefix, socket.gethostname()), body)
    send_mail(config, msg)
    log.info("test mail sent to %s through %s:%d", ", ".join(config.mail_to),
             config.smtp_server, port)
    return EXIT_OK


# === vmbackup/run.py ========================================================
# The whole backup run, as a list of named steps; and the preview, the same run without side effects.
#
# Owns: run_backup, back_up_everything, select_for_run, report_run, report_cannot_start,
# preview (and what it plans: planned_deletions, planned_dated_deletions, planned_destroys).
# Imports: everything below it.

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


# === vmbackup/commands/backup.py ============================================
# `vmbackup.py [backup]`: the modern and NAUbackup command lines of a backup run.
#
# Owns: build_parser/parse_modern, parse_legacy, Invocation, load_settings, cmd_backup.
# Imports: errors, util, config, xapi, run, commands.options.

EXAMPLES = """\
examples:
  vmbackup.py -c /etc/vmbackup/weekly.cfg            back up what weekly.cfg selects
  vmbackup.py -c weekly.cfg --preview                show what it would do, change nothing
  vmbackup.py -e 'PRD-.*' -x PRD-PRINT -d /backups   all VMs starting PRD-, except PRD-PRINT
  vmbackup.py -E 'DEV-web3:7:xvda;xvdb' -d /backups  disks xvda and xvdb of DEV-web3, keep 7
  vmbackup.py -s https://pool-master --password-file /root/.xapi.pw --tls-fingerprint SHA256 -e web01
  vmbackup.py -q -c weekly.cfg --log-file /var/log/vmbackup.log   cron: print only problems
  vmbackup.py --test-mail -c weekly.cfg              send a test mail with weekly.cfg's mail_* keys

other commands (each with --help):
  vmbackup.py list | verify | restore | diff ...

NAUbackup VmBackup.py command lines work unchanged:
  vmbackup.py /root/VmBackup.pass weekend.cfg preview
  vmbackup.py password "DEV mySql"        vmbackup.py password vdi-export=DEV-mySql
"""


LEGACY_USAGE = """\
usage (NAUbackup compatible):
  %(prog)s <password|password-file> <config-file|vm-selector> [preview] [compress=True|False]
           [ignore_extra_keys=True|False] [pre_clean=True|False]
  %(prog)s <password> create-password-file=FILE
  %(prog)s help|config|example

  vm-selector: NAME, REGEX, vm-export=SEL or vdi-export=SEL
  A first argument naming an existing file is a password file (base64, as NAUbackup writes it).
  Modern options: %(prog)s --help
""" % {"prog": PROG}


LEGACY_EXAMPLES = """\
  %(prog)s password weekend.cfg             back up what weekend.cfg selects
  %(prog)s password DEV-mySql               one VM by name, built-in defaults
  %(prog)s password vdi-export=DEV-mySql    its root disk only
  %(prog)s password "DEV mySql"             a name with a space
  %(prog)s password "DEV-my.*"              every VM whose name starts DEV-my
  %(prog)s password ".*"                    every VM
  %(prog)s /root/VmBackup.pass monthly.cfg  password from a file
  %(prog)s password weekend.cfg preview     show what would be done
""" % {"prog": PROG}


class Invocation(typing.NamedTuple):
    """What the command line asks for, before any file is read."""
    action: str                     # backup, help, config, example, create-password-file
    config_file: typing.Optional[str] = None
    cli_values: typing.Dict[str, typing.Any] = {}
    cli_selectors: typing.Tuple[Selector, ...] = ()
    preview: bool = False
    password: typing.Optional[str] = None
    ignore_extra_keys: bool = False
    json: typing.Optional[str] = None
    legacy: bool = False
    target: typing.Optional[str] = None   # create-password-file=FILE


def build_parser():
    """Return the modern argparse parser (backup is the default command)."""
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[connection_options(),
                 output_options("write the run summary (or preview) as JSON",
                                quiet_help="print only warnings and errors (cron mails "
                                           "only when something is wrong)")],
        description="Back up the VMs of a XenServer / XCP-ng pool: snapshot, export, metadata, "
                    "retention, pool database and host backups.",
        epilog=EXAMPLES + "\n" + EXIT_STATUS_TEXT)
    opt = parser.add_argument
    opt("-c", "--config", metavar="FILE", help="NAUbackup-style key=value config file")
    opt("-e", "--vm-export", action="append", default=[], metavar="SEL",
        help="NAME_OR_REGEX[:MAX] to back up as .xva (repeatable)")
    opt("-E", "--vdi-export", action="append", default=[], metavar="SEL",
        help="NAME_OR_REGEX[:MAX[:DEV;DEV]] to back up disk by disk (repeatable)")
    opt("-D", "--delta-export", action="append", default=[], metavar="SEL",
        help="NAME_OR_REGEX[:MAX[:DEV;DEV]] to back up as disk chains: a full, then only "
             "the changed blocks (repeatable)")
    opt("-m", "--meta-export", action="append", default=[], metavar="SEL",
        help="NAME_OR_REGEX[:MAX] to back up metadata only (repeatable)")
    opt("-x", "--exclude", action="append", default=[], metavar="SEL",
        help="NAME_OR_REGEX never to back up (repeatable; wins over every selector)")
    opt("-d", "--backup-dir", metavar="DIR")
    opt("--max-backups", type=int, metavar="N", help="successful backups kept per VM")
    opt("--max-meta-backups", type=int, metavar="N",
        help="metadata-only backups kept per VM, counted apart (default: --max-backups)")
    for period, units in (("daily", "days"), ("weekly", "weeks"), ("monthly", "months"),
                          ("yearly", "years")):
        opt("--keep-" + period, metavar="N",
            help="GFS: beside the --max-backups newest, keep the newest backup of each of N more "
                 "%s (-1: all)" % units)
    opt("--compress", choices=("none", "gzip", "zstd"), help="vm-export compression")
    opt("--vdi-format", choices=("raw", "vhd"), help="vdi-export disk format")
    opt("--pool-db-backup", action="store_const", const=True, help="back up the pool database")
    opt("--host-backup", action="store_const", const=True, help="back up every host's dom0")
    opt("--pre-clean", action="store_const", const=True,
        help="delete old backups down to max_backups-1 before exporting")
    opt("--metadata-only", action="store_const", const=True,
        help="save metadata only: no snapshot, no disk export")
    opt("--quiesce", action="store_const", const=True, help="quiesced snapshots where supported")
    opt("--preview", "--dry-run", action="store_true",
        help="show the settings and the selection; change nothing")
    opt("--space-threshold", metavar="PERCENT", help="minimum %% free in backup_dir")
    opt("--retries", metavar="N", help="retries of a failed export (new snapshot each time)")
    opt("--stall-timeout", metavar="SECONDS", help="abort an export that makes no progress")
    opt("--max-rate", metavar="RATE", help="bandwidth limit per export, e.g. 100M (bytes/s)")
    opt("--progress-interval", metavar="SECONDS",
        help="seconds between progress lines when stderr is not a terminal (default 60)")
    opt("-j", "--jobs", metavar="N", help="VMs backed up at once (default 1)")
    opt("--jobs-per-host", metavar="N",
        help="exports one host serves at once (default 2; 0: no limit)")
    opt("--jobs-per-sr", metavar="N", help="exports reading one SR at once (default 2; 0: no limit)")
    opt("--umask", metavar="OCTAL", help="umask for backup files (default 077)")
    opt("--status-log", metavar="FILE", help="append NAUbackup-style status lines to FILE")
    opt("--ignore-extra-keys", action="store_true", help="skip unknown config keys")
    opt("--log-file", metavar="FILE", help="append the log to FILE too (info and up, even with -q)")
    opt("--syslog", action="store_const", const=True,
        help="send the log to syslog too (/dev/log, ident vmbackup)")
    opt("--metrics-file", metavar="FILE", help="write a Prometheus textfile after the run")
    opt("--test-mail", action="store_true",
        help="send a test mail with the config's mail settings, back up nothing")
    opt("--full-interval", metavar="N",
        help="delta-export: a new full every N points of a chain (default 7; 0: never)")
    opt("--version", action="version", version="%(prog)s " + __version__)
    return parser


def parse_modern(argv):
    """Return the Invocation of a modern command line; raise UsageError on bad values."""
    args = build_parser().parse_args(argv)
    values = settings_from_args(args)
    selectors = []
    for option, mode in (("vdi_export", "vdi-export"), ("vm_export", "vm-export"),
                         ("meta_export", "meta-export"), ("exclude", "exclude"),
                         ("delta_export", "delta-export")):
        for text in getattr(args, option):
            try:
                selectors.append(parse_selector(text, mode, "--%s" % mode))
            except ValueError as exc:
                raise UsageError("--%s %s: %s" % (mode, text, exc))
    return Invocation("test-mail" if args.test_mail else "backup", config_file=args.config,
                      cli_values=values,
                      cli_selectors=tuple(selectors), preview=args.preview,
                      ignore_extra_keys=args.ignore_extra_keys, json=args.json)


#: A legacy selector word: 'vm-export=SEL' or 'vdi-export=SEL'; other 'key=' words are errors.
LEGACY_KEY_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_-]*)=(.*)$", re.S)


def parse_legacy(argv):
    """Return the Invocation of a NAUbackup VmBackup.py command line; raise UsageError.

    ['pw', 'weekend.cfg', 'preview'] -> backup with config weekend.cfg, preview.
    """
    words = [w.lower() for w in argv]
    for action in ("help", "config", "example"):
        if action in words:
            return Invocation(action, legacy=True)
    if len(argv) < 2:
        raise UsageError("expected <password|password-file> <config-file|vm-selector>\n" + LEGACY_USAGE)
    secret, target, rest = argv[0], argv[1], argv[2:]
    password = (read_password_file(secret, legacy=True) if os.path.isfile(secret) else secret)
    if target.lower().startswith("create-password-file="):
        return Invocation("create-password-file", password=password, legacy=True,
                          target=target.split("=", 1)[1])
    values, preview, ignore_extra = {}, False, False
    for word in rest:
        match = LEGACY_KEY_RE.match(word)
        if word.lower() == "preview":
            preview = True
        elif match and match.group(1).lower() in LEGACY_WORD_KEYS:
            key, value = match.group(1).lower(), match.group(2)
            try:
                flag = parse_bool(value)
            except ValueError:
                raise UsageError("%s: expected True or False\n%s" % (word, LEGACY_USAGE))
            if key == "compress":
                values["compress"] = "gzip" if flag else None
            elif key == "pre_clean":
                values["pre_clean"] = flag
            else:
                ignore_extra = flag
        else:
            raise UsageError("unexpected argument %r\n%s" % (word, LEGACY_USAGE))
    if os.path.isfile(target):
        return Invocation("backup", config_file=target, cli_values=values, preview=preview,
                          password=password, ignore_extra_keys=ignore_extra, legacy=True)
    if looks_like_path(target):
        raise UsageError("config file %s does not exist (a second argument with '/' or ending "
                         "like .cfg is a config file, not a vm-selector)" % target)
    match = LEGACY_KEY_RE.match(target)
    mode = "vm-export"
    if match and normalise_key(match.group(1)) in ("vm-export", "vdi-export"):
        mode, target = normalise_key(match.group(1)), match.group(2)
    elif match:
        raise UsageError("%r is neither a config file nor a vm-selector (NAME, REGEX, "
                         "vm-export=SEL or vdi-export=SEL)" % argv[1])
    try:
        selector = parse_selector(target, mode)
    except ValueError as exc:
        raise UsageError("%s: %s" % (argv[1], exc))
    return Invocation("backup", cli_values=values, cli_selectors=(selector,), preview=preview,
                      password=password, ignore_extra_keys=ignore_extra, legacy=True)


def looks_like_path(word):
    """Return True if a NAUbackup second argument is meant as a config file.

    'conf/weekly', 'weekend.cfg' and the typos 'weekend.cgf', 'weekend.conf' (an ending of
    letters holding a c and an f) are; 'DEV-my.*', 'web01', 'db.example.com' are not.
    """
    ending = re.search(r"\.([A-Za-z]{2,6})$", word)
    return "/" in word or bool(ending and set("cf") <= set(ending.group(1).lower()))


def load_settings(inv):
    """Return (Config, password) for a backup Invocation: defaults < file < command line."""
    parsed = None
    if inv.config_file:
        parsed = read_config_file(inv.config_file, inv.ignore_extra_keys)
    config, password = load_config(inv.cli_values, parsed, inv.cli_selectors, inv.config_file,
                                   inv.password)
    if not inv.legacy and not any(s.mode != "exclude" for s in config.selectors) \
            and not config.pool_db_backup and not config.host_backup:
        if inv.config_file and not inv.cli_selectors:
            raise UsageError("config file %s selects nothing: it has no vm-export, vdi-export or "
                             "meta-export line (and no pool_db_backup=1 or host_backup=1); "
                             "`vmbackup.py config` prints them commented out: uncomment "
                             "the ones you want"
                             % inv.config_file)
        raise UsageError("nothing to back up: give -c FILE, -e/-E/-m SELECTOR, "
                         "--pool-db-backup or --host-backup (see --help)")
    return config, password


def cmd_backup(inv):
    """Run (or preview) a backup; return the exit code.

    A run stopped by its settings still writes --json (status error, the reason).
    """
    if inv.action == "test-mail":
        return cmd_test_mail(inv)
    config = None
    try:
        config, password = load_settings(inv)
        endpoint = parse_endpoint(config.server, config.tls_ca_file, config.tls_fingerprint,
                                  config.tls_insecure)
    except VmBackupError as exc:
        config = config or getattr(exc, "config", None)
        if not inv.preview and config is not None:
            with log_sinks(config):     # the log file and syslog get the reason too
                report_cannot_start(inv.json, str(exc), config)
                raise
        if not inv.preview:
            report_cannot_start(inv.json, str(exc), config)
        raise
    if config.tls_insecure and not endpoint.is_local and not config.tls_fingerprint:
        # a caution about a chosen setting, printed each run; not a problem of the run
        log.warning("TLS certificate verification is off (tls_insecure): anyone on the path "
                    "can read the backups; prefer tls_fingerprint")
    if inv.preview:
        return preview(config, endpoint, password, inv.json)
    with log_sinks(config):     # --log-file, --syslog, and the lines the mail quotes
        return run_backup(config, endpoint, password, inv)


def cmd_test_mail(inv):
    """Send a test mail with the mail settings of the config file and command line."""
    parsed = read_config_file(inv.config_file, inv.ignore_extra_keys) if inv.config_file else None
    return test_mail(build_config(parsed, inv.cli_values, (), inv.config_file))


# === vmbackup/cli.py ========================================================
# The entry point: picks the command, installs the signal handlers, turns errors into exit codes.
#
# Owns: main, dispatch, COMMANDS. Nothing imports it.
# Imports: everything.

def is_legacy(argv):
    """Return True when argv is NAUbackup's positional form rather than the modern one."""
    return bool(argv) and not argv[0].startswith("-") and argv[0] not in COMMANDS


def dispatch(argv):
    """Parse argv, run the command, return its exit code."""
    setup_logging(verbosity(argv))
    if is_legacy(argv):
        inv = parse_legacy(argv)
    else:
        if argv and argv[0] == "backup":
            argv = argv[1:]
        elif argv and argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        inv = parse_modern(argv)
    if inv.action == "help":
        sys.stdout.write(LEGACY_USAGE + "\n" + EXIT_STATUS_TEXT)
        return EXIT_OK
    if inv.action == "config":
        sys.stdout.write(example_config())
        return EXIT_OK
    if inv.action == "example":
        sys.stdout.write(LEGACY_EXAMPLES)
        return EXIT_OK
    if inv.action == "create-password-file":
        write_password_file(inv.target, inv.password)
        log.info("wrote password file %s (mode 0600)", inv.target)
        return EXIT_OK
    return cmd_backup(inv)


#: Subcommands besides the default backup: name -> function(argv) -> exit code.
COMMANDS = collections.OrderedDict([("backup", None), ("list", cmd_list), ("verify", cmd_verify),
                                    ("diff", cmd_diff), ("restore", cmd_restore)])


def _raise_terminated(signum, frame):
    raise Terminated(signal.Signals(signum).name)


def main(argv=None):
    """Run vmbackup with `argv` (default sys.argv[1:]); return the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = verbosity(argv) > 0
    previous = {}
    try:
        for signum in (signal.SIGTERM, signal.SIGHUP):  # so every `finally` runs
            previous[signum] = signal.signal(signum, _raise_terminated)
    except ValueError:  # pragma: no cover - not the main thread (embedded use)
        previous = {}
    try:
        return dispatch(argv)
    except VmBackupError as exc:
        if verbose:
            traceback.print_exc()
        sys.stderr.write("%s: error: %s\n" % (PROG, exc))
        return exc.exit_code
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("%s: interrupted\n" % PROG)
        return EXIT_INTERRUPTED
    except Terminated as exc:
        # the run says what became of its snapshots (args[1]); outside a run there were none
        sys.stderr.write("%s: terminated by %s\n" % (PROG, "; ".join(exc.args)))
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - the one place unknown errors become exit 2
        if verbose:
            traceback.print_exc()
        sys.stderr.write("%s: internal error: %s: %s (run with -v for the traceback)\n"
                         % (PROG, type(exc).__name__, one_line(exc)))
        return EXIT_ERROR
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
