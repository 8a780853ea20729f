"""Fitting the backup window (issue 14): the api transport's copy loop (reused buffers,
sha256 in a second thread, sparse raw files), max_rate, and progress."""
import hashlib
import json
import io
import os
import time

import pytest

import vmbackup
from vmbackup import (
    ApiTransport, BlockHasher, Config, Pacer, build_config, parse_config, parse_rate, read_pool)
from conftest import assert_pool_clean, backups_of, run_vmbackup
from xapisim import pools, start_pool

MIB = 1 << 20


@pytest.mark.parametrize("text, value", [
    ("100M", 100 * MIB), ("100m", 100 * MIB), ("1.5G/s", 3 * (1 << 29)), ("2048", 2048),
    ("64KiB", 64 * 1024), ("10MB/s", 10 * MIB), ("0", None), ("0M", None),
], ids=lambda v: str(v))
def test_parse_rate(text, value):
    assert parse_rate(text) == value


@pytest.mark.parametrize("text", ["", "fast", "-1M", "10X", "1,5M"])
def test_parse_rate_refuses(text):
    with pytest.raises(ValueError):
        parse_rate(text)


def test_max_rate_and_progress_interval_settings():
    parsed = parse_config("max_rate=100M\nprogress_interval=5\n", "t.cfg")
    config = build_config(parsed)
    assert config.max_rate == 100 * MIB and config.progress_interval == 5
    assert Config().max_rate is None and Config().progress_interval == 60


def transport_for(**settings):
    """An ApiTransport that only streams (no pool): its settings are all it reads."""
    t = ApiTransport.__new__(ApiTransport)
    t.config = Config(**settings)
    return t


def test_stream_hashes_writes_and_keeps_raw_files_sparse(tmp_path):
    mib = os.urandom(MIB)
    # a raw disk: data, a zero MiB, data cut short, then zeros to the end
    body = mib + bytes(MIB) + mib[:1000] + bytes(3 * MIB - 1000) + bytes(MIB)
    dest = str(tmp_path / "disk.raw")
    nbytes, digest = transport_for().stream(io.BytesIO(body), dest, "test", sparse=True)
    assert (nbytes, digest) == (len(body), hashlib.sha256(body).hexdigest())
    with open(dest, "rb") as f:
        assert f.read() == body
    assert os.stat(dest).st_blocks * 512 < len(body) - 2 * MIB  # the zero MiBs were skipped


def test_block_hasher_reuses_its_buffers():
    """Memory stays flat: every block goes through the same few buffers."""
    seen, expect = set(), hashlib.sha256()
    with BlockHasher(nbuffers=3, size=4096) as hasher:
        for i in range(200):
            buf = hasher.buffer()
            seen.add(id(buf))
            buf[:] = bytes([i % 256]) * 4096
            expect.update(buf[:4000])
            hasher.hash(buf, 4000)
        assert hasher.hexdigest() == expect.hexdigest()
    assert len(seen) <= 3


def test_stream_with_max_rate_is_never_faster_than_the_rate(tmp_path):
    body = os.urandom(2 * MIB)
    began = time.monotonic()
    transport_for(max_rate=8 * MIB).stream(io.BytesIO(body), str(tmp_path / "x"), "test")
    assert time.monotonic() - began >= len(body) / (8.0 * MIB)  # a lower bound only


def test_pacer_without_a_rate_never_waits():
    pacer, began = Pacer(None), time.monotonic()
    pacer.pace(1 << 40)
    assert time.monotonic() - began < 1


@pytest.fixture
def dense_pool():
    size = 3 * MIB
    desc = pools.simple_pool(vms=[{"name": "dense", "power_state": "Halted", "disks": [
        {"size": size, "blocks": list(range(size // 65536))}]}])
    with start_pool(desc) as pool:
        yield pool


def test_max_rate_limits_a_real_export(dense_pool, api, backup_dir):
    """--max-rate 4M on a 3 MiB disk: the run cannot take less than 0.75 s."""
    began = time.monotonic()
    run_vmbackup(*api(dense_pool), "-E", "dense", "--vdi-format", "raw", "--max-rate", "4M",
                 "-d", backup_dir)
    elapsed = time.monotonic() - began
    assert elapsed >= 3 * MIB / (4.0 * MIB)  # a lower bound only: a busy machine is slower
    (name,) = backups_of(backup_dir, "dense")
    disk = os.path.join(str(backup_dir), "dense", name, "dense.raw")
    assert os.path.getsize(disk) == 3 * MIB
    assert_pool_clean(dense_pool)


def test_max_rate_makes_auto_pick_the_api_transport():
    class Endpoint:
        is_local = True

    class Xapi:
        endpoint = Endpoint()
    config = Config(max_rate=MIB, xe_path="/bin/true")
    assert vmbackup.make_transport(config, Xapi(), None).name == "api"


# -- few bytes: a few selected VMs read only their own disks and networks ------------

def test_few_selected_vms_read_only_their_records(api, backup_dir):
    with start_pool(pools.large_pool(300)) as pool:
        pool.calls.clear()
        one = run_vmbackup(*api(pool), "-e", "vm-0007", "-d", backup_dir, "--preview",
                           "--json", "-")
        counts = pool.calls.counts()
        assert "VBD.get_all_records" not in counts and "VDI.get_all_records" not in counts
        assert pool.calls.count() <= 15 + vmbackup.FEW_RECORDS
        pool.calls.clear()
        whole = run_vmbackup(*api(pool), "-e", "vm-0007", "-e", "vm-0[0-9]*", "-d",
                             backup_dir, "--preview", "--json", "-")
        assert "VBD.get_all_records" in pool.calls.counts()   # many VMs: whole tables
    assert json.loads(one)["vms"] == [vm for vm in json.loads(whole)["vms"]
                                      if vm["name"] == "vm-0007"]


def test_read_pool_few_or_whole_gives_the_same_records_of_the_wanted_vms(sim_pool):
    """The lean read and the whole-table read agree on every record a selected VM uses."""
    s = sim_pool.session()
    try:
        xapi = XenApiCaller(s)
        ref = sim_pool.vm("db01")[0]
        lean = read_pool(xapi, lambda vms: [ref])
        full = read_pool(xapi)
    finally:
        s.xenapi.session.logout()
    vm = full.vms[ref]
    assert {r: full.vbds[r] for r in vm["VBDs"]} == lean.vbds
    for vbd in lean.vbds.values():
        if vbd["VDI"] != "OpaqueRef:NULL":
            assert lean.vdis[vbd["VDI"]] == full.vdis[vbd["VDI"]]
    assert {r: full.vifs[r] for r in vm["VIFs"]} == lean.vifs
    assert set(lean.networks) == {v["network"] for v in lean.vifs.values()}
    snaps = {r for r, v in full.vdis.items() if v["is_a_snapshot"]}
    assert snaps <= set(lean.vdis)


class XenApiCaller:
    """The `call(method, *args)` read_pool uses, over a XenAPI session."""

    def __init__(self, session):
        self.session = session

    def call(self, method, *args):
        obj = self.session.xenapi
        for part in method.split("."):
            obj = getattr(obj, part)
        return obj(*args)
