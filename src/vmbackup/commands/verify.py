"""`vmbackup.py verify`: check backups without a server.

Imports: errors, util, report, check.
"""

import argparse
import collections
import sys

from vmbackup.check import (
    VERIFIERS, unreadable_result, verify_exit_code, verify_lines, verify_targets)
from vmbackup.errors import PROG
from vmbackup.report import write_json
from vmbackup.util import printable


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
