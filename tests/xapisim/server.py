"""HTTP side of the simulated pool: one threading HTTP server per host on
127.0.0.N:PORT (all hosts share PORT), the master also on a unix socket.

Serves XML-RPC (POST / and /RPC2) and XAPI's HTTP handlers: GET /export,
/export_metadata, /export_raw_vdi, /pool/xmldbdump, /host_backup and PUT
/import, /import_raw_vdi, with xapi's authentication (session_id in the
Cookie or query, or HTTP Basic), task handling (task_id=), 302 redirects to a
host that sees the storage, and the header/streaming quirks of facts section 4.
"""
import base64
import datetime
import gzip
import io
import socket
import socketserver
import ssl
import struct
import tarfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, HTTPServer

from xapisim import cbt, model, rpc
from xapisim.model import NULL, ApiError

SERVER_NAME = "xapi/25.0"
RAW_CHUNK = 4 << 20


class _Stop(Exception):
    """The body must end now (fault, cancel, client gone)."""

    def __init__(self, description, why):
        Exception.__init__(self, why)
        self.description = description
        self.why = why


# ---------------------------------------------------------------------------
# ova.xml (export.ml make_all / make_vm ...)
# ---------------------------------------------------------------------------
_EXPORT_ORDER = ["host", "VM", "VM_metrics", "VM_guest_metrics", "VBD", "VIF", "network", "VDI",
                 "SR", "VTPM"]


def make_ova(sim, vms, host, with_snapshot_metadata=False, preserve_power_state=False,
             include_data=True):
    """-> (ova_xml bytes, [(export_id, Disk)]) for the given VM refs."""
    db = sim.db
    table = {}        # ref -> export id
    objects = {c: [] for c in _EXPORT_ORDER}

    def add(cls, ref):
        if ref in table or ref == NULL or ref not in db.tables[cls]:
            return
        db.export_counter += 1
        table[ref] = "Ref:%d" % db.export_counter
        objects[cls].append(ref)

    for vm in vms:
        add("VM", vm)
    for vm in vms:
        rec = db.tables["VM"][vm]
        for h in (rec["resident_on"], rec["affinity"]):
            add("host", h)
        add("VM_metrics", rec["metrics"])
        add("VM_guest_metrics", rec["guest_metrics"])
        for vbd in rec["VBDs"]:
            add("VBD", vbd)
            vdi = db.tables["VBD"][vbd]["VDI"]
            add("VDI", vdi)
            if vdi in db.tables["VDI"]:
                add("SR", db.tables["VDI"][vdi]["SR"])
        for vif in rec["VIFs"]:
            add("VIF", vif)
            add("network", db.tables["VIF"][vif]["network"])
        if preserve_power_state and rec["power_state"] == "Suspended":
            add("VDI", rec["suspend_VDI"])
            if rec["suspend_VDI"] in db.tables["VDI"]:
                add("SR", db.tables["VDI"][rec["suspend_VDI"]]["SR"])
        for vtpm in rec["VTPMs"]:
            add("VTPM", vtpm)
    # rewrite references
    out = []
    for cls in _EXPORT_ORDER:
        for ref in sorted(objects[cls], key=lambda r: int(table[r][4:])):
            rec = dict(db.tables[cls][ref])
            for f in rec:
                target = model.field_class(cls, f)
                if target is None:
                    continue
                v = rec[f]
                if isinstance(v, list):
                    rec[f] = [table[x] for x in v if x in table]
                else:
                    rec[f] = table.get(v, NULL)
            rec["allowed_operations"] = []
            rec["current_operations"] = {}
            if cls == "VM":
                if not with_snapshot_metadata:
                    rec.update(is_a_snapshot=False, snapshot_of=NULL, snapshots=[], parent=NULL,
                               children=[], snapshot_time=model.EPOCH)
                    if not (preserve_power_state and rec["power_state"] == "Suspended"):
                        rec["power_state"] = "Halted"
                        rec["suspend_VDI"] = NULL
            elif cls in ("VBD", "VIF"):
                rec["currently_attached"] = False
            elif cls == "host":
                for f in ("PIFs", "PBDs", "host_CPUs", "patches", "updates", "crashdumps",
                          "PCIs", "PGPUs", "PUSBs", "certificates", "features"):
                    rec[f] = []
                rec["resident_VMs"] = [x for x in rec["resident_VMs"] if x.startswith("Ref:")]
            elif cls == "SR":
                rec["PBDs"] = []
            out.append({"class": cls, "id": table[ref], "snapshot": rec})
    rel = sim.release
    xv = model.xapi_version_tuple(rel["xapi"])
    header = {
        "version": {
            "hostname": db.tables["host"][host]["hostname"],
            "date": "2024-03-01",
            "product_version": rel["product_version"],
            "product_brand": rel["product_brand"],
            "build_number": rel["build_number"],
            "xapi_major": xv[0],
            "xapi_minor": xv[1] if len(xv) > 1 else 0,
            "export_vsn": 2,
        },
        "objects": out,
    }
    ova = rpc.encode_value(header).encode("utf-8")
    disks = []
    if include_data:
        for vdi in objects["VDI"]:
            srec = db.tables["SR"][db.tables["VDI"][vdi]["SR"]]
            if srec["content_type"] == "iso":
                continue
            # CD VBDs do not carry data either
            if any(db.tables["VBD"][b]["type"] == "CD" for b in db.tables["VDI"][vdi]["VBDs"]
                   if b in db.tables["VBD"] and db.tables["VBD"][b]["VM"] in vms):
                continue
            disks.append((table[vdi], db.content[vdi]))
        disks.sort(key=lambda x: x[0])   # lexicographic: Ref:10 before Ref:2
    return ova, disks, table


def import_ova(sim, ova_xml, disks, sr, restore=False, force=False, task=None):
    """Create the objects of an XVA in ``sr``; returns the new VM refs (xapi's
    rules: import.ml).  All-or-nothing: on failure everything created is removed."""
    db = sim.db
    header = rpc.decode_value(ova_xml)
    version = header.get("version", {})
    ours = model.xapi_version_tuple(sim.release["xapi"])[:2]
    try:
        theirs = (int(version.get("xapi_major", 0)), int(version.get("xapi_minor", 0)))
    except (TypeError, ValueError):
        theirs = (0, 0)
    if theirs > ours:
        raise ApiError("IMPORT_INCOMPATIBLE_VERSION")
    objs = header.get("objects", [])
    by_id = {o["id"]: o for o in objs}
    table = {}
    created = []   # (cls, ref) for cleanup
    vms = []

    def rec_of(o):
        cls = o["class"]
        snap = o["snapshot"]
        out = {}
        for f, v in snap.items():
            if f in model.SCHEMA.get(cls, {}):
                try:
                    out[f] = model.coerce(cls, f, v)
                except ApiError:
                    out[f] = model.default_value(cls, f)
        return out

    def look(ref):
        return table.get(ref, NULL)

    try:
        needs = 0
        for o in objs:
            if o["class"] == "VDI":
                needs += disks[o["id"]].physical_utilisation if o["id"] in disks else 0
        model.sr_check_space(db, {sr: needs})
        # VDIs
        for o in [o for o in objs if o["class"] == "VDI"]:
            r = rec_of(o)
            osr = by_id.get(o["snapshot"].get("SR"), {}).get("snapshot", {})
            if osr.get("content_type") == "iso":
                for ref, v in db.tables["VDI"].items():
                    if v["location"] == r.get("location") and \
                            db.tables["SR"][v["SR"]]["content_type"] == "iso":
                        table[o["id"]] = ref
                        break
                continue
            from xapisim.disks import Disk
            disk = disks.get(o["id"]) or Disk.empty(r.get("virtual_size", 0))
            fields = {k: r[k] for k in ("name_label", "name_description", "type", "sharable",
                                        "read_only", "other_config", "xenstore_data", "tags",
                                        "on_boot", "allow_caching") if k in r}
            sm = dict(r.get("sm_config", {}))
            sm["import_task"] = task or NULL
            fields["sm_config"] = sm
            ref = model.new_vdi(db, sr, disk, **fields)
            db.client_created.add(ref)
            created.append(("VDI", ref))
            table[o["id"]] = ref
        # guest metrics
        for o in [o for o in objs if o["class"] == "VM_guest_metrics"]:
            r = rec_of(o)
            r.pop("uuid", None)
            ref = db.create("VM_guest_metrics", r)
            created.append(("VM_guest_metrics", ref))
            table[o["id"]] = ref
        # VMs
        for o in [o for o in objs if o["class"] == "VM"]:
            r = rec_of(o)
            if r.get("is_a_template") and r.get("other_config", {}).get("default_template") == "true":
                found = [ref for ref, v in db.tables["VM"].items() if v["name_label"] == r["name_label"]]
                table[o["id"]] = found[0] if found else NULL
                continue
            uuid = r.pop("uuid", "")
            if restore and uuid in db.by_uuid["VM"]:
                old = db.by_uuid["VM"][uuid]
                orec = db.tables["VM"][old]
                if orec["power_state"] != "Halted":
                    raise ApiError("VM_BAD_POWER_STATE", old, "halted", orec["power_state"].lower())
                if orec["version"] >= r.get("version", 0) and not force:
                    raise ApiError("VM_TO_IMPORT_IS_NOT_NEWER_VERSION", old, orec["version"],
                                   r.get("version", 0))
                model.destroy_vm(db, old)
            oc = dict(r.get("other_config", {}))
            if not restore:
                oc["mac_seed"] = db.new_uuid()
            oc["import_task"] = task or NULL
            fields = dict(r)
            for f in ("VBDs", "VIFs", "VTPMs", "consoles", "snapshots", "children", "VGPUs",
                      "attached_PCIs", "VUSBs", "crash_dumps"):
                fields[f] = []
            fields.update(
                other_config=oc, uuid=uuid if restore else "",
                version=r.get("version", 0) + 1 if restore else 0,
                power_state="Halted", resident_on=NULL, scheduled_to_be_resident_on=NULL,
                affinity=look(r.get("affinity", NULL)) if r.get("affinity", NULL) in table else NULL,
                suspend_VDI=NULL, guest_metrics=look(r.get("guest_metrics", NULL)),
                metrics=db.create("VM_metrics", install_time=model.now()),
                protection_policy=NULL, appliance=NULL, domid=-1, generation_id="0:0",
                allowed_operations=[], current_operations={})
            if r.get("power_state") == "Suspended" and look(r.get("suspend_VDI", NULL)) != NULL:
                fields["power_state"] = "Suspended"
                fields["suspend_VDI"] = look(r["suspend_VDI"])
            ref = db.create("VM", fields)
            created.append(("VM", ref))
            table[o["id"]] = ref
            vms.append(ref)
        # networks: by name_label, then bridge, else create
        for o in [o for o in objs if o["class"] == "network"]:
            r = rec_of(o)
            found = [ref for ref, v in db.tables["network"].items() if v["name_label"] == r.get("name_label")]
            found = found or [ref for ref, v in db.tables["network"].items() if v["bridge"] == r.get("bridge")]
            if found:
                table[o["id"]] = found[0]
            else:
                ref = db.create("network", name_label=r.get("name_label", ""),
                                name_description=r.get("name_description", ""),
                                bridge="xapi%d" % len(db.tables["network"]), MTU=r.get("MTU", 1500),
                                managed=True, other_config={"import_task": task or NULL})
                created.append(("network", ref))
                table[o["id"]] = ref
        # VBDs
        for o in [o for o in objs if o["class"] == "VBD"]:
            r = rec_of(o)
            vm = look(o["snapshot"].get("VM"))
            if vm not in db.tables["VM"] or vm not in vms:
                continue
            vdi = look(o["snapshot"].get("VDI"))
            empty = r.get("empty", False) or vdi == NULL
            if r.get("type") == "Disk" and vdi == NULL:
                continue
            fields = {k: r[k] for k in ("device", "userdevice", "bootable", "mode", "type",
                                        "unpluggable", "other_config", "qos_algorithm_type",
                                        "qos_algorithm_params") if k in r}
            fields.update(VM=vm, VDI=NULL if empty else vdi, empty=empty)
            ref = model.create_vbd(db, fields)
            if restore and r.get("uuid") and r["uuid"] not in db.by_uuid["VBD"]:
                _set_uuid(db, "VBD", ref, r["uuid"])
            created.append(("VBD", ref))
        # VIFs
        for o in [o for o in objs if o["class"] == "VIF"]:
            r = rec_of(o)
            vm = look(o["snapshot"].get("VM"))
            net = look(o["snapshot"].get("network"))
            if vm not in db.tables["VM"] or vm not in vms or net not in db.tables["network"]:
                continue
            fields = {k: r[k] for k in ("device", "MAC", "MTU", "other_config", "locking_mode",
                                        "qos_algorithm_type", "qos_algorithm_params",
                                        "MAC_autogenerated") if k in r}
            fields.update(VM=vm, network=net, ipv4_allowed=[], ipv6_allowed=[])
            if not restore:
                fields["MAC"] = ""
            ref = model.create_vif(db, fields)
            if restore and r.get("uuid") and r["uuid"] not in db.by_uuid["VIF"]:
                _set_uuid(db, "VIF", ref, r["uuid"])
            created.append(("VIF", ref))
        # snapshot_of / parent links
        for o in [o for o in objs if o["class"] == "VM"]:
            ref = table.get(o["id"])
            if ref not in vms:
                continue
            rec = db.tables["VM"][ref]
            rec["snapshot_of"] = table.get(o["snapshot"].get("snapshot_of"), NULL) \
                if rec["is_a_snapshot"] else NULL
            if rec["snapshot_of"] in db.tables["VM"]:
                db.tables["VM"][rec["snapshot_of"]]["snapshots"].append(ref)
            rec["parent"] = table.get(o["snapshot"].get("parent"), NULL)
        for ref in vms:
            db.client_created.add(ref)
    except Exception:
        for cls, ref in reversed(created):
            if ref in db.tables[cls]:
                if cls == "VM":
                    db.tables["VM"][ref]["power_state"] = "Halted"
                    db.tables["VM"][ref]["current_operations"] = {}
                    model.destroy_vm(db, ref)
                elif cls == "VDI":
                    model.destroy_vdi(db, ref)
                elif cls == "VBD":
                    model.destroy_vbd(db, ref)
                elif cls == "VIF":
                    model.destroy_vif(db, ref)
                else:
                    db.remove(cls, ref)
        raise
    non_snap = [v for v in vms if not db.tables["VM"][v]["is_a_snapshot"]]
    return non_snap if non_snap else vms


def _set_uuid(db, cls, ref, uuid):
    rec = db.tables[cls][ref]
    db.by_uuid[cls].pop(rec["uuid"], None)
    rec["uuid"] = uuid
    db.by_uuid[cls][uuid] = ref


# ---------------------------------------------------------------------------
# /pool/xmldbdump
# ---------------------------------------------------------------------------
_NAMESPACES = {
    "name": ("label", "description"),
    "memory": ("static_max", "dynamic_max", "dynamic_min", "static_min", "target"),
    "VCPUs": ("params", "max", "at_startup"),
    "actions": ("after_softreboot", "after_shutdown", "after_reboot", "after_crash"),
    "PV": ("bootloader", "kernel", "ramdisk", "args", "bootloader_args", "legacy_args"),
    "HVM": ("boot_policy", "boot_params", "shadow_multiplier"),
    "API_version": ("major", "minor", "vendor", "vendor_implementation"),
}


def _db_field(name):
    for ns, subs in _NAMESPACES.items():
        if name.startswith(ns + "_") and name[len(ns) + 1:] in subs:
            return ns + "__" + name[len(ns) + 1:]
    return name


def _sexpr_str(s):
    return "'" + str(s).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _db_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, datetime.datetime):
        return v.strftime("%Y%m%dT%H:%M:%SZ")
    if isinstance(v, float):
        return "%.6f" % v
    if isinstance(v, dict):
        return "(" + "".join("(%s %s)" % (_sexpr_str(k), _sexpr_str(x)) for k, x in v.items()) + ")"
    if isinstance(v, list):
        return "(" + " ".join(_sexpr_str(x) for x in v) + ")"
    return str(v)


def _xml_attr(s):
    s = rpc._CTRL.sub("", s)
    return (s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("\n", "&#10;").replace("\r", "&#13;")
            .replace("\t", "&#9;"))


def xmldbdump(db):
    out = ['<?xml version="1.0" encoding="UTF-8"?><database><manifest>'
           '<pair key="schema_major_vsn" value="5"/><pair key="schema_minor_vsn" value="780"/>'
           '<pair key="generation_count" value="%d"/></manifest>' % db.generation]
    for cls in sorted(model.SCHEMA):
        if cls in ("session", "task"):
            continue   # not persistent in xapi's database
        out.append('<table name="%s">' % cls)
        for ref, rec in db.tables[cls].items():
            attrs = ['ref="%s"' % _xml_attr(ref), '__ctime="1"', '__mtime="%d"' % db.generation]
            for f, v in rec.items():
                attrs.append('%s="%s"' % (_db_field(f), _xml_attr(_db_value(v))))
            out.append("<row " + " ".join(attrs) + "/>")
        out.append("</table>")
    out.append("</database>")
    return "".join(out).encode("utf-8")


# ---------------------------------------------------------------------------
# /host_backup: a small deterministic gzipped tar naming the host that answered
# ---------------------------------------------------------------------------
def host_backup(db, host):
    rec = db.tables["host"][host]
    dom0 = db.tables["VM"].get(rec["control_domain"], {})
    files = [
        ("etc/xensource-inventory",
         "PRIMARY_DISK='/dev/disk/by-id/scsi-3600'\nPRODUCT_BRAND='%s'\nPRODUCT_VERSION='%s'\n"
         "INSTALLATION_UUID='%s'\nCONTROL_DOMAIN_UUID='%s'\nMANAGEMENT_INTERFACE='xenbr0'\n"
         % (rec["software_version"].get("product_brand", ""),
            rec["software_version"].get("product_version", ""), rec["uuid"], dom0.get("uuid", ""))),
        ("etc/hostname", rec["hostname"] + "\n"),
        ("etc/xapisim-host-backup", "host=%s\naddress=%s\nuuid=%s\n"
         % (rec["name_label"], rec["address"], rec["uuid"])),
    ]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for d in ("etc",):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            info.mtime = 1710497430
            tar.addfile(info)
        for name, text in files:
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 1710497430
            tar.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, filename="") as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def metadata_tar(ova):
    """A tar holding only ova.xml (what /export_metadata sends)."""
    try:
        from xapisim import xva
        return b"".join(xva.xva_stream(ova, []))
    except (ImportError, AttributeError):  # pragma: no cover - before xva.py exists
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            info = tarfile.TarInfo("ova.xml")
            info.size = len(ova)
            tar.addfile(info, io.BytesIO(ova))
        return raw.getvalue()


# ---------------------------------------------------------------------------
# The request handler
# ---------------------------------------------------------------------------
class BodyReader(io.RawIOBase):
    """A PUT body: Content-Length bytes, or everything until EOF."""

    def __init__(self, rfile, length, req):
        self._f = rfile
        self._left = length
        self._req = req

    def readable(self):
        return True

    def readinto(self, b):
        n = len(b)
        if self._left is not None:
            n = min(n, self._left)
        if n <= 0:
            return 0
        data = self._f.read1(n) if hasattr(self._f, "read1") else self._f.read(n)
        if not data:
            if self._left:
                raise ConnectionError("body ended %d bytes early" % self._left)
            return 0
        b[:len(data)] = data
        if self._left is not None:
            self._left -= len(data)
        self._req.bytes_received += len(data)
        return len(data)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = SERVER_NAME
    sys_version = ""
    rbufsize = 1 << 16
    timeout = 300

    # -- plumbing --------------------------------------------------------------
    def setup(self):
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(10)
            self.request.do_handshake()
            self.request.settimeout(None)
        BaseHTTPRequestHandler.setup(self)
        self.sim = self.server.sim
        self.server.track(self.request, True)

    def finish(self):
        try:
            BaseHTTPRequestHandler.finish(self)
        finally:
            self.server.track(self.request, False)

    def log_message(self, fmt, *args):
        if self.sim.verbose:
            BaseHTTPRequestHandler.log_message(self, fmt, *args)

    def address_string(self):
        return self.client_address[0] if self.client_address else "unix"

    @property
    def host_ref(self):
        return self.sim.db.master() if self.server.unix else self.server.host_ref

    @property
    def host_name(self):
        with self.sim.db.lock:
            return self.sim.db.tables["host"][self.host_ref]["name_label"]

    def _raw(self, data):
        self.connection.sendall(data)

    def _head(self, status_line, headers):
        lines = [status_line] + ["%s: %s" % kv for kv in headers] + ["", ""]
        self._head_sent = True
        self._raw("\r\n".join(lines).encode("latin-1"))

    def _simple(self, code, reason, body=b"", headers=(), content_type="text/html", close=True):
        hs = [("Content-Length", str(len(body))), ("Content-Type", content_type)]
        if close:
            hs.append(("Connection", "close"))
            self.close_connection = True
        hs += list(headers)
        if self.req is not None:
            self.req.status = code      # before sending: a client may look as soon as it reads
        self._head("HTTP/1.1 %d %s" % (code, reason), hs)
        if body and self.command != "HEAD":
            self._raw(body)

    def _error_500(self, err):
        body = ("<html><body><h1>HTTP 500 internal server error</h1>An unexpected error occurred; "
                "please wait a while and try again. If the problem persists, please contact your "
                "support representative.<h1> Additional information </h1>%s</body></html>"
                % _html(str(err))).encode("utf-8")
        self._simple(500, "Internal Error", body)

    def _drop(self):
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _query(self):
        parsed = urllib.parse.urlsplit(self.path)
        q = {}
        for k, v in urllib.parse.parse_qsl(parsed.query, keep_blank_values=True):
            q.setdefault(k, v)
        return parsed.path, parsed.query, q

    # -- verbs -------------------------------------------------------------------
    req = None

    # xapi's handlers are found by longest prefix (http_svr.ml, Radix_tree.longest_prefix):
    # every POST reaches one of the RPC handlers ("/" is a prefix of any path, so XO's
    # "/xmlrpc" is XML-RPC), "/export/" and "/export_raw_vdi/" reach their handlers.
    def do_POST(self):
        self.req = None
        self._route("POST", {"/": self.h_xmlrpc, "/RPC2": self.h_xmlrpc,
                             "/jsonrpc": self.h_jsonrpc, "/json": self.h_jsonrpc})

    def do_GET(self):
        self._route("GET", {"/export": self.h_export, "/export_metadata": self.h_export_metadata,
                            "/export_raw_vdi": self.h_export_raw_vdi,
                            "/pool/xmldbdump": self.h_xmldbdump, "/host_backup": self.h_host_backup})

    def do_PUT(self):
        self._route("PUT", {"/import": self.h_import, "/import_raw_vdi": self.h_import_raw_vdi})

    def _transport(self):
        return "unix" if self.server.unix else "tcp"

    @staticmethod
    def _longest_prefix(table, path):
        best = None
        for key in table:
            if path.startswith(key) and (best is None or len(key) > len(best)):
                best = key
        return best

    def _route(self, verb, table):
        path, rawq, q = self._query()
        self._raw_path = path             # as received: xapi's redirects keep it (req.uri)
        self._head_sent = False
        self._held = None                 # (task, temporary?) once a handler has a task
        key = self._longest_prefix(table, path)
        if verb == "POST":                  # RPC: logged as calls, not requests
            try:
                table[key](key, rawq, q)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError, socket.timeout):
                self.close_connection = True
            except Exception as e:
                self._crashed(e)
            return
        norm = path.rstrip("/") or "/"
        self.req = self.sim.calls.record_http(verb, norm, q, self.host_name, self._transport())
        if key is None:
            if verb == "PUT":
                self._discard_body()
            self._simple(404, "Not Found", b"<html><body><h1>HTTP 404 not found</h1></body></html>")
            return
        try:
            table[key](key, rawq, q)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, socket.timeout):
            self.close_connection = True
            self._release(["CLIENT_ERROR", "connection lost"])
        except Exception as e:  # a bug or a crash fault: answer 500, release what was held
            self._crashed(e)
        finally:
            self.close_connection = True
            self.req.ended = time.time()

    def _crashed(self, exc):
        """An exception escaped a handler: as xapi's http_svr, answer 500 with its
        text if no header went out yet (else cut the body), fail the request's
        task and release everything held under it."""
        err = ApiError("INTERNAL_ERROR", "%s: %s" % (type(exc).__name__, exc))
        if self.req is not None:
            self.req.error = str(err)
        self._release(err.description)
        if self._head_sent:
            self._drop()
            return
        try:
            if self.command == "PUT":
                self._discard_body()
            self._error_500(err)
        except OSError:
            self._drop()

    def _release(self, description):
        """Free what the request's task holds: VM/VDI ``current_operations``, VDIs
        in use, the task itself (failed; removed if it was a temporary one)."""
        held = getattr(self, "_held", None)
        if not held:
            return
        task, temp = held
        db = self.sim.db
        with db.lock:
            for cls in ("VM", "VDI", "SR"):
                for rec in db.tables[cls].values():
                    if task in rec["current_operations"]:
                        rec["current_operations"].pop(task, None)
            for vdi in [v for v, users in db.in_use.items() if task in users]:
                db.in_use[vdi].pop(task, None)
                if not db.in_use[vdi]:
                    db.in_use.pop(vdi, None)
            model.task_fail(db, task, description)
            db.touch()
        self._end_task(task, temp)

    def _discard_body(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            try:
                while True:
                    size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                            pass
                        return
                    _read_exact(self.rfile, size + 2)
            except (ValueError, OSError, ConnectionError):
                return
        n = int(self.headers.get("Content-Length") or 0)
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 16))
            if not chunk:
                break
            n -= len(chunk)

    # -- XML-RPC and JSON-RPC: one dispatcher (rpc.dispatch), two encodings -------------
    def h_xmlrpc(self, path, rawq, q):
        def parse(body):
            try:
                method, params = rpc.parse_request(body)
            except ValueError as e:
                raise ValueError("Xml.Error(%s)" % e)
            return method, params, lambda resp: rpc.xml_response(method, resp)
        self._rpc(parse, "text/xml", "xmlrpc")

    def h_jsonrpc(self, path, rawq, q):
        def parse(body):
            try:
                version, rid, method, params = rpc.parse_json_request(body)
            except ValueError as e:
                raise ValueError("Jsonrpc.Malformed_method_request(%s)" % e)
            return method, params, lambda resp: rpc.json_response(version, rid, method, resp)
        self._rpc(parse, "application/json", "jsonrpc")

    def _rpc(self, parse, content_type, encoding):
        sim = self.sim
        length = self.headers.get("Content-Length")
        if length is None:
            self.req = sim.calls.record_http("POST", self.path, {}, self.host_name, self._transport())
            self._simple(411, "Length Required", b"")
            return
        body = self.rfile.read(int(length))
        try:
            method, params, encode = parse(body)
        except ValueError as e:
            self.req = sim.calls.record_http("POST", self.path, {}, self.host_name, self._transport())
            self._error_500(e)
            return
        call = sim.calls.record_rpc(method, params, self.host_name, self._transport())
        call.encoding = encoding
        delay, act = sim.faults.rpc_transport(method)
        if delay:
            sim.sleep(delay)
        if act and act[0] == "http":
            call.status = "http %d" % act[1]
            self._simple(act[1], _REASONS.get(act[1], "Error"),
                         ("<html><body><h1>HTTP %d</h1></body></html>" % act[1]).encode())
            return
        if act and act[0] == "drop" and not act[1]:
            call.status = "dropped"
            self._drop()
            return
        ctx = rpc.Context(sim, self.host_ref, unix=self.server.unix, client=self.client_address)
        with sim.db.lock:
            resp = rpc.dispatch(ctx, method, params)
            out = encode(resp)
        call.status = resp["Status"]
        call.error = resp.get("ErrorDescription")
        if act and act[0] == "drop":
            call.status = "dropped"
            self._drop()
            return
        hs = [("Content-Length", str(len(out))), ("Content-Type", content_type),
              ("Cache-Control", "no-cache, no-store")]
        if content_type == "application/json":
            hs += [("Access-Control-Allow-Origin", "*"),
                   ("Access-Control-Allow-Headers", "X-Requested-With")]
        if self.close_connection:
            hs.append(("Connection", "close"))
        self._head("HTTP/1.1 200 OK", hs)
        self._raw(out)

    # -- HTTP handler helpers ----------------------------------------------------
    def _auth(self, q):
        """-> session ref (or "unix"), else sends 401 and returns None."""
        sim = self.sim
        if self.server.unix:
            return "unix"
        session = None
        cookie = self.headers.get("Cookie") or ""
        for part in cookie.split(";"):
            k, _, v = part.strip().partition("=")
            if k == "session_id":
                session = v
        session = session or q.get("session_id")
        with sim.db.lock:
            if session and session in sim.db.tables["session"]:
                return session
        auth = self.headers.get("Authorization") or ""
        if auth.startswith("Basic "):
            try:
                user, _, pw = base64.b64decode(auth[6:]).decode("utf-8").partition(":")
            except ValueError:
                user = pw = None
            if user == sim.user and pw == sim.password:
                return "basic"
        with sim.db.lock:
            if q.get("task_id") in sim.db.tables["task"]:
                model.task_fail(sim.db, q["task_id"], ["SESSION_AUTHENTICATION_FAILED", "", ""])
        if self.command == "PUT":
            self._discard_body()
        body = b"<html><body><h1>HTTP 401 unauthorised</h1>Authorisation failed</body></html>"
        self._simple(401, "Unauthorised", body, headers=[("WWW-Authenticate", 'Basic realm="xapi"')])
        return None

    def _task(self, q, label):
        """-> (task ref, temporary?) or raises ApiError."""
        db = self.sim.db
        with db.lock:
            t = q.get("task_id")
            if t:
                db.get("task", t)
                model.task_progress(db, t, 0.0)
                self._held = (t, False)
                return t, False
            t = model.create_task(db, label, "", host=self.host_ref)
            self._held = (t, True)
            return t, True

    def _end_task(self, task, temp):
        if temp:
            with self.sim.db.lock:
                if task in self.sim.db.tables["task"]:
                    self.sim.db.remove("task", task)

    def _redirect(self, host, path, rawq):
        """302 to ``host``, same path and query; the connection is closed after it.

        A PUT's body is not read (import.ml ``handler``, import_raw_vdi.ml ``import``:
        ``Http.http_302_redirect`` then close): the client re-sends it to the new
        location.  xe and vmbackup read the status line before they send the body; a
        client that sends a large body without waiting meets the close (broken pipe /
        reset), as it would from xapi."""
        db = self.sim.db
        with db.lock:
            addr = db.tables["host"][host]["address"]
        # xapi: Printf.sprintf "https://%s%s?%s" address req.uri (k=v joined by "&", the
        # values as parsed, not re-encoded).  xapi's https is stunnel on 443; the
        # simulator keeps its own scheme and port, the path as received and xapi's query.
        scheme = "https" if self.sim.tls else "http"
        query = "&".join("%s=%s" % kv for kv in urllib.parse.parse_qsl(rawq, keep_blank_values=True))
        loc = "%s://%s:%d%s?%s" % (scheme, addr, self.sim.port,
                                   getattr(self, "_raw_path", None) or path, query)
        self._simple(302, "Found", b"", headers=[("Cache-Control", "no-cache, no-store"),
                                                  ("Location", loc)])

    def _put_redirect(self, sr):
        """For /import and /import_raw_vdi: the host to redirect to when this one
        cannot see ``sr`` (else None).  As xapi, decided before the client's task is
        touched and before anything is created or read."""
        db = self.sim.db
        if sr is None or sr not in db.tables["SR"] or db.host_sees_srs(self.host_ref, [sr]):
            return None
        return db.host_for_srs([sr])

    def _fail_before(self, task, temp, err):
        with self.sim.db.lock:
            model.task_fail(self.sim.db, task, err.description)
        if self.req is not None:
            self.req.error = str(err)
        if self.command == "PUT":
            self._discard_body()
        self._error_500(err)
        self._end_task(task, temp)

    def _sender(self, path):
        plan = self.sim.faults.body_plan(path)
        if plan.get("crash") == "before":
            raise RuntimeError("fault: %s handler crashed before its response header" % path)
        return _Sender(self, plan)

    # -- GET /export -----------------------------------------------------------
    def h_export(self, path, rawq, q):
        sim, db = self.sim, self.sim.db
        if self._auth(q) is None:
            return
        task, temp = self._task(q, "VM.export")
        self.req.task = task
        try:
            with db.lock:
                vm = q.get("ref") or NULL
                if vm not in db.tables["VM"]:
                    vm = db.ref_of_uuid("VM", q["uuid"]) if q.get("uuid") else db.get("VM", vm) and vm
                rec = db.tables["VM"][vm]
                srs = db.vm_disk_srs(vm)
                if not db.host_sees_srs(self.host_ref, srs):
                    other = db.host_for_srs(srs)
                    if other is None:
                        raise ApiError("VM_REQUIRES_SR", vm, srs[0])
                    redirect = other
                else:
                    redirect = None
                if redirect is None:
                    model.check_vm_op(db, vm, "export", ["Halted", "Suspended"])
                    preserve = q.get("preserve_power_state") == "true"
                    ova, disks, _ = make_ova(sim, [vm], self.host_ref, preserve_power_state=preserve)
                    rec["current_operations"][task] = "export"
                    vdis = [v for v in _vdis_of(db, vm, preserve)]
                    for v in vdis:
                        db.in_use.setdefault(v, {})[task] = "export"
                    total = sum(d.virtual_size for _, d in disks) or 1
                    checksum = q.get("xapisim_checksum") or sim.checksum
                    db.touch()
        except ApiError as e:
            return self._fail_before(task, temp, e)
        if redirect is not None:
            self._end_task(task, temp)     # a temporary task must not outlive the 302
            return self._redirect(redirect, path, rawq)
        comp = {"true": "gzip", "gzip": "gzip", "zstd": "zstd"}.get(q.get("use_compression", ""))
        sent_raw = [0]
        last = [time.time()]

        def counted(it):
            for piece in it:
                sent_raw[0] += len(piece)
                now_ = time.time()
                if now_ - last[0] > 0.2:
                    last[0] = now_
                    with db.lock:
                        model.task_progress(db, task, min(0.99, sent_raw[0] / float(total)))
                yield piece

        from xapisim import xva
        stream = counted(xva.xva_stream(ova, disks, checksum=("sha1" if checksum == "sha1" else "xxhash"),
                                        keepalive=sim.keepalive))
        if comp:
            stream = xva.compress(stream, comp)
        sender = self._sender(path)
        error = None
        try:
            self._head("HTTP/1.0 200 OK", [
                ("Connection", "close"), ("Cache-Control", "no-cache, no-store"), ("task-id", task),
                ("Server", SERVER_NAME), ("content-type", "application/octet-stream"),
                ("Content-Disposition", 'attachment; filename="export.xva"')])
            self.req.status = 200
            for piece in stream:
                if model.task_cancelling(db, task):
                    raise _Stop(["TASK_CANCELLED", task], "cancelled")
                sender.send(piece)
            if model.task_cancelling(db, task):
                raise _Stop(["TASK_CANCELLED", task], "cancelled")
        except _Stop as e:
            error = e.description or ["CLIENT_ERROR", "Unix.Unix_error(Unix.ECONNRESET, \"write\", \"\")"]
            self.req.error = e.why
        except (OSError, ssl.SSLError) as e:
            error = ["CLIENT_ERROR", "Unix.Unix_error(Unix.EPIPE, \"write\", \"\")"]
            self.req.error = "client gone: %r" % (e,)
        except Exception as e:   # a bug or a crash fault after the header: fail, cut the body
            error = ["INTERNAL_ERROR", "%s: %s" % (type(e).__name__, e)]
            self.req.error = "internal error: %r" % (e,)
        finally:
            close = getattr(stream, "close", None)
            if close:
                close()
            with db.lock:
                if vm in db.tables["VM"]:
                    db.tables["VM"][vm]["current_operations"].pop(task, None)
                for v in vdis:
                    db.in_use.get(v, {}).pop(task, None)
                    if not db.in_use.get(v):
                        db.in_use.pop(v, None)
                if error:
                    model.task_fail(db, task, error)
                else:
                    model.task_complete(db, task, "")
                db.touch()
            self.req.bytes_sent = sender.sent
            if error:
                self._drop()
            else:
                self._finish_body()
            self._end_task(task, temp)

    def _finish_body(self):
        """End a close-delimited body (TLS: send close_notify first)."""
        self.close_connection = True
        if isinstance(self.connection, ssl.SSLSocket):
            try:
                self.connection.unwrap()
            except (OSError, ssl.SSLError, ValueError):
                pass
        try:
            self.connection.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    # -- GET /export_metadata ---------------------------------------------------------
    def h_export_metadata(self, path, rawq, q):
        sim, db = self.sim, self.sim.db
        if self._auth(q) is None:
            return
        task, temp = self._task(q, "VM.export_metadata")
        self.req.task = task
        try:
            with db.lock:
                if q.get("all") == "true":
                    vms = [r for r, v in db.tables["VM"].items()
                           if not v["is_default_template"] and
                           (q.get("include_dom0", "true") == "true" or not v["is_control_domain"])]
                else:
                    vm = q.get("ref") or NULL
                    if vm not in db.tables["VM"]:
                        vm = db.ref_of_uuid("VM", q["uuid"]) if q.get("uuid") else db.get("VM", vm) and vm
                    model.check_vm_op(db, vm, "metadata_export")
                    vms = [vm]
                    if q.get("export_snapshots", "true") == "true":
                        vms += [s for s in db.tables["VM"][vm]["snapshots"] if s in db.tables["VM"]]
                ova, _, _ = make_ova(sim, vms, self.host_ref, with_snapshot_metadata=True,
                                     preserve_power_state=True, include_data=False)
        except ApiError as e:
            return self._fail_before(task, temp, e)
        body = metadata_tar(ova)
        sender = self._sender(path)
        error = None
        try:
            self._head("HTTP/1.0 200 OK", [
                ("Connection", "close"), ("Cache-Control", "no-cache, no-store"), ("task-id", task),
                ("Server", SERVER_NAME), ("Content-Length", str(len(body))),
                ("content-type", "application/octet-stream"),
                ("Content-Disposition", 'attachment; filename="export.xva"')])
            self.req.status = 200
            sender.send(body)
        except _Stop as e:
            error = e.description or ["CLIENT_ERROR", "Unix.Unix_error(Unix.ECONNRESET, \"write\", \"\")"]
            self.req.error = e.why
        except OSError:
            error = ["CLIENT_ERROR", "write failed"]
        except Exception as e:   # a bug or a crash fault after the header: fail, cut the body
            error = ["INTERNAL_ERROR", "%s: %s" % (type(e).__name__, e)]
            self.req.error = "internal error: %r" % (e,)
        finally:
            with db.lock:
                if error:
                    model.task_fail(db, task, error)
                else:
                    model.task_complete(db, task, "")
            self.req.bytes_sent = sender.sent
            self._drop() if error else self._finish_body()
            self._end_task(task, temp)

    # -- GET /export_raw_vdi -----------------------------------------------------------
    def h_export_raw_vdi(self, path, rawq, q):
        db = self.sim.db
        if self._auth(q) is None:
            return
        task, temp = self._task(q, "VDI.export_raw")
        self.req.task = task
        fmt = (q.get("format") or "raw").lower()
        redirect = None
        try:
            with db.lock:
                vdi = db.resolve("VDI", q.get("vdi", ""))
                rec = db.tables["VDI"][vdi]
                if not db.host_sees_srs(self.host_ref, [rec["SR"]]):
                    redirect = db.host_for_srs([rec["SR"]])
                if redirect is None:
                    if fmt not in ("raw", "vhd"):
                        raise ApiError("INTERNAL_ERROR", "Unknown format %s" % fmt)
                    diff = None
                    if q.get("base"):
                        diff = cbt.export_base(db, vdi, q["base"])  # (base blocks, parent)
                    elif cbt.is_cbt_metadata(db, vdi):
                        raise cbt.incompatible(vdi)
                    if fmt == "vhd" and rec["virtual_size"] > 2040 * (1 << 30):
                        raise ApiError("VDI_TOO_LARGE", vdi, str(2040 * (1 << 30)))
                    disk = db.content[vdi]
                    db.in_use.setdefault(vdi, {})[task] = "export_raw"
                    rec["current_operations"][task] = "copy"
                    db.touch()
        except ApiError as e:
            if e.code == "INTERNAL_ERROR" and e.params[0].startswith("Unknown format"):
                with db.lock:
                    model.task_fail(db, task, e.description)
                self.req.error = str(e)
                self._simple(404, "Not Found", b"<html><body><h1>HTTP 404 not found</h1></body></html>")
                self._end_task(task, temp)
                return
            return self._fail_before(task, temp, e)
        if redirect is not None:
            self._end_task(task, temp)     # a temporary task must not outlive the 302
            return self._redirect(redirect, path, rawq)
        sender = self._sender(path)
        error = None
        try:
            from xapisim import vhd
            if fmt == "vhd" and diff:
                stream, ctype = vhd.vhd_stream(disk, parent=diff[1], blocks=diff[0]), "application/vhd"
            elif fmt == "vhd":
                stream, ctype = vhd.vhd_stream(disk), "application/vhd"
            elif diff:
                stream, ctype = vhd.raw_diff_stream(disk, diff[0]), "application/octet-stream"
            else:
                stream, ctype = disk.iter_raw(RAW_CHUNK), "application/octet-stream"
            self._head("HTTP/1.1 200 OK", [
                ("Connection", "close"), ("task-id", task), ("Server", SERVER_NAME),
                ("content-type", ctype),
                ("content-disposition", 'attachment; filename="%s.%s"' % (rec["uuid"], fmt))])
            self.req.status = 200
            total = float(disk.virtual_size or 1)
            last = time.time()
            send = sender.send
            for piece in stream:
                send(piece)
                now_ = time.time()
                if now_ - last > 0.5:
                    last = now_
                    with db.lock:
                        model.task_progress(db, task, min(0.99, sender.sent / total))
        except _Stop as e:
            error = ["VDI_IO_ERROR", "Device I/O errors"]
            self.req.error = e.why
        except (OSError, ssl.SSLError) as e:
            error = ["VDI_IO_ERROR", "Device I/O errors"]
            self.req.error = "client gone: %r" % (e,)
        except Exception as e:   # a bug or a crash fault after the header: fail, cut the body
            error = ["INTERNAL_ERROR", "%s: %s" % (type(e).__name__, e)]
            self.req.error = "internal error: %r" % (e,)
        finally:
            with db.lock:
                db.in_use.get(vdi, {}).pop(task, None)
                if not db.in_use.get(vdi):
                    db.in_use.pop(vdi, None)
                if vdi in db.tables["VDI"]:
                    db.tables["VDI"][vdi]["current_operations"].pop(task, None)
                if error:
                    model.task_fail(db, task, error)
                else:
                    model.task_complete(db, task, "")
            self.req.bytes_sent = sender.sent
            self._drop() if error else self._finish_body()
            self._end_task(task, temp)

    # -- GET /pool/xmldbdump ---------------------------------------------------------
    def h_xmldbdump(self, path, rawq, q):
        db = self.sim.db
        if self._auth(q) is None:
            return
        task, temp = self._task(q, "pool.dump_database")
        self.req.task = task
        with db.lock:
            is_master = self.host_ref == db.master()
            body = xmldbdump(db) if is_master else b""
            master_addr = db.tables["host"][db.master()]["address"]
        sender = self._sender(path)
        error = None if is_master else ["HOST_IS_SLAVE", master_addr]
        try:
            self._head("HTTP/1.1 200 OK", [("Connection", "close"), ("task-id", task),
                                           ("Server", SERVER_NAME), ("content-type", "text/xml")])
            self.req.status = 200
            if body:
                sender.send(body)
        except _Stop as e:
            error = e.description if e.description else ["INTERNAL_ERROR", e.why]
        except OSError:
            error = ["CLIENT_ERROR", "write failed"]
        except Exception as e:   # a bug or a crash fault after the header: fail, cut the body
            error = ["INTERNAL_ERROR", "%s: %s" % (type(e).__name__, e)]
            self.req.error = "internal error: %r" % (e,)
        finally:
            with db.lock:
                if error:
                    model.task_fail(db, task, error)
                else:
                    model.task_complete(db, task, "")
            self.req.bytes_sent = sender.sent
            self._drop() if error and is_master else self._finish_body()
            self._end_task(task, temp)

    # -- GET /host_backup ------------------------------------------------------------
    def h_host_backup(self, path, rawq, q):
        db = self.sim.db
        if self._auth(q) is None:
            return
        task, temp = self._task(q, "host.backup")
        self.req.task = task
        with db.lock:
            body = host_backup(db, self.host_ref)
        sender = self._sender(path)
        error = None
        try:
            self._head("HTTP/1.1 200 OK", [("Connection", "close"), ("task-id", task),
                                           ("Server", SERVER_NAME),
                                           ("content-type", "application/octet-stream")])
            self.req.status = 200
            sender.send(body)
        except _Stop as e:
            error = ["BACKUP_SCRIPT_FAILED", e.why]
        except OSError:
            error = ["CLIENT_ERROR", "write failed"]
        except Exception as e:   # a bug or a crash fault after the header: fail, cut the body
            error = ["INTERNAL_ERROR", "%s: %s" % (type(e).__name__, e)]
            self.req.error = "internal error: %r" % (e,)
        finally:
            with db.lock:
                if error:
                    model.task_fail(db, task, error)
                else:
                    model.task_complete(db, task, "")
            self.req.bytes_sent = sender.sent
            self._drop() if error else self._finish_body()
            self._end_task(task, temp)

    # -- PUT /import -------------------------------------------------------------------
    def _drain(self, reader, limit=1 << 34):
        """Read what is left of a failed upload (when its length is known), so
        the client gets to read our answer instead of a broken pipe."""
        if self.headers.get("Content-Length") is None:
            return
        try:
            while limit > 0:
                d = reader.read(1 << 20)
                if not d:
                    break
                limit -= len(d)
        except (OSError, ValueError):
            pass

    def _body_reader(self):
        length = self.headers.get("Content-Length")
        return BodyReader(self.rfile, int(length) if length is not None else None, self.req)

    def _import_sr(self, q):
        """The SR an /import goes to: ``sr_id``, ``sr_uuid``, else the pool's default."""
        db = self.sim.db
        if q.get("sr_id"):
            return db.get("SR", q["sr_id"]) and q["sr_id"]
        if q.get("sr_uuid"):
            return db.ref_of_uuid("SR", q["sr_uuid"])
        sr = db.pool()["default_SR"]
        if sr not in db.tables["SR"]:
            raise ApiError("DEFAULT_SR_NOT_FOUND", sr)
        return sr

    def h_import(self, path, rawq, q):
        sim, db = self.sim, self.sim.db
        if self._auth(q) is None:
            return
        # the SR check comes first, under no task (import.ml uses a fresh one):
        # answer 302 before reading any of the body
        try:
            with db.lock:
                redirect = self._put_redirect(self._import_sr(q))
        except ApiError:
            redirect = None        # reported below, under the client's task
        if redirect is not None:
            return self._redirect(redirect, path, rawq)
        if self.headers.get("Transfer-Encoding"):
            self._discard_body()
            self._simple(403, "Forbidden", b"<html><body><h1>HTTP 403 forbidden</h1>Cannot_handle_chunked</body></html>")
            return
        task, temp = self._task(q, "VM.import")
        self.req.task = task
        try:
            with db.lock:
                sr = self._import_sr(q)
        except ApiError as e:
            return self._fail_before(task, temp, e)
        restore = q.get("restore") == "true"
        force = q.get("force") == "true"
        self._head("HTTP/1.1 200 OK", [("Connection", "close"), ("task-id", task),
                                       ("Server", SERVER_NAME)])
        self.req.status = 200
        error = None
        reader = self._body_reader()
        try:
            from xapisim import xva
            stream = xva.decompress_reader(io.BufferedReader(reader, 1 << 20))
            ova, disks = xva.parse_xva(stream, verify=not force)
            with db.lock:
                vms = import_ova(sim, ova, disks, sr, restore=restore, force=force, task=task)
                model.task_complete(db, task, rpc.encode_value(vms))
        except ApiError as e:
            error = e.description
        except (OSError, ConnectionError) as e:
            error = ["CLIENT_ERROR", str(e)]
        except Exception as e:  # XvaError, tar errors, bad XML ...
            error = ["IMPORT_ERROR", "%s: %s" % (type(e).__name__, e)]
        finally:
            if error:
                self.req.error = str(error)
                with db.lock:
                    model.task_fail(db, task, error)
                self._drain(reader)
            self._finish_body()
            self._end_task(task, temp)

    # -- PUT /import_raw_vdi --------------------------------------------------------------
    def _import_raw_vdi_sr(self, q):
        """The SR of ``vdi``, else ``sr_id``/``sr_uuid`` (import_raw_vdi.ml ``import``)."""
        db = self.sim.db
        if q.get("vdi"):
            return db.tables["VDI"][db.resolve("VDI", q["vdi"])]["SR"]
        if q.get("sr_id"):
            return db.get("SR", q["sr_id"]) and q["sr_id"]
        if q.get("sr_uuid"):
            return db.ref_of_uuid("SR", q["sr_uuid"])
        return None

    def h_import_raw_vdi(self, path, rawq, q):
        db = self.sim.db
        if self._auth(q) is None:
            return
        # as xapi: the SR check first, with no task and nothing created (a VDI made
        # from sr_id here would be made again by the host the client is sent to);
        # answer 302 before reading any of the body
        try:
            with db.lock:
                redirect = self._put_redirect(self._import_raw_vdi_sr(q))
        except ApiError:
            redirect = None        # reported below, under the client's task
        if redirect is not None:
            return self._redirect(redirect, path, rawq)
        task, temp = self._task(q, "VDI.import")
        self.req.task = task
        fmt = (q.get("format") or "raw").lower()
        length = self.headers.get("Content-Length")
        try:
            with db.lock:
                if fmt not in ("raw", "vhd"):
                    raise ApiError("INTERNAL_ERROR", "Unknown format %s" % fmt)
                if q.get("vdi"):
                    vdi = db.resolve("VDI", q["vdi"])
                elif fmt == "raw" and (q.get("sr_id") or q.get("sr_uuid")) and length is not None:
                    sr = db.get("SR", q["sr_id"]) and q["sr_id"] if q.get("sr_id") else \
                        db.ref_of_uuid("SR", q["sr_uuid"])
                    from xapisim.disks import Disk
                    vdi = model.new_vdi(db, sr, Disk.empty(int(length)), name_label="Imported VDI")
                    db.client_created.add(vdi)
                else:
                    raise ApiError("VDI_MISSING", NULL, NULL)
                model.vdi_in_use_error(db, vdi, "import")
                db.in_use.setdefault(vdi, {})[task] = "import"
        except ApiError as e:
            return self._fail_before(task, temp, e)
        self._head("HTTP/1.1 200 OK", [("Connection", "close"), ("task-id", task),
                                       ("Server", SERVER_NAME)])
        self.req.status = 200
        error = None
        reader = io.BufferedReader(self._body_reader(), 1 << 20)
        try:
            with db.lock:
                target = db.content[vdi].clone()
            size = target.virtual_size
            if fmt == "vhd":
                from xapisim import vhd
                src = vhd.parse_vhd(reader)
                if src.virtual_size > size:
                    raise ApiError("VDI_IO_ERROR", "Device I/O errors")
                for b in src.allocated_blocks():
                    off = b * 65536
                    data = src.read(off, min(65536, src.virtual_size - off))
                    _write_changed(target, off, data)
            elif q.get("chunked") is not None and q.get("chunked") != "false":
                while True:
                    hdr = _read_exact(reader, 12)
                    off, n = struct.unpack("<QI", hdr)
                    if off == 0 and n == 0:
                        break
                    if off + n > size:
                        raise ApiError("VDI_IO_ERROR", "Device I/O errors")
                    _write_changed(target, off, _read_exact(reader, n))
            else:
                off = 0
                while True:
                    data = reader.read(1 << 20)
                    if not data:
                        break
                    if off + len(data) > size:
                        raise ApiError("VDI_IO_ERROR", "Device I/O errors")
                    _write_changed(target, off, data)
                    off += len(data)
            with db.lock:
                if vdi in db.tables["VDI"]:
                    old = db.content[vdi]
                    db.content[vdi] = target
                    rec = db.tables["VDI"][vdi]
                    delta = target.physical_utilisation - old.physical_utilisation
                    rec["physical_utilisation"] = target.physical_utilisation
                    model.sr_charge(db, rec["SR"], delta, 0)
                model.task_complete(db, task, rpc.encode_value(vdi))
        except ApiError as e:
            error = e.description
        except Exception as e:
            error = ["VDI_IO_ERROR", "Device I/O errors"]
            self.req.error = "%s: %s" % (type(e).__name__, e)
        finally:
            with db.lock:
                db.in_use.get(vdi, {}).pop(task, None)
                if not db.in_use.get(vdi):
                    db.in_use.pop(vdi, None)
                if error:
                    model.task_fail(db, task, error)
            if error:
                self._drain(reader)
            self._finish_body()
            self._end_task(task, temp)


def _read_exact(f, n):
    out = b""
    while len(out) < n:
        d = f.read(n - len(out))
        if not d:
            raise ConnectionError("short body")
        out += d
    return out


def _write_changed(disk, off, data):
    """Write ``data`` at ``off`` skipping 64 KiB blocks that are zero on both sides."""
    B = 65536
    pos = 0
    n = len(data)
    mv = memoryview(data)
    while pos < n:
        start = off + pos
        end = min(n, pos + (B - start % B))
        piece = mv[pos:end]
        if piece.tobytes().count(0) != len(piece) or not disk.is_zero(start, len(piece)):
            disk.write(start, piece.tobytes())
        pos = end


def _vdis_of(db, vm, preserve):
    rec = db.tables["VM"][vm]
    out = []
    for vbd in rec["VBDs"]:
        b = db.tables["VBD"][vbd]
        if b["type"] != "CD" and not b["empty"] and b["VDI"] in db.tables["VDI"]:
            out.append(b["VDI"])
    if preserve and rec["suspend_VDI"] in db.tables["VDI"]:
        out.append(rec["suspend_VDI"])
    return out


def _html(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_REASONS = {500: "Internal Error", 502: "Bad Gateway", 503: "Service Unavailable",
            504: "Gateway Timeout", 403: "Forbidden", 404: "Not Found"}


class _Sender(object):
    """Writes a response body to the socket, applying export faults."""

    def __init__(self, handler, plan):
        self.h = handler
        self.sock = handler.connection
        self.sim = handler.sim
        self.sent = 0
        self.drop_after = plan["drop_after"]
        self.rate = plan["rate"]
        self.stall_after = plan["stall_after"]
        self.stall_seconds = plan["stall_seconds"]
        crash = plan.get("crash")
        self.crash_after = crash if isinstance(crash, int) else None
        self.t0 = time.time()
        self.fast = self.drop_after is None and self.rate is None and self.stall_after is None \
            and self.crash_after is None

    def send(self, data):
        if self.fast:
            self.sock.sendall(data)
            self.sent += len(data)
            self.h.req.bytes_sent = self.sent
            return
        mv = memoryview(data)
        while len(mv):
            n = len(mv)
            if self.drop_after is not None:
                room = self.drop_after - self.sent
                if room <= 0:
                    raise _Stop(None, "dropped by fault after %d bytes" % self.sent)
                n = min(n, room)
            if self.crash_after is not None:
                room = self.crash_after - self.sent
                if room <= 0:
                    raise RuntimeError("fault: handler crashed after %d body bytes" % self.sent)
                n = min(n, room)
            if self.stall_after is not None:
                room = self.stall_after - self.sent
                if room <= 0:
                    self.stall_after = None
                    self.sim.sleep(self.stall_seconds)
                    continue
                n = min(n, room)
            if self.rate:
                n = min(n, max(1, int(self.rate / 20)))
            self.sock.sendall(mv[:n])
            self.sent += n
            self.h.req.bytes_sent = self.sent
            mv = mv[n:]
            if self.rate:
                due = self.t0 + self.sent / self.rate
                wait = due - time.time()
                if wait > 0:
                    self.sim.sleep(wait)
        if self.drop_after is not None and self.sent >= self.drop_after:
            raise _Stop(None, "dropped by fault after %d bytes" % self.sent)


# ---------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------
class _Tracking(object):
    def _init_tracking(self, sim):
        self.sim = sim
        self._conns = set()
        self._conns_lock = threading.Lock()

    def track(self, sock, add):
        with self._conns_lock:
            (self._conns.add if add else self._conns.discard)(sock)

    def close_all(self):
        with self._conns_lock:
            conns = list(self._conns)
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):
        if self.sim.verbose:
            socketserver.BaseServer.handle_error(self, request, client_address)


class HostServer(_Tracking, socketserver.ThreadingMixIn, HTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True      # SO_REUSEADDR: a fixed --port rebinds at once after a stop
    unix = False

    def __init__(self, addr, sim, host_ref, ssl_ctx=None):
        self._init_tracking(sim)
        self.host_ref = host_ref
        self.ssl_ctx = ssl_ctx
        HTTPServer.__init__(self, addr, Handler)

    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        self.server_name = self.server_address[0]
        self.server_port = self.server_address[1]

    def get_request(self):
        sock, addr = self.socket.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_ctx is not None:
            sock = self.ssl_ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr


class UnixServer(_Tracking, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = 64
    unix = True

    def __init__(self, path, sim):
        self._init_tracking(sim)
        self.host_ref = None
        socketserver.UnixStreamServer.__init__(self, path, Handler)


def bind_hosts(sim, host_refs, ssl_ctx=None, port=0, tries=20):
    """Bind one server per host on 127.0.0.N:PORT, the same PORT for all."""
    last = None
    for _ in range(tries):
        servers = []
        try:
            first = HostServer(("127.0.0.1", port), sim, host_refs[0], ssl_ctx)
            servers.append(first)
            p = first.server_address[1]
            for i, h in enumerate(host_refs[1:], start=2):
                servers.append(HostServer(("127.0.0.%d" % i, p), sim, h, ssl_ctx))
            from xapisim import nbd
            servers.extend(nbd.bind(sim, host_refs))    # each host's NBD server (sim.nbd)
            return servers, p
        except OSError as e:
            last = e
            for s in servers:
                s.server_close()
            if port:
                break
    raise last
