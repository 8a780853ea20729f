"""The backup directory on disk: folder names, paths kept inside it, the run lock, free space.

Owns: safe_dirname, inside, stamp and the backup-folder/dated-file names,
SUCCESS_MARKER(S), MANIFEST, vm_backups/backup_folders/dated_files, RunLock,
check_backup_dir/check_space/log_df, folder_size.
Imports: errors, util, config.
"""

import datetime
import os
import re
import socket

from vmbackup.errors import BackupDirError, LockHeld, log
from vmbackup.util import free_space, human_size


def check_backup_dir_readonly(config):
    """Return problems with backup_dir found without writing anything (for preview)."""
    path = config.backup_dir
    where = config.where("backup_dir")
    if not os.path.exists(path):
        return ["backup_dir=%s (%s): the folder does not exist" % (path, where)]
    if not os.path.isdir(path):
        return ["backup_dir=%s (%s): not a folder" % (path, where)]
    if not os.access(path, os.W_OK | os.X_OK):
        return ["backup_dir=%s (%s): not writable" % (path, where)]
    return []


#: Characters that break SMB/NTFS shares or paths; NAUbackup's ':' in folder
#: names broke SMB (its issue #4).
UNSAFE_CHARS = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')


#: backup-YYYY-MM-DD-HHMMSS, and NAUbackup's backup-YYYY-MM-DD-(HH:MM:SS).
BACKUP_DIR_RE = re.compile(r"^backup-(\d{4})-(\d\d)-(\d\d)-(?:(\d\d)(\d\d)(\d\d)|\((\d\d):(\d\d):(\d\d)\))$")


#: pool_db_YYYYMMDD-HHMMSS.dump and host_YYYYMMDD-HHMMSS.xbk
DATED_FILE_RE = re.compile(r"^(?:pool_db|host)_(\d{8})-(\d{6})\.(?:dump|xbk)$")


SUCCESS_MARKER = "success"


#: NAUbackup also wrote `success_compress` (for a server-side compression script).
SUCCESS_MARKERS = (SUCCESS_MARKER, "success_compress")


MANIFEST = "backup.json"


def safe_dirname(name):
    """Return `name` made safe as one path component.

    No '/', '\\', ':' or control characters, no leading dot, never '.' or '..'
    or empty, at most 200 bytes: "../../etc" -> "_._.._etc".
    """
    text = UNSAFE_CHARS.sub("_", str(name)).strip()
    text = re.sub(r"^\.", "_", text).rstrip(". ")
    while len(text.encode("utf-8")) > 200:
        text = text[:-1]
    return text if text not in ("", ".", "..") else "_"


def inside(root, *parts):
    """Return root/parts, refusing any result that resolves outside `root`."""
    base = os.path.realpath(root)
    path = os.path.realpath(os.path.join(base, *parts))
    if path != base and not path.startswith(base + os.sep):
        raise BackupDirError("refusing to write outside backup_dir: %r" % (parts,))
    return path


def stamp(moment):
    """Return the folder stamp of a datetime: 2026-11-23-184501."""
    return moment.strftime("%Y-%m-%d-%H%M%S")


def parse_backup_name(name):
    """Return the datetime a backup folder name encodes, or None if it is not one."""
    match = BACKUP_DIR_RE.match(name)
    if not match:
        return None
    g = match.groups()
    hms = g[3:6] if g[3] is not None else g[6:9]
    try:
        return datetime.datetime(*(int(x) for x in g[:3] + tuple(hms)))
    except ValueError:
        return None


def parse_dated_file(name):
    """Return the datetime of a pool_db_/host_ backup file name, or None."""
    match = DATED_FILE_RE.match(name)
    if not match:
        return None
    try:
        return datetime.datetime.strptime(match.group(1) + match.group(2), "%Y%m%d%H%M%S")
    except ValueError:
        return None


def vm_backups(vm_dir):
    """Return [(name, datetime, complete)] for the backup folders in a VM's folder."""
    try:
        names = os.listdir(vm_dir)
    except OSError:
        return []
    found = []
    for name in names:
        when = parse_backup_name(name)
        path = os.path.join(vm_dir, name)
        if when is None or not os.path.isdir(path) or os.path.islink(path):
            continue
        found.append((name, when, any(os.path.exists(os.path.join(path, m)) for m in SUCCESS_MARKERS)))
    return found


class RunLock:
    """`with RunLock(backup_dir):` one run at a time per backup_dir.

    The lock file holds 'pid host'; a lock whose process is dead on this host is
    taken over with a warning.
    """

    NAME = ".vmbackup.lock"

    def __init__(self, folder):
        self.path = os.path.join(folder, self.NAME)
        self.me = "%d %s\n" % (os.getpid(), socket.gethostname())

    def __enter__(self):
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(self.me)
            return self
        raise LockHeld(os.path.dirname(self.path), "unknown")

    def _take_over_if_stale(self):
        try:
            with open(self.path) as handle:
                pid_text, _, host = handle.read().strip().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            pid, host = None, ""
        if pid is not None and host not in ("", socket.gethostname()):
            raise LockHeld(os.path.dirname(self.path), "%d on host %s" % (pid, host))
        if pid is not None and pid_alive(pid):
            raise LockHeld(os.path.dirname(self.path), pid)
        log.warning("taking over stale lock %s (pid %s is gone)", self.path, pid)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __exit__(self, *exc):
        try:
            with open(self.path) as handle:
                if handle.read() == self.me:
                    os.unlink(self.path)
        except OSError:
            pass
        return False


def pid_alive(pid):
    """Return True if a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_backup_dir(config):
    """Raise BackupDirError unless backup_dir is a writable folder with space_threshold % free."""
    problems = check_backup_dir_readonly(config)
    if problems:
        raise BackupDirError(problems[0])
    probe = os.path.join(config.backup_dir, ".vmbackup-write-test-%d" % os.getpid())
    try:
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as exc:
        raise BackupDirError("backup_dir=%s (%s): not writable: %s"
                             % (config.backup_dir, config.where("backup_dir"), exc.strerror))
    log_df(config.backup_dir, "before")
    check_space(config)


def check_space(config, need=0, what="the run"):
    """Raise BackupDirError if backup_dir is below space_threshold % free or lacks `need` bytes."""
    free, total, percent = free_space(config.backup_dir)
    if percent < config.space_threshold:
        raise BackupDirError("backup_dir %s has %.1f%% free, below space_threshold=%s%%: %s "
                             "not started" % (config.backup_dir, percent,
                                              config.space_threshold, what))
    if need and need > free:
        raise BackupDirError("backup_dir %s has %s free, %s needs about %s"
                             % (config.backup_dir, human_size(free), what, human_size(need)))


def log_df(path, when):
    """Log the backup file system's usage like NAUbackup's `df` lines."""
    free, total, percent = free_space(path)
    log.info("df %s (%s): %s free of %s (%.1f%% free)", path, when, human_size(free),
             human_size(total), percent)


def backup_folders(vm_dir):
    """Return the backup folders in a VM's folder, oldest first."""
    found = []
    for name in os.listdir(vm_dir):
        when = parse_backup_name(name)
        path = os.path.join(vm_dir, name)
        if when is not None and os.path.isdir(path) and not os.path.islink(path):
            found.append((when, name, path))
    return [path for _, _, path in sorted(found)]


def dated_files(folder):
    """Return the pool_db_/host_ backup files in a METADATA_/HOST_ folder, oldest first."""
    found = sorted((parse_dated_file(n), n) for n in os.listdir(folder) if parse_dated_file(n))
    return [os.path.join(folder, n) for _, n in found]


def folder_size(path):
    """Return (number of files, total bytes) under a folder."""
    count = total = 0
    for top, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(top, name)).st_size
                count += 1
            except OSError:
                pass
    return count, total
