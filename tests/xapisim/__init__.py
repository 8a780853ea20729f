"""xapisim: a simulated XenServer / XCP-ng pool that speaks XAPI on the wire.

    import xapisim, XenAPI
    with xapisim.start_pool() as pool:          # the demo pool (xapisim.pools.demo_pool)
        s = XenAPI.Session(pool.url)
        s.xenapi.login_with_password(pool.user, pool.password)
        print(s.xenapi.VM.get_all_records())

See README.md in this directory.
"""
import _thread
import os
import sys

# Nothing heavy is imported here: the `xe` stand-in imports this package for
# xapisim.xecli alone and runs once per command.  The model, the pool
# descriptions and the rest load when first used (start_pool / SimPool, or an
# attribute such as ``xapisim.pools``, see __getattr__).

__all__ = ["start_pool", "SimPool", "pools"]

HERE = os.path.dirname(os.path.abspath(__file__))
XE_PATH = os.path.join(HERE, "xe")

_SUBMODULES = ("calllog", "cbt", "disks", "faults", "model", "nbd", "pools", "rpc", "server", "vhd", "xecli", "xva")
_NAMES = {"CallLog": "calllog", "Faults": "faults"}


def __getattr__(name):
    """``xapisim.model``, ``xapisim.pools``, … (and ``CallLog``, ``Faults``) on first use."""
    import importlib
    if name in _SUBMODULES:
        return importlib.import_module("xapisim." + name)
    if name in _NAMES:
        return getattr(importlib.import_module("xapisim." + _NAMES[name]), name)
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES) | set(_NAMES))


_CERT_LOCK = _thread.allocate_lock()     # threading.Lock, without importing threading
_CERT = {}


def _certificate():
    """A self-signed certificate (made once per process with the openssl CLI)
    valid for 127.0.0.1-127.0.0.16 and localhost."""
    import hashlib
    import subprocess
    import tempfile
    with _CERT_LOCK:
        if _CERT and os.path.exists(_CERT["cert"]):
            return _CERT
        d = tempfile.mkdtemp(prefix="xapisim-tls-")
        key, cert = os.path.join(d, "key.pem"), os.path.join(d, "cert.pem")
        san = ",".join(["DNS:localhost"] + ["IP:127.0.0.%d" % i for i in range(1, 17)])
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", key, "-out", cert, "-days", "3650", "-subj", "/CN=xapisim",
             "-addext", "subjectAltName=" + san],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        der = subprocess.run(["openssl", "x509", "-in", cert, "-outform", "DER"], check=True,
                             stdout=subprocess.PIPE).stdout
        fp = hashlib.sha256(der).hexdigest().upper()
        _CERT.update(dir=d, key=key, cert=cert,
                     sha256=":".join(fp[i:i + 2] for i in range(0, len(fp), 2)))
        return _CERT


class SimPool(object):
    """A running simulated pool.  Use :func:`start_pool` to make one."""

    user = "root"

    def __init__(self, description=None, tls=False, unix_socket=True, keepalive=5.0, port=0,
                 auth_failure_delay=0.0, verbose=False):
        import threading
        from xapisim import model, pools
        from xapisim.calllog import CallLog
        from xapisim.faults import Faults
        self.description = pools.describe(description)
        self.db = model.build(self.description)
        self.release = self.db.release
        self.password = self.description.get("password", "xenroot")
        self.checksum = self.description.get("checksum", "xxhash")
        self.keepalive = keepalive
        self.tls = bool(tls)
        self.auth_failure_delay = auth_failure_delay
        self.verbose = verbose
        self.calls = CallLog()
        self.faults = Faults(self)
        self.xe_path = XE_PATH
        self._stopping = threading.Event()
        self._servers = []
        self._threads = []
        self._tmpdir = None
        self.socket_path = None
        self.cert_path = None
        self.cert_sha256 = None
        self._want_unix = unix_socket
        self._port = port
        self._initial = {"VM": set(self.db.tables["VM"]), "VDI": set(self.db.tables["VDI"])}

    # -- lifecycle ---------------------------------------------------------------
    def start(self):
        import ssl
        import threading
        import tempfile
        import uuid as uuidlib
        from xapisim import server
        ctx = None
        if self.tls:
            c = _certificate()
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(c["cert"], c["key"])
            self.cert_path, self.cert_sha256 = c["cert"], c["sha256"]
        hosts = list(self.db.tables["host"])
        servers, self.port = server.bind_hosts(self, hosts, ctx, self._port)
        self._servers = list(servers)
        if self._want_unix:
            # no "_" in the path: XenAPI.UDSTransport maps "_" in the URL host to "/"
            self._tmpdir = os.path.join(tempfile.gettempdir(), "xapisim-" + uuidlib.uuid4().hex[:12])
            os.mkdir(self._tmpdir, 0o700)
            self.socket_path = os.path.join(self._tmpdir, "xapi")
            self._servers.append(server.UnixServer(self.socket_path, self))
        for s in self._servers:
            t = threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05},
                                 name="xapisim-%s" % (s.server_address,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self):
        import threading
        self._stopping.set()
        stoppers = [threading.Thread(target=s.shutdown) for s in self._servers]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        for s in self._servers:
            s.close_all()
            s.server_close()
        for t in self._threads:
            t.join(5)
        self._servers, self._threads = [], []
        if self._tmpdir:
            import shutil
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def sleep(self, seconds):
        """Sleep, but wake up when the pool stops."""
        self._stopping.wait(seconds)

    # -- addresses -----------------------------------------------------------------
    @property
    def scheme(self):
        return "https" if self.tls else "http"

    @property
    def url(self):
        return "%s://127.0.0.1:%d/" % (self.scheme, self.port)

    @property
    def host_urls(self):
        with self.db.lock:
            return {h["name_label"]: "%s://%s:%d/" % (self.scheme, h["address"], self.port)
                    for h in self.db.tables["host"].values()}

    @property
    def master_url(self):
        with self.db.lock:
            return "%s://%s:%d/" % (self.scheme, self.db.tables["host"][self.db.master()]["address"],
                                    self.port)

    @property
    def socket_url(self):
        """URL for XenAPI.Session(..., transport=XenAPI.UDSTransport())."""
        return "http://%s/" % self.socket_path.replace("/", "_") if self.socket_path else None

    def env(self):
        e = dict(os.environ)
        e.update(XAPISIM_URL=self.url, XAPISIM_USER=self.user, XAPISIM_PASSWORD=self.password,
                 XAPISIM_SOCKET=self.socket_path or "")
        if self.cert_path:
            e["XAPISIM_CERT"] = self.cert_path
        pydir = os.path.dirname(os.path.abspath(sys.executable))
        e["PATH"] = pydir + os.pathsep + e.get("PATH", "")
        return e

    # -- clients ----------------------------------------------------------------------
    def session(self, url=None, **kw):
        """A XenAPI.Session logged in as root (to ``url`` or the pool URL)."""
        import XenAPI
        if self.tls:
            kw.setdefault("ignore_ssl", True)
        s = XenAPI.Session(url or self.url, **kw)
        s.xenapi.login_with_password(self.user, self.password, "1.0", "xapisim-test")
        return s

    def local_session(self):
        """A XenAPI.Session over the unix socket (pre-authenticated, like dom0)."""
        import XenAPI
        s = XenAPI.Session(self.socket_url, transport=XenAPI.UDSTransport())
        s.xenapi.login_with_password("root", "", "1.0", "xapisim-test")
        return s

    # -- test helpers ---------------------------------------------------------------------
    def vm(self, name_label):
        """(ref, record) of the only non-template, non-snapshot VM with this name."""
        with self.db.lock:
            found = [(r, dict(v)) for r, v in self.db.tables["VM"].items()
                     if v["name_label"] == name_label and not v["is_a_template"]
                     and not v["is_a_snapshot"]]
        if len(found) != 1:
            raise KeyError("%d VMs named %r" % (len(found), name_label))
        return found[0]

    def _vdi_ref(self, ref_or_uuid):
        return self.db.resolve("VDI", ref_or_uuid)

    def vdi_content(self, vdi):
        """The xapisim.disks.Disk holding a VDI's content (ref or uuid)."""
        with self.db.lock:
            return self.db.content[self._vdi_ref(vdi)]

    def write_vdi(self, vdi, offset, data):
        """Change a VDI's content (its snapshots keep the old content)."""
        from xapisim import model
        with self.db.lock:
            ref = self._vdi_ref(vdi)
            disk = self.db.content[ref]
            old = disk.physical_utilisation
            disk.write(offset, data)
            rec = self.db.tables["VDI"][ref]
            rec["physical_utilisation"] = disk.physical_utilisation
            model.sr_charge(self.db, rec["SR"], disk.physical_utilisation - old, 0)
            self.db.touch()

    def vm_disks(self, name_label):
        """{device: VDI ref} of a VM's disks."""
        ref, rec = self.vm(name_label)
        with self.db.lock:
            out = {}
            for vbd in rec["VBDs"]:
                b = self.db.tables["VBD"][vbd]
                if b["type"] == "Disk" and not b["empty"]:
                    out[b["device"] or b["userdevice"]] = b["VDI"]
            return out

    def leftovers(self):
        """Snapshot VMs and VDIs created by clients during the test that still exist."""
        with self.db.lock:
            snaps = [{"ref": r, "uuid": v["uuid"], "name_label": v["name_label"]}
                     for r, v in self.db.tables["VM"].items()
                     if v["is_a_snapshot"] and r not in self._initial["VM"]]
            vdis = [{"ref": r, "uuid": v["uuid"], "name_label": v["name_label"]}
                    for r, v in self.db.tables["VDI"].items()
                    if r not in self._initial["VDI"] and r in self.db.client_created]
        return {"snapshots": snaps, "vdis": vdis}

    def designate_master(self, host):
        """Make ``host`` (name, uuid or ref) the master; returns its ref.  The old
        master's listener then answers HOST_IS_SLAVE [new master's address]."""
        with self.db.lock:
            ref = self.db.host_by_name(host)
            self.db.pool()["master"] = ref
            self.db.touch()
            return ref

    def set_checksum(self, kind):
        """XVA chunk checksums: "xxhash" (default) or "sha1" (the older .checksum)."""
        if kind not in ("xxhash", "sha1"):
            raise ValueError(kind)
        self.checksum = kind


def start_pool(description=None, tls=False, unix_socket=True, keepalive=5.0, **kw):
    """Start a simulated pool (``description=None``: the demo pool) and return
    the running :class:`SimPool` (also a context manager that stops it)."""
    return SimPool(description, tls=tls, unix_socket=unix_socket, keepalive=keepalive, **kw).start()
