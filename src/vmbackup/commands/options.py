"""What the commands share on the command line, so each is declared once.

Owns: EXIT_STATUS_TEXT; the argparse parents every command that talks to a pool
(connection_options) or writes a report (output_options) is built from;
CLI_SETTINGS and settings_from_args (parsed options -> config values);
load_config (defaults < file < environment < command line, and the password);
verbosity (the one count of -v/-q).
Imports: errors, util, config.
"""

import argparse
import os
import re

from vmbackup import __doc__
from vmbackup.config import build_config, read_password_file
from vmbackup.errors import UsageError, VmBackupError
from vmbackup.util import (
    choice, parse_compress, parse_fingerprint, parse_int, parse_percent, parse_rate,
    parse_text, parse_umask)


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
