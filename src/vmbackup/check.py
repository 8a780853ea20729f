"""Verifying backups without a server: each file, each folder, each dated file.

Owns: check_file, verify_backup/verify_dated_file/verify_single_file, verify_targets,
verify_lines, verify_exit_code.
Imports: errors, util, store, metadata, formats.
"""

import collections
import gzip
import os
import xml.parsers.expat
import zlib

from vmbackup.errors import BackupDirError, BadFile, EXIT_ERROR, EXIT_OK, EXIT_WARNING, UsageError
from vmbackup.formats.tar import TarStream
from vmbackup.formats.vhd import check_vhd
from vmbackup.formats.xva import _int, check_xva_file, parse_ova_xml
from vmbackup.metadata import file_kind, read_cfg, read_manifest
from vmbackup.store import (
    MANIFEST, SUCCESS_MARKER, SUCCESS_MARKERS, backup_folders, dated_files, inside,
    parse_backup_name, parse_dated_file)
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


def _new_result(folder):
    """Return the empty verify result of a backup folder."""
    when = parse_backup_name(os.path.basename(folder))
    return collections.OrderedDict([
        ("path", folder), ("display", display_path(folder)),
        ("vm", os.path.basename(os.path.dirname(folder))), ("name", os.path.basename(folder)),
        ("date", when.isoformat() if when else None), ("kind", "vm"), ("mode", None),
        ("legacy", False), ("complete", False), ("status", "good"),
        ("problems", []), ("unchecked", []), ("notes", []), ("files", [])])


def display_path(path):
    """Return how verify names a backup folder or a file: its last two path components."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    return "/".join(p for p in parts[-2:] if p)


def final_status(result):
    """Return a result's status: bad (any problem), incomplete, unchecked, or good."""
    if result["problems"]:
        return "bad"
    if not result["complete"]:
        return "incomplete"
    if result["unchecked"]:
        return "unchecked"
    return "good"


def _problem(result, rel, message):
    result["problems"].append({"file": rel, "message": message})


def legacy_raw_size(folder):
    """Return the virtual size NAUbackup recorded for the root disk (DISK-*/vdi.cfg), or None."""
    try:
        names = sorted(n for n in os.listdir(folder) if n.startswith("DISK-"))
    except OSError:
        return None
    for name in names:
        vbd = read_cfg(os.path.join(folder, name, "vbd.cfg"))
        vdi = read_cfg(os.path.join(folder, name, "vdi.cfg"))
        if vbd.get("userdevice", "0") == "0" and vdi.get("virtual_size", "").isdigit():
            return int(vdi["virtual_size"])
    return None


def _check_listed_file(result, folder, entry, sizes, quick=False):
    """Check one manifest file entry into `result`: size, then (unless `quick`) SHA-256 and format."""
    rel = str(entry.get("name", ""))
    try:
        path = inside(folder, rel)
    except BackupDirError:
        return _problem(result, rel, "file name leaves the backup folder: refused")
    if not os.path.isfile(path):
        return _problem(result, rel, "missing (listed in %s)" % MANIFEST)
    size = os.path.getsize(path)
    record = {"name": rel, "size": size, "status": "good"}
    result["files"].append(record)
    if size != entry.get("size"):
        record["status"] = "bad"
        return _problem(result, rel, "size is %d bytes, the manifest says %s%s"
                        % (size, entry.get("size"),
                           " (truncated?)" if size < _int(entry.get("size"), size) else ""))
    if quick:
        return None
    problems, unchecked, digest = check_file(path, file_kind(rel), sizes.get(rel), True)
    if digest != entry.get("sha256"):
        problems.insert(0, "sha256 mismatch: the file changed since the backup")
    for message in problems:
        _problem(result, rel, message)
    for message in unchecked:
        result["unchecked"].append({"file": rel, "message": message})
    record["status"] = "bad" if problems else "unchecked" if unchecked else "good"


def verify_backup(folder, quick=False):
    """Return the verify result (a dict; "status": good|bad|incomplete|unchecked) of a backup folder.

    Checks the manifest, the success marker, every listed file's size and
    SHA-256 and its format. quick=True checks sizes only (no file is read).
    A legacy NAUbackup folder (no manifest) has its files checked by format.
    """
    result = _new_result(folder)
    names = set(os.listdir(folder))
    result["complete"] = SUCCESS_MARKER in names
    try:
        manifest = read_manifest(folder)
    except BadFile as exc:
        _problem(result, MANIFEST, str(exc))
        manifest = {}
    if manifest:
        result["mode"] = manifest.get("mode")
        result["vm"] = (manifest.get("vm") or {}).get("name", result["vm"])
        sizes = {d.get("file"): _int(d.get("virtual_size"), None)
                 for d in manifest.get("disks", ()) if d.get("file")}
        listed = [str(f.get("name", "")) for f in manifest["files"] if isinstance(f, dict)]
        for entry in manifest["files"]:
            if not isinstance(entry, dict):
                _problem(result, MANIFEST, "a files entry is not an object")
                continue
            _check_listed_file(result, folder, entry, sizes, quick)
        _check_mode(result, manifest, listed)
    elif manifest is not None:
        pass    # a broken manifest: nothing to check the files against
    elif not result["complete"] and "(" not in result["name"]:
        result["notes"].append("no %s and no success marker: the backup did not finish" % MANIFEST)
    else:
        result["legacy"] = True
        result["complete"] = bool(names.intersection(SUCCESS_MARKERS))
        result["notes"].append("legacy NAUbackup backup: no manifest")
        _check_legacy_files(result, folder, names, quick)
    result["status"] = final_status(result)
    return result


def _check_mode(result, manifest, listed):
    """Check that the manifest lists the files its mode must have."""
    mode = manifest.get("mode")
    if mode == "vm-export" and not any(file_kind(n) == "xva" for n in listed):
        _problem(result, MANIFEST, "a vm-export backup without an .xva file")
    if mode == "vdi-export":
        for disk in manifest.get("disks", ()):
            if disk.get("file") not in listed:
                _problem(result, MANIFEST, "disk %s: its file %r is not in the backup"
                         % (disk.get("device"), disk.get("file")))
    if "vm-metadata.xml" not in listed:
        _problem(result, MANIFEST, "no vm-metadata.xml in the backup")


def _check_legacy_files(result, folder, names, quick):
    """Check a NAUbackup folder's files by their format (no manifest: no sizes or SHA-256 to compare)."""
    raw_size = legacy_raw_size(folder)
    kinds = [(n, file_kind(n)) for n in sorted(names - set(SUCCESS_MARKERS))
             if os.path.isfile(os.path.join(folder, n))]
    modes = {"xva": "vm-export", "vhd": "vdi-export", "raw": "vdi-export"}
    result["mode"] = next((modes[k] for _, k in kinds if k in modes), "meta-export")
    for name, kind in kinds:
        path = os.path.join(folder, name)
        record = {"name": name, "size": os.path.getsize(path), "status": "good"}
        result["files"].append(record)
        if kind is None or quick:
            continue
        problems, unchecked, _ = check_file(path, kind, raw_size if kind in ("raw", "vhd") else None)
        for message in problems:
            _problem(result, name, message)
        for message in unchecked:
            result["unchecked"].append({"file": name, "message": message})
        record["status"] = "bad" if problems else "unchecked" if unchecked else "good"


def verify_dated_file(path):
    """Return the verify result of a pool_db_*.dump or host_*.xbk file."""
    name = os.path.basename(path)
    when = parse_dated_file(name)
    result = collections.OrderedDict([
        ("path", path), ("display", display_path(path)),
        ("vm", None), ("name", name), ("date", when.isoformat() if when else None),
        ("kind", "pool-db" if name.startswith("pool_db_") else "host"), ("mode", None),
        ("legacy", False), ("complete", True), ("status", "good"),
        ("problems", []), ("unchecked", []), ("notes", []),
        ("files", [{"name": name, "size": os.path.getsize(path), "status": "good"}])])
    check = check_pool_dump if result["kind"] == "pool-db" else check_host_backup
    for message in check(path):
        _problem(result, "", message)
    result["status"] = final_status(result)
    result["files"][0]["status"] = result["status"]
    return result


def verify_single_file(path):
    """Return the verify result of one loose .xva/.vhd/.raw file (format checks only)."""
    result = _new_result(os.path.dirname(os.path.abspath(path)))
    name = os.path.basename(path)
    result.update(path=path, display=display_path(path), name=name, kind="file", complete=True)
    problems, unchecked, _ = check_file(path, file_kind(name))
    for message in problems:
        _problem(result, "", message)
    for message in unchecked:
        result["unchecked"].append({"file": "", "message": message})
    result["status"] = final_status(result)
    result["files"] = [{"name": name, "size": os.path.getsize(path), "status": result["status"]}]
    return result


def verify_targets(path):
    """Return [(kind, path)] to verify for a backup, a VM folder, backup_dir or a file; raise UsageError."""
    if os.path.isfile(path):
        name = os.path.basename(path)
        if parse_dated_file(name):
            return [("dated", path)]
        if name in (MANIFEST, SUCCESS_MARKER):
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
    """Return the report lines of one verify result: one per bad file, then the verdict."""
    lines = []
    shown = result["display"]
    for item in result["problems"]:
        where = shown + ("/" + item["file"] if item["file"] else "")
        lines.append("BAD %s: %s" % (where, item["message"]))
    for item in result["unchecked"]:
        where = shown + ("/" + item["file"] if item["file"] else "")
        lines.append("UNCHECKED %s: %s" % (where, item["message"]))
    status = result["status"]
    detail = "; ".join(result["notes"])
    if status == "incomplete":
        lines.append("INCOMPLETE %s: %s" % (shown, detail or "no success marker: the backup "
                                            "did not finish"))
    elif verbosity >= 0 and status in ("good", "unchecked") or verbosity > 0:
        total = sum(f["size"] for f in result["files"])
        what = ", ".join(x for x in (result["mode"], "%d file%s" % (
            len(result["files"]), "" if len(result["files"]) == 1 else "s"), human_size(total),
            detail) if x)
        lines.append("%s %s: %s" % (status, shown, what))
    if verbosity > 0:
        lines += ["  %-9s %s (%s)" % (f["status"], f["name"], human_size(f["size"]))
                  for f in result["files"]]
    return lines


def verify_exit_code(results):
    """Return verify's exit code: 2 if any backup is bad or incomplete, 1 if any unchecked, else 0."""
    states = {r["status"] for r in results}
    if states & {"bad", "incomplete"}:
        return EXIT_ERROR
    return EXIT_WARNING if "unchecked" in states else EXIT_OK
