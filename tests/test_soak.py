"""Soak test of issue 5 ("Never lose a backup, never leave a snapshot behind").

Many consecutive vmbackup runs over one 20-VM simulated pool and one backup_dir, each
run with 0-2 random faults injected through the simulator (dropped exports, a full SR at
snapshot time, a destroy that is busy once, dropped or 5xx read calls, a VM that vanishes,
a run killed with SIGKILL mid-export, a run stopped by SIGTERM mid-export).  After every
run it checks the pool (no leftover snapshots or VDIs, except right after a killed run,
and the run after that must clean them up), the backup_dir (no `.part` files, no lock
left, every new `success` folder verifies against its manifest, retention counts) and
the exit code.  At the end the whole backup_dir is verified.

The fault plan is drawn from a fixed seed (SOAK_SEED in the environment overrides it);
on failure the seed, the plan and every run's problems are printed, so any failure can
be replayed.  Problems do not stop the soak: they are collected and reported at the end.
Problems that are known bugs of vmbackup.py (KNOWN_BUGS, each with a minimal
reproduction) make the test xfail instead of fail; anything else fails it.

The backup runs are in-process (like `run_vmbackup`) for speed, with vmbackup's retry
backoff and xe poll interval shortened; killed and terminated runs are real processes in
their own session, like cron jobs.
"""
import contextlib
import io
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

import vmbackup
from conftest import VMBACKUP, run_vmbackup
from xapisim import pools, start_pool

SEED = int(os.environ.get("SOAK_SEED", "20260505"))

#: How long the export to interrupt stalls (the signal comes within it; after a kill the
#: next run waits about this long for the pool to let go of the snapshot).
STALL = 0.6
NET0 = pools.NET0


# -- the pool and what is asked of each VM --------------------------------------------

def _disk(size, *blocks, name=None):
    d = {"size": size, "blocks": list(blocks)}
    if name:
        d["name"] = name
    return d


def _vm(name, disks, running_on=None):
    d = {"name": name, "disks": disks, "vifs": [NET0]}
    if running_on:
        d.update(power_state="Running", host=running_on)
    return d


#: name -> (the VM's description, mode, max_backups, exported userdevices).
#: This table is the oracle; the config files below are what vmbackup reads.
VMS = {}


def _add(vm, mode, max_backups, devices=()):
    VMS[vm["name"]] = (vm, mode, max_backups, tuple(devices))


_add(_vm("xva-00", [_disk("1M", 0, 3)]), "vm-export", 2, ("0",))
_add(_vm("xva-01", [_disk("1M", 0, 5), _disk("1M", 1)], "host1"), "vm-export", 2, ("0", "1"))
_add(_vm("xva-02", [_disk("1M", 0, 7), _disk("1M", 0, name="xva-02 scratch [NOBAK]")]),
     "vm-export", 2, ("0",))
_add(_vm("xva-03", [_disk("1M", 0, 9)]), "vm-export", 1, ("0",))
_add(_vm("xva-04", [_disk("1M", 0, 11)], "host2"), "vm-export", 2, ("0",))
_add(_vm("xva-05", [_disk("1M", 0, 13), _disk("512K", 2)]), "vm-export", 3, ("0", "1"))
_add(_vm("xva-06", [_disk("1M", 0, 15)], "host1"), "vm-export", 2, ("0",))
_add(_vm("xva-07", [_disk("1M", 0, 1)]), "vm-export", 2, ("0",))
_THREE = [_disk("1M", 0, 2), _disk("1M", 0, 4), _disk("512K", 0, 6)]
_add(_vm("disk-00", _THREE), "vdi-export", 2, ("0",))
_add(_vm("disk-01", _THREE), "vdi-export", 3, ("0", "1"))
_add(_vm("disk-02", _THREE, "host2"), "vdi-export", 1, ("1",))
_add(_vm("disk-03", _THREE), "vdi-export", 2, ("0", "1", "2"))
_add(_vm("disk-04", _THREE), "vdi-export", 2, ("0", "2"))
_add(_vm("disk-05", [_disk("1M", 0, 8)], "host1"), "vdi-export", 2, ("0",))
_add(_vm("disk-06", [_disk("1M", 0, 10), _disk("1M", 0, name="disk-06 tmp [NOBAK]")]),
     "vdi-export", 4, ("0",))
for _i, _max in enumerate((3, 1, 3, 3, 2)):
    _add(_vm("meta-%02d" % _i, [_disk("1M", 0)]), "meta-export", _max)

#: The api soak's config: regexes with plain-name overrides (plain names win).
API_SELECTORS = """\
vm-export=xva-.*
vm-export=xva-03:1
vm-export=xva-05:3
vdi-export=disk-.*:2
vdi-export=disk-01:3:xvda;xvdb
vdi-export=disk-02:1:xvdb
vdi-export=disk-03::xvda;xvdb;xvdc
vdi-export=disk-04:-1:xvda;xvdc
vdi-export=disk-06:4:xvda;xvdb
meta-export=meta-.*:3
meta-export=meta-01:1
meta-export=meta-04:2
"""
#: VMs named by a plain selector: once such a VM is gone, every run warns "vm not found".
API_PLAIN = {"xva-03", "xva-05", "disk-01", "disk-02", "disk-03", "disk-04", "disk-06",
             "meta-01", "meta-04"}

#: The xe soak backs up a few of the VMs (every xe call is a process): plain selectors.
XE_SELECTORS = """\
vm-export=xva-01
vm-export=xva-03:1
vdi-export=disk-01:3:xvda;xvdb
vdi-export=disk-02:1:xvdb
meta-export=meta-00:3
meta-export=meta-01:1
"""

#: Read-only calls vmbackup retries on a dropped connection or a 5xx.  Over xe only those
#: of its own pool read at the start of a run: later ones may be the xe processes' calls.
READ_CALLS_START = ["pool.get_all_records", "host.get_all_records", "VM.get_all_records",
                    "VBD.get_all_records", "VDI.get_all_records", "VIF.get_all_records",
                    "network.get_all_records", "SR.get_all_records",
                    "VM_guest_metrics.get_all_records"]
READ_CALLS_API = READ_CALLS_START + ["task.get_record", "VM.get_VBDs", "VBD.get_record",
                                     "VM.get_uuid", "VDI.get_uuid"]


def soak_pool():
    return pools.simple_pool(vms=[vm for vm, _, _, _ in VMS.values()], hosts=("host1", "host2"))


def selected_vms(selectors):
    names = set()
    for line in selectors.splitlines():
        pattern = line.split("=", 1)[1].split(":", 1)[0]
        names.update(n for n in VMS if (n == pattern if vmbackup.PLAIN_NAME_RE.match(pattern)
                                        else re.match(pattern, n)))
    return sorted(names)


# -- the fault plan -----------------------------------------------------------------------

#: Faults that make the VM they hit fail (exit 2), unless retries= recovers them.
FAILING = ("drop_export", "snapshot_full", "vanish")


def downloads_per_run(names):
    """How many downloads of each export path one fault-free run makes."""
    xva = [n for n in names if VMS[n][1] == "vm-export"]
    raw = sum(len(VMS[n][3]) for n in names if VMS[n][1] == "vdi-export")
    return {"/export": len(xva), "/export_raw_vdi": raw, "/export_metadata": len(names)}


def draw_fault(rng, kind, names, read_calls):
    counts = downloads_per_run(names)
    xva = [n for n in names if VMS[n][1] == "vm-export"]
    disk = [n for n in names if VMS[n][1] == "vdi-export"]
    if kind == "drop_export":
        path = rng.choice(sorted(counts))
        limit = {"/export": 131072, "/export_raw_vdi": 524288, "/export_metadata": 20000}[path]
        return {"kind": kind, "path": path, "nth": rng.randint(1, counts[path]),
                "after_bytes": rng.randrange(limit)}
    if kind == "snapshot_full":
        if rng.random() < 0.5:
            return {"kind": kind, "method": "VM.snapshot", "vm": rng.choice(xva)}
        vm = rng.choice(disk)
        return {"kind": kind, "method": "VDI.snapshot", "vm": vm, "userdevice": rng.choice(VMS[vm][3])}
    if kind == "destroy_busy":
        if rng.random() < 0.6:
            return {"kind": kind, "method": "VM.destroy", "code": "OTHER_OPERATION_IN_PROGRESS"}
        return {"kind": kind, "method": "VDI.destroy", "code": "VDI_IN_USE"}
    if kind in ("drop_rpc", "http_503"):
        return {"kind": kind, "method": rng.choice(read_calls)}
    if kind == "vanish":
        return {"kind": kind, "vm": rng.choice(xva)}
    if kind in ("kill", "term"):
        path = rng.choice(["/export", "/export_raw_vdi", "/export_raw_vdi", "/export", "/export_metadata"])
        limit = {"/export": 131072, "/export_raw_vdi": 262144, "/export_metadata": 8192}[path]
        # not the last download of its kind: a vanished VM or a failure could make it the
        # one that never comes
        return {"kind": kind, "path": path, "nth": rng.randint(1, max(1, counts[path] - 1)),
                "after_bytes": rng.randrange(limit)}
    raise AssertionError(kind)


def make_plan(rng, runs, names, read_calls, vanish=True):
    """Return one dict per run: options and faults.  The last run is fault-free (it
    settles the backup_dir for the final checks); each fault kind appears at least once."""
    plan = [{"run": i + 1, "vhd": rng.random() < 0.3, "gzip": rng.random() < 0.2,
             "retries": rng.random() < 0.15, "faults": []} for i in range(runs)]
    must = ["kill", "term", "drop_export", "drop_export", "snapshot_full", "destroy_busy",
            "drop_rpc", "http_503"]
    if runs >= 30:
        must += ["kill", "kill", "term", "drop_export", "snapshot_full", "vanish"]
    slots = rng.sample(range(runs - 1), len(must))
    for kind, slot in zip(must, slots):
        plan[slot]["faults"].append(draw_fault(rng, kind, names, read_calls))
    for entry in plan[:-1]:
        wanted = rng.choice([0, 0, 1, 1, 1, 2])
        while len(entry["faults"]) < wanted:
            if entry["faults"] and entry["faults"][0]["kind"] in ("kill", "term", "vanish"):
                break
            kind = rng.choice(["drop_export", "drop_export", "snapshot_full", "destroy_busy",
                               "drop_rpc", "http_503"])
            entry["faults"].append(draw_fault(rng, kind, names, read_calls))
    for entry in plan:
        kinds = [f["kind"] for f in entry["faults"]]
        if "vanish" in kinds:
            entry["faults"] = [f for f in entry["faults"] if f["kind"] == "vanish"]
            entry["retries"] = False
        if "kill" in kinds or "term" in kinds:
            entry["faults"] = [f for f in entry["faults"] if f["kind"] in ("kill", "term")][:1]
    plan[-1].update(vhd=False, gzip=False, retries=False, faults=[])
    return plan


def describe_run(entry):
    opts = [k for k in ("vhd", "gzip", "retries") if entry[k]]
    faults = ["%s(%s)" % (f["kind"], ", ".join("%s=%s" % (k, v) for k, v in sorted(f.items())
                                                if k != "kind")) for f in entry["faults"]]
    return "run %d [%s]: %s" % (entry["run"], " ".join(opts) or "-", "; ".join(faults) or "no fault")


# -- known bugs of vmbackup.py: the assertion that shows each is marked with its id ------

#: id -> the reproduction.  A problem tagged with one of these makes the test xfail.
KNOWN_BUGS = {}


# -- the soak ----------------------------------------------------------------------------

def invoke(args):
    """Run vmbackup in-process (as run_vmbackup does); return (exit code, output)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = vmbackup.main([str(a) for a in args])
    return rc, buf.getvalue()


def spawn(args):
    """Start vmbackup as a real process in its own session (like a cron job)."""
    return subprocess.Popen([sys.executable, VMBACKUP] + [str(a) for a in args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, start_new_session=True)


def tail(text, lines=25):
    """The lines of vmbackup's output that matter: warnings, errors and the last lines."""
    all_lines = text.rstrip().splitlines()
    keep = [l for l in all_lines[:-3] if " WARNING " in l or " ERROR " in l or "rror" in l
            or "Traceback" in l]
    return "\n".join(["    " + l for l in (keep[-lines:] + all_lines[-3:])])


class Soak:
    def __init__(self, pool, backup_dir, base_args, names, plain, plan, tmp_path):
        self.pool, self.backup_dir, self.base_args = pool, str(backup_dir), base_args
        self.names, self.plain, self.plan, self.tmp_path = names, plain, plan, tmp_path
        self.problems = []           # (run, known bug id or None, message)
        self.vanished = set()
        self.had_good = set()        # VMs that have had a complete backup
        self.surplus = set()         # VMs left with max+1 backups by a kill between success and prune
        self.allowed_parts = set()   # .part files a killed run left (gone once the folder is pruned)
        self.previous_killed = False
        self.previous_left = None
        self.run_no = 0
        self.timings = []

    # -- recording
    def check(self, ok, message, bug=None):
        if not ok:
            self.problems.append((self.run_no, bug, message))
        return ok

    # -- the backup_dir
    def vm_dir(self, name):
        return os.path.join(self.backup_dir, vmbackup.safe_dirname(name))

    def folders(self, name):
        try:
            return sorted(n for n in os.listdir(self.vm_dir(name)) if n.startswith("backup-"))
        except FileNotFoundError:
            return []

    def complete(self, name):
        return [b for b in self.folders(name)
                if os.path.exists(os.path.join(self.vm_dir(name), b, vmbackup.SUCCESS_MARKER))]

    def parts(self):
        return {os.path.join(d, f) for d, _, files in os.walk(self.backup_dir)
                for f in files if f.endswith(".part")}

    def state(self):
        return {n: self.complete(n) for n in self.names}

    # -- one run
    def arm(self, entry):
        """Install the run's faults; return [(fault, rule or None)]."""
        f, armed = self.pool.faults, []
        for fault in entry["faults"]:
            kind = fault["kind"]
            rule = None
            if kind == "drop_export":
                if fault["nth"] > 1:  # let the first nth-1 downloads on the path through
                    f.drop_export(after_bytes=1 << 40, times=fault["nth"] - 1, path=fault["path"])
                rule = f.drop_export(after_bytes=fault["after_bytes"], path=fault["path"])
            elif kind == "snapshot_full":
                match = fault["vm"]
                if fault["method"] == "VDI.snapshot":
                    match = self.vdi_ref(fault["vm"], fault["userdevice"])
                rule = f.fail(fault["method"], "SR_BACKEND_FAILURE_44", "",
                              "There is insufficient space", "", match=match)
            elif kind == "destroy_busy":
                params = (["VM", "OpaqueRef:busy", "export", "OpaqueRef:task"]
                          if fault["code"] == "OTHER_OPERATION_IN_PROGRESS" else ["OpaqueRef:busy", "destroy"])
                rule = f.fail(fault["method"], fault["code"], *params, times=1)
            elif kind == "drop_rpc":
                rule = f.drop_rpc(fault["method"], times=2)
            elif kind == "http_503":
                rule = f.http_error(method=fault["method"], status=503)
            elif kind == "vanish":
                rule = f.vanish_vm(fault["vm"], before="VM.snapshot")
            elif kind in ("kill", "term"):
                if fault["nth"] > 1:
                    f.stall_export(after_bytes=1 << 40, seconds=0, times=fault["nth"] - 1,
                                   path=fault["path"])
                rule = f.stall_export(after_bytes=fault["after_bytes"], seconds=STALL, path=fault["path"])
            armed.append((fault, rule))
        return armed

    def vdi_ref(self, vm, userdevice):
        ref, rec = self.pool.vm(vm)
        with self.pool.db.lock:
            for vbd in rec["VBDs"]:
                b = self.pool.db.tables["VBD"][vbd]
                if b["type"] == "Disk" and str(b["userdevice"]) == userdevice:
                    return b["VDI"]
        raise KeyError((vm, userdevice))

    def run(self, entry):
        self.run_no = entry["run"]
        began = time.monotonic()
        before = self.state()
        incomplete_before = {n: sorted(set(self.folders(n)) - set(before[n])) for n in self.names
                             if n not in self.vanished}
        parts_before = self.parts()
        http_before = len(self.pool.calls.requests())
        summary_path = self.tmp_path / ("run-%02d.json" % entry["run"])
        args = list(self.base_args) + ["--json", summary_path]
        if entry["vhd"]:
            args += ["--vdi-format", "vhd"]
        if entry["gzip"]:
            args += ["--compress", "gzip"]
        if entry["retries"]:
            args += ["--retries", "1"]
        armed = self.arm(entry)
        kinds = [f["kind"] for f in entry["faults"]]
        killed = terminated = False
        if "kill" in kinds or "term" in kinds:
            rc, out, killed, terminated = self.run_and_signal(entry, args, http_before)
        else:
            rc, out = invoke(args)
        self.pool.faults.clear()
        requests = self.pool.calls.requests()[http_before:]
        where = "%s -> exit %s%s\n%s" % (describe_run(entry), rc, " (killed)" if killed else "",
                                         tail(out))

        # which faults really fired
        dropped = [r for r in requests if r.error and "dropped by fault" in r.error]
        fired = {"drop_export": len(dropped)}
        for fault, rule in armed:
            if fault["kind"] != "drop_export" and rule is not None:
                fired[fault["kind"]] = fired.get(fault["kind"], 0) + rule.hits
        meta_drops = sum(1 for r in dropped if r.path == "/export_metadata")
        hard = meta_drops + fired.get("vanish", 0)
        soft = fired["drop_export"] - meta_drops + fired.get("snapshot_full", 0)
        for fault, rule in armed:
            if fault["kind"] == "vanish" and rule.hits:
                self.vanished.add(fault["vm"])

        # the pool: nothing left behind, except by a run killed just now
        left = self.pool.leftovers()
        if not killed:
            self.check(not left["snapshots"] and not left["vdis"],
                       "leftovers in the pool after the run: %s\n%s" % (left, where))
        if self.previous_killed:
            self.check("destroying leftover" in out or not self.previous_left,
                       "the run after a killed run did not say it destroyed leftovers\n" + where)

        # the exit code
        summary = None
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
        results = [v for v in (summary or {}).get("vms", []) if v["name"] in VMS]
        errors = [v["name"] for v in results if v["status"] == "error"]
        # a warning (exit 1) without a fault: the stale lock of a killed run, a plain selector
        # whose VM vanished, or an earlier failure's incomplete folder deleted by retention
        baseline = 1 if (self.previous_killed or self.vanished & self.plain
                         or any(incomplete_before.values())) else 0
        if terminated:
            self.check(rc == 2 and "terminated by SIGTERM" in out and "Traceback" not in out,
                       "SIGTERM during an export: expected exit 2, a clean message\n" + where)
        elif not killed:
            self.check(summary is not None, "no JSON summary\n" + where)
            if summary is not None:
                self.check(summary["exit_code"] == rc, "JSON exit_code %s != exit %s\n%s"
                           % (summary["exit_code"], rc, where))
            self.check((rc == 2) == bool(errors), "exit %s but failed VMs %s\n%s" % (rc, errors, where))
            if not entry["retries"]:
                want = 2 if hard + soft else baseline
                self.check(rc == want, "expected exit %d (faults fired: %s)\n%s" % (want, fired, where))
                if hard + soft:
                    self.check(1 <= len(errors) <= hard + soft, "%d faults that fail a VM fired, "
                               "failed VMs: %s\n%s" % (hard + soft, errors, where))
            else:
                if hard:
                    self.check(rc == 2, "expected exit 2 (faults fired: %s)\n%s" % (fired, where))
                elif soft == 1:
                    self.check(rc == 1 and not errors, "one failed export with retries=1: expected "
                               "exit 1 and no failed VM (faults fired: %s)\n%s" % (fired, where))
                elif not soft:
                    self.check(rc == baseline, "expected exit %d\n%s" % (baseline, where))
            if "Traceback" in out or "internal error" in out:
                self.check(False, "traceback or internal error in the output\n" + where)

        # the backup_dir
        after = self.state()
        parts = self.parts()
        if killed:
            self.allowed_parts |= parts - parts_before
            self.check(os.path.exists(os.path.join(self.backup_dir, ".vmbackup.lock")),
                       "the killed run left no lock file?\n" + where)
        else:
            self.allowed_parts &= parts
            self.check(parts <= self.allowed_parts, ".part files left: %s\n%s"
                       % (sorted(parts - self.allowed_parts), where))
            self.check(not os.path.exists(os.path.join(self.backup_dir, ".vmbackup.lock")),
                       "lock file left behind\n" + where)
        by_name = {v["name"]: v for v in results}
        new_folders = []
        for name in self.names:
            self.check_retention(name, before[name], after[name], killed, by_name.get(name), where)
            result = by_name.get(name)
            if result and result["status"] == "warning" and not entry["retries"]:
                self.check(incomplete_before.get(name), "%s: a warning (%s) without a retry or an "
                           "incomplete folder to delete\n%s" % (name, result["message"], where))
            for b in sorted(set(after[name]) - set(before[name])):
                new_folders.append(os.path.join(self.vm_dir(name), b))
                self.check_manifest(name, os.path.join(self.vm_dir(name), b), entry, where)
        if new_folders:
            try:
                run_vmbackup("verify", *new_folders, exit_code=0)
            except pytest.fail.Exception as exc:
                self.check(False, "verify of the new backups failed: %s\n%s" % (exc, where))
        self.previous_killed = killed
        self.previous_left = left["snapshots"] or left["vdis"] if killed else None
        self.timings.append(time.monotonic() - began)
        print("%s -> exit %s in %.1fs" % (describe_run(entry), "killed" if killed else rc,
                                          self.timings[-1]))

    def run_and_signal(self, entry, args, http_before):
        fault = entry["faults"][0]
        proc = spawn(args)
        deadline = time.monotonic() + 60
        reached = False
        while time.monotonic() < deadline and proc.poll() is None:
            hits = [r for r in self.pool.calls.requests()[http_before:] if r.path == fault["path"]]
            if len(hits) >= fault["nth"] and hits[fault["nth"] - 1].bytes_sent >= fault["after_bytes"]:
                reached = True
                break
            time.sleep(0.01)
        if not reached and proc.poll() is not None:
            # it finished before the export to interrupt came: an ordinary run
            self.check(False, "%s: the export to interrupt never came" % describe_run(entry))
            out, _ = proc.communicate(timeout=60)
            return proc.returncode, out, False, False
        self.check(reached, "%s: timed out waiting for the export to interrupt" % describe_run(entry))
        if fault["kind"] == "kill":
            os.killpg(proc.pid, signal.SIGKILL)     # no cleanup can run: like a host reboot
            out, _ = proc.communicate(timeout=60)
            return None, out, True, False
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        return proc.returncode, out, False, True

    def check_retention(self, name, before, after, killed, result, where):
        limit = VMS[name][2]
        new = sorted(set(after) - set(before))
        gone = sorted(set(before) - set(after))
        self.check(len(new) <= 1, "%s: %d new complete backups in one run\n%s" % (name, len(new), where))
        if before and new:
            self.check(new[0] > before[-1], "%s: new backup %s is not the newest\n%s" % (name, new, where))
        if new:
            self.had_good.add(name)
            if killed and after == sorted(before + new) and len(after) > limit:
                self.surplus.add(name)   # killed between the success marker and retention
            else:
                self.surplus.discard(name)
                self.check(after == sorted(before + new)[-limit:],
                           "%s: after a new backup the %d newest should stay: before %s, after %s\n%s"
                           % (name, limit, before, after, where))
        else:
            self.check(not gone, "%s: backups deleted without a new one: %s (before %s)\n%s"
                       % (name, gone, before, where))
        cap = limit + (1 if name in self.surplus else 0)
        self.check(len(after) <= cap, "%s: %d complete backups, max_backups=%d\n%s"
                   % (name, len(after), limit, where))
        if name in self.had_good:
            self.check(len(after) >= 1, "%s: no complete backup left\n%s" % (name, where))
        if result is not None:
            if result["status"] in ("success", "warning"):
                self.check(len(new) == 1 and result["path"] == os.path.join(self.vm_dir(name), new[0]),
                           "%s: reported %s at %s, new complete backups %s\n%s"
                           % (name, result["status"], result["path"], new, where))
                incomplete = sorted(set(self.folders(name)) - set(after))
                self.check(not incomplete, "%s: incomplete folders left after a good backup: %s\n%s"
                           % (name, incomplete, where))
            else:
                self.check(not new, "%s: failed but has a new complete backup %s\n%s" % (name, new, where))

    def check_manifest(self, name, folder, entry, where):
        _, mode, _, devices = VMS[name]
        try:
            with open(os.path.join(folder, vmbackup.MANIFEST)) as handle:
                manifest = json.load(handle)
        except (OSError, ValueError) as exc:
            self.check(False, "%s: unreadable manifest: %s\n%s" % (folder, exc, where))
            return
        self.check(manifest["mode"] == mode, "%s: mode %s, expected %s\n%s"
                   % (folder, manifest["mode"], mode, where))
        if mode == "vdi-export":
            got = tuple(d["userdevice"] for d in manifest["disks"])
            self.check(got == devices, "%s: disks %s exported, expected %s\n%s"
                       % (folder, got, devices, where))

    # -- the end
    def final_checks(self):
        self.run_no = "end"
        left = self.pool.leftovers()
        self.check(not left["snapshots"] and not left["vdis"], "leftovers at the end: %s" % left)
        self.check(not self.parts(), ".part files at the end: %s" % sorted(self.parts()))
        for name in self.names:
            n = len(self.complete(name))
            self.check(n <= VMS[name][2], "%s: %d complete backups at the end, max %d"
                       % (name, n, VMS[name][2]))
            if name not in self.vanished:
                self.check(n >= 1, "%s: no complete backup at the end" % name)
        # every success folder verifies; a vanished VM keeps its last, incomplete folder
        incomplete = [os.path.join(self.vm_dir(n), b) for n in self.names
                      for b in sorted(set(self.folders(n)) - set(self.complete(n)))]
        self.check(all(os.path.basename(os.path.dirname(p)) in self.vanished for p in incomplete),
                   "incomplete backup folders at the end: %s" % incomplete)
        want = 2 if incomplete else 0
        report = self.tmp_path / "verify.json"
        rc, out = invoke(["verify", self.backup_dir, "--json", report])
        self.check(rc == want, "verify %s: exit %d, expected %d\n%s" % (self.backup_dir, rc, want, tail(out)))
        data = json.loads(report.read_text())
        bad = [b["display"] for b in data["backups"] if b["status"] not in ("good", "incomplete")]
        self.check(not bad, "verify found bad backups: %s" % bad)
        self.check(data["summary"].get("good", 0) == sum(len(self.complete(n)) for n in self.names),
                   "verify: %s good, %d complete folders" % (data["summary"], sum(
                       len(self.complete(n)) for n in self.names)))
        if not incomplete:
            try:
                run_vmbackup("verify", self.backup_dir, exit_code=0)
            except pytest.fail.Exception as exc:
                self.check(False, "verify BACKUP_DIR: %s" % exc)

    def report(self):
        unknown = [p for p in self.problems if p[1] is None]
        known = sorted({p[1] for p in self.problems if p[1] is not None})
        lines = ["soak seed %d (SOAK_SEED=%d to replay), %d runs, %.1fs; %d problems"
                 % (SEED, SEED, len(self.plan), sum(self.timings), len(self.problems)), "plan:"]
        lines += ["  " + describe_run(e) for e in self.plan]
        for run_no, bug, message in self.problems:
            lines.append("--- run %s%s: %s" % (run_no, " [known bug %s]" % bug if bug else "", message))
        text = "\n".join(lines)
        if unknown:
            pytest.fail(text, pytrace=False)
        if known:
            pytest.xfail("known bugs %s:\n%s" % (", ".join(known), "\n".join(
                "%s: %s" % (b, KNOWN_BUGS[b]) for b in known)) + "\n" + text)


@pytest.fixture
def scratch(tmp_path):
    """A folder on tmpfs when there is one (vmbackup fsyncs every file it writes: on a
    busy disk that alone costs many seconds over 50 runs), else tmp_path."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        path = tempfile.mkdtemp(prefix="vmbackup-soak-", dir="/dev/shm")
        try:
            yield pathlib.Path(path)
        finally:
            shutil.rmtree(path, ignore_errors=True)
    else:
        yield tmp_path


@pytest.mark.timeout(400)
@pytest.mark.parametrize("kind, runs", [("api", 50), ("xe", 10)], ids=["api-50-runs", "xe-10-runs"])
def test_soak(kind, runs, tmp_path, scratch, monkeypatch):
    # speed: vmbackup's retry backoff (1 s, 2 s...) and xe poll (0.5 s) in this process only
    monkeypatch.setattr(vmbackup.Xapi, "BACKOFF", 0.05)
    monkeypatch.setattr(vmbackup.XeTransport, "POLL", 0.02)
    selectors = API_SELECTORS if kind == "api" else XE_SELECTORS
    names = selected_vms(selectors)
    rng = random.Random("%d-%s" % (SEED, kind))
    plan = make_plan(rng, runs, names, READ_CALLS_API if kind == "api" else READ_CALLS_START)
    print("soak seed %d, plan:\n%s" % (SEED, "\n".join(describe_run(e) for e in plan)))
    backup_dir = scratch / "backups"
    backup_dir.mkdir()
    config = tmp_path / "soak.cfg"
    config.write_text("backup_dir=%s\nmax_backups=2\nvdi_export_format=raw\nspace_threshold=1\n"
                      "status_log=%s\n%s" % (backup_dir, tmp_path / "status.log", selectors))
    with start_pool(soak_pool(), keepalive=0.5) as pool:
        for key, value in pool.env().items():
            monkeypatch.setenv(key, value)
        if kind == "xe":
            connect = ["--transport", "xe", "--xe", pool.xe_path, "--server", "unix:" + pool.socket_path]
        else:
            pw = tmp_path / "xapi.pw"
            pw.write_text(pool.password + "\n")
            pw.chmod(0o600)
            connect = ["--transport", "api", "--server", pool.url, "--password-file", pw]
        soak = Soak(pool, backup_dir, ["-c", config] + connect, names,
                    API_PLAIN if kind == "api" else set(names), plan, tmp_path)
        for entry in plan:
            soak.run(entry)
        soak.final_checks()
    soak.report()
