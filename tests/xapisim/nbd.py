"""The NBD server of each simulated host, as xapi-nbd runs it on a real one.

One threading server per host on ``<host address>:<NBD port>`` (127.0.0.N,
one port shared by every host, a free one unless the pool description says
otherwise: xapi's 10809 may be taken on the machine running the tests).
``VDI.get_nbd_info`` reports that port in its ``port`` field, the field real
XAPI fills with 10809 (``xapi_vdi.ml`` ``_get_nbd_info``).

What a real host does, read in xen-api ``ocaml/nbd/src/main.ml``,
``ocaml/nbd/lib/consts.ml``, ``scripts/nbd-firewall-config.sh`` and the
``nbd`` library it uses (xapi-project/nbd ``lib/server.ml``, ``protocol.ml``):

* The firewall lets NBD in only on interfaces of networks whose ``purpose``
  holds ``nbd`` or ``insecure_nbd`` (elsewhere: REJECT).  Here a host that
  has no attached PIF with an IP on such a network resets the connection.
* At most 16 connections (``connection_limit``); the 17th is accepted and
  closed at once, before the greeting.
* TLS is decided pool-wide per connection: some network has ``nbd`` ->
  FORCEDTLS (every option but ``NBD_OPT_STARTTLS`` answers
  ``NBD_REP_ERR_TLS_REQD``, ``NBD_OPT_EXPORT_NAME`` in clear text closes the
  connection); only ``insecure_nbd`` -> no TLS (``STARTTLS`` answers
  ``NBD_REP_ERR_POLICY``); both, or neither -> the connection is closed.
  The certificate is the host's HTTPS certificate (``xapisim._certificate``).
* Fixed-newstyle handshake, global flags ``NBD_FLAG_FIXED_NEWSTYLE`` only;
  options ``NBD_OPT_EXPORT_NAME``, ``NBD_OPT_ABORT``, ``NBD_OPT_LIST``
  (``NBD_REP_ERR_POLICY``: the names are secrets) and ``NBD_OPT_STARTTLS``;
  every other option, ``NBD_OPT_GO``, ``NBD_OPT_INFO`` and
  ``NBD_OPT_STRUCTURED_REPLY`` included, answers ``NBD_REP_ERR_UNSUP``
  (clients such as libnbd and qemu then fall back to ``EXPORT_NAME``).
* The export name is ``/<vdi uuid>?session_id=<session ref>``; the session is
  checked (``Session.get_uuid``), the VDI looked up by uuid and plugged
  read-only into the host's control domain through a VBD (so it is in use
  while the client is connected).  Any failure closes the connection.
* The export answers with its size, transmission flags ``NBD_FLAG_HAS_FLAGS |
  NBD_FLAG_READ_ONLY`` and 124 zero bytes; ``NBD_CMD_READ`` needs 512-byte
  aligned offsets and lengths (else ``EINVAL``), ``NBD_CMD_WRITE`` answers
  ``EPERM``, ``NBD_CMD_DISC`` ends the connection, everything else
  (``FLUSH``, ``TRIM``, ``BLOCK_STATUS``…) answers ``EINVAL``: xapi's server
  offers no ``NBD_CMD_BLOCK_STATUS`` and no structured replies.

With ``"protocol": "extended"`` in the pool description's ``nbd`` entry the
server goes beyond xapi-nbd, for clients that want a modern server:
``NBD_FLAG_NO_ZEROES``, ``NBD_OPT_INFO`` / ``NBD_OPT_GO`` (``NBD_INFO_EXPORT``,
``NBD_INFO_BLOCK_SIZE`` when asked, errors ``NBD_REP_ERR_POLICY`` for a bad
session and ``NBD_REP_ERR_UNKNOWN`` for a bad VDI, with a message),
``NBD_OPT_STRUCTURED_REPLY`` (reads then answer ``OFFSET_DATA`` chunks and
``OFFSET_HOLE`` chunks for zero 64 KiB runs, one data chunk when the client
sets ``NBD_CMD_FLAG_DF``) and ``NBD_FLAG_CAN_MULTI_CONN``.  Still no
``NBD_CMD_BLOCK_STATUS``.

Deliberate simplifications: a read past the end answers ``EINVAL`` (xapi-nbd's
block layer fails after the reply header and drops the connection); a write's
payload is read and discarded before ``EPERM`` (the ocaml server leaves it in
the stream).

Faults (``pool.faults``): ``drop_nbd(after_bytes)``, ``throttle_nbd(rate)``,
``refuse_nbd()``.  Every connection is logged in ``pool.nbd.log``.
"""
import socket
import socketserver
import ssl
import struct
import threading
import time
import urllib.parse

from xapisim import model
from xapisim.model import NULL, ApiError

NBD_PORT = 10809                       # what real XAPI listens on (and reports)
CONNECTION_LIMIT = 16                  # xapi-nbd lib/consts.ml connection_limit
BACKLOG = 5                            # xapi-nbd: Lwt_unix.listen sock 5

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3e889045565a9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668e33ef

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
FLAG_C_FIXED_NEWSTYLE = 1
FLAG_C_NO_ZEROES = 2

# transmission flags
FLAG_HAS_FLAGS = 1
FLAG_READ_ONLY = 2
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLAG_DF = 4

REPLY_FLAG_DONE = 1
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2

EPERM = 1
EINVAL = 22

SECTOR = 512
MAX_OPTION = 1 << 20                   # a larger option payload closes the connection
SEND_CHUNK = 4 << 20
RUN = 65536                            # hole detection granularity (disks.BLOCK)

PURPOSES = ("nbd", "insecure_nbd")
PROTOCOLS = ("xapi", "extended")


class _Closed(Exception):
    """The connection ends (client gone, refused, or a fault)."""


# ---------------------------------------------------------------------------
# TLS: the hosts' HTTPS certificate
# ---------------------------------------------------------------------------
_TLS = {}
_TLS_LOCK = threading.Lock()


def certificate():
    """-> dict(cert=path, key=path, pem=text, subject=name) of the hosts' certificate."""
    import xapisim
    with _TLS_LOCK:
        if "pem" not in _TLS:
            c = xapisim._certificate()
            with open(c["cert"]) as f:
                pem = f.read()
            _TLS.update(cert=c["cert"], key=c["key"], dir=c["dir"], pem=pem,
                        subject=_subject(c["cert"]))
        return dict(_TLS)


def _subject(cert_path):
    """The first non-wildcard DNS name the certificate was issued to (xapi's
    ``seek`` over ``Certificates.hostnames_of_pem_cert``), else its CN."""
    try:
        dec = ssl._ssl._test_decode_cert(cert_path)
    except Exception:   # pragma: no cover - CPython always has it
        return ""
    names = [v for k, v in dec.get("subjectAltName", ()) if k == "DNS"]
    if not names:
        names = [v for rdn in dec.get("subject", ()) for k, v in rdn if k == "commonName"]
    for n in names[:-1]:
        if "*" not in n:
            return n
    return names[-1] if names else ""


def _server_context():
    with _TLS_LOCK:
        ctx = _TLS.get("ctx")
    if ctx is None:
        c = certificate()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(c["cert"], c["key"])
        with _TLS_LOCK:
            _TLS["ctx"] = ctx
    return ctx


# ---------------------------------------------------------------------------
# configuration and what XAPI derives from the database
# ---------------------------------------------------------------------------
def config(description):
    """The description's ``nbd`` entry with defaults filled in."""
    cfg = dict(description.get("nbd") or {})
    cfg.setdefault("protocol", "xapi")
    cfg.setdefault("port", 0)
    cfg.setdefault("max_connections", CONNECTION_LIMIT)
    if cfg["protocol"] not in PROTOCOLS:
        raise ValueError("nbd protocol must be one of %s, not %r" % (PROTOCOLS, cfg["protocol"]))
    if cfg.get("purpose") not in (None,) + PURPOSES:
        raise ValueError("nbd purpose must be one of %s, not %r" % (PURPOSES, cfg["purpose"]))
    return cfg


def nbd_networks(db):
    return [r for r, n in db.tables["network"].items() if any(p in PURPOSES for p in n["purpose"])]


def host_nbd_ips(db, host, nets=None):
    """IPs of the host's attached PIFs on networks with an NBD purpose."""
    nets = nbd_networks(db) if nets is None else nets
    out = []
    for pif in db.tables["host"][host]["PIFs"]:
        p = db.tables["PIF"].get(pif)
        if p and p["currently_attached"] and p["network"] in nets and p["IP"]:
            if p["IP"] not in out:
                out.append(p["IP"])
    return out


def pool_tls(db):
    """xapi-nbd's ``xapi_says_use_tls``: True, False, or None (refuse)."""
    purposes = {p for n in db.tables["network"].values() for p in n["purpose"]}
    tls, plain = "nbd" in purposes, "insecure_nbd" in purposes
    if tls == plain:
        return None
    return tls


def get_nbd_info(ctx, vdi):
    """``VDI.get_nbd_info``: one entry per IP, on an NBD network, of every host
    with the VDI's SR plugged (xapi_vdi.ml ``_get_nbd_info``)."""
    db = ctx.db
    rec = db.get("VDI", vdi)
    if rec.get("type") == "cbt_metadata":
        raise ApiError("VDI_INCOMPATIBLE_TYPE", vdi, "CBT metadata")
    service = getattr(ctx.sim, "nbd", None)
    hosts = []
    for pbd in db.tables["SR"][rec["SR"]]["PBDs"]:
        p = db.tables["PBD"].get(pbd)
        if p and p["currently_attached"] and p["host"] not in hosts:
            hosts.append(p["host"])
    nets = nbd_networks(db)
    session = ctx.session or NULL
    exportname = "/%s?session_id=%s" % (rec["uuid"], session)
    out = []
    for h in hosts:
        ips = host_nbd_ips(db, h, nets)
        if not ips:
            continue
        c = certificate()
        subject = c["subject"] or db.tables["host"][h]["hostname"]
        for ip in ips:
            out.append({"exportname": exportname, "address": ip,
                        "port": service.port if service else NBD_PORT,
                        "cert": c["pem"], "subject": subject})
    return out


def add_purpose(ctx, network, value):
    """``network.add_purpose`` (xapi_network.ml): nbd and insecure_nbd exclude
    each other pool-wide (``NETWORK_INCOMPATIBLE_PURPOSES [new, conflicting]``)."""
    db = ctx.db
    rec = db.get("network", network)
    if value not in PURPOSES:
        raise ApiError("FIELD_TYPE_ERROR", "value")
    if value in rec["purpose"]:
        return ""
    bad = "insecure_nbd" if value == "nbd" else "nbd"
    for n in db.tables["network"].values():
        if bad in n["purpose"]:
            raise ApiError("NETWORK_INCOMPATIBLE_PURPOSES", value, bad)
    rec["purpose"] = [value] + list(rec["purpose"])
    db.touch()
    return ""


def remove_purpose(ctx, network, value):
    db = ctx.db
    rec = db.get("network", network)
    if value not in PURPOSES:
        raise ApiError("FIELD_TYPE_ERROR", "value")
    if value in rec["purpose"]:
        rec["purpose"] = [p for p in rec["purpose"] if p != value]
        db.touch()
    return ""


def uri(info, tls=None):
    """An NBD URI (libnbd / qemu syntax) for one ``get_nbd_info`` entry:
    ``nbd://ADDR:PORT/EXPORT`` with the export name percent-encoded (it holds
    ``?``), ``nbds://`` when ``tls`` is true."""
    scheme = "nbds" if tls else "nbd"
    return "%s://%s:%s/%s" % (scheme, info["address"], info["port"],
                              urllib.parse.quote(info["exportname"], safe=""))


# ---------------------------------------------------------------------------
# servers
# ---------------------------------------------------------------------------
class Connection(object):
    """One client connection, as logged in ``pool.nbd.log``."""

    def __init__(self, host, peer):
        self.host = host                  # host name_label
        self.peer = peer
        self.status = "open"              # refused | busy | closed | served | dropped | aborted
        self.reason = ""
        self.tls = False
        self.export = None                # the export name asked for
        self.vdi = None                   # VDI ref once the export is open
        self.options = []                 # option numbers the client sent
        self.commands = 0
        self.bytes_sent = 0
        self.started = time.time()
        self.ended = None

    def __repr__(self):
        return "<nbd connection %s %s %s vdi=%s sent=%d>" % (
            self.host, self.status, self.reason, self.vdi, self.bytes_sent)


class Service(object):
    """``pool.nbd``: the per-host servers, their port and the connection log."""

    def __init__(self, sim, cfg):
        self.sim = sim
        self.protocol = cfg["protocol"]
        self.max_connections = int(cfg["max_connections"])
        self.port = None
        self.servers = {}                 # host ref -> NbdServer
        self.log = []
        self.lock = threading.Lock()

    def _record(self, conn):
        with self.lock:
            self.log.append(conn)

    def active(self, host=None):
        """Number of open connections (on the host with that name, or all)."""
        return sum(s.count for h, s in self.servers.items()
                   if host is None or self.sim.db.tables["host"][h]["name_label"] == host)

    def address(self, host):
        """(address, port) of a host's NBD server (name, uuid or ref)."""
        with self.sim.db.lock:
            ref = self.sim.db.host_by_name(host)
        return self.servers[ref].server_address[:2]


class NbdServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True            # SO_REUSEADDR, as xapi-nbd
    request_queue_size = BACKLOG
    unix = False

    def __init__(self, addr, sim, service, host_ref):
        self.sim = sim
        self.service = service
        self.host_ref = host_ref
        self.count = 0
        self._count_lock = threading.Lock()
        self._conns = set()
        self._conns_lock = threading.Lock()
        socketserver.TCPServer.__init__(self, addr, Handler)

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

    def shutdown_request(self, request):
        # the handler closes (or resets) the socket itself
        pass


def bind(sim, host_refs, tries=20):
    """Start nothing, bind one NBD server per host on its address and a shared
    port; sets ``sim.nbd`` and returns the servers (served and stopped with the
    pool's HTTP servers)."""
    cfg = config(sim.description)
    service = Service(sim, cfg)
    with sim.db.lock:
        addrs = [sim.db.tables["host"][h]["address"] for h in host_refs]
    port = int(cfg["port"])
    last = None
    for _ in range(tries):
        servers = []
        try:
            p = port
            for h, a in zip(host_refs, addrs):
                s = NbdServer((a, p), sim, service, h)
                servers.append(s)
                p = s.server_address[1]
            service.port = p
            service.servers = dict(zip(host_refs, servers))
            sim.nbd = service
            return servers
        except OSError as e:
            last = e
            for s in servers:
                s.server_close()
            if port:
                break
    raise last


def _reset(sock):
    """Close with a TCP RST (what a REJECTing firewall looks like to a client
    that got through connect)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class Handler(socketserver.BaseRequestHandler):
    """One NBD client connection."""

    def setup(self):
        self.srv = self.server
        self.sim = self.srv.sim
        self.db = self.sim.db
        self.service = self.srv.service
        self.extended = self.service.protocol == "extended"
        self.sock = self.request
        self.vbd = None
        self.plan = None

    def handle(self):
        sim, db, srv = self.sim, self.db, self.srv
        with db.lock:
            hrec = db.tables["host"][srv.host_ref]
            host_name = hrec["name_label"]
            open_ = bool(host_nbd_ips(db, srv.host_ref))
            tls = pool_tls(db)
        conn = self.conn = Connection(host_name, self.client_address)
        self.service._record(conn)
        faults = sim.faults
        if faults.nbd_refuse(host_name):
            conn.status, conn.reason = "refused", "fault"
            conn.ended = time.time()
            _reset(self.sock)
            return
        if not open_:
            conn.status, conn.reason = "refused", "no NBD network on this host"
            conn.ended = time.time()
            _reset(self.sock)
            return
        with srv._count_lock:
            srv.count += 1
            busy = srv.count > self.service.max_connections
        srv.track(self.sock, True)
        try:
            if busy:
                conn.status = "busy"
                conn.reason = "Server busy: already at maximum %d connections." % \
                    self.service.max_connections
                return
            if tls is None:
                conn.status = "closed"
                conn.reason = "contradictory or no NBD network purposes"
                return
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                target = self.negotiate(tls)
                if target is not None:
                    self.transmit(*target)
                    if conn.status == "open":
                        conn.status = "served"
            except (_Closed, OSError, ssl.SSLError) as e:
                if conn.status == "open":
                    conn.status = "closed"
                    conn.reason = conn.reason or str(e) or type(e).__name__
        finally:
            self.release()
            srv.track(self.sock, False)
            try:
                self.sock.close()
            except OSError:
                pass
            with srv._count_lock:
                srv.count -= 1
            conn.ended = time.time()

    # -- low-level I/O ----------------------------------------------------------
    def recv_exact(self, n):
        buf = bytearray(n)
        mv = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(mv[got:])
            if not k:
                raise _Closed("client closed the connection")
            got += k
        return bytes(buf)

    def send(self, data):
        self.sock.sendall(data)

    def reply(self, opt, rtype, data=b""):
        self.send(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, rtype, len(data)) + data)

    def error_reply(self, opt, rtype, message=""):
        # xapi-nbd's errors carry no text; the extended server explains itself
        self.reply(opt, rtype, message.encode() if self.extended else b"")

    # -- handshake ---------------------------------------------------------------
    def negotiate(self, tls_required):
        conn = self.conn
        gflags = FLAG_FIXED_NEWSTYLE | (FLAG_NO_ZEROES if self.extended else 0)
        self.send(NBDMAGIC + struct.pack(">QH", IHAVEOPT, gflags))
        (cflags,) = struct.unpack(">I", self.recv_exact(4))
        no_zeroes = self.extended and bool(cflags & FLAG_C_NO_ZEROES)
        if tls_required and not cflags & FLAG_C_FIXED_NEWSTYLE:
            conn.reason = "client does not report Fixed_newstyle and server is in FORCEDTLS mode."
            raise _Closed(conn.reason)
        self.structured = False
        while True:
            magic, opt, length = struct.unpack(">QII", self.recv_exact(16))
            if magic != IHAVEOPT:
                conn.reason = "bad option magic"
                raise _Closed(conn.reason)
            if length > MAX_OPTION:
                conn.reason = "option too long"
                raise _Closed(conn.reason)
            data = self.recv_exact(length) if length else b""
            conn.options.append(opt)
            if tls_required and not conn.tls:
                if opt == OPT_STARTTLS:
                    self.reply(opt, REP_ACK)
                    self.start_tls()
                elif opt == OPT_EXPORT_NAME:
                    conn.reason = ("Client requested export over cleartext channel but server "
                                   "is in FORCEDTLS mode.")
                    raise _Closed(conn.reason)
                elif opt == OPT_ABORT:
                    conn.status, conn.reason = "aborted", "before TLS"
                    return None
                else:
                    self.error_reply(opt, REP_ERR_TLS_REQD, "TLS is required")
                continue
            if opt == OPT_STARTTLS:
                self.error_reply(opt, REP_ERR_INVALID if conn.tls else REP_ERR_POLICY,
                                 "TLS already negotiated" if conn.tls else "TLS is not offered")
            elif opt == OPT_EXPORT_NAME:
                name = data.decode("utf-8", "replace")
                conn.export = name
                target, why = self.open_export(name)
                if target is None:
                    conn.reason = why[1]
                    raise _Closed(why[1])
                size, flags = target[1], self.tflags()
                self.send(struct.pack(">QH", size, flags) + (b"" if no_zeroes else bytes(124)))
                return target
            elif opt == OPT_ABORT:
                try:
                    self.reply(opt, REP_ACK)
                except OSError:
                    pass
                conn.status, conn.reason = "aborted", "client requested abort"
                return None
            elif opt == OPT_LIST:
                self.error_reply(opt, REP_ERR_POLICY, "export names are secrets")
            elif self.extended and opt == OPT_STRUCTURED_REPLY:
                if data:
                    self.error_reply(opt, REP_ERR_INVALID, "no payload expected")
                else:
                    self.structured = True
                    self.reply(opt, REP_ACK)
            elif self.extended and opt in (OPT_INFO, OPT_GO):
                target = self.info_or_go(opt, data)
                if target is not None:
                    return target
            else:
                self.error_reply(opt, REP_ERR_UNSUP, "option %d is not supported" % opt)

    def start_tls(self):
        raw = self.sock
        tls = _server_context().wrap_socket(raw, server_side=True)
        self.srv.track(raw, False)
        self.sock = tls
        self.srv.track(tls, True)
        self.conn.tls = True

    def tflags(self):
        f = FLAG_HAS_FLAGS | FLAG_READ_ONLY
        if self.extended:
            f |= FLAG_CAN_MULTI_CONN
            if self.structured:
                f |= FLAG_SEND_DF
        return f

    def info_or_go(self, opt, data):
        conn = self.conn
        if len(data) < 6:
            self.error_reply(opt, REP_ERR_INVALID, "short request")
            return None
        (nlen,) = struct.unpack(">I", data[:4])
        if 4 + nlen + 2 > len(data):
            self.error_reply(opt, REP_ERR_INVALID, "short request")
            return None
        name = data[4:4 + nlen].decode("utf-8", "replace")
        (nreq,) = struct.unpack(">H", data[4 + nlen:6 + nlen])
        if len(data) != 6 + nlen + 2 * nreq:
            self.error_reply(opt, REP_ERR_INVALID, "bad information request count")
            return None
        reqs = struct.unpack(">%dH" % nreq, data[6 + nlen:]) if nreq else ()
        conn.export = name
        target, why = self.open_export(name, keep=(opt == OPT_GO))
        if target is None:
            self.error_reply(opt, REP_ERR_POLICY if why[0] == "session" else REP_ERR_UNKNOWN, why[1])
            return None
        self.reply(opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, target[1], self.tflags()))
        if INFO_BLOCK_SIZE in reqs:
            self.reply(opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, SECTOR, 65536, 32 << 20))
        self.reply(opt, REP_ACK)
        return target if opt == OPT_GO else None

    # -- the export --------------------------------------------------------------
    def open_export(self, name, keep=True):
        """-> ((disk, size), None) or (None, (kind, message)).  With ``keep`` the
        VDI is plugged into the host's control domain until the connection ends."""
        db = self.db
        u = urllib.parse.urlsplit(name)
        session = (urllib.parse.parse_qs(u.query).get("session_id") or [None])[0]
        path = urllib.parse.unquote(u.path)
        vdi_uuid = path[1:] if path.startswith("/") else path
        with db.lock:
            if session is None:
                return None, ("session", "No session_id parameter provided")
            srec = db.tables["session"].get(session)
            if srec is None:
                return None, ("session", "SESSION_INVALID %s" % session)
            srec["last_active"] = model.now()
            vdi = db.by_uuid["VDI"].get(vdi_uuid)
            if vdi is None:
                return None, ("vdi", "UUID_INVALID VDI %s" % vdi_uuid)
            rec = db.tables["VDI"][vdi]
            if rec.get("type") == "cbt_metadata":
                return None, ("vdi", "VDI_INCOMPATIBLE_TYPE %s CBT metadata" % vdi)
            host = self.srv.host_ref
            if host not in db.hosts_seeing_sr(rec["SR"]):
                return None, ("vdi", "SR of VDI %s is not attached on this host" % vdi_uuid)
            disk = db.content.get(vdi)
            if disk is None:
                from xapisim.disks import Disk
                disk = Disk.empty(rec["virtual_size"])
            if keep:
                dom0 = db.tables["host"][host].get("control_domain")
                if dom0 in db.tables["VM"]:
                    vbd = model.create_vbd(db, {"VM": dom0, "VDI": vdi, "mode": "RO", "type": "Disk",
                                                "other_config": {}})
                    v = db.tables["VBD"][vbd]
                    n = int(v["userdevice"])
                    v["device"] = "xvd" + chr(ord("a") + n) if n < 26 else "xvd%d" % n
                    v["currently_attached"] = True
                    self.vbd = vbd
                self.conn.vdi = vdi
                db.touch()
            return (disk, disk.virtual_size), None

    def release(self):
        """Unplug and destroy the control domain's VBD."""
        if self.vbd is None:
            return
        db = self.db
        with db.lock:
            v = db.tables["VBD"].get(self.vbd)
            if v is not None:
                v["currently_attached"] = False
                model.destroy_vbd(db, self.vbd)
                db.touch()
        self.vbd = None

    # -- transmission -------------------------------------------------------------
    def transmit(self, disk, size):
        conn = self.conn
        plan = self.sim.faults.nbd_plan(conn.host)
        out = _Out(self, plan)
        rfile = self.sock.makefile("rb", buffering=1 << 16)
        try:
            while True:
                hdr = rfile.read(28)
                if len(hdr) < 28:
                    raise _Closed("client closed the connection")
                magic, flags, typ, handle, offset, length = struct.unpack(">IHHQQI", hdr)
                if magic != REQUEST_MAGIC:
                    conn.reason = "bad request magic"
                    raise _Closed(conn.reason)
                conn.commands += 1
                if typ == CMD_READ:
                    if offset % SECTOR or length % SECTOR or offset + length > size:
                        out.error(handle, EINVAL, self.structured)
                    elif self.structured:
                        self.read_structured(out, disk, handle, offset, length,
                                             bool(flags & CMD_FLAG_DF))
                    else:
                        self.read_data(out, disk, offset, length,
                                       struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle))
                elif typ == CMD_DISC:
                    return
                elif typ == CMD_WRITE:
                    left = length
                    while left:
                        k = len(rfile.read(min(left, 1 << 20)))
                        if not k:
                            raise _Closed("client closed the connection")
                        left -= k
                    out.error(handle, EPERM, self.structured)
                else:
                    out.error(handle, EINVAL, self.structured)
        finally:
            rfile.close()

    def read_data(self, out, disk, offset, length, header=None):
        """Send ``header`` (if any) then the bytes, in one system call for short reads."""
        end = offset + length
        if header is not None:
            n = min(SEND_CHUNK, length)
            out.send(header, disk.read(offset, n))
            offset += n
        while offset < end:
            n = min(SEND_CHUNK, end - offset)
            out.send(disk.read(offset, n))
            offset += n

    def read_structured(self, out, disk, handle, offset, length, df):
        if length == 0 or df:
            self.read_data(out, disk, offset, length,
                           struct.pack(">IHHQIQ", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                       REPLY_TYPE_OFFSET_DATA, handle, 8 + length, offset))
            return
        # runs of zero / data, split at 64 KiB boundaries
        runs = []
        pos, end = offset, offset + length
        while pos < end:
            nxt = min(end, (pos // RUN + 1) * RUN)
            z = disk.is_zero(pos, nxt - pos)
            if runs and runs[-1][0] == z and runs[-1][2] - runs[-1][1] < SEND_CHUNK:
                runs[-1][2] = nxt
            else:
                runs.append([z, pos, nxt])
            pos = nxt
        for i, (z, a, b) in enumerate(runs):
            fl = REPLY_FLAG_DONE if i == len(runs) - 1 else 0
            if z:
                out.send(struct.pack(">IHHQIQI", STRUCTURED_REPLY_MAGIC, fl, REPLY_TYPE_OFFSET_HOLE,
                                     handle, 12, a, b - a))
            else:
                self.read_data(out, disk, a, b - a,
                               struct.pack(">IHHQIQ", STRUCTURED_REPLY_MAGIC, fl,
                                           REPLY_TYPE_OFFSET_DATA, handle, 8 + (b - a), a))


class _Out(object):
    """Writes transmission-phase bytes, applying NBD faults (drop, throttle)."""

    def __init__(self, handler, plan):
        self.h = handler
        self.conn = handler.conn
        self.drop_after = plan["drop_after"]
        self.rate = plan["rate"]
        self.fast = self.drop_after is None and self.rate is None
        self.sent = 0
        self.t0 = time.time()

    def error(self, handle, code, structured):
        if structured:
            msg = b""
            self.send(struct.pack(">IHHQIIH", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, (1 << 15) + 1,
                                  handle, 6 + len(msg), code, len(msg)) + msg)
        else:
            self.send(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, code, handle))

    def send(self, data, more=None):
        sock = self.h.sock
        if more is not None:
            if self.fast and not self.conn.tls:
                total = len(data) + len(more)
                n = sock.sendmsg([data, more])
                if n < total:
                    sock.sendall((data + more)[n:])
                self.sent += total
                self.conn.bytes_sent = self.sent
                return
            self.send(data)
            data = more
        if self.fast:
            sock.sendall(data)
            self.sent += len(data)
            self.conn.bytes_sent = self.sent
            return
        mv = memoryview(data)
        while len(mv):
            n = len(mv)
            if self.drop_after is not None:
                room = self.drop_after - self.sent
                if room <= 0:
                    self.conn.status = "dropped"
                    self.conn.reason = "dropped by fault after %d bytes" % self.sent
                    _reset_quietly(sock)
                    raise _Closed(self.conn.reason)
                n = min(n, room)
            if self.rate:
                n = min(n, max(1, int(self.rate / 20)))
            sock.sendall(mv[:n])
            self.sent += n
            self.conn.bytes_sent = self.sent
            mv = mv[n:]
            if self.rate:
                wait = self.t0 + self.sent / self.rate - time.time()
                if wait > 0:
                    self.h.sim.sleep(wait)
        if self.drop_after is not None and self.sent >= self.drop_after:
            self.conn.status = "dropped"
            self.conn.reason = "dropped by fault after %d bytes" % self.sent
            _reset_quietly(sock)
            raise _Closed(self.conn.reason)


def _reset_quietly(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
