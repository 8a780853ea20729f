"""Verifying backups without a server: each file, each folder, each dated file, as typed results.

Owns: check_file; the typed results (Problem, FileCheck, CheckResult, each with to_json);
check_backup/verify_backup/verify_dated_file/verify_single_file, verify_targets,
verify_lines, verify_exit_code.
Imports: errors, util, store, metadata, chain, formats.
"""

import collections
import gzip
import os
import typing
import xml.parsers.expat
import zlib

from vmbackup.chain import DELTA_MODE, verify_chain
from vmbackup.errors import BackupDirError, BadFile, EXIT_ERROR, EXIT_OK, EXIT_WARNING, UsageError
from vmbackup.formats.tar import TarStream
from vmbackup.formats.vhd import check_vhd
from vmbackup.formats.xva import _int, check_xva_file, parse_ova_xml
from vmbackup.store import (
    LEGACY_SUCCESS_MARKERS, MANIFEST, METADATA_FILE, backup_folders, dated_files, file_kind,
    inside, parse_backup_name, parse_dated_file, read_backup_folder)
from vmbackup.util import human_size, sha256_file


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
