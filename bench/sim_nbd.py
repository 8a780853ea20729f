#!/usr/bin/env python3
"""How fast does the simulator's NBD server serve a dense VDI?  (run on demand)

A pool with one dense VDI (every 64 KiB block holds data, 4 GiB by default) is
read with ``nbdcopy URI null:`` from the simulator's NBD server -- as xapi-nbd
speaks (``protocol: xapi``: one connection, simple replies) and in the
``extended`` protocol (multi-conn, structured replies) -- and, in the same run,
from ``nbdkit file`` serving the same bytes (written to a file under --dir
first, read once so it sits in the page cache), with nbdcopy's default
connections and with one connection.  Prints MiB/s and the ratios.

    python3 bench/sim_nbd.py [--size 4G] [--dir /var/tmp] [--tls] [--runs 1]
"""
import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import xapisim  # noqa: E402
from xapisim import model, nbd, pools  # noqa: E402

MIB = 1 << 20


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def nbdcopy(uri, connections=None):
    argv = ["nbdcopy"]
    if connections:
        argv.append("--connections=%d" % connections)
    argv += [uri, "null:"]
    t = time.time()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.time() - t


def wait_listening(port, proc, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("nbdkit exited: %s" % proc.stderr.read())
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nbdkit did not start")


def sim_uri(pool, tls, cadir):
    s = pool.session()
    vdi = list(pool.vm_disks("dense").values())[0]
    info = s.xenapi.VDI.get_nbd_info(vdi)[0]
    uri = nbd.uri(info, tls=tls)
    if tls:
        uri += "?tls-certificates=" + cadir
    return uri, vdi


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="4G", help="VDI size (4G, 512M, ...)")
    ap.add_argument("--dir", default="/var/tmp", help="where nbdkit's copy of the bytes goes")
    ap.add_argument("--tls", action="store_true", help="TLS on both servers")
    ap.add_argument("--runs", type=int, default=1)
    a = ap.parse_args()
    for t in ("nbdcopy", "nbdkit"):
        if shutil.which(t) is None:
            sys.exit("%s is not installed" % t)
    size = model.parse_size(a.size)
    nblocks = (size + 65535) // 65536
    disk = {"size": size, "blocks": list(range(nblocks)), "seed": 7}
    work = tempfile.mkdtemp(prefix="sim-nbd-bench-", dir=a.dir)
    purpose = "nbd" if a.tls else "insecure_nbd"
    results = {}
    try:
        cert = nbd.certificate()
        cadir = os.path.join(work, "ca")
        os.mkdir(cadir)
        shutil.copy(cert["cert"], os.path.join(cadir, "ca-cert.pem"))
        pools_ = {}
        for proto in ("xapi", "extended"):
            desc = pools.simple_pool(vms=[{"name": "dense", "disks": [disk]}],
                                     nbd={"purpose": purpose, "protocol": proto})
            desc["srs"][0]["size"] = "%d" % (size * 4)
            pools_[proto] = xapisim.start_pool(desc)
        pool = pools_["xapi"]
        content = pool.vdi_content(list(pool.vm_disks("dense").values())[0])
        path = os.path.join(work, "disk.raw")
        t = time.time()
        with open(path, "wb") as f:
            for chunk in content.iter_raw(8 * MIB):
                f.write(chunk)
        print("wrote %s (%d MiB) for nbdkit in %.1f s" % (path, size // MIB, time.time() - t))
        subprocess.run(["cat", path], check=True, stdout=subprocess.DEVNULL)   # page cache
        port = free_port()
        argv = ["nbdkit", "-f", "-r", "-i", "127.0.0.1", "-p", str(port), "--exportname=disk"]
        if a.tls:
            tdir = os.path.join(work, "nbdkit-tls")
            os.mkdir(tdir)
            shutil.copy(cert["cert"], os.path.join(tdir, "server-cert.pem"))
            shutil.copy(cert["key"], os.path.join(tdir, "server-key.pem"))
            shutil.copy(cert["cert"], os.path.join(tdir, "ca-cert.pem"))
            argv += ["--tls=require", "--tls-certificates=" + tdir]
        argv += ["file", path]
        kit = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_listening(port, kit)
            kit_uri = "%s://127.0.0.1:%d/disk" % ("nbds" if a.tls else "nbd", port)
            if a.tls:
                kit_uri += "?tls-certificates=" + cadir
            cases = [
                ("simulator, xapi protocol (1 connection)", sim_uri(pools_["xapi"], a.tls, cadir)[0], None),
                ("simulator, extended protocol (multi-conn)", sim_uri(pools_["extended"], a.tls, cadir)[0], None),
                ("nbdkit file (nbdcopy default connections)", kit_uri, None),
                ("nbdkit file (1 connection)", kit_uri, 1),
            ]
            for run in range(a.runs):
                for name, uri, conns in cases:
                    secs = nbdcopy(uri, conns)
                    results.setdefault(name, []).append(size / MIB / secs)
                    print("run %d  %-45s %8.0f MiB/s  (%.1f s)" % (run + 1, name, size / MIB / secs, secs))
        finally:
            kit.terminate()
            kit.wait(10)
        for p in pools_.values():
            p.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {k: max(v) for k, v in results.items()}
    names = list(best)
    print()
    print("%d MiB dense VDI, %s, best of %d run(s):" % (size // MIB, "TLS" if a.tls else "plain", a.runs))
    for k in names:
        print("  %-45s %8.0f MiB/s" % (k, best[k]))
    sx, se, kd, k1 = (best[n] for n in names)
    print("ratio simulator xapi / nbdkit 1 connection:        %.2f" % (sx / k1))
    print("ratio simulator extended / nbdkit default:          %.2f" % (se / kd))


if __name__ == "__main__":
    main()
