"""The entry point: picks the command, installs the signal handlers, turns errors into exit codes.

Owns: main, dispatch, COMMANDS. Nothing imports it.
Imports: everything.
"""

import collections
import signal
import sys
import traceback

from vmbackup.commands.backup import (
    LEGACY_EXAMPLES, LEGACY_USAGE, cmd_backup, parse_legacy, parse_modern)
from vmbackup.commands.diff import cmd_diff
from vmbackup.commands.list import cmd_list
from vmbackup.commands.options import EXIT_STATUS_TEXT, verbosity
from vmbackup.commands.restore import cmd_restore
from vmbackup.commands.verify import cmd_verify
from vmbackup.config import example_config, write_password_file
from vmbackup.errors import (
    EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, PROG, Terminated, VmBackupError, log)
from vmbackup.report import setup_logging
from vmbackup.util import one_line


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
