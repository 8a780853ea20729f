"""The settings: NAUbackup's .cfg keys, the selectors, the merged Config, example.cfg, password files.

Owns: SETTINGS (every key, its default, parser and help), Selector and parse_selector,
Config, parse_config/read_config_file/build_config, example_config,
read_password_file/write_password_file.
Imports: errors, util.
"""

import base64
import collections
import os
import re
import stat
import typing

from vmbackup.errors import ConfigError, log
from vmbackup.util import (
    choice, parse_addresses, parse_bool, parse_compress, parse_fingerprint, parse_int,
    parse_percent, parse_rate, parse_text, parse_umask)


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
