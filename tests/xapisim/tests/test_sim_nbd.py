"""The simulator's NBD servers (xapisim/nbd.py) through the real XenAPI client
(VDI.get_nbd_info, network.add_purpose), real sockets (a small NBD client
below) and tools nobody here wrote: nbdinfo and nbdcopy (libnbd) and
qemu-img, with and without TLS."""
import contextlib
import hashlib
import os
import shutil
import socket
import ssl
import struct
import subprocess
import time

import pytest
import XenAPI

import xapisim
from xapisim import nbd, pools

KIB = 1024
MIB = 1 << 20
BLOCK = 65536


def need(tool):
    if shutil.which(tool) is None:
        pytest.skip("%s is not installed" % tool)


def nbd_pool(purpose="insecure_nbd", protocol="xapi", vms=None, **nbd_extra):
    cfg = dict(protocol=protocol, **nbd_extra)
    if purpose:
        cfg["purpose"] = purpose
    vms = vms or [{"name": "a", "disks": [{"size": "4M", "blocks": [0, 3, 40, 63]}]},
                  {"name": "b", "disks": [{"size": "1M", "blocks": [0], "sr": "local:host2"}]}]
    return xapisim.start_pool(pools.simple_pool(vms=vms, nbd=cfg))


@contextlib.contextmanager
def started(*args, **kw):
    pool = nbd_pool(*args, **kw)
    s = pool.session()
    try:
        yield pool, s.xenapi, s
    finally:
        try:
            s.xenapi.session.logout()
        except Exception:
            pass
        pool.stop()


def vdi_of(pool, vm="a"):
    return list(pool.vm_disks(vm).values())[0]


def until(cond, timeout=5.0):
    """Wait for a server-side state change the client cannot observe directly."""
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError("condition not reached in %.1f s" % timeout)
        time.sleep(0.005)


def cadir(tmp_path, info):
    d = tmp_path / "ca"
    d.mkdir(exist_ok=True)
    (d / "ca-cert.pem").write_text(info["cert"])
    return str(d)


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---------------------------------------------------------------------------
# a small NBD client on a real socket
# ---------------------------------------------------------------------------
class Client(object):
    def __init__(self, address, port, timeout=10):
        self.sock = socket.create_connection((address, int(port)), timeout=timeout)
        self.buf = b""

    def recv(self, n):
        out = bytearray()
        while len(out) < n:
            k = self.sock.recv(n - len(out))
            if not k:
                raise EOFError("server closed after %d of %d bytes" % (len(out), n))
            out += k
        return bytes(out)

    def eof(self):
        """True if the server closed (or reset) the connection."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def greeting(self, cflags=nbd.FLAG_C_FIXED_NEWSTYLE):
        g = self.recv(18)
        assert g[:8] == b"NBDMAGIC"
        magic, gflags = struct.unpack(">QH", g[8:])
        assert magic == nbd.IHAVEOPT
        self.sock.sendall(struct.pack(">I", cflags))
        return gflags

    def option(self, opt, data=b""):
        self.sock.sendall(struct.pack(">QII", nbd.IHAVEOPT, opt, len(data)) + data)

    def opt_reply(self):
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv(20))
        assert magic == nbd.OPT_REPLY_MAGIC
        return opt, rtype, self.recv(length)

    def ask(self, opt, data=b""):
        self.option(opt, data)
        return self.opt_reply()

    def export_name(self, name, no_zeroes=False):
        self.option(nbd.OPT_EXPORT_NAME, name.encode())
        size, flags = struct.unpack(">QH", self.recv(10))
        if not no_zeroes:
            assert self.recv(124) == bytes(124)
        return size, flags

    def starttls(self, cafile_data, hostname):
        opt, rtype, _ = self.ask(nbd.OPT_STARTTLS)
        assert (opt, rtype) == (nbd.OPT_STARTTLS, nbd.REP_ACK)
        ctx = ssl.create_default_context(cadata=cafile_data)
        self.sock = ctx.wrap_socket(self.sock, server_hostname=hostname)

    def go(self, name, opt=nbd.OPT_GO, infos=()):
        n = name.encode()
        self.option(opt, struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos))
                    + b"".join(struct.pack(">H", i) for i in infos))
        replies = []
        while True:
            o, rtype, data = self.opt_reply()
            replies.append((rtype, data))
            if rtype != nbd.REP_INFO:
                return replies

    def request(self, typ, offset, length, flags=0, handle=7, payload=b""):
        self.sock.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, typ, handle, offset, length)
                          + payload)

    def simple_reply(self):
        magic, err, handle = struct.unpack(">IIQ", self.recv(16))
        assert magic == nbd.SIMPLE_REPLY_MAGIC
        return err, handle

    def read(self, offset, length, handle=7):
        self.request(nbd.CMD_READ, offset, length, handle=handle)
        err, h = self.simple_reply()
        assert h == handle
        return err, (self.recv(length) if err == 0 else b"")

    def structured_read(self, offset, length, flags=0, handle=9):
        self.request(nbd.CMD_READ, offset, length, flags=flags, handle=handle)
        chunks = []
        while True:
            magic, fl, typ, h, n = struct.unpack(">IHHQI", self.recv(20))
            assert magic == nbd.STRUCTURED_REPLY_MAGIC and h == handle
            chunks.append((typ, self.recv(n)))
            if fl & nbd.REPLY_FLAG_DONE:
                return chunks

    def close(self):
        self.sock.close()


def connect(info):
    return Client(info["address"], info["port"])


def refused(info):
    """The connection is reset (at connect, or before the greeting)."""
    try:
        c = connect(info)
    except (ConnectionResetError, ConnectionRefusedError):
        return True
    return c.eof()


def open_export(info):
    c = connect(info)
    c.greeting()
    size, flags = c.export_name(info["exportname"])
    return c, size, flags


# ---------------------------------------------------------------------------
# VDI.get_nbd_info and network purposes
# ---------------------------------------------------------------------------
def test_get_nbd_info_lists_every_host_with_the_sr_and_an_nbd_address():
    with started() as (pool, x, s):
        vdi = vdi_of(pool)
        infos = x.VDI.get_nbd_info(vdi)
        hosts = sorted(h["address"] for h in x.host.get_all_records().values())
        assert sorted(i["address"] for i in infos) == hosts == ["127.0.0.1", "127.0.0.2"]
        cert = nbd.certificate()
        for i in infos:
            assert set(i) == {"exportname", "address", "port", "cert", "subject"}
            assert i["exportname"] == "/%s?session_id=%s" % (x.VDI.get_uuid(vdi), s._session)
            # an int64 on the wire: XML-RPC gives a decimal string, like 10809 from xapi
            assert i["port"] == str(pool.nbd.port) and int(i["port"]) > 0
            assert i["cert"] == cert["pem"] and i["cert"].startswith("-----BEGIN CERTIFICATE-----")
            assert i["subject"] == "localhost"
        # a VDI on host2's local SR: only host2 serves it
        local = x.VDI.get_nbd_info(vdi_of(pool, "b"))
        assert [i["address"] for i in local] == ["127.0.0.2"]


def test_get_nbd_info_is_empty_without_an_nbd_network():
    with started(purpose=None) as (pool, x, s):
        assert x.VDI.get_nbd_info(vdi_of(pool)) == []
        assert all(n["purpose"] == [] for n in x.network.get_all_records().values())
    # a purpose on a network where the hosts have no IP is not enough
    desc = pools.simple_pool(vms=["a"])
    desc["networks"][1]["purpose"] = ["insecure_nbd"]
    with xapisim.start_pool(desc) as pool:
        x = pool.session().xenapi
        assert x.VDI.get_nbd_info(vdi_of(pool)) == []
    desc["networks"][1]["ip"] = True
    with xapisim.start_pool(desc) as pool:
        x = pool.session().xenapi
        assert len(x.VDI.get_nbd_info(vdi_of(pool))) == 2


def test_network_add_and_remove_purpose():
    with started(purpose=None) as (pool, x, s):
        vdi = vdi_of(pool)
        net0, net1 = sorted(x.network.get_all(), key=lambda n: x.network.get_bridge(n))
        x.network.add_purpose(net0, "nbd")
        x.network.add_purpose(net0, "nbd")                  # idempotent
        assert x.network.get_purpose(net0) == ["nbd"]
        assert len(x.VDI.get_nbd_info(vdi)) == 2
        with pytest.raises(XenAPI.Failure) as e:
            x.network.add_purpose(net1, "insecure_nbd")
        assert e.value.details == ["NETWORK_INCOMPATIBLE_PURPOSES", "insecure_nbd", "nbd"]
        x.network.remove_purpose(net0, "nbd")
        assert x.network.get_purpose(net0) == []
        assert x.VDI.get_nbd_info(vdi) == []
        with pytest.raises(XenAPI.Failure) as e:
            x.network.add_purpose(net0, "nbd_please")
        assert e.value.details[0] == "FIELD_TYPE_ERROR"


def test_get_nbd_info_errors():
    with started() as (pool, x, s):
        with pytest.raises(XenAPI.Failure) as e:
            x.VDI.get_nbd_info("OpaqueRef:nope")
        assert e.value.details == ["HANDLE_INVALID", "VDI", "OpaqueRef:nope"]
        vdi = vdi_of(pool)
        info = x.VDI.get_nbd_info(vdi)[0]
        # a cbt_metadata VDI (what VDI.data_destroy leaves): no data to serve
        with pool.db.lock:
            pool.db.tables["VDI"][vdi]["type"] = "cbt_metadata"
        with pytest.raises(XenAPI.Failure) as e:
            x.VDI.get_nbd_info(vdi)
        assert e.value.details == ["VDI_INCOMPATIBLE_TYPE", vdi, "CBT metadata"]
        c = connect(info)
        c.greeting()
        c.option(nbd.OPT_EXPORT_NAME, info["exportname"].encode())
        assert c.eof()
        assert "VDI_INCOMPATIBLE_TYPE" in pool.nbd.log[-1].reason


# ---------------------------------------------------------------------------
# the protocol as xapi-nbd speaks it
# ---------------------------------------------------------------------------
def test_xapi_handshake_options_and_commands():
    with started() as (pool, x, s):
        vdi = vdi_of(pool)
        disk = pool.vdi_content(vdi)
        info = x.VDI.get_nbd_info(vdi)[0]
        c = connect(info)
        assert c.greeting() == nbd.FLAG_FIXED_NEWSTYLE          # no NO_ZEROES
        for opt in (nbd.OPT_GO, nbd.OPT_INFO, nbd.OPT_STRUCTURED_REPLY, 10):
            assert c.ask(opt, b"\0" * 6 if opt in (nbd.OPT_GO, nbd.OPT_INFO) else b"") == \
                (opt, nbd.REP_ERR_UNSUP, b"")
        assert c.ask(nbd.OPT_LIST) == (nbd.OPT_LIST, nbd.REP_ERR_POLICY, b"")
        assert c.ask(nbd.OPT_STARTTLS) == (nbd.OPT_STARTTLS, nbd.REP_ERR_POLICY, b"")
        size, flags = c.export_name(info["exportname"])
        assert size == disk.virtual_size == 4 * MIB
        assert flags == nbd.FLAG_HAS_FLAGS | nbd.FLAG_READ_ONLY
        # data where the disk has blocks and zeros elsewhere, across block edges
        for off, n in ((0, 4096), (3 * BLOCK - 512, 2 * BLOCK), (40 * BLOCK, BLOCK),
                       (size - 1024, 1024), (5 * BLOCK, 8192)):
            assert c.read(off, n) == (0, disk.read(off, n))
        assert disk.read(0, 512) != bytes(512)
        assert c.read(0, 0) == (0, b"")
        assert c.read(100, 512)[0] == nbd.EINVAL              # not sector-aligned
        assert c.read(0, 1000)[0] == nbd.EINVAL
        assert c.read(size, 512)[0] == nbd.EINVAL             # past the end
        c.request(nbd.CMD_WRITE, 0, 512, payload=b"x" * 512)
        assert c.simple_reply() == (nbd.EPERM, 7)
        for cmd in (3, 4, 5, 6, 7):                           # flush trim cache zeroes block_status
            c.request(cmd, 0, 512)
            assert c.simple_reply() == (nbd.EINVAL, 7)
        assert c.read(0, 512) == (0, disk.read(0, 512))        # still in sync
        assert disk.read(0, 512)[:1] != b"x"
        c.request(nbd.CMD_DISC, 0, 0)
        assert c.eof()
        until(lambda: pool.nbd.active() == 0)
        assert pool.nbd.log[-1].status == "served"


def test_export_is_a_read_only_dom0_vbd_while_connected():
    with started() as (pool, x, s):
        vdi = vdi_of(pool)
        info = x.VDI.get_nbd_info(vdi)[0]
        before = x.VDI.get_VBDs(vdi)
        c, size, flags = open_export(info)
        vbds = [v for v in x.VDI.get_VBDs(vdi) if v not in before]
        assert len(vbds) == 1
        rec = x.VBD.get_record(vbds[0])
        assert rec["mode"] == "RO" and rec["currently_attached"] is True
        host = x.host.get_by_name_label("host1")[0]
        assert rec["VM"] == x.host.get_control_domain(host)
        with pytest.raises(XenAPI.Failure) as e:
            x.VDI.destroy(vdi)
        assert e.value.details == ["VDI_IN_USE", vdi, "destroy"]
        c.close()
        until(lambda: x.VDI.get_VBDs(vdi) == before)
        assert pool.nbd.active() == 0


def test_writes_through_the_api_are_seen_by_the_next_read():
    with started() as (pool, x, s):
        vdi = vdi_of(pool)
        info = x.VDI.get_nbd_info(vdi)[0]
        c, size, _ = open_export(info)
        pool.write_vdi(vdi, 7 * BLOCK + 512, b"\xab" * 1024)
        assert c.read(7 * BLOCK, 2048) == (0, bytes(512) + b"\xab" * 1024 + bytes(512))
        c.close()


def test_bad_session_or_vdi_closes_the_connection():
    with started() as (pool, x, s):
        vdi = vdi_of(pool)
        info = x.VDI.get_nbd_info(vdi)[0]
        uuid = x.VDI.get_uuid(vdi)
        for name, why in (("/%s?session_id=OpaqueRef:bogus" % uuid, "SESSION_INVALID"),
                          ("/%s" % uuid, "No session_id"),
                          ("/00000000-0000-4000-8000-000000000000?session_id=%s" % s._session,
                           "UUID_INVALID"),
                          ("/%s?session_id=%s" % (x.VDI.get_uuid(vdi_of(pool, "b")), s._session),
                           "not attached on this host")):
            c = connect(info)            # host1: b's disk is on host2's local SR
            c.greeting()
            c.option(nbd.OPT_EXPORT_NAME, name.encode())
            assert c.eof(), name
            assert why in pool.nbd.log[-1].reason
        # a session that logged out is refused too
        s2 = pool.session()
        info2 = s2.xenapi.VDI.get_nbd_info(vdi)[0]
        s2.xenapi.session.logout()
        c = connect(info2)
        c.greeting()
        c.option(nbd.OPT_EXPORT_NAME, info2["exportname"].encode())
        assert c.eof()


def test_tls_is_forced_on_nbd_networks():
    with started(purpose="nbd") as (pool, x, s):
        vdi = vdi_of(pool)
        disk = pool.vdi_content(vdi)
        info = x.VDI.get_nbd_info(vdi)[0]
        c = connect(info)
        c.greeting()
        assert c.ask(nbd.OPT_LIST) == (nbd.OPT_LIST, nbd.REP_ERR_TLS_REQD, b"")
        assert c.ask(nbd.OPT_GO, b"\0" * 6)[1] == nbd.REP_ERR_TLS_REQD
        c.starttls(info["cert"], info["subject"])            # pinned to get_nbd_info's cert
        assert c.sock.getpeercert()["subjectAltName"][0] == ("DNS", "localhost")
        assert c.ask(nbd.OPT_STARTTLS) == (nbd.OPT_STARTTLS, nbd.REP_ERR_INVALID, b"")
        size, flags = c.export_name(info["exportname"])
        assert c.read(3 * BLOCK, BLOCK) == (0, disk.read(3 * BLOCK, BLOCK))
        c.request(nbd.CMD_DISC, 0, 0)
        assert pool.nbd.log[-1].tls is True
        # the export name in clear text ends the connection
        c = connect(info)
        c.greeting()
        c.option(nbd.OPT_EXPORT_NAME, info["exportname"].encode())
        assert c.eof()
        assert "FORCEDTLS" in pool.nbd.log[-1].reason
        # so does a client without fixed newstyle
        c = connect(info)
        c.greeting(cflags=0)
        assert c.eof()


def test_contradictory_purposes_and_hosts_without_an_nbd_address_refuse():
    with started() as (pool, x, s):
        vdi = vdi_of(pool)
        info1, info2 = sorted(x.VDI.get_nbd_info(vdi), key=lambda i: i["address"])
        # host2 loses its address on the NBD network: not listed, firewalled
        with pool.db.lock:
            h2 = pool.db.host_by_name("host2")
            for pif in pool.db.tables["host"][h2]["PIFs"]:
                pool.db.tables["PIF"][pif]["IP"] = ""
        assert [i["address"] for i in x.VDI.get_nbd_info(vdi)] == ["127.0.0.1"]
        assert refused(info2)                                 # reset, no greeting
        assert pool.nbd.log[-1].status == "refused"
        # both purposes in the pool (only possible behind xapi's back): refused
        with pool.db.lock:
            for n in pool.db.tables["network"].values():
                n["purpose"] = ["nbd", "insecure_nbd"]
        c = connect(info1)
        assert c.eof()
        assert "contradictory" in pool.nbd.log[-1].reason


def test_at_most_16_connections_per_host():
    with started() as (pool, x, s):
        info = x.VDI.get_nbd_info(vdi_of(pool))[0]
        conns = []
        for _ in range(16):
            c = connect(info)
            c.greeting()                                      # each one is served
            conns.append(c)
        c17 = connect(info)
        assert c17.eof()                                      # accepted, closed before the greeting
        assert pool.nbd.log[-1].status == "busy"
        other = [i for i in x.VDI.get_nbd_info(vdi_of(pool)) if i["address"] != info["address"]][0]
        c = connect(other)                                    # the limit is per host
        c.greeting()
        c.close()
        conns.pop().close()
        until(lambda: pool.nbd.active("host1") == 15)
        c = connect(info)
        c.greeting()
        c.export_name(info["exportname"])
        assert c.read(0, 512)[0] == 0
        for c in conns + [c]:
            c.close()


def test_listener_reuses_address_and_stop_closes_connections():
    pool = nbd_pool()
    x = pool.session().xenapi
    vdi = vdi_of(pool)
    info = x.VDI.get_nbd_info(vdi)[0]
    srv = pool.nbd.servers[x.host.get_by_name_label("host1")[0]]
    assert srv.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
    assert pool.nbd.address("host2") == ("127.0.0.2", pool.nbd.port)
    c, _, _ = open_export(info)
    t = time.time()
    pool.stop()
    assert time.time() - t < 3
    assert c.eof()
    with pytest.raises(OSError):
        socket.create_connection((info["address"], int(info["port"])), timeout=2)


# ---------------------------------------------------------------------------
# the extended protocol (beyond xapi-nbd)
# ---------------------------------------------------------------------------
def test_extended_go_info_and_structured_replies():
    with started(protocol="extended") as (pool, x, s):
        vdi = vdi_of(pool)
        disk = pool.vdi_content(vdi)
        info = x.VDI.get_nbd_info(vdi)[0]
        uuid = x.VDI.get_uuid(vdi)
        before = x.VDI.get_VBDs(vdi)
        c = connect(info)
        assert c.greeting(cflags=nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES) == \
            nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES
        # errors carry a message
        r = c.go("/%s?session_id=OpaqueRef:bogus" % uuid)
        assert r[0][0] == nbd.REP_ERR_POLICY and b"SESSION_INVALID" in r[0][1]
        r = c.go("/00000000-0000-4000-8000-000000000000?session_id=%s" % s._session, opt=nbd.OPT_INFO)
        assert r[0][0] == nbd.REP_ERR_UNKNOWN and b"UUID_INVALID" in r[0][1]
        assert c.ask(nbd.OPT_LIST)[1] == nbd.REP_ERR_POLICY
        assert c.ask(nbd.OPT_STRUCTURED_REPLY) == (nbd.OPT_STRUCTURED_REPLY, nbd.REP_ACK, b"")
        r = c.go(info["exportname"], opt=nbd.OPT_INFO, infos=[nbd.INFO_BLOCK_SIZE])
        assert [t for t, _ in r] == [nbd.REP_INFO, nbd.REP_INFO, nbd.REP_ACK]
        assert x.VDI.get_VBDs(vdi) == before                  # INFO does not plug the VDI
        r = c.go(info["exportname"])
        typ, size, flags = struct.unpack(">HQH", r[0][1])
        assert (typ, size) == (nbd.INFO_EXPORT, 4 * MIB) and r[-1][0] == nbd.REP_ACK
        assert flags & nbd.FLAG_READ_ONLY and flags & nbd.FLAG_SEND_DF and flags & nbd.FLAG_CAN_MULTI_CONN
        # blocks 3 and 40 hold data, 4..39 are zero
        chunks = c.structured_read(2 * BLOCK, 40 * BLOCK)
        got = bytearray(40 * BLOCK)
        kinds = []
        for typ, data in chunks:
            (off,) = struct.unpack(">Q", data[:8])
            if typ == nbd.REPLY_TYPE_OFFSET_HOLE:
                (n,) = struct.unpack(">I", data[8:])
                kinds.append(("hole", off // BLOCK, n // BLOCK))
            else:
                assert typ == nbd.REPLY_TYPE_OFFSET_DATA
                got[off - 2 * BLOCK:off - 2 * BLOCK + len(data) - 8] = data[8:]
                kinds.append(("data", off // BLOCK, (len(data) - 8) // BLOCK))
        assert kinds == [("hole", 2, 1), ("data", 3, 1), ("hole", 4, 36), ("data", 40, 1),
                         ("hole", 41, 1)]
        assert bytes(got) == disk.read(2 * BLOCK, 40 * BLOCK)
        # "don't fragment": one data chunk
        chunks = c.structured_read(2 * BLOCK, 4 * BLOCK, flags=nbd.CMD_FLAG_DF)
        assert len(chunks) == 1 and chunks[0][0] == nbd.REPLY_TYPE_OFFSET_DATA
        assert chunks[0][1][8:] == disk.read(2 * BLOCK, 4 * BLOCK)
        # errors are structured too
        chunks = c.structured_read(1, 512)
        assert chunks[0][0] == (1 << 15) + 1 and struct.unpack(">I", chunks[0][1][:4])[0] == nbd.EINVAL
        c.request(nbd.CMD_DISC, 0, 0)
        assert c.eof()


# ---------------------------------------------------------------------------
# faults
# ---------------------------------------------------------------------------
def test_fault_refuse_connections():
    with started() as (pool, x, s):
        info = x.VDI.get_nbd_info(vdi_of(pool))[0]
        pool.faults.refuse_nbd(times=2)
        for _ in range(2):
            assert refused(info)
        assert [c.reason for c in pool.nbd.log] == ["fault", "fault"]
        c = connect(info)
        c.greeting()                                          # the third one is served
        c.close()
        pool.faults.refuse_nbd(host="host2")
        other = [i for i in x.VDI.get_nbd_info(vdi_of(pool)) if i["address"] == "127.0.0.2"][0]
        assert refused(other)
        connect(info).greeting()
        pool.faults.clear()
        connect(other).greeting()


def test_fault_drop_after_bytes():
    with started() as (pool, x, s):
        vdi = vdi_of(pool)
        info = x.VDI.get_nbd_info(vdi)[0]
        pool.faults.drop_nbd(after_bytes=16 + 1000)
        c, _, _ = open_export(info)
        c.request(nbd.CMD_READ, 0, 4096)
        got = b""
        with pytest.raises((EOFError, ConnectionResetError)):
            while True:
                got += c.recv(1)
        assert len(got) == 16 + 1000
        assert got[16:] == pool.vdi_content(vdi).read(0, 1000)
        assert pool.nbd.log[-1].status == "dropped"
        c, _, _ = open_export(info)                           # times=1: the next one is whole
        assert c.read(0, 4096) == (0, pool.vdi_content(vdi).read(0, 4096))


def test_fault_throttle():
    with started() as (pool, x, s):
        vdi = vdi_of(pool)
        info = x.VDI.get_nbd_info(vdi)[0]
        pool.faults.throttle_nbd(1 * MIB)
        c, _, _ = open_export(info)
        t = time.time()
        err, data = c.read(0, 512 * KIB)
        took = time.time() - t
        assert err == 0 and data == pool.vdi_content(vdi).read(0, 512 * KIB)
        assert took >= 0.45, took
        pool.faults.clear()
        c, _, _ = open_export(info)
        t = time.time()
        assert c.read(0, 512 * KIB)[0] == 0
        assert time.time() - t < took / 2


# ---------------------------------------------------------------------------
# tools nobody here wrote
# ---------------------------------------------------------------------------
def tool(argv, **kw):
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=60, **kw)


@pytest.mark.parametrize("protocol", ["xapi", "extended"])
@pytest.mark.parametrize("purpose", ["insecure_nbd", "nbd"])
def test_nbdinfo_and_nbdcopy(tmp_path, protocol, purpose):
    need("nbdinfo")
    need("nbdcopy")
    vms = [{"name": "a", "disks": [{"size": "3M", "blocks": [0, 5, 47]}]}]
    with started(purpose=purpose, protocol=protocol, vms=vms) as (pool, x, s):
        vdi = vdi_of(pool)
        pool.write_vdi(vdi, 20 * BLOCK + 4096, b"written by a test" * 100)
        info = x.VDI.get_nbd_info(vdi)[0]
        tls = purpose == "nbd"
        uri = nbd.uri(info, tls=tls)
        if tls:
            uri += "?tls-certificates=" + cadir(tmp_path, info)
        r = tool(["nbdinfo", "--json", uri])
        assert r.returncode == 0, r.stderr
        import json
        j = json.loads(r.stdout)
        exp = j["exports"][0]
        assert exp["export-size"] == 3 * MIB
        assert exp["is_read_only"] is True
        assert j["TLS"] is tls
        assert exp["can_multi_conn"] is (protocol == "extended")
        out = tmp_path / "out.raw"
        r = tool(["nbdcopy", uri, str(out)])
        assert r.returncode == 0, r.stderr
        assert sha(out) == pool.vdi_content(vdi).sha256()
        assert all(c.tls is tls for c in pool.nbd.log)


def test_nbdcopy_needs_the_pinned_certificate(tmp_path):
    need("nbdcopy")
    with started(purpose="nbd") as (pool, x, s):
        info = x.VDI.get_nbd_info(vdi_of(pool))[0]
        wrong = tmp_path / "wrong"
        wrong.mkdir()
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(wrong / "k.pem"),
                        "-out", str(wrong / "ca-cert.pem"), "-days", "1", "-subj", "/CN=other"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = tool(["nbdcopy", nbd.uri(info, tls=True) + "?tls-certificates=%s" % wrong,
                  str(tmp_path / "out.raw")])
        assert r.returncode != 0
        # and a plain client meets FORCEDTLS
        r = tool(["nbdinfo", nbd.uri(info)])
        assert r.returncode != 0


def test_libnbd_errors(tmp_path):
    need("nbdinfo")
    with started() as (pool, x, s):
        vdi = vdi_of(pool)
        info = x.VDI.get_nbd_info(vdi)[0]
        bad = dict(info, exportname=info["exportname"].replace(s._session, "OpaqueRef:bogus"))
        r = tool(["nbdinfo", nbd.uri(bad)])
        assert r.returncode != 0
        assert "SESSION_INVALID" in pool.nbd.log[-1].reason
        pool.faults.refuse_nbd()
        r = tool(["nbdinfo", nbd.uri(info)])
        assert r.returncode != 0
        pool.faults.clear()
        pool.faults.drop_nbd(after_bytes=100 * KIB)
        r = tool(["nbdcopy", nbd.uri(info), str(tmp_path / "out.raw")])
        assert r.returncode != 0
        assert pool.nbd.log[-1].status == "dropped"


def qemu_convert(tmp_path, info, tls):
    out = tmp_path / "qemu.raw"
    opts = "driver=raw,file.driver=nbd,file.host=%s,file.port=%s,file.export=%s" % (
        info["address"], info["port"], info["exportname"].replace(",", ",,"))
    argv = ["qemu-img", "convert", "-O", "raw"]
    if tls:
        argv += ["--object", "tls-creds-x509,id=tls0,endpoint=client,dir=%s" % cadir(tmp_path, info)]
        opts += ",file.tls-creds=tls0"
    return tool(argv + ["--image-opts", opts, str(out)]), out


@pytest.mark.parametrize("purpose", ["insecure_nbd", "nbd"])
def test_qemu_img_convert(tmp_path, purpose):
    need("qemu-img")
    with started(purpose=purpose, protocol="extended") as (pool, x, s):
        vdi = vdi_of(pool)
        info = x.VDI.get_nbd_info(vdi)[1]
        r, out = qemu_convert(tmp_path, info, purpose == "nbd")
        assert r.returncode == 0, r.stderr
        assert sha(out) == pool.vdi_content(vdi).sha256()
        if purpose == "insecure_nbd":                        # the nbd:// URI form
            out2 = tmp_path / "uri.raw"
            r = tool(["qemu-img", "convert", "-f", "raw", "-O", "raw", nbd.uri(info), str(out2)])
            assert r.returncode == 0, r.stderr
            assert sha(out2) == sha(out)


def test_qemu_img_cannot_read_xapis_server(tmp_path):
    """qemu's client falls back from NBD_OPT_GO to NBD_OPT_LIST to check the
    export exists, and xapi-nbd's server denies the list (its names are
    secrets): qemu-img cannot read from a real XAPI host's NBD server."""
    need("qemu-img")
    with started(purpose="insecure_nbd", protocol="xapi") as (pool, x, s):
        info = x.VDI.get_nbd_info(vdi_of(pool))[0]
        r, out = qemu_convert(tmp_path, info, False)
        assert r.returncode != 0
        assert "Denied by server for option 3 (list)" in r.stderr
