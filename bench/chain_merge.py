#!/usr/bin/env python3
"""What a chain costs on the backup storage: merging vs writing a full, reading 7 points vs 1  (run on demand)

One disk of --size (default 2 GiB) with --filled of its 2 MiB blocks holding data, a
full and then six deltas, each changing --changed (default 1 %) of the disk's 64 KiB
blocks at scattered places, written as delta-export points (VHD files, manifests).
Measured side by side in one run, on the same file system (--dir):

- the full written from raw (write_vhd_from_raw, what a full run writes) vs retention's
  merge of the oldest delta into that full (merge_points: patch in place, new sha256,
  manifests): the ratio merge / full;
- reading the 7th point through ChainReader (the full and six deltas) vs reading the full
  alone: the ratio of their wall times (best of --rounds, alternated).

Files are fresh, so mostly in the page cache: this measures the work, not the disk.

    python3 bench/chain_merge.py [--size 2G] [--changed 1] [--filled 50] [--dir /tmp] [--rounds 3]
"""
import argparse
import datetime
import hashlib
import os
import random
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import vmbackup  # noqa: E402

MIB = 1024 * 1024
CBT = 64 * 1024
VM = {"name": "bench", "uuid": "11111111-2222-3333-4444-555555555555", "power_state": "Running"}


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units \
        else int(text)


def write_point(store, vm_dir, when, make, parent=None, size=0):
    """Write a delta-export point: `make(handle)` writes xvda.vhd and returns its VhdInfo."""
    name = "backup-" + when.strftime("%Y-%m-%d-%H%M%S")
    folder = os.path.join(vm_dir, name)
    os.makedirs(folder)
    with open(os.path.join(folder, "xvda.vhd"), "wb") as handle:
        info = make(handle)
        handle.flush()
        os.fsync(handle.fileno())
    entry = vmbackup.file_entry(folder, "xvda.vhd")
    link = None if parent is None else vmbackup.chain_parent(*parent)
    disk = dict(device="xvda", userdevice="0", vdi_uuid="vdi-0", name_label="xvda",
                virtual_size=size, file="xvda.vhd",
                chain=vmbackup.chain_entry("bench-chain", 0 if parent is None else 1, info.uuid,
                                           link, None, "full" if parent is None else "cbt-nbd",
                                           None, info.data_bytes))
    store.commit(folder, vmbackup.manifest_record(VM, "delta-export", "api", "", "", [entry],
                                                  [disk]))
    return name, info, entry["sha256"]


def read_all(paths):
    """Read a chain's whole disk through ChainReader; return (seconds, sha256)."""
    digest = hashlib.sha256()
    began = time.monotonic()
    with vmbackup.ChainReader(paths) as chain:
        for piece in chain.iter_raw():
            digest.update(piece)
    return time.monotonic() - began, digest.hexdigest()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="2G")
    parser.add_argument("--changed", type=float, default=1.0, help="%% of 64 KiB blocks per delta")
    parser.add_argument("--filled", type=float, default=50.0, help="%% of 2 MiB blocks with data")
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--rounds", type=int, default=3, help="reads of each, the best counts")
    args = parser.parse_args()
    size = parse_size(args.size) // (2 * MIB) * (2 * MIB)
    rng = random.Random(1)
    work = tempfile.mkdtemp(prefix="chain-bench-", dir=args.dir)
    try:
        raw = os.path.join(work, "disk.raw")
        with open(raw, "wb") as handle:
            handle.truncate(size)
            for block in range(size // (2 * MIB)):
                if rng.random() * 100 < args.filled:
                    handle.seek(block * 2 * MIB)
                    handle.write(os.urandom(2 * MIB))
        store = vmbackup.LocalStore(work)
        vm_dir = os.path.join(work, "bench")
        day = datetime.datetime(2026, 12, 1, 1, 0, 0)

        def full(handle):
            with open(raw, "rb") as source:
                return vmbackup.write_vhd_from_raw(source, handle, size)
        began = time.monotonic()
        points = [write_point(store, vm_dir, day, full, size=size)]
        full_seconds = time.monotonic() - began
        changes = max(1, int(size // CBT * args.changed / 100))
        for n in range(1, 7):
            name, info, sha = points[-1]

            def delta(handle, parent=vmbackup.ParentRef(info.uuid, "../%s/xvda.vhd" % name)):
                writer = vmbackup.VhdWriter(handle, size, parent=parent)
                for block in rng.sample(range(size // CBT), changes):
                    writer.write(block * CBT, os.urandom(CBT))
                return writer.close()
            points.append(write_point(store, vm_dir, day + datetime.timedelta(days=n), delta,
                                      (name, "xvda.vhd", info.uuid, sha), size))
        paths = vmbackup.chain_paths(store, "bench", points[-1][0], "xvda")
        chain_seconds, alone_seconds = [], []
        for _ in range(args.rounds):        # alternated, best of each: the page cache is warm
            seconds, chain_sha = read_all(paths)
            chain_seconds.append(seconds)
            alone_seconds.append(read_all(paths[:1])[0])
        chain_seconds, alone_seconds = min(chain_seconds), min(alone_seconds)
        marks = []
        vmbackup.MERGE_HOOKS.append(lambda what: marks.append((what, time.monotonic())))
        began = time.monotonic()
        vmbackup.merge_points(store, "bench", points[0][0], points[1][0], ("xvda",))
        merge_seconds = time.monotonic() - began
        at = dict((what, when) for what, when in reversed(marks))    # first time of each step
        phases = [("check the delta (sha256) and plan", began, at["journal"]),
                  ("patch the full in place", at["journal"], at["rename"]),
                  ("sha256 of the merged full, manifests", at["rename"], at["delete"]),
                  ("delete the old point, forget the journal", at["delete"], began + merge_seconds)]
        after = vmbackup.chain_paths(store, "bench", points[-1][0], "xvda")
        assert len(after) == 6 and read_all(after)[1] == chain_sha, "the merge changed the disk"
        delta_bytes = changes * CBT
        print("disk %s, %.0f%% of 2 MiB blocks filled, each delta %.2f%% of 64 KiB blocks "
              "(%s)" % (vmbackup.human_size(size), args.filled, args.changed,
                        vmbackup.human_size(delta_bytes)))
        print("%-44s %9s %9s" % ("", "seconds", "ratio"))
        print("%-44s %9.2f %9s" % ("write the full from raw", full_seconds, "1.00"))
        print("%-44s %9.2f %9.3f" % ("merge the oldest delta into the full",
                                     merge_seconds, merge_seconds / full_seconds))
        for label, start, end in phases:
            print("  %-42s %9.2f %9.3f" % (label, end - start, (end - start) / full_seconds))
        print("%-44s %9.2f %9s" % ("read the full alone (ChainReader)", alone_seconds, "1.00"))
        print("%-44s %9.2f %9.2f" % ("read the 7th point (full + 6 deltas)",
                                     chain_seconds, chain_seconds / alone_seconds))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
