#!/usr/bin/env python3
"""How fast is vmbackup's api transport next to `curl -o FILE`?  (run on demand)

A simulated pool (xapisim) with two halted VMs:

  sparse-vm  one 20 GiB VDI with a few allocated 64 KiB blocks
  dense-vm   one ~1 GiB VDI with every block allocated

and three cases, each measured with the real vmbackup.py (a subprocess, the
whole run: login, snapshot, metadata, export, manifest, fsync) and with curl
on the same URL, one after the other, into a temp dir on one disk (deleted
afterwards):

  a) vmbackup.py -E sparse-vm --vdi-format raw   vs  curl -o /export_raw_vdi?vdi=...&format=raw
  b) vmbackup.py -e dense-vm   (.xva)            vs  curl -o /export?ref=<dense-vm>   (it is halted)
  c) vmbackup.py -E dense-vm --vdi-format raw    vs  curl -o /export_raw_vdi?vdi=...&format=raw

MB/s is virtual bytes (MiB) / wall seconds.  vmbackup fsyncs its files, curl does
not, so curl is shown both bare and followed by an fsync of its file; the ratio
uses the fsynced time.  "outside" is vmbackup's wall time minus the transfer
time it logs ("exported ... in N.Ns").  --profile also runs each vmbackup case
under `python -m cProfile` and prints where its time goes, phase by phase.

    python3 bench/vmbackup_export.py [--sparse-gib 20] [--dense-mib 1024] [--dir /var/tmp]
                                     [--profile] [--only a,b,c]

Measured on the development VM (2 vCPUs, shared with other test runs: expect
+-30 %), two runs, MB/s:

  case                         vmbackup   curl -o   curl -o + fsync   dd (fdatasync)
  a) sparse 20 GiB, raw        807 / 688  296 / 206    277 / 200        579 / 459
  b) dense 1 GiB, .xva         182 / 169  353 / 221    176 / 146
  c) dense 1 GiB, raw          254 / 330  628 / 526    251 / 237

vmbackup is never slower than curl once curl's file is fsynced too; bare curl returns
with its data still in the page cache.  The sparse case is CPU-bound on SHA-256 in
ApiTransport.stream (digest.update: ~65 % of the run under cProfile); with the
simulator on the same 2 CPUs, hashing in a second thread gains nothing.
"""
import argparse
import ast
import io
import json
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VMBACKUP = os.path.join(ROOT, "vmbackup.py")
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

import xapisim  # noqa: E402
from xapisim import pools  # noqa: E402

MIB = 1 << 20
BLOCK = 65536
EXPORTED_RE = re.compile(r"exported (?:disk \S+ to )?.*? \(.*?\) in (\d+\.\d+)s$")


def mbps(nbytes, seconds):
    return nbytes / MIB / seconds if seconds > 0 else float("inf")


def on_disk(path):
    return os.stat(path).st_blocks * 512


def fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def description(sparse_gib, dense_mib):
    sparse_size = int(sparse_gib * (1 << 30))
    dense_size = dense_mib * MIB
    nblocks = sparse_size // BLOCK
    sparse_blocks = sorted({0, 1, 2, nblocks // 3, nblocks // 2, nblocks - 1})
    desc = pools.simple_pool(vms=[
        {"name": "sparse-vm", "power_state": "Halted",
         "disks": [{"name": "sparse root", "size": sparse_size, "blocks": sparse_blocks}]},
        {"name": "dense-vm", "power_state": "Halted",
         "disks": [{"name": "dense root", "size": dense_size,
                    "blocks": list(range(dense_size // BLOCK))}]},
    ], hosts=("bench-host",))
    for sr in desc["srs"]:
        if sr.get("default"):
            sr["size"] = "%dG" % (4 * (sparse_gib + dense_mib / 1024.0) + 10)
    return desc


class Bench(object):
    def __init__(self, pool, work, args):
        self.pool, self.work, self.args = pool, work, args
        self.session = pool.session()
        self.xapi = self.session.xenapi
        self.pwfile = os.path.join(work, "xapi.pw")
        fd = os.open(self.pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(pool.password + "\n")

    def vm_ref(self, name):
        return self.pool.vm(name)[0]

    def vdi_ref(self, name):
        disks = self.pool.vm_disks(name)
        return disks[sorted(disks)[0]]

    def url(self, path, **query):
        query["session_id"] = self.session._session
        return self.pool.url.rstrip("/") + path + "?" + urllib.parse.urlencode(query)

    def vmbackup_argv(self, backup_dir, select):
        return ["--server", self.pool.url, "--password-file", self.pwfile, "--transport", "api",
                "-d", backup_dir, "--stall-timeout", "3600", "--space-threshold", "0",
                "--retries", "0"] + select

    def run_vmbackup(self, name, select):
        """Run vmbackup.py in a subprocess; return (wall s, transfer s, output file, log)."""
        backup_dir = os.path.join(self.work, "vmbackup-" + name)
        os.mkdir(backup_dir)
        os.sync()
        began = time.monotonic()
        proc = subprocess.run([sys.executable, VMBACKUP] + self.vmbackup_argv(backup_dir, select),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True)
        wall = time.monotonic() - began
        if proc.returncode != 0:
            raise SystemExit("vmbackup failed (exit %d):\n%s" % (proc.returncode, proc.stdout))
        transfer = sum(float(m.group(1)) for m in
                       (EXPORTED_RE.search(line) for line in proc.stdout.splitlines()) if m)
        files = [os.path.join(top, f) for top, _, names in os.walk(backup_dir) for f in names
                 if f.endswith((".raw", ".xva"))]
        assert len(files) == 1, files
        return wall, transfer, files[0], proc.stdout

    def run_curl(self, name, url):
        """curl -o FILE; return (wall s, wall s with an fsync of the file after, file)."""
        out = os.path.join(self.work, "curl-" + name)
        os.sync()
        began = time.monotonic()
        subprocess.run(["curl", "-sS", "--fail", "-o", out, url], check=True)
        bare = time.monotonic() - began
        fsync_file(out)
        return bare, time.monotonic() - began, out

    def profile_vmbackup(self, name, select):
        """Run vmbackup.py under `python -m cProfile` (its own process, like the timed run:
        the simulator's threads would otherwise share its GIL); return the top of the profile."""
        backup_dir = os.path.join(self.work, "profile-" + name)
        os.mkdir(backup_dir)
        prof = os.path.join(self.work, "profile-%s.prof" % name)
        os.sync()
        began = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "cProfile", "-o", prof, VMBACKUP]
                              + self.vmbackup_argv(backup_dir, select) + ["-q"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True)
        wall = time.monotonic() - began
        shutil.rmtree(backup_dir, ignore_errors=True)
        stats = pstats.Stats(prof, stream=io.StringIO())
        os.unlink(prof)
        text = io.StringIO()
        stats.stream = text
        stats.sort_stats("tottime").print_stats(10)
        return "vmbackup exit %d, %.1fs under cProfile%s\n%s\n\n%s" % (
            proc.returncode, wall, (":\n" + proc.stdout) if proc.returncode else "",
            phases(stats), _trim_pstats(text.getvalue()))

    def case(self, key, title, select, url, virtual):
        wall, transfer, vfile, vlog = self.run_vmbackup(key, select)
        vsize, vdisk = os.path.getsize(vfile), on_disk(vfile)
        os.unlink(vfile)        # free the space before curl writes its copy
        bare, synced, cfile = self.run_curl(key, url)
        csize, cdisk = os.path.getsize(cfile), on_disk(cfile)
        os.unlink(cfile)
        if vsize != csize:
            sys.stderr.write("warning: %s: vmbackup wrote %d bytes, curl %d\n" % (key, vsize, csize))
        row = {"case": key, "title": title, "virtual": virtual,
               "vmbackup_s": wall, "transfer_s": transfer, "outside_s": wall - transfer,
               "curl_s": bare, "curl_fsync_s": synced,
               "vmbackup_file": vsize, "vmbackup_on_disk": vdisk,
               "curl_file": csize, "curl_on_disk": cdisk}
        if self.args.verbose:
            sys.stdout.write(vlog)
        if self.args.profile:
            row["profile"] = self.profile_vmbackup(key, select)
        return row


def _qualnames(path):
    """{first line of a def: Class.method or function} for vmbackup.py as it is now."""
    names = {}

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if isinstance(child, ast.FunctionDef):
                    names[child.lineno] = name
                walk(child, name + ".")
    with open(path, encoding="utf-8") as f:
        walk(ast.parse(f.read()), "")
    return names


#: vmbackup's run cut into phases: (label, [function, -function, ...]) by cumulative time;
#: each function is a regex matched against the qualified names of vmbackup.py's defs.
PHASES = [
    ("backup_dir checks (write probe, df)", ["check_backup_dir"]),
    ("login + logout", ["login", "Xapi.logout"]),
    ("read pool (get_all_records)", ["read_pool"]),
    ("leftover scan", ["clean_leftovers"]),
    ("snapshot (take, tag, prepare)", [r".*snapshot\.__enter__", "ApiTransport.prepare_snapshot"]),
    ("VM metadata export + .cfg files", ["save_vm_metadata", "write_cfg_files"]),
    # stream() also carries the small metadata tar, so it is counted twice (ms): "the
    # rest" can come out a few ms below zero.
    ("TRANSFER: HTTP read + sha256 + write + fsync", ["ApiTransport.stream"]),
    ("export task create/wait/destroy", ["ApiTransport.download", "-ApiTransport.stream"]),
    ("fsync + rename of the export (partial_file)", ["partial_file.__exit__"]),
    ("XVA completeness check", ["xva_is_complete"]),
    ("snapshot destroy (+ check gone)", [r".*snapshot\.__exit__"]),
    ("manifest, .cfg/metadata sha256, marker", [
        "backup_vm", "-save_vm_metadata", "-write_cfg_files", "-export_with_retries",
        "-prune_vm_backups", "-check_space", "-new_backup_folder"]),
    ("retention (prune)", ["prune_vm_backups"]),
]


def phases(stats):
    """Return lines: seconds per PHASES entry, from a pstats.Stats of a vmbackup run."""
    names = _qualnames(VMBACKUP)
    cum, total = {}, 0.0
    for (filename, lineno, func), (_, _, tt, ct, _) in stats.stats.items():
        total += tt
        if os.path.abspath(filename) == VMBACKUP and lineno in names:
            cum[names[lineno]] = cum.get(names[lineno], 0.0) + ct
    main_s = cum.get("main", 0.0)
    rows = [("python start-up + imports (profiled)", total - main_s)]

    def seconds(spec):
        sign, pattern = (-1, spec[1:]) if spec.startswith("-") else (1, spec)
        return sign * sum(ct for name, ct in cum.items() if re.fullmatch(pattern, name))
    for label, funcs in PHASES:
        rows.append((label, sum(seconds(f) for f in funcs)))
    rows.append(("the rest (selection, lock, logging, status)", main_s - sum(r[1] for r in rows[1:])))
    width = max(len(r[0]) for r in rows)
    out = ["  %-*s %7.3fs" % (width, label, sec) for label, sec in rows]
    out.append("  %-*s %7.3fs   (outside the transfer: %.3fs)" % (
        width, "total", total, total - next(s for l, s in rows if l.startswith("TRANSFER"))))
    return "\n".join(out)


def _trim_pstats(text):
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return "\n".join(line.replace(ROOT + "/", "") for line in lines[start:] if line.strip())


def print_table(rows, out=sys.stdout):
    head = ("case", "virtual", "vmbackup", "MB/s", "curl -o", "MB/s", "+fsync", "MB/s",
            "ratio", "transfer", "outside")
    fmt = "%-34s %9s %9s %7s %9s %7s %9s %7s %6s %9s %8s\n"
    out.write(fmt % head)
    for r in rows:
        v = r["virtual"]
        vm, cb, cs = mbps(v, r["vmbackup_s"]), mbps(v, r["curl_s"]), mbps(v, r["curl_fsync_s"])
        out.write(fmt % (r["title"], "%.0fM" % (v / MIB), "%.2fs" % r["vmbackup_s"], "%.0f" % vm,
                         "%.2fs" % r["curl_s"], "%.0f" % cb, "%.2fs" % r["curl_fsync_s"],
                         "%.0f" % cs, "%.2f" % (vm / cs), "%.1fs" % r["transfer_s"],
                         "%.2fs" % r["outside_s"]))
    out.write("\nratio = vmbackup MB/s / (curl -o + fsync) MB/s;  transfer = what vmbackup logs as "
              "'exported ... in N.Ns';  outside = vmbackup wall - transfer\n")
    out.write("\nfiles (apparent size / physical size on disk, st_blocks*512):\n")
    for r in rows:
        out.write("  %-34s vmbackup %11d / %11d   curl %11d / %11d\n" % (
            r["title"], r["vmbackup_file"], r["vmbackup_on_disk"], r["curl_file"], r["curl_on_disk"]))


def dd_rate(work, mib):
    """The machine's own sequential write rate (dd conv=fdatasync), for reference."""
    path = os.path.join(work, "dd-test")
    os.sync()
    began = time.monotonic()
    subprocess.run(["dd", "if=/dev/zero", "of=" + path, "bs=1M", "count=%d" % mib,
                    "conv=fdatasync"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    seconds = time.monotonic() - began
    os.unlink(path)
    return mbps(mib * MIB, seconds)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparse-gib", type=float, default=20.0)
    ap.add_argument("--dense-mib", type=int, default=1024)
    ap.add_argument("--dir", default=None, help="where the temp dir goes (default: $TMPDIR or /tmp)")
    ap.add_argument("--only", default="a,b,c", help="cases to run, e.g. 'b,c'")
    ap.add_argument("--profile", action="store_true",
                    help="also run each vmbackup case under python -m cProfile")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    ap.add_argument("-v", "--verbose", action="store_true", help="show vmbackup's log")
    args = ap.parse_args()
    if not shutil.which("curl"):
        raise SystemExit("curl is needed (apt-get install curl)")
    only = set(args.only.split(","))
    work = tempfile.mkdtemp(prefix="vmbackup-bench-", dir=args.dir)
    rows = []
    try:
        free = shutil.disk_usage(work).free
        need = int(args.sparse_gib * (1 << 30)) + 3 * args.dense_mib * MIB
        if "a" in only and free < need:
            raise SystemExit("%s has %d MiB free; case a needs about %d MiB" % (work, free // MIB,
                                                                              need // MIB))
        sys.stdout.write("vmbackup %s vs curl %s; temp dir %s; python %s; %d CPUs\n" % (
            _version(), _curl_version(), work, sys.version.split()[0], os.cpu_count() or 0))
        with xapisim.start_pool(description(args.sparse_gib, args.dense_mib)) as pool:
            b = Bench(pool, work, args)
            sparse_vdi, dense_vdi = b.vdi_ref("sparse-vm"), b.vdi_ref("dense-vm")
            sparse_size = int(b.xapi.VDI.get_virtual_size(sparse_vdi))
            dense_size = int(b.xapi.VDI.get_virtual_size(dense_vdi))
            cases = [
                ("a", "a) sparse %g GiB, vdi-export raw" % args.sparse_gib,
                 ["-E", "sparse-vm", "--vdi-format", "raw"],
                 b.url("/export_raw_vdi", vdi=sparse_vdi, format="raw"), sparse_size),
                ("b", "b) dense %d MiB, vm-export .xva" % args.dense_mib,
                 ["-e", "dense-vm"], b.url("/export", ref=b.vm_ref("dense-vm")), dense_size),
                ("c", "c) dense %d MiB, vdi-export raw" % args.dense_mib,
                 ["-E", "dense-vm", "--vdi-format", "raw"],
                 b.url("/export_raw_vdi", vdi=dense_vdi, format="raw"), dense_size),
            ]
            for key, title, select, url, virtual in cases:
                if key not in only:
                    continue
                sys.stdout.write("running %s ...\n" % title)
                sys.stdout.flush()
                rows.append(b.case(key, title, select, url, virtual))
            left = pool.leftovers()
            if left["snapshots"] or left["vdis"]:
                sys.stderr.write("warning: vmbackup left %s\n" % left)
        rate = dd_rate(work, min(args.dense_mib, 2048))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.stdout.write("\n")
    print_table(rows)
    sys.stdout.write("\nthe machine: dd if=/dev/zero bs=1M conv=fdatasync of %d MiB: %.0f MB/s\n"
                     % (min(args.dense_mib, 2048), rate))
    for r in rows:
        if "profile" in r:
            sys.stdout.write("\n--- cProfile of vmbackup, %s (top by own time) ---\n%s\n"
                             % (r["title"], r["profile"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "dd_mbps": rate}, f, indent=2)
    return 0


def _version():
    out = subprocess.run([sys.executable, VMBACKUP, "--version"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, universal_newlines=True).stdout
    return out.strip().split()[-1] if out.strip() else "?"


def _curl_version():
    out = subprocess.run(["curl", "--version"], stdout=subprocess.PIPE,
                         universal_newlines=True).stdout
    return out.split()[1] if out else "?"


if __name__ == "__main__":
    sys.exit(main())
