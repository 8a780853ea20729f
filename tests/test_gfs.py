"""GFS retention: borg prune's keep rules over the backup folders' local times, per VM in the
selector or for all in the settings; the run deletes exactly what --preview lists, and never
another VM's, another mode's or the last good backup."""
import datetime
import json
import os
import time

import pytest

import vmbackup
from conftest import backups_of, run_vmbackup
from vmbackup import Keep, parse_selector, plan_retention

D = datetime.datetime


def spec_entries(specs):
    """'2026-11-08 23:59' is a complete backup of that local time; a trailing ' -' an incomplete one."""
    out = []
    for spec in specs:
        done = not spec.endswith(" -")
        when = D.strptime(spec.rstrip(" -"), "%Y-%m-%d %H:%M")
        out.append(("backup-" + vmbackup.stamp(when), when, done))
    return out


def nightly(first, days, hour="00:10"):
    """One backup a night for `days` nights from `first` (YYYY-MM-DD)."""
    start = D.strptime(first, "%Y-%m-%d")
    return ["%s %s" % ((start + datetime.timedelta(days=n)).strftime("%Y-%m-%d"), hour)
            for n in range(days)]


GFS_TABLE = [
    # (id, backups, Keep, the backups kept)
    ("count-only-is-max-backups", nightly("2026-11-01", 6), Keep(3),
     ["2026-11-04 00:10", "2026-11-05 00:10", "2026-11-06 00:10"]),
    ("daily-counts-days-beyond-the-newest", nightly("2026-11-01", 10), Keep(1, daily=3),
     ["2026-11-07 00:10", "2026-11-08 00:10", "2026-11-09 00:10", "2026-11-10 00:10"]),
    ("daily-keeps-each-days-newest",
     ["2026-11-01 08:00", "2026-11-01 20:00", "2026-11-02 08:00", "2026-11-02 20:00",
      "2026-11-03 08:00"], Keep(1, daily=2),
     ["2026-11-01 20:00", "2026-11-02 20:00", "2026-11-03 08:00"]),
    ("last-then-daily", nightly("2026-11-01", 10), Keep(4, daily=3),
     nightly("2026-11-04", 7)),
    ("month-boundary",
     ["2026-01-30 12:00", "2026-01-31 23:59", "2026-02-01 00:00", "2026-02-02 12:00"],
     Keep(1, monthly=1), ["2026-01-31 23:59", "2026-02-02 12:00"]),
    ("year-boundary",
     ["2026-12-30 12:00", "2026-12-31 23:59", "2027-01-01 00:00", "2027-01-02 12:00"],
     Keep(1, yearly=1), ["2026-12-31 23:59", "2027-01-02 12:00"]),
    ("iso-week-spans-new-year",      # Mon 28 Dec 2026 .. Sun 3 Jan 2027 is week 2026-W53
     ["2026-12-27 12:00", "2026-12-28 12:00", "2026-12-31 12:00", "2027-01-03 12:00",
      "2027-01-04 12:00"], Keep(1, weekly=2),
     ["2026-12-27 12:00", "2027-01-03 12:00", "2027-01-04 12:00"]),
    ("week-starts-on-monday",        # Sun 8 Nov 2026 23:59 and Mon 9 Nov 00:01: two weeks
     ["2026-11-02 12:00", "2026-11-08 23:59", "2026-11-09 00:01", "2026-11-10 12:00"],
     Keep(1, weekly=1), ["2026-11-08 23:59", "2026-11-10 12:00"]),
    ("dst-spring-forward",           # Europe: 29 Mar 2026 02:00 -> 03:00, a 23-hour day
     ["2026-03-28 00:30", "2026-03-28 23:30", "2026-03-29 00:30", "2026-03-29 23:30",
      "2026-03-30 00:30"], Keep(1, daily=2),
     ["2026-03-28 23:30", "2026-03-29 23:30", "2026-03-30 00:30"]),
    ("dst-fall-back-repeated-hour",  # 25 Oct 2026 02:00-03:00 twice: newest by its name
     ["2026-10-24 02:30", "2026-10-25 02:15", "2026-10-25 02:45", "2026-10-26 02:30"],
     Keep(1, daily=2), ["2026-10-24 02:30", "2026-10-25 02:45", "2026-10-26 02:30"]),
    ("later-rules-skip-periods-already-kept",   # borg: kept by daily, not counted by weekly
     nightly("2026-11-02", 21), Keep(1, daily=2, weekly=2),
     ["2026-11-08 00:10", "2026-11-15 00:10", "2026-11-20 00:10", "2026-11-21 00:10",
      "2026-11-22 00:10"]),
    ("every-month-with-minus-one", nightly("2026-01-15", 100, "12:00"), Keep(1, monthly=-1),
     ["2026-01-31 12:00", "2026-02-28 12:00", "2026-03-31 12:00", "2026-04-24 12:00"]),
    ("short-history-keeps-the-oldest",           # borg: the first backup ages on
     ["2026-11-01 08:00", "2026-11-01 20:00", "2026-11-02 20:00", "2026-11-03 20:00"],
     Keep(1, daily=7), ["2026-11-01 08:00", "2026-11-01 20:00", "2026-11-02 20:00",
                        "2026-11-03 20:00"]),
    ("incomplete-never-counts-and-goes",
     ["2026-11-01 00:10", "2026-11-02 00:10", "2026-11-03 00:10 -", "2026-11-04 00:10 -"],
     Keep(1, daily=1), ["2026-11-01 00:10", "2026-11-02 00:10"]),
    ("never-the-last-good", ["2026-11-01 00:10", "2026-11-02 00:10", "2026-11-03 00:10 -"],
     Keep(0), ["2026-11-02 00:10"]),
    ("a-full-gfs-year", nightly("2025-11-01", 400), Keep(2, daily=5, weekly=3, monthly=4, yearly=1),
     # 2 newest (Sat 5 and 4 Dec 2026); 5 more days; 3 more weeks (their Sundays; the week
     # of 29 Nov has a daily one, so it counts no more); 4 more months
     # (their last nights; November's is a daily one, so it counts no more); 1 more year
     ["2025-12-31 00:10", "2026-07-31 00:10", "2026-08-31 00:10", "2026-09-30 00:10",
      "2026-10-31 00:10", "2026-11-08 00:10", "2026-11-15 00:10", "2026-11-22 00:10",
      "2026-11-29 00:10", "2026-11-30 00:10", "2026-12-01 00:10", "2026-12-02 00:10",
      "2026-12-03 00:10", "2026-12-04 00:10", "2026-12-05 00:10"]),
]


@pytest.fixture(params=["UTC", "Europe/Berlin", "America/New_York"])
def local_tz(request):
    """The host's time zone must not matter: folder names already hold local time."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = request.param
    time.tzset()
    try:
        yield request.param
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


@pytest.mark.parametrize("specs, keep, kept", [row[1:] for row in GFS_TABLE],
                         ids=[row[0] for row in GFS_TABLE])
def test_gfs_plan(specs, keep, kept, local_tz):
    entries = spec_entries(specs)
    kept_names = {name for name, _, _ in spec_entries(kept)}
    assert kept_names <= {name for name, _, _ in entries}, "the row names a backup it does not have"
    doomed = plan_retention(entries, keep)
    assert sorted(doomed) == sorted(name for name, _, _ in entries if name not in kept_names)


def test_the_run_s_own_backup_counts_but_is_never_listed():
    """An entry named None is the backup a run is about to make (--preview, pre_clean): it
    takes the newest place and its day, and is never among the names to delete."""
    entries = spec_entries(["2026-11-01 00:10", "2026-11-02 00:10", "2026-11-03 00:10"])
    now = [(None, D(2026, 11, 3, 23, 0), True)]
    assert plan_retention(entries + now, Keep(1)) == [n for n, _, _ in entries]
    # the run's backup is 3 Nov's newest: the daily rule keeps 2 Nov's
    assert plan_retention(entries + now, Keep(1, daily=1)) == [entries[0][0], entries[2][0]]
    assert plan_retention(entries, Keep(1, daily=1)) == [entries[0][0]]


def test_a_full_gfs_year_row_is_what_borg_documents():
    """The last row, read as borg's prune doc reads its rules: the newest backup kept (here
    by max_backups), and each later rule adds as many periods as it says."""
    entries = spec_entries(nightly("2025-11-01", 400))
    kept = vmbackup.gfs_kept([(n, w) for n, w, _ in entries], Keep(2, daily=5, weekly=3,
                                                                  monthly=4, yearly=1))
    by_rule = {}
    for rule, _ in kept.values():
        by_rule[rule] = by_rule.get(rule, 0) + 1
    assert by_rule == {"last": 2, "daily": 5, "weekly": 3, "monthly": 4, "yearly": 1}


@pytest.mark.parametrize("text, mode, max_backups, gfs", [
    ("web01:4", "vm-export", 4, None),
    ("web01:4+7d+4w+12m+2y", "vm-export", 4, (7, 4, 12, 2)),
    ("web01:12m", "vm-export", None, (0, 0, 12, 0)),
    ("web01:47d", "vm-export", None, (47, 0, 0, 0)),
    ("web01:-1+-1m", "vm-export", None, (0, 0, -1, 0)),
    ("PRD-.*:2+1y", "meta-export", 2, (0, 0, 0, 1)),
    ("DEV-mySql:3+7d:xvda;xvdb", "vdi-export", 3, (7, 0, 0, 0)),
    ("PRD-.*print[\\d{1,}]$:8", "vm-export", 8, None),
], ids=["count", "all-terms", "months-only", "two-digit-days", "unlimited", "meta", "vdi-devices",
        "nau-regex"])
def test_selector_gfs_terms(text, mode, max_backups, gfs):
    sel = parse_selector(text, mode)
    assert (sel.max_backups, sel.gfs) == (max_backups, gfs)


@pytest.mark.parametrize("text, message", [
    ("web01:7d+3d", "gives the 'd' term twice"),
    ("web01:4+", "write a number, or a number and GFS terms like 4+7d+4w+12m+2y"),
    ("web01:7x", "is not a whole number"),
    ("web01:-2m", "must be at least -1"),
], ids=["twice", "dangling-plus", "unknown-unit", "below-minus-one"])
def test_bad_gfs_terms_are_one_clear_error(text, message, tmp_path):
    cfg = tmp_path / "weekly.cfg"
    cfg.write_text("backup_dir=%s\nvm-export=%s\n" % (tmp_path, text))
    out = run_vmbackup("-c", cfg, "--preview", exit_code=2)
    assert "%s:2: vm-export=%s" % (cfg, text) in out and message in out
    assert "Traceback" not in out


def test_keep_for_takes_the_selectors_terms_else_the_settings():
    config = vmbackup.build_config(cli_values={"keep_daily": 7, "keep_monthly": 12})
    plain = vmbackup.Selected("r", "web01", "u", "vm-export", 4, (),
                              parse_selector("web01", "vm-export"))
    own = plain._replace(max_backups=2, selector=parse_selector("web01:2+3w", "vm-export"))
    assert vmbackup.keep_for(config, plain) == Keep(4, 7, 0, 12, 0)
    assert vmbackup.keep_for(config, own) == Keep(2, 0, 3, 0, 0)
    assert str(vmbackup.keep_for(config, plain)) == "4+7d+12m"


# -- against the simulated pool: the run deletes exactly what the preview listed -----------

def seed(vm_dir, name, mode, uuid, when, complete=True):
    """A backup folder as vmbackup writes it (manifest, then success), dated `when`."""
    folder = vm_dir / ("backup-" + vmbackup.stamp(when))
    folder.mkdir(parents=True)
    if complete:
        manifest = vmbackup.manifest_record({"name": name, "uuid": uuid}, mode, "api",
                                            when.isoformat(), when.isoformat(), [])
        (folder / "backup.json").write_text(json.dumps(manifest))
        (folder / "success").write_text("")
    return folder.name


def seeded_history(sim_pool, backup_dir):
    """PRD-print7's folder: 100 nightly data backups up to last night, metadata-only backups,
    another VM's backup (a name that made the same folder), an unfinished folder and a
    NAUbackup folder from 2019. Returns {kind: [names]}."""
    uuid = sim_pool.vm("PRD-print7")[1]["uuid"]
    vm_dir = backup_dir / "PRD-print7"
    today = D.now().replace(hour=0, minute=10, second=0, microsecond=0)
    nights = [today - datetime.timedelta(days=n) for n in range(1, 101)]
    history = {
        "data": [seed(vm_dir, "PRD-print7", "vm-export" if n % 2 else "vdi-export", uuid, w)
                 for n, w in enumerate(nights)],
        "meta": [seed(vm_dir, "PRD-print7", "meta-export", uuid, w + datetime.timedelta(hours=12))
                 for w in nights[:6]],
        "other": [seed(vm_dir, "PRD:print7", "vm-export", "0000-another-vm", nights[-1]
                       - datetime.timedelta(days=1))],
        "unfinished": [seed(vm_dir, "PRD-print7", "vm-export", uuid,
                            nights[0] + datetime.timedelta(hours=3), complete=False)],
    }
    legacy = vm_dir / "backup-2019-09-05-(00:10:01)"
    legacy.mkdir()
    (legacy / "PRD-print7.xva").write_bytes(b"x")
    (legacy / "success").write_text("")
    history["legacy"] = [legacy.name]
    return history


def test_the_run_deletes_exactly_what_the_preview_listed(sim_pool, transport, backup_dir):
    history = seeded_history(sim_pool, backup_dir)
    args = transport(sim_pool) + ["-d", backup_dir, "-e", "PRD-print7", "--max-backups", "2",
                                  "--keep-daily", "5", "--keep-weekly", "3", "--keep-monthly", "2"]
    before = set(backups_of(backup_dir, "PRD-print7"))
    out = run_vmbackup(*args, "--preview", "--json", "-")
    planned = {d["backup"] for d in json.loads(out[out.index("{"):])["delete"]}
    assert set(backups_of(backup_dir, "PRD-print7")) == before          # the preview deletes nothing
    run_vmbackup(*args)
    after = set(backups_of(backup_dir, "PRD-print7"))
    (new,) = after - before
    assert before - after == planned
    # never another VM's backup, nor a metadata-only one, nor the last good; the unfinished goes
    assert set(history["other"] + history["meta"]) <= after
    assert history["unfinished"][0] in planned
    data_kept = (after - {new}) & set(history["data"] + history["legacy"])
    # 2 newest (this run's and last night's), then the newest of 5 more days, 3 more weeks
    # and 2 more months: 11 of the old ones, each of another day; the 2019 folder is older
    # than any rule reaches
    assert set(history["data"][:6]) <= data_kept and len(data_kept) == 11
    assert len({name[:17] for name in data_kept}) == 11
    assert not any(n.startswith(".deleting-") for n in os.listdir(str(backup_dir / "PRD-print7")))


def test_a_selectors_gfs_terms_win_over_the_settings(sim_pool, api, backup_dir, tmp_path):
    history = seeded_history(sim_pool, backup_dir)
    args = api(sim_pool)
    cfg = tmp_path / "weekly.cfg"
    cfg.write_text("backup_dir=%s\nstatus_log=%s\nkeep_daily=30\nkeep_monthly=-1\n"
                   "vm-export=PRD-.*print[0-9]:3\nvm-export=PRD-print7:1+2d\n"
                   % (backup_dir, tmp_path / "status.log"))
    out = run_vmbackup(*args, "-c", cfg, "-x", "PRD-print[^7]", "--preview")
    assert "keep_daily" in out and "retention 1+2d" in out
    run_vmbackup(*args, "-c", cfg, "-x", "PRD-print[^7]")
    kept = set(backups_of(backup_dir, "PRD-print7")) & set(history["data"])
    # 1 newest (this run's), then the newest of 2 more days: last night and the night before
    assert kept == set(history["data"][:2])
    assert set(history["other"] + history["meta"]) <= set(backups_of(backup_dir, "PRD-print7"))


def test_metadata_only_keeps_the_metadata_rules_not_a_data_selectors(sim_pool, api, backup_dir,
                                                                     tmp_path):
    """--metadata-only counts apart with max_meta_backups and the keep_* settings: the weekly
    selector's MAX (its count and its GFS terms) is for the data backups."""
    cfg = tmp_path / "weekly.cfg"
    cfg.write_text("backup_dir=%s\nkeep_daily=2\nvm-export=PRD-print7:3+30d+12m\n"
                   "meta-export=PRD-print4:5+1w\n" % backup_dir)
    out = run_vmbackup(*api(sim_pool), "-c", cfg, "--metadata-only", "--max-meta-backups", "48",
                       "--preview", "--json", "-")
    vms = json.loads(out[out.index("{"):])["vms"]
    assert [(vm["name"], vm["mode"], vm["max_backups"], vm["retention"]) for vm in vms] == [
        ("PRD-print4", "meta-export", 5, "5+1w"),      # a meta-export selector's own MAX
        ("PRD-print7", "meta-export", 48, "48+2d")]


def test_pre_clean_deletes_the_plan_before_the_export_but_never_the_last_good(
        sim_pool, api, backup_dir):
    history = seeded_history(sim_pool, backup_dir)
    data = set(history["data"])
    args = api(sim_pool) + ["-d", backup_dir, "-e", "PRD-print7", "--pre-clean", "--max-backups", "1"]
    sim_pool.faults.drop_export(after_bytes=1024, times=None)
    # with GFS: before the export, what retention deletes after it (the day before last
    # night goes: the run's backup will be today's)
    run_vmbackup(*args, "--keep-daily", "1", exit_code=2)
    assert set(backups_of(backup_dir, "PRD-print7")) & data == {history["data"][0]}
    # the plan deletes every old backup, but the export may fail: the last good one stays
    out = run_vmbackup(*args, "--preview", "--json", "-")
    assert history["data"][0] in {d["backup"] for d in json.loads(out[out.index("{"):])["delete"]}
    run_vmbackup(*args, exit_code=2)
    assert set(backups_of(backup_dir, "PRD-print7")) & data == {history["data"][0]}
    sim_pool.faults.clear()
    run_vmbackup(*args)
    assert set(backups_of(backup_dir, "PRD-print7")) & data == set()
    assert set(history["other"] + history["meta"]) <= set(backups_of(backup_dir, "PRD-print7"))


def test_the_preview_lists_the_pool_and_host_files_the_run_deletes(sim_pool, api, backup_dir):
    from conftest import session
    s = session(sim_pool)
    try:
        master = s.xenapi.pool.get_master(s.xenapi.pool.get_all()[0])
        hosts = {ref: rec["hostname"] for ref, rec in s.xenapi.host.get_all_records().items()}
    finally:
        s.xenapi.session.logout()
    folders = ["METADATA_" + hosts[master]] + ["HOST_" + name for name in hosts.values()]
    for folder in folders:                        # three older files in each
        kind = "pool_db_%s.dump" if folder.startswith("METADATA_") else "host_%s.xbk"
        (backup_dir / folder).mkdir()
        for day in (1, 2, 3):
            (backup_dir / folder / (kind % ("202611%02d-000000" % day))).write_bytes(b"old")
    args = api(sim_pool) + ["-d", backup_dir, "--pool-db-backup", "--host-backup",
                            "--max-backups", "2", "-x", ".*"]
    before = {(f, n) for f in folders for n in os.listdir(str(backup_dir / f))}
    out = run_vmbackup(*args, "--preview", "--json", "-")
    planned = {(d["vm"], d["backup"]) for d in json.loads(out[out.index("{"):])["delete"]}
    run_vmbackup(*args)
    after = {(f, n) for f in folders for n in os.listdir(str(backup_dir / f))}
    assert before - after == planned and len(planned) == 2 * len(folders)
    assert sorted(os.listdir(str(backup_dir))) == sorted(folders)
