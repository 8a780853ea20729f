"""What the commands share on the command line: settings options and the exit status text.

Owns: EXIT_STATUS_TEXT, CLI_SETTINGS.
Imports: util.
"""

from vmbackup import __doc__
from vmbackup.util import (
    choice, parse_compress, parse_fingerprint, parse_int, parse_percent, parse_text,
    parse_umask)


EXIT_STATUS_TEXT = __doc__[__doc__.index("EXIT STATUS"):]


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
