"""Restore round trips through the simulated pool, over both transports: what comes back
is byte for byte what the VM held at snapshot time, and the original is untouched."""
import datetime
import os

import pytest

from conftest import run_vmbackup, session


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


def test_preserve_keeps_name_and_macs(sim_pool, api, backup_dir):
    args = api(sim_pool)
    ref, _ = sim_pool.vm("db01")
    _, disks, vifs = describe_vm(sim_pool, ref)
    run_vmbackup(*args, "-e", "db01", "-d", backup_dir, "--compress", "zstd")
    run_vmbackup("restore", backup_folder(backup_dir, "db01"), *args, "--preserve",
                 "--sr", "Local storage on xcp-ng-a" if False else "NFS storage", "--start")
    both = vms_named(sim_pool, "db01")
    assert len(both) == 2
    (new,) = [r for r in both if r != ref]
    rec, new_disks, new_vifs = describe_vm(sim_pool, new)
    assert new_vifs == vifs and new_disks == disks and rec["power_state"] == "Running"


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
