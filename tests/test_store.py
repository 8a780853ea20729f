"""The backup-folder model's rules, each written once in store.py, tested from tables
(borg's prune tests): is a folder complete, what kind is a file, which DISK-* is a
NAUbackup folder's root disk; and retention, verify, list and restore agreeing on them.

Rows marked "was:" are where the copies that these rules replaced disagreed."""
import json
import os

import pytest

import vmbackup
from conftest import run_vmbackup
from test_verify import DISK, GOOD_XVA, flip_in_member, make_legacy, make_xva, write_backup
from vmbackup import (LegacyDisk, file_kind, is_complete, is_legacy_folder, legacy_root_disk,
                      read_backup_folder)

MODERN, NAU = "backup-2026-11-23-101500", "backup-2019-09-05-(00:10:01)"


@pytest.mark.parametrize("entries, complete", [
    ({"backup.json", "success", "web01.xva"}, True),
    ({"backup.json", "web01.xva"}, False),                        # the run died before `success`
    ({"backup.json", "success_compress"}, False),                 # was: retention said complete
    ({"success", "web01.xva"}, True),
    ({"success_compress", "web01.xva"}, True),                    # NAUbackup, export over 60 GiB
    ({"success_compressing"}, True),                              # was: both copies said incomplete
    ({"success_restore"}, True),                                  # was: both copies said incomplete
    ({"web01.xva", "vm-metadata.xml"}, False),
    (set(), False),
], ids=["modern", "modern-unfinished", "modern-success_compress", "nau", "nau-compress",
        "nau-compressing", "nau-restore", "no-marker", "empty"])
def test_is_complete(entries, complete):
    assert is_complete(frozenset(entries)) is complete


@pytest.mark.parametrize("name, entries, legacy", [
    (MODERN, {"backup.json", "success"}, False),
    (MODERN, {"backup.json"}, False),                             # a broken vmbackup backup
    (MODERN, {"web01.xva.part"}, False),                          # a vmbackup run that died
    (MODERN, {"success", "web01.xva"}, False),                    # backup.json removed: damaged, not legacy
    (NAU, {"web01.xva"}, True),                                   # NAUbackup, unfinished
    (NAU, {"success_compress", "web01.xva"}, True),
    (NAU, {"backup.json", "success"}, False),                     # the manifest decides
], ids=["modern", "modern-broken", "modern-died", "modern-manifest-removed", "nau-unfinished",
        "nau-compress", "manifest-wins"])
def test_is_legacy_folder(name, entries, legacy):
    assert is_legacy_folder(name, frozenset(entries)) is legacy


@pytest.mark.parametrize("name, kind", [
    ("web01.xva", "xva"),
    ("web01.xva.gz", "xva"),                                      # NAUbackup's compress=True
    ("web01.xva.zst", "xva"),                                     # was: restore's legacy copy missed it
    ("db01.vhd", "vhd"),
    ("db01-xvdb.raw", "raw"),
    ("vm-metadata.xml", "metadata"),
    ("web01.xva.part", None),                                     # an export being written
    ("web01.xva.zst.part", None),
    ("web01.xva.bak", None),
    ("success_compress", None),
    ("vm.cfg", None),
], ids=lambda v: str(v))
def test_file_kind(name, kind):
    assert file_kind(name) == kind


def cfg(userdevice=None, size=None):
    """(vbd.cfg, vdi.cfg) as read_cfg returns them; None leaves the key (or file) out."""
    return ({} if userdevice is None else {"userdevice": userdevice},
            {} if size is None else {"virtual_size": str(size)})


@pytest.mark.parametrize("disks, root", [
    ({"xvda": cfg("0", 100)}, LegacyDisk("xvda", "0", 100)),
    ({"xvda": cfg(None, 100)}, LegacyDisk("xvda", "0", 100)),     # no vbd.cfg: userdevice 0
    ({"xvda": cfg("0", 100), "xvdb": cfg("1", 200)}, LegacyDisk("xvda", "0", 100)),
    ({"hda": cfg("0", 100), "xvda": cfg("1", 200)},               # was: verify took hda
     LegacyDisk("xvda", "1", 200)),
    ({"hda": cfg(None, 100), "xvda": cfg("0", 200)},              # was: verify took hda (sorted first)
     LegacyDisk("xvda", "0", 200)),
    ({"hda": cfg("0", 100)}, None),                               # was: verify took hda; NAUbackup
    ({"1": cfg("0", 100)}, None),                                 # exported no disk without an xvda
    ({"xvda": cfg("0", None)}, LegacyDisk("xvda", "0", None)),    # size not recorded
    ({"xvda": cfg("0", "10G")}, LegacyDisk("xvda", "0", None)),
    ({}, None),
], ids=["xvda", "xvda-no-vbd-cfg", "xvda-and-xvdb", "hda-userdevice-0", "hda-no-vbd-cfg",
        "hda-only", "device-unknown", "no-size", "bad-size", "no-disks"])
def test_legacy_root_disk(disks, root):
    assert legacy_root_disk(disks) == root


TWO_DISKS = {"xvda": cfg("0", 100), "xvdb": cfg("1", 200)}


@pytest.mark.parametrize("names, disks, held", [
    (["web01.raw"], TWO_DISKS, {"web01.raw": LegacyDisk("xvda", "0", 100)}),
    (["web01.raw", "web01-xvdb.raw"], TWO_DISKS,
     {"web01.raw": LegacyDisk("xvda", "0", 100), "web01-xvdb.raw": LegacyDisk("xvdb", "1", 200)}),
    (["web01-xvdb.vhd", "web01.vhd"], TWO_DISKS,
     {"web01.vhd": LegacyDisk("xvda", "0", 100), "web01-xvdb.vhd": LegacyDisk("xvdb", "1", 200)}),
    (["web01.raw", "web01-xvdc.raw"], TWO_DISKS,           # no DISK-xvdc: no size to check
     {"web01.raw": LegacyDisk("xvda", "0", 100), "web01-xvdc.raw": None}),
    (["copy.raw"], TWO_DISKS, {"copy.raw": LegacyDisk("xvda", "0", 100)}),   # the only one: root
    (["copy.raw", "other.raw"], TWO_DISKS, {"copy.raw": None, "other.raw": None}),
    (["web01.xva", "vm-metadata.xml"], TWO_DISKS, {}),
], ids=["root-only", "root-and-xvdb", "vhd", "unknown-device", "only-file", "two-unknown", "no-disk-files"])
def test_legacy_disk_files(names, disks, held):
    assert vmbackup.legacy_disk_files("web01", names, disks) == held


# -- the commands read the one model ------------------------------------------------

def test_manifest_folder_with_only_success_compress_is_incomplete_everywhere(tmp_path):
    """retention, verify, list and restore agree: vmbackup's commit marker is `success`."""
    root = tmp_path / "backups"
    good = write_backup(root, [("web01.xva", GOOD_XVA)], stamp="2026-11-22-101500")
    odd = write_backup(root, [("web01.xva", GOOD_XVA)], stamp="2026-11-23-101500", success=False)
    open(os.path.join(odd, "success_compress"), "w").close()
    backup = read_backup_folder(odd)
    assert (backup.complete, backup.legacy, backup.mode) == (False, False, "vm-export")
    assert vmbackup.verify_backup(odd).status == "incomplete"
    listed = json.loads(run_vmbackup("list", "-d", root, "--json", "-"))
    assert [b["complete"] for b in listed["vms"][0]["backups"]] == [False, True]
    assert vmbackup.newest_complete(os.path.join(str(root), "web01")).path == good
    store = vmbackup.LocalStore(str(root))
    assert vmbackup.prune_vm_backups(store, "web01", 4) == ["backup-2026-11-23-101500"]


def test_legacy_raw_is_checked_and_restored_as_disk_xvda(tmp_path):
    folder = make_legacy(tmp_path, success="success_restore")
    os.unlink(os.path.join(folder, "web01.xva"))
    with open(os.path.join(folder, "web01.raw"), "wb") as handle:
        handle.write(bytes(DISK.virtual_size))
    with open(os.path.join(folder, "DISK-xvda", "vbd.cfg"), "w") as handle:
        handle.write("userdevice=0\nbootable=true\n")
    os.makedirs(os.path.join(folder, "DISK-hda"))           # sorts first; not what was exported
    with open(os.path.join(folder, "DISK-hda", "vdi.cfg"), "w") as handle:
        handle.write("virtual_size=4096\n")
    backup = read_backup_folder(folder)
    assert backup.complete and backup.legacy and backup.mode == "vdi-export"
    assert [f.name for f in backup.files] == ["vm-metadata.xml", "web01.raw"]
    assert vmbackup.verify_backup(folder).status == "good"
    (item,) = vmbackup.plan_restore(folder, vmbackup.legacy_manifest(backup))
    assert (item.kind, item.fmt, item.virtual_size, item.userdevice, item.device) == (
        "disk", "raw", DISK.virtual_size, "0", "xvda")


def test_legacy_zstd_xva_is_restorable(tmp_path):
    folder = make_legacy(tmp_path)
    os.rename(os.path.join(folder, "web01.xva"), os.path.join(folder, "web01.xva.zst"))
    manifest = vmbackup.legacy_manifest(read_backup_folder(folder))
    (item,) = vmbackup.plan_restore(folder, manifest)
    assert item.kind == "vm" and item.file.endswith("web01.xva.zst")


def test_results_are_typed_and_their_json_keeps_its_keys(tmp_path):
    folder = write_backup(tmp_path, [("web01.xva", flip_in_member(GOOD_XVA, "Ref:7/00000003"))])
    result = vmbackup.verify_backup(folder)
    assert result.status == "bad" and isinstance(result.problems[0], vmbackup.Problem)
    assert str(result.problems[-1]) == "web01.xva: chunk Ref:7/00000003 XXH64 mismatch"
    data = result.to_json()
    assert list(data) == ["path", "display", "vm", "name", "date", "kind", "mode", "legacy",
                          "complete", "status", "problems", "unchecked", "notes", "files"]
    assert data["problems"][-1] == {"file": "web01.xva",
                                    "message": "chunk Ref:7/00000003 XXH64 mismatch"}
    assert data["files"][0] == {"name": "vm-metadata.xml", "size": os.path.getsize(
        os.path.join(folder, "vm-metadata.xml")), "status": "good"}


def test_restore_names_the_problems_of_a_broken_backup_in_words(tmp_path):
    folder = write_backup(tmp_path, [("web01.xva", flip_in_member(GOOD_XVA, "Ref:7/00000003"))])
    out = run_vmbackup("restore", folder, "-s", "https://127.0.0.1:9", exit_code=2)
    assert ("BAD web01/backup-2026-11-23-101500/web01.xva: chunk Ref:7/00000003 XXH64 mismatch"
            in out), out
    assert "refusing to restore it" in out
    assert "{" not in out and "'message'" not in out, out
    unfinished = write_backup(tmp_path, [("web01.xva", GOOD_XVA)], stamp="2026-11-24-101500",
                              success=False)
    out = run_vmbackup("restore", unfinished, "-s", "https://127.0.0.1:9", exit_code=2)
    assert "INCOMPLETE web01/backup-2026-11-24-101500: no success marker" in out, out
    assert "{" not in out, out


def test_restore_warns_in_words_about_what_it_could_not_check(tmp_path, monkeypatch):
    folder = write_backup(tmp_path, [("web01.xva.zst", make_xva(compress="zstd"))],
                          compress="zstd")
    monkeypatch.setattr(vmbackup, "find_zstd", lambda: None)
    out = run_vmbackup("restore", folder, "-s", "https://127.0.0.1:9", exit_code=None)
    assert "could not be fully checked here (web01.xva.zst: zstd is not installed" in out, out
    assert "{" not in out, out


def folder_of(name, uuid):
    """A BackupFolder whose manifest names VM `uuid` (None: no manifest, as NAUbackup's)."""
    manifest = None if uuid is None else {"vm": {"name": "a_b", "uuid": uuid}}
    return vmbackup.BackupFolder("/b/a_b/" + name, name, "a_b", None, True, uuid is None,
                                 "vm-export", manifest, None, (), frozenset())


@pytest.mark.parametrize("owners, groups", [
    (["u1", "u1", None], [[0, 1, 2]]),              # one VM and its NAUbackup past: one VM
    (["u1", "u2", "u1"], [[0, 2], [1]]),            # two VMs whose names made one folder
    (["u1", None, "u2"], [[0], [1], [2]]),         # ... and a legacy one is no one's
    ([None, None], [[0, 1]]),
    ([], []),
], ids=["one-vm-and-legacy", "two-vms", "two-vms-and-legacy", "legacy-only", "empty"])
def test_group_by_vm(owners, groups):
    folders = [folder_of("backup-%d" % i, uuid) for i, uuid in enumerate(owners)]
    got = vmbackup.group_by_vm(folders)
    assert [[folders.index(f) for f in g] for g in got] == groups
