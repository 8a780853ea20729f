#!/usr/bin/env python3
"""vmbackup.py (api transport) vs `curl -o` of the same URL, alternating  (run on demand)

A simulated pool (xapisim, in this process) with one halted VM whose one VDI has
every block allocated (--dense-mib, default 1024).  Each round runs, one after the
other, the whole vmbackup.py run (a subprocess: login, snapshot, export, sha256,
manifest, fsync) and `curl -sS -o FILE` of the same export URL followed by an fsync
of curl's file (vmbackup fsyncs its own), for a raw VDI export (-E --vdi-format raw)
and an XVA export (-e).  The order alternates each round.  Reported: the median wall
time of each, the ratio of medians (vmbackup MB/s / curl MB/s), and CPU seconds per
GiB of each child (user+sys from getrusage(RUSAGE_CHILDREN); the simulator's own
CPU is this process's and is not counted).  The load average is printed before and
after: on a shared machine read the ratios, not the absolute rates.

    python3 bench/stream_vs_curl.py [--dense-mib 1024] [--rounds 3] [--tls] [--dir /var/tmp]
"""
import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import vmbackup_export  # noqa: E402
from vmbackup_export import Bench, description, fsync_file, xapisim  # noqa: E402

MIB = 1 << 20
#: Which vmbackup.py to run: VMBACKUP_PY=path compares another build (e.g. an older one).
VMBACKUP = os.environ.get("VMBACKUP_PY", vmbackup_export.VMBACKUP)
GIB = 1 << 30


def child_run(argv):
    """Run argv; return (wall s, child CPU s)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.monotonic()
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True)
    wall = time.monotonic() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit("%s failed (exit %d):\n%s" % (argv[0], proc.returncode, proc.stdout))
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


class Runner:
    def __init__(self, bench, work, tls):
        self.bench, self.work, self.tls = bench, work, tls
        self.count = 0

    def vmbackup(self, select):
        self.count += 1
        backup_dir = os.path.join(self.work, "vmbackup-%d" % self.count)
        os.mkdir(backup_dir)
        argv = [sys.executable, VMBACKUP] + self.bench.vmbackup_argv(backup_dir, select) + ["-q"]
        if self.tls:
            argv += ["--tls-fingerprint", self.bench.pool.cert_sha256]
        os.sync()
        result = child_run(argv)
        shutil.rmtree(backup_dir)
        return result

    def curl(self, url):
        out = os.path.join(self.work, "curl-out")
        argv = ["curl", "-sS", "--fail", "-o", out, url]
        if self.tls:
            argv[1:1] = ["--cacert", self.bench.pool.cert_path]
        os.sync()
        began = time.monotonic()
        _, cpu = child_run(argv)
        fsync_file(out)
        wall = time.monotonic() - began
        os.unlink(out)
        return wall, cpu


def measure(runner, select, url, rounds):
    """Alternate vmbackup and curl `rounds` times; return {"vmbackup": [(wall, cpu)], "curl": [...]}."""
    runs = {"vmbackup": [], "curl": []}
    for i in range(rounds):
        order = ("vmbackup", "curl") if i % 2 == 0 else ("curl", "vmbackup")
        for who in order:
            runs[who].append(runner.vmbackup(select) if who == "vmbackup" else runner.curl(url))
    return runs


def row(title, size, runs):
    v_wall = statistics.median(w for w, _ in runs["vmbackup"])
    c_wall = statistics.median(w for w, _ in runs["curl"])
    v_cpu = statistics.median(c for _, c in runs["vmbackup"]) / (size / GIB)
    c_cpu = statistics.median(c for _, c in runs["curl"]) / (size / GIB)
    return "%-22s %6.0f %8.2fs %6.0f %8.2fs %6.0f %6.2f %8.2f %8.2f %6.2f" % (
        title, size / MIB, v_wall, size / MIB / v_wall, c_wall, size / MIB / c_wall,
        c_wall / v_wall, v_cpu, c_cpu, v_cpu / c_cpu if c_cpu else float("inf"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tls", action="store_true", help="HTTPS (vmbackup pins the certificate)")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--only", default="raw,xva")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="vmbackup-stream-", dir=args.dir)
    lines = []
    load_before = os.getloadavg()
    try:
        with xapisim.start_pool(description(0.001, args.dense_mib), tls=args.tls) as pool:
            bench = Bench(pool, work, args)
            runner = Runner(bench, work, args.tls)
            vdi = bench.vdi_ref("dense-vm")
            size = int(bench.xapi.VDI.get_virtual_size(vdi))
            cases = [("raw", "dense raw (-E)", ["-E", "dense-vm", "--vdi-format", "raw"],
                      bench.url("/export_raw_vdi", vdi=vdi, format="raw")),
                     ("xva", "dense .xva (-e)", ["-e", "dense-vm"],
                      bench.url("/export", ref=bench.vm_ref("dense-vm")))]
            for key, title, select, url in cases:
                if key in args.only.split(","):
                    sys.stderr.write("running %s, %d rounds ...\n" % (title, args.rounds))
                    lines.append(row(title, size, measure(runner, select, url, args.rounds)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    print("%s, %d CPUs, python %s; load average %.2f before, %.2f after; medians of %d rounds"
          % ("HTTPS" if args.tls else "HTTP", os.cpu_count() or 0, sys.version.split()[0],
             load_before[0], load_after[0], args.rounds))
    print("%-22s %6s %9s %6s %9s %6s %6s %8s %8s %6s" % (
        "case", "MiB", "vmbackup", "MB/s", "curl+fsync", "MB/s", "ratio", "vmb CPU", "curl CPU",
        "CPU x"))
    for line in lines:
        print(line)
    print("ratio = curl median wall / vmbackup median wall (>= 0.9 is the target);"
          " CPU = CPU seconds per GiB; CPU x = vmbackup's / curl's (<= 1.5 is the target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
