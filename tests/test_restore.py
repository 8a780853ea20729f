"""Restore round trips through the simulated pool, over both transports: what comes back
is byte for byte what the VM held at snapshot time, and the original is untouched."""
import datetime
import json
import os
import subprocess
import sys

import pytest

import vmbackup
from conftest import VMBACKUP, run_vmbackup, session


def describe_vm(pool, ref):
    """{userdevice: (virtual_size, sha256)} of disks, [(device, network name, MAC)] of VIFs."""
    s = session(pool)
    try:
        rec = s.xenapi.VM.get_record(ref)
        disks = {}
        for vbd_ref in rec["VBDs"]:
            vbd = s.xenapi.VBD.get_record(vbd_ref)
            if vbd["type"] == "Disk" and not vbd["empty"]:
                vdi = s.xenapi.VDI.get_record(vbd["VDI"])
                disks[vbd["userdevice"]] = (int(vdi["virtual_size"]),
                                            pool.vdi_content(vdi["uuid"]).sha256())
        vifs = sorted((v["device"], s.xenapi.network.get_name_label(v["network"]), v["MAC"])
                      for v in (s.xenapi.VIF.get_record(r) for r in rec["VIFs"]))
        return rec, disks, vifs
    finally:
        s.xenapi.session.logout()


def vms_named(pool, name):
    s = session(pool)
    try:
        return [r for r, rec in s.xenapi.VM.get_all_records().items()
                if rec["name_label"] == name and not rec["is_a_snapshot"]]
    finally:
        s.xenapi.session.logout()


def backup_folder(backup_dir, vm):
    vm_dir = os.path.join(str(backup_dir), vm)
    (name,) = [n for n in os.listdir(vm_dir) if n.startswith("backup-")]
    return os.path.join(vm_dir, name)


def first_disk_vdi(pool, vm_name):
    s = session(pool)
    try:
        ref, _ = pool.vm(vm_name)
        for vbd_ref in s.xenapi.VM.get_VBDs(ref):
            vbd = s.xenapi.VBD.get_record(vbd_ref)
            if vbd["userdevice"] == "0":
                return s.xenapi.VDI.get_uuid(vbd["VDI"])
    finally:
        s.xenapi.session.logout()


def test_vm_export_round_trip(sim_pool, transport, backup_dir):
    args = transport(sim_pool)
    ref, _ = sim_pool.vm("web01")
    _, disks_then, vifs_then = describe_vm(sim_pool, ref)
    run_vmbackup(*args, "-e", "web01", "-d", backup_dir)
    sim_pool.write_vdi(first_disk_vdi(sim_pool, "web01"), 0, b"changed after the backup" * 100)
    rec_now, disks_now, vifs_now = describe_vm(sim_pool, ref)
    assert disks_now != disks_then

    out = run_vmbackup("restore", os.path.join(str(backup_dir), "web01"), *args)
    name = "web01 (restored %s)" % datetime.date.today().isoformat()
    assert "restored vm" in out
    (new,) = vms_named(sim_pool, name)
    new_rec, new_disks, new_vifs = describe_vm(sim_pool, new)
    assert new_disks == disks_then                       # byte for byte, at snapshot time
    assert [(d, n) for d, n, _ in new_vifs] == [(d, n) for d, n, _ in vifs_then]
    assert not set(m for _, _, m in new_vifs) & set(m for _, _, m in vifs_then)  # new MACs
    assert new_rec["is_a_template"] is False and new_rec["is_a_snapshot"] is False
    assert new_rec["memory_static_max"] == rec_now["memory_static_max"]
    assert "vmbackup_snapshot" not in new_rec["other_config"]
    # the original is untouched
    rec_after, disks_after, vifs_after = describe_vm(sim_pool, ref)
    assert (rec_after["name_label"], rec_after["power_state"]) == ("web01", "Running")
    assert disks_after == disks_now and vifs_after == vifs_now
    assert not sim_pool.leftovers()["snapshots"]


def destroy_vm(pool, name):
    s = session(pool)
    try:
        ref, _ = pool.vm(name)
        if s.xenapi.VM.get_power_state(ref) != "Halted":
            s.xenapi.VM.hard_shutdown(ref)
        for vbd in s.xenapi.VM.get_VBDs(ref):
            vdi = s.xenapi.VBD.get_VDI(vbd)
            if vdi != "OpaqueRef:NULL":
                s.xenapi.VDI.destroy(vdi)
        s.xenapi.VM.destroy(ref)
    finally:
        s.xenapi.session.logout()


def test_preserve_next_to_the_original_is_refused_unless_forced(sim_pool, transport, backup_dir):
    args = transport(sim_pool)
    ref, _ = sim_pool.vm("db01")
    _, disks, vifs = describe_vm(sim_pool, ref)
    run_vmbackup(*args, "-e", "db01", "-d", backup_dir, "--compress", "zstd")
    folder = backup_folder(backup_dir, "db01")
    sim_pool.calls.clear()
    for extra in ([], ["--preview"]):      # the preview refuses as the restore does
        out = run_vmbackup("restore", folder, *args, "--preserve", *extra, exit_code=2)
        assert "refusing to restore db01: --preserve: VM 'db01' (%s, halted): it is the " \
            "backed-up VM itself; it has the same name; it uses MAC %s (" \
            % (sim_pool.vm("db01")[1]["uuid"], ", ".join(m.lower() for _, _, m in vifs)) in out
        assert "--force" in out
    assert not [r for r in sim_pool.calls.requests() if r.method == "PUT"]
    assert vms_named(sim_pool, "db01") == [ref]
    run_vmbackup("restore", folder, *args, "--preserve", "--sr", "NFS storage", "--start", "--force")
    (new,) = [r for r in vms_named(sim_pool, "db01") if r != ref]
    rec, new_disks, new_vifs = describe_vm(sim_pool, new)
    assert new_vifs == vifs and new_disks == disks and rec["power_state"] == "Running"


def test_preserve_after_the_original_is_gone(sim_pool, transport, backup_dir):
    args = transport(sim_pool)
    ref, _ = sim_pool.vm("db01")
    _, disks, vifs = describe_vm(sim_pool, ref)
    run_vmbackup(*args, "-e", "db01", "-d", backup_dir)
    destroy_vm(sim_pool, "db01")
    run_vmbackup("restore", backup_folder(backup_dir, "db01"), *args, "--preserve")
    (new,) = vms_named(sim_pool, "db01")
    _, new_disks, new_vifs = describe_vm(sim_pool, new)
    assert new_vifs == vifs and new_disks == disks


def test_preserve_refused_when_another_vm_took_a_mac(sim_pool, api, backup_dir):
    args = api(sim_pool)
    run_vmbackup(*args, "-e", "db01", "-d", backup_dir)
    s = session(sim_pool)
    try:
        ref, _ = sim_pool.vm("db01")
        mac = s.xenapi.VIF.get_MAC(s.xenapi.VM.get_VIFs(ref)[0])
        s.xenapi.VM.set_name_label(ref, "db01-old")    # renamed, still there: same uuid
        other, _ = sim_pool.vm("nodisk-vm")
        vif = s.xenapi.VM.get_VIFs(other)[0]
        network = s.xenapi.VIF.get_network(vif)
        s.xenapi.VIF.destroy(vif)
        s.xenapi.VIF.create({"device": "0", "network": network, "VM": other, "MAC": mac,
                             "MTU": "1500", "other_config": {}, "qos_algorithm_type": "",
                             "qos_algorithm_params": {}})
    finally:
        s.xenapi.session.logout()
    out = run_vmbackup("restore", backup_folder(backup_dir, "db01"), *args, "--preserve",
                       exit_code=2)
    assert "VM 'db01-old' (%s, halted): it is the backed-up VM itself; it uses MAC %s" \
        % (sim_pool.vm("db01-old")[1]["uuid"], mac.lower()) in out
    assert "VM 'nodisk-vm' (" in out and "): it uses MAC %s" % mac.lower() in out
    assert vms_named(sim_pool, "db01") == []


def test_restoring_twice_gives_a_free_name_and_a_taken_name_is_refused(sim_pool, transport,
                                                                       backup_dir):
    args = transport(sim_pool)
    run_vmbackup(*args, "-e", "PRD-print7", "-d", backup_dir)
    vm_dir = os.path.join(str(backup_dir), "PRD-print7")
    name = "PRD-print7 (restored %s)" % datetime.date.today().isoformat()
    run_vmbackup("restore", vm_dir, *args)
    out = run_vmbackup("restore", vm_dir, *args, "--preview")
    assert repr(name + " 2") in out
    out = run_vmbackup("restore", vm_dir, *args)
    assert len(vms_named(sim_pool, name)) == 1 and len(vms_named(sim_pool, name + " 2")) == 1
    assert "restored vm" in out and out.rstrip().endswith(name + " 2")
    out = run_vmbackup("restore", vm_dir, *args, "--name", "web01", exit_code=2)
    assert "--name web01: a VM of that name is in the pool" in out
    assert len(vms_named(sim_pool, "web01")) == 1


@pytest.mark.parametrize("fmt", ["raw", "vhd"])
def test_vdi_export_round_trip_attached(sim_pool, transport, backup_dir, fmt):
    args = transport(sim_pool)
    ref, _ = sim_pool.vm("db01")
    _, disks, _ = describe_vm(sim_pool, ref)
    run_vmbackup(*args, "-E", "db01::xvda;xvdb", "--vdi-format", fmt, "-d", backup_dir)
    out = run_vmbackup("restore", os.path.join(str(backup_dir), "db01"), *args,
                       "--attach-to", "nodisk-vm")
    assert len([l for l in out.splitlines() if l.startswith("restored disk ")]) == 2
    target, _ = sim_pool.vm("nodisk-vm")
    _, got, _ = describe_vm(sim_pool, target)
    assert got == {"0": disks["0"], "1": disks["1"]}


@pytest.mark.parametrize("power, plug_fails", [("Halted", False), ("Running", False),
                                               ("Running", True)],
                         ids=["halted", "running", "running-plug-refused"])
def test_attach_to_plugs_the_disks_into_a_running_vm(sim_pool, transport, backup_dir, power,
                                                     plug_fails):
    """--attach-to links the disks; a running VM gets them plugged at once (VBD.plug; xe
    vbd-plug), a halted one when it starts; a refused plug is a warning (exit 1), the
    restored disk stays linked."""
    args = transport(sim_pool)
    run_vmbackup(*args, "-E", "db01::xvda;xvdb", "-d", backup_dir)
    _, disks, _ = describe_vm(sim_pool, sim_pool.vm("db01")[0])
    target, _ = sim_pool.vm("nodisk-vm")
    if power == "Running":
        s = session(sim_pool)
        try:
            s.xenapi.VM.start(target, False, False)
        finally:
            s.xenapi.session.logout()
    if plug_fails:
        sim_pool.faults.fail("VBD.plug", "INTERNAL_ERROR", "no hotplug", times=None)
    out = run_vmbackup("restore", os.path.join(str(backup_dir), "db01"), *args,
                       "--attach-to", "nodisk-vm", exit_code=1 if plug_fails else 0)
    rec, got, _ = describe_vm(sim_pool, target)
    assert got == {"0": disks["0"], "1": disks["1"]}
    s = session(sim_pool)
    try:
        vbds = [s.xenapi.VBD.get_record(r) for r in rec["VBDs"]]
    finally:
        s.xenapi.session.logout()
    plugged = power == "Running" and not plug_fails
    assert sorted((b["userdevice"], b["currently_attached"]) for b in vbds) == [
        ("0", plugged), ("1", plugged)]
    if plugged:
        assert sorted(b["device"] for b in vbds) == ["xvda", "xvdb"]
        assert "plugged into the running VM as device 1" in out
    elif plug_fails:
        assert "linked to the running VM as device 1 but not plugged: " in out
        assert "(it is plugged when the VM next starts)" in out
    else:
        assert "linked to the halted VM as device 1: plugged when it starts" in out


def test_restore_preview_changes_nothing(sim_pool, api, backup_dir):
    args = api(sim_pool)
    run_vmbackup(*args, "-e", "PRD-print7", "-d", backup_dir)
    sim_pool.calls.clear()
    out = run_vmbackup("restore", os.path.join(str(backup_dir), "PRD-print7"), *args, "--preview")
    assert "would restore" in out and "PRD-print7 (restored" in out and "NFS storage" in out
    assert not [r for r in sim_pool.calls.requests() if r.method == "PUT"]
    assert len(vms_named(sim_pool, "PRD-print7")) == 1


def test_damaged_backup_is_refused(sim_pool, api, backup_dir):
    args = api(sim_pool)
    run_vmbackup(*args, "-e", "PRD-print7", "-d", backup_dir)
    xva = os.path.join(backup_folder(backup_dir, "PRD-print7"), "PRD-print7.xva")
    with open(xva, "r+b") as handle:
        handle.seek(os.path.getsize(xva) // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    out = run_vmbackup("restore", os.path.join(str(backup_dir), "PRD-print7"), *args, exit_code=2)
    assert "refusing to restore" in out
    assert not [r for r in sim_pool.calls.requests() if r.method == "PUT"]


def test_metadata_only_backup_cannot_be_restored(sim_pool, api, backup_dir):
    args = api(sim_pool)
    run_vmbackup(*args, "-m", "web01", "-d", backup_dir)
    out = run_vmbackup("restore", os.path.join(str(backup_dir), "web01"), *args, exit_code=2)
    assert "metadata-only backup: there is no disk to restore" in out


def test_restore_of_the_backup_dir_asks_for_a_vm_folder_and_names_some(sim_pool, api, backup_dir):
    args = api(sim_pool)
    run_vmbackup(*args, "-m", ".*", "-d", backup_dir, exit_code=2)   # the two dup-vm are refused
    folders = sorted(n for n in os.listdir(str(backup_dir))
                     if os.listdir(os.path.join(str(backup_dir), n)))
    assert len(folders) > vmbackup.NAMED_FOLDERS
    out = run_vmbackup("restore", backup_dir, *args, exit_code=2)
    assert "holds no complete backup" not in out
    assert ("%s is a backup_dir, not a VM folder: give one of its VM folders (or a backup folder "
            "in one): %s, ... (%d VM folders)" % (backup_dir, ", ".join(
                folders[:vmbackup.NAMED_FOLDERS]), len(folders))) in out, out
    assert len(out.strip().splitlines()) == 1


def test_a_vm_folder_restores_its_newest_data_backup_past_hourly_metadata(sim_pool, api, backup_dir):
    """README's weekly .xva and hourly -m on one backup_dir: `restore VM_FOLDER` takes the
    newest backup with disks, not the metadata-only backup of the last hour."""
    args = api(sim_pool)
    run_vmbackup(*args, "-e", "web01", "-d", backup_dir)
    (data,) = os.listdir(str(backup_dir / "web01"))
    run_vmbackup(*args, "-m", "web01", "-d", backup_dir)
    vm_dir = os.path.join(str(backup_dir), "web01")
    out = run_vmbackup("restore", vm_dir, *args, "--preview")
    assert "restoring from %s (the newest complete backup with disks in %s: newer ones are " \
        "metadata-only)" % (os.path.join(vm_dir, data), vm_dir) in out
    assert "would restore" in out and "web01.xva" in out


def test_a_bad_backup_names_an_older_backup_with_disks_not_a_metadata_only_one(sim_pool, api,
                                                                               backup_dir):
    args = api(sim_pool)
    vm_dir = os.path.join(str(backup_dir), "web01")
    run_vmbackup(*args, "-e", "web01", "-d", backup_dir)
    (older,) = os.listdir(vm_dir)
    run_vmbackup(*args, "-m", "web01", "-d", backup_dir)
    run_vmbackup(*args, "-e", "web01", "-d", backup_dir)
    newest = max(os.listdir(vm_dir))
    with open(os.path.join(vm_dir, newest, "web01.xva"), "r+b") as handle:
        handle.seek(4096)
        handle.write(b"X")
    out = run_vmbackup("restore", vm_dir, *args, exit_code=2)
    assert "the newest good backup is %s:" % os.path.join(vm_dir, older) in out


def test_restore_json_to_stdout_is_json_alone(sim_pool, api, backup_dir):
    args = api(sim_pool)
    run_vmbackup(*args, "-e", "PRD-print7", "-d", backup_dir)
    for extra, key in ((["--preview"], "would_restore"), ([], "restored")):
        proc = subprocess.run([sys.executable, VMBACKUP, "restore", str(backup_dir / "PRD-print7"),
                               "--json", "-"] + [str(a) for a in args + extra],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True)
        assert proc.returncode == 0, proc.stderr
        (vm,) = json.loads(proc.stdout)[key]
        assert vm["name"] == "PRD-print7 (restored %s)" % datetime.date.today().isoformat()


def test_attach_to_checks_the_devices_are_free_in_the_preview_too(sim_pool, transport,
                                                                  backup_dir):
    args = transport(sim_pool)
    run_vmbackup(*args, "-E", "db01::xvda;xvdb", "-d", backup_dir)
    vm_dir = os.path.join(str(backup_dir), "db01")
    sim_pool.calls.clear()
    for extra in (["--preview"], []):
        out = run_vmbackup("restore", vm_dir, *args, "--attach-to", "db01", *extra, exit_code=2)
        assert "--attach-to db01: userdevice 0 (for xvda) is taken by its disk xvda" in out
        assert "userdevice 1 (for xvdb) is taken" in out
    assert not [r for r in sim_pool.calls.requests() if r.method == "PUT"]
    assert sim_pool.calls.count("VDI.create") == 0


def test_restore_says_which_backup_it_chose_and_that_it_verified_it(sim_pool, transport,
                                                                    backup_dir):
    args = transport(sim_pool)
    run_vmbackup(*args, "-e", "PRD-print7", "-d", backup_dir, "--max-backups", "3")
    run_vmbackup(*args, "-e", "PRD-print7", "-d", backup_dir, "--max-backups", "3")
    vm_dir = os.path.join(str(backup_dir), "PRD-print7")
    older, newest = [os.path.join(vm_dir, n) for n in sorted(os.listdir(vm_dir))]
    out = run_vmbackup("restore", vm_dir, *args, "--preview")
    assert "restoring from %s (the newest complete backup in %s)" % (newest, vm_dir) in out
    assert "verified PRD-print7/%s: every file's size and SHA-256 match the manifest" \
        % os.path.basename(newest) in out
    xva = os.path.join(newest, "PRD-print7.xva")
    with open(xva, "r+b") as handle:
        handle.seek(os.path.getsize(xva) // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    out = run_vmbackup("restore", vm_dir, *args, exit_code=2)
    assert "%s is bad: refusing to restore it" % newest in out
    assert "the newest good backup is %s: restore it with `vmbackup.py restore %s`" \
        % (older, older) in out
    out = run_vmbackup("restore", older, *args)
    assert "restoring from %s (as named)" % older in out and "restored vm" in out


# -- the guards' decisions, as tables -----------------------------------------------------

ME = vmbackup.BackupIdentity("web01", "u-1", ("aa:00:00:00:00:01",))


def pool_of(*vms):
    """({ref: VM record}, {ref: VIF record}) of (name, uuid, MACs, flags) tuples."""
    records, vifs = {}, {}
    for i, (name, uuid, macs, flags) in enumerate(vms):
        refs = ["vif-%d-%d" % (i, j) for j in range(len(macs))]
        vifs.update({r: {"MAC": m} for r, m in zip(refs, macs)})
        records["vm-%d" % i] = dict({"name_label": name, "uuid": uuid, "VIFs": refs,
                                     "power_state": "Running"}, **flags)
    return records, vifs


@pytest.mark.parametrize("vms, expected", [
    ((), []),
    ((("web01", "u-1", ("aa:00:00:00:00:01",), {}),),
     ["VM 'web01' (u-1, running): it is the backed-up VM itself; it has the same name; "
      "it uses MAC aa:00:00:00:00:01"]),
    ((("web01-old", "u-1", (), {}),), ["VM 'web01-old' (u-1, running): it is the backed-up VM itself"]),
    ((("web01", "u-2", (), {"power_state": "Halted"}),),
     ["VM 'web01' (u-2, halted): it has the same name"]),
    ((("db01", "u-3", ("AA:00:00:00:00:01",), {}),), ["VM 'db01' (u-3, running): it uses MAC aa:00:00:00:00:01"]),
    ((("web01", "u-1", ("aa:00:00:00:00:01",), {"is_a_snapshot": True}),
      ("web01", "u-4", (), {"is_a_template": True})), []),
], ids=["empty-pool", "the-original", "renamed-original", "same-name", "same-mac-any-case",
        "snapshots-and-templates-ignored"])
def test_preserve_conflicts(vms, expected):
    assert vmbackup.preserve_conflicts(ME, *pool_of(*vms)) == expected


@pytest.mark.parametrize("taken, expected", [
    (set(), "web01 (restored 2026-12-01)"),
    ({"web01 (restored 2026-12-01)"}, "web01 (restored 2026-12-01) 2"),
    ({"web01 (restored 2026-12-01)", "web01 (restored 2026-12-01) 2"}, "web01 (restored 2026-12-01) 3"),
], ids=["free", "once", "twice"])
def test_free_name(taken, expected):
    assert vmbackup.free_name("web01 (restored 2026-12-01)", taken) == expected
