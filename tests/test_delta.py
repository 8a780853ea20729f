"""delta-export, the pool's side: selection and settings, the full-or-delta decision (pure,
from tables), and chains built against the simulated pool over both transports — with
CBT + NBD, CBT without NBD and without CBT — whose every point reads back byte for byte
what the disk held at that run, moving only the changed blocks; and the faults."""
import hashlib
import json
import os
import signal
import time

import pytest

import xapisim
from xapisim import pools
from vmbackup import (
    ChainReader, DiskFacts, PreviousDisk, ReferenceState, changed_ranges, parse_config,
    parse_selector, plan_delta, plan_vm, select_vms)
from conftest import Connect, run_vmbackup, session, spawn

KIB = 1024
MIB = 1024 * KIB
BLOCK = 64 * KIB


# -- selection and settings -------------------------------------------------------

def wait_for(predicate, timeout=60.0, what="condition"):
    """Poll `predicate` until true (bounded); fail the test if it never is."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for " + what)
        time.sleep(0.05)


def vm(name):
    return {"name_label": name, "uuid": "uuid-" + name, "is_a_template": False,
            "is_a_snapshot": False, "is_control_domain": False, "VBDs": []}


POOL = {"OpaqueRef:%d" % i: vm(n) for i, n in enumerate(["db01", "web01", "PRD-app"])}


def sels(*lines):
    return [parse_selector(line.split("=", 1)[1], line.split("=", 1)[0]) for line in lines]


@pytest.mark.parametrize("lines, expected", [
    (["delta-export=db01"], {("db01", "delta-export")}),
    (["delta-export=db01", "vm-export=db01"], {("db01", "delta-export")}),
    (["vm-export=db01", "delta-export=db01"], {("db01", "delta-export")}),
    (["delta-export=db01", "vdi-export=db01"], {("db01", "vdi-export")}),
    (["delta-export=db01", "meta-export=db01"], {("db01", "delta-export")}),
    (["delta-export=.*", "vm-export=web01"], {("db01", "delta-export"), ("web01", "vm-export"),
                                              ("PRD-app", "delta-export")}),
    (["delta-export=.*", "exclude=db01"], {("web01", "delta-export"), ("PRD-app", "delta-export")}),
], ids=["alone", "beats-vm-export", "beats-vm-export-either-order", "loses-to-vdi-export",
        "beats-meta-export", "plain-name-wins-over-regex", "exclude-wins"])
def test_selection_precedence(lines, expected):
    assert {(s.name, s.mode) for s in select_vms(POOL, sels(*lines), 4).vms} == expected


@pytest.mark.parametrize("text, expected", [
    ("db01", ("db01", None, ())),
    ("db01:14", ("db01", 14, ())),
    ("db01:14:xvda;xvdb", ("db01", 14, ("xvda", "xvdb"))),
    ("PRD-.*:3:xvdb", ("PRD-.*", 3, ("xvdb",))),
    ("db01::xvdb", ("db01", None, ("xvdb",))),
], ids=["name", "max", "max-and-disks", "regex", "disks-only"])
def test_delta_selector(text, expected):
    sel = parse_selector(text, "delta-export")
    assert (sel.pattern, sel.max_backups, sel.devices) == expected


def test_delta_export_config_lines(tmp_path):
    parsed = parse_config("delta_export=db01:9:xvdb\nfull_interval=0\n", "x.cfg")
    assert parsed.selectors[0].mode == "delta-export" and parsed.selectors[0].devices == ("xvdb",)
    assert parsed.values["full_interval"] == 0
    out = run_vmbackup("-D", "db01:2", "-d", str(tmp_path), "--full-interval", "x", exit_code=2)
    assert "--full-interval x" in out


def test_delta_export_plans_every_disk_unless_named():
    from vmbackup import PoolView
    vbds = {"VBD%d" % i: {"type": "Disk", "VDI": "VDI%d" % i, "userdevice": str(i), "device": "",
                          "empty": False} for i in range(3)}
    vdis = {"VDI0": {"uuid": "a", "name_label": "root"}, "VDI1": {"uuid": "b", "name_label": "data"},
            "VDI2": {"uuid": "c", "name_label": "scratch [NOBAK]"}}
    rec = dict(vm("db01"), VBDs=sorted(vbds))
    view = PoolView({}, {}, {"OpaqueRef:0": rec}, vbds, vdis, {}, {}, {}, {})
    every = plan_vm(select_vms(view.vms, sels("delta-export=db01"), 4).vms[0], view)
    assert [d.device for d in every.disks] == ["xvda", "xvdb"]
    assert [d.device for d in every.skipped] == ["xvdc"]
    named = plan_vm(select_vms(view.vms, sels("delta-export=db01:4:xvdb"), 4).vms[0], view)
    assert [d.device for d in named.disks] == ["xvdb"]


# -- the full-or-delta decision -------------------------------------------------------

PREV = PreviousDisk("backup-2026-12-01-000000", "xvda.vhd", "f" * 64, "disk-uuid", 8 * MIB,
                    "chain-id", 2, "vhd-uuid", "ref-uuid", "cbt_metadata")
REF = ReferenceState("ref-uuid", "OpaqueRef:disk", True, False)
FACTS = DiskFacts("OpaqueRef:disk", "disk-uuid", 8 * MIB, True, None, True, PREV, REF)


@pytest.mark.parametrize("change, interval, method, reason", [
    ({}, 7, "cbt-nbd", None),
    ({"previous": None}, 7, "full", "first run"),
    ({"previous": PREV._replace(complete=False)}, 7, "full", "incomplete"),
    ({"previous": PREV._replace(position=6)}, 7, "full", "full_interval reached"),
    ({"previous": PREV._replace(position=60)}, 0, "cbt-nbd", None),
    ({"previous": PREV._replace(reference_uuid=None)}, 7, "full", "kept no reference"),
    ({"reference": None}, 7, "full", "reference snapshot ref-uuid is gone"),
    ({"reference": REF._replace(uuid="other")}, 7, "full", "not the chain's recorded"),
    ({"reference": REF._replace(snapshot_of="OpaqueRef:another")}, 7, "full",
     "not the chain's recorded"),
    ({"vdi_uuid": "new-disk-uuid"}, 7, "full", "storage migration"),
    ({"virtual_size": 10 * MIB}, 7, "full", "disk size changed"),
    ({"reference": REF._replace(cbt_enabled=False)}, 7, "full", "only CBT metadata"),
    ({"nbd": False}, 7, "full", "no network offers NBD"),
    ({"nbd": False, "reference": REF._replace(has_data=True)}, 7, "cbt-export", None),
    ({"cbt": False, "cbt_problem": "CBT unavailable (LICENCE_RESTRICTION)"}, 7, "full",
     "LICENCE_RESTRICTION"),
    ({"cbt": False, "nbd": False, "reference": REF._replace(has_data=True, cbt_enabled=False)},
     7, "export", None),
], ids=["delta-over-nbd", "first-run", "previous-incomplete", "full-interval-reached",
        "full-interval-0-never", "no-reference-recorded", "reference-gone",
        "reference-uuid-not-recorded", "reference-of-another-disk", "storage-migration",
        "resized", "reference-without-cbt-and-no-data", "nbd-gone-reference-without-data",
        "cbt-without-nbd", "cbt-unlicensed-reference-without-data", "no-cbt-export"])
def test_plan_delta(change, interval, method, reason):
    plan = plan_delta(FACTS._replace(**change), interval)
    assert plan.method == method
    if reason is None:
        assert plan.reason is None
    else:
        assert reason in plan.reason


@pytest.mark.parametrize("cbt, nbd, kind", [
    (True, True, "cbt_metadata"), (True, False, "snapshot"), (False, False, "snapshot")],
    ids=["cbt-nbd-destroys-data", "no-nbd-keeps-data", "no-cbt-keeps-data"])
def test_new_reference_kind(cbt, nbd, kind):
    assert plan_delta(FACTS._replace(cbt=cbt, nbd=nbd, previous=None), 7).reference_kind == kind


@pytest.mark.parametrize("reference, method, reason", [
    (REF._replace(has_data=True), "cbt-export", None),
    (REF, "full", "NBD unreachable"),
    (None, "full", "NBD unreachable"),
], ids=["reference-with-data-differencing-export", "cbt-metadata-reference-full", "no-reference-full"])
def test_nbd_unreachable_plan(reference, method, reason):
    from vmbackup import nbd_unreachable
    plan = nbd_unreachable(FACTS._replace(reference=reference), "refused")
    assert plan.method == method and plan.reference_kind == "snapshot"
    assert (plan.reason is None) if reason is None else reason in plan.reason


@pytest.mark.parametrize("record, expected", [
    ({"uuid": "r1"}, True),
    ({"uuid": "r2", "other_config": {"vmbackup_chain": "ours"}}, False),
    ({"uuid": "r3", "other_config": {"vmbackup_chain": "another-store"}}, True),
    ({"uuid": "r4"}, False),
    ({"uuid": "r5", "other_config": {"vmbackup_chain": ""}}, False),
], ids=["recorded", "our-chain-moved-past-it", "another-backup-dirs-chain",
        "never-committed-killed-run", "empty-chain-key"])
def test_kept_reference(record, expected):
    from vmbackup import ChainReferences, kept_reference
    refs = ChainReferences(frozenset({"r1"}), frozenset({"ours"}))
    assert kept_reference(record, refs) is expected


def bitmap(*blocks, nbits=128):
    raw = bytearray(nbits // 8)
    for b in blocks:
        raw[b >> 3] |= 0x80 >> (b & 7)
    return bytes(raw)


@pytest.mark.parametrize("bits, size, expected", [
    ((), 8 * MIB, []),
    ((0,), 8 * MIB, [(0, BLOCK)]),
    ((1, 2, 3), 8 * MIB, [(BLOCK, 3 * BLOCK)]),
    ((5, 17), 8 * MIB, [(5 * BLOCK, BLOCK), (17 * BLOCK, BLOCK)]),
    (tuple(range(30, 34)), 8 * MIB, [(30 * BLOCK, 2 * BLOCK), (32 * BLOCK, 2 * BLOCK)]),
    (tuple(range(0, 40)), 8 * MIB, [(0, 2 * MIB), (2 * MIB, 8 * BLOCK)]),
    ((127,), 8 * MIB - 32 * KIB, [(127 * BLOCK, 32 * KIB)]),
    ((127, 200), 8 * MIB, [(127 * BLOCK, BLOCK)]),
], ids=["none", "first", "adjacent-merge", "scattered", "split-at-2MiB-block",
        "whole-block-then-more", "last-cut-at-size", "bits-past-the-end-ignored"])
def test_changed_ranges(bits, size, expected):
    assert changed_ranges(bitmap(*bits, nbits=256), size) == expected


# -- chains against the simulated pool -------------------------------------------------

MODES = {
    # CBT + NBD (TLS): only cbt_metadata references stay on the SR
    "cbt-nbd": dict(nbd={"purpose": "nbd"}),
    # CBT, no network with an NBD purpose: differencing exports, references keep data
    "cbt-export": dict(),
    # an unlicensed pool: no CBT at all
    "no-cbt": dict(restrictions={"restrict_cbt": "true"}),
}
DELTA = {"cbt-nbd": "cbt-nbd", "cbt-export": "cbt-export", "no-cbt": "export"}


def delta_pool(mode="cbt-nbd", disks=None, **extra):
    desc = pools.simple_pool(
        vms=[{"name": "db", "power_state": "Running",
              "disks": disks or [{"size": "8M", "blocks": [0, 3, 40, 90]},
                                 {"size": "4M", "blocks": [1, 33]}]}],
        **dict(MODES[mode], **extra))
    return desc


class Chain:
    """A VM `db` backed up with delta-export into backup_dir, and what its disks held."""

    def __init__(self, pool, args, backup_dir):
        self.pool, self.args, self.backup_dir = pool, args, str(backup_dir)
        self.expected = []     # per point: {device: sha256 of the disk at that run}

    def disk(self, device="xvda"):
        return self.pool.vm_disks("db")[device]

    def state(self):
        return {dev: self.pool.vdi_content(ref).sha256()
                for dev, ref in self.pool.vm_disks("db").items()}

    def run(self, *extra, exit_code=0, fork=False, keep=20):
        before = self.state()
        out = run_vmbackup(*self.args, "-D", "db:%d" % keep, "-d", self.backup_dir, *extra,
                           exit_code=exit_code, fork=fork)
        if exit_code in (0, 1):
            self.expected.append(before)
        return out

    def points(self):
        folder = os.path.join(self.backup_dir, "db")
        return sorted(n for n in os.listdir(folder)
                      if n.startswith("backup-") and os.path.exists(os.path.join(folder, n, "success")))

    def manifest(self, point=-1):
        with open(os.path.join(self.backup_dir, "db", self.points()[point], "backup.json")) as f:
            return json.load(f)

    def chain(self, point=-1, device="xvda"):
        return {d["device"]: d for d in self.manifest(point)["disks"]}[device]["chain"]

    def paths(self, point, device):
        """The chain's files, full first, following the manifests' parent links."""
        name, found = self.points()[point], []
        while True:
            folder = os.path.join(self.backup_dir, "db", name)
            with open(os.path.join(folder, "backup.json")) as f:
                disk = {d["device"]: d for d in json.load(f)["disks"]}[device]
            found.insert(0, os.path.join(folder, disk["file"]))
            if disk["chain"]["parent"] is None:
                return found
            name = disk["chain"]["parent"]["backup"]

    def read_back(self, point, device):
        with ChainReader(self.paths(point, device)) as reader:
            digest = hashlib.sha256()
            for chunk in reader.iter_raw():
                digest.update(chunk)
            return digest.hexdigest()

    def check_every_point(self):
        points = self.points()
        assert len(points) == len(self.expected)
        for i, want in enumerate(self.expected):
            for device, sha in want.items():
                assert self.read_back(i, device) == sha, (i, device)

    def restore_every_point(self):
        """Restore each point into new disks; each must hold the bytes of its run."""
        for i, want in enumerate(self.expected):
            folder = os.path.join(self.backup_dir, "db", self.points()[i])
            out = run_vmbackup("restore", folder, *self.args, "--name", "p%d" % i)
            got = {}
            for line in out.splitlines():
                if line.startswith("restored disk "):
                    _, _, uuid, name = line.split(" ", 3)
                    got[name.split()[-1]] = self.pool.vdi_content(uuid).sha256()
            assert got == want, (i, out)

    def references(self):
        """The snapshot VDIs the tool left on the pool: {uuid: record}."""
        s = session(self.pool)
        try:
            found = {v["uuid"]: s.xenapi.VDI.get_record(v["ref"])
                     for v in self.pool.leftovers()["vdis"]}
            return {u: rec for u, rec in found.items() if rec["is_a_snapshot"]}
        finally:
            s.xenapi.session.logout()


@pytest.fixture
def chain_of(tmp_path, monkeypatch, backup_dir):
    started = []

    def make(desc, kind="api"):
        pool = xapisim.start_pool(desc, keepalive=0.5)
        started.append(pool)
        return Chain(pool, Connect(kind, tmp_path, monkeypatch)(pool), backup_dir)
    yield make
    for pool in started:
        pool.stop()


def nbd_bytes(pool):
    return sum(conn.bytes_sent for conn in pool.nbd.log)


def raw_vdi_bytes(pool):
    return sum(r.bytes_sent for r in pool.calls.http if r.path.startswith("/export_raw_vdi"))


def write_blocks(pool, vdi, blocks, tag=b"v"):
    for b in blocks:
        pool.write_vdi(vdi, b * BLOCK, (tag + b"%d" % b) * (BLOCK // (len(tag) + 4)) +
                       bytes(BLOCK - (BLOCK // (len(tag) + 4)) * (len(tag) + 4)))


def other_sr(pool):
    s = session(pool)
    try:
        return next(r for r, rec in s.xenapi.SR.get_all_records().items() if rec["type"] == "lvm")
    finally:
        s.xenapi.session.logout()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_chain_of_seven_points_reads_back_every_point(chain_of, transport, mode):
    c = chain_of(delta_pool(mode), transport.kind)
    s = session(c.pool)
    x = s.xenapi
    moved = []

    def run_and_measure(changed):
        c.pool.calls.clear()
        before_nbd = nbd_bytes(c.pool)
        c.run()
        moved.append((changed, nbd_bytes(c.pool) - before_nbd, raw_vdi_bytes(c.pool)))

    try:
        c.run()                                                   # 0: full
        write_blocks(c.pool, c.disk(), [5, 17, 33, 101])          # 1: scattered blocks
        run_and_measure(4 * BLOCK)
        c.pool.write_vdi(c.disk("xvdb"), 1 * MIB, b"region" * (MIB // 6))   # 2: a whole region
        run_and_measure(16 * BLOCK)
        write_blocks(c.pool, c.disk(), [0, 127])                  # 3: first and last block
        write_blocks(c.pool, c.disk("xvdb"), [63])
        run_and_measure(3 * BLOCK)
        vm_ref = c.pool.vm("db")[0]                               # 4: resize (offline)
        x.VM.hard_shutdown(vm_ref)
        x.VDI.resize(c.disk(), str(10 * MIB))
        x.VM.start(vm_ref, False, False)
        write_blocks(c.pool, c.disk(), [150])
        c.run()
        write_blocks(c.pool, c.disk(), [7, 159])                  # 5: delta after the resize
        run_and_measure(2 * BLOCK)
        if mode != "no-cbt":                                      # 6: storage migration
            x.VDI.disable_cbt(c.disk("xvdb"))
        x.VDI.pool_migrate(c.disk("xvdb"), other_sr(c.pool), {})
        write_blocks(c.pool, c.disk("xvdb"), [2])
        c.run()
    finally:
        s.xenapi.session.logout()

    methods = [(c.chain(i, "xvda")["method"], c.chain(i, "xvdb")["method"]) for i in range(7)]
    d = DELTA[mode]
    assert methods == [("full", "full"), (d, d), (d, d), (d, d), ("full", d), (d, d), (d, "full")]
    assert "disk size changed" in c.chain(4, "xvda")["reason"]
    assert "another VDI" in c.chain(6, "xvdb")["reason"]
    assert [c.chain(i)["position"] for i in range(7)] == [0, 1, 2, 3, 0, 1, 2]
    c.check_every_point()
    if mode != "cbt-export":      # the same files as no-cbt's: restored with and without CBT
        c.restore_every_point()
    points = [os.path.join(c.backup_dir, "db", p) for p in c.points()]
    out = run_vmbackup("verify", c.backup_dir)      # every link of every chain
    assert "BAD" not in out
    out = run_vmbackup("diff", points[3], points[4])
    assert "xvda" in out and "8.0M" in out and "10.0M" in out

    for changed, over_nbd, over_http in moved:
        if mode == "cbt-nbd":
            # only the changed 64 KiB blocks, plus NBD's request/reply headers
            assert changed <= over_nbd <= changed * 1.1 + 64 * KIB, (changed, over_nbd)
            assert over_http == 0
        else:
            # whole 2 MiB VHD blocks (XAPI sends nothing finer), at most one per changed block
            assert over_nbd == 0 and over_http <= (changed // BLOCK) * 2 * MIB + 64 * KIB
    refs = c.references()
    assert len(refs) == 2                     # one per disk, nothing else left over
    if mode == "cbt-nbd":                     # no data left on the SR
        assert all(rec["type"] == "cbt_metadata" and int(rec["physical_utilisation"]) == 0
                   for rec in refs.values())
    else:                                     # the next differencing export's base
        assert all(rec["type"] != "cbt_metadata" and int(rec["physical_utilisation"]) > 0
                   for rec in refs.values())
    assert {c.chain(-1, d)["reference"]["vdi_uuid"] for d in ("xvda", "xvdb")} == set(refs)
    assert sorted(rec["name_label"] for rec in refs.values()) == [
        "vmbackup reference: db xvda", "vmbackup reference: db xvdb"]
    assert not c.pool.leftovers()["snapshots"]


def test_full_interval_restarts_the_chain(chain_of):
    c = chain_of(delta_pool())
    for i in range(4):
        write_blocks(c.pool, c.disk(), [10 + i])
        c.run("--full-interval", "3")
    assert [c.chain(i)["method"] for i in range(4)] == ["full", "cbt-nbd", "cbt-nbd", "full"]
    assert "full_interval reached" in c.chain(3)["reason"]
    assert c.chain(3)["id"] != c.chain(2)["id"]
    c.check_every_point()


def test_insecure_nbd_works_with_a_warning(chain_of):
    c = chain_of(delta_pool(nbd={"purpose": "insecure_nbd"}))
    assert "insecure NBD" not in c.run()      # a full reads nothing over NBD
    write_blocks(c.pool, c.disk(), [9])
    out = c.run(exit_code=1)
    assert out.count("WARNING vm=db: the pool offers only insecure NBD") == 1
    assert c.chain()["method"] == "cbt-nbd"
    assert not any(conn.tls for conn in c.pool.nbd.log)
    c.check_every_point()


def test_tls_nbd_checks_the_certificate(chain_of):
    c = chain_of(delta_pool())
    c.run()
    first = {c.chain(-1, d)["reference"]["vdi_uuid"] for d in ("xvda", "xvdb")}
    write_blocks(c.pool, c.disk(), [9])
    c.run(fork=True)      # another process: the first run is over, its references are not
    assert c.chain()["method"] == "cbt-nbd"     # leftovers since the chain records them
    assert c.pool.nbd.log and all(conn.tls for conn in c.pool.nbd.log)
    assert not first & set(c.references()) and len(c.references()) == 2
    c.check_every_point()


# -- faults ----------------------------------------------------------------------------

def test_nbd_connection_dropped_mid_read(chain_of):
    c = chain_of(delta_pool())
    c.run()
    write_blocks(c.pool, c.disk(), range(20, 60))
    c.pool.faults.drop_nbd(after_bytes=300 * KIB, times=2)
    out = c.run("-v")
    assert "reconnect" in out
    assert c.chain()["method"] == "cbt-nbd"
    c.check_every_point()


def test_nbd_unreachable_falls_back_and_keeps_data(chain_of):
    c = chain_of(delta_pool())
    c.run()
    write_blocks(c.pool, c.disk(), [12])
    c.pool.faults.refuse_nbd()                    # a firewall in the way
    out = c.run(exit_code=1)
    assert "NBD unreachable" in out
    assert c.chain()["method"] == "full" and "NBD unreachable" in c.chain()["reason"]
    assert c.chain()["reference"]["kind"] == "snapshot"
    write_blocks(c.pool, c.disk(), [13])
    c.run(exit_code=1)                            # still refused: the kept data is the base
    assert c.chain()["method"] == "cbt-export"
    c.pool.faults.clear()
    write_blocks(c.pool, c.disk(), [14])
    c.run()
    assert c.chain()["method"] == "cbt-nbd" and c.chain()["reference"]["kind"] == "cbt_metadata"
    c.check_every_point()
    assert len(c.references()) == 2


def test_cbt_reset_makes_a_full(chain_of, transport):
    c = chain_of(delta_pool(), transport.kind)
    c.run()
    s = session(c.pool)
    try:
        s.xenapi.VDI.disable_cbt(c.disk())
        s.xenapi.VDI.enable_cbt(c.disk())
    finally:
        s.xenapi.session.logout()
    write_blocks(c.pool, c.disk(), [3])
    out = c.run()
    assert c.chain()["method"] == "full" and "reset" in c.chain()["reason"]
    assert c.chain(-1, "xvdb")["method"] == "cbt-nbd"
    assert "xvda full (CBT cannot tell" in out
    c.check_every_point()


def test_reference_destroyed_by_a_person(chain_of):
    c = chain_of(delta_pool())
    c.run()
    s = session(c.pool)
    try:
        ref = s.xenapi.VDI.get_by_uuid(c.chain()["reference"]["vdi_uuid"])
        s.xenapi.VDI.destroy(ref)
    finally:
        s.xenapi.session.logout()
    write_blocks(c.pool, c.disk(), [3])
    c.run()
    assert c.chain()["method"] == "full" and "is gone" in c.chain()["reason"]
    c.check_every_point()
    assert len(c.references()) == 2


def test_data_destroy_refused_for_a_moment(chain_of):
    c = chain_of(delta_pool())
    c.pool.faults.fail("VDI.data_destroy", "VDI_IN_USE", "OpaqueRef:x", "data_destroy", times=2)
    c.run()
    assert {rec["type"] for rec in c.references().values()} == {"cbt_metadata"}
    assert c.chain()["reference"]["kind"] == "cbt_metadata"


def test_full_sr_fails_the_vm_and_keeps_the_chain(chain_of):
    c = chain_of(delta_pool())
    c.run()
    refs = set(c.references())
    c.pool.faults.sr_full("NFS storage")
    c.run(exit_code=2)
    c.pool.faults.clear()
    assert set(c.references()) == refs and not c.pool.leftovers()["snapshots"]
    write_blocks(c.pool, c.disk(), [44])
    c.run()
    assert c.chain()["method"] == "cbt-nbd"
    c.check_every_point()


def test_two_backup_dirs_keep_each_others_references(chain_of, tmp_path):
    """A VM in the delta-export of two configurations (say, a NAS and an offsite disk):
    each run leaves the other's chain alone, and both go on with deltas."""
    a = chain_of(delta_pool())
    other = tmp_path / "offsite"
    other.mkdir()
    b = Chain(a.pool, a.args, other)
    a.run()
    b.run(fork=True)
    for i, c in enumerate([a, b, a, b]):
        write_blocks(c.pool, c.disk(), [20 + i])
        c.run(fork=True)       # another process: every earlier run is over
        assert c.chain()["method"] == "cbt-nbd", c.chain()
    assert len(a.references()) == 4
    assert set(a.references()) == {c.chain(-1, d)["reference"]["vdi_uuid"]
                                   for c in (a, b) for d in ("xvda", "xvdb")}
    a.check_every_point()
    b.check_every_point()


def test_reference_of_a_killed_run_is_a_leftover(chain_of):
    """A point whose run died before `success`: its reference is recorded nowhere, so
    the next run removes it; the recorded one of the last complete point stays."""
    c = chain_of(delta_pool())
    c.run()
    write_blocks(c.pool, c.disk(), [3])
    c.run()
    last = c.points()[-1]
    dead = {c.chain(-1, d)["reference"]["vdi_uuid"] for d in ("xvda", "xvdb")}
    assert dead == set(c.references())
    os.unlink(os.path.join(c.backup_dir, "db", last, "success"))   # as if killed before it
    c.expected.pop()
    c.run(fork=True)     # another process: the runs above are over
    assert not dead & set(c.references()) and len(c.references()) == 2
    assert "is gone" in c.chain()["reason"]     # point 0's reference went when point 1 was made
    c.check_every_point()


def test_kill_9_during_a_delta_export(chain_of, tmp_path):
    c = chain_of(delta_pool(disks=[{"size": "16M", "blocks": [0]}]))
    c.run()
    write_blocks(c.pool, c.disk(), range(0, 200, 2))
    c.pool.faults.throttle_nbd(256 * KIB)
    proc = spawn(c.args + ["-D", "db:20", "-d", c.backup_dir])
    try:
        deadline = time.monotonic() + 60
        while not any(c.pool.nbd.active(h) for h in ("host1", "host2")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    c.pool.faults.clear()
    assert c.pool.leftovers()["snapshots"]           # the killed run's snapshot is still there
    c.run()
    assert c.chain()["method"] == "cbt-nbd"          # the chain goes on from the last good point
    assert not c.pool.leftovers()["snapshots"] and len(c.references()) == 1
    c.check_every_point()


def test_delta_chain_on_python36(chain_of, tmp_path):
    """dom0's Python 3.6 makes a full and a delta over NBD with TLS, and restores it."""
    import shutil
    import XenAPI
    from test_python36 import PY36, run36
    if PY36 is None:
        pytest.skip("no Python 3.6 interpreter on this machine")
    c = chain_of(delta_pool())
    lib = tmp_path / "lib36"
    shutil.copytree(os.path.dirname(XenAPI.__file__), str(lib / "XenAPI"))
    env = dict(os.environ, PYTHONPATH=str(lib), **c.pool.env())
    env.pop("PYTHONHOME", None)
    backup = c.args + ["-D", "db:20", "-d", c.backup_dir]
    c.expected.append(c.state())
    run36(backup, env, tmp_path)
    write_blocks(c.pool, c.disk(), [2, 77])
    c.expected.append(c.state())
    out = run36(backup + ["-v"], env, tmp_path)
    assert "delta over NBD (TLS)" in out and c.chain()["method"] == "cbt-nbd"
    c.check_every_point()
    out = run36(["restore", os.path.join(c.backup_dir, "db", c.points()[-1])] + c.args,
                env, tmp_path)
    uuids = [line.split()[2] for line in out.splitlines() if line.startswith("restored disk ")]
    assert sorted(c.pool.vdi_content(u).sha256() for u in uuids) == sorted(c.expected[-1].values())


def test_pool_without_cbt_api_uses_differencing_exports(chain_of):
    """XenServer 7.1 has no CBT calls at all (MESSAGE_METHOD_UNKNOWN): deltas still work."""
    c = chain_of(delta_pool("cbt-export", release="xenserver-7.1"))
    out = c.run()
    assert "CBT unavailable (MESSAGE_METHOD_UNKNOWN)" in out
    write_blocks(c.pool, c.disk(), [6, 66])
    c.run()
    assert c.chain()["method"] == "export" and c.chain()["reference"]["kind"] == "snapshot"
    c.check_every_point()


def test_sigterm_during_nbd_reads_leaves_the_chain_and_pool_as_they_were(chain_of):
    c = chain_of(delta_pool(disks=[{"size": "16M", "blocks": [0]}]))
    c.run()
    refs = set(c.references())
    write_blocks(c.pool, c.disk(), range(0, 200, 2))
    c.pool.faults.throttle_nbd(64 * KIB)
    proc = spawn(c.args + ["-D", "db:20", "-d", c.backup_dir])
    deadline = time.monotonic() + 60
    while not any(c.pool.nbd.active(h) for h in ("host1", "host2")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)    # the throttled reads would take ~100 s
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    assert not c.pool.leftovers()["snapshots"] and set(c.references()) == refs
    # the server notices the closed connections when its throttled send next wakes up
    wait_for(lambda: not any(c.pool.nbd.active(h) for h in ("host1", "host2")),
             what="the NBD server to see the connections closed")
    c.pool.faults.clear()
    c.run()
    assert c.chain()["method"] == "cbt-nbd"
    c.check_every_point()


def test_marking_the_reference_fails_after_the_point_is_complete(chain_of):
    c = chain_of(delta_pool())
    c.run()
    c.pool.faults.fail("VDI.add_to_other_config", "INTERNAL_ERROR", "boom", times=None,
                       match="vmbackup_chain")
    write_blocks(c.pool, c.disk(), [31])
    out = c.run(exit_code=1)         # a warning: the point itself is complete
    assert "could not be marked" in out and c.chain()["method"] == "cbt-nbd"
    c.pool.faults.clear()
    write_blocks(c.pool, c.disk(), [32])
    c.run(fork=True)      # another process: point 0's references are leftovers now
    assert c.chain()["method"] == "cbt-nbd"
    assert len(c.references()) == 2
    c.check_every_point()


def test_retention_merges_and_the_chain_goes_on(chain_of):
    """Keeping 2 points: each run merges the oldest point into the next on the backup
    storage; the kept points still read back, and the next delta still fits the chain."""
    c = chain_of(delta_pool())
    for i in range(5):
        write_blocks(c.pool, c.disk(), [40 + i])
        c.run(keep=2)
    assert len(c.points()) == 2
    assert [c.chain(i)["method"] for i in range(2)] == ["cbt-nbd", "cbt-nbd"]
    c.expected = c.expected[-2:]
    c.check_every_point()
    assert "BAD" not in run_vmbackup("verify", c.backup_dir)
