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

Usage (NAUbackup VmBackup.py compatible):
    vmbackup.py <password|password-file> <config-file|vm-selector> [preview]
                [compress=True|False] [ignore_extra_keys=True|False]
                [pre_clean=True|False]
    vmbackup.py <password> create-password-file=FILE
    vmbackup.py help|config|example

EXIT STATUS
    0  all selected work succeeded (and a valid preview)
    1  finished, with warnings
    2  something failed (a VM, the pool or host backup), the run could not
       start (usage, configuration, login, unusable backup_dir, invalid preview),
       or it was terminated (SIGTERM)
  130  interrupted (Ctrl-C)
"""

__version__ = "0.1.0"

import argparse
import base64
import collections
import datetime
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import typing
import urllib.parse
import xml.dom.minidom
import xmlrpc.client

try:  # the official client; dom0 ships it, elsewhere: pip install XenAPI
    import XenAPI
except ImportError:  # pragma: no cover - exercised only where XenAPI is absent
    XenAPI = None

PROG = "vmbackup.py"

#: NAUbackup's documented defaults, kept so its config files mean the same here.
DEFAULT_BACKUP_DIR = "/snapshots/BACKUPS"
DEFAULT_STATUS_LOG = "/snapshots/NAUbackup/status.log"
DEFAULT_MAX_BACKUPS = 4

#: dom0's local XAPI socket; root needs no password on it.
LOCAL_XAPI_SOCKET = "/var/lib/xcp/xapi"

#: Where xe lives on a pool host (then: the first xe on PATH).
DEFAULT_XE_PATHS = ("/opt/xensource/bin/xe", "/usr/bin/xe")

#: A selector made only of these characters is a plain name, compared literally.
PLAIN_NAME_RE = re.compile(r"^[A-Za-z0-9 _-]+$")

#: Selection modes, strongest first: a VM chosen for vdi-export is not also
#: vm-exported, and a full export already carries the metadata.
MODES = ("vdi-export", "vm-export", "meta-export")

EXIT_OK, EXIT_WARNING, EXIT_ERROR = 0, 1, 2
EXIT_INTERRUPTED = 130

log = logging.getLogger("vmbackup")


# ---------------------------------------------------------------------------
# Errors and exit codes
# ---------------------------------------------------------------------------

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
    """backup_dir {} is in use by another vmbackup run (pid {}); try again when it has finished"""


class XapiCallFailed(VmBackupError):
    """XAPI {} failed: {}"""


class Terminated(BaseException):
    """Raised by SIGTERM/SIGHUP so every `finally` and `with` cleans up; stops the whole run."""


def xapi_error_text(details):
    """Return one line for a XenAPI.Failure's ErrorDescription list."""
    if not details:
        return "unknown XAPI error"
    code, params = str(details[0]), [str(p) for p in details[1:] if str(p)]
    return code + (" " + ", ".join(params) if params else "")


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

Setting = collections.namedtuple("Setting", "default parse help")

#: Every scalar configuration key: default, parser, and the line example.cfg shows.
SETTINGS = collections.OrderedDict([
    ("backup_dir", Setting(DEFAULT_BACKUP_DIR, parse_text,
                           "folder that receives the backups (must exist)")),
    ("max_backups", Setting(DEFAULT_MAX_BACKUPS, lambda v: parse_int(v, 1),
                            "successful backups kept per VM (>= 1)")),
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
    ("umask", Setting(0o077, parse_umask, "umask for backup files and folders (077: 0600/0700)")),
    ("server", Setting(None, parse_text, "https://host, http://host or unix:/path (default: this host)")),
    ("username", Setting("root", parse_text, "XAPI user")),
    ("password_file", Setting(None, parse_text, "file holding the XAPI password (mode 0600)")),
    ("transport", Setting("auto", choice("auto", "xe", "api"), "auto, xe or api")),
    ("xe_path", Setting(None, parse_text, "the xe binary (default /opt/xensource/bin/xe, then PATH)")),
    ("tls_ca_file", Setting(None, parse_text, "CA bundle that signed the pool's certificate")),
    ("tls_fingerprint", Setting(None, parse_fingerprint, "pinned SHA-256 fingerprint of the pool's certificate")),
    ("tls_insecure", Setting(False, parse_bool, "do not verify the pool's certificate (warns)")),
])

#: Repeatable selector keys; underscore and hyphen spellings are the same key.
SELECTOR_KEYS = {"vm_export": "vm-export", "vdi_export": "vdi-export",
                 "meta_export": "meta-export", "exclude": "exclude"}

#: Keys accepted on a NAUbackup command line as `key=value` words.
LEGACY_WORD_KEYS = ("compress", "ignore_extra_keys", "pre_clean")


class Selector(typing.NamedTuple):
    """One vm-export/vdi-export/meta-export/exclude line, parsed."""
    mode: str                   # vm-export, vdi-export, meta-export or exclude
    pattern: str                # the name or regex as written
    max_backups: typing.Optional[int] = None   # None: the global max_backups
    devices: typing.Tuple[str, ...] = ()       # vdi-export disks; () = root disk
    origin: str = "command line"               # "file:line" or "command line"

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
    "vdi-export": re.compile(r"^(?P<name>.+?)(?::(?P<max>-?\d*)(?::(?P<devs>[A-Za-z0-9;, ]*))?)?$", re.S),
    "other": re.compile(r"^(?P<name>.+?)(?::(?P<max>-?\d*))?$", re.S),
}


def parse_selector(text, mode, origin="command line"):
    """Return a Selector for 'NAME_OR_REGEX[:MAX[:DEV;DEV]]'; raise ValueError if invalid.

    >>> parse_selector("DEV-web3:7:xvda;xvdb", "vdi-export")[1:4]
    ('DEV-web3', 7, ('xvda', 'xvdb'))
    """
    raw = text.strip()
    if not raw:
        raise ValueError("empty selector")
    match = _SELECTOR_TAIL["vdi-export" if mode == "vdi-export" else "other"].match(raw)
    name, max_text = match.group("name"), match.group("max")
    devs = match.groupdict().get("devs") or ""
    max_backups = None
    if max_text not in (None, "", "-1"):
        max_backups = int(max_text)
        if max_backups < 1:
            raise ValueError("max_backups in %r must be at least 1 (or -1 for the default)" % raw)
    devices = tuple(d.strip() for d in re.split(r"[;,]", devs) if d.strip())
    if not PLAIN_NAME_RE.match(name):
        try:
            re.compile(name)
        except re.error as exc:
            raise ValueError("invalid regex: %s=%s (%s)" % (mode, raw, exc))
    return Selector(mode, name, max_backups, devices, origin)


class Config(typing.NamedTuple):
    """The effective settings of one run: defaults < config file < command line."""
    backup_dir: str = DEFAULT_BACKUP_DIR
    max_backups: int = DEFAULT_MAX_BACKUPS
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
    umask: int = 0o077
    server: typing.Optional[str] = None
    username: str = "root"
    password_file: typing.Optional[str] = None
    transport: str = "auto"
    xe_path: typing.Optional[str] = None
    tls_ca_file: typing.Optional[str] = None
    tls_fingerprint: typing.Optional[str] = None
    tls_insecure: bool = False
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
        "# vm-export, and the last line for the same VM sets its MAX_BACKUPS. Order does not matter.",
        "",
        "exclude=DEV-phishing-test",
        "exclude=PRD-PRINT$",
        "vdi-export=DEV-web3:7",
        "vdi-export=DEV-.*[Tt]est.*:3:xvda;xvdb",
        "vm-export=PRD-.*",
        "vm-export=.*SAVE$:5",
        "vm-export=my-third-vm:3",
        "# metadata only (no snapshot, no disk export): cheap enough to run hourly",
        "meta-export=DEV-.*",
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


# ---------------------------------------------------------------------------
# VM selection
# ---------------------------------------------------------------------------

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


def select_vms(vm_records, selectors, max_backups=DEFAULT_MAX_BACKUPS):
    """Return the Selection that `selectors` make of `vm_records` ({ref: VM record}).

    The contract: candidates are real VMs (is_candidate); plain names are matched
    exactly and win over regexes; excludes win over everything; vdi-export wins over
    vm-export, which wins over meta-export; within the winning mode the last
    definition sets max_backups and devices; two candidates with one name are an
    error for that name; a selector that matches nothing is a warning.
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
        chosen.append(Selected(ref, rec["name_label"], rec["uuid"], mode,
                               last.max_backups or max_backups, last.devices, last))
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
        return 1 << 30


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


# ---------------------------------------------------------------------------
# XAPI access: endpoints, TLS, login
# ---------------------------------------------------------------------------

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

    def make_connection(self, host):
        if self._connection and self._connection[0] == host:
            return self._connection[1]
        self._connection = host, self.endpoint.connection(timeout=self.timeout)
        return self._connection[1]


class XapiFailure(VmBackupError):
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
            except (CONNECTION_ERRORS + (xmlrpc.client.Fault,)) as exc:
                if attempt + 1 >= attempts:
                    raise XapiCallFailed(method, one_line(exc))
                log.warning("XAPI %s: %s; retrying", method, one_line(exc))
                time.sleep(self.BACKOFF * (2 ** attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def logout(self):
        """Log out, ignoring errors: the run is over either way."""
        try:
            self.session.xenapi.session.logout()
        except Exception as exc:  # noqa: BLE001 - logout failure must not mask the run's result
            log.debug("logout: %s", exc)


def login(endpoint, username, password, _redirects=2):
    """Return a Xapi session; follow HOST_IS_SLAVE to the master; raise LoginError."""
    if XenAPI is None:
        raise LoginError(endpoint.url, "the XenAPI package is missing (pip install XenAPI)")
    uri = "http://localhost/" if endpoint.is_local else endpoint.url
    session = XenAPI.Session(uri, transport=EndpointTransport(endpoint, timeout=300))
    try:
        session.xenapi.login_with_password(username, password or "", "2.0",
                                           "vmbackup/" + __version__)
    except XenAPI.Failure as exc:
        details = [str(d) for d in exc.details]
        if details[:1] == ["HOST_IS_SLAVE"] and len(details) > 1 and _redirects > 0:
            master = endpoint.with_host(details[1])
            log.info("%s is a pool member; logging in to the master %s", endpoint.url, master.url)
            return login(master, username, password, _redirects - 1)
        if details[:1] == ["SESSION_AUTHENTICATION_FAILED"]:
            raise LoginError(endpoint.url, "authentication failed for user %r" % username)
        raise LoginError(endpoint.url, xapi_error_text(details))
    except ssl.SSLError as exc:
        raise LoginError(endpoint.url, "TLS: %s" % one_line(getattr(exc, "reason", None) or exc))
    except CONNECTION_ERRORS + (xmlrpc.client.Fault,) as exc:
        raise LoginError(endpoint.url, one_line(getattr(exc, "strerror", None) or exc))
    return Xapi(endpoint, session, username)


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


def read_pool(xapi):
    """Return a PoolView: one get_all_records per class, whatever the pool's size."""
    pools = xapi.call("pool.get_all_records")
    return PoolView(
        pool=next(iter(pools.values()), {}),
        hosts=xapi.call("host.get_all_records"),
        vms=xapi.call("VM.get_all_records"),
        vbds=xapi.call("VBD.get_all_records"),
        vdis=xapi.call("VDI.get_all_records"),
        vifs=xapi.call("VIF.get_all_records"),
        networks=xapi.call("network.get_all_records"),
        srs=xapi.call("SR.get_all_records"),
        guest_metrics=xapi.call("VM_guest_metrics.get_all_records"),
    )


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
    if selected.mode == "vdi-export":
        chosen, missing = pick_disks(disks, selected.devices)
        for device in missing:
            problems.append("no disk %s on VM %s" % (device, printable(selected.name)))
        return VmPlan(selected, [d for d in chosen if not d.nobak],
                      [d for d in chosen if d.nobak], problems)
    return VmPlan(selected, [d for d in disks if not d.nobak], [d for d in disks if d.nobak], problems)


# ---------------------------------------------------------------------------
# Credentials
# ---------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------
# Reports: preview and JSON
# ---------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------
# Preview
# ---------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------
# Backup folders: safe names, paths inside backup_dir, partial files
# ---------------------------------------------------------------------------

#: Characters that break SMB/NTFS shares or paths; NAUbackup's ':' in folder
#: names broke SMB (its issue #4).
UNSAFE_CHARS = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')

#: backup-YYYY-MM-DD-HHMMSS, and NAUbackup's backup-YYYY-MM-DD-(HH:MM:SS).
BACKUP_DIR_RE = re.compile(r"^backup-(\d{4})-(\d\d)-(\d\d)-(?:(\d\d)(\d\d)(\d\d)|\((\d\d):(\d\d):(\d\d)\))$")

#: pool_db_YYYYMMDD-HHMMSS.dump and host_YYYYMMDD-HHMMSS.xbk
DATED_FILE_RE = re.compile(r"^(?:pool_db|host)_(\d{8})-(\d{6})\.(?:dump|xbk)$")

SUCCESS_MARKER = "success"
MANIFEST = "backup.json"


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


# ---------------------------------------------------------------------------
# Retention
# ---------------------------------------------------------------------------

def plan_retention(entries, keep, drop_incomplete=True):
    """Return the names to delete from `entries` [(name, datetime, complete)], newest kept.

    The `keep` newest complete backups stay; older complete ones go; incomplete
    ones go when `drop_incomplete`. Never returns the newest complete backup.
    Pure: works from names and markers, never from mtimes.
    """
    complete = sorted((e for e in entries if e[2]), key=lambda e: e[1], reverse=True)
    keep = max(1, keep)
    doomed = [name for name, _, _ in complete[keep:]]
    if drop_incomplete:
        doomed += [name for name, _, done in entries if not done]
    return sorted(doomed)


def vm_backups(vm_dir):
    """Return [(name, datetime, complete)] for the backup folders in a VM's folder."""
    try:
        names = os.listdir(vm_dir)
    except OSError:
        return []
    found = []
    for name in names:
        when = parse_backup_name(name)
        path = os.path.join(vm_dir, name)
        if when is None or not os.path.isdir(path) or os.path.islink(path):
            continue
        found.append((name, when, os.path.exists(os.path.join(path, SUCCESS_MARKER))))
    return found


def prune_vm_backups(vm_dir, keep, drop_incomplete=True, vlog=None):
    """Delete what plan_retention says in `vm_dir`; return the names deleted."""
    vlog = vlog or log
    entries = vm_backups(vm_dir)
    doomed = plan_retention(entries, keep, drop_incomplete)
    complete = {name for name, _, done in entries if done}
    for name in doomed:
        if name in complete:
            vlog.info("retention: deleting %s", name)
        else:
            vlog.warning("deleting incomplete backup %s (no success marker)", name)
        shutil.rmtree(inside(vm_dir, name), ignore_errors=False)
    return doomed


def prune_dated_files(folder, keep):
    """Delete the oldest pool_db_/host_ backup files in `folder` beyond `keep`; return them."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    entries = [(n, parse_dated_file(n), True) for n in names if parse_dated_file(n)]
    doomed = plan_retention(entries, keep)
    for name in doomed:
        log.info("retention: deleting %s", os.path.join(os.path.basename(folder), name))
        os.unlink(inside(folder, name))
    return doomed


# ---------------------------------------------------------------------------
# Locking and the backup folder
# ---------------------------------------------------------------------------

class RunLock:
    """`with RunLock(backup_dir):` one run at a time per backup_dir.

    The lock file holds 'pid host'; a lock whose process is dead on this host is
    taken over with a warning.
    """

    NAME = ".vmbackup.lock"

    def __init__(self, folder):
        self.path = os.path.join(folder, self.NAME)
        self.me = "%d %s\n" % (os.getpid(), socket.gethostname())

    def __enter__(self):
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(self.me)
            return self
        raise LockHeld(os.path.dirname(self.path), "unknown")

    def _take_over_if_stale(self):
        try:
            with open(self.path) as handle:
                pid_text, _, host = handle.read().strip().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            pid, host = None, ""
        if pid is not None and host not in ("", socket.gethostname()):
            raise LockHeld(os.path.dirname(self.path), "%d on host %s" % (pid, host))
        if pid is not None and pid_alive(pid):
            raise LockHeld(os.path.dirname(self.path), pid)
        log.warning("taking over stale lock %s (pid %s is gone)", self.path, pid)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __exit__(self, *exc):
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


def free_space(path):
    """Return (free bytes, total bytes, percent free) of the file system holding `path`."""
    st = os.statvfs(path)
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    return free, total, (100.0 * free / total) if total else 0.0


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


# ---------------------------------------------------------------------------
# Transports: one interface, over xe or over XenAPI + HTTP
# ---------------------------------------------------------------------------

class ExportFailed(VmBackupError):
    """{}"""


class ExportStalled(ExportFailed):
    """{} made no progress for {} seconds (stall_timeout): aborted"""


class XeFailed(VmBackupError):
    """xe {} failed (exit {}): {}"""

    def __init__(self, argv, rc, stderr):
        VmBackupError.__init__(self, argv[1] if len(argv) > 1 else "?", rc,
                               one_line(stderr) or "no message")
        self.argv, self.rc, self.stderr = argv, rc, stderr

    @property
    def code(self):
        """The XAPI error code in xe's message, if it printed one."""
        match = re.search(r"Error code: (\S+)", self.stderr) or \
            re.search(r"\b([A-Z][A-Z0-9]+(?:_[A-Z0-9]+)+)\b", self.stderr)
        return match.group(1) if match else ""


class Obj(typing.NamedTuple):
    """A XAPI object by reference and uuid (the API speaks refs, xe speaks uuids)."""
    ref: str
    uuid: str


#: other_config key that marks the snapshots and VDIs this tool made; its value
#: starts with the object's own uuid, so a copy (a restored VM, a snapshot of a
#: restored VM) never looks like ours.
TAG_KEY = "vmbackup_snapshot"

#: XAPI errors that mean "busy right now": an export still holds the object.
BUSY_CODES = ("OTHER_OPERATION_IN_PROGRESS", "VDI_IN_USE")

#: XAPI errors that mean the object is already gone.
GONE_CODES = ("HANDLE_INVALID", "UUID_INVALID")


def error_code(exc):
    """Return the XAPI error code carried by an XapiFailure or XeFailed, else ''."""
    return getattr(exc, "code", "") or ""


class Transport:
    """What both transports share: the session, tagging, retried destroys."""

    name = "?"
    #: How long a destroy keeps retrying while the object is busy (seconds).
    BUSY_WAIT = 120.0

    def __init__(self, xapi, config, password=None):
        self.xapi = xapi
        self.config = config
        self.password = password

    def tag(self, cls, obj, note):
        """Mark `obj` (a VM snapshot or a VDI) as this tool's own."""
        self.xapi.call(cls + ".add_to_other_config", obj.ref, TAG_KEY, "%s %s" % (obj.uuid, note))

    def retry_busy(self, what, action):
        """Run `action()` until it stops failing with a busy code; treat gone as done."""
        delay, deadline = 0.2, time.monotonic() + self.BUSY_WAIT
        while True:
            try:
                return action()
            except (XapiFailure, XeFailed) as exc:
                code = error_code(exc)
                if code in GONE_CODES:
                    log.debug("%s: already gone", what)
                    return None
                if code not in BUSY_CODES or time.monotonic() > deadline:
                    raise
                log.debug("%s: %s, retrying in %.1fs", what, code, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

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

    def close(self):
        """Release what the transport holds (temporary files)."""


class ApiTransport(Transport):
    """XenAPI calls, and data streamed from XAPI's HTTP handlers straight to the file."""

    name = "api"
    BUFSIZE = 1 << 20

    def __init__(self, xapi, config, password=None):
        Transport.__init__(self, xapi, config, password)
        self.endpoint = xapi.endpoint

    # -- snapshots
    def snapshot_vm(self, vm, name, quiesce=False):
        if quiesce:
            try:
                return self.vm_obj(self.xapi.call("VM.snapshot_with_quiesce", vm.ref, name))
            except XapiFailure as exc:
                if exc.code != "MESSAGE_REMOVED":
                    raise
                log.warning("quiesced snapshots are not supported by this pool (MESSAGE_REMOVED): "
                            "taking a normal snapshot of %s", printable(name))
        return self.vm_obj(self.xapi.call("VM.snapshot", vm.ref, name))

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

    def backup_host(self, host, dest):
        return self.download("/host_backup", {}, dest, "backup of host %s" % host["name_label"],
                             endpoint=self.endpoint.with_host(host["address"]))

    def download(self, path, params, dest, what, endpoint=None, sparse=False):
        """Stream GET `path` into a new file `dest` under a task; return (bytes, sha256).

        XAPI sends no Content-Length, so a cut stream looks finished: success needs
        the end of the stream AND the task's status `success`.
        """
        task = self.xapi.call("task.create", "vmbackup: " + what, "")
        try:
            query = dict(params, session_id=self.xapi.ref, task_id=task)
            response, conn = self.open(endpoint or self.endpoint, "GET", path, query)
            try:
                nbytes, digest = self.stream(response, dest, what, sparse)
            finally:
                response.close()
                conn.close()
            record = self.wait_task(task, what)
            if record["status"] != "success":
                raise ExportFailed("%s failed: task %s: %s" % (
                    what, record["status"], xapi_error_text(record.get("error_info")) or "no reason"))
            return nbytes, digest
        except BaseException:
            self.cancel_task(task)
            raise
        finally:
            try:
                self.xapi.call("task.destroy", task)
            except VmBackupError as exc:
                log.debug("task.destroy: %s", exc)

    def open(self, endpoint, method, path, query, redirects=3):
        """Return (response, connection) for a 200 answer, following XAPI's 302 redirects."""
        target = path + "?" + urllib.parse.urlencode(query)
        for _ in range(redirects + 1):
            conn = endpoint.connection(timeout=self.config.stall_timeout)
            try:
                conn.request(method, target)
                response = conn.getresponse()
            except ssl.SSLError as exc:
                conn.close()
                raise ExportFailed("%s %s: TLS: %s" % (method, path, one_line(exc)))
            except CONNECTION_ERRORS as exc:
                conn.close()
                raise ExportFailed("%s %s on %s: %s" % (method, path, endpoint.url, one_line(exc)))
            if response.status in (301, 302, 303, 307) and response.getheader("Location"):
                location = response.getheader("Location")
                response.close()
                conn.close()
                parts = urllib.parse.urlsplit(location)
                endpoint = endpoint._replace(scheme=parts.scheme or endpoint.scheme,
                                             host=parts.hostname, port=parts.port)
                target = parts.path + ("?" + parts.query if parts.query else "")
                log.debug("%s %s redirected to %s", method, path, endpoint.url)
                continue
            if response.status != 200:
                snippet = response.read(2048).decode("utf-8", "replace")
                response.close()
                conn.close()
                raise ExportFailed("%s %s: HTTP %d %s: %s" % (method, path, response.status,
                                                               response.reason, one_line(snippet, 200)))
            return response, conn
        raise ExportFailed("%s %s: too many redirects" % (method, path))

    def stream(self, response, dest, what, sparse=False):
        """Copy the response body into a new file `dest`; return (bytes, sha256 hex).

        All-zero blocks of a raw disk are skipped with a seek, so the file stays sparse.
        """
        digest = hashlib.sha256()
        buf = bytearray(self.BUFSIZE)
        view = memoryview(buf)
        zero = bytes(self.BUFSIZE)
        total, last_log = 0, time.monotonic()
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as out:
            while True:
                try:
                    n = response.readinto(buf)
                except socket.timeout:
                    raise ExportStalled(what, self.config.stall_timeout)
                except CONNECTION_ERRORS as exc:
                    raise ExportFailed("%s: connection lost after %s: %s"
                                       % (what, human_size(total), one_line(exc)))
                if not n:
                    break
                chunk = view[:n]
                digest.update(chunk)
                if sparse and n == self.BUFSIZE and buf == zero:
                    out.seek(n, os.SEEK_CUR)
                else:
                    out.write(chunk)
                total += n
                if time.monotonic() - last_log > 60:
                    last_log = time.monotonic()
                    log.info("%s: %s so far", what, human_size(total))
            out.truncate(total)
            out.flush()
            os.fsync(out.fileno())
        return total, digest.hexdigest()

    def wait_task(self, task, what, timeout=None):
        """Return the task's record once it has left `pending`."""
        deadline = time.monotonic() + (timeout or self.config.stall_timeout)
        delay = 0.05
        while True:
            record = self.xapi.call("task.get_record", task)
            if record.get("status") not in ("pending", "cancelling"):
                return record
            if time.monotonic() > deadline:
                raise ExportFailed("%s: the task did not finish" % what)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def cancel_task(self, task):
        """Cancel a task that may still run, best effort (the export is being abandoned)."""
        try:
            if self.xapi.call("task.get_status", task) == "pending":
                self.xapi.call("task.cancel", task)
        except VmBackupError as exc:
            log.debug("task.cancel: %s", exc)


class XeTransport(Transport):
    """The xe command, as NAUbackup used it on the pool host; XenAPI only for reading and tags."""

    name = "xe"
    POLL = 0.5

    def __init__(self, xapi, config, password=None, xe_path=None):
        Transport.__init__(self, xapi, config, password)
        self.xe_path = xe_path
        self.connect_args = []
        self.pw_file = None
        endpoint = xapi.endpoint
        if not endpoint.is_local:
            # The password goes to xe in a 0600 file (-pwf), never on its command line.
            fd, self.pw_file = tempfile.mkstemp(prefix="vmbackup-xe-")
            with os.fdopen(fd, "w") as handle:
                handle.write((password or "") + "\n")
            self.connect_args = ["-s", endpoint.host, "-u", xapi.username, "-pwf", self.pw_file]
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

    def xe(self, command, *flags, **params):
        """Run xe and return its stdout; raise XeFailed with its stderr."""
        args = self.argv(command, *flags, **params)
        log.debug("run %s", args[:2] + [a for a in args[2:] if not a.startswith("-pw")])
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True)
        try:
            out, err = proc.communicate()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if proc.returncode != 0:
            raise XeFailed(args, proc.returncode, err or out)
        return out

    def xe_long(self, dest, what, command, **params):
        """Run a downloading xe command, aborting it if `dest` stops growing for stall_timeout."""
        args = self.argv(command, **params)
        log.debug("run %s", args[:2])
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err)
            try:
                size, moved = -1, time.monotonic()
                while proc.poll() is None:
                    time.sleep(self.POLL)
                    now_size = os.path.getsize(dest) if os.path.exists(dest) else 0
                    if now_size != size:
                        size, moved = now_size, time.monotonic()
                    elif time.monotonic() - moved > self.config.stall_timeout:
                        raise ExportStalled(what, self.config.stall_timeout)
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            if proc.returncode != 0:
                err.seek(0)
                raise XeFailed(args, proc.returncode, err.read().decode("utf-8", "replace"))
        fsync_path(dest)
        return os.path.getsize(dest), None

    # -- snapshots
    def snapshot_vm(self, vm, name, quiesce=False):
        if quiesce:
            try:
                uuid = self.xe("vm-snapshot-with-quiesce", uuid=vm.uuid, new_name_label=name).strip()
                return self.vm_obj(uuid=uuid)
            except XeFailed as exc:
                if exc.code != "MESSAGE_REMOVED" and "removed" not in exc.stderr.lower():
                    raise
                log.warning("quiesced snapshots are not supported by this pool (MESSAGE_REMOVED): "
                            "taking a normal snapshot of %s", printable(name))
        uuid = self.xe("vm-snapshot", uuid=vm.uuid, new_name_label=name).strip()
        return self.vm_obj(uuid=uuid)

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
        return self.xe_long(dest, "export of %s" % snap.uuid, "vm-export", uuid=snap.uuid,
                            filename=dest, compress=compress or "false")

    def export_vdi(self, vdi, dest, fmt):
        return self.xe_long(dest, "export of VDI %s" % vdi.uuid, "vdi-export", uuid=vdi.uuid,
                            filename=dest, format=fmt)

    def export_metadata(self, vm, dest):
        return self.xe_long(dest, "metadata export of %s" % vm.uuid, "vm-export", uuid=vm.uuid,
                            filename=dest, metadata=True)

    def dump_pool_db(self, dest):
        return self.xe_long(dest, "pool database dump", "pool-dump-database", file_name=dest)

    def backup_host(self, host, dest):
        return self.xe_long(dest, "backup of host %s" % host["name_label"], "host-backup",
                            host=host["uuid"], file_name=dest)

    def close(self):
        if self.pw_file and os.path.exists(self.pw_file):
            os.unlink(self.pw_file)


TRANSPORTS = {"api": ApiTransport, "xe": XeTransport}


def find_xe(config):
    """Return the xe binary to use, or None: xe_path, then /opt/xensource/bin/xe, then PATH."""
    if config.xe_path:
        return config.xe_path
    for path in DEFAULT_XE_PATHS:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("xe")


def make_transport(config, xapi, password):
    """Return the transport for this run: xe on the pool host when xe exists, else api."""
    name = config.transport
    xe_path = find_xe(config) if name in ("auto", "xe") else None
    if name == "auto":
        name = "xe" if (xapi.endpoint.is_local and xe_path) else "api"
    if name == "xe":
        if not xe_path or not os.access(xe_path, os.X_OK):
            raise ConfigError("transport=xe (%s): no xe binary found (xe_path=%s)"
                              % (config.where("transport"), config.xe_path or "-"))
        return XeTransport(xapi, config, password, xe_path)
    return ApiTransport(xapi, config, password)


# ---------------------------------------------------------------------------
# Metadata: vm-metadata.xml, NAUbackup's .cfg files, the manifest
# ---------------------------------------------------------------------------

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


def ova_xml_from_tar(path):
    """Return the ova.xml bytes of a metadata export (a tar holding ova.xml)."""
    try:
        with tarfile.open(path, "r:*") as archive:
            member = archive.extractfile("ova.xml")
            if member is None:
                raise KeyError("ova.xml")
            return member.read()
    except (tarfile.TarError, KeyError, OSError) as exc:
        raise ExportFailed("metadata export is not a tar with ova.xml: %s" % one_line(exc))


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
    write_text(os.path.join(folder, "vm-metadata.xml"), pretty)
    return "vm-metadata.xml"


def file_entry(folder, rel, digest=None):
    """Return the manifest entry {name, size, sha256} of a file in a backup folder."""
    path = os.path.join(folder, rel)
    return {"name": rel, "size": os.path.getsize(path), "sha256": digest or sha256_file(path)}


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


# ---------------------------------------------------------------------------
# Backing up one VM
# ---------------------------------------------------------------------------

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


class VmLog(logging.LoggerAdapter):
    """Log lines prefixed with the VM's name; remembers its warnings."""

    def __init__(self, name):
        logging.LoggerAdapter.__init__(self, log, {})
        self.prefix = "vm=%s: " % printable(name)
        self.warnings = []

    def process(self, msg, kwargs):
        return self.prefix + msg, kwargs

    def warning(self, msg, *args, **kwargs):
        self.warnings.append(msg % args if args else msg)
        logging.LoggerAdapter.warning(self, msg, *args, **kwargs)


class Context(typing.NamedTuple):
    """What every step of a run needs."""
    config: Config
    transport: Transport
    view: PoolView
    run_note: str               # host pid time, recorded in snapshot tags


def snapshot_label(vm_name, moment):
    """Return the name given to the tool's snapshots: vmbackup_<vm>_<stamp>."""
    return "vmbackup_%s_%s" % (printable(vm_name), stamp(moment))


class vm_snapshot:
    """`with vm_snapshot(ctx, vm, vlog) as snap:` a tagged snapshot, destroyed on every way out."""

    def __init__(self, ctx, vm, vlog, moment):
        self.ctx, self.vm, self.vlog, self.moment = ctx, vm, vlog, moment
        self.snap = None

    def __enter__(self):
        t = self.ctx.transport
        quiesce = self.ctx.config.quiesce or wants_quiesce(self.ctx.view.vms[self.vm.ref])
        began = time.monotonic()
        self.snap = t.snapshot_vm(Obj(self.vm.ref, self.vm.uuid),
                                  snapshot_label(self.vm.name, self.moment), quiesce)
        try:
            t.tag("VM", self.snap, self.ctx.run_note)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        self.vlog.info("snapshot %s taken in %.1fs", self.snap.uuid, time.monotonic() - began)
        return self.snap

    def __exit__(self, *exc):
        if self.snap is None:
            return False
        try:
            self.ctx.transport.destroy_snapshot(self.snap)
            self.ctx.transport.check_gone("VM", self.snap)
            self.vlog.info("snapshot %s destroyed", self.snap.uuid)
        except VmBackupError as err:
            self.vlog.error("could not destroy snapshot %s: %s (the next run retries)",
                            self.snap.uuid, err)
            if exc[0] is None:
                raise
        return False


class vdi_snapshot:
    """`with vdi_snapshot(ctx, disk, label, vlog) as snap:` a tagged VDI snapshot, always destroyed."""

    def __init__(self, ctx, disk, label, vlog):
        self.ctx, self.disk, self.label, self.vlog = ctx, disk, label, vlog
        self.snap = None

    def __enter__(self):
        t = self.ctx.transport
        self.snap = t.snapshot_vdi(Obj(self.disk.vdi_ref, self.disk.vdi["uuid"]), self.label)
        try:
            t.tag("VDI", self.snap, self.ctx.run_note)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self.snap

    def __exit__(self, *exc):
        if self.snap is None:
            return False
        try:
            self.ctx.transport.destroy_vdi(self.snap)
            self.ctx.transport.check_gone("VDI", self.snap)
        except VmBackupError as err:
            self.vlog.error("could not destroy VDI snapshot %s: %s (the next run retries)",
                            self.snap.uuid, err)
            if exc[0] is None:
                raise
        return False


def wants_quiesce(vm_record):
    """Return True if the VM asks for quiesced snapshots (other_config or tag vmbackup:quiesce)."""
    flag = (vm_record.get("other_config") or {}).get("vmbackup:quiesce", "")
    return flag.lower() in ("1", "true", "yes") or "vmbackup:quiesce" in (vm_record.get("tags") or ())


def new_backup_folder(vm_dir):
    """Create and return a new backup-YYYY-MM-DD-HHMMSS folder (waiting a second on a clash)."""
    for _ in range(3):
        moment = datetime.datetime.now().replace(microsecond=0)
        path = os.path.join(vm_dir, "backup-" + stamp(moment))
        try:
            os.mkdir(path, 0o777)
            return path, moment
        except FileExistsError:
            time.sleep(1.05 - datetime.datetime.now().microsecond / 1e6)
    raise BackupDirError("cannot create a new backup folder in %s" % vm_dir)


def export_vm_mode(ctx, plan, folder, moment, vlog):
    """vm-export: snapshot, leave out [NOBAK] disks, export the .xva; return file entries."""
    compress = ctx.config.compress
    dest = os.path.join(folder, safe_dirname(plan.vm.name) + {None: ".xva", "gzip": ".xva.gz",
                                                              "zstd": ".xva.zst"}[compress])
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
        with partial_file(dest) as tmp:
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
            with partial_file(dest) as tmp:
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


EXPORTERS = {"vm-export": export_vm_mode, "vdi-export": export_vdi_mode,
             "meta-export": lambda ctx, plan, folder, moment, vlog: []}


def estimate_size(plan):
    """Return the bytes a VM's export may take: its exported VDIs' physical utilisation."""
    return sum(int(d.vdi.get("physical_utilisation") or d.vdi.get("virtual_size") or 0)
               for d in plan.disks)


def backup_vm(ctx, plan, vlog):
    """Back up one VM into a new dated folder; return its VmResult; raise VmBackupError."""
    config, vm = ctx.config, plan.vm
    if plan.problems:
        raise ExportFailed("; ".join(plan.problems))
    began = time.monotonic()
    vm_dir = inside(config.backup_dir, safe_dirname(vm.name))
    os.makedirs(vm_dir, exist_ok=True)
    check_space(config, estimate_size(plan), "VM %s" % printable(vm.name))
    if config.pre_clean and vm.mode != "meta-export":
        prune_vm_backups(vm_dir, vm.max_backups - 1, drop_incomplete=False, vlog=vlog)
    folder, moment = new_backup_folder(vm_dir)
    vlog.info("%s to %s", vm.mode, folder)
    started = datetime.datetime.now()
    files = [file_entry(folder, rel) for rel in
             [save_vm_metadata(ctx.transport, Obj(vm.ref, vm.uuid), folder)]
             + write_cfg_files(folder, ctx.view, vm.ref)]
    exported = EXPORTERS[vm.mode](ctx, plan, folder, moment, vlog)
    record = ctx.view.vms[vm.ref]
    manifest = {
        "tool": "vmbackup", "version": __version__, "format": 1,
        "vm": {"name": vm.name, "uuid": vm.uuid, "power_state": record.get("power_state")},
        "mode": vm.mode, "transport": ctx.transport.name,
        "started": started.isoformat(), "finished": datetime.datetime.now().isoformat(),
        "compress": config.compress if vm.mode == "vm-export" else None,
        "vdi_format": config.vdi_export_format if vm.mode == "vdi-export" else None,
        "disks": [{"device": d.device, "userdevice": d.userdevice, "vdi_uuid": d.vdi["uuid"],
                   "name_label": d.vdi.get("name_label", ""),
                   "virtual_size": int(d.vdi.get("virtual_size", 0)),
                   "file": (disk_file_name(vm.name, d, config.vdi_export_format)
                            if vm.mode == "vdi-export" else None)} for d in plan.disks],
        "skipped_disks": [d.device for d in plan.skipped],
        "files": files + exported,
        "pool": pool_info(ctx.view),
    }
    write_text(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    write_text(os.path.join(folder, SUCCESS_MARKER), "")
    fsync_dir(folder)
    prune_vm_backups(vm_dir, vm.max_backups, vlog=vlog)
    total = sum(f["size"] for f in exported)
    return VmResult(vm.name, vm.uuid, vm.mode, "warning" if vlog.warnings else "success", folder,
                    total, time.monotonic() - began, "; ".join(vlog.warnings))


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
        vlog.error("FAILED: %s", message)
        result = VmResult(vm.name, vm.uuid, vm.mode, "error", None, 0,
                          time.monotonic() - began, message)
    except Exception as exc:  # noqa: BLE001 - a bug met by one VM must not stop the others
        message = "internal error: %s: %s" % (type(exc).__name__, one_line(exc))
        vlog.error("FAILED: %s (run with -v for the traceback)", message)
        vlog.debug("traceback", exc_info=True)
        result = VmResult(vm.name, vm.uuid, vm.mode, "error", None, 0,
                          time.monotonic() - began, message)
    if result.status == "error":
        status_log.line(vm.mode, "end", "%s-FAIL %s" % (vm.mode.upper(), printable(vm.name)))
    else:
        status_log.line(vm.mode, "end", "SUCCESS %s,elapse:%d size:%.1fG" % (
            printable(vm.name), round(result.seconds / 60.0), result.bytes / 2.0 ** 30))
    return result


# ---------------------------------------------------------------------------
# Pool database and host backups
# ---------------------------------------------------------------------------

def backup_dated_file(ctx, folder_name, file_name, what, fetch):
    """Write one pool_db_/host_ backup file via `fetch(tmp)`, prune its folder; return VmResult."""
    began = time.monotonic()
    try:
        folder = inside(ctx.config.backup_dir, safe_dirname(folder_name))
        os.makedirs(folder, exist_ok=True)
        dest = os.path.join(folder, file_name)
        with partial_file(dest) as tmp:
            nbytes, _ = fetch(tmp)
            if not nbytes:
                raise ExportFailed("%s is empty: XAPI sent nothing" % what)
        prune_dated_files(folder, ctx.config.max_backups)
        log.info("%s: %s (%s)", what, dest, human_size(nbytes))
        return VmResult(what, "", "pool", "success", dest, nbytes, time.monotonic() - began)
    except (VmBackupError, OSError) as exc:
        log.error("%s FAILED: %s", what, exc)
        return VmResult(what, "", "pool", "error", None, 0, time.monotonic() - began, str(exc))


def backup_pool_db(ctx, moment):
    """Dump the pool database to METADATA_<master>/pool_db_<stamp>.dump."""
    master = ctx.view.master.get("hostname") or ctx.view.master.get("name_label", "master")
    return backup_dated_file(ctx, "METADATA_" + master,
                             "pool_db_%s.dump" % moment.strftime("%Y%m%d-%H%M%S"),
                             "pool database", ctx.transport.dump_pool_db)


def backup_hosts(ctx, moment):
    """Back up every host's dom0 to HOST_<hostname>/host_<stamp>.xbk (one request per host)."""
    results = []
    for ref, host in sorted(ctx.view.hosts.items(), key=lambda item: item[1].get("name_label", "")):
        name = host.get("hostname") or host.get("name_label", ref)
        results.append(backup_dated_file(
            ctx, "HOST_" + name, "host_%s.xbk" % moment.strftime("%Y%m%d-%H%M%S"),
            "host backup of %s" % name, lambda tmp, h=host: ctx.transport.backup_host(h, tmp)))
    return results


# ---------------------------------------------------------------------------
# The run and its report
# ---------------------------------------------------------------------------

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


def run_note():
    """Return what the tool's tags record about this run: 'host pid time'."""
    return "%s %d %s" % (socket.gethostname(), os.getpid(),
                         datetime.datetime.now().replace(microsecond=0).isoformat())


#: A tool snapshot older than this is a leftover whoever made it (XAPI caps an export at 24 h).
LEFTOVER_AGE = datetime.timedelta(hours=25)


def is_leftover(record, now=None):
    """Return True if a VM/VDI record is a snapshot this tool made and no live run still uses.

    It must be a snapshot, carry our tag whose first word is its own uuid (so a restored
    copy or a person's snapshot of one never qualifies), and its run must be dead: a pid
    gone on this host, or older than LEFTOVER_AGE.
    """
    if not record.get("is_a_snapshot"):
        return False
    words = (record.get("other_config") or {}).get(TAG_KEY, "").split()
    if len(words) < 4 or words[0] != record.get("uuid"):
        return False
    host, pid, when = words[1], words[2], words[3]
    if host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
        return True
    try:
        made = datetime.datetime.strptime(when[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return False
    return (now or datetime.datetime.now()) - made > LEFTOVER_AGE


def clean_leftovers(ctx):
    """Destroy the tool's snapshots and VDI snapshots left by a killed run; return how many."""
    count = 0
    for ref, rec in ctx.view.vms.items():
        if is_leftover(rec):
            log.warning("destroying leftover snapshot %r (%s) of an interrupted run",
                        printable(rec["name_label"]), rec["uuid"])
            try:
                ctx.transport.destroy_snapshot(Obj(ref, rec["uuid"]))
                count += 1
            except VmBackupError as exc:
                log.error("cannot destroy leftover snapshot %s: %s", rec["uuid"], exc)
    for ref, rec in ctx.view.vdis.items():
        if is_leftover(rec) and not rec.get("VBDs"):
            log.warning("destroying leftover disk snapshot %r (%s) of an interrupted run",
                        printable(rec.get("name_label", "")), rec["uuid"])
            try:
                ctx.transport.destroy_vdi(Obj(ref, rec["uuid"]))
                count += 1
            except VmBackupError as exc:
                log.error("cannot destroy leftover disk snapshot %s: %s", rec["uuid"], exc)
    return count


def exit_code_for(results, warnings=()):
    """Return the run's exit code: the most severe of its results (borg's max_ec)."""
    statuses = {r.status for r in results}
    if "error" in statuses:
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


def select_for_run(config, view):
    """Return the Selection for a run (metadata_only turns every VM into meta-export)."""
    selection = select_vms(view.vms, config.selectors, config.max_backups)
    if config.metadata_only:
        selection = selection._replace(vms=[vm._replace(mode="meta-export") for vm in selection.vms])
    return selection


def run_backup(config, endpoint, password, inv):
    """The run: check, lock, log in, clean leftovers, back up each VM, pool, hosts, report."""
    started = datetime.datetime.now().replace(microsecond=0)
    check_backup_dir(config)
    status_log = StatusLog(config.status_log, config.where("status_log"))
    results, warnings, selection, code = [], [], None, EXIT_ERROR
    old_umask = os.umask(config.umask)
    try:
        with RunLock(config.backup_dir):
            status_log.line(PROG, "begin")
            try:
                xapi = login(endpoint, config.username, password)
                try:
                    transport = make_transport(config, xapi, password)
                    try:
                        view = read_pool(xapi)
                        ctx = Context(config, transport, view, run_note())
                        clean_leftovers(ctx)
                        selection = select_for_run(config, view)
                        warnings = list(selection.warnings)
                        for warning in warnings:
                            log.warning("%s", warning)
                        results = [VmResult("selection", "", "-", "error", message=e)
                                   for e in selection.errors]
                        for message in selection.errors:
                            log.error("%s", message)
                        log.info("%d VMs selected, transport %s", len(selection.vms), transport.name)
                        for vm in selection.vms:
                            results.append(backup_vm_safely(ctx, plan_vm(vm, view), status_log))
                        if config.pool_db_backup:
                            results.append(backup_pool_db(ctx, started))
                        if config.host_backup:
                            results.extend(backup_hosts(ctx, started))
                    finally:
                        transport.close()
                finally:
                    xapi.logout()
                code = exit_code_for(results, warnings)
            finally:
                word = {EXIT_OK: "SUCCESS", EXIT_WARNING: "WARNING"}.get(code, "ERROR")
                status_log.line(PROG, "end", word, tally(results, warnings))
    finally:
        os.umask(old_umask)
    log_df(config.backup_dir, "after")
    log.info("done: %s, exit %d", tally(results, warnings), code)
    if inv.json:
        write_json(inv.json, run_summary(config, selection, results, warnings, started, code))
    return code


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

EXIT_STATUS_TEXT = __doc__[__doc__.index("EXIT STATUS"):]

EXAMPLES = """\
examples:
  vmbackup.py -c /etc/vmbackup/weekly.cfg            back up what weekly.cfg selects
  vmbackup.py -c weekly.cfg --preview                show what it would do, change nothing
  vmbackup.py -e 'PRD-.*' -x PRD-PRINT -d /backups   all VMs starting PRD-, except PRD-PRINT
  vmbackup.py -E 'DEV-web3:7:xvda;xvdb' -d /backups  disks xvda and xvdb of DEV-web3, keep 7
  vmbackup.py -s https://pool-master --password-file /root/.xapi.pw --tls-fingerprint SHA256 -e web01

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
    verbosity: int = 0
    legacy: bool = False
    target: typing.Optional[str] = None   # create-password-file=FILE


def build_parser():
    """Return the modern argparse parser (backup is the default command)."""
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Back up the VMs of a XenServer / XCP-ng pool: snapshot, export, metadata, "
                    "retention, pool database and host backups.",
        epilog=EXAMPLES + "\n" + EXIT_STATUS_TEXT)
    opt = parser.add_argument
    opt("-c", "--config", metavar="FILE", help="NAUbackup-style key=value config file")
    opt("-e", "--vm-export", action="append", default=[], metavar="SEL",
        help="NAME_OR_REGEX[:MAX] to back up as .xva (repeatable)")
    opt("-E", "--vdi-export", action="append", default=[], metavar="SEL",
        help="NAME_OR_REGEX[:MAX[:DEV;DEV]] to back up disk by disk (repeatable)")
    opt("-m", "--meta-export", action="append", default=[], metavar="SEL",
        help="NAME_OR_REGEX[:MAX] to back up metadata only (repeatable)")
    opt("-x", "--exclude", action="append", default=[], metavar="SEL",
        help="NAME_OR_REGEX never to back up (repeatable; wins over every selector)")
    opt("-d", "--backup-dir", metavar="DIR")
    opt("--max-backups", type=int, metavar="N", help="successful backups kept per VM")
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
    opt("-s", "--server", metavar="URL",
        help="https://host, http://host or unix:/path (default: this host's local xapi)")
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
    opt("--space-threshold", metavar="PERCENT", help="minimum %% free in backup_dir")
    opt("--retries", metavar="N", help="retries of a failed export (new snapshot each time)")
    opt("--stall-timeout", metavar="SECONDS", help="abort an export that makes no progress")
    opt("--umask", metavar="OCTAL", help="umask for backup files (default 077)")
    opt("--status-log", metavar="FILE", help="append NAUbackup-style status lines to FILE")
    opt("--ignore-extra-keys", action="store_true", help="skip unknown config keys")
    opt("--json", metavar="FILE", help="write the run summary (or preview) as JSON ('-': stdout)")
    opt("-q", "--quiet", action="count", default=0, help="less output")
    opt("-v", "--verbose", action="count", default=0, help="more output (-vv: debug)")
    opt("--version", action="version", version="%(prog)s " + __version__)
    return parser


#: Modern option -> (config key, parser of its text).
CLI_SETTINGS = {
    "backup_dir": ("backup_dir", parse_text),
    "max_backups": ("max_backups", lambda v: parse_int(v, 1)),
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
    "umask": ("umask", parse_umask),
    "status_log": ("status_log", parse_text),
}


def parse_modern(argv):
    """Return the Invocation of a modern command line; raise UsageError on bad values."""
    args = build_parser().parse_args(argv)
    values = {}
    for option, (key, parse) in CLI_SETTINGS.items():
        raw = getattr(args, option)
        if raw is None:
            continue
        try:
            values[key] = parse(raw)
        except ValueError as exc:
            raise UsageError("--%s %s: %s" % (option.replace("_", "-"), raw, exc))
    selectors = []
    for option, mode in (("vdi_export", "vdi-export"), ("vm_export", "vm-export"),
                         ("meta_export", "meta-export"), ("exclude", "exclude")):
        for text in getattr(args, option):
            try:
                selectors.append(parse_selector(text, mode, "--%s" % mode))
            except ValueError as exc:
                raise UsageError("--%s %s: %s" % (mode, text, exc))
    return Invocation("backup", config_file=args.config, cli_values=values,
                      cli_selectors=tuple(selectors), preview=args.preview,
                      ignore_extra_keys=args.ignore_extra_keys, json=args.json,
                      verbosity=args.verbose - args.quiet)


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


def is_legacy(argv):
    """Return True when argv is NAUbackup's positional form rather than the modern one."""
    return bool(argv) and not argv[0].startswith("-") and argv[0] not in COMMANDS


def load_settings(inv):
    """Return (Config, password) for a backup Invocation: defaults < file < command line."""
    parsed = None
    if inv.config_file:
        parsed = read_config_file(inv.config_file, inv.ignore_extra_keys)
    values = dict(inv.cli_values)
    env_server = os.environ.get("VMBACKUP_SERVER")
    if env_server and "server" not in values and not (parsed and "server" in parsed.values):
        values["server"] = env_server
    config = build_config(parsed, values, inv.cli_selectors, inv.config_file)
    if not inv.legacy and not any(s.mode != "exclude" for s in config.selectors) \
            and not config.pool_db_backup and not config.host_backup:
        raise UsageError("nothing to back up: give -c FILE, -e/-E/-m SELECTOR, "
                         "--pool-db-backup or --host-backup (see --help)")
    password = inv.password
    if config.password_file:
        password = read_password_file(config.password_file)
    elif password is None:
        password = os.environ.get("VMBACKUP_PASSWORD")
    return config, password


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


def cmd_backup(inv):
    """Run (or preview) a backup; return the exit code."""
    config, password = load_settings(inv)
    endpoint = parse_endpoint(config.server, config.tls_ca_file, config.tls_fingerprint,
                              config.tls_insecure)
    if config.tls_insecure and not endpoint.is_local and not config.tls_fingerprint:
        log.warning("TLS certificate verification is off (tls_insecure): anyone on the path "
                    "can read the backups; prefer tls_fingerprint")
    if inv.preview:
        return preview(config, endpoint, password, inv.json)
    return run_backup(config, endpoint, password, inv)


def dispatch(argv):
    """Parse argv, run the command, return its exit code."""
    if is_legacy(argv):
        inv = parse_legacy(argv)
    else:
        if argv and argv[0] == "backup":
            argv = argv[1:]
        elif argv and argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        inv = parse_modern(argv)
    setup_logging(inv.verbosity)
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
COMMANDS = collections.OrderedDict([("backup", None)])


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def _raise_terminated(signum, frame):
    raise Terminated(signal.Signals(signum).name)


def main(argv=None):
    """Run vmbackup with `argv` (default sys.argv[1:]); return the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = any(a in ("-v", "-vv", "--verbose") for a in argv)
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
        sys.stderr.write("%s: terminated by %s; snapshots cleaned up\n" % (PROG, exc.args[0]))
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
