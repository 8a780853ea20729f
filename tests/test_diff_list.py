"""diff and list on real backups made through the simulated pool."""
import json
import os
import shutil


from conftest import run_vmbackup, session


def test_diff_between_two_backups_of_a_changed_vm(sim_pool, transport, backup_dir):
    args = transport(sim_pool) + ["-d", str(backup_dir)]
    run_vmbackup(*args, "-m", "db01")
    s = session(sim_pool)
    try:
        vm, rec = sim_pool.vm("db01")
        four, eight = str(4 << 30), str(8 << 30)
        s.xenapi.VM.set_memory_limits(vm, four, eight, eight, eight)
        nfs = [r for r, sr in s.xenapi.SR.get_all_records().items() if sr["name_label"] == "NFS storage"][0]
        vdi = s.xenapi.VDI.create({"name_label": "db01 new disk", "name_description": "", "SR": nfs,
                                   "virtual_size": str(2 << 30), "type": "user", "sharable": False,
                                   "read_only": False, "other_config": {}, "xenstore_data": {},
                                   "sm_config": {}, "tags": []})
        s.xenapi.VBD.create({"VM": vm, "VDI": vdi, "userdevice": "4", "bootable": False, "mode": "RW",
                             "type": "Disk", "unpluggable": True, "empty": False, "other_config": {},
                             "qos_algorithm_type": "", "qos_algorithm_params": {}})
        storage = s.xenapi.network.get_by_name_label("Storage network")[0]
        vif0 = [v for v in s.xenapi.VM.get_VIFs(vm) if s.xenapi.VIF.get_device(v) == "0"][0]
        s.xenapi.VIF.move(vif0, storage)
    finally:
        s.xenapi.session.logout()
    run_vmbackup(*args, "-m", "db01")
    out = run_vmbackup("diff", backup_dir / "db01")
    assert "memory_static_max: 4.0G -> 8.0G" in out
    assert "disk xvde added (2.0G" in out
    assert 'VIF 0: network "Pool-wide network associated with eth0" -> "Storage network"' in out
    data = json.loads(run_vmbackup("diff", backup_dir / "db01", "--json", "-"))
    assert len(data["changes"]) >= 3
    # no change: nothing to report
    folders = sorted(os.listdir(str(backup_dir / "db01")))
    out = run_vmbackup("diff", backup_dir / "db01" / folders[-1], backup_dir / "db01" / folders[-1])
    assert "no configuration changes" in out


def test_list_shows_complete_incomplete_and_legacy(sim_pool, api, backup_dir):
    args = api(sim_pool) + ["-d", str(backup_dir)]
    run_vmbackup(*args, "-e", "PRD-print7", "--pool-db-backup")
    vm_dir = backup_dir / "PRD-print7"
    (good,) = os.listdir(str(vm_dir))
    # an interrupted backup, and a NAUbackup folder copied over from the old tool
    shutil.copytree(str(vm_dir / good), str(vm_dir / "backup-2020-01-01-000000"))
    os.unlink(str(vm_dir / "backup-2020-01-01-000000" / "success"))
    legacy = vm_dir / "backup-2019-09-05-(00:10:01)"
    legacy.mkdir()
    shutil.copy(str(vm_dir / good / "PRD-print7.xva"), str(legacy / "PRD-print7.xva"))
    (legacy / "success").write_text("")
    out = run_vmbackup("list", "-d", backup_dir)
    lines = out.splitlines()
    row = lambda key: [l.lower() for l in lines if key in l][0]
    assert "PRD-print7: 2 complete backups, 1 incomplete" in lines  # counted apart
    when = good[len("backup-"):len("backup-") + 10]
    assert " complete" in row(when) and "incomplete" not in row(when)
    assert "incomplete" in row("2020-01-01")
    assert "legacy" in row("2019-09-05")
    assert "pool_db_" in out
    data = json.loads(run_vmbackup("list", "-d", backup_dir, "--json", "-"))
    (vm,) = data["vms"]
    assert (vm["name"], vm["folder"]) == ("PRD-print7", "PRD-print7")
    assert (vm["complete"], vm["incomplete"]) == (2, 1)
    rows = {b["name"]: (b["complete"], b["legacy"]) for b in vm["backups"]}
    assert rows == {good: (True, False), "backup-2020-01-01-000000": (False, False),
                    "backup-2019-09-05-(00:10:01)": (True, True)}
    assert [b["name"] for b in vm["backups"]][0] == good            # newest first
    assert len(data["pool_db"]) == 1 and data["pool_db"][0]["file"].startswith("pool_db_")
    # and verify agrees: the incomplete one is reported, the others are good
    out = run_vmbackup("verify", backup_dir, exit_code=2)
    assert "backup-2020-01-01-000000" in out


def test_diff_reads_compressed_xva_backups(sim_pool, api, backup_dir):
    """diff compares the ova.xml inside .xva.zst and .xva.gz files, not only plain ones."""
    args = api(sim_pool) + ["-d", str(backup_dir), "-e", "PRD-print7"]
    run_vmbackup(*args, "--compress", "zstd")
    s = session(sim_pool)
    try:
        vm, _ = sim_pool.vm("PRD-print7")
        s.xenapi.VM.set_name_description(vm, "moved to the second floor")
    finally:
        s.xenapi.session.logout()
    run_vmbackup(*args, "--compress", "gzip")
    old, new = [backup_dir / "PRD-print7" / f for f in sorted(os.listdir(str(backup_dir / "PRD-print7")))]
    xvas = [[n for n in os.listdir(str(p)) if ".xva" in n][0] for p in (old, new)]
    assert xvas == ["PRD-print7.xva.zst", "PRD-print7.xva.gz"]
    out = run_vmbackup("diff", old / xvas[0], new / xvas[1])
    assert 'name_description: "" -> "moved to the second floor"' in out, out
