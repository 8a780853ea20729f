#!/usr/bin/env python3
"""Parallel backups: wall time of 16 VMs at -j 1, 4 and 8, and peak RSS  (run on demand)

A simulated pool (xapisim, in this process) of 4 hosts; 16 halted VMs, 4 per host, each
with one dense disk (--mib, default 32) on its host's local SR, so each export is
served by that host (XAPI redirects /export there). Every export stream is throttled by
the simulator to --rate (default 20 MB/s), so the disk and the CPU are not the limit:
the wall time shows how many exports run at once. Each case is the whole vmbackup.py run
(a subprocess, api transport, -e 'vm..'):

  -j 1                                  the baseline
  -j 4                                  target: >= 3.5x the baseline
  -j 8                                  (jobs_per_host=2 default: 8 at once on 4 hosts)
  -j 8 --jobs-per-host 1                the expected cap: 4 at once, one per host

Reported per case: wall seconds (median of --rounds), speed-up over -j 1 measured in the
same run, the most exports the simulator served at once (in all, and on one host), and
the peak RSS of the vmbackup.py process (ru_maxrss from wait4). Then, unthrottled, the
peak RSS of an export of --rss-mib (default 1024) dense MiB per VM at -j 1 (one VM) and
-j 4 (four VMs at once): memory must stay flat, under 64 MB, whatever the size and -j.

    python3 bench/jobs_scaling.py [--mib 32] [--rate 20] [--rounds 1] [--rss-mib 1024]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from vmbackup_export import BLOCK, MIB, VMBACKUP, pools, xapisim  # noqa: E402

HOSTS = ("b1", "b2", "b3", "b4")
EXPORTS = ("/export",)


def description(nvms, mib):
    vms = []
    for i in range(nvms):
        host = HOSTS[i % len(HOSTS)]
        vms.append({"name": "vm%02d" % i, "host": host, "power_state": "Halted",
                    "disks": [{"size": mib * MIB, "blocks": list(range(mib * MIB // BLOCK)),
                               "sr": "local:" + host}]})
    desc = pools.simple_pool(vms=vms, hosts=HOSTS)
    for sr in desc["srs"]:
        sr["size"] = "%dG" % (nvms * mib * 4 // 1024 + 10)
    return desc


#: Runs argv and prints its peak RSS. The high-water mark (ru_maxrss) survives exec, so
#: a child forked straight from this process (the simulator's, ~100 MB) would report
#: this process's size: the small launcher forks it instead.
LAUNCHER = ("import os, subprocess, sys\n"
            "proc = subprocess.Popen(sys.argv[1:])\n"
            "_, status, usage = os.wait4(proc.pid, 0)\n"
            "sys.stdout.write('\\nMAXRSS %d\\n' % usage.ru_maxrss)\n"
            "sys.exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)\n")


def run(pool, pwfile, work, args):
    """Run vmbackup.py with `args`; return (wall s, its peak RSS in bytes)."""
    backup_dir = tempfile.mkdtemp(dir=work)
    argv = [sys.executable, "-c", LAUNCHER, sys.executable, VMBACKUP, "--server", pool.url,
            "--password-file", pwfile, "--transport", "api", "-d", backup_dir,
            "--space-threshold", "0", "-q", "--stall-timeout", "600"] + [str(a) for a in args]
    pool.calls.clear()
    os.sync()
    began = time.monotonic()
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True)
    wall = time.monotonic() - began
    shutil.rmtree(backup_dir)
    if proc.returncode != 0:
        raise SystemExit("vmbackup %s failed (exit %d):\n%s" % (args, proc.returncode, proc.stdout))
    return wall, int(proc.stdout.rsplit("MAXRSS ", 1)[1]) * 1024


def password_file(pool, work):
    path = os.path.join(work, "xapi.pw")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(pool.password + "\n")
    return path


CASES = [("-j 1", ["-j", 1]), ("-j 4", ["-j", 4]), ("-j 8", ["-j", 8]),
         ("-j 8, jobs_per_host=1", ["-j", 8, "--jobs-per-host", 1])]


def scaling(args, work):
    rows = []
    with xapisim.start_pool(description(16, args.mib)) as pool:
        pool.faults.throttle(args.rate * 1e6)
        pwfile = password_file(pool, work)
        walls = {name: [] for name, _ in CASES}
        rss = {name: 0 for name, _ in CASES}
        at_once = {}
        for _ in range(args.rounds):
            for name, extra in CASES:
                wall, peak = run(pool, pwfile, work, ["-e", "vm.."] + extra)
                walls[name].append(wall)
                rss[name] = max(rss[name], peak)
                at_once[name] = (pool.calls.most_at_once(EXPORTS),
                                 pool.calls.most_at_once(EXPORTS, key=lambda r: r.host))
        base = statistics.median(walls["-j 1"])
        for name, _ in CASES:
            wall = statistics.median(walls[name])
            rows.append((name, wall, base / wall, at_once[name][0], at_once[name][1], rss[name]))
    return rows


def rss_case(args, work):
    rows = []
    with xapisim.start_pool(description(4, args.rss_mib)) as pool:
        pwfile = password_file(pool, work)
        for name, select in (("-j 1, 1 VM", ["-e", "vm00", "-j", 1]),
                             ("-j 4, 4 VMs", ["-e", "vm0[0-3]", "-j", 4, "--jobs-per-host", 0])):
            wall, peak = run(pool, pwfile, work, select)
            rows.append((name, wall, peak, pool.calls.most_at_once(EXPORTS)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=32, help="dense MiB per VM (16 VMs)")
    parser.add_argument("--rate", type=float, default=20, help="MB/s per export stream")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--rss-mib", type=int, default=1024, help="0: skip the RSS case")
    parser.add_argument("--dir", default=None, help="where the backups go (deleted after)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="vmbackup-jobs-", dir=args.dir)
    load = os.getloadavg()[0]
    try:
        rows = scaling(args, work)
        rss_rows = rss_case(args, work) if args.rss_mib else []
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("16 VMs x %d MiB dense on 4 hosts, exports throttled to %g MB/s each; %d CPUs, "
          "python %s; load average %.2f before, %.2f after; medians of %d rounds"
          % (args.mib, args.rate, os.cpu_count() or 0, sys.version.split()[0], load,
             os.getloadavg()[0], args.rounds))
    print("%-24s %8s %8s %9s %9s %9s" % ("case", "wall s", "speed-up", "at once", "per host",
                                         "peak RSS"))
    for name, wall, ratio, once, per_host, peak in rows:
        print("%-24s %8.1f %7.2fx %9d %9d %7.1f MB" % (name, wall, ratio, once, per_host,
                                                       peak / 1e6))
    if rss_rows:
        print("\nunthrottled, %d MiB dense per VM:" % args.rss_mib)
        print("%-24s %8s %9s %9s" % ("case", "wall s", "at once", "peak RSS"))
        for name, wall, peak, once in rss_rows:
            print("%-24s %8.1f %9d %7.1f MB" % (name, wall, once, peak / 1e6))
    print("target: -j 4 >= 3.5x -j 1; jobs_per_host=1 caps at 4 at once (4 hosts); "
          "peak RSS < 64 MB")


if __name__ == "__main__":
    main()
