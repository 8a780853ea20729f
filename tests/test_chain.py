"""Chains of delta-export points on the backup storage: following them, verifying every link,
retention that merges instead of deleting what a kept point needs, and merges a kill cannot
break (killed at every step, then finished by the next run)."""
import datetime
import errno
import io
import json
import os
import random
import shutil
import signal

import pytest

import vmbackup
from conftest import run_vmbackup
from test_vhd_chain import libvhdi_bytes, vhdiinfo, xo_bytes
from test_verify import ova_xml, pretty

MIB = 1024 * 1024
VM_UUID = "11111111-2222-3333-4444-555555555555"


class ChainBuilder:
    """Writes delta-export points of one VM as the delta-export mode does: one folder per point,
    one VHD per disk (a full, or a delta of the previous point), the manifest with its chain
    fields, success last. Remembers each point's disk content."""

    def __init__(self, root, vm="web01", size=6 * MIB, devices=("xvda", "xvdb"), seed=0):
        self.root, self.vm, self.size, self.devices = str(root), vm, size, devices
        self.store = vmbackup.LocalStore(self.root)
        self.rng = random.Random(seed)
        self.disks = {d: bytearray(size) for d in devices}
        self.last = {}              # device -> (folder name, file, vhd uuid, sha256, chain id, position)
        self.content = {}           # (folder name, device) -> bytes
        self.names = []
        self.day = datetime.datetime(2026, 12, 1, 1, 0, 0)

    def scattered(self, count=6):
        """Return random writes [(offset, data)]: runs of 64 KiB, like CBT's, and odd sectors."""
        writes = []
        for _ in range(count):
            at = self.rng.randrange(0, self.size // 65536) * 65536
            writes.append((at, self.rng.randbytes(65536)))
            sector = self.rng.randrange(0, self.size // 512 - 8) // 8 * 8
            writes.append((sector * 512, self.rng.randbytes(8 * 512)))
        return writes

    def point(self, full=(), writes=None, complete=True, only=None):
        """Write the next point: the disks in `full` (all on the first point) as fulls, the
        others as deltas of the previous point; return its folder name."""
        name = "backup-" + self.day.strftime("%Y-%m-%d-%H%M%S")
        self.day += datetime.timedelta(days=1)
        folder = os.path.join(self.root, self.vm, name)
        os.makedirs(folder)
        with open(os.path.join(folder, "vm-metadata.xml"), "wb") as handle:
            handle.write(pretty(ova_xml()))
        disks, files = [], []
        for n, device in enumerate(self.devices):
            if only is not None and device not in only:
                continue
            change = (writes or {}).get(device) or self.scattered()
            for offset, data in change:
                self.disks[device][offset:offset + len(data)] = data
            file = device + ".vhd"
            previous = self.last.get(device)
            base = previous is None or device in full
            path = os.path.join(folder, file)
            with open(path, "wb") as handle:
                if base:
                    info = vmbackup.write_vhd_from_raw(
                        io.BytesIO(bytes(self.disks[device])), handle, self.size)
                else:
                    parent = vmbackup.ParentRef(previous[2], "../%s/%s" % (previous[0], previous[1]))
                    writer = vmbackup.VhdWriter(handle, self.size, parent=parent)
                    for offset, data in change:
                        writer.write(offset, data)
                    info = writer.close()
            entry = vmbackup.file_entry(folder, file)
            chain_id = ("chain-%s-%d" % (device, len(self.names))) if base else previous[4]
            position = 0 if base else previous[5] + 1
            parent_ref = None if base else vmbackup.chain_parent(previous[0], previous[1],
                                                                 previous[2], previous[3])
            disks.append(dict(device=device, userdevice=str(n), vdi_uuid="vdi-%d" % n,
                              name_label=device, virtual_size=self.size, file=file,
                              chain=vmbackup.chain_entry(
                                  chain_id, position, info.uuid, parent_ref,
                                  {"vdi_uuid": "snap-%s" % name, "kind": "cbt_metadata"},
                                  "full" if base else "cbt-nbd", "first run" if base else None,
                                  info.data_bytes)))
            files.append(entry)
            self.content[(name, device)] = bytes(self.disks[device])
            if complete:
                self.last[device] = (name, file, info.uuid, entry["sha256"], chain_id, position)
        files.insert(0, vmbackup.file_entry(folder, "vm-metadata.xml"))
        manifest = vmbackup.manifest_record(
            {"name": self.vm, "uuid": VM_UUID, "power_state": "Running"}, "delta-export", "api",
            "2026-12-01T01:00:00", "2026-12-01T01:01:00", files, disks, pool={"master": "xcp1"})
        if complete:
            self.store.commit(folder, manifest)
        self.names.append(name)
        return name

    def folder(self, name):
        return os.path.join(self.root, self.vm, name)

    def restored(self, name, device):
        """Return the disk the chain of a point's disk reads as."""
        paths = vmbackup.chain_paths(self.store, self.vm, name, device)
        with vmbackup.ChainReader(paths) as chain:
            return b"".join(chain.iter_raw())


def remaining(builder):
    return sorted(n for n in os.listdir(os.path.join(builder.root, builder.vm))
                  if n.startswith("backup-"))


def verify_all(builder, quick=False):
    """Return {name: (status, problems)} of every point as verify sees it."""
    out = {}
    for name in remaining(builder):
        result = vmbackup.verify_backup(builder.folder(name), quick)
        out[name] = (result.status, [str(p) for p in result.problems])
    return out


# -- following and verifying -------------------------------------------------------------
def test_chain_paths_follow_the_parent_links_from_the_full(tmp_path):
    b = ChainBuilder(tmp_path)
    names = [b.point() for _ in range(4)]
    b.point(full=("xvdb",))
    paths = vmbackup.chain_paths(b.store, b.vm, names[3], "xvda")
    assert paths == [os.path.join(b.folder(n), "xvda.vhd") for n in names]
    assert vmbackup.chain_paths(b.store, b.vm, b.names[4], "xvdb") == \
        [os.path.join(b.folder(b.names[4]), "xvdb.vhd")]
    for name in b.names:
        for device in b.devices:
            assert b.restored(name, device) == b.content[(name, device)]
    assert all(status == "good" for status, _ in verify_all(b).values()), verify_all(b)
    output = run_vmbackup("verify", os.path.join(b.root, b.vm))
    assert "verified 5 backups: 5 good" in output


@pytest.mark.parametrize("damage,where,message", [
    ("parent-gone", 1, "backup backup-2026-12-02-010000 is missing"),
    ("parent-incomplete", 1, "backup backup-2026-12-02-010000 is incomplete"),
    ("parent-file-changed", 0, "sha256 mismatch: the file changed since the backup"),
    ("parent-uuid-differs", 1, "names parent VHD uuid"),
], ids=["parent-gone", "parent-incomplete", "parent-file-changed", "parent-uuid-differs"])
def test_verify_names_the_broken_link(tmp_path, damage, where, message):
    b = ChainBuilder(tmp_path)
    names = [b.point() for _ in range(3)]
    middle = b.folder(names[1])
    if damage == "parent-gone":
        shutil.rmtree(middle)
    elif damage == "parent-incomplete":
        os.unlink(os.path.join(middle, vmbackup.SUCCESS_MARKER))
    elif damage == "parent-file-changed":
        with open(os.path.join(b.folder(names[0]), "xvda.vhd"), "r+b") as handle:
            handle.seek(1536 + 4096 + 600)          # inside the first block's data
            handle.write(b"\x01\x02")
    elif damage == "parent-uuid-differs":
        path = os.path.join(middle, vmbackup.MANIFEST)
        manifest = json.load(open(path))
        manifest["disks"][0]["chain"]["vhd_uuid"] = "00000000-0000-0000-0000-000000000000"
        open(path, "w").write(json.dumps(manifest))
    result = vmbackup.verify_backup(b.folder(names[2]))
    assert result.status == "bad"
    assert any(message in p.message for p in result.problems), result.problems
    output = run_vmbackup("verify", b.folder(names[2]), exit_code=2)
    assert message in output
    if where:
        with pytest.raises(vmbackup.ChainBroken):
            vmbackup.chain_paths(b.store, b.vm, names[2], "xvda")


# -- retention on chains (pure) ------------------------------------------------------------
def P(name, parents=None, complete=True):
    """A ChainPoint named by its day: parents maps device -> parent day (None: a full)."""
    when = datetime.datetime(2026, 12, int(name[1:]))
    links = None if parents is None else {d: ("d%02d" % int(p[1:]) if p else None)
                                          for d, p in parents.items()}
    return vmbackup.ChainPoint("d%02d" % int(name[1:]), when, complete, links)


def steps(points, keep):
    doomed = vmbackup.plan_retention([(p.name, p.when, p.complete) for p in points], keep) \
        if isinstance(keep, int) else keep
    return [(a.kind, a.name, a.into, a.devices) + (() if a.then_delete else ("and keep",))
            for a in vmbackup.plan_chain_retention(points, doomed)]


CHAIN4 = [P("d1", {"xvda": None}), P("d2", {"xvda": "d1"}), P("d3", {"xvda": "d2"}),
          P("d4", {"xvda": "d3"})]


@pytest.mark.parametrize("points,keep,expected", [
    (CHAIN4, 4, []),
    (CHAIN4, 3, [("merge", "d01", "d02", ("xvda",))]),
    (CHAIN4, 2, [("merge", "d01", "d02", ("xvda",)), ("merge", "d02", "d03", ("xvda",))]),
    (CHAIN4, 1, [("merge", "d01", "d02", ("xvda",)), ("merge", "d02", "d03", ("xvda",)),
                 ("merge", "d03", "d04", ("xvda",))]),
    # a new full at d3: the old chain is needed by nobody kept
    (CHAIN4[:2] + [P("d3", {"xvda": None}), P("d4", {"xvda": "d3"})], 2,
     [("delete", "d01", None, ()), ("delete", "d02", None, ())]),
    # two disks: xvdb restarted at d2, so d1 is merged for xvda only
    ([P("d1", {"xvda": None, "xvdb": None}), P("d2", {"xvda": "d1", "xvdb": None}),
      P("d3", {"xvda": "d2", "xvdb": "d2"})], 2,
     [("merge", "d01", "d02", ("xvda",))]),
    # vm-export folders count in the group but are never merged
    ([P("d1"), P("d2", {"xvda": None}), P("d3"), P("d4", {"xvda": "d2"})], 2,
     [("delete", "d01", None, ()), ("merge", "d02", "d04", ("xvda",))]),
    # an incomplete point goes; it is never a parent
    (CHAIN4[:2] + [P("d3", {"xvda": "d2"}, complete=False), P("d4", {"xvda": "d2"})], 3,
     [("delete", "d03", None, ())]),
    # a parent that is already gone: nothing to merge into
    ([P("d2", {"xvda": "d1"}), P("d3", {"xvda": "d2"})], 1,
     [("merge", "d02", "d03", ("xvda",))]),
    # GFS keeps d1 and d3 (a daily and a weekly), not d2: d2 is merged into d3, which then
    # names d1 as its parent
    (CHAIN4, ["d02"], [("merge", "d02", "d03", ("xvda",))]),
    # d2 has no xvdb: d3's xvdb names d1; d1 goes into d2 (xvda) and d3 (xvdb), deleted last
    ([P("d1", {"xvda": None, "xvdb": None}), P("d2", {"xvda": "d1"}),
      P("d3", {"xvda": "d2", "xvdb": "d1"})], 2,
     [("merge", "d01", "d02", ("xvda",), "and keep"), ("merge", "d01", "d03", ("xvdb",))]),
], ids=["keep-all", "oldest-falls-out", "two-fall-out", "keep-only-newest",
        "old-chain-deleted", "per-disk-chains", "vm-export-between", "incomplete-dropped",
        "parent-already-gone", "gfs-hole", "two-children"])
def test_plan_chain_retention(points, keep, expected):
    assert steps(points, keep) == expected


def test_retention_never_deletes_a_file_a_kept_point_needs():
    """Random chains: after the plan's steps (merges make their target a base), every kept
    point's chain is whole, and every folder retention dooms is gone."""
    rng = random.Random(5)
    for _ in range(500):
        points, previous = [], {}
        for day in range(1, rng.randint(2, 14)):
            if rng.random() < 0.15:
                points.append(P("d%d" % day))
                continue
            complete = rng.random() > 0.15
            parents = {d: None if d not in previous or rng.random() < 0.2 else previous[d]
                       for d in ("xvda", "xvdb")}
            points.append(P("d%d" % day, parents, complete))
            if complete:
                previous.update({d: "d%02d" % day for d in parents})
        keep = rng.randint(1, 5)
        doomed = vmbackup.plan_retention([(p.name, p.when, p.complete) for p in points], keep)
        after = {p.name: dict(p.links) if p.links else p.links for p in points}
        for action in vmbackup.plan_chain_retention(points, doomed):
            if action.kind == "merge":
                for device in action.devices:
                    assert after[action.into][device] == action.name
                    after[action.into][device] = None
            if action.then_delete:
                del after[action.name]
        assert sorted(set(p.name for p in points) - set(after)) == sorted(doomed)
        for point in points:
            if point.name not in after or not point.complete or not point.links:
                continue
            for device, parent in point.links.items():
                at = point.name
                while after[at][device] is not None:
                    parent = after[at][device]
                    was_there = parent in {p.name for p in points}
                    assert parent in after or not was_there, (points, keep, doomed)
                    if not was_there:
                        break
                    at = parent


# -- merging -------------------------------------------------------------------------------
def test_retention_merges_the_oldest_delta_into_the_full_without_losing_a_point(tmp_path):
    b = ChainBuilder(tmp_path)
    for n in range(5):
        b.point(full=("xvdb",) if n == 2 else ())
    before = {name: {d: b.content[(name, d)] for d in b.devices} for name in b.names}
    untouched = os.stat(os.path.join(b.folder(b.names[3]), "xvda.vhd"))
    deleted = vmbackup.prune_vm_backups(b.store, b.vm, 3, mode="delta-export", uuid=VM_UUID)
    assert deleted == b.names[:2]
    assert remaining(b) == b.names[2:]
    for name in b.names[2:]:
        for device in b.devices:
            assert b.restored(name, device) == before[name][device], (name, device)
    # the kept full of xvda is the merged file: a dynamic VHD with the absorbed delta's uuid
    base = os.path.join(b.folder(b.names[2]), "xvda.vhd")
    info = vmbackup.vhd_info(base)
    manifest = json.load(open(os.path.join(b.folder(b.names[2]), vmbackup.MANIFEST)))
    chain = manifest["disks"][0]["chain"]
    assert (info.disk_type, info.uuid, chain["parent"], chain["merged"]) == \
        (3, chain["vhd_uuid"], None, b.names[:2])
    # the next delta's file is untouched; its parent link names the merged file's sha256
    assert os.stat(os.path.join(b.folder(b.names[3]), "xvda.vhd")).st_mtime_ns == \
        untouched.st_mtime_ns
    assert vhdiinfo(base)["Identifier"] == info.uuid
    assert libvhdi_bytes(tmp_path, base, os.path.join(b.folder(b.names[3]), "xvda.vhd")) == \
        before[b.names[3]]["xvda"]
    for name in b.names[2:]:        # Xen Orchestra's VHD library reads the merged chains too
        assert xo_bytes(tmp_path, os.path.join(b.folder(name), "xvda.vhd")) == before[name]["xvda"]
    assert all(s == "good" for s, _ in verify_all(b).values()), verify_all(b)
    assert not os.path.exists(os.path.join(b.root, b.vm, vmbackup.MERGE_JOURNAL))


def test_a_delta_dropped_between_kept_points_is_merged_into_the_next(tmp_path):
    """GFS retention can keep a point and drop its child: the child's delta goes into the
    grandchild's file, which then names the kept point as its parent."""
    b = ChainBuilder(tmp_path)
    for _ in range(4):
        b.point()
    before = {(n, d): b.content[(n, d)] for n in b.names for d in b.devices}
    vmbackup.merge_points(b.store, b.vm, b.names[1], b.names[2], b.devices)
    assert remaining(b) == [b.names[0], b.names[2], b.names[3]]
    for name in remaining(b):
        for device in b.devices:
            assert b.restored(name, device) == before[(name, device)], (name, device)
    merged = os.path.join(b.folder(b.names[2]), "xvda.vhd")
    info = vmbackup.vhd_info(merged)
    full = vmbackup.vhd_info(os.path.join(b.folder(b.names[0]), "xvda.vhd"))
    assert (info.disk_type, info.parent_uuid, info.parent_path) == \
        (4, full.uuid, "../%s/xvda.vhd" % b.names[0])
    chain = json.load(open(os.path.join(b.folder(b.names[2]), vmbackup.MANIFEST)))["disks"][0]["chain"]
    assert chain["parent"]["backup"] == b.names[0] and chain["merged"] == [b.names[1]]
    assert libvhdi_bytes(tmp_path, os.path.join(b.folder(b.names[0]), "xvda.vhd"), merged) == \
        before[(b.names[2], "xvda")]
    assert xo_bytes(tmp_path, os.path.join(b.folder(b.names[3]), "xvda.vhd")) == \
        before[(b.names[3], "xvda")]
    assert all(s == "good" for s, _ in verify_all(b).values()), verify_all(b)


def test_a_full_two_later_points_need_is_merged_into_both(tmp_path):
    """The second point left xvdb out: the third point's xvdb is a delta of the first. When
    the first goes, its xvda goes into the second point and its xvdb into the third."""
    b = ChainBuilder(tmp_path)
    b.point()
    b.point(only=("xvda",))
    b.point()
    before = dict(b.content)
    deleted = vmbackup.prune_vm_backups(b.store, b.vm, 2, mode="delta-export", uuid=VM_UUID)
    assert deleted == [b.names[0]] and remaining(b) == b.names[1:]
    assert b.restored(b.names[1], "xvda") == before[(b.names[1], "xvda")]
    for device in b.devices:
        assert b.restored(b.names[2], device) == before[(b.names[2], device)]
    assert vmbackup.vhd_info(os.path.join(b.folder(b.names[2]), "xvdb.vhd")).disk_type == 3
    assert all(s == "good" for s, _ in verify_all(b).values()), verify_all(b)


def test_a_merge_stopped_by_a_full_disk_is_finished_by_the_next_run(tmp_path, monkeypatch):
    b = ChainBuilder(tmp_path)
    for _ in range(4):
        b.point()
    before = dict(b.content)

    def full_disk(what):
        if what == "footer":
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(vmbackup, "MERGE_HOOKS", [full_disk])
    log = vmbackup.UnitLog("web01")
    assert vmbackup.prune_vm_backups(b.store, b.vm, 2, vlog=log, mode="delta-export",
                                     uuid=VM_UUID) == []
    assert [p.severity for p in log.met] == ["warning"]
    assert "No space left on device" in log.met[0].message and "next run" in log.met[0].message
    assert os.path.exists(os.path.join(b.root, b.vm, vmbackup.MERGE_JOURNAL))
    with pytest.raises(vmbackup.ChainBroken, match="is not finished"):
        vmbackup.merge_points(b.store, b.vm, b.names[1], b.names[2], ("xvda",))
    monkeypatch.setattr(vmbackup, "MERGE_HOOKS", [])
    assert vmbackup.prune_vm_backups(b.store, b.vm, 2, mode="delta-export",
                                     uuid=VM_UUID) == [b.names[1]]
    assert remaining(b) == b.names[2:]
    for name in b.names[2:]:
        for device in b.devices:
            assert b.restored(name, device) == before[(name, device)]
    assert all(s == "good" for s, _ in verify_all(b).values()), verify_all(b)


def test_a_merge_that_cannot_link_keeps_both_points(tmp_path):
    b = ChainBuilder(tmp_path)
    for _ in range(3):
        b.point()
    with open(os.path.join(b.folder(b.names[1]), "xvda.vhd"), "r+b") as handle:
        handle.seek(-700, os.SEEK_END)
        handle.write(b"garbage")
    log = vmbackup.UnitLog("web01")
    deleted = vmbackup.prune_vm_backups(b.store, b.vm, 2, vlog=log, mode="delta-export",
                                        uuid=VM_UUID)
    assert deleted == [] and remaining(b) == b.names
    assert [p.severity for p in log.met] == ["warning"]
    assert "is kept" in log.met[0].message and "changed since the backup" in log.met[0].message


def prune_killed_at(root, at):
    """Run retention (keep 2) in a forked process that SIGKILLs itself at the merge's step
    `at` (0: never); return the steps it announced and how it ended."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # the child: a run killed mid-merge
        os.close(reader)
        steps = []

        def hook(what):
            steps.append(what)
            os.write(writer, (what + "\n").encode())
            if len(steps) == at:
                os.kill(os.getpid(), signal.SIGKILL)
        vmbackup.MERGE_HOOKS.append(hook)
        try:
            vmbackup.prune_vm_backups(vmbackup.LocalStore(str(root)), "web01", 2,
                                      mode="delta-export", uuid=VM_UUID)
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        steps = pipe.read().split()
    _, status = os.waitpid(pid, 0)
    return steps, status


def test_a_merge_killed_at_any_step_is_finished_by_the_next_run(tmp_path):
    """kill -9 at every change a merge makes (journal, each block, BAT, footers, renames,
    manifests, delete): the next run finishes it, and every point that should stay reads
    back byte-exact and verifies."""
    template = tmp_path / "template"
    b = ChainBuilder(template)
    r = b.rng.randbytes
    b.point(writes={"xvda": [(0, r(65536))], "xvdb": [(MIB, r(8192))]})
    # xvda: a block the full lacks (appended by the merge) and sectors of one it has
    b.point(writes={"xvda": [(4 * MIB, r(65536)), (4096, r(4096))], "xvdb": [(MIB, r(512))]})
    b.point(writes={"xvda": [(5 * MIB, r(65536))], "xvdb": [(3 * MIB, r(1024))]})
    b.point(writes={"xvda": [(0, r(512))], "xvdb": [(0, r(512))]})
    kept = b.names[2:]
    expected = {(name, d): b.content[(name, d)] for name in kept for d in b.devices}
    dry = tmp_path / "dry"
    shutil.copytree(str(template), str(dry))
    names, status = prune_killed_at(dry, 0)
    assert os.WIFEXITED(status)
    assert names[0] == "journal" and names.count("journal") == 2 and "rename" in names
    assert len(names) > 12, names
    for at in range(1, len(names) + 1):
        root = tmp_path / ("kill%d" % at)
        shutil.copytree(str(template), str(root))
        done, status = prune_killed_at(root, at)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, at
        assert done == names[:at]
        killed = ChainBuilder(root)
        # until the next run, the points of an interrupted merge say so
        if os.path.exists(os.path.join(str(root), "web01", vmbackup.MERGE_JOURNAL)):
            status = verify_all(killed, quick=True)
            assert any("merge" in " ".join(p) for _, p in status.values()), status
        vmbackup.prune_vm_backups(killed.store, "web01", 2, mode="delta-export", uuid=VM_UUID)
        assert remaining(killed) == kept, (at, names[at - 1])
        for (name, device), data in expected.items():
            assert killed.restored(name, device) == data, (at, names[at - 1], name, device)
        status = verify_all(killed)
        assert all(s == "good" for s, _ in status.values()), (at, names[at - 1], status)
        assert not [n for n in os.listdir(os.path.join(str(root), "web01"))
                    if n.startswith(".")], at
        shutil.rmtree(str(root))


# -- list and preview ------------------------------------------------------------------------
def test_list_shows_each_point_of_the_chains(tmp_path):
    b = ChainBuilder(tmp_path)
    for n in range(4):
        b.point(full=("xvdb",) if n == 2 else ())
    vmbackup.prune_vm_backups(b.store, b.vm, 3, mode="delta-export", uuid=VM_UUID)
    output = run_vmbackup("list", "-d", b.root)
    lines = output.splitlines()
    newest = lines.index(next(l for l in lines if l.startswith("  2026-12-04")))
    assert "delta-export" in lines[newest] and "sizes ok" in lines[newest]
    assert lines[newest + 1].split()[:5] == ["xvda", "chain", "chain-xv", "point", "3"]
    assert "delta of %s" % b.names[2] in lines[newest + 1]
    assert "base of the chain (full)" in lines[newest + 5]         # xvda of the oldest kept
    data = json.loads(run_vmbackup("list", "-d", b.root, "--json", "-"))
    points = data["vms"][0]["backups"]
    assert [(p["name"], [(d["device"], d["position"], d["parent"]) for d in p["chain"]])
            for p in points] == [
        (b.names[3], [("xvda", 3, b.names[2]), ("xvdb", 1, b.names[2])]),
        (b.names[2], [("xvda", 2, b.names[1]), ("xvdb", 0, None)]),
        (b.names[1], [("xvda", 1, None), ("xvdb", 1, None)])]


class _Selector:
    gfs = None


class _Vm:
    name, mode, uuid, selector = "web01", "delta-export", VM_UUID, _Selector()

    def __init__(self, keep):
        self.max_backups = keep


class _Plan:
    problems = ()

    def __init__(self, keep):
        self.vm = _Vm(keep)


class _Config:
    keep_daily = keep_weekly = keep_monthly = keep_yearly = 0

    def __init__(self, root):
        self.backup_dir = root


def test_preview_says_which_points_a_merge_would_absorb(tmp_path):
    b = ChainBuilder(tmp_path)
    for n in range(4):
        b.point(full=("xvdb",) if n == 2 else ())
    planned = vmbackup.planned_deletions(_Config(b.root), [_Plan(3)])
    assert planned == (
        ("web01", "%s (merged into %s: xvda)" % (b.names[0], b.names[1])),
        ("web01", "%s (merged into %s: xvda)" % (b.names[1], b.names[2])))
    assert remaining(b) == b.names                 # a preview changes nothing
