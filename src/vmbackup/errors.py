"""The errors vmbackup raises, each carrying its message and exit code, and the exit codes.

Owns: EXIT_* codes, the `log` logger, VmBackupError and its kinds (usage, config,
login, backup_dir, lock, XAPI calls, exports, restore, broken VHD chains), Terminated, BadFile.
Imports: the standard library only. Every other module may import it.
"""

import logging



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
