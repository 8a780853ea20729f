"""Retention never deletes another mode's backup, another VM's backup, or a half-deleted
folder that still looks complete; folders that two VMs' names would share are refused."""
import json
import os

import pytest

import vmbackup
from conftest import backups_of, run_vmbackup


def complete(backup_dir, vm):
    return [b for b in backups_of(backup_dir, vm)
            if os.path.exists(os.path.join(str(backup_dir), vm, b, "success"))]


def modes(backup_dir, vm):
    out = []
    for b in complete(backup_dir, vm):
        with open(os.path.join(str(backup_dir), vm, b, "backup.json")) as handle:
            out.append(json.load(handle)["mode"])
    return out


def test_metadata_only_runs_never_delete_full_backups(sim_pool, transport, backup_dir):
    """README's weekly full + hourly metadata-only on one backup_dir."""
    args = transport(sim_pool) + ["-d", backup_dir]
    run_vmbackup(*args, "-e", "PRD-print7", "--max-backups", "2")
    for _ in range(5):
        run_vmbackup(*args, "-m", "PRD-print7", "--max-meta-backups", "3")
    assert modes(backup_dir, "PRD-print7").count("vm-export") == 1
    assert modes(backup_dir, "PRD-print7").count("meta-export") == 3
    for _ in range(3):   # and the full runs never count the metadata-only ones
        run_vmbackup(*args, "-E", "PRD-print7", "--max-backups", "2")
    assert sorted(modes(backup_dir, "PRD-print7")) == ["meta-export"] * 3 + ["vdi-export"] * 2


def test_vms_whose_names_make_one_folder_are_refused(sim_pool, transport, backup_dir):
    from conftest import session
    api = session(sim_pool)
    try:
        for old, name in (("web01", "a/b"), ("RESTORE_jira", "a:b")):
            api.xenapi.VM.set_name_label(sim_pool.vm(old)[0], name)
    finally:
        api.xenapi.session.logout()
    out = run_vmbackup(*transport(sim_pool), "-e", "a.b", "-e", "PRD-print7", "-d", backup_dir,
                       exit_code=2)
    assert "make the backup folder 'a_b'" in out
    assert backups_of(backup_dir, "a_b") == [] and complete(backup_dir, "PRD-print7")


def write_backup(vm_dir, name, mode, uuid, success=True):
    folder = vm_dir / name
    folder.mkdir(parents=True)
    (folder / "backup.json").write_text(json.dumps(
        {"tool": "vmbackup", "format": 1, "mode": mode, "files": [],
         "vm": {"name": "a_b", "uuid": uuid}}))
    if success:
        (folder / "success").write_text("")


def test_retention_never_deletes_another_vms_or_another_modes_backups(tmp_path):
    vm_dir = tmp_path / "a_b"
    write_backup(vm_dir, "backup-2026-11-20-000000", "vm-export", "other-vm")
    write_backup(vm_dir, "backup-2026-11-21-000000", "meta-export", "me")
    write_backup(vm_dir, "backup-2026-11-22-000000", "vm-export", "me")
    write_backup(vm_dir, "backup-2026-11-23-000000", "vdi-export", "me")
    store = vmbackup.LocalStore(str(tmp_path))
    assert vmbackup.prune_vm_backups(store, "a_b", 1, mode="vdi-export", uuid="me") == \
        ["backup-2026-11-22-000000"]
    assert vmbackup.prune_vm_backups(store, "a_b", 1, mode="meta-export", uuid="me") == []
    assert backups_of(tmp_path, "a_b") == ["backup-2026-11-20-000000", "backup-2026-11-21-000000",
                                           "backup-2026-11-23-000000"]


def test_delete_renames_aside_first_and_the_next_run_finishes(tmp_path, monkeypatch):
    vm_dir = tmp_path / "web01"
    for day in (20, 21, 22):
        write_backup(vm_dir, "backup-2026-11-%d-000000" % day, "vm-export", "me")
        (vm_dir / ("backup-2026-11-%d-000000" % day) / "web01.xva").write_bytes(b"x" * 10)
    store = vmbackup.LocalStore(str(tmp_path))
    real = vmbackup.shutil.rmtree

    def crash(path, *a, **k):
        raise KeyboardInterrupt("power cut")   # half-way: after the rename, before the removal
    monkeypatch.setattr(vmbackup.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        vmbackup.prune_vm_backups(store, "web01", 2, mode="vm-export", uuid="me")
    monkeypatch.setattr(vmbackup.shutil, "rmtree", real)
    assert sorted(os.listdir(str(vm_dir))) == [".deleting-backup-2026-11-20-000000",
                                               "backup-2026-11-21-000000", "backup-2026-11-22-000000"]
    assert [b.name for b in store.backups("web01")] == ["backup-2026-11-21-000000",
                                                        "backup-2026-11-22-000000"]
    vmbackup.prune_vm_backups(store, "web01", 2, mode="vm-export", uuid="me")
    assert sorted(os.listdir(str(vm_dir))) == ["backup-2026-11-21-000000", "backup-2026-11-22-000000"]


def test_a_vmbackup_folder_without_its_manifest_is_bad_not_legacy(tmp_path):
    folder = tmp_path / "web01" / "backup-2026-11-22-000000"
    folder.mkdir(parents=True)
    (folder / "web01.xva").write_bytes(b"x")
    (folder / "success").write_text("")
    backup = vmbackup.read_backup_folder(str(folder))
    assert not backup.legacy and not backup.complete
    result = vmbackup.check_backup(backup)
    assert result.status == "bad" and "manifest missing" in str(result.to_json())
    assert "BAD: backup.json: manifest missing" in run_vmbackup("list", "-d", tmp_path)
    # and retention neither counts nor deletes it
    assert vmbackup.prune_vm_backups(vmbackup.LocalStore(str(tmp_path)), "web01", 1,
                                     mode="vm-export", uuid="me") == []
    assert folder.exists()


def test_the_printed_config_backs_up_nothing_and_says_so(sim_pool, api, backup_dir, tmp_path):
    cfg = tmp_path / "weekly.cfg"
    text = run_vmbackup("config")
    cfg.write_text(text.replace("backup_dir=/snapshots/BACKUPS", "backup_dir=%s" % backup_dir)
                   .replace("\nstatus_log=", "\n#status_log="))
    out = run_vmbackup(*api(sim_pool), "-c", cfg, exit_code=2)
    assert "config file %s selects nothing" % cfg in out and "uncomment" in out
    assert os.listdir(str(backup_dir)) == []


def test_a_legacy_multi_disk_folder_checks_each_disk_against_its_own_vdi_cfg(tmp_path):
    """NAUbackup writes DISK-<device>/vdi.cfg for every disk; a folder holding more than one
    disk file (web01.raw, web01-xvdb.raw) has each checked against, and restored at, its own size."""
    folder = tmp_path / "web01" / "backup-2019-09-05-(00:10:01)"
    for device, size in (("xvda", 4096), ("xvdb", 8192)):
        (folder / ("DISK-" + device)).mkdir(parents=True)
        (folder / ("DISK-" + device) / "vdi.cfg").write_text("virtual_size=%d\n" % size)
        (folder / ("DISK-" + device) / "vbd.cfg").write_text("userdevice=%d\n" % (size // 8192))
    (folder / "web01.raw").write_bytes(bytes(4096))
    (folder / "web01-xvdb.raw").write_bytes(bytes(8192))
    (folder / "success").write_text("")
    assert vmbackup.verify_backup(str(folder)).status == "good"
    items = vmbackup.plan_restore(str(folder), None, new_name="web01")
    assert [(i.device, i.userdevice, i.virtual_size) for i in items] == [("xvda", "0", 4096),
                                                                         ("xvdb", "1", 8192)]
    (folder / "web01-xvdb.raw").write_bytes(bytes(4096))     # cut short: xvdb's size, not xvda's
    out = run_vmbackup("verify", folder, exit_code=2)
    assert "web01-xvdb.raw: raw image is 4096 bytes, the disk's virtual_size is 8192" in out


def test_list_diff_and_restore_tell_apart_two_vms_in_one_folder(sim_pool, api, backup_dir):
    """Backed up in different runs, 'a/b' and 'a:b' share the folder a_b: list shows each VM
    with its own backups, diff compares the newest backup's VM with itself, and restore
    refuses the folder, naming each VM's newest backup, and takes a backup folder."""
    from conftest import session
    s = session(sim_pool)
    try:
        uuids = {}
        for old, name in (("web01", "a/b"), ("RESTORE_jira", "a:b")):
            ref = sim_pool.vm(old)[0]
            s.xenapi.VM.set_name_label(ref, name)
            uuids[name] = s.xenapi.VM.get_uuid(ref)
    finally:
        s.xenapi.session.logout()
    args = api(sim_pool) + ["-d", backup_dir]
    for selector in ("a/b", "a[:]b", "a/b"):
        run_vmbackup(*args, "-e", selector)
    folders = backups_of(backup_dir, "a_b")
    assert len(folders) == 3
    listing = json.loads(run_vmbackup("list", "-d", backup_dir, "--json", "-"))
    shared = {vm["uuid"]: [b["name"] for b in vm["backups"]] for vm in listing["vms"]
              if vm["folder"] == "a_b"}
    assert shared == {uuids["a/b"]: [folders[2], folders[0]], uuids["a:b"]: [folders[1]]}
    assert "shared with another VM; uuid %s" % uuids["a:b"] in run_vmbackup("list", "-d", backup_dir)
    changes = json.loads(run_vmbackup("diff", backup_dir / "a_b", "--json", "-"))
    assert changes["a"]["uuid"] == changes["b"]["uuid"] == uuids["a/b"]
    out = run_vmbackup("restore", *api(sim_pool), backup_dir / "a_b", "--preview", exit_code=2)
    assert "holds the backups of 2 VMs" in out
    assert str(backup_dir / "a_b" / folders[1]) in out and uuids["a:b"] in out
    out = run_vmbackup("restore", *api(sim_pool), backup_dir / "a_b" / folders[1], "--preview")
    assert "would restore %s" % (backup_dir / "a_b" / folders[1]) in out
