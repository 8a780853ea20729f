"""VM selection: the contract of issue 'command line, configuration file, VM selection',
one test per line, on the pure select_vms() with pool records shaped as XAPI sends them."""
import pytest

from vmbackup import parse_config, parse_selector, plan_vm, select_vms, PoolView


def vm(name, uuid=None, **flags):
    rec = {"name_label": name, "uuid": uuid or "uuid-" + name, "is_a_template": False,
           "is_a_snapshot": False, "is_control_domain": False, "VBDs": [], "power_state": "Running"}
    rec.update(flags)
    return rec


def pool(*records):
    return {"OpaqueRef:%d" % i: rec for i, rec in enumerate(records)}


POOL = pool(
    vm("web01"), vm("web02"), vm("db01"), vm("PRD-print4"), vm("PRD-print7"), vm("PRD-PRINT"),
    vm("PRD-app"), vm("DEV-web3"), vm("DEV-mySql"), vm("DEV mySql"), vm("DEV-phishing-test"),
    vm("nightly SAVE"), vm("SAVE-not-at-end"),
    vm("Debian Bookworm 12", uuid="uuid-template", is_a_template=True),
    vm("Debian Bookworm 12", uuid="uuid-real-vm"),
    vm("web01", uuid="uuid-snap", is_a_snapshot=True, is_a_template=True),
    vm("Control domain on host: xcp1", is_control_domain=True),
)


def sels(*lines):
    return [parse_selector(text.split("=", 1)[1], text.split("=", 1)[0]) for text in lines]


def picked(selection):
    return {(s.name, s.mode, s.max_backups) for s in selection.vms}


def test_candidates_exclude_templates_snapshots_control_domains():
    s = select_vms(POOL, sels("vm-export=.*"), 4)
    names = [v.name for v in s.vms]
    assert "Control domain on host: xcp1" not in names
    assert names.count("web01") == 1 and names.count("Debian Bookworm 12") == 1
    (deb,) = [v for v in s.vms if v.name == "Debian Bookworm 12"]
    assert deb.uuid == "uuid-real-vm"   # never the template of the same name
    (web,) = [v for v in s.vms if v.name == "web01"]
    assert web.uuid == "uuid-web01"     # never the snapshot of the same name


@pytest.mark.parametrize("line, expected", [
    ("vm-export=web01", {"web01"}),
    ("vm-export=DEV mySql", {"DEV mySql"}),               # space: still a plain name
    ("vm-export=web0", set()),                            # plain names are exact, not prefixes
    ("vm-export=PRD-.*", {"PRD-print4", "PRD-print7", "PRD-PRINT", "PRD-app"}),
    ("vm-export=.*SAVE$", {"nightly SAVE"}),               # $ anchors the end
    ("vm-export=SAVE", set()),                              # plain: exact only
    ("vm-export=.*SAVE", {"nightly SAVE", "SAVE-not-at-end"}),  # re.match: not end-anchored
    ("vm-export=web", set()),
    ("vm-export=web.", {"web01", "web02"}),                 # regex anchored at the start only
    ("vm-export=eb01", set()),                              # ... so not a search
    ("vm-export=PRD-.*print[4-5]$", {"PRD-print4"}),
    ("vm-export=DEV-my.*", {"DEV-mySql"}),
    ("vm-export=PRD-a*", {"PRD-print4", "PRD-print7", "PRD-PRINT", "PRD-app"}),  # a* = zero or more a
], ids=lambda v: v if isinstance(v, str) else None)
def test_plain_names_and_regexes(line, expected):
    assert {v.name for v in select_vms(POOL, sels(line), 4).vms} == expected


def test_plain_names_win_over_regexes_and_keep_their_max():
    s = select_vms(POOL, sels("vm-export=web.*:9", "vm-export=web01:2"), 4)
    assert picked(s) == {("web01", "vm-export", 2), ("web02", "vm-export", 9)}
    # order does not matter
    s = select_vms(POOL, sels("vm-export=web01:2", "vm-export=web.*:9"), 4)
    assert picked(s) == {("web01", "vm-export", 2), ("web02", "vm-export", 9)}


def test_regex_never_replaces_a_plain_name_even_in_a_stronger_mode():
    s = select_vms(POOL, sels("vm-export=web01", "vdi-export=web.*"), 4)
    assert picked(s) == {("web01", "vm-export", 4), ("web02", "vdi-export", 4)}


def test_later_definition_overrides_max_backups():
    s = select_vms(POOL, sels("vm-export=web01:3", "vm-export=web01:5"), 4)
    assert picked(s) == {("web01", "vm-export", 5)}
    s = select_vms(POOL, sels("vm-export=PRD-.*:3", "vm-export=PRD-print.*:6"), 4)
    assert ("PRD-print4", "vm-export", 6) in picked(s) and ("PRD-app", "vm-export", 3) in picked(s)


def test_minus_one_or_empty_max_means_global():
    s = select_vms(POOL, sels("vm-export=web01:-1", "vm-export=web02:"), 7)
    assert picked(s) == {("web01", "vm-export", 7), ("web02", "vm-export", 7)}


@pytest.mark.parametrize("excl", ["exclude=PRD-PRINT", "exclude=PRD-PRINT$", "exclude=PRD-P[A-Z]+$"])
def test_excludes_win_over_everything(excl):
    s = select_vms(POOL, sels("vm-export=PRD-PRINT", "vdi-export=PRD-.*", excl), 4)
    names = {v.name for v in s.vms}
    assert "PRD-PRINT" not in names and "PRD-app" in names
    assert ("PRD-PRINT", "uuid-PRD-PRINT") in s.excluded


def test_excludes_may_come_after_export_lines():
    s = select_vms(POOL, sels("vm-export=DEV-.*", "exclude=DEV-phishing-test"), 4)
    assert "DEV-phishing-test" not in {v.name for v in s.vms}


def test_vdi_export_wins_over_vm_export_in_any_order():
    for lines in (("vm-export=web01:3", "vdi-export=web01:5:xvda;xvdb"),
                  ("vdi-export=web01:5:xvda;xvdb", "vm-export=web01:3")):
        (only,) = select_vms(POOL, sels(*lines), 4).vms
        assert (only.mode, only.max_backups, only.devices) == ("vdi-export", 5, ("xvda", "xvdb"))


def test_full_export_wins_over_metadata_only():
    s = select_vms(POOL, sels("meta-export=web.*:24", "vm-export=web01"), 4)
    assert picked(s) == {("web01", "vm-export", 4), ("web02", "meta-export", 24)}


def test_selector_matching_nothing_is_a_warning():
    s = select_vms(POOL, sels("vm-export=no-such-vm", "exclude=nothing.*"), 4)
    assert s.vms == [] and s.errors == []
    assert s.warnings == ["vm not found: vm-export=no-such-vm (command line)",
                          "vm not found: exclude=nothing.* (command line)"]


def test_duplicate_names_are_an_error_not_a_silent_pick():
    dup = pool(vm("dup-vm", uuid="u1"), vm("dup-vm", uuid="u2"), vm("solo"))
    s = select_vms(dup, sels("vm-export=.*"), 4)
    assert [v.name for v in s.vms] == ["solo"]
    (err,) = s.errors
    assert "2 VMs are named 'dup-vm'" in err and "u1" in err and "u2" in err
    assert ("dup-vm", "u1") not in s.not_selected


def test_not_selected_lists_the_rest():
    s = select_vms(POOL, sels("vm-export=web01", "exclude=web02"), 4)
    assert ("db01", "uuid-db01") in s.not_selected
    assert ("web02", "uuid-web02") not in s.not_selected


def test_nau_documented_config_selects_as_documented():
    text = "\n".join([
        "exclude=DEV-phishing-test", "exclude=PRD-PRINT$",
        "vdi-export=DEV-web3:7", "vdi-export=DEV-.*[Tt]est.*",
        "vm-export=.*SAVE$:5", "vm-export=PRD-.*print[4-5]$:5", "vm-export=PRD-.*print[6-8]$:10",
        "vm-export=PROD.*", "vm-export=DEV.*:2", "vm-export=web01:3"])
    parsed = parse_config(text, "nau.cfg")
    s = select_vms(POOL, parsed.selectors, 4)
    assert picked(s) == {
        ("DEV-web3", "vdi-export", 7), ("DEV-mySql", "vm-export", 2),
        ("DEV mySql", "vm-export", 2), ("nightly SAVE", "vm-export", 5),
        ("PRD-print4", "vm-export", 5), ("PRD-print7", "vm-export", 10), ("web01", "vm-export", 3)}
    assert {n for n, _ in s.excluded} == {"DEV-phishing-test", "PRD-PRINT"}
    assert "vm not found: vm-export=PROD.* (nau.cfg:8)" in s.warnings


def _view(vms, vbds, vdis):
    return PoolView({}, {}, vms, vbds, vdis, {}, {}, {}, {})


def test_plan_picks_disks_and_leaves_out_nobak():
    vms = {"OpaqueRef:vm": vm("multi", VBDs=["b0", "b1", "b2", "cd", "empty"])}
    vbds = {"b0": {"type": "Disk", "userdevice": "0", "device": "xvda", "VDI": "d0", "empty": False},
            "b1": {"type": "Disk", "userdevice": "1", "device": "", "VDI": "d1", "empty": False},
            "b2": {"type": "Disk", "userdevice": "2", "device": "xvdc", "VDI": "d2", "empty": False},
            "cd": {"type": "CD", "userdevice": "3", "device": "xvdd", "VDI": "iso", "empty": False},
            "empty": {"type": "Disk", "userdevice": "4", "device": "", "VDI": "OpaqueRef:NULL",
                      "empty": True}}
    vdis = {"d0": {"uuid": "v0", "name_label": "root"}, "d1": {"uuid": "v1", "name_label": "data"},
            "d2": {"uuid": "v2", "name_label": "scratch [NOBAK]"}, "iso": {"uuid": "i"}}
    view = _view(vms, vbds, vdis)
    (full,) = select_vms(vms, sels("vm-export=multi"), 4).vms
    plan = plan_vm(full, view)
    assert [d.device for d in plan.disks] == ["xvda", "xvdb"]
    assert [d.device for d in plan.skipped] == ["xvdc"]
    (root,) = select_vms(vms, sels("vdi-export=multi"), 4).vms
    assert [d.device for d in plan_vm(root, view).disks] == ["xvda"]
    (two,) = select_vms(vms, sels("vdi-export=multi:3:xvdb;1;xvdz"), 4).vms
    plan = plan_vm(two, view)
    assert [d.device for d in plan.disks] == ["xvdb"]
    assert plan.problems == ["no disk xvdz on VM multi"]
