"""The tool's decisions as pure functions, tested from tables (borg's prune tests):
retention, safe names, paths inside backup_dir, leftover recognition, exit codes."""
import datetime
import json
import os

import pytest

import vmbackup
from vmbackup import (BackupDirError, inside, is_leftover,
                      parse_backup_name, plan_retention, safe_dirname)

D = datetime.datetime


def entries(*specs):
    """'2026-11-0N+' is a complete backup of day N, '-' an incomplete one."""
    out = []
    for spec in specs:
        day, done = int(spec[:-1]), spec[-1] == "+"
        out.append(("backup-2026-11-%02d-000000" % day, D(2026, 11, day), done))
    return out


@pytest.mark.parametrize("specs, keep, drop_incomplete, doomed_days", [
    (("1+", "2+", "3+", "4+", "5+"), 3, True, [1, 2]),
    (("1+", "2+", "3+"), 3, True, []),
    (("1+", "2-", "3+", "4-"), 3, True, [2, 4]),               # incomplete never count
    (("1+", "2-", "3+", "4-"), 3, False, []),                  # ... and stay when asked
    (("1+", "2+", "3-", "4-", "5-", "6-", "7-"), 2, False, []),  # failures never eat good ones
    (("1+", "2+"), 0, True, [1]),                              # keep < 1 still keeps the newest
    (("1-", "2-"), 1, True, [1, 2]),
    ((), 4, True, []),
], ids=["prune-oldest", "at-limit", "incomplete-go", "incomplete-stay", "after-failures",
        "never-last", "all-incomplete", "empty"])
def test_plan_retention(specs, keep, drop_incomplete, doomed_days):
    doomed = plan_retention(entries(*specs), keep, drop_incomplete)
    assert doomed == ["backup-2026-11-%02d-000000" % d for d in doomed_days]


def test_retention_counts_legacy_nau_folders_by_date(tmp_path):
    vm_dir = tmp_path / "web01"
    for name, marker in (("backup-2019-09-05-(00:10:01)", "success"),
                         ("backup-2019-09-12-(00:10:01)", "success_compress"),
                         ("backup-2026-11-20-001001", "success"),
                         ("backup-2026-11-21-001001", None),
                         ("backup-2026-11-22-001001", "success"),
                         ("my notes", None)):
        (vm_dir / name).mkdir(parents=True)
        if marker:
            (vm_dir / name / marker).write_text("")
        if marker and "(" not in name:   # a vmbackup folder: its manifest, then success
            (vm_dir / name / "backup.json").write_text(json.dumps(
                {"tool": "vmbackup", "format": 1, "mode": "vm-export", "files": [],
                 "vm": {"name": "web01", "uuid": "u1"}}))
    (vm_dir / "README.txt").write_text("never touched")
    doomed = vmbackup.prune_vm_backups(vmbackup.LocalStore(str(tmp_path)), "web01", 2)
    assert doomed == ["backup-2019-09-05-(00:10:01)", "backup-2019-09-12-(00:10:01)",
                      "backup-2026-11-21-001001"]
    assert sorted(os.listdir(str(vm_dir))) == ["README.txt", "backup-2026-11-20-001001",
                                               "backup-2026-11-22-001001", "my notes"]


@pytest.mark.parametrize("name, when", [
    ("backup-2026-11-23-184501", D(2026, 11, 23, 18, 45, 1)),
    ("backup-2019-09-05-(00:10:01)", D(2019, 9, 5, 0, 10, 1)),
    ("backup-2026-13-23-184501", None),
    ("backup-2026-11-23", None),
    ("notes", None),
])
def test_parse_backup_name(name, when):
    assert parse_backup_name(name) == when


@pytest.mark.parametrize("name, safe", [
    ("web01", "web01"),
    ("../../etc", "_._.._etc"),
    ("..", "_"),
    (".", "_"),
    ("", "_"),
    (".hidden", "_hidden"),
    ("a/b\\c:d", "a_b_c_d"),
    ("new\nline", "new_line"),
    ("$(touch pwned)", "$(touch pwned)"),
    ("ünïcødé VM 日本語 ✓", "ünïcødé VM 日本語 ✓"),
    ('quote\'s "double" <x>|?*', "quote's _double_ _x____"),
    ("trailing dot. ", "trailing dot"),
    ("x" * 300, "x" * 200),
    ("日" * 100, "日" * 66),
], ids=lambda v: repr(v)[:20])
def test_safe_dirname(name, safe):
    assert safe_dirname(name) == safe
    assert "/" not in safe and safe not in (".", "..") and len(safe.encode()) <= 200


def test_inside_refuses_escapes(tmp_path):
    root = str(tmp_path)
    assert inside(root, "web01", "backup-x") == os.path.join(root, "web01", "backup-x")
    for bad in (("..",), ("../x",), ("/etc",), ("a", "../../b")):
        with pytest.raises(BackupDirError):
            inside(root, *bad)
    os.symlink("/etc", str(tmp_path / "link"))
    with pytest.raises(BackupDirError):
        inside(root, "link")


def snap(uuid="u1", tag=None, is_snapshot=True, pending=None, taken=None):
    rec = {"uuid": uuid, "is_a_snapshot": is_snapshot, "other_config": {},
           "snapshot_time": taken or "20261123T11:00:05Z"}
    if tag is not None:
        rec["other_config"][vmbackup.TAG_KEY] = tag
    if pending is not None:
        rec["other_config"][vmbackup.PENDING_KEY] = pending
    return rec


HOST = __import__("socket").gethostname()
NOW = D(2026, 11, 23, 12, 0, 0)


@pytest.mark.parametrize("record, leftover", [
    (snap(tag="u1 %s 999999999 2026-11-23T11:00:00" % HOST), True),        # our host, pid gone
    (snap(tag="u1 %s %d 2026-11-23T11:00:00" % (HOST, os.getpid())), False),  # its run is alive
    (snap(tag="u1 otherhost 1 2026-11-23T11:00:00"), False),                # another host, recent
    (snap(tag="u1 otherhost 1 2026-11-21T11:00:00"), True),                 # another host, >25h
    (snap(tag="u2 %s 999999999 2026-11-23T11:00:00" % HOST), False),        # a copy: not its uuid
    (snap(tag=None), False),                                                # a person's snapshot
    (snap(tag="u1 %s 999999999 2026-11-23T11:00:00" % HOST, is_snapshot=False), False),  # a VM
    (snap(tag="garbage"), False),
    # killed while XAPI was making it: only the pending mark copied from its source
    (snap(pending="%s 999999999 2026-11-23T11:00:00" % HOST), True),
    (snap(pending="%s %d 2026-11-23T11:00:00" % (HOST, os.getpid())), False),
    (snap(pending="%s 999999999 2026-11-23T11:00:00" % HOST, taken="20261125T09:00:00Z"), False),
    (snap(pending="%s 999999999 2026-11-23T11:00:00" % HOST, taken="20261123T10:59:00Z"), False),
    (snap(pending="%s 999999999 2026-11-23T11:00:00" % HOST, is_snapshot=False), False),
], ids=["dead-pid", "live-pid", "other-host-recent", "other-host-old", "copied-tag",
        "untagged", "real-vm", "garbage", "pending-dead", "pending-live",
        "pending-person-later", "pending-before-mark", "pending-on-a-vm"])
def test_is_leftover(record, leftover):
    assert is_leftover(record, now=NOW) is leftover


@pytest.mark.parametrize("server, url, local", [
    (None, "unix:/var/lib/xcp/xapi", True),
    ("unix:/tmp/x.sock", "unix:/tmp/x.sock", True),
    ("pool1", "https://pool1/", False),
    ("https://pool1:8443", "https://pool1:8443/", False),
    ("http://10.0.0.1", "http://10.0.0.1/", False),
])
def test_parse_endpoint(server, url, local):
    ep = vmbackup.parse_endpoint(server)
    assert ep.url == url and ep.is_local is local
    assert ep.with_host("10.1.1.2").host == "10.1.1.2"


def test_xe_argv_is_a_list_with_dashes():
    t = vmbackup.XeTransport.__new__(vmbackup.XeTransport)
    t.xe_path, t.connect_args = "/opt/xensource/bin/xe", ["-s", "h"]
    assert t.argv("vm-export", uuid="u", filename="$(x) ; y", compress="zstd", metadata=True,
                  skipped=None) == ["/opt/xensource/bin/xe", "vm-export", "uuid=u",
                                    "filename=$(x) ; y", "compress=zstd", "metadata=true", "-s", "h"]


def test_xe_error_codes_from_xe_sentences():
    err = vmbackup.XeFailed(["xe", "vm-uninstall"], 1,
                            "Another operation involving the object is currently in progress\n"
                            "class: VM\n")
    assert err.code == "OTHER_OPERATION_IN_PROGRESS"
    assert str(err).startswith("xe vm-uninstall failed (exit 1): OTHER_OPERATION_IN_PROGRESS: ")
    assert vmbackup.XeFailed(["xe", "x"], 1, "Error code: SR_BACKEND_FAILURE_44\n").code == \
        "SR_BACKEND_FAILURE_44"


def test_plan_restore_names():
    manifest = vmbackup.manifest_record(
        {"name": "web01", "uuid": "u"}, "vm-export", "api", "t0", "t1",
        [{"name": "web01.xva.zst", "size": 1}, {"name": "vm.cfg", "size": 1}], compress="zstd")
    (item,) = vmbackup.plan_restore("/b/web01/backup-x", manifest, today=datetime.date(2026, 11, 23))
    assert item.name == "web01 (restored 2026-11-23)" and item.file.endswith("web01.xva.zst")
    (item,) = vmbackup.plan_restore("/b/web01/backup-x", manifest, preserve=True)
    assert item.name == "web01"
    with pytest.raises(vmbackup.RestoreError, match="metadata-only"):
        vmbackup.plan_restore("/b", vmbackup.manifest_record({"name": "web01"}, "meta-export",
                                                             "api", "t0", "t1", []))
