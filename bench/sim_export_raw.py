#!/usr/bin/env python3
"""How fast does the simulator serve a raw VDI export?  (run on demand)

A pool with one 20 GiB sparse VDI; GET /export_raw_vdi?format=raw with
``curl -o /dev/null``, ``curl -o FILE`` (a temp dir on the disk holding
--dir, deleted afterwards) and a plain Python reader, next to the machine's own
``dd if=/dev/zero of=FILE bs=1M count=N conv=fdatasync`` write rate (N: the same size), so a reader sees
whether the simulator or the machine is the bottleneck.

    python3 bench/sim_export_raw.py [--size-gib 20] [--dir /var/tmp] [--tls]
"""
import argparse
import http.client
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import xapisim  # noqa: E402
from xapisim import pools  # noqa: E402

MIB = 1 << 20


def mbps(nbytes, seconds):
    return nbytes / MIB / seconds if seconds > 0 else float("inf")


def timed(argv):
    t = time.time()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.time() - t


def python_reader(url, expect, cafile=None, out=None):
    u = urllib.parse.urlsplit(url)
    if u.scheme == "https":
        ctx = ssl.create_default_context(cafile=cafile)
        conn = http.client.HTTPSConnection(u.hostname, u.port, context=ctx)
    else:
        conn = http.client.HTTPConnection(u.hostname, u.port)
    t = time.time()
    conn.request("GET", u.path + "?" + u.query)
    resp = conn.getresponse()
    buf = bytearray(8 * MIB)
    view = memoryview(buf)
    n = 0
    f = open(out, "wb") if out else None
    while True:
        k = resp.readinto(buf)
        if not k:
            break
        if f:
            f.write(view[:k])
        n += k
    resp.close()
    conn.close()
    if f:
        f.flush()
        os.fsync(f.fileno())
        f.close()
    dt = time.time() - t
    assert n == expect, (n, expect)
    return dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gib", type=float, default=20.0)
    ap.add_argument("--dir", default=None, help="where curl -o FILE and dd write (default: tempdir)")
    ap.add_argument("--dd-mib", type=int, default=None,
                    help="MiB written by dd (default: the VDI's size, like curl -o FILE)")
    ap.add_argument("--tls", action="store_true")
    args = ap.parse_args()
    size = int(args.size_gib * (1 << 30))
    if args.dd_mib is None:
        args.dd_mib = size // MIB
    desc = pools.simple_pool(vms=[{"name": "big", "disks": [
        {"name": "big disk", "size": size, "blocks": [0, 1, 1000, (size >> 16) - 1]}]}])
    desc["srs"][0]["size"] = "1T"
    pool = xapisim.start_pool(desc, tls=args.tls)
    tmp = tempfile.mkdtemp(prefix="simbench-", dir=args.dir)
    try:
        s = pool.session()
        vdi = pool.vm_disks("big")["xvda"]
        url = "%sexport_raw_vdi?session_id=%s&vdi=%s&format=raw" % (pool.url, s._session, vdi)
        curl = ["curl", "-sSf"] + (["--cacert", pool.cert_path] if args.tls else [])
        print("simulated VDI: %.1f GiB raw, %s" % (size / float(1 << 30), pool.url))
        rows = []
        dt = timed(curl + ["-o", "/dev/null", url])
        rows.append(("curl -o /dev/null", mbps(size, dt), dt))
        dt = python_reader(url, size, pool.cert_path)
        rows.append(("python http.client readinto", mbps(size, dt), dt))
        out = os.path.join(tmp, "disk.raw")
        t = time.time()
        subprocess.run(curl + ["-o", out, url], check=True)
        fd = os.open(out, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        dt = time.time() - t
        got = os.path.getsize(out)
        os.remove(out)
        assert got == size, (got, size)
        rows.append(("curl -o FILE (+fsync)", mbps(size, dt), dt))
        dt = python_reader(url, size, pool.cert_path, out=out)
        os.remove(out)
        rows.append(("python http.client readinto -> FILE (8 MiB writes, +fsync)", mbps(size, dt), dt))
        dd_file = os.path.join(tmp, "dd.bin")
        dt = timed(["dd", "if=/dev/zero", "of=" + dd_file, "bs=1M", "count=%d" % args.dd_mib,
                    "conv=fdatasync"])
        os.remove(dd_file)
        rows.append(("dd if=/dev/zero of=FILE bs=1M (%d MiB, fdatasync)" % args.dd_mib,
                     mbps(args.dd_mib * MIB, dt), dt))
        dt = timed(["dd", "if=/dev/zero", "of=/dev/null", "bs=1M", "count=%d" % (size // MIB)])
        rows.append(("dd if=/dev/zero of=/dev/null bs=1M (same size)", mbps(size, dt), dt))
        s.xenapi.session.logout()
        print("%-60s %10s %9s" % ("reader", "MB/s", "seconds"))
        for name, rate, dt in rows:
            print("%-60s %10.0f %9.2f" % (name, rate, dt))
        print("(MB = MiB; the VDI is sparse, so the simulator sends shared zero buffers)")
    finally:
        pool.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
