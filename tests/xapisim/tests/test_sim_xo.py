"""What a client nobody here wrote needs from the simulator: JSON-RPC beside XML-RPC,
longest-prefix POST routing, system.listMethods, event.from/event.inject, HTTP
handlers that release what they held when they crash, SO_REUSEADDR, xapi-style
redirects -- and Xen Orchestra's own client (npm ``xen-api`` 4.7.6) running a
snapshot/export/destroy round against the pool."""
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import xmlrpc.client

import pytest
import XenAPI

import xapisim
from xapisim import pools

XO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "xo")
TOKEN_RE = re.compile(r"^\d{20},\d{20}$")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def jpost(url, obj, path="/jsonrpc"):
    """POST a JSON-RPC request with urllib -> (status, content-type, decoded body)."""
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode("utf-8")
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
            return r.status, r.headers["Content-Type"], json.loads(body.decode("utf-8"))
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode("utf-8", "replace")


def jcall(url, method, *params, version="2.0", rid=7, path="/jsonrpc"):
    obj = {"method": method, "params": list(params), "id": rid}
    if version == "2.0":
        obj["jsonrpc"] = "2.0"
    status, ctype, body = jpost(url, obj, path=path)
    assert status == 200 and ctype == "application/json", (status, ctype, body)
    return body


def xpost(url, body, path="/"):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("POST", path, body=body, headers={"Content-Type": "text/xml"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, resp.getheader("Content-Type"), data.decode("utf-8")


def event_from(session, classes, token, timeout):
    return getattr(session.xenapi.event, "from")(classes, token, float(timeout))


def snapshot_of(sim_pool, x, name="web01"):
    ref, _ = sim_pool.vm(name)
    snap = x.xenapi.VM.snapshot(ref, "xo-test")
    return ref, snap


def snapshot_vdis(x, snap):
    out = []
    for vbd in x.xenapi.VM.get_VBDs(snap):
        rec = x.xenapi.VBD.get_record(vbd)
        if rec["type"] == "Disk" and not rec["empty"]:
            out.append(rec["VDI"])
    return out


def get(url, path, query):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("GET", path + "?" + urllib.parse.urlencode(query))
    resp = conn.getresponse()
    try:
        body = resp.read()
    except http.client.IncompleteRead as e:
        body = e.partial
    hdrs = {k.lower(): v for k, v in resp.getheaders()}
    conn.close()
    return resp.status, hdrs, body


# ---------------------------------------------------------------------------
# JSON-RPC
# ---------------------------------------------------------------------------
def test_jsonrpc_v2_login_call_and_errors(sim_pool):
    r = jcall(sim_pool.url, "session.login_with_password", "root", sim_pool.password)
    assert set(r) == {"jsonrpc", "result", "id"} and r["jsonrpc"] == "2.0" and r["id"] == 7
    session = r["result"]
    assert session.startswith("OpaqueRef:")
    ref, rec = sim_pool.vm("web01")
    got = jcall(sim_pool.url, "VM.get_record", session, ref)["result"]
    # JSON types as rpclib's jsonrpc.ml writes them: ints are numbers, datetimes strings
    assert got["name_label"] == "web01" and got["VCPUs_max"] == rec["VCPUs_max"]
    assert isinstance(got["VCPUs_max"], int) and isinstance(got["is_a_template"], bool)
    assert got["snapshot_time"] == "19700101T00:00:00Z"
    assert isinstance(got["other_config"], dict) and isinstance(got["VBDs"], list)
    # errors: {"code": 1, "message": CODE, "data": [params]} (api_server.ml error_code_lit)
    r = jcall(sim_pool.url, "VM.get_record", session, "OpaqueRef:nope")
    assert r == {"jsonrpc": "2.0", "error": {"code": 1, "message": "HANDLE_INVALID",
                                             "data": ["VM", "OpaqueRef:nope"]}, "id": 7}
    r = jcall(sim_pool.url, "VM.get_all", "OpaqueRef:not-a-session", rid="abc")
    assert r["error"] == {"code": 1, "message": "SESSION_INVALID", "data": ["OpaqueRef:not-a-session"]}
    assert r["id"] == "abc"
    r = jcall(sim_pool.url, "VM.no_such_call", session)
    assert r["error"]["message"] == "MESSAGE_METHOD_UNKNOWN"
    r = jcall(sim_pool.url, "VM.get_record", session)
    assert r["error"] == {"code": 1, "message": "MESSAGE_PARAMETER_COUNT_MISMATCH",
                          "data": ["VM.get_record", "2", "1"]}
    r = jcall(sim_pool.url, "session.login_with_password", "root", "wrong")
    assert r["error"]["message"] == "SESSION_AUTHENTICATION_FAILED"
    assert sim_pool.calls.find("VM.get_record")[0].encoding == "jsonrpc"


def test_jsonrpc_v1_and_json_path(sim_pool):
    r = jcall(sim_pool.url, "session.login_with_password", "root", sim_pool.password,
              version="1.0", rid=3, path="/json")
    assert set(r) == {"result", "error", "id"} and r["error"] is None and r["id"] == 3
    session = r["result"]
    r = jcall(sim_pool.url, "VM.get_by_uuid", session, "no-such-uuid", version="1.0", path="/json")
    # 1.0: the error is xapi's plain [code, params...] list
    assert r == {"result": None, "error": ["UUID_INVALID", "VM", "no-such-uuid"], "id": 7}
    r = jcall(sim_pool.url, "session.logout", session, version="1.0")
    assert r == {"result": "", "error": None, "id": 7}


def test_jsonrpc_and_xmlrpc_share_sessions(sim_pool):
    session = jcall(sim_pool.url, "session.login_with_password", "root", sim_pool.password)["result"]
    proxy = xmlrpc.client.ServerProxy(sim_pool.url)
    r = proxy.VM.get_all(session)
    assert r["Status"] == "Success" and r["Value"]
    x = sim_pool.session()
    vms = jcall(sim_pool.url, "VM.get_all", x._session)["result"]
    assert sorted(vms) == sorted(r["Value"])
    x.xenapi.session.logout()
    r = jcall(sim_pool.url, "VM.get_all", x._session)
    assert r["error"]["message"] == "SESSION_INVALID"


def test_jsonrpc_malformed_requests_are_http_500(sim_pool):
    status, ctype, body = jpost(sim_pool.url, b"{not json")
    assert status == 500 and "Jsonrpc" in body or "Yojson" in body
    # no id: a notification, which xapi refuses
    status, _, body = jpost(sim_pool.url, {"jsonrpc": "2.0", "method": "VM.get_all", "params": []})
    assert status == 500 and "Invalid field 'id'" in body
    status, _, body = jpost(sim_pool.url, {"method": "VM.get_all", "id": 1})   # 1.0 needs params
    assert status == 500 and "params" in body
    status, _, body = jpost(sim_pool.url, {"jsonrpc": "3.0", "method": "x", "params": [], "id": 1})
    assert status == 500 and "jsonrpc" in body


def test_post_routing_is_longest_prefix(sim_pool):
    # XO's XML-RPC transport posts to /xmlrpc: "/" is its longest prefix
    x = XenAPI.Session(sim_pool.url + "xmlrpc")
    x.xenapi.login_with_password(sim_pool.user, sim_pool.password, "2.0", "tests")
    try:
        ref, _ = sim_pool.vm("web01")
        assert x.xenapi.VM.get_name_label(ref) == "web01"
    finally:
        x.xenapi.session.logout()
    status, ctype, body = xpost(sim_pool.url, xmlrpc.client.dumps(("root", sim_pool.password),
                                                                  "session.login_with_password"),
                                path="/anything/at/all")
    assert status == 200 and ctype == "text/xml" and "<value>Success</value>" in body
    # /jsonrpcX and /json/ are JSON-RPC (longest prefixes /jsonrpc, /json)
    for path in ("/jsonrpcX", "/json/"):
        r = jcall(sim_pool.url, "session.login_with_password", "root", sim_pool.password, path=path)
        assert r["result"].startswith("OpaqueRef:")
    # and GET handlers by longest prefix too: /export_raw_vdi/ is not /export
    vdi = sim_pool.vm_disks("web01")["xvda"]
    x = sim_pool.session()
    st, hdrs, body = get(sim_pool.url, "/export_raw_vdi/", {"session_id": x._session, "vdi": vdi})
    assert st == 200 and len(body) == int(x.xenapi.VDI.get_virtual_size(vdi))
    assert sim_pool.calls.requests("/export_raw_vdi")[-1].status == 200
    x.xenapi.session.logout()


# ---------------------------------------------------------------------------
# system.listMethods
# ---------------------------------------------------------------------------
def test_list_methods_is_a_bare_array_of_real_messages(sim_pool):
    status, _, body = xpost(sim_pool.url, xmlrpc.client.dumps((), "system.listMethods"))
    assert status == 200
    assert body.startswith('<?xml version="1.0"?><methodResponse><params><param><value><array><data>')
    assert "Status" not in body
    (names,), _ = xmlrpc.client.loads(body)
    assert "VM.get_all_records" in names and "task.get_all_records" in names
    assert "event.from" in names and "event.inject" in names and "VM.snapshot" in names
    assert "session.login_with_password" in names and "session.get_record" in names
    assert not [n for n in names if n.startswith(("session.get_all", "Async.", "system."))]
    assert len(names) == len(set(names))
    # JSON-RPC: the same list as an ordinary result
    assert jcall(sim_pool.url, "system.listMethods")["result"] == names
    # every listed message is one the simulator serves, and session.get_all* are not
    proxy = xmlrpc.client.ServerProxy(sim_pool.url)
    for name in names:
        if name.startswith("session.login") or name.startswith("session.slave_local"):
            continue
        r = getattr(proxy, name)()
        assert r["ErrorDescription"][0] in ("MESSAGE_PARAMETER_COUNT_MISMATCH", "SESSION_INVALID"), (name, r)
    session = proxy.session.login_with_password("root", sim_pool.password)["Value"]
    for name in ("session.get_all", "session.get_all_records", "session.get_all_records_where"):
        args = (session, 'true') if name.endswith("where") else (session,)
        assert getattr(proxy, name)(*args)["ErrorDescription"] == ["MESSAGE_METHOD_UNKNOWN", name]


# ---------------------------------------------------------------------------
# events
# ---------------------------------------------------------------------------
def test_event_from_empty_token_gives_every_object(sim_pool, xapi):
    r = event_from(xapi, ["VM"], "", 5)
    assert set(r) == {"events", "valid_ref_counts", "token"} and TOKEN_RE.match(r["token"])
    all_vms = xapi.xenapi.VM.get_all_records()
    adds = {e["ref"]: e for e in r["events"] if e["operation"] == "add"}
    assert set(adds) == set(all_vms)
    assert {e["class"] for e in r["events"]} == {"vm"}       # classes lower-case, as xapi
    ref, _ = sim_pool.vm("web01")
    ev = adds[ref]
    assert set(ev) == {"id", "timestamp", "class", "operation", "ref", "snapshot"}
    assert ev["snapshot"] == all_vms[ref]                     # the full record
    # valid_ref_counts: every table, lower-case, int32 (<i4> on the wire: ints in Python)
    counts = r["valid_ref_counts"]
    assert counts["vm"] == len(all_vms) and counts["task"] == len(xapi.xenapi.task.get_all())
    assert isinstance(counts["vm"], int) and "vdi" in counts and "session" in counts
    # the same over JSON-RPC
    j = jcall(sim_pool.url, "event.from", xapi._session, ["vm"], "", 5.0)["result"]
    assert len(j["events"]) == len(r["events"]) and j["valid_ref_counts"]["vm"] == len(all_vms)


def test_event_inject_token_and_mod_event(sim_pool, xapi):
    pool_ref = xapi.xenapi.pool.get_all()[0]
    token = xapi.xenapi.event.inject("pool", pool_ref)
    assert TOKEN_RE.match(token)
    r = event_from(xapi, ["pool"], token, 5)
    assert [(e["class"], e["operation"], e["ref"]) for e in r["events"]] == [("pool", "mod", pool_ref)]
    assert r["events"][0]["snapshot"] == xapi.xenapi.pool.get_record(pool_ref)
    assert r["token"] > token
    # nothing new since: the call waits out its timeout and gives the same generation
    t0 = time.time()
    r2 = event_from(xapi, ["pool"], r["token"], 0.3)
    assert r2["events"] == [] and time.time() - t0 >= 0.3 and r2["token"] >= r["token"]
    with pytest.raises(XenAPI.Failure) as e:
        xapi.xenapi.event.inject("pool", "OpaqueRef:nope")
    assert e.value.details == ["HANDLE_INVALID", "pool", "OpaqueRef:nope"]
    with pytest.raises(XenAPI.Failure) as e:
        event_from(xapi, ["pool"], "garbage", 1)
    assert e.value.details == ["EVENT_FROM_TOKEN_PARSE_FAILURE", "garbage"]


def test_event_from_blocks_until_a_subscribed_class_changes(sim_pool, xapi):
    ref, _ = sim_pool.vm("web01")
    token = event_from(xapi, ["vm"], "", 5)["token"]
    other = sim_pool.session()
    result = {}

    def waiter():
        t0 = time.time()
        result["r"] = event_from(other, ["vm", "task/OpaqueRef:none"], token, 20)
        result["t"] = time.time() - t0

    t = threading.Thread(target=waiter)
    t.start()
    try:
        # a change to a class nobody subscribed to does not end the wait
        xapi.xenapi.SR.set_name_description(xapi.xenapi.SR.get_all()[0], "not watched")
        t.join(0.5)
        assert t.is_alive(), "event.from returned without a change to a subscribed class"
        xapi.xenapi.VM.set_name_description(ref, "changed for the test")
        t.join(10)
        assert not t.is_alive(), "event.from did not return after the change"
    finally:
        t.join(30)
    r = result["r"]
    assert result["t"] < 10
    assert [(e["operation"], e["ref"]) for e in r["events"]] == [("mod", ref)]
    assert r["events"][0]["snapshot"]["name_description"] == "changed for the test"
    assert r["token"] > token
    other.xenapi.session.logout()


def test_event_from_add_mod_del_and_object_subscription(sim_pool, xapi):
    ref, _ = sim_pool.vm("web01")
    token = event_from(xapi, ["vm"], "", 5)["token"]
    snap = xapi.xenapi.VM.snapshot(ref, "for events")
    r = event_from(xapi, ["vm"], token, 5)
    ops = [(e["operation"], e["ref"]) for e in r["events"]]
    # a new object: add and mod (created and modified after the token, as xapi_event.ml)
    assert ("add", snap) in ops and ("mod", snap) in ops
    assert ops.index(("add", snap)) < ops.index(("mod", snap))
    assert next(e for e in r["events"] if e["ref"] == snap)["snapshot"]["is_a_snapshot"] is True
    token = r["token"]
    # subscription to one object: another VM's change is not reported
    xapi.xenapi.VM.set_name_description(ref, "not this one")
    xapi.xenapi.VM.set_name_description(snap, "this one")
    r = event_from(xapi, ["VM/" + snap], token, 5)
    assert [(e["operation"], e["ref"]) for e in r["events"]] == [("mod", snap)]
    token = event_from(xapi, ["vm"], token, 5)["token"]
    vdis = snapshot_vdis(xapi, snap)
    xapi.xenapi.VM.destroy(snap)
    for v in vdis:
        xapi.xenapi.VDI.destroy(v)
    r = event_from(xapi, ["vm", "vdi"], token, 5)
    dels = [e for e in r["events"] if e["operation"] == "del"]
    assert {(e["class"], e["ref"]) for e in dels} == {("vm", snap)} | {("vdi", v) for v in vdis}
    assert all("snapshot" not in e for e in dels)
    # created and destroyed between two calls: nothing to report (xapi skips it)
    token = r["token"]
    snap = xapi.xenapi.VM.snapshot(ref, "short-lived")
    vdis = snapshot_vdis(xapi, snap)
    xapi.xenapi.VM.destroy(snap)
    for v in vdis:
        xapi.xenapi.VDI.destroy(v)
    r = event_from(xapi, ["vm", "vdi"], token, 0.2)
    assert [e for e in r["events"] if e["ref"] == snap] == []


def test_async_task_completion_is_an_event(sim_pool, xapi):
    ref, _ = sim_pool.vm("web01")
    token = event_from(xapi, ["task"], "", 5)["token"]
    task = xapi.xenapi.Async.VM.snapshot(ref, "async")
    status = None
    deadline = time.time() + 10
    while status != "success" and time.time() < deadline:
        r = event_from(xapi, ["task/" + task], token, 5)
        token = r["token"]
        for e in r["events"]:
            assert e["ref"] == task
            status = e["snapshot"]["status"]
    assert status == "success"
    snap = xmlrpc.client.loads("<methodResponse><params><param>%s</param></params></methodResponse>"
                               % xapi.xenapi.task.get_result(task))[0][0]
    xapi.xenapi.task.destroy(task)
    r = event_from(xapi, ["task"], token, 5)
    assert [(e["operation"], e["ref"]) for e in r["events"]] == [("del", task)]
    assert r["valid_ref_counts"]["task"] == len(xapi.xenapi.task.get_all())
    vdis = snapshot_vdis(xapi, snap)
    xapi.xenapi.VM.destroy(snap)
    for v in vdis:
        xapi.xenapi.VDI.destroy(v)


def test_logout_ends_a_waiting_event_from(sim_pool):
    other = sim_pool.session()
    token = event_from(other, ["vm"], "", 5)["token"]
    session = other._session
    proxy = xmlrpc.client.ServerProxy(sim_pool.url)   # no re-login on SESSION_INVALID
    result = {}

    def waiter():
        t0 = time.time()
        result["r"] = getattr(proxy.event, "from")(session, ["vm"], token, 30.0)
        result["t"] = time.time() - t0

    t = threading.Thread(target=waiter)
    t.start()
    t.join(0.3)
    assert t.is_alive()
    other.xenapi.session.logout()
    t.join(10)
    assert not t.is_alive()
    assert result["r"]["ErrorDescription"] == ["SESSION_INVALID", session]
    assert result["t"] < 10


# ---------------------------------------------------------------------------
# HTTP handlers: an exception answers 500 and releases what the request held
# ---------------------------------------------------------------------------
def test_crash_before_header_answers_500_and_releases(sim_pool, xapi):
    _, snap = snapshot_of(sim_pool, xapi)
    vdis = snapshot_vdis(xapi, snap)
    task = xapi.xenapi.task.create("export", "")
    sim_pool.faults.crash_export(path="/export")
    st, hdrs, body = get(sim_pool.url, "/export", {"session_id": xapi._session, "ref": snap,
                                                   "task_id": task})
    assert st == 500
    assert b"INTERNAL_ERROR" in body and b"crashed" in body
    rec = xapi.xenapi.task.get_record(task)
    assert rec["status"] == "failure" and rec["error_info"][0] == "INTERNAL_ERROR"
    assert xapi.xenapi.VM.get_current_operations(snap) == {}
    assert "export" in xapi.xenapi.VM.get_allowed_operations(snap)
    req = sim_pool.calls.requests("/export")[-1]
    assert req.status == 500 and "INTERNAL_ERROR" in req.error
    # released at once: destroy needs no waiting
    xapi.xenapi.VM.destroy(snap)
    for v in vdis:
        xapi.xenapi.VDI.destroy(v)
    xapi.xenapi.task.destroy(task)
    # and the pool serves the next export normally
    _, snap2 = snapshot_of(sim_pool, xapi)
    task = xapi.xenapi.task.create("export", "")
    st, _, body = get(sim_pool.url, "/export", {"session_id": xapi._session, "ref": snap2,
                                                "task_id": task})
    assert st == 200 and body
    assert xapi.xenapi.task.get_status(task) == "success"
    xapi.xenapi.task.destroy(task)
    # no temporary task is left behind by a crashed request without task_id
    sim_pool.faults.crash_export(path="/export")
    st, _, _ = get(sim_pool.url, "/export", {"session_id": xapi._session, "ref": snap2})
    assert st == 500
    assert [t for t in xapi.xenapi.task.get_all_records().values() if t["name_label"] == "VM.export"] == []
    xapi.xenapi.VM.destroy(snap2)


def test_crash_in_body_cuts_it_fails_the_task_and_releases(sim_pool, xapi):
    _, snap = snapshot_of(sim_pool, xapi)
    vdis = snapshot_vdis(xapi, snap)
    task = xapi.xenapi.task.create("export", "")
    sim_pool.faults.crash_export(after_bytes=5000, path="/export")
    st, hdrs, body = get(sim_pool.url, "/export", {"session_id": xapi._session, "ref": snap,
                                                   "task_id": task})
    assert st == 200 and len(body) == 5000          # header went out: the body is cut
    rec = xapi.xenapi.task.get_record(task)
    assert rec["status"] == "failure" and rec["error_info"][0] == "INTERNAL_ERROR"
    xapi.xenapi.VM.destroy(snap)
    # a raw VDI export too: the VDI is free again at once
    sim_pool.faults.crash_export(path="/export_raw_vdi")
    st, _, body = get(sim_pool.url, "/export_raw_vdi", {"session_id": xapi._session, "vdi": vdis[0]})
    assert st == 500 and b"INTERNAL_ERROR" in body
    assert xapi.xenapi.VDI.get_current_operations(vdis[0]) == {}
    for v in vdis:
        xapi.xenapi.VDI.destroy(v)
    xapi.xenapi.task.destroy(task)


# ---------------------------------------------------------------------------
# listeners and redirects
# ---------------------------------------------------------------------------
def test_listeners_set_so_reuseaddr_and_rebind_at_once(tmp_path):
    pool = xapisim.start_pool(pools.simple_pool(vms=["a"]), unix_socket=False)
    try:
        port = pool.port
        for s in pool._servers:
            assert s.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        # the server closes after an export: its side of the connection is in TIME_WAIT
        x = pool.session()
        ref, _ = pool.vm("a")
        st, _, body = get(pool.url, "/export_metadata", {"session_id": x._session, "ref": ref})
        assert st == 200 and body
        x.xenapi.session.logout()
    finally:
        pool.stop()
    again = xapisim.start_pool(pools.simple_pool(vms=["a"]), unix_socket=False, port=port)
    try:
        assert again.port == port
        again.session().xenapi.session.logout()
    finally:
        again.stop()


def test_redirect_location_is_xapis(sim_pool, xapi):
    ref, _ = sim_pool.vm("local-vm")
    raw = "session_id=%s&ref=%s&use_compression=zstd" % (
        urllib.parse.quote(xapi._session), urllib.parse.quote(ref))
    u = urllib.parse.urlsplit(sim_pool.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("GET", "/export/?" + raw)                 # XO's path, with the slash
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 302
    b_addr = urllib.parse.urlsplit(sim_pool.host_urls["xcp-ng-b"]).hostname
    # Printf.sprintf "https://%s%s?%s" address req.uri (k=v joined, values as parsed):
    # the path as received, the simulator's scheme and port
    assert resp.getheader("Location") == "http://%s:%d/export/?session_id=%s&ref=%s&use_compression=zstd" % (
        b_addr, sim_pool.port, xapi._session, ref)


# ---------------------------------------------------------------------------
# Xen Orchestra's client
# ---------------------------------------------------------------------------
def _xo_ready():
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node and npm are needed for Xen Orchestra's xen-api client")
    if not os.path.isdir(os.path.join(XO_DIR, "node_modules", "xen-api")):
        r = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=XO_DIR,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           universal_newlines=True, timeout=600)
        assert r.returncode == 0, "npm ci failed:\n" + r.stdout
    with open(os.path.join(XO_DIR, "node_modules", "xen-api", "package.json")) as f:
        assert json.load(f)["version"] == "4.7.6"
    return node


def test_xen_orchestra_client_round(sim_pool):
    node = _xo_ready()
    env = dict(os.environ, XAPISIM_URL=sim_pool.url, XAPISIM_USER=sim_pool.user,
               XAPISIM_PASSWORD=sim_pool.password, XO_VM="web01", XO_TIMEOUT_MS="60000")
    try:
        r = subprocess.run([node, "smoke.mjs"], cwd=XO_DIR, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True, timeout=90)
    except subprocess.TimeoutExpired as e:
        pytest.fail("smoke.mjs hung:\n%s" % (e.stderr,))
    assert r.returncode == 0, "smoke.mjs failed (%d):\n%s" % (r.returncode, r.stderr)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["status"] == "connected" and "web01" in out["vms"]
    assert len(out["vms"]) == len([1 for v in sim_pool.db.tables["VM"].values()
                                   if not v["is_a_template"] and not v["is_a_snapshot"]
                                   and not v["is_control_domain"]])
    assert out["snapshotIsSnapshot"] is True and out["snapshotOf"] is True
    assert out["exportMagic"] == "28b52ffd" and out["exportBytes"] > 1000   # a zstd stream
    assert out["exportTaskResult"] == ""
    assert out["destroyedVdis"] == 2
    assert out["snapshotGoneFromCache"] and out["vdisGoneFromCache"]   # del events arrived
    assert out["statusAfter"] == "disconnected" and out["afterLogout"] == "SESSION_INVALID"
    calls = sim_pool.calls
    # the default transport is JSON-RPC at /jsonrpc; Async.VM.snapshot, events, logout
    assert {c.encoding for c in calls.rpc} == {"jsonrpc"}
    for m in ("system.listMethods", "event.inject", "event.from", "Async.VM.snapshot",
              "Async.VM.destroy", "pool.add_to_other_config", "session.logout"):
        assert calls.count(m) >= 1, m
    failed = [(c.method, c.error) for c in calls.rpc if c.status != "Success"]
    # only the script's own check after logout, and maybe the client's fire-and-forget
    # clean-up of its last barrier key, sent after disconnect() dropped the session
    assert set(m for m, err in failed) <= {"session.get_uuid", "pool.remove_from_other_config"}, failed
    assert all(err[0] == "SESSION_INVALID" for _, err in failed), failed
    exports = calls.requests("/export")
    assert len(exports) == 1 and exports[0].status == 200 and exports[0].error is None
    assert sim_pool.leftovers() == {"snapshots": [], "vdis": []}
