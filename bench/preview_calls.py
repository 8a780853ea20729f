#!/usr/bin/env python3
"""How much of the pool does a preview read?  XAPI calls and wall time  (run on demand)

Simulated pools of 2,000 and 10,000 VMs (xapisim pools.large_pool: one disk, one VIF
each).  For each: the wall time of one bare `VM.get_all_records` (median of --rounds,
over XML-RPC from a subprocess, like vmbackup), then `vmbackup.py --preview` (the whole
process: login, read_pool, selection, plan) of one named VM and of a regex matching 10 %
of the VMs: the XAPI calls it made and its median wall time as a ratio to the bare call.

    python3 bench/preview_calls.py [--sizes 2000,10000] [--rounds 3]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VMBACKUP = os.environ.get("VMBACKUP_PY", os.path.join(ROOT, "vmbackup.py"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import xapisim  # noqa: E402
from xapisim import pools  # noqa: E402

BARE = """
import sys, time, xmlrpc.client
proxy = xmlrpc.client.ServerProxy(sys.argv[1], allow_none=True)
s = proxy.session.login_with_password(sys.argv[2], sys.argv[3])["Value"]
t = time.monotonic()
n = len(proxy.VM.get_all_records(s)["Value"])
print(time.monotonic() - t, n)
proxy.session.logout(s)
"""


def bare_seconds(pool):
    out = subprocess.run([sys.executable, "-c", BARE, pool.url, pool.user, pool.password],
                         stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout
    return float(out.split()[0])


def preview(pool, pwfile, work, selector):
    """Run vmbackup --preview; return (wall s, XAPI calls, VMs selected)."""
    pool.calls.clear()
    began = time.monotonic()
    proc = subprocess.run([sys.executable, VMBACKUP, "--transport", "api", "--server", pool.url,
                           "--password-file", pwfile, "-d", work, "-e", selector, "--preview",
                           "--json", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True)
    wall = time.monotonic() - began
    if proc.returncode not in (0, 1):
        raise SystemExit("vmbackup failed (exit %d):\n%s" % (proc.returncode, proc.stderr))
    import json
    return wall, pool.calls.count(), len(json.loads(proc.stdout)["vms"])


def one_pool(n, rounds, work):
    rows = []
    with xapisim.start_pool(pools.large_pool(n)) as pool:
        pwfile = os.path.join(work, "pw")
        with open(pwfile, "w") as f:
            f.write(pool.password + "\n")
        os.chmod(pwfile, 0o600)
        tenth = "vm-0[01][0-9][0-9]$" if n == 2000 else \
            "vm-0[0-9][0-9][0-9]$" if n == 10000 else "vm-0[0-9][0-9]$"
        cases = [("one named VM", "vm-%04d" % (n // 2)), ("regex, 10 %", tenth)]
        bare = statistics.median(bare_seconds(pool) for _ in range(rounds))
        for title, selector in cases:
            runs = [preview(pool, pwfile, work, selector) for _ in range(rounds)]
            wall = statistics.median(r[0] for r in runs)
            rows.append("%6d  %-14s %5d VMs %6d calls %8.2fs %8.2fs %6.2fx" % (
                n, title, runs[0][2], runs[0][1], wall, bare, wall / bare))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2000,10000")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="vmbackup-preview-") as work:
        for n in (int(s) for s in args.sizes.split(",")):
            sys.stderr.write("pool of %d VMs ...\n" % n)
            rows += one_pool(n, args.rounds, work)
    print("%d CPUs, load average %.2f before, %.2f after; medians of %d rounds" % (
        os.cpu_count() or 0, load, os.getloadavg()[0], args.rounds))
    print("%6s  %-14s %9s %12s %9s %9s %7s" % ("VMs", "preview of", "selected", "XAPI calls",
                                              "preview", "VM.gar", "ratio"))
    for row in rows:
        print(row)
    print("VM.gar = one bare VM.get_all_records (XML-RPC, its own process); ratio = preview / VM.gar"
          " (target <= 1.5 for one named VM)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
