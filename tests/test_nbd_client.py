"""vmbackup's NBD client (vmbackup.nbd) against the simulator's xapi-nbd stand-in,
through the real XenAPI client's get_nbd_info, and against nbdkit (a real NBD server
nobody here wrote) for interop."""
import os
import shutil
import socket
import subprocess
import time

import pytest

import xapisim
from xapisim import pools
from vmbackup import NbdClient, NbdError, connect_info


BLOCK = 65536
VMS = [{"name": "a", "disks": [{"size": "4M", "blocks": [0, 3, 40, 63]}]}]


def pool_with(purpose):
    return xapisim.start_pool(pools.simple_pool(vms=VMS, nbd={"purpose": purpose}))


def nbd_info(pool):
    vdi = list(pool.vm_disks("a").values())[0]
    x = pool.session().xenapi
    return vdi, x.VDI.get_nbd_info(vdi)[0]


@pytest.mark.parametrize("purpose", ["nbd", "insecure_nbd"])
def test_reads_the_snapshot_bytes(purpose):
    with pool_with(purpose) as pool:
        vdi, info = nbd_info(pool)
        disk = pool.vdi_content(vdi)
        if purpose == "insecure_nbd":
            info["cert"] = ""   # the pool serves plain NBD there, whatever get_nbd_info lists
        with connect_info(info, allow_insecure=True) as c:
            assert c.tls == (purpose == "nbd")
            assert c.size == disk.virtual_size
            for off, n in ((0, 4096), (3 * BLOCK - 512, 2 * BLOCK), (40 * BLOCK, BLOCK),
                           (0, c.size)):
                assert c.read(off, n) == disk.read(off, n)
        assert pool.nbd.log[-1].tls == (purpose == "nbd")


def test_plain_nbd_needs_consent():
    with pool_with("insecure_nbd") as pool:
        _, info = nbd_info(pool)
        info["cert"] = ""
        with pytest.raises(NbdError, match="insecure"):
            connect_info(info)


def test_a_different_certificate_is_refused(tmp_path):
    other = tmp_path / "other"
    subprocess.check_call(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                           "-keyout", str(other) + ".key", "-out", str(other) + ".pem",
                           "-days", "2", "-subj", "/CN=localhost"],
                          stderr=subprocess.DEVNULL)
    with pool_with("nbd") as pool:
        _, info = nbd_info(pool)
        info["cert"] = (tmp_path / "other.pem").read_text()
        with pytest.raises(NbdError, match="certificate"):
            connect_info(info)
        info2 = nbd_info(pool)[1]
        info2["subject"] = "not-the-host.example"
        with pytest.raises(NbdError, match="TLS"):
            connect_info(info2)


def test_dropped_connection_is_an_error():
    with pool_with("insecure_nbd") as pool:
        _, info = nbd_info(pool)
        info["cert"] = ""
        pool.faults.drop_nbd(after_bytes=70000)
        with connect_info(info, allow_insecure=True) as c:
            with pytest.raises(NbdError, match="closed"):
                c.read(0, 4 * BLOCK)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, proc):
    for _ in range(500):
        if proc.poll() is not None:
            raise AssertionError("nbdkit exited %s" % proc.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.01)  # polling a real server's listen socket, not a guess
    raise AssertionError("nbdkit did not listen")


def test_interop_with_nbdkit(tmp_path):
    if shutil.which("nbdkit") is None:
        pytest.skip("nbdkit is not installed")
    data = os.urandom(3 * BLOCK) + bytes(BLOCK * 5)
    disk = tmp_path / "disk.raw"
    disk.write_bytes(data)
    port = free_port()
    proc = subprocess.Popen(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port),
                             "--exportname=/vdi?session_id=x", "file", str(disk)])
    try:
        wait_listening(port, proc)
        with NbdClient("127.0.0.1", port, "/vdi?session_id=x") as c:
            assert c.size == len(data)
            assert c.read(BLOCK - 512, 2 * BLOCK) == data[BLOCK - 512:3 * BLOCK - 512]
            assert c.read(0, len(data)) == data
    finally:
        proc.terminate()
        proc.wait()
