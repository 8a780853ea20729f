"""Fault injection for a simulated pool (``pool.faults``).

Every switch acts on the real wire: XML-RPC answers, HTTP bodies, sockets.
``pool.faults.clear()`` switches everything off again (and undoes state
changes such as a designated master or a filled SR).

    pool.faults.fail("VM.snapshot", "SR_BACKEND_FAILURE_44", "", "There is insufficient space", "")
    pool.faults.fail("VDI.destroy", "VDI_IN_USE", times=3, match="web01")
    pool.faults.drop_export(after_bytes=1 << 20)        # cut the next export body
    pool.faults.throttle(256 * 1024)                    # every export at 256 KiB/s
    pool.faults.stall_export(after_bytes=4096, seconds=3)
    pool.faults.slow("VM.get_all_records", 2.0)
    pool.faults.host_is_slave()                         # the URL in use now answers HOST_IS_SLAVE
    pool.faults.sr_full("NFS storage")
    pool.faults.vanish_vm("web01", before="VM.snapshot")
    pool.faults.drop_rpc("VM.snapshot", times=2)        # connection closed before the answer
    pool.faults.http_error("VM.get_all_records", status=503)
    pool.faults.drop_nbd(after_bytes=1 << 20)          # cut the next NBD connection
    pool.faults.throttle_nbd(256 * 1024)                # NBD replies at 256 KiB/s
    pool.faults.refuse_nbd()                            # NBD connections reset at once
"""
import threading

from xapisim.model import ApiError

EXPORT_PATHS = ("/export", "/export_raw_vdi", "/export_metadata", "/pool/xmldbdump", "/host_backup")


def _flatten(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            for x in _flatten(v):
                yield x
    elif isinstance(value, (list, tuple)):
        for v in value:
            for x in _flatten(v):
                yield x
    else:
        yield str(value)


class _Rule(object):
    def __init__(self, kind, times=1, **kw):
        self.kind = kind
        self.times = times  # None = until cleared
        self.hits = 0
        self.__dict__.update(kw)

    def use(self):
        self.hits += 1
        if self.times is not None:
            self.times -= 1

    @property
    def live(self):
        return self.times is None or self.times > 0

    def __repr__(self):
        d = {k: v for k, v in self.__dict__.items() if k != "kind"}
        return "<fault %s %r>" % (self.kind, d)


class Faults(object):
    def __init__(self, sim):
        self._sim = sim
        self._lock = threading.Lock()
        self._rules = []
        self._undo = []   # callables run by clear()

    # ------------------------------------------------------------------
    # switches
    # ------------------------------------------------------------------
    def _add(self, rule):
        with self._lock:
            self._rules.append(rule)
        return rule

    def fail(self, method, code, *params, times=1, match=None):
        """``method`` answers ``Failure [code, *params]`` (``times`` calls, None = always).
        ``match`` restricts it to calls whose arguments contain that ref, uuid or
        name_label (of any object the arguments reference)."""
        return self._add(_Rule("fail", times, method=method, code=code,
                               params=[str(p) for p in params], match=match))

    def drop_export(self, after_bytes=0, times=1, path=None):
        """Cut the body of the next ``times`` HTTP downloads (``path`` or any export
        path) after ``after_bytes`` bytes and close the connection; the task fails."""
        return self._add(_Rule("drop_export", times, after_bytes=int(after_bytes), path=path))

    def throttle(self, bytes_per_second, path=None):
        """Send HTTP download bodies (``path`` or any export path) at this rate."""
        return self._add(_Rule("throttle", None, rate=float(bytes_per_second), path=path))

    def stall_export(self, after_bytes, seconds, times=1, path=None):
        """After ``after_bytes`` bytes stop sending for ``seconds`` (the connection
        stays open), then carry on."""
        return self._add(_Rule("stall", times, after_bytes=int(after_bytes),
                               seconds=float(seconds), path=path))

    def crash_export(self, after_bytes=None, times=1, path=None):
        """Raise a Python exception inside the next ``times`` HTTP download handlers
        (``path`` or any export path), after they took their task, the VM's
        ``current_operations`` and the VDIs: before the response header when
        ``after_bytes`` is None (the client gets HTTP 500 with the text), else after
        that many body bytes (the body is cut).  The handler must release it all."""
        return self._add(_Rule("crash", times, after_bytes=after_bytes, path=path))

    def slow(self, method, seconds, times=None):
        """``method`` answers only after ``seconds``."""
        return self._add(_Rule("slow", times, method=method, seconds=float(seconds)))

    def drop_rpc(self, method, times=2, after_call=False):
        """Close the connection instead of answering ``method``.  Python's
        xmlrpc.client silently resends once, so ``times=2`` makes the drop visible.
        With ``after_call=True`` the call is carried out before the answer is lost
        (the retry then runs it a second time, as on a real pool)."""
        return self._add(_Rule("drop_rpc", times, method=method, after_call=after_call))

    def http_error(self, method=None, status=500, times=1):
        """Answer an XML-RPC call (``method``, or any) with an HTTP error page
        instead of a methodResponse (e.g. a proxy or stunnel in trouble)."""
        return self._add(_Rule("http_error", times, method=method, status=int(status)))

    def drop_nbd(self, after_bytes=0, times=1, host=None):
        """Cut the next ``times`` NBD connections (to ``host``, a name, or any)
        once ``after_bytes`` bytes of replies and data have been sent."""
        return self._add(_Rule("nbd_drop", times, after_bytes=int(after_bytes), host=host))

    def throttle_nbd(self, bytes_per_second, host=None):
        """Send NBD replies and data at this rate (until cleared)."""
        return self._add(_Rule("nbd_throttle", None, rate=float(bytes_per_second), host=host))

    def refuse_nbd(self, times=None, host=None):
        """Reset NBD connections as soon as they arrive (``times`` of them, None = until
        cleared), as a REJECTing firewall does."""
        return self._add(_Rule("nbd_refuse", times, host=host))

    def vanish_vm(self, name_label, before="VM.snapshot"):
        """Destroy the VM (with its disks) just before the first ``before`` call that
        references it: it was listed, then disappeared."""
        return self._add(_Rule("vanish", 1, name_label=name_label, method=before))

    def sr_full(self, sr):
        """Fill the SR (name_label, uuid or ref): its physical_utilisation becomes
        its physical_size, so snapshots and new disks on it fail with
        SR_BACKEND_FAILURE_44 until ``clear()``."""
        db = self._sim.db
        with db.lock:
            refs = [r for r, rec in db.tables["SR"].items()
                    if sr in (r, rec["uuid"], rec["name_label"])]
            if not refs:
                raise KeyError("no SR %r" % sr)
            for r in refs:
                rec = db.tables["SR"][r]
                old = rec["physical_utilisation"]
                rec["physical_utilisation"] = rec["physical_size"]

                def undo(rec=rec, old=old, filled=rec["physical_size"]):
                    # give back what the fault took, keep what clients used since
                    rec["physical_utilisation"] = max(0, rec["physical_utilisation"] - filled + old)
                self._undo.append(undo)

    def host_is_slave(self, host=None):
        """Make another host the master (``host`` name, or the first member): the
        URL clients use (the old master) now answers HOST_IS_SLAVE with the new
        master's address.  ``clear()`` restores the original master."""
        sim = self._sim
        with sim.db.lock:
            old = sim.db.master()
            if host is None:
                host = next(h for h in sim.db.tables["host"] if h != old)
            new = sim.designate_master(host)
        self._undo.append(lambda: sim.designate_master(old))
        return new

    def clear(self):
        with self._lock:
            del self._rules[:]
            undo, self._undo = self._undo, []
        with self._sim.db.lock:
            for fn in reversed(undo):
                fn()

    @property
    def active(self):
        with self._lock:
            return [r for r in self._rules if r.live]

    # ------------------------------------------------------------------
    # hooks used by rpc.py and server.py
    # ------------------------------------------------------------------
    def _matches(self, match, args):
        if match is None:
            return True
        db = self._sim.db
        for a in _flatten(args):
            if a == match:
                return True
            for cls in ("VM", "VDI", "SR", "host", "VBD", "VIF", "network", "task"):
                rec = db.tables[cls].get(a)
                if rec is not None and match in (rec.get("uuid"), rec.get("name_label")):
                    return True
        return False

    def _take(self, kind, pred):
        with self._lock:
            for r in self._rules:
                if r.kind == kind and r.live and pred(r):
                    r.use()
                    return r
        return None

    def before_call(self, ctx, method, args):
        """Called with the database lock held, after the session check."""
        db = self._sim.db
        r = self._take("vanish", lambda r: r.method == method and any(
            db.tables["VM"].get(a, {}).get("name_label") == r.name_label
            or db.by_uuid["VM"].get(a) and db.tables["VM"][db.by_uuid["VM"][a]]["name_label"] == r.name_label
            for a in _flatten(args)))
        if r is not None:
            self._vanish(r.name_label)
        r = self._take("fail", lambda r: r.method == method and self._matches(r.match, args))
        if r is not None:
            raise ApiError(r.code, *r.params)

    def _vanish(self, name_label):
        from xapisim import model
        db = self._sim.db
        for ref, rec in list(db.tables["VM"].items()):
            if rec["name_label"] != name_label or rec["is_a_snapshot"] or rec["is_a_template"]:
                continue
            if rec["power_state"] != "Halted":
                rec["current_operations"] = {}
                model.shutdown_vm(db, ref)
            vdis = [db.tables["VBD"][b]["VDI"] for b in rec["VBDs"]
                    if db.tables["VBD"][b]["type"] == "Disk" and not db.tables["VBD"][b]["empty"]]
            rec["current_operations"] = {}
            model.destroy_vm(db, ref)
            for v in vdis:
                if v in db.tables["VDI"] and not db.in_use.get(v):
                    model.destroy_vdi(db, v)

    def rpc_transport(self, method):
        """-> (seconds to sleep, action) where action is None, ("drop", after_call)
        or ("http", status)."""
        delay = 0.0
        r = self._take("slow", lambda r: r.method == method)
        if r is not None:
            delay = r.seconds
        r = self._take("http_error", lambda r: r.method in (None, method))
        if r is not None:
            return delay, ("http", r.status)
        r = self._take("drop_rpc", lambda r: r.method == method)
        if r is not None:
            return delay, ("drop", r.after_call)
        return delay, None

    def body_plan(self, path):
        """Faults for one HTTP download body on ``path``."""
        def on_path(r):
            return (r.path is None and path in EXPORT_PATHS) or r.path == path
        plan = {"drop_after": None, "rate": None, "stall_after": None, "stall_seconds": 0.0,
                "crash": None}
        r = self._take("crash", on_path)
        if r is not None:
            plan["crash"] = "before" if r.after_bytes is None else int(r.after_bytes)
        r = self._take("drop_export", on_path)
        if r is not None:
            plan["drop_after"] = r.after_bytes
        with self._lock:
            for r in self._rules:
                if r.kind == "throttle" and on_path(r):
                    plan["rate"] = r.rate
        r = self._take("stall", on_path)
        if r is not None:
            plan["stall_after"] = r.after_bytes
            plan["stall_seconds"] = r.seconds
        return plan

    def nbd_refuse(self, host):
        """Should this NBD connection to ``host`` (name) be reset?"""
        return self._take("nbd_refuse", lambda r: r.host in (None, host)) is not None

    def nbd_plan(self, host):
        """Faults for one NBD connection's transmission phase."""
        plan = {"drop_after": None, "rate": None}
        r = self._take("nbd_drop", lambda r: r.host in (None, host))
        if r is not None:
            plan["drop_after"] = r.after_bytes
        with self._lock:
            for r in self._rules:
                if r.kind == "nbd_throttle" and r.host in (None, host):
                    plan["rate"] = r.rate
        return plan
