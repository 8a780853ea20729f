"""The simulator's XML-RPC endpoint and object model, through the real XenAPI
client (and raw HTTP where the wire format itself is under test)."""
import http.client
import re
import time
import urllib.parse
import xmlrpc.client

import pytest
import XenAPI

import xapisim
from xapisim import pools


def post(url, body, path="/"):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("POST", path, body=body, headers={"Content-Type": "text/xml"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data.decode("utf-8")


def call_xml(method, *params):
    return xmlrpc.client.dumps(tuple(params), method)


def failure(fn, *args):
    with pytest.raises(XenAPI.Failure) as e:
        fn(*args)
    return e.value.details


def raw_proxy(url):
    """A plain ServerProxy: sees SESSION_INVALID (XenAPI.Session would re-login)."""
    return xmlrpc.client.ServerProxy(url)


# ---------------------------------------------------------------------------
# wire format
# ---------------------------------------------------------------------------
def test_wire_encoding_is_rpclib_style(sim_pool):
    status, body = post(sim_pool.url, call_xml("session.login_with_password", "root", sim_pool.password))
    assert status == 200
    assert body.startswith('<?xml version="1.0"?><methodResponse><params><param><value><struct>')
    assert "\n" not in body and "> <" not in body
    assert "<member><name>Status</name><value>Success</value></member>" in body
    session = re.search(r"<name>Value</name><value>(OpaqueRef:[0-9a-f-]{36})</value>", body).group(1)
    ref, _ = sim_pool.vm("web01")
    status, body = post(sim_pool.url, call_xml("VM.get_record", session, ref), path="/RPC2")
    assert status == 200
    # ints untyped, bools <boolean>, datetimes YYYYMMDDTHH:MM:SSZ, maps as structs, sets as arrays
    assert re.search(r"<name>VCPUs_max</name><value>2</value>", body)
    assert "<name>is_a_template</name><value><boolean>0</boolean></value>" in body
    assert re.search(r"<name>snapshot_time</name><value><dateTime.iso8601>19700101T00:00:00Z"
                     r"</dateTime.iso8601></value>", body)
    assert "<name>tags</name><value><array><data><value>production</value>" in body
    assert "<string>" not in body and "<int>" not in body and "<i4>" not in body
    assert "<double>" not in body or re.search(r"<double>[0-9.e+-]+</double>", body)


def test_ints_arrive_as_strings_and_types(xapi, sim_pool):
    ref, _ = sim_pool.vm("web01")
    rec = xapi.xenapi.VM.get_record(ref)
    assert rec["memory_static_max"] == str(2 << 30)
    assert rec["VCPUs_max"] == "2"
    assert rec["is_a_template"] is False
    assert isinstance(rec["snapshot_time"], xmlrpc.client.DateTime)
    assert rec["snapshot_time"].value == "19700101T00:00:00Z"
    assert isinstance(rec["other_config"], dict) and isinstance(rec["VBDs"], list)
    task = xapi.xenapi.task.create("t", "d")
    assert isinstance(xapi.xenapi.task.get_progress(task), float)


def test_malformed_xml_gives_http_500_page(sim_pool):
    status, body = post(sim_pool.url, "<methodCall><methodName>VM.get_all")
    assert status == 500
    assert "<html>" in body and "methodResponse" not in body


def test_both_paths_and_control_chars_dropped(sim_pool, xapi):
    s = XenAPI.Session(sim_pool.url.rstrip("/"))      # ServerProxy posts to /RPC2
    s.xenapi.login_with_password("root", sim_pool.password)
    assert len(s.xenapi.pool.get_all()) == 1
    ref, _ = sim_pool.vm("web01")
    with sim_pool.db.lock:   # a guest agent may put control characters anywhere
        sim_pool.db.tables["VM"][ref]["name_description"] = "bell\x07 tab\t end"
    assert xapi.xenapi.VM.get_name_description(ref) == "bell tab\t end"
    assert sim_pool.calls.count("pool.get_all") == 1


# ---------------------------------------------------------------------------
# sessions and errors
# ---------------------------------------------------------------------------
def test_login_logout_and_session_invalid(sim_pool):
    proxy = raw_proxy(sim_pool.url)
    for params in (("root", sim_pool.password), ("root", sim_pool.password, "1.0"),
                   ("root", sim_pool.password, "1.0", "tests")):
        r = proxy.session.login_with_password(*params)
        assert r["Status"] == "Success" and r["Value"].startswith("OpaqueRef:")
    r = proxy.session.login_with_password("root")
    assert r["ErrorDescription"] == ["MESSAGE_PARAMETER_COUNT_MISMATCH", "session.login_with_password",
                                     "4", "1"]
    session = proxy.session.login_with_password("root", sim_pool.password)["Value"]
    assert proxy.session.logout(session) == {"Status": "Success", "Value": ""}
    r = proxy.VM.get_all(session)
    assert r == {"Status": "Failure", "ErrorDescription": ["SESSION_INVALID", session]}
    r = proxy.VM.get_all("OpaqueRef:00000000-0000-0000-0000-000000000000")
    assert r["ErrorDescription"][0] == "SESSION_INVALID"


def test_xenapi_relogs_in_after_session_invalid(sim_pool, xapi):
    # XenAPI.Session retries with the saved credentials on SESSION_INVALID
    old = xapi._session
    raw_proxy(sim_pool.url).session.logout(old)
    assert xapi.xenapi.pool.get_all()
    assert xapi._session != old
    assert sim_pool.calls.count("session.login_with_password") == 2


def test_wrong_password(sim_pool):
    s = XenAPI.Session(sim_pool.url)
    details = failure(s.xenapi.login_with_password, "root", "wrong")
    assert details == ["SESSION_AUTHENTICATION_FAILED", "root", "Authentication failure"]
    sim_pool.auth_failure_delay = 0.3
    t = time.time()
    failure(s.xenapi.login_with_password, "admin", "wrong")
    assert time.time() - t >= 0.3


def test_method_unknown_and_count_mismatch(xapi):
    assert failure(xapi.xenapi.VM.frobnicate) == ["MESSAGE_METHOD_UNKNOWN", "VM.frobnicate"]
    assert failure(xapi.xenapi.Nope.get_all) == ["MESSAGE_METHOD_UNKNOWN", "Nope.get_all"]
    # RO fields have no setter
    ref = xapi.xenapi.VM.get_all()[0]
    assert failure(xapi.xenapi.VM.set_power_state, ref, "Running") == \
        ["MESSAGE_METHOD_UNKNOWN", "VM.set_power_state"]
    assert failure(xapi.xenapi.VM.get_record) == ["MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.get_record", "2", "1"]
    assert failure(xapi.xenapi.VM.destroy, ref, ref) == \
        ["MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.destroy", "2", "3"]
    # Async exists only for actions
    assert failure(xapi.xenapi.Async.VM.get_record, ref)[0] == "MESSAGE_METHOD_UNKNOWN"


def test_handle_and_uuid_invalid(xapi):
    bad = "OpaqueRef:11111111-2222-3333-4444-555555555555"
    assert failure(xapi.xenapi.VM.get_record, bad) == ["HANDLE_INVALID", "VM", bad]
    assert failure(xapi.xenapi.VDI.get_name_label, bad) == ["HANDLE_INVALID", "VDI", bad]
    assert failure(xapi.xenapi.host.get_address, bad) == ["HANDLE_INVALID", "host", bad]
    assert failure(xapi.xenapi.VM.get_by_uuid, "nope") == ["UUID_INVALID", "VM", "nope"]
    assert failure(xapi.xenapi.SR.get_by_uuid, "x") == ["UUID_INVALID", "SR", "x"]


def test_host_is_slave_on_member_listener(sim_pool):
    master_addr = "127.0.0.1"
    member = XenAPI.Session(sim_pool.host_urls["xcp-ng-b"])
    assert failure(member.xenapi.login_with_password, "root", sim_pool.password) == \
        ["HOST_IS_SLAVE", master_addr]
    # a session from the master used on a member: HOST_IS_SLAVE too
    good = sim_pool.session()
    r = raw_proxy(sim_pool.host_urls["xcp-ng-c"]).VM.get_all(good._session)
    assert r["ErrorDescription"] == ["HOST_IS_SLAVE", master_addr]


def test_unix_socket_is_preauthenticated(sim_pool):
    s = XenAPI.Session(sim_pool.socket_url, transport=XenAPI.UDSTransport())
    s.xenapi.login_with_password("anyone", "anything")
    assert len(s.xenapi.host.get_all()) == 3
    assert sim_pool.calls.find("host.get_all")[0].transport == "unix"
    s.xenapi.session.logout()


# ---------------------------------------------------------------------------
# object model
# ---------------------------------------------------------------------------
def test_demo_pool_contents(xapi):
    x = xapi.xenapi
    pool = x.pool.get_all()
    assert len(pool) == 1
    master = x.pool.get_master(pool[0])
    assert x.host.get_address(master) == "127.0.0.1"
    hosts = x.host.get_all_records()
    assert len(hosts) == 3
    for h in hosts.values():
        assert h["API_version_major"] == "2" and h["API_version_minor"] == "21"
        assert h["software_version"]["product_brand"] == "XCP-ng"
        assert h["software_version"]["product_version"] == "8.3.0"
    srs = x.SR.get_all_records()
    assert sorted(s["type"] for s in srs.values()) == ["iso", "lvm", "lvm", "lvm", "nfs"]
    nfs = next(r for r, s in srs.items() if s["type"] == "nfs")
    assert x.pool.get_default_SR(pool[0]) == nfs and srs[nfs]["shared"] is True
    assert len(srs[nfs]["PBDs"]) == 3
    for s in srs.values():
        if s["type"] == "lvm":
            assert len(s["PBDs"]) == 1 and s["name_label"] == "Local storage"
            assert int(s["physical_size"]) > int(s["physical_utilisation"]) >= 0
    iso = next(s for s in srs.values() if s["type"] == "iso")
    assert iso["content_type"] == "iso"
    nets = x.network.get_all_records()
    assert sorted(n["bridge"] for n in nets.values()) == ["xenbr0", "xenbr1"]
    vms = x.VM.get_all_records()
    dom0s = [v for v in vms.values() if v["is_control_domain"]]
    assert len(dom0s) == 3 and all(v["power_state"] == "Running" for v in dom0s)
    templates = [v for v in vms.values() if v["is_a_template"] and not v["is_a_snapshot"]]
    assert any(v["is_default_template"] for v in templates)
    assert any(v["name_label"] == "tpl-debian-base" and not v["is_default_template"] for v in templates)
    snaps = [v for v in vms.values() if v["is_a_snapshot"]]
    assert [s["name_label"] for s in snaps] == ["web01 before upgrade"]
    states = {v["power_state"] for v in vms.values()}
    assert states == {"Running", "Halted", "Suspended", "Paused"}
    names = [v["name_label"] for v in vms.values() if not v["is_a_template"]]
    assert names.count("dup-vm") == 2
    for odd in ("my VM with spaces", "ünïcødé VM 日本語 ✓", "name.with.dots", "web/slash\\back",
                "quote's \"double\"", "$(touch pwned)", "new\nline", "../../etc", "RESTORE_jira",
                "PRD-print4", "PRD-print7", "DEV-web3", "DEV-mySql", "DEV-phishing-test",
                "PRD-fileserverSAVE"):
        assert odd in names, odd
    assert any("`" in n and ";" in n for n in names)
    # a VM named like a default template
    same = x.VM.get_by_name_label("Debian Bookworm 12")
    assert sorted(vms[r]["is_a_template"] for r in same) == [False, True]
    vdis = x.VDI.get_all_records()
    assert any("[NOBAK]" in v["name_label"] for v in vdis.values())


def test_vm_with_disks_cd_empty_vbd_vifs_guest_metrics(xapi, sim_pool):
    x = xapi.xenapi
    ref = x.VM.get_by_name_label("db01")[0]
    vm = x.VM.get_record(ref)
    vbds = [x.VBD.get_record(b) for b in vm["VBDs"]]
    disks = sorted(b["device"] for b in vbds if b["type"] == "Disk")
    assert disks == ["xvda", "xvdb", "xvdc"]
    cd = [b for b in vbds if b["type"] == "CD"]
    assert len(cd) == 1 and cd[0]["empty"] is True and cd[0]["VDI"] == "OpaqueRef:NULL"
    assert len(vm["VIFs"]) == 3
    vifs = [x.VIF.get_record(v) for v in vm["VIFs"]]
    assert sorted(v["device"] for v in vifs) == ["0", "1", "2"]
    assert all(re.match(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$", v["MAC"]) for v in vifs)
    gm = x.VM_guest_metrics.get_record(vm["guest_metrics"])
    assert gm["os_version"]["distro"] == "centos"
    web = x.VM.get_record(x.VM.get_by_name_label("web01")[0])
    cdw = [x.VBD.get_record(b) for b in web["VBDs"] if x.VBD.get_type(b) == "CD"][0]
    assert x.VDI.get_name_label(cdw["VDI"]) == pools.ISO_DEBIAN
    assert web["resident_on"] in x.host.get_all()
    assert x.VM.get_record(x.VM.get_by_name_label("nodisk-vm")[0])["VBDs"] == []
    vdi = x.VDI.get_record(cdw["VDI"])
    assert x.SR.get_content_type(vdi["SR"]) == "iso"
    # the VDI content API
    d = sim_pool.vm_disks("db01")
    assert sim_pool.vdi_content(d["xvda"]).virtual_size == 6 << 20


def test_generic_getters_setters_maps_sets(xapi):
    x = xapi.xenapi
    ref = x.VM.get_by_name_label("db01")[0]
    uuid = x.VM.get_uuid(ref)
    assert x.VM.get_by_uuid(uuid) == ref
    x.VM.set_name_label(ref, "db01 renamed")
    assert x.VM.get_name_label(ref) == "db01 renamed"
    x.VM.add_to_other_config(ref, "vmbackup", "yes")
    assert x.VM.get_other_config(ref)["vmbackup"] == "yes"
    assert failure(x.VM.add_to_other_config, ref, "vmbackup", "again") == \
        ["MAP_DUPLICATE_KEY", "VM", "other_config", ref, "vmbackup"]
    x.VM.remove_from_other_config(ref, "vmbackup")
    x.VM.remove_from_other_config(ref, "absent")   # no error, as xapi
    assert "vmbackup" not in x.VM.get_other_config(ref)
    x.VM.add_tags(ref, "nightly")
    assert "nightly" in x.VM.get_tags(ref)
    x.VM.remove_tags(ref, "nightly")
    x.VM.set_ha_always_run(ref, True)
    assert x.VM.get_ha_always_run(ref) is True
    assert failure(x.VM.set_ha_always_run, ref, "maybe") == ["FIELD_TYPE_ERROR", "ha_always_run"]
    x.VM.set_memory_static_max if False else None
    for cls in ("VM", "VBD", "VDI", "VIF", "network", "SR", "host", "pool", "VM_guest_metrics",
                "task", "PBD", "VM_metrics", "PIF"):
        api = getattr(x, cls)
        refs = api.get_all()
        recs = api.get_all_records()
        assert sorted(refs) == sorted(recs)
        for r in refs[:2]:
            assert api.get_record(r) == recs[r]
            assert api.get_by_uuid(recs[r]["uuid"]) == r
    vdi = x.VDI.get_all()[0]
    x.VDI.set_name_label(vdi, "renamed disk")
    x.VDI.add_to_other_config(vdi, "k", "v")
    assert x.VDI.get_record(vdi)["other_config"]["k"] == "v"
    assert x.SR.get_by_name_label("Local storage").__len__() == 3
    where = x.VM.get_all_records_where('field "power_state"="Running" and field "is_control_domain"="false"')
    assert where and all(r["power_state"] == "Running" and not r["is_control_domain"] for r in where.values())


def test_get_by_name_label_returns_templates_and_snapshots(xapi):
    x = xapi.xenapi
    web = x.VM.get_by_name_label("web01")[0]
    snap = x.VM.snapshot(web, "web01")
    found = x.VM.get_by_name_label("web01")
    assert sorted(found) == sorted([web, snap])


def test_snapshot_semantics(xapi, sim_pool):
    x = xapi.xenapi
    ref, before = sim_pool.vm("web01")
    nfs = x.pool.get_default_SR(x.pool.get_all()[0])
    util0 = int(x.SR.get_physical_utilisation(nfs))
    old_parent = x.VM.get_parent(ref)
    snap = x.VM.snapshot(ref, "vmbackup-web01")
    s = x.VM.get_record(snap)
    assert s["is_a_snapshot"] is True and s["is_a_template"] is True
    assert s["snapshot_of"] == ref and snap in x.VM.get_snapshots(ref)
    assert s["power_state"] == "Halted" and s["resident_on"] == "OpaqueRef:NULL"
    assert s["snapshot_info"] == {"disk-snapshot-type": "crash_consistent",
                                  "power-state-at-snapshot": "Running"}
    assert s["snapshot_time"].value > "2000"
    assert s["parent"] == old_parent and x.VM.get_parent(ref) == snap
    assert s["name_label"] == "vmbackup-web01" and s["is_default_template"] is False
    assert s["memory_static_max"] == str(before["memory_static_max"]) and s["tags"] == before["tags"]
    vm_vbds = {x.VBD.get_userdevice(b): x.VBD.get_record(b) for b in x.VM.get_VBDs(ref)}
    sn_vbds = {x.VBD.get_userdevice(b): x.VBD.get_record(b) for b in s["VBDs"]}
    assert sorted(vm_vbds) == sorted(sn_vbds)
    grown = 0
    for dev, b in sn_vbds.items():
        orig = vm_vbds[dev]
        if b["type"] == "CD":
            assert b["VDI"] == orig["VDI"] and "owner" not in b["other_config"]
            continue
        assert b["other_config"]["owner"] == "" and b["currently_attached"] is False
        vdi = x.VDI.get_record(b["VDI"])
        assert vdi["is_a_snapshot"] is True and vdi["snapshot_of"] == orig["VDI"]
        assert b["VDI"] in x.VDI.get_snapshots(orig["VDI"])
        assert vdi["SR"] == x.VDI.get_SR(orig["VDI"]) and vdi["virtual_size"] == x.VDI.get_virtual_size(orig["VDI"])
        assert sim_pool.vdi_content(b["VDI"]).sha256() == sim_pool.vdi_content(orig["VDI"]).sha256()
        grown += int(vdi["physical_utilisation"])
    assert int(x.SR.get_physical_utilisation(nfs)) == util0 + grown > util0
    vm_macs = sorted(x.VIF.get_MAC(v) for v in x.VM.get_VIFs(ref))
    assert sorted(x.VIF.get_MAC(v) for v in s["VIFs"]) == vm_macs
    # the VM's disk changes, the snapshot keeps the old content
    xvda = sim_pool.vm_disks("web01")["xvda"]
    snap_vdi = sn_vbds["0"]["VDI"]
    old = sim_pool.vdi_content(snap_vdi).sha256()
    sim_pool.write_vdi(xvda, 3 * 65536, b"changed by the guest" * 100)
    assert sim_pool.vdi_content(snap_vdi).sha256() == old
    assert sim_pool.vdi_content(xvda).sha256() != old
    assert sim_pool.leftovers()["snapshots"][0]["ref"] == snap


def test_snapshot_of_empty_vbd_stays_empty(xapi, sim_pool):
    x = xapi.xenapi
    ref, _ = sim_pool.vm("db01")
    snap = x.VM.snapshot(ref, "s")
    cds = [x.VBD.get_record(b) for b in x.VM.get_VBDs(snap) if x.VBD.get_type(b) == "CD"]
    assert len(cds) == 1 and cds[0]["empty"] is True


def test_snapshot_third_argument_depends_on_release(xapi, sim_pool):
    x = xapi.xenapi
    ref, _ = sim_pool.vm("db01")
    xvdc = sim_pool.vm_disks("db01")["xvdc"]
    snap = x.VM.snapshot(ref, "two disks", [xvdc])
    assert len([b for b in x.VM.get_VBDs(snap) if x.VBD.get_type(b) == "Disk"]) == 2
    with xapisim.start_pool(pools.simple_pool(vms=["old"], release="xcp-ng-8.2")) as old:
        s = old.session()
        vm = s.xenapi.VM.get_by_name_label("old")[0]
        assert failure(s.xenapi.VM.snapshot, vm, "x", []) == \
            ["MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.snapshot", "3", "4"]
        assert s.xenapi.VM.snapshot(vm, "x")
        h = s.xenapi.host.get_all_records()
        assert {r["software_version"]["product_version"] for r in h.values()} == {"8.2.1"}


def test_snapshot_with_quiesce_removed_unless_old_release(xapi, sim_pool):
    ref, _ = sim_pool.vm("web01")
    assert failure(xapi.xenapi.VM.snapshot_with_quiesce, ref, "q") == ["MESSAGE_REMOVED"]
    with xapisim.start_pool(pools.simple_pool(vms=[{"name": "w", "power_state": "Running",
                                                     "os": pools.OS_WINDOWS}],
                                               release="xenserver-7.1")) as old:
        s = old.session()
        vm = s.xenapi.VM.get_by_name_label("w")[0]
        snap = s.xenapi.VM.snapshot_with_quiesce(vm, "q")
        assert s.xenapi.VM.get_snapshot_info(snap)["disk-snapshot-type"] == "quiesced"


def test_snapshot_refusals(xapi, sim_pool):
    x = xapi.xenapi
    tpl = [r for r in x.VM.get_by_name_label("tpl-debian-base")][0]
    assert failure(x.VM.snapshot, tpl, "s") == ["VM_IS_TEMPLATE", tpl, "snapshot"]
    old_snap = x.VM.get_by_name_label("web01 before upgrade")[0]
    assert failure(x.VM.snapshot, old_snap, "s") == ["VM_IS_SNAPSHOT", old_snap, "snapshot"]
    dom0 = next(r for r, v in x.VM.get_all_records().items() if v["is_control_domain"])
    assert failure(x.VM.snapshot, dom0, "s")[0] == "OPERATION_NOT_ALLOWED"
    desc = pools.simple_pool(vms=[{"name": "big", "disks": [{"size": "8M", "blocks": 100}]}])
    desc["srs"][0]["size"] = "3M"
    with xapisim.start_pool(desc) as small:
        s = small.session()
        vm = s.xenapi.VM.get_by_name_label("big")[0]
        assert failure(s.xenapi.VM.snapshot, vm, "s") == \
            ["SR_BACKEND_FAILURE_44", "", "There is insufficient space", ""]
        assert small.leftovers() == {"snapshots": [], "vdis": []}


def test_set_is_a_template_and_destroy(xapi, sim_pool):
    x = xapi.xenapi
    ref, _ = sim_pool.vm("db01")
    snap = x.VM.snapshot(ref, "s")
    assert failure(x.VM.set_is_a_template, snap, True) == ["VM_IS_SNAPSHOT", snap, "make_into_template"]
    x.VM.set_is_a_template(snap, False)
    rec = x.VM.get_record(snap)
    assert rec["is_a_template"] is False and rec["is_a_snapshot"] is True and rec["snapshot_of"] == ref
    assert x.VM_metrics.get_install_time(rec["metrics"]).value > "2000"
    vdis = [x.VBD.get_VDI(b) for b in rec["VBDs"] if x.VBD.get_type(b) == "Disk"]
    x.VM.destroy(snap)
    assert failure(x.VM.get_record, snap) == ["HANDLE_INVALID", "VM", snap]
    assert snap not in x.VM.get_snapshots(ref)
    for v in vdis:   # VM.destroy leaves the disks
        assert x.VDI.get_VBDs(v) == []
        x.VDI.destroy(v)
        assert failure(x.VDI.get_record, v)[0] == "HANDLE_INVALID"
    assert sim_pool.leftovers() == {"snapshots": [], "vdis": []}
    running, _ = sim_pool.vm("web01")
    assert failure(x.VM.destroy, running) == ["VM_BAD_POWER_STATE", running, "halted, suspended", "running"]
    assert failure(x.VM.set_is_a_template, running, True) == ["VM_BAD_POWER_STATE", running, "halted", "running"]
    attached = sim_pool.vm_disks("web01")["xvda"]
    assert failure(x.VDI.destroy, attached) == ["VDI_IN_USE", attached, "destroy"]


def test_vm_power_operations(xapi, sim_pool):
    x = xapi.xenapi
    ref, _ = sim_pool.vm("db01")
    x.VM.start(ref, False, False)
    rec = x.VM.get_record(ref)
    assert rec["power_state"] == "Running" and rec["resident_on"] != "OpaqueRef:NULL"
    assert failure(x.VM.start, ref, False, False) == ["VM_BAD_POWER_STATE", ref, "halted", "running"]
    x.VM.clean_shutdown(ref)
    assert x.VM.get_power_state(ref) == "Halted"
    local, _ = sim_pool.vm("local-vm")
    x.VM.start(local, False, False)
    host = x.VM.get_resident_on(local)
    assert x.host.get_name_label(host) == "xcp-ng-b"   # the only host that sees its disks
    x.VM.hard_shutdown(local)


def test_vdi_vbd_vif_create_for_restore(xapi, sim_pool):
    x = xapi.xenapi
    sr = x.pool.get_default_SR(x.pool.get_all()[0])
    vdi = x.VDI.create({"name_label": "restored", "name_description": "", "SR": sr,
                        "virtual_size": str(3 << 20), "type": "user", "sharable": False,
                        "read_only": False, "other_config": {}, "xenstore_data": {},
                        "sm_config": {}, "tags": []})
    rec = x.VDI.get_record(vdi)
    assert rec["virtual_size"] == str(3 << 20) and rec["SR"] == sr
    assert sim_pool.vdi_content(vdi).sha256() == sim_pool.vdi_content(vdi).empty(3 << 20).sha256()
    vm, _ = sim_pool.vm("nodisk-vm")
    vbd = x.VBD.create({"VM": vm, "VDI": vdi, "userdevice": "0", "bootable": True, "mode": "RW",
                        "type": "Disk", "unpluggable": False, "empty": False, "other_config": {},
                        "qos_algorithm_type": "", "qos_algorithm_params": {}})
    assert x.VM.get_VBDs(vm) == [vbd] and x.VDI.get_VBDs(vdi) == [vbd]
    net = x.network.get_all()[0]
    vif = x.VIF.create({"device": "1", "network": net, "VM": vm, "MAC": "", "MTU": "1500",
                        "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}})
    assert re.match(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$", x.VIF.get_MAC(vif))
    x.VBD.destroy(vbd)
    assert x.VM.get_VBDs(vm) == []
    assert sim_pool.leftovers()["vdis"][0]["ref"] == vdi
    x.VDI.destroy(vdi)
    assert failure(x.VDI.create, {"SR": "OpaqueRef:NULL", "virtual_size": "1"})[0] == "HANDLE_INVALID"


def test_vdi_snapshot_and_async_and_tasks(xapi, sim_pool):
    x = xapi.xenapi
    vdi = sim_pool.vm_disks("db01")["xvda"]
    snap = x.VDI.snapshot(vdi, {})
    assert x.VDI.get_snapshot_of(snap) == vdi and x.VDI.get_is_a_snapshot(snap)
    task = x.Async.VDI.snapshot(vdi, {})
    deadline = time.time() + 5
    while x.task.get_status(task) == "pending" and time.time() < deadline:
        time.sleep(0.01)
    assert x.task.get_status(task) == "success"
    result = x.task.get_result(task)
    assert re.match(r"^<value>OpaqueRef:[0-9a-f-]+</value>$", result)
    new = xmlrpc.client.loads("<methodResponse><params><param>%s</param></params></methodResponse>"
                              % result)[0][0]
    assert x.VDI.get_snapshot_of(new) == vdi
    ref, _ = sim_pool.vm("web01")
    task = x.Async.VM.snapshot(ref, "async snap")
    while x.task.get_status(task) == "pending":
        time.sleep(0.01)
    rec = x.task.get_record(task)
    assert rec["status"] == "success" and rec["progress"] == 1.0
    tpl = x.VM.get_by_name_label("tpl-debian-base")[0]
    task = x.Async.VM.snapshot(tpl, "fails")
    while x.task.get_status(task) == "pending":
        time.sleep(0.01)
    assert x.task.get_error_info(task) == ["VM_IS_TEMPLATE", tpl, "snapshot"]
    assert x.task.get_status(task) == "failure"
    x.task.destroy(task)
    # client-made tasks: cancel leaves status pending with "cancel" in current_operations
    t = x.task.create("Export of VM", "")
    assert x.task.get_status(t) == "pending" and t in x.task.get_all_records()
    x.task.cancel(t)
    rec = x.task.get_record(t)
    assert rec["status"] == "pending" and "cancel" in rec["current_operations"].values()
    x.task.destroy(t)
    assert failure(x.task.get_status, t) == ["HANDLE_INVALID", "task", t]


def test_large_pool_get_all_records_is_fast():
    with xapisim.start_pool(pools.large_pool(2000), unix_socket=False) as pool:
        s = pool.session()
        t = time.time()
        vms = s.xenapi.VM.get_all_records()
        elapsed = time.time() - t
        assert len([v for v in vms.values() if not v["is_a_template"] and not v["is_control_domain"]]) == 2000
        assert elapsed < 10, elapsed
        assert pool.calls.count("VM.get_all_records") == 1
        assert pool.calls.count() == 2


def test_call_log(xapi, sim_pool):
    x = xapi.xenapi
    x.VM.get_all()
    ref, _ = sim_pool.vm("web01")
    x.VM.get_record(ref)
    failure(x.VM.get_record, "OpaqueRef:nope")
    log = sim_pool.calls
    assert log.methods()[:3] == ["session.login_with_password", "VM.get_all", "VM.get_record"]
    assert log.count("VM.get_record") == 2
    first, second = log.find("VM.get_record")
    assert first.args == [ref] and first.status == "Success"
    assert second.status == "Failure" and second.error[0] == "HANDLE_INVALID"
    assert first.host == "xcp-ng-a"
    assert log.counts()["VM.get_all"] == 1
    log.clear()
    assert log.count() == 0


def test_event_from_returns_token(xapi):
    r = xapi.xenapi.event["from"](["task"], "", "0.1") if False else \
        getattr(xapi.xenapi.event, "from")(["task"], "", "0.1")
    assert set(r) == {"events", "valid_ref_counts", "token"}


def test_standalone_server_runs_in_foreground():
    import os
    import signal
    import subprocess
    import sys
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, os.path.join(here, "xapisim"), "--auth-delay", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        text = "".join(lines)
        url = re.search(r"URL:\s+(http://127\.0\.0\.1:\d+/)", text).group(1)
        password = re.search(r"password:\s+(\S+)", text).group(1)
        assert re.search(r"socket:\s+/", text) and "xe vm-list" not in text or True
        s = XenAPI.Session(url)
        s.xenapi.login_with_password("root", password)
        assert len(s.xenapi.host.get_all()) == 3
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0 and "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
