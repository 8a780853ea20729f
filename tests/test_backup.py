"""The backup run, end to end through the simulated pool, over both transports:
snapshot, export, metadata, manifest, retention, pool and host backups."""
import json
import os
import subprocess
import tarfile

import pytest

from vmbackup import sha256_file
from conftest import assert_pool_clean, backups_of, run_vmbackup, session
from xapisim import pools, start_pool


def only_backup(backup_dir, folder):
    (name,) = backups_of(backup_dir, folder)
    return os.path.join(str(backup_dir), folder, name)


def vm_disks(pool, name):
    """{userdevice: (vdi uuid, virtual_size, sha256 of content)} of a VM's disks, read over XenAPI."""
    s = session(pool)
    try:
        ref, rec = pool.vm(name)
        found = {}
        for vbd_ref in s.xenapi.VM.get_VBDs(ref):
            vbd = s.xenapi.VBD.get_record(vbd_ref)
            if vbd["type"] != "Disk" or vbd["empty"]:
                continue
            vdi = s.xenapi.VDI.get_record(vbd["VDI"])
            found[str(vbd["userdevice"])] = (vdi["uuid"], int(vdi["virtual_size"]),
                                            pool.vdi_content(vdi["uuid"]).sha256())
        return found
    finally:
        s.xenapi.session.logout()


def xva_disks(xva_path, workdir):
    """Reassemble every disk of an XVA with Debian's xva-img; return {Ref:N: sha256}."""
    workdir.mkdir()
    subprocess.run(["tar", "-xf", str(xva_path), "-C", str(workdir)], check=True)
    found = {}
    for entry in sorted(os.listdir(str(workdir))):
        if entry.startswith("Ref:"):
            out = workdir / (entry.replace(":", "_") + ".raw")
            subprocess.run(["xva-img", "-s", "disk-export", str(workdir / entry) + "/", str(out)],
                           check=True, stdout=subprocess.DEVNULL)
            found[entry] = sha256_file(str(out))
    return found


@pytest.fixture
def sha1_pool():
    """A small pool whose XVAs carry SHA-1 `.checksum` members, which xva-img verifies."""
    desc = pools.simple_pool(vms=[
        {"name": "running-vm", "power_state": "Running", "host": "host1",
         "disks": [{"size": "3M", "blocks": [0, 7, 30]}, {"size": "2M", "blocks": [1, 20]}]},
        {"name": "halted-vm", "disks": [{"size": 2 * 1048576 + 65536, "blocks": [0, 32]}]},
    ], checksum="sha1")
    with start_pool(desc) as pool:
        yield pool


def test_vm_export_running_and_halted_xva_equals_disks(sha1_pool, transport, backup_dir, tmp_path):
    before = {name: vm_disks(sha1_pool, name) for name in ("running-vm", "halted-vm")}
    run_vmbackup(*transport(sha1_pool), "-e", "running-vm", "-e", "halted-vm", "-d", backup_dir)
    for name in ("running-vm", "halted-vm"):
        folder = only_backup(backup_dir, name)
        assert os.path.exists(os.path.join(folder, "success"))
        xva = os.path.join(folder, name + ".xva")
        got = sorted(xva_disks(xva, tmp_path / ("x-" + name)).values())
        assert got == sorted(d[2] for d in before[name].values())
        with tarfile.open(xva) as archive:
            assert archive.getnames()[0] == "ova.xml"
    assert_pool_clean(sha1_pool)
    # the VMs are untouched: still the same power state and disks
    assert sha1_pool.vm("running-vm")[1]["power_state"] == "Running"


@pytest.mark.parametrize("fmt", ["raw", "vhd"])
def test_vdi_export_selected_disks(sim_pool, transport, backup_dir, tmp_path, fmt):
    disks = vm_disks(sim_pool, "db01")
    run_vmbackup(*transport(sim_pool), "-E", "db01:3:xvda;xvdc", "--vdi-format", fmt,
                 "-d", backup_dir)
    folder = only_backup(backup_dir, "db01")
    names = sorted(n for n in os.listdir(folder) if n.endswith("." + fmt))
    assert names == ["db01-xvdc.%s" % fmt, "db01.%s" % fmt]
    for userdevice, fname in (("0", "db01." + fmt), ("2", "db01-xvdc." + fmt)):
        path = os.path.join(folder, fname)
        if fmt == "vhd":
            raw = str(tmp_path / (fname + ".raw"))
            subprocess.run(["qemu-img", "convert", "-O", "raw", "--image-opts",
                            "driver=vpc,force_size_calc=current_size,file.filename=" + path, raw],
                           check=True)
            path = raw
        assert os.path.getsize(path) == disks[userdevice][1]
        assert sha256_file(path) == disks[userdevice][2]
    manifest = json.load(open(os.path.join(folder, "backup.json")))
    assert manifest["mode"] == "vdi-export" and manifest["vdi_format"] == fmt
    assert [d["device"] for d in manifest["disks"]] == ["xvda", "xvdc"]
    assert_pool_clean(sim_pool)


def test_metadata_files_and_manifest(sim_pool, transport, backup_dir):
    run_vmbackup(*transport(sim_pool), "-e", "web01", "-d", backup_dir)
    folder = only_backup(backup_dir, "web01")
    ref, rec = sim_pool.vm("web01")
    vm_cfg = open(os.path.join(folder, "vm.cfg")).read()
    assert "name_label=web01\n" in vm_cfg and "orig_uuid=%s\n" % rec["uuid"] in vm_cfg
    assert "os_version=Debian GNU/Linux 12 (bookworm)\n" in vm_cfg
    assert "VCPUs_max=2\n" in vm_cfg
    vbd = open(os.path.join(folder, "DISK-xvda", "vbd.cfg")).read()
    assert "userdevice=0\n" in vbd and "type=Disk\n" in vbd
    vdi = open(os.path.join(folder, "DISK-xvdb", "vdi.cfg")).read()
    assert "name_label=web01 data\n" in vdi and "virtual_size=4194304\n" in vdi
    vif1 = open(os.path.join(folder, "VIFs", "vif-1.cfg")).read()
    assert "network_name_label=Storage network\n" in vif1 and "MTU=" in vif1
    xml = open(os.path.join(folder, "vm-metadata.xml")).read()
    assert "<name>name_label</name>" in xml and "web01" in xml and "\n  " in xml
    manifest = json.load(open(os.path.join(folder, "backup.json")))
    assert manifest["vm"] == {"name": "web01", "uuid": rec["uuid"], "power_state": "Running"}
    assert manifest["mode"] == "vm-export" and manifest["transport"] == transport.kind
    for entry in manifest["files"]:
        path = os.path.join(folder, entry["name"])
        assert os.path.getsize(path) == entry["size"] and sha256_file(path) == entry["sha256"]
    assert {"web01.xva", "vm-metadata.xml", "vm.cfg"} <= {f["name"] for f in manifest["files"]}
    # the success marker is the newest file: written last
    newest = max(os.listdir(folder), key=lambda n: os.stat(os.path.join(folder, n)).st_mtime_ns)
    assert newest == "success"
    # files 0600, folders 0700
    assert os.stat(os.path.join(folder, "web01.xva")).st_mode & 0o777 == 0o600
    assert os.stat(folder).st_mode & 0o777 == 0o700


def test_nobak_disk_left_out_of_vm_export(sha1_pool_nobak, transport, backup_dir, tmp_path):
    pool = sha1_pool_nobak
    disks = vm_disks(pool, "app01")
    out = run_vmbackup(*transport(pool), "-e", "app01", "-d", backup_dir)
    assert "[NOBAK]" in out
    folder = only_backup(backup_dir, "app01")
    got = list(xva_disks(os.path.join(folder, "app01.xva"), tmp_path / "x").values())
    assert got == [disks["0"][2]]
    assert_pool_clean(pool)
    # the VM itself still has both disks
    assert len(vm_disks(pool, "app01")) == 2


@pytest.fixture
def sha1_pool_nobak():
    desc = pools.simple_pool(vms=[{"name": "app01", "power_state": "Running", "host": "host1",
                                   "disks": [{"name": "app01 system", "size": "2M", "blocks": [0, 12]},
                                             {"name": "app01 scratch [NOBAK]", "size": "2M",
                                              "blocks": [0, 5]}]}], checksum="sha1")
    with start_pool(desc) as pool:
        yield pool


@pytest.mark.parametrize("compress, suffix, tool", [("gzip", ".xva.gz", "gzip"),
                                                     ("zstd", ".xva.zst", "zstd")])
def test_compressed_exports(sim_pool, transport, backup_dir, compress, suffix, tool):
    run_vmbackup(*transport(sim_pool), "-e", "db01", "--compress", compress, "-d", backup_dir)
    folder = only_backup(backup_dir, "db01")
    path = os.path.join(folder, "db01" + suffix)
    tar = subprocess.run([tool, "-dc", path], stdout=subprocess.PIPE, check=True).stdout
    assert tar[:7] == b"ova.xml" and tar[-1024:] == bytes(1024)


def test_retention_five_runs_max_three_with_override(sim_pool, transport, backup_dir, tmp_path):
    cfg = tmp_path / "ret.cfg"
    cfg.write_text("backup_dir=%s\nmax_backups=3\nvm-export=db01\nvm-export=PRD-print7:2\n"
                   "status_log=%s\n" % (backup_dir, tmp_path / "status.log"))
    seen, printer = [], []
    for _ in range(5):
        run_vmbackup(*transport(sim_pool), "-c", cfg)
        seen.append(backups_of(backup_dir, "db01")[-1])
        printer.append(backups_of(backup_dir, "PRD-print7")[-1])
    assert len(set(seen)) == 5 and len(set(printer)) == 5   # each run made a new folder
    assert backups_of(backup_dir, "db01") == seen[-3:]      # the newest 3 kept
    assert backups_of(backup_dir, "PRD-print7") == printer[-2:]   # its :2 override
    assert_pool_clean(sim_pool)
    lines = (tmp_path / "status.log").read_text().splitlines()
    assert len([l for l in lines if ",vmbackup.py," in l and ",begin" in l]) == 5
    assert lines[-1].endswith(",end,SUCCESS,S:2 W:0 E:0")
    assert any(",vm-export," in l and ",end,SUCCESS db01,elapse:" in l for l in lines)


def test_failed_export_leaves_no_success_and_keeps_earlier_backups(sim_pool, transport, backup_dir):
    args = transport(sim_pool) + ["-e", "db01", "-e", "PRD-print7", "-d", str(backup_dir),
                                  "--max-backups", "2"]
    run_vmbackup(*args)
    run_vmbackup(*args)
    good = backups_of(backup_dir, "db01")
    sim_pool.faults.drop_export(after_bytes=100000, times=10, path="/export")
    out = run_vmbackup(*args, exit_code=2)
    assert "db01" in out and "S:0 W:0 E:2" in out
    folders = backups_of(backup_dir, "db01")
    assert set(good) <= set(folders)
    for name in folders:
        path = os.path.join(str(backup_dir), "db01", name)
        assert os.path.exists(os.path.join(path, "success")) == (name in good)
        assert not [f for f in os.listdir(path) if f.endswith((".xva", ".part"))] or name in good
    assert_pool_clean(sim_pool)
    # the next good run removes the incomplete folder, keeps max_backups good ones
    sim_pool.faults.clear()
    # removing the failed run's folder is housekeeping (that run already exited 2): info, exit 0
    out = run_vmbackup(*args, exit_code=0)
    assert "INFO vm=db01: deleting incomplete backup" in out and "WARNING" not in out
    assert len(backups_of(backup_dir, "db01")) == 2


def test_one_vm_failure_does_not_stop_the_others(sim_pool, transport, backup_dir):
    sim_pool.faults.fail("VM.snapshot", "SR_BACKEND_FAILURE_44", "", "There is insufficient space", "",
                         times=1)
    if transport.kind == "xe":
        pass  # xe vm-snapshot calls VM.snapshot too
    out = run_vmbackup(*transport(sim_pool), "-e", "PRD-print4", "-e", "PRD-print7",
                       "-d", backup_dir, exit_code=2)
    assert "SR_BACKEND_FAILURE_44" in out
    done = [vm for vm in ("PRD-print4", "PRD-print7")
            if os.path.isdir(os.path.join(str(backup_dir), vm))
            and any(os.path.exists(os.path.join(str(backup_dir), vm, b, "success"))
                    for b in backups_of(backup_dir, vm))]
    assert len(done) == 1
    assert_pool_clean(sim_pool)


def test_pool_db_and_host_backups_written_and_pruned(sim_pool, transport, backup_dir):
    args = transport(sim_pool) + ["--pool-db-backup", "--host-backup", "--max-backups", "2",
                                  "-d", str(backup_dir)]
    for _ in range(3):
        run_vmbackup(*args)
        import time
        time.sleep(1.01)  # the file names carry seconds
    folders = sorted(os.listdir(str(backup_dir)))
    meta = [f for f in folders if f.startswith("METADATA_")]
    hosts = [f for f in folders if f.startswith("HOST_")]
    assert len(meta) == 1 and len(hosts) == 3
    dumps = os.listdir(os.path.join(str(backup_dir), meta[0]))
    assert len(dumps) == 2 and all(d.startswith("pool_db_") and d.endswith(".dump") for d in dumps)
    text = open(os.path.join(str(backup_dir), meta[0], sorted(dumps)[-1]), "rb").read()
    assert b"<database" in text
    for host in hosts:
        files = os.listdir(os.path.join(str(backup_dir), host))
        assert len(files) == 2 and all(f.endswith(".xbk") for f in files)
    # each host was asked on its own address
    answered = {r.host for r in sim_pool.calls.requests("/host_backup")}
    assert len(answered) == 3


def test_login_through_member_follows_host_is_slave(sim_pool, api, backup_dir):
    member = [url for name, url in sorted(sim_pool.host_urls.items()) if url != sim_pool.url][0]
    args = api(sim_pool)
    args[args.index("--server") + 1] = member
    out = run_vmbackup(*args, "-e", "db01", "-d", backup_dir, "-v")
    assert "pool member" in out
    assert os.path.exists(os.path.join(only_backup(backup_dir, "db01"), "success"))


def test_export_redirected_to_the_host_holding_the_disks(sim_pool, api, backup_dir):
    run_vmbackup(*api(sim_pool), "-e", "local-vm", "-d", backup_dir)
    assert os.path.exists(os.path.join(only_backup(backup_dir, "local-vm"), "success"))
    statuses = [(r.host, r.status) for r in sim_pool.calls.requests("/export")]
    assert any(status == 302 for _, status in statuses)
    assert len({host for host, _ in statuses}) == 2
    assert_pool_clean(sim_pool)


def test_hostile_names_are_backed_up_into_safe_folders(sim_pool, transport, backup_dir, tmp_path):
    names = ["$(touch pwned)", "../../etc", "ünïcødé VM 日本語 ✓", "my VM with spaces",
             "`touch pwned2` ; echo x && rm -rf nothing | cat > /dev/null &", "new\nline", "-rf"]
    args = transport(sim_pool) + ["-d", str(backup_dir)]
    for name in names:
        args += ["-e", __import__("re").escape(name) + "$"]
    run_vmbackup(*args, cwd=str(tmp_path), fork=True, env=dict(os.environ))
    entries = sorted(os.listdir(str(backup_dir)))
    assert "$(touch pwned)" in entries and "_._.._etc" in entries and "ünïcødé VM 日本語 ✓" in entries
    assert "new_line" in entries and "-rf" in entries
    for entry in entries:
        (b,) = backups_of(backup_dir, entry)
        assert os.path.exists(os.path.join(str(backup_dir), entry, b, "success"))
    assert not os.path.exists(str(tmp_path / "pwned")) and not os.path.exists("pwned")
    assert not os.path.exists(str(tmp_path / "pwned2")) and not os.path.exists("pwned2")
    assert not os.path.exists(os.path.join(os.path.dirname(str(backup_dir)), "etc"))
    assert_pool_clean(sim_pool)


def test_metadata_only_backups(sim_pool, transport, backup_dir):
    before = sim_pool.calls.count("VM.snapshot")
    run_vmbackup(*transport(sim_pool), "-m", "web01:5", "-d", backup_dir)
    folder = only_backup(backup_dir, "web01")
    files = set(os.listdir(folder))
    assert {"vm-metadata.xml", "vm.cfg", "backup.json", "success"} <= files
    assert not [f for f in files if f.endswith((".xva", ".raw", ".vhd"))]
    assert sim_pool.calls.count("VM.snapshot") == before
    assert json.load(open(os.path.join(folder, "backup.json")))["mode"] == "meta-export"


def test_json_summary(sim_pool, api, backup_dir, tmp_path):
    out_json = tmp_path / "run.json"
    run_vmbackup(*api(sim_pool), "-e", "db01", "-e", "nosuchvm", "-d", backup_dir,
                 "--json", out_json, exit_code=1)
    data = json.loads(out_json.read_text())
    assert data["status"] == "warning" and data["exit_code"] == 1
    (vm,) = data["vms"]
    assert vm["name"] == "db01" and vm["status"] == "success" and vm["bytes"] > 0
    assert vm["path"].startswith(str(backup_dir))
    assert data["warnings"] == ["vm not found: vm-export=nosuchvm (--vm-export)"]
    assert sim_pool.password not in out_json.read_text()


@pytest.mark.parametrize("release", ["xenserver-7.1", "xcp-ng-8.3"])
def test_quiesce_where_supported_else_normal_snapshot_with_warning(transport, backup_dir, release):
    old = release == "xenserver-7.1"     # before Citrix Hypervisor 8.1: VSS snapshots exist
    desc = pools.simple_pool(vms=[
        {"name": "win", "power_state": "Running", "host": "host1", "os": pools.OS_WINDOWS},
        {"name": "lin", "other_config": {"vmbackup:quiesce": "true"}}],   # no guest agent
        release=release)
    with start_pool(desc) as pool:
        out = run_vmbackup(*transport(pool), "-e", "win", "-e", "lin", "-d", backup_dir,
                           "--quiesce", exit_code=1)
        assert pool.calls.count("VM.snapshot_with_quiesce") == 2
        assert pool.calls.count("VM.snapshot") == (1 if old else 2)
        assert ("MESSAGE_REMOVED" in out) is not old
        assert ("VM_SNAPSHOT_WITH_QUIESCE_NOT_SUPPORTED" in out) is old
        # per VM, from its other_config, without the global switch
        pool.calls.clear()
        run_vmbackup(*transport(pool), "-e", "lin", "-e", "win", "-d", backup_dir, exit_code=1)
        assert pool.calls.count("VM.snapshot_with_quiesce") == 1
        assert not pool.leftovers()["snapshots"]
        for vm in ("win", "lin"):
            assert len([b for b in os.listdir(os.path.join(str(backup_dir), vm))
                        if os.path.exists(os.path.join(str(backup_dir), vm, b, "success"))]) == 2


def test_nobak_disk_skipped_by_vdi_export_and_metadata_only_config(sim_pool, api, backup_dir, tmp_path):
    out = run_vmbackup(*api(sim_pool), "-E", "app01::xvda;xvdb", "-d", backup_dir)
    assert "left out ([NOBAK]): xvdb" in out
    folder = only_backup(backup_dir, "app01")
    assert sorted(f for f in os.listdir(folder) if f.endswith(".raw")) == ["app01.raw"]
    cfg = tmp_path / "meta.cfg"
    cfg.write_text("backup_dir=%s\nmetadata_only=true\nvm-export=db01\nvdi-export=web01\n" % backup_dir)
    before = sim_pool.calls.count("VM.snapshot") + sim_pool.calls.count("VDI.snapshot")
    run_vmbackup(*api(sim_pool), "-c", cfg)
    assert sim_pool.calls.count("VM.snapshot") + sim_pool.calls.count("VDI.snapshot") == before
    for vm in ("db01", "web01"):
        manifest = json.load(open(os.path.join(only_backup(backup_dir, vm), "backup.json")))
        assert manifest["mode"] == "meta-export"


@pytest.mark.parametrize("kind", ["xe", "api"])
def test_remote_pool_through_a_member_and_redirected_export(sim_pool, backup_dir, tmp_path, kind,
                                                            monkeypatch):
    """--server names a pool member: login follows HOST_IS_SLAVE to the master, and the
    export of a VM on a member's local SR follows XAPI's redirect, over xe and the API."""
    for key, value in sim_pool.env().items():
        monkeypatch.setenv(key, value)
    pw = tmp_path / "pw"
    pw.write_text(sim_pool.password)
    pw.chmod(0o600)
    member = [url for url in sim_pool.host_urls.values() if url != sim_pool.url][0]
    args = ["--server", member, "--password-file", pw, "--transport", kind,
            "--xe", sim_pool.xe_path, "-e", "local-vm", "-d", backup_dir, "-v"]
    out = run_vmbackup(*args)
    assert "pool member" in out
    assert os.path.exists(os.path.join(only_backup(backup_dir, "local-vm"), "success"))
    exports = [(r.host, r.status) for r in sim_pool.calls.requests("/export")]
    assert any(status == 302 for _, status in exports) and len({h for h, _ in exports}) == 2
    assert_pool_clean(sim_pool)
