#!/usr/bin/env python3
"""What does a delta-export move, and how long does it take, next to a full?  (run on demand)

A simulated pool with one VM whose disk is a big sparse VDI (--size-gib, default 20) with
some data; vmbackup.py (the built file, a real process, transport api) makes the chain's
full, then --changed-percent (default 1) of the disk's 64 KiB blocks are rewritten at
scattered places and vmbackup.py makes a delta. Twice: over NBD (CBT + NBD, TLS) and
over the differencing export (CBT, no network with an NBD purpose). Printed side by side:

* bytes moved by the delta run / the changed bytes, rounded up to what the method can
  fetch: 64 KiB blocks over NBD (target <= 1.1), 2 MiB VHD blocks over the differencing
  export (XAPI sends whole blocks; target <= 1.1); and the NBD bytes / the bytes the
  differencing export would have needed (what reading only CBT's ranges saves);
* wall time of the delta run / the full run (target <= 5 %);
* with --restore: the time to restore the last point of a 7-point chain / the full.

    python3 bench/delta_export.py [--size-gib 20] [--changed-percent 1] [--dir /var/tmp] [--restore] [--log]
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import xapisim  # noqa: E402
from xapisim import pools  # noqa: E402

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
BLOCK = 64 * KIB
VHD_BLOCK = 2 * MIB
VMBACKUP = os.path.join(ROOT, "vmbackup.py")


def vmbackup(pool, workdir, *args):
    """Run vmbackup.py against `pool`; return (seconds, output)."""
    pw = os.path.join(workdir, "pw")
    with open(pw, "w") as f:
        f.write(pool.password + "\n")
    os.chmod(pw, 0o600)
    env = dict(os.environ, **pool.env())
    began = time.monotonic()
    proc = subprocess.run([sys.executable, VMBACKUP] + list(args) + [
        "--transport", "api", "--server", pool.url, "--password-file", pw],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, env=env)
    took = time.monotonic() - began
    if proc.returncode not in (0, 1):
        sys.exit("vmbackup %s failed:\n%s" % (args, proc.stdout))
    return took, proc.stdout


def scatter(pool, vdi, nblocks, percent, seed):
    """Rewrite `percent` % of the disk's 64 KiB blocks at random places; return their indices."""
    rnd = random.Random(seed)
    chosen = sorted(rnd.sample(range(nblocks), max(1, int(nblocks * percent / 100.0))))
    for i in chosen:
        pool.write_vdi(vdi, i * BLOCK, rnd.getrandbits(8 * 64).to_bytes(64, "big") * (BLOCK // 64))
    return chosen


def moved(pool):
    """(bytes sent over NBD, bytes sent by /export_raw_vdi) so far."""
    return (sum(c.bytes_sent for c in pool.nbd.log),
            sum(r.bytes_sent for r in pool.calls.http if r.path.startswith("/export_raw_vdi")))


def one_mode(args, nbd, workdir):
    size = args.size_gib * GIB
    nblocks = size // BLOCK
    desc = pools.simple_pool(vms=[{"name": "big", "power_state": "Running",
                                   "disks": [{"size": "%dG" % args.size_gib,
                                              "blocks": list(range(0, nblocks, 97))}]}],
                             **({"nbd": {"purpose": "nbd"}} if nbd else {}))
    backup_dir = tempfile.mkdtemp(prefix="delta-bench-", dir=args.dir)
    try:
        with xapisim.start_pool(desc) as pool:
            vdi = pool.vm_disks("big")["xvda"]
            sel = ["-D", "big:20", "-d", backup_dir]
            full_s, _ = vmbackup(pool, workdir, *sel)
            changed = scatter(pool, vdi, nblocks, args.changed_percent, 1)
            before = moved(pool)
            delta_s, out = vmbackup(pool, workdir, *sel)
            after = moved(pool)
            if args.log:
                print(out)
            points = sorted(n for n in os.listdir(os.path.join(backup_dir, "big")))
            with open(os.path.join(backup_dir, "big", points[-1], "backup.json")) as f:
                method = json.load(f)["disks"][0]["chain"]["method"]
            restore = None
            if args.restore:
                for i in range(5):
                    scatter(pool, vdi, nblocks, args.changed_percent, 2 + i)
                    vmbackup(pool, workdir, *sel)
                points = sorted(os.listdir(os.path.join(backup_dir, "big")))
                first, _ = vmbackup(pool, workdir, "restore",
                                    os.path.join(backup_dir, "big", points[0]))
                last, _ = vmbackup(pool, workdir, "restore",
                                   os.path.join(backup_dir, "big", points[-1]))
                restore = (len(points), first, last)
    finally:
        shutil.rmtree(backup_dir, ignore_errors=True)
    blocks2m = len({i * BLOCK // VHD_BLOCK for i in changed})
    return {"method": method, "changed_64k": len(changed) * BLOCK, "changed_2m": blocks2m * VHD_BLOCK,
            "nbd": after[0] - before[0], "http": after[1] - before[1],
            "full_s": full_s, "delta_s": delta_s, "restore": restore}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=int, default=20)
    parser.add_argument("--changed-percent", type=float, default=1.0)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the backups go")
    parser.add_argument("--log", action="store_true", help="print the delta runs' logs")
    parser.add_argument("--restore", action="store_true",
                        help="also restore the 7th point and the full of a 7-point chain")
    args = parser.parse_args()
    if not os.path.exists(VMBACKUP):
        sys.exit("build vmbackup.py first: python3 tools/build.py")
    workdir = tempfile.mkdtemp(prefix="delta-bench-")
    try:
        rows = [("NBD (CBT + NBD)", one_mode(args, True, workdir)),
                ("differencing export (CBT, no NBD)", one_mode(args, False, workdir))]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("%d GiB sparse VDI, %.1f%% of its 64 KiB blocks changed, scattered" %
          (args.size_gib, args.changed_percent))
    print("| path | method | changed (64 KiB / 2 MiB blocks) | moved | moved / changed | "
          "full run | delta run | delta / full |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        moved_bytes = r["nbd"] or r["http"]
        unit = r["changed_64k"] if r["nbd"] else r["changed_2m"]
        print("| %s | %s | %.1f / %.1f MiB | %.1f MiB | %.3f | %.1f s | %.1f s | %.3f |" % (
            name, r["method"], r["changed_64k"] / MIB, r["changed_2m"] / MIB, moved_bytes / MIB,
            moved_bytes / float(unit), r["full_s"], r["delta_s"], r["delta_s"] / r["full_s"]))
    nbd, diff = rows[0][1], rows[1][1]
    if nbd["nbd"] and diff["http"]:
        print("NBD moved %.3f of what the differencing export moved for the same change"
              % (nbd["nbd"] / float(diff["http"])))
    for name, r in rows:
        if r["restore"]:
            n, first, last = r["restore"]
            print("%s: restore of point %d %.1f s, of the full %.1f s: %.2f" % (
                name, n, last, first, last / first))


if __name__ == "__main__":
    main()
