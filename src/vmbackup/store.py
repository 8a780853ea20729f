"""The backup directory and the one model of a backup folder in it.

Owns: safe_dirname, inside, stamp and the backup-folder/dated-file names; the backup
folder model (BackupFolder, read_backup_folder) and its rules, each written once:
is_complete (is this folder a finished backup?), file_kind (is this file an XVA?),
legacy_root_disk and legacy_disk_files (which DISK-* does a NAUbackup disk file hold?),
backup_vm_uuid and group_by_vm (whose backups does a VM folder hold?); MANIFEST and the
success markers, read_manifest/read_cfg/manifest_text; the Store interface and LocalStore; RunLock;
check_backup_dir/check_space/log_df, folder_size.
Imports: errors, util.
"""

import collections
import datetime
import json
import os
import re
import shutil
import signal
import socket
import threading
import time
import typing

from vmbackup.errors import BackupDirError, BadFile, LockHeld, log
from vmbackup.util import free_space, fsync_dir, human_size, one_line, partial_file, write_text


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


#: The marker vmbackup writes last, after the manifest: the backup is complete.
SUCCESS_MARKER = "success"


#: The markers of a complete NAUbackup backup (no manifest). VmBackup.py v3.25 wrote
#: `success`, or `success_compress` when the export was over 60 GiB (for a server-side
#: compression script, which leaves `success_compressing`/`success_restore`); its own
#: check (get_last_backup_dir_that_failed) counts all four as complete.
LEGACY_SUCCESS_MARKERS = (SUCCESS_MARKER, "success_compress", "success_compressing",
                          "success_restore")


#: The prefix a backup folder is renamed to before it is removed (store.LocalStore.delete).
DELETING = ".deleting-"


#: vmbackup's manifest: its presence makes a folder a vmbackup backup, not a legacy one.
MANIFEST = "backup.json"


#: The VM's metadata (the ova.xml of a metadata export) in every backup folder.
METADATA_FILE = "vm-metadata.xml"


#: The file a vm-export writes, by the `compress` setting.
XVA_SUFFIXES = {None: ".xva", "gzip": ".xva.gz", "zstd": ".xva.zst"}


#: What a backup file is, by how its name ends; verify checks each kind its own way.
FILE_KINDS = (("xva", (".xva", ".xva.gz", ".xva.zst")), ("vhd", (".vhd",)), ("raw", (".raw",)),
              ("metadata", (METADATA_FILE,)))


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


# -- the backup folder model: each rule once ----------------------------------------
def is_nau_name(name):
    """Return True if `name` is NAUbackup's backup-YYYY-MM-DD-(HH:MM:SS) folder name."""
    match = BACKUP_DIR_RE.match(name)
    return bool(match) and match.group(7) is not None


def is_complete(entries):
    """Return True if a backup folder holding `entries` (its file names) is a finished backup.

    The one rule. A vmbackup folder (it has backup.json) is complete with `success`,
    which vmbackup writes only after the manifest. A NAUbackup folder (no manifest) is
    complete with any of NAUbackup's markers, success_compress included.
    """
    if MANIFEST in entries:
        return SUCCESS_MARKER in entries
    return any(marker in entries for marker in LEGACY_SUCCESS_MARKERS)


def is_legacy_folder(name, entries):
    """Return True if NAUbackup wrote the folder `name` holding `entries`: no manifest and a
    NAUbackup name, backup-YYYY-MM-DD-(HH:MM:SS). vmbackup never names a folder so; a
    vmbackup folder without backup.json is a damaged (or unfinished) backup, not a legacy one."""
    return MANIFEST not in entries and is_nau_name(name)


def file_kind(name):
    """Return the kind of a backup file by its name: xva, vhd, raw, metadata, or None.

    "web01.xva.zst" -> "xva", "db01-xvdb.vhd" -> "vhd", "web01.xva.part" -> None.
    """
    for kind, endings in FILE_KINDS:
        if name.endswith(endings):
            return kind
    return None


def legacy_mode(kinds):
    """Return the mode of a NAUbackup folder from its files' kinds (in name order):
    an .xva makes vm-export, a .vhd/.raw vdi-export, neither meta-export."""
    modes = {"xva": "vm-export", "vhd": "vdi-export", "raw": "vdi-export"}
    return next((modes[k] for k in kinds if k in modes), "meta-export")


class LegacyDisk(typing.NamedTuple):
    """The disk a NAUbackup vdi-export wrote, as its DISK-<device>/*.cfg files record it."""
    device: str
    userdevice: str
    virtual_size: typing.Optional[int]    # None when vdi.cfg does not record it


#: NAUbackup's vdi-export exports the disk whose VBD device is xvda, and no other.
LEGACY_ROOT_DEVICE = "xvda"


def legacy_root_disk(disks):
    """Return the LegacyDisk a NAUbackup .raw/.vhd holds, from {device: (vbd.cfg, vdi.cfg)}.

    The one rule: NAUbackup snapshots "the xvda disk only" (VmBackup.py's gather_vm_meta
    picks `vbd_record['device'] == 'xvda'`) and writes its .cfg files to DISK-<device>,
    so the root disk is DISK-xvda whatever its userdevice; no DISK-xvda, no root disk.
    {"xvda": ({"userdevice": "0"}, {"virtual_size": "10737418240"})} -> ("xvda", "0", 10737418240)
    """
    if LEGACY_ROOT_DEVICE not in disks:
        return None
    return legacy_disk(LEGACY_ROOT_DEVICE, *disks[LEGACY_ROOT_DEVICE])


def legacy_disk(device, vbd, vdi):
    """Return the LegacyDisk of DISK-<device> from its vbd.cfg and vdi.cfg pairs."""
    size = vdi.get("virtual_size", "").strip()
    return LegacyDisk(device, vbd.get("userdevice", "0") or "0",
                      int(size) if size.isdigit() else None)


def legacy_disk_files(vm, names, disks):
    """Return {disk file: LegacyDisk or None}: which DISK-<device> each .raw/.vhd file among
    `names` of a NAUbackup folder in the VM folder `vm` holds, from {device: (vbd.cfg, vdi.cfg)}.

    The one rule: `<vm>.raw` (or the folder's only disk file) holds the root disk
    (legacy_root_disk); `<vm>-<device>.raw` holds DISK-<device>, each checked against its
    own vdi.cfg; any other disk file holds no disk we know (its size goes unchecked).
    ("web01", ["web01.raw", "web01-xvdb.raw"], {xvda, xvdb}) -> {web01.raw: xvda, web01-xvdb.raw: xvdb}
    """
    files = [n for n in names if file_kind(n) in ("raw", "vhd")]
    found = {}
    for name in files:
        stem = name[:-len(".raw")]   # .raw and .vhd are as long
        device = stem[len(vm) + 1:] if stem.startswith(vm + "-") else None
        if device in disks:
            found[name] = legacy_disk(device, *disks[device])
        elif stem == vm or len(files) == 1:
            found[name] = legacy_root_disk(disks)
        else:
            found[name] = None
    return found


class BackupFile(typing.NamedTuple):
    """One file of a backup: its name in the folder and its kind (file_kind)."""
    name: str
    kind: typing.Optional[str]


class BackupFolder(typing.NamedTuple):
    """One backup folder as read once by read_backup_folder; every command looks, none recounts."""
    path: str
    name: str                                   # backup-2026-11-23-184501
    vm: str                                     # the manifest's VM name, else the VM folder's
    when: typing.Optional[datetime.datetime]    # from the name
    complete: bool                              # is_complete
    legacy: bool                                # is_legacy_folder: NAUbackup wrote it
    mode: typing.Optional[str]                  # vm-export, vdi-export, meta-export; None: unknown
    manifest: typing.Optional[dict]             # backup.json; None if absent or broken
    manifest_error: typing.Optional[str]        # why backup.json is broken
    files: typing.Tuple[BackupFile, ...]        # the manifest's files, or (legacy) the folder's
    entries: typing.FrozenSet[str]              # every name in the folder
    disk_files: typing.Dict[str, typing.Optional[LegacyDisk]] = {}  # legacy only: legacy_disk_files

    def names_of(self, kind):
        """Return the names of this backup's files of `kind` (xva, vhd, raw, metadata)."""
        return [f.name for f in self.files if f.kind == kind]


def backup_vm_uuid(backup):
    """Return the uuid of the VM a BackupFolder's manifest names, or None (legacy, damaged)."""
    return ((backup.manifest or {}).get("vm") or {}).get("uuid")


def group_by_vm(backups):
    """Return the BackupFolders `backups` split by the VM their manifests name, in the order
    each VM first appears (pure): one VM folder may hold two VMs' backups (their names made
    one folder). Backups that name no VM (legacy, damaged, unfinished) join the one VM when
    there is one, else form a group of their own."""
    groups = collections.OrderedDict()    # Python 3.6: a dict's order is not promised
    for backup in backups:
        groups.setdefault(backup_vm_uuid(backup), []).append(backup)
    named = [g for uuid, g in groups.items() if uuid is not None]
    if len(named) == 1 and None in groups:
        return [list(backups)]
    return list(groups.values())


def read_cfg(path):
    """Return the key=value pairs of a NAUbackup .cfg file as a dict ({} if unreadable)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return dict(line.rstrip("\n").split("=", 1) for line in handle if "=" in line)
    except OSError:
        return {}


def read_manifest(folder):
    """Return the backup.json of a backup folder as a dict, or None if absent; raise BadFile."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BadFile("%s does not parse: %s" % (MANIFEST, one_line(exc)))
    if not isinstance(manifest, dict) or manifest.get("tool") != "vmbackup" \
            or not isinstance(manifest.get("files"), list):
        raise BadFile("%s is not a vmbackup manifest" % MANIFEST)
    if manifest.get("format") != 1:
        raise BadFile("%s has format %r; this vmbackup reads format 1"
                      % (MANIFEST, manifest.get("format")))
    return manifest


def manifest_text(manifest):
    """Return the text of a backup.json (the one way it is written)."""
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def read_legacy_disks(folder, entries):
    """Return {device: (vbd.cfg, vdi.cfg)} of a NAUbackup folder's DISK-<device> folders."""
    return {name[len("DISK-"):]: (read_cfg(os.path.join(folder, name, "vbd.cfg")),
                                  read_cfg(os.path.join(folder, name, "vdi.cfg")))
            for name in entries if name.startswith("DISK-")}


def read_backup_folder(path):
    """Return the BackupFolder at `path`: its names, markers and manifest, read once; raise OSError."""
    name = os.path.basename(os.path.normpath(path))
    entries = frozenset(os.listdir(path))
    vm = os.path.basename(os.path.dirname(os.path.abspath(path)))
    manifest = error = None
    if MANIFEST in entries:
        try:
            manifest = read_manifest(path)
        except BadFile as exc:
            error = str(exc)
    legacy = is_legacy_folder(name, entries)
    mode, names, disk_files = None, [], {}
    if manifest is not None:
        names = [str(f.get("name", "")) for f in manifest["files"] if isinstance(f, dict)]
        mode, vm = manifest.get("mode"), (manifest.get("vm") or {}).get("name", vm)
    elif legacy:
        names = sorted(n for n in entries.difference(LEGACY_SUCCESS_MARKERS)
                       if os.path.isfile(os.path.join(path, n)))
        mode = legacy_mode(file_kind(n) for n in names)
        disks = read_legacy_disks(path, entries)
        disk_files = legacy_disk_files(os.path.basename(os.path.dirname(os.path.abspath(path))),
                                       names, disks)
    complete = is_complete(entries) and (legacy or MANIFEST in entries)
    return BackupFolder(path, name, vm, parse_backup_name(name), complete, legacy, mode,
                        manifest, error, tuple(BackupFile(n, file_kind(n)) for n in names),
                        entries, disk_files)


#: A run touches its lock's mtime this often (seconds) while it lives.
LOCK_REFRESH = 60.0


#: A lock not touched for this long (seconds) is stale, whichever host wrote it: its run
#: is over (killed, its host rebooted, its container gone).
LOCK_STALE = 300.0


#: The signals that end a run: only the main thread takes them (see backup.signals_deferred).
RUN_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def start_thread(target, name):
    """Start a daemon thread that never takes RUN_SIGNALS (it inherits them blocked), so a
    signal the main thread holds off is never delivered to it instead; return the thread."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, RUN_SIGNALS)
    except (AttributeError, OSError, ValueError):  # pragma: no cover - not Linux / not main thread
        old = None
    try:
        thread.start()
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return thread


def lock_verdict(holder, age, my_host, alive=None):
    """Return "stale" or "held" for a lock that `holder` (pid, host) last touched `age` seconds ago.

    Pure. A lock not touched for LOCK_STALE is stale whatever host wrote it; a fresh one
    is held unless it names a pid of this host that is gone. An unreadable lock is held
    while it is fresh (its run may be writing it), stale after.
    (123, "h1", 30, "h1", dead) -> "stale"; (123, "h2", 30, "h1") -> "held"
    """
    pid, host = holder
    if age > LOCK_STALE:
        return "stale"
    if pid is not None and host == my_host and alive is not None and not alive(pid):
        return "stale"
    if pid is None and age > 5:
        return "stale"
    return "held"


def read_lock(path):
    """Return ((pid, host), started, age in seconds) of a lock file; pid None if unreadable."""
    try:
        age = time.time() - os.stat(path).st_mtime
        with open(path) as handle:
            words = handle.read().split()
        return (int(words[0]), words[1] if len(words) > 1 else ""), " ".join(words[2:3]), age
    except (OSError, ValueError, IndexError):
        return (None, ""), "", 0.0


class RunLock:
    """`with RunLock(backup_dir):` one run at a time per backup_dir, across hosts.

    The lock file holds 'pid host start-time'; a thread touches its mtime every
    LOCK_REFRESH seconds while the run lives, so a lock is stale once it has not been
    touched for LOCK_STALE (whatever host wrote it, e.g. an NFS backup_dir shared by two
    hosts, or a container with a new hostname) or names a dead pid of this host; a stale
    lock is taken over with a warning naming its file.
    """

    NAME = ".vmbackup.lock"

    def __init__(self, folder):
        self.path = os.path.join(folder, self.NAME)
        self.me = "%d %s %s\n" % (os.getpid(), socket.gethostname(),
                                   datetime.datetime.utcnow().replace(microsecond=0).isoformat())
        self.stopped = threading.Event()
        self.thread = None

    def __enter__(self):
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(self.me)
            self.thread = start_thread(self._keep_fresh, "vmbackup-lock")
            return self
        raise LockHeld(os.path.dirname(self.path), "unknown", self.path, "?")

    def _keep_fresh(self):
        """Touch the lock every LOCK_REFRESH seconds until the run ends (a thread)."""
        while not self.stopped.wait(LOCK_REFRESH):
            try:
                os.utime(self.path)
            except OSError as exc:
                log.warning("cannot refresh the run lock %s: %s", self.path, exc)

    def _take_over_if_stale(self):
        (pid, host), started, age = read_lock(self.path)
        if lock_verdict((pid, host), age, socket.gethostname(), pid_alive) == "held":
            who = "%s on host %s" % (pid, host) if host != socket.gethostname() else pid
            raise LockHeld(os.path.dirname(self.path), who, self.path, "%ds" % age)
        # housekeeping after a killed run, like destroying its leftovers: not a problem of this run
        log.info("taking over stale lock %s (pid %s on host %s%s, last refreshed %ds ago: "
                 "its run is over)", self.path, pid, host or "?",
                 ", started " + started if started else "", age)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __exit__(self, *exc):
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()
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


def new_backup_folder(vm_dir, now=datetime.datetime.now):
    """Create and return (path, moment) of a new backup-YYYY-MM-DD-HHMMSS folder in `vm_dir`.

    On a clash with an existing folder it waits for the clock's next second (three tries).
    """
    for _ in range(3):
        moment = now().replace(microsecond=0)
        path = os.path.join(vm_dir, "backup-" + stamp(moment))
        try:
            os.mkdir(path, 0o777)
            return path, moment
        except FileExistsError:
            time.sleep(1.05 - now().microsecond / 1e6)
    raise BackupDirError("cannot create a new backup folder in %s" % vm_dir)


# -- the Store seam ----------------------------------------------------------------
class Store:
    """Where backup folders live: what the tool asks of its storage, and nothing more.

    A VM's backups are filed under `vm`, the VM's folder name (a safe_dirname); a
    backup folder is named by the `path` the store hands out. A backup is written
    with new_folder, write_file (each file appears whole or not at all) and commit
    (the manifest, then `success` last). LocalStore is the one implementation; an
    object-storage target implements the same methods.
    """

    def vm_folders(self):
        """Return the names of the VM (and METADATA_/HOST_) folders, sorted."""
        raise NotImplementedError

    def backups(self, vm):
        """Return the [BackupFolder] of a VM's folder, oldest first."""
        raise NotImplementedError

    def dated_files(self, vm):
        """Return the paths of the pool_db_/host_ files in a METADATA_/HOST_ folder, oldest first."""
        raise NotImplementedError

    def read(self, path):
        """Return the BackupFolder at `path`."""
        raise NotImplementedError

    def new_folder(self, vm):
        """Create a new, empty backup folder for `vm`; return (path, moment)."""
        raise NotImplementedError

    def write_file(self, path, rel, text):
        """Write `text` as the file `rel` of the backup folder `path`, atomically."""
        raise NotImplementedError

    def commit(self, path, manifest):
        """Write the manifest, then the success marker: the backup at `path` is complete."""
        raise NotImplementedError

    def delete(self, path):
        """Delete a backup folder or a dated file."""
        raise NotImplementedError

    def finish_deletes(self, vm):
        """Finish the deletes a crash interrupted in `vm`'s folder; return their names."""
        raise NotImplementedError

    def usage(self, path):
        """Return (number of files, total bytes) of a backup folder."""
        raise NotImplementedError

    def lock(self):
        """Return the context manager that holds the store for one run."""
        raise NotImplementedError


class LocalStore(Store):
    """The Store in a local (or NFS/SMB-mounted) folder: backup_dir."""

    def __init__(self, root):
        self.root = root

    def _vm_dir(self, vm):
        return inside(self.root, vm)

    def vm_folders(self):
        try:
            names = os.listdir(self.root)
        except OSError:
            return []
        return sorted(n for n in names if os.path.isdir(os.path.join(self.root, n))
                      and not os.path.islink(os.path.join(self.root, n)))

    def backups(self, vm):
        vm_dir = self._vm_dir(vm)
        if not os.path.isdir(vm_dir):
            return []
        return [read_backup_folder(path) for path in backup_folders(vm_dir)]

    def dated_files(self, vm):
        vm_dir = self._vm_dir(vm)
        return dated_files(vm_dir) if os.path.isdir(vm_dir) else []

    def read(self, path):
        return read_backup_folder(path)

    def new_folder(self, vm, now=datetime.datetime.now):
        vm_dir = self._vm_dir(vm)
        os.makedirs(vm_dir, exist_ok=True)
        return new_backup_folder(vm_dir, now)

    def write_file(self, path, rel, text):
        dest = inside(path, rel)
        with partial_file(dest) as tmp:
            write_text(tmp, text)
        return dest

    def commit(self, path, manifest):
        self.write_file(path, MANIFEST, manifest_text(manifest))
        write_text(os.path.join(path, SUCCESS_MARKER), "")
        fsync_dir(path)

    def delete(self, path):
        """Delete a backup folder by renaming it aside (.deleting-<name>: never counted, never
        listed) and then removing it, so that a crash half-way never leaves a folder that
        still has `success` but lacks files; finish_deletes ends what a crash interrupted."""
        target = inside(self.root, os.path.relpath(path, self.root))
        if target == os.path.realpath(self.root):
            raise BackupDirError("refusing to delete backup_dir itself: %s" % path)
        if os.path.isdir(target) and not os.path.islink(target):
            aside = os.path.join(os.path.dirname(target), DELETING + os.path.basename(target))
            os.rename(target, aside)
            fsync_dir(os.path.dirname(target))
            shutil.rmtree(aside)
        else:
            os.unlink(target)

    def finish_deletes(self, vm):
        """Remove what an interrupted delete left in a VM's folder; return the names removed."""
        vm_dir = self._vm_dir(vm)
        names = sorted(n for n in os.listdir(vm_dir) if n.startswith(DELETING)) \
            if os.path.isdir(vm_dir) else []
        for name in names:
            shutil.rmtree(os.path.join(vm_dir, name), ignore_errors=True)
        return names

    def usage(self, path):
        return folder_size(path)

    def lock(self):
        return RunLock(self.root)
