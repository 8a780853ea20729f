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
    choice, parse_bool, parse_compress, parse_fingerprint, parse_int, parse_percent,
    parse_rate, parse_text, parse_umask)


#: NAUbackup's documented defaults, kept so its config files mean the same here.
DEFAULT_BACKUP_DIR = "/snapshots/BACKUPS"


DEFAULT_STATUS_LOG = "/snapshots/NAUbackup/status.log"


DEFAULT_MAX_BACKUPS = 4


#: A selector made only of these characters is a plain name, compared literally.
PLAIN_NAME_RE = re.compile(r"^[A-Za-z0-9 _-]+$")


#: Selection modes, strongest first: a VM chosen for vdi-export is not also
#: vm-exported, and a full export already carries the metadata.
MODES = ("vdi-export", "vm-export", "meta-export")


Setting = collections.namedtuple("Setting", "default parse help")


#: Every scalar configuration key: default, parser, and the line example.cfg shows.
SETTINGS = collections.OrderedDict([
    ("backup_dir", Setting(DEFAULT_BACKUP_DIR, parse_text,
                           "folder that receives the backups (must exist)")),
    ("max_backups", Setting(DEFAULT_MAX_BACKUPS, lambda v: parse_int(v, 1),
                            "successful backups kept per VM (>= 1)")),
    ("max_meta_backups", Setting(None, lambda v: parse_int(v, 1),
                                 "metadata-only backups kept per VM, counted apart from the "
                                 "backups with disk data (default: max_backups)")),
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
    ("jobs", Setting(1, lambda v: parse_int(v, 1), "VMs backed up at once (each its own snapshot)")),
    ("jobs_per_host", Setting(2, lambda v: parse_int(v, 0),
                              "exports one host serves at once (0: no limit besides jobs)")),
    ("jobs_per_sr", Setting(2, lambda v: parse_int(v, 0),
                            "exports reading one SR at once (0: no limit besides jobs)")),
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
    match = _SELECTOR_TAIL["vdi-export" if mode == "vdi-export" else "other"].match(raw)
    name, max_text = match.group("name"), match.group("max")
    devs = match.groupdict().get("devs") or ""
    bad = _BAD_MAX["vdi-export" if mode == "vdi-export" else "other"].match(name)
    if bad and not PLAIN_NAME_RE.match(name):
        raise ValueError("MAX_BACKUPS %r in %r is not a whole number (NAME_OR_REGEX[:MAX%s])"
                         % (bad.group("max"), raw, "[:DEV;DEV]" if mode == "vdi-export" else ""))
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
    max_meta_backups: typing.Optional[int] = None
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
        "# vm-export, and the last line for the same VM sets its MAX_BACKUPS. Order does not matter.",
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
