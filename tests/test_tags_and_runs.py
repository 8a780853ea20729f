"""Tags never block a backup, and runs and their leftovers are told apart across hosts:
a restored VM backs up again; a killed run's lock and snapshots are cleaned up from another
host as soon as that run is provably over, and never while it lives; xe dies with vmbackup."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import vmbackup
from conftest import VMBACKUP, assert_pool_clean, backups_of, run_vmbackup, session


def complete(backup_dir, vm):
    return [b for b in backups_of(backup_dir, vm)
            if os.path.exists(os.path.join(str(backup_dir), vm, b, "success"))]


def tool_keys(s, cls, ref):
    other = getattr(s.xenapi, cls).get_other_config(ref)
    return sorted(k for k in other if k.startswith("vmbackup_"))


# -- 3. tags never block a backup -------------------------------------------------

@pytest.mark.parametrize("mode, preserve", [("-e", False), ("-e", True), ("-E", False)],
                         ids=["vm-export", "vm-export-preserve", "vdi-export"])
def test_a_restored_vm_backs_up_again(sim_pool, transport, backup_dir, mode, preserve):
    """The .xva carries the snapshot's tagged disks; their copies must not block a backup."""
    args = transport(sim_pool)
    run_vmbackup(*args, "-e", "PRD-print7", "-d", backup_dir)
    s = session(sim_pool)
    try:
        if preserve:   # disaster recovery: the original is gone
            lost = sim_pool.vm("PRD-print7")[0]
            if s.xenapi.VM.get_power_state(lost) != "Halted":
                s.xenapi.VM.hard_shutdown(lost)
            s.xenapi.VM.destroy(lost)
        extra = ["--preserve"] if preserve else ["--name", "print7-copy"]
        run_vmbackup("restore", *args, backup_dir / "PRD-print7", *extra)
        name = "PRD-print7" if preserve else "print7-copy"
        target = sim_pool.vm(name)[0]
        vdis = [s.xenapi.VBD.get_VDI(v) for v in s.xenapi.VM.get_VBDs(target)
                if s.xenapi.VBD.get_type(v) == "Disk"]
        # restore leaves none of the tool's keys on what it created
        assert tool_keys(s, "VM", target) == []
        assert vdis and all(tool_keys(s, "VDI", v) == [] for v in vdis)
        # and a disk that still carries a copied tag (restored by an older version) backs up
        s.xenapi.VDI.add_to_other_config(vdis[0], vmbackup.TAG_KEY,
                                         "00000000-0000-0000-0000-000000000000 h 1 2020-01-01T00:00:00")
    finally:
        s.xenapi.session.logout()
    run_vmbackup(*args, mode, name, "-d", backup_dir)
    assert complete(backup_dir, name)[-1:]
    left = sim_pool.leftovers()     # the restored disks are the only VDIs made in the test
    assert left["snapshots"] == [] and {v["ref"] for v in left["vdis"]} == set(vdis)
