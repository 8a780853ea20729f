"""`vmbackup.py [backup]`: the modern and NAUbackup command lines of a backup run.

Owns: build_parser/parse_modern, parse_legacy, Invocation, load_settings, cmd_backup.
Imports: errors, util, config, xapi, run, commands.options.
"""

import argparse
import os
import re
import typing

from vmbackup import __version__
from vmbackup.commands.options import (
    EXIT_STATUS_TEXT, connection_options, load_config, output_options, settings_from_args)
from vmbackup.config import (
    LEGACY_WORD_KEYS, Selector, build_config, normalise_key, parse_selector,
    read_config_file, read_password_file)
from vmbackup.errors import PROG, UsageError, VmBackupError, log
from vmbackup.logsinks import log_sinks
from vmbackup.notify import test_mail
from vmbackup.run import preview, report_cannot_start, run_backup
from vmbackup.util import parse_bool
from vmbackup.xapi import parse_endpoint


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
