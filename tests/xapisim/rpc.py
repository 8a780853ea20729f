"""XML-RPC as xapi speaks it: rpclib-style encoding, sessions, dispatch of
generated field accessors and of the operations in model.py.

Encoding (facts 1.2): no whitespace; strings and ints as untyped
``<value>text</value>`` (ints therefore reach Python clients as strings);
bools ``<boolean>``; floats ``<double>`` (%.16g); datetimes
``YYYYMMDDTHH:MM:SSZ``; maps as structs; sets as arrays.

One dispatcher (``dispatch``), two encodings: XML-RPC (``parse_request``,
``xml_response``) and JSON-RPC 1.0/2.0 (``parse_json_request``, ``json_response``)
as api_server.ml and ocaml-rpc's jsonrpc.ml write them.
"""
import datetime
import inspect
import json
import re
import threading
import time
import xmlrpc.client

from xapisim import model
from xapisim.model import NULL, SCHEMA, ApiError

# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------
_CTRL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _esc(s):
    if "&" in s:
        s = s.replace("&", "&amp;")
    if "<" in s:
        s = s.replace("<", "&lt;")
    if ">" in s:
        s = s.replace(">", "&gt;")
    if '"' in s:
        s = s.replace('"', "&quot;")
    if _CTRL.search(s):
        s = _CTRL.sub("", s)
    return s


def _enc(v, out):
    t = type(v)
    if t is str:
        out.append("<value>" + _esc(v) + "</value>")
    elif t is bool:
        out.append("<value><boolean>1</boolean></value>" if v else "<value><boolean>0</boolean></value>")
    elif t is int:
        out.append("<value>%d</value>" % v)
    elif t is dict:
        out.append("<value><struct>")
        for k, x in v.items():
            out.append("<member><name>" + _esc(str(k)) + "</name>")
            _enc(x, out)
            out.append("</member>")
        out.append("</struct></value>")
    elif t is list or t is tuple:
        out.append("<value><array><data>")
        for x in v:
            _enc(x, out)
        out.append("</data></array></value>")
    elif t is float:
        out.append("<value><double>%.16g</double></value>" % v)
    elif t is datetime.datetime:
        out.append("<value><dateTime.iso8601>" + v.strftime("%Y%m%dT%H:%M:%SZ")
                   + "</dateTime.iso8601></value>")
    elif v is None:
        out.append("<value></value>")
    elif isinstance(v, xmlrpc.client.DateTime):
        out.append("<value><dateTime.iso8601>" + v.value + "</dateTime.iso8601></value>")
    elif t is model.Int32:
        out.append("<value><i4>%d</i4></value>" % v)
    elif isinstance(v, str):
        _enc(str(v), out)
    elif isinstance(v, int):
        _enc(int(v), out)
    else:
        raise TypeError("cannot encode %r" % (v,))


def encode_value(v):
    out = []
    _enc(v, out)
    return "".join(out)


def success_body(value):
    out = ['<?xml version="1.0"?><methodResponse><params><param><value><struct>'
           "<member><name>Status</name><value>Success</value></member>"
           "<member><name>Value</name>"]
    _enc(value, out)
    out.append("</member></struct></value></param></params></methodResponse>")
    return "".join(out).encode("utf-8")


def failure_body(description):
    out = ['<?xml version="1.0"?><methodResponse><params><param><value><struct>'
           "<member><name>Status</name><value>Failure</value></member>"
           "<member><name>ErrorDescription</name>"]
    _enc([str(x) for x in description], out)
    out.append("</member></struct></value></param></params></methodResponse>")
    return "".join(out).encode("utf-8")


def parse_request(body):
    """-> (method, params); raises ValueError for malformed XML."""
    try:
        params, method = xmlrpc.client.loads(body)
    except Exception as e:  # expat errors, bad values
        raise ValueError(str(e))
    if not method:
        raise ValueError("no methodName")
    return method, params


def decode_value(xml_text):
    """Decode one XML-RPC ``<value>`` (as in ova.xml or task.result)."""
    if isinstance(xml_text, bytes):
        xml_text = xml_text.decode("utf-8")
    params, _ = xmlrpc.client.loads(
        "<methodResponse><params><param>" + xml_text + "</param></params></methodResponse>")
    return params[0]


LIST_METHODS = "system.listMethods"


def xml_response(method, resp):
    """The XML-RPC body for ``dispatch``'s answer.  ``system.listMethods`` is
    answered with the bare array, not ``{Status, Value}`` (api_server.ml)."""
    if method == LIST_METHODS and resp["Status"] == "Success":
        return ('<?xml version="1.0"?><methodResponse><params><param>'
                + encode_value(resp["Value"]) + "</param></params></methodResponse>").encode("utf-8")
    if resp["Status"] == "Success":
        return success_body(resp["Value"])
    return failure_body(resp["ErrorDescription"])


# -- JSON-RPC (ocaml-rpc src/lib/jsonrpc.ml; xapi ocaml/xapi/api_server.ml) -------------
JSON_V1, JSON_V2 = "1.0", "2.0"


def _json_default(v):
    if isinstance(v, datetime.datetime):
        return v.strftime("%Y%m%dT%H:%M:%SZ")     # rpclib DateTime -> JSON string
    if isinstance(v, xmlrpc.client.DateTime):
        return v.value
    if isinstance(v, tuple):
        return list(v)
    raise TypeError("cannot encode %r" % (v,))


def json_dumps(v):
    return json.dumps(v, default=_json_default, ensure_ascii=False, separators=(",", ":"))


def parse_json_request(body):
    """-> (version, id, method, params); raises ValueError with jsonrpc.ml's text
    for a malformed request (xapi answers it with an HTTP 500)."""
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(str(e))
    try:
        d = json.loads(body)
    except ValueError as e:
        raise ValueError("Yojson.Json_error(%s)" % e)
    if not isinstance(d, dict):
        raise ValueError("Invalid request body")
    if "method" not in d:
        raise ValueError("Required field method is missing")
    method = d["method"]
    if not isinstance(method, str):
        raise ValueError("Invalid field 'method' in request body")
    if "jsonrpc" not in d:
        version = JSON_V1
    elif d["jsonrpc"] == "2.0":
        version = JSON_V2
    else:
        raise ValueError("Invalid field 'jsonrpc' in request body")
    params = d.get("params")
    if version == JSON_V1:
        if "params" not in d:
            raise ValueError("Required field params is missing")
        if not isinstance(params, list):
            raise ValueError("Invalid field 'params' in request body")
    elif params is None:
        params = []
    elif isinstance(params, dict):
        params = [params]
    elif not isinstance(params, list):
        raise ValueError("Invalid field 'params' in request body")
    rid = d.get("id")
    if rid is None or isinstance(rid, bool) or not isinstance(rid, (int, str)):
        # a notification (no id) is refused: version_id_and_call_of_string
        raise ValueError("Invalid field 'id' in request body")
    return version, rid, method, params


def json_response(version, rid, method, resp):
    """JSON-RPC body for ``dispatch``'s answer.  1.0: ``{result, error, id}`` with the
    error as ``[code, params...]``; 2.0: ``{jsonrpc, result|error, id}`` with the error
    as ``{"code": 1, "message": code, "data": [params...]}`` (api_server.ml
    ``error_code_lit``)."""
    ok = resp["Status"] == "Success"
    if ok:
        value = resp["Value"]
    else:
        desc = [str(x) for x in resp["ErrorDescription"]]
        if version == JSON_V2 and method != LIST_METHODS:
            value = {"code": 1, "message": desc[0] if desc else "", "data": desc[1:]}
        else:
            value = desc
    if version == JSON_V1:
        out = {"result": value, "error": None, "id": rid} if ok else \
            {"result": None, "error": value, "id": rid}
    else:
        out = {"jsonrpc": "2.0", ("result" if ok else "error"): value, "id": rid}
    return json_dumps(out).encode("utf-8")


# ---------------------------------------------------------------------------
# Calls
# ---------------------------------------------------------------------------
class Context:
    """Where a call came from and who makes it."""

    def __init__(self, sim, host, unix=False, client=None):
        self.sim = sim
        self.db = sim.db
        self.host = host          # ref of the host whose listener received the call
        self.unix = unix          # came over the (pre-authenticated) unix socket
        self.session = None
        self.client = client
        self.method = None


ACTIONS = {}


def action(name, async_ok=True, params=None):
    """Register an explicit message.  ``params(ctx)`` may return the (min, max)
    positional parameter count (session excluded) for release-dependent APIs."""

    def deco(fn):
        sig = inspect.signature(fn)
        ps = list(sig.parameters.values())[1:]
        lo = sum(1 for p in ps if p.default is inspect.Parameter.empty)
        ACTIONS[name] = (fn, lo, len(ps), async_ok, params)
        return fn

    return deco


def _release_xapi(ctx):
    return model.xapi_version_tuple(ctx.sim.release["xapi"])


def _api_version(ctx):
    return tuple(ctx.sim.release["api"])


# -- session ---------------------------------------------------------------
def login(ctx, uname, pwd, version="1.1", originator=""):
    db = ctx.db
    sim = ctx.sim
    if not ctx.unix:
        if ctx.host != db.master():
            raise ApiError("HOST_IS_SLAVE", db.tables["host"][db.master()]["address"])
        if uname != sim.user or pwd != sim.password:
            delay = sim.auth_failure_delay
            if delay:
                db.lock.release()
                try:
                    time.sleep(delay)
                finally:
                    db.lock.acquire()
            raise ApiError("SESSION_AUTHENTICATION_FAILED", uname, "Authentication failure")
    ref = db.create("session", this_host=ctx.host, last_active=model.now(), pool=False,
                    is_local_superuser=True, auth_user_name=uname if not ctx.unix else "root",
                    originator=str(originator), validation_time=model.now())
    return ref


def logout(ctx):
    if ctx.session in ctx.db.tables["session"]:
        ctx.db.remove("session", ctx.session)
    return ""


# -- VM ----------------------------------------------------------------------
@action("VM.snapshot", params=lambda ctx: (2, 3) if _release_xapi(ctx) >= (21, 4) else (2, 2))
def vm_snapshot(ctx, vm, new_name, ignore_vdis=()):
    ref = model.snapshot_vm(ctx.db, vm, new_name, ignore_vdis)
    _mark_client(ctx, ref)
    return ref


@action("VM.snapshot_with_quiesce")
def vm_snapshot_with_quiesce(ctx, vm, new_name):
    if _api_version(ctx) >= (2, 14):
        raise ApiError("MESSAGE_REMOVED")
    rec = ctx.db.get("VM", vm)
    if rec["guest_metrics"] not in ctx.db.tables["VM_guest_metrics"]:
        raise ApiError("VM_SNAPSHOT_WITH_QUIESCE_NOT_SUPPORTED", vm, "")
    ref = model.snapshot_vm(ctx.db, vm, new_name)
    ctx.db.tables["VM"][ref]["snapshot_info"]["disk-snapshot-type"] = "quiesced"
    _mark_client(ctx, ref)
    return ref


@action("VM.checkpoint")
def vm_checkpoint(ctx, vm, new_name):
    ref = model.snapshot_vm(ctx.db, vm, new_name, checkpoint=True)
    _mark_client(ctx, ref)
    return ref


def _mark_client(ctx, vm):
    db = ctx.db
    db.client_created.add(vm)
    for vbd in db.tables["VM"][vm]["VBDs"]:
        b = db.tables["VBD"][vbd]
        if b["type"] == "Disk" and b["VDI"] in db.tables["VDI"] and \
                db.tables["VDI"][b["VDI"]]["is_a_snapshot"]:
            db.client_created.add(b["VDI"])
    if db.tables["VM"][vm]["suspend_VDI"] in db.tables["VDI"]:
        db.client_created.add(db.tables["VM"][vm]["suspend_VDI"])


@action("VM.set_is_a_template", async_ok=False)
def vm_set_is_a_template(ctx, vm, value):
    model.set_is_a_template(ctx.db, vm, model.coerce("VM", "is_a_template", value))
    return ""


@action("VM.destroy")
def vm_destroy(ctx, vm):
    model.destroy_vm(ctx.db, vm)
    return ""


@action("VM.set_memory_limits", async_ok=True)
def vm_set_memory_limits(ctx, vm, static_min, static_max, dynamic_min, dynamic_max):
    """xapi_vm_memory_constraints: static_min <= dynamic_min <= dynamic_max <= static_max;
    the static range may change only while the VM is halted."""
    rec = ctx.db.get("VM", vm)
    values = [int(v) for v in (static_min, static_max, dynamic_min, dynamic_max)]
    smin, smax, dmin, dmax = values
    if not smin <= dmin <= dmax <= smax:
        raise ApiError("MEMORY_CONSTRAINT_VIOLATION",
                       "Memory limits must satisfy: static_min <= dynamic_min <= dynamic_max <= static_max")
    model.check_vm_op(ctx.db, vm, "changing_memory_limits", ["Halted"])
    rec.update(memory_static_min=smin, memory_static_max=smax, memory_dynamic_min=dmin,
               memory_dynamic_max=dmax, memory_target=dmax)
    ctx.db.touch()
    return ""


@action("VIF.move", async_ok=True)
def vif_move(ctx, vif, network):
    """Move a VIF to another network (xapi_vif.ml move; a halted VM's VIF just changes)."""
    rec = ctx.db.get("VIF", vif)
    ctx.db.get("network", network)
    old = ctx.db.get("network", rec["network"])
    if vif in old.get("VIFs", []):
        old["VIFs"].remove(vif)
    ctx.db.get("network", network).setdefault("VIFs", []).append(vif)
    rec["network"] = network
    ctx.db.touch()
    return ""


@action("VM.start")
def vm_start(ctx, vm, start_paused, force):
    model.start_vm(ctx.db, vm)
    return ""


@action("VM.start_on")
def vm_start_on(ctx, vm, host, start_paused, force):
    ctx.db.get("host", host)
    ctx.db.get("VM", vm)
    if not ctx.db.host_sees_srs(host, ctx.db.vm_disk_srs(vm)):
        raise ApiError("VM_REQUIRES_SR", vm, ctx.db.vm_disk_srs(vm)[0])
    model.check_vm_op(ctx.db, vm, "start_on", ["Halted"])
    model._make_running(ctx.db, vm, host)
    return ""


@action("VM.hard_shutdown")
def vm_hard_shutdown(ctx, vm):
    model.shutdown_vm(ctx.db, vm, "hard_shutdown")
    return ""


@action("VM.clean_shutdown")
def vm_clean_shutdown(ctx, vm):
    model.shutdown_vm(ctx.db, vm, "clean_shutdown")
    return ""


@action("VM.shutdown")
def vm_shutdown(ctx, vm):
    model.shutdown_vm(ctx.db, vm, "clean_shutdown")
    return ""


@action("VM.get_allowed_VBD_devices", async_ok=False)
def vm_allowed_vbd_devices(ctx, vm):
    rec = ctx.db.get("VM", vm)
    used = {ctx.db.tables["VBD"][b]["userdevice"] for b in rec["VBDs"]}
    return [str(i) for i in range(16) if str(i) not in used]


@action("VM.get_allowed_VIF_devices", async_ok=False)
def vm_allowed_vif_devices(ctx, vm):
    rec = ctx.db.get("VM", vm)
    used = {ctx.db.tables["VIF"][v]["device"] for v in rec["VIFs"]}
    return [str(i) for i in range(7) if str(i) not in used]


# -- VDI -------------------------------------------------------------------
@action("VDI.snapshot")
def vdi_snapshot(ctx, vdi, driver_params=None):
    ref = model.snapshot_vdi(ctx.db, vdi, driver_params)
    ctx.db.client_created.add(ref)
    return ref


@action("VDI.clone")
def vdi_clone(ctx, vdi, driver_params=None):
    db = ctx.db
    ref = model.snapshot_vdi(db, vdi, driver_params, clone=True)
    rec = db.tables["VDI"][ref]
    db.tables["VDI"][vdi]["snapshots"].remove(ref)
    rec.update(is_a_snapshot=False, snapshot_of=NULL, snapshot_time=model.EPOCH)
    db.client_created.add(ref)
    return ref


@action("VDI.destroy")
def vdi_destroy(ctx, vdi):
    model.destroy_vdi(ctx.db, vdi)
    return ""


@action("VDI.create")
def vdi_create(ctx, record):
    db = ctx.db
    if not isinstance(record, dict):
        raise ApiError("FIELD_TYPE_ERROR", "args")
    sr = record.get("SR", NULL)
    srec = db.get("SR", sr)
    if "virtual_size" not in record:
        raise ApiError("FIELD_TYPE_ERROR", "virtual_size")
    size = model.coerce("VDI", "virtual_size", record["virtual_size"])
    if size < 0:
        raise ApiError("FIELD_TYPE_ERROR", "virtual_size")
    if srec["content_type"] == "iso":
        raise ApiError("SR_OPERATION_NOT_SUPPORTED", sr)
    fields = {}
    for k in ("name_label", "name_description", "type", "sharable", "read_only", "other_config",
              "xenstore_data", "sm_config", "tags"):
        if k in record:
            fields[k] = model.coerce("VDI", k, record[k])
    from xapisim.disks import Disk
    ref = model.new_vdi(db, sr, Disk.empty(size), **fields)
    db.client_created.add(ref)
    return ref


@action("VDI.get_nbd_info", async_ok=False)
def vdi_get_nbd_info(ctx, vdi):
    from xapisim import nbd
    return nbd.get_nbd_info(ctx, vdi)


@action("network.add_purpose")
def network_add_purpose(ctx, network, value):
    from xapisim import nbd
    return nbd.add_purpose(ctx, network, value)


@action("network.remove_purpose")
def network_remove_purpose(ctx, network, value):
    from xapisim import nbd
    return nbd.remove_purpose(ctx, network, value)


# -- VBD / VIF ---------------------------------------------------------------
@action("VBD.create")
def vbd_create(ctx, record):
    if not isinstance(record, dict):
        raise ApiError("FIELD_TYPE_ERROR", "args")
    return model.create_vbd(ctx.db, record)


@action("VBD.destroy")
def vbd_destroy(ctx, vbd):
    rec = ctx.db.get("VBD", vbd)
    if rec["currently_attached"]:
        raise ApiError("OPERATION_NOT_ALLOWED", "VBD '%s' still attached to '%s'"
                       % (rec["uuid"], ctx.db.tables["VM"].get(rec["VM"], {}).get("uuid", "")))
    model.destroy_vbd(ctx.db, vbd)
    return ""


@action("VBD.plug")
def vbd_plug(ctx, vbd):
    """Hot-plug a VBD into its running VM (xapi_vbd.ml plug: the VM must be Running; a VBD
    already attached is DEVICE_ALREADY_ATTACHED); the guest sees it as `device`."""
    rec = ctx.db.get("VBD", vbd)
    vm = ctx.db.get("VM", rec["VM"])
    if vm["power_state"] != "Running":
        raise model.power_state_error(rec["VM"], ["Running"], vm["power_state"])
    if rec["currently_attached"]:
        raise ApiError("DEVICE_ALREADY_ATTACHED", vbd)
    rec["currently_attached"] = True
    if not rec["device"] and rec["userdevice"].isdigit():
        rec["device"] = "xvd" + chr(ord("a") + int(rec["userdevice"]))
    return ""


@action("VIF.create")
def vif_create(ctx, record):
    if not isinstance(record, dict):
        raise ApiError("FIELD_TYPE_ERROR", "args")
    return model.create_vif(ctx.db, record)


@action("VIF.destroy")
def vif_destroy(ctx, vif):
    model.destroy_vif(ctx.db, vif)
    return ""


# -- SR / host / pool --------------------------------------------------------
@action("SR.scan")
def sr_scan(ctx, sr):
    ctx.db.get("SR", sr)
    return ""




# -- task ---------------------------------------------------------------------
@action("task.create", async_ok=False)
def task_create(ctx, label, description):
    return model.create_task(ctx.db, label, description, host=ctx.host, session=ctx.session)


@action("task.cancel", async_ok=False)
def task_cancel(ctx, task):
    model.cancel_task(ctx.db, task)
    return ""


@action("task.destroy", async_ok=False)
def task_destroy(ctx, task):
    ctx.db.get("task", task)
    ctx.db.remove("task", task)
    for s in ctx.db.tables["session"].values():
        if task in s["tasks"]:
            s["tasks"].remove(task)
    return ""


@action("task.set_status", async_ok=False)
def task_set_status(ctx, task, value):
    rec = ctx.db.get("task", task)
    rec["status"] = str(value)
    ctx.db.touch()
    return ""


@action("task.set_progress", async_ok=False)
def task_set_progress(ctx, task, value):
    rec = ctx.db.get("task", task)
    rec["progress"] = float(value)
    ctx.db.touch()
    return ""


# -- event (model.Events: xapi_event.ml) -------------------------------------------
@action("event.from", async_ok=False)
def event_from(ctx, classes, token, timeout):
    """Objects of the subscribed classes (``*``, ``vm``, ``task/<ref>``...) created,
    changed or deleted since ``token``; blocks until there is one or ``timeout``
    seconds have passed (a logout of the session ends the wait: SESSION_INVALID)."""
    if not isinstance(classes, (list, tuple)):
        raise ApiError("FIELD_TYPE_ERROR", "classes")
    try:
        timeout = float(timeout)
    except (TypeError, ValueError):
        raise ApiError("FIELD_TYPE_ERROR", "timeout")
    ctx.db.events.view = _record
    return ctx.db.events.event_from(classes, token, timeout, session=ctx.session)


@action("event.inject", async_ok=False)
def event_inject(ctx, cls, ref):
    """A ``mod`` event for one object; returns a token from just before it."""
    ctx.db.events.view = _record
    return ctx.db.events.inject(cls, ref)


def list_methods():
    """system.listMethods: the sync wire names of the messages the simulator
    serves, all of them messages of xapi's datamodel (gen_server.ml lists every
    message of every class; no ``Async.`` names, no ``system.*``)."""
    names = ["session.login_with_password", "session.logout",
             "session.slave_local_login_with_password", "session.local_logout"]
    for cls, fields in SCHEMA.items():
        verbs = [] if cls in NO_GET_ALL else ["get_all", "get_all_records", "get_all_records_where"]
        verbs += ["get_record", "get_by_uuid"]
        if cls in NAMED:
            verbs.append("get_by_name_label")
        for f, spec in fields.items():
            verbs.append("get_" + f)
            if spec[1]:
                verbs.append("set_" + f)
            if spec == ("m", True):
                verbs += ["add_to_" + f, "remove_from_" + f]
            elif spec == ("S", True):
                verbs += ["add_" + f, "remove_" + f]
        names += ["%s.%s" % (cls, v) for v in verbs]
    names += sorted(ACTIONS)
    seen = set()
    return [n for n in names if not (n in seen or seen.add(n))]


# ---------------------------------------------------------------------------
# Generated messages: get_all, get_record, get_<field>, set_<field> ...
# ---------------------------------------------------------------------------
def vm_allowed_operations(db, ref, rec):
    ops = []
    cur = rec["current_operations"]
    if rec["is_control_domain"]:
        return ["metadata_export"]
    if rec["is_a_snapshot"]:
        cands = ["revert", "clone", "copy", "export", "destroy", "metadata_export"]
    elif rec["is_a_template"]:
        cands = ["clone", "copy", "export", "destroy", "provision", "metadata_export"]
    else:
        ps = rec["power_state"]
        cands = ["snapshot", "checkpoint", "clone", "copy", "metadata_export", "changing_VCPUs"]
        if ps == "Halted":
            cands += ["start", "start_on", "export", "destroy", "make_into_template",
                      "changing_memory_limits"]
        elif ps == "Running":
            cands += ["clean_shutdown", "hard_shutdown", "clean_reboot", "hard_reboot",
                      "suspend", "pool_migrate", "pause"]
        elif ps == "Suspended":
            cands += ["resume", "resume_on", "hard_shutdown", "export", "destroy"]
    for op in cands:
        if op in rec["blocked_operations"]:
            continue
        if cur and not any(op in g and all(o in g for o in cur.values())
                           for g in model.CONCURRENT_GROUPS):
            continue
        ops.append(op)
    return ops


def _record(db, cls, ref):
    rec = db.get(cls, ref)
    if cls == "VM":
        rec = dict(rec)
        rec["allowed_operations"] = vm_allowed_operations(db, ref, rec)
    elif cls == "VDI":
        if db.in_use.get(ref) and rec["allowed_operations"]:
            rec = dict(rec)
            rec["allowed_operations"] = [o for o in rec["allowed_operations"] if o != "destroy"]
    return rec


# xapi's DB filter language (get_all_records_where):
#   field "name__label"="x" and not (field "is_a_template"="true") or true
_TOKEN = re.compile(r'\s*(?:(\()|(\))|("(?:[^"\\]|\\.)*")|(=)|([A-Za-z_]+))')


def _tokenize(expr):
    pos, out = 0, []
    expr = expr.strip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise ApiError("INVALID_VALUE", "expr", expr)
        out.append(next(g for g in m.groups() if g is not None))
        pos = m.end()
        while pos < len(expr) and expr[pos].isspace():
            pos += 1
    return out


def _compile_where(expr, cls):
    toks = _tokenize(expr)
    pos = [0]

    def peek():
        return toks[pos[0]] if pos[0] < len(toks) else None

    def take():
        t = peek()
        pos[0] += 1
        return t

    def unq(t):
        if t is None or not t.startswith('"'):
            raise ApiError("INVALID_VALUE", "expr", expr)
        return t[1:-1].replace('\\"', '"').replace("\\\\", "\\")

    def operand():
        t = take()
        if t == "field":
            name = unq(take()).replace("__", "_")
            return lambda rec, ref: _as_text(rec.get(name, "")) if name != "ref" else ref
        return (lambda v: lambda rec, ref: v)(unq(t))

    def atom():
        t = peek()
        if t == "(":
            take()
            f = disj()
            if take() != ")":
                raise ApiError("INVALID_VALUE", "expr", expr)
            return f
        if t == "not":
            take()
            f = atom()
            return lambda rec, ref: not f(rec, ref)
        if t == "true":
            take()
            return lambda rec, ref: True
        if t == "false":
            take()
            return lambda rec, ref: False
        a = operand()
        if take() != "=":
            raise ApiError("INVALID_VALUE", "expr", expr)
        b = operand()
        return lambda rec, ref: a(rec, ref) == b(rec, ref)

    def conj():
        f = atom()
        while peek() == "and":
            take()
            g = atom()
            f = (lambda f, g: lambda rec, ref: f(rec, ref) and g(rec, ref))(f, g)
        return f

    def disj():
        f = conj()
        while peek() == "or":
            take()
            g = conj()
            f = (lambda f, g: lambda rec, ref: f(rec, ref) or g(rec, ref))(f, g)
        return f

    f = disj()
    if peek() is not None:
        raise ApiError("INVALID_VALUE", "expr", expr)
    return f


def _as_text(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, datetime.datetime):
        return v.strftime("%Y%m%dT%H:%M:%SZ")
    return str(v)


def generic(ctx, cls, verb, args):
    """Execute a generated message; returns (found, value)."""
    db = ctx.db
    fields = SCHEMA[cls]

    def need(n):
        if len(args) != n:
            raise ApiError("MESSAGE_PARAMETER_COUNT_MISMATCH", "%s.%s" % (cls, verb),
                           str(n + 1), str(len(args) + 1))

    if verb == "get_all":
        need(0)
        return True, list(db.tables[cls])
    if verb == "get_all_records":
        need(0)
        return True, {ref: _record(db, cls, ref) for ref in db.tables[cls]}
    if verb == "get_all_records_where":
        need(1)
        f = _compile_where(str(args[0]), cls)
        return True, {ref: _record(db, cls, ref) for ref, rec in db.tables[cls].items() if f(rec, ref)}
    if verb == "get_record":
        need(1)
        return True, _record(db, cls, args[0])
    if verb == "get_by_uuid":
        need(1)
        return True, db.ref_of_uuid(cls, args[0])
    if verb == "get_by_name_label" and cls in NAMED:
        need(1)
        return True, [ref for ref, rec in db.tables[cls].items() if rec["name_label"] == args[0]]
    if verb.startswith("get_") and verb[4:] in fields:
        need(1)
        return True, _record(db, cls, args[0])[verb[4:]]
    if verb.startswith("set_") and verb[4:] in fields and fields[verb[4:]][1]:
        need(2)
        f = verb[4:]
        rec = db.get(cls, args[0])
        rec[f] = model.coerce(cls, f, args[1])
        db.touch()
        return True, ""
    if verb.startswith("add_to_") and verb[7:] in fields and fields[verb[7:]] == ("m", True):
        need(3)
        f = verb[7:]
        rec = db.get(cls, args[0])
        key, value = args[1], args[2]
        if not isinstance(key, str) or not isinstance(value, str):
            raise ApiError("FIELD_TYPE_ERROR", f)
        if key in rec[f]:
            raise ApiError("MAP_DUPLICATE_KEY", cls, f, args[0], key)
        rec[f][key] = value
        db.touch()
        return True, ""
    if verb.startswith("remove_from_") and verb[12:] in fields and fields[verb[12:]] == ("m", True):
        need(2)
        rec = db.get(cls, args[0])
        rec[verb[12:]].pop(args[1], None)
        db.touch()
        return True, ""
    if verb.startswith("add_") and verb[4:] in fields and fields[verb[4:]] == ("S", True):
        need(2)
        rec = db.get(cls, args[0])
        if args[1] not in rec[verb[4:]]:
            rec[verb[4:]].append(str(args[1]))
        db.touch()
        return True, ""
    if verb.startswith("remove_") and verb[7:] in fields and fields[verb[7:]] == ("S", True):
        need(2)
        rec = db.get(cls, args[0])
        if args[1] in rec[verb[7:]]:
            rec[verb[7:]].remove(args[1])
        db.touch()
        return True, ""
    return False, None


NAMED = model.NAMED_CLASSES

# Classes without get_all/get_all_records/get_all_records_where: not in the
# datamodel's expose_get_all_messages_for (sessions cannot be listed).
NO_GET_ALL = {"session"}


def _lookup(method):
    """-> ("action", entry) | ("generic", (cls, verb)) | None"""
    if method in ACTIONS:
        return "action", ACTIONS[method]
    cls, _, verb = method.partition(".")
    if cls in SCHEMA and verb and "." not in verb:
        f = SCHEMA[cls]
        if verb in ("get_all", "get_all_records", "get_all_records_where") and cls in NO_GET_ALL:
            return None
        if verb in ("get_all", "get_all_records", "get_all_records_where", "get_record",
                    "get_by_uuid") or (verb == "get_by_name_label" and cls in NAMED):
            return "generic", (cls, verb)
        for prefix, pred in (("get_", lambda s: True), ("set_", lambda s: s[1]),
                             ("add_to_", lambda s: s == ("m", True)),
                             ("remove_from_", lambda s: s == ("m", True)),
                             ("add_", lambda s: s == ("S", True)),
                             ("remove_", lambda s: s == ("S", True))):
            if verb.startswith(prefix) and verb[len(prefix):] in f and pred(f[verb[len(prefix):]]):
                return "generic", (cls, verb)
    return None


def _generic_arity(verb):
    """Parameters of a generated message, session excluded."""
    if verb in ("get_all", "get_all_records"):
        return 0
    if verb.startswith("add_to_"):
        return 2 + 1
    if verb.startswith(("set_", "remove_from_", "add_", "remove_")):
        return 2
    return 1


LOGIN_METHODS = {"session.login_with_password", "session.slave_local_login_with_password"}


def _check_session(ctx, session):
    db = ctx.db
    if not isinstance(session, str) or session not in db.tables["session"]:
        raise ApiError("SESSION_INVALID", session)
    if not ctx.unix and ctx.host != db.master():
        raise ApiError("HOST_IS_SLAVE", db.tables["host"][db.master()]["address"])
    db.tables["session"][session]["last_active"] = model.now()
    ctx.session = session


def dispatch(ctx, method, params):
    """Run one call; returns the response struct as a Python dict."""
    try:
        return {"Status": "Success", "Value": _dispatch(ctx, method, list(params))}
    except ApiError as e:
        return {"Status": "Failure", "ErrorDescription": e.description}
    except Exception as e:  # a simulator bug: xapi's dispatch_exn_wrapper answers INTERNAL_ERROR
        return {"Status": "Failure", "ErrorDescription": ["INTERNAL_ERROR", "%s: %s" % (type(e).__name__, e)]}


def _dispatch(ctx, method, params):
    sim = ctx.sim
    db = ctx.db
    ctx.method = method
    faults = sim.faults
    if method == LIST_METHODS:
        return list_methods()
    if method in LOGIN_METHODS:
        if not 2 <= len(params) <= 4:
            raise ApiError("MESSAGE_PARAMETER_COUNT_MISMATCH", method, "4", str(len(params)))
        faults.before_call(ctx, method, params)
        return login(ctx, *params)
    if method in ("session.logout", "session.local_logout"):
        if len(params) != 1:
            raise ApiError("MESSAGE_PARAMETER_COUNT_MISMATCH", method, "1", str(len(params)))
        _check_session(ctx, params[0])
        return logout(ctx)
    is_async = method.startswith("Async.")
    name = method[6:] if is_async else method
    found = _lookup(name)
    if found is None or (is_async and (found[0] != "action" or not found[1][3])):
        raise ApiError("MESSAGE_METHOD_UNKNOWN", method)
    kind, entry = found
    if kind == "action":
        fn, lo, hi, _, pfun = entry
        if pfun is not None:
            lo, hi = pfun(ctx)
        if not lo + 1 <= len(params) <= hi + 1:
            raise ApiError("MESSAGE_PARAMETER_COUNT_MISMATCH", name, str(hi + 1), str(len(params)))
    else:
        n = _generic_arity(entry[1]) + 1
        if len(params) != n:
            raise ApiError("MESSAGE_PARAMETER_COUNT_MISMATCH", name, str(n), str(len(params)))
    _check_session(ctx, params[0])
    args = params[1:]
    faults.before_call(ctx, name, args)
    if kind == "generic":
        cls, verb = entry
        ok, value = generic(ctx, cls, verb, args)
        if not ok:
            raise ApiError("MESSAGE_METHOD_UNKNOWN", method)
        return value
    fn = entry[0]
    if not is_async:
        return fn(ctx, *args)
    task = model.create_task(db, "Async.%s" % name, "", host=ctx.host, session=ctx.session)
    t = threading.Thread(target=_run_async, args=(ctx, fn, args, task), daemon=True,
                         name="xapisim-async-%s" % name)
    t.start()
    return task


def _run_async(ctx, fn, args, task):
    db = ctx.db
    with db.lock:
        try:
            value = fn(ctx, *args)
            model.task_complete(db, task, encode_value(value))
        except ApiError as e:
            model.task_fail(db, task, e.description)
        except Exception as e:  # pragma: no cover - a simulator bug
            model.task_fail(db, task, ["INTERNAL_ERROR", repr(e)])


# CBT and the storage operations that touch its logs (VDI.enable_cbt,
# list_changed_blocks, data_destroy, resize, pool_migrate ...) live in cbt.py.
from xapisim import cbt as _cbt  # noqa: E402
_cbt.register(action)
