"""Preview and selection against the simulated pool: legacy and modern command lines,
JSON output, nothing written or snapshotted, constant XAPI round trips."""
import json
import os

import pytest

import vmbackup
from conftest import run_vmbackup
from xapisim import pools, start_pool

NAU_STYLE = """\
# weekly backups, written the way NAUbackup's documentation writes them
pool_db_backup=0
max_backups=4
backup_dir={backup_dir}
status_log={status_log}
server={server}
password_file={password_file}

exclude=DEV-phishing-test
exclude=PRD-PRINT$
vdi-export=DEV-web3:7
vdi-export=DEV-mySql:3:xvda;xvdb
vm-export=PRD-.*print[4-5]$:5
vm-export=PRD-.*print[6-8]$:10
vm-export=.*SAVE$:5
vm-export=web01
vm-export=DEV.*:2
vm-export=dup-vm
"""


@pytest.fixture
def weekly(sim_pool, api, backup_dir, tmp_path):
    args = api(sim_pool)
    cfg = tmp_path / "weekly.cfg"
    cfg.write_text(NAU_STYLE.format(backup_dir=backup_dir, status_log=tmp_path / "status.log",
                                    server=sim_pool.url,
                                    password_file=args[args.index("--password-file") + 1]))
    return cfg


def preview_json(*args, exit_code=0):
    out = run_vmbackup(*args, "--json", "-", exit_code=exit_code)
    return json.loads(out[out.index("{"):])


def test_preview_shows_selection_and_changes_nothing(sim_pool, weekly, backup_dir, tmp_path):
    sim_pool.calls.clear()
    out = run_vmbackup("-c", weekly, "--preview", exit_code=2)   # dup-vm: an error
    assert "nothing is snapshotted" in out
    for line in ("DEV-web3", "vdi-export", "max_backups=7", "PRD-print4", "PRD-fileserverSAVE"):
        assert line in out
    assert "***ERROR - 2 VMs are named 'dup-vm'" in out
    assert "Preview: the run would start, but end with errors (exit 2, S:6 W:1 E:1)" in out
    assert os.listdir(str(backup_dir)) == []
    assert not (tmp_path / "status.log").exists()
    written = [c.method for c in sim_pool.calls if not c.method.startswith(("session.",))
               and ".get_" not in c.method]
    assert written == []


def test_preview_json_contract(sim_pool, weekly):
    data = preview_json("-c", weekly, "--preview", exit_code=2)
    assert data["preview"] is True and data["status"] == "error"
    vms = {v["name"]: v for v in data["vms"]}
    assert vms["DEV-web3"]["mode"] == "vdi-export" and vms["DEV-web3"]["max_backups"] == 7
    assert vms["DEV-web3"]["disks"] == ["xvda"]
    assert vms["DEV-mySql"]["disks"] == ["xvda", "xvdb"] and vms["DEV-mySql"]["max_backups"] == 3
    assert vms["PRD-print4"]["max_backups"] == 5 and vms["PRD-print7"]["max_backups"] == 10
    assert vms["web01"]["mode"] == "vm-export" and vms["web01"]["disks"] == ["xvda", "xvdb"]
    assert "DEV-phishing-test" not in vms
    assert {e["name"] for e in data["excluded"]} == {"DEV-phishing-test"}
    assert "db01" in {n["name"] for n in data["not_selected"]}
    (err,) = data["errors"]
    uuids = [rec["uuid"] for ref, rec in sim_pool_dups(sim_pool)]
    assert all(u in err for u in uuids)
    assert data["warnings"] == ["vm not found: exclude=PRD-PRINT$ (%s:10)" % weekly]
    assert set(vms[next(iter(vms))]) >= {"name", "uuid", "mode", "max_backups", "disks"}


def sim_pool_dups(pool):
    import XenAPI
    s = XenAPI.Session(pool.url)
    s.xenapi.login_with_password(pool.user, pool.password)
    try:
        return [(r, rec) for r, rec in s.xenapi.VM.get_all_records().items()
                if rec["name_label"] == "dup-vm" and not rec["is_a_template"]]
    finally:
        s.xenapi.session.logout()


def test_nobak_disk_shown_as_left_out(sim_pool, api, backup_dir):
    data = preview_json(*api(sim_pool), "-e", "app01", "-d", backup_dir, "--preview")
    (vm,) = data["vms"]
    assert vm["disks"] == ["xvda"] and vm["skipped_disks"] == ["xvdb"]


def test_legacy_and_modern_previews_select_the_same(sim_pool, api, weekly, backup_dir, monkeypatch):
    modern = preview_json("-c", weekly, "--preview", exit_code=2)
    legacy_out = run_vmbackup(sim_pool.password, weekly, "preview", exit_code=2)
    modern_out = run_vmbackup("-c", weekly, "--preview", exit_code=2)
    assert legacy_out == modern_out
    # a legacy vm-selector, and the modern equivalent
    monkeypatch.setenv("VMBACKUP_SERVER", sim_pool.url)
    monkeypatch.setenv("VMBACKUP_PASSWORD", sim_pool.password)
    # (the built-in backup_dir /snapshots/BACKUPS does not exist here: both say so)
    a = run_vmbackup(sim_pool.password, "vdi-export=DEV-web3", "preview", exit_code=2)
    b = run_vmbackup("-E", "DEV-web3", "-d", "/snapshots/BACKUPS", "--preview", exit_code=2)
    pick = lambda text: [l for l in text.splitlines() if l.startswith("  DEV-web3")]
    assert pick(a) == pick(b) and "vdi-export" in pick(a)[0]
    assert "DEV-web3" in {v["name"] for v in modern["vms"]}


def test_legacy_password_file_and_selector(sim_pool, monkeypatch, tmp_path):
    pw = tmp_path / "VmBackup.pass"
    run_vmbackup(sim_pool.password, "create-password-file=%s" % pw)
    monkeypatch.setenv("VMBACKUP_SERVER", sim_pool.url)
    out = run_vmbackup(pw, "DEV mySql", "preview", exit_code=2)   # no such VM: a warning
    assert "***WARNING - vm not found: vm-export=DEV mySql" in out
    out = run_vmbackup(pw, "DEV-my.*", "preview", exit_code=2)
    assert "  DEV-mySql " in out and "backup_dir=/snapshots/BACKUPS (default)" in out


def test_invalid_preview_exits_2(sim_pool, api, tmp_path):
    out = run_vmbackup(*api(sim_pool), "-e", "web01", "-d", tmp_path / "missing", "--preview",
                       exit_code=2)
    assert "backup_dir=%s (command line): the folder does not exist" % (tmp_path / "missing") in out


def test_wrong_password_is_one_line(sim_pool, api, backup_dir, tmp_path):
    pw = tmp_path / "wrong.pw"
    pw.write_text("not-the-password\n")
    pw.chmod(0o600)
    out = run_vmbackup("--server", sim_pool.url, "--password-file", pw, "-e", "web01",
                       "-d", backup_dir, "--preview", exit_code=2)
    assert out.strip().splitlines()[-1] == (
        "Preview: the run would not start (exit 2): cannot log in to %s: authentication failed "
        "for user 'root'" % sim_pool.url)
    assert "not-the-password" not in out


def test_unreachable_server_is_one_line(backup_dir):
    out = run_vmbackup("--server", "http://127.0.0.1:9/", "-e", "web01", "-d", backup_dir,
                       "--preview", exit_code=2)
    assert "cannot log in to http://127.0.0.1:9/" in out and "Traceback" not in out


def count_calls(pool, api, backup_dir):
    pool.calls.clear()
    run_vmbackup(*api(pool), "-e", ".*", "-d", backup_dir, "--preview", "--json", os.devnull)
    return pool.calls.count()


def test_selection_reads_the_pool_in_constant_calls(api, backup_dir):
    with start_pool(pools.simple_pool(vms=["a", "b", "c"])) as small:
        few = count_calls(small, api, backup_dir)
    with start_pool(pools.large_pool(2000)) as large:
        many = count_calls(large, api, backup_dir)
        data = preview_json(*api(large), "-e", "vm-.*", "-d", backup_dir, "--preview")
        assert len(data["vms"]) == 2000
    # the whole pool is read in whole tables; three VMs record by record (read_pool)
    assert many <= 15 and few <= 15 + vmbackup.FEW_RECORDS
