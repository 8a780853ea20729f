"""Pool descriptions: plain, JSON-compatible dicts that ``xapisim.start_pool``
(via ``model.build``) turns into a live pool.

Format (every key optional except ``vms`` entries' ``name``)::

    {
      "name": "demo-pool",                  # pool name_label
      "release": "xcp-ng-8.3",              # a key of RELEASES, or a dict of its fields
      "checksum": "xxhash",                 # XVA chunk checksums: "xxhash" | "sha1"
      "password": "xenroot",                # root's password
      "seed": 1,                            # uuids, MACs and disk seeds derive from it
      "hosts": ["xcp1", "xcp2"],            # first = master; or dicts {"name": ...}
      "networks": [{"name": "Pool-wide network associated with eth0",
                    "bridge": "xenbr0", "mtu": 1500,
                    "purpose": ["insecure_nbd"],   # or ["nbd"] (TLS): VDI.get_nbd_info
                    "ip": true}],                  # hosts' PIFs carry their address
                                                   # (always so on the first network)
      "nbd": {"purpose": "nbd",             # shorthand: add it to the first network
              "protocol": "xapi",           # "xapi" (as xapi-nbd) | "extended" (GO, INFO,
                                            # structured replies); see nbd.py
              "port": 0,                    # 0 = a free port shared by all hosts
              "max_connections": 16},
      "srs": [
        {"name": "NFS storage", "type": "nfs", "shared": true, "size": "100G",
         "default": true},
        {"name": "Local storage", "type": "lvm", "host": "*", "size": "50G"},  # one per host
        {"name": "ISO library", "type": "iso", "shared": true,
         "isos": ["debian-12.5.0-amd64-netinst.iso"]}
      ],
      "vms": [
        {"name": "web01", "power_state": "Running", "host": "xcp1",
         "memory": "2G", "vcpus": 2,
         "disks": [{"name": "web01 root", "size": "8M", "blocks": [0, 3, 77]},   # on default SR
                   {"size": "4M", "sr": "local"}],  # "local" = the VM's host's local SR
         "cd": "debian-12.5.0-amd64-netinst.iso",  # ISO name; "" = empty CD drive
         "vifs": ["Pool-wide network associated with eth0"],  # network names (or indexes)
         "os": {"name": "Debian GNU/Linux 12 (bookworm)", "distro": "debian",
                "major": "12", "minor": "5"},     # VM_guest_metrics.os_version
         "snapshots": ["web01 before upgrade"],   # made by a person, not leftovers
         "tags": [], "other_config": {}, "blocked_operations": {}},
        {"name": "Debian Bookworm 12", "template": true, "default_template": true}
      ]
    }

A disk's ``sr`` is an SR name_label (unique), an SR uuid, ``"local"`` (the
VM's ``host``'s local SR) or ``"local:<host name>"``; ``blocks`` lists the
non-zero 64 KiB blocks (or is a count: that many pseudo-random blocks, block 0
included); ``seed`` fixes their content.  Sizes accept ints or "4M"/"2G".
"""
import copy

# product_version, brand, xapi version, API version: facts section 0
RELEASES = {
    "xcp-ng-8.2": {"product_brand": "XCP-ng", "product_version": "8.2.1",
                   "xapi": "1.249.41", "api": [2, 16], "build_number": "release/yangtze/master/58",
                   "platform_version": "3.2.1", "xen": "4.13.5-9.49"},
    "xcp-ng-8.3": {"product_brand": "XCP-ng", "product_version": "8.3.0",
                   "xapi": "26.1.3", "api": [2, 21], "build_number": "cloud",
                   "platform_version": "3.4.0", "xen": "4.17.5-15"},
    "xenserver-8": {"product_brand": "XenServer", "product_version": "8.4.0",
                    "xapi": "25.33.1", "api": [2, 21], "build_number": "8.4.0",
                    "platform_version": "3.4.0", "xen": "4.17.5"},
    "citrix-8.2": {"product_brand": "Citrix Hypervisor", "product_version": "8.2.1",
                   "xapi": "1.249.38", "api": [2, 15], "build_number": "release/yangtze/master/58",
                   "platform_version": "3.2.1", "xen": "4.13.5"},
    # before Citrix Hypervisor 8.1: snapshot_with_quiesce still exists
    "xenserver-7.1": {"product_brand": "XenServer", "product_version": "7.1.2",
                      "xapi": "1.14.0", "api": [2, 7], "build_number": "137272c",
                      "platform_version": "2.2.2", "xen": "4.7.6"},
}
DEFAULT_RELEASE = "xcp-ng-8.3"

NET0 = "Pool-wide network associated with eth0"
NET1 = "Storage network"
ISO_DEBIAN = "debian-12.5.0-amd64-netinst.iso"
ISO_WIN = "SERVER_EVAL_x64FRE_en-us.iso"
ISO_TOOLS = "guest-tools.iso"

OS_DEBIAN = {"name": "Debian GNU/Linux 12 (bookworm)", "distro": "debian", "major": "12",
             "minor": "5", "uname": "6.1.0-18-amd64"}
OS_UBUNTU = {"name": "Ubuntu 22.04.4 LTS", "distro": "ubuntu", "major": "22", "minor": "04",
             "uname": "5.15.0-101-generic"}
OS_WINDOWS = {"name": "Microsoft Windows Server 2022 Standard|C:\\Windows|\\Device\\Harddisk0\\Partition2",
              "distro": "windows", "major": "10", "minor": "0", "spmajor": "0", "spminor": "0"}
OS_CENTOS = {"name": "CentOS Linux 7 (Core)", "distro": "centos", "major": "7", "minor": "9",
             "uname": "3.10.0-1160.el7.x86_64"}

DEFAULT_TEMPLATES = ["Debian Bookworm 12", "Ubuntu Jammy Jellyfish 22.04",
                     "Windows Server 2022 (64-bit)", "CentOS 7", "Other install media"]


def _base(name="demo-pool", hosts=("xcp-ng-a", "xcp-ng-b", "xcp-ng-c"), release=DEFAULT_RELEASE):
    return {
        "name": name,
        "release": release,
        "checksum": "xxhash",
        "password": "xenroot",
        "seed": 1,
        "hosts": list(hosts),
        "networks": [{"name": NET0, "bridge": "xenbr0", "mtu": 1500},
                     {"name": NET1, "bridge": "xenbr1", "mtu": 9000}],
        "srs": [
            {"name": "NFS storage", "type": "nfs", "shared": True, "size": "200G", "default": True,
             "description": "NFS SR [nas01:/export/xen]"},
            {"name": "Local storage", "type": "lvm", "host": "*", "size": "100G"},
            {"name": "ISO library", "type": "iso", "shared": True, "size": "50G",
             "isos": [ISO_DEBIAN, ISO_WIN, ISO_TOOLS]},
        ],
        "vms": [dict(name=t, template=True, default_template=True) for t in DEFAULT_TEMPLATES],
    }


def demo_pool():
    """The demo pool: 3 hosts, shared NFS + local LVM + ISO SRs, 2 networks and
    VMs in every state a real pool has, with the awkward names backup tools trip over."""
    d = _base()
    a, b, c = d["hosts"]
    d["vms"] += [
        # --- ordinary VMs ---------------------------------------------------
        {"name": "web01", "power_state": "Running", "host": a, "memory": "2G", "vcpus": 2,
         "disks": [{"name": "web01 root", "size": "8M", "blocks": [0, 5, 17, 100]},
                   {"name": "web01 data", "size": "4M", "blocks": [1, 40]}],
         "cd": ISO_DEBIAN, "vifs": [NET0, NET1], "os": OS_DEBIAN,
         "snapshots": ["web01 before upgrade"], "tags": ["production", "web"]},
        {"name": "db01", "power_state": "Halted", "memory": "4G", "vcpus": 4,
         "disks": [{"name": "db01 system", "size": "6M", "blocks": [0, 2, 90]},
                   {"name": "db01 data", "size": "4M", "blocks": [0, 63]},
                   {"name": "db01 logs", "size": "3M", "blocks": [7]}],
         "cd": "", "vifs": [NET0, NET0, NET1], "os": OS_CENTOS},
        {"name": "win2022", "power_state": "Running", "host": b, "memory": "4G", "vcpus": 2,
         "disks": [{"name": "win2022 C:", "size": "8M", "blocks": [0, 1, 2, 127]}],
         "cd": ISO_TOOLS, "vifs": [NET0], "os": OS_WINDOWS,
         "platform": {"viridian": "true", "device_id": "0002"}},
        {"name": "suspended-vm", "power_state": "Suspended", "memory": "1G",
         "disks": [{"size": "4M", "blocks": [0, 9]}], "vifs": [NET0], "os": OS_UBUNTU},
        {"name": "paused-vm", "power_state": "Paused", "host": c, "memory": "1G",
         "disks": [{"size": "2M", "blocks": [0]}], "vifs": [NET0]},
        # --- duplicate names, names that break shells and paths -----------------
        {"name": "dup-vm", "power_state": "Running", "host": a,
         "disks": [{"size": "2M", "blocks": [0, 3]}], "vifs": [NET0], "os": OS_DEBIAN},
        {"name": "dup-vm", "power_state": "Halted",
         "disks": [{"size": "2M", "blocks": [0, 4]}], "vifs": [NET0]},
        {"name": "my VM with spaces", "disks": [{"size": "2M", "blocks": [0]}], "vifs": [NET0]},
        {"name": "ünïcødé VM 日本語 ✓", "disks": [{"name": "disque système é", "size": "2M",
                                                 "blocks": [0, 1]}], "vifs": [NET0]},
        {"name": "name.with.dots", "disks": [{"size": "1M", "blocks": [0]}]},
        {"name": "web/slash\\back", "disks": [{"size": "1M", "blocks": [0]}]},
        {"name": "quote's \"double\"", "disks": [{"size": "1M", "blocks": [0]}]},
        {"name": "$(touch pwned)", "disks": [{"size": "1M", "blocks": [0]}]},
        {"name": "`touch pwned2` ; echo x && rm -rf nothing | cat > /dev/null &",
         "disks": [{"size": "1M", "blocks": [0]}]},
        {"name": "new\nline", "disks": [{"size": "1M", "blocks": [0]}]},
        {"name": "../../etc", "disks": [{"size": "1M", "blocks": [0]}]},
        {"name": "-rf", "disks": [{"size": "1M", "blocks": [0]}]},
        {"name": "Debian Bookworm 12", "power_state": "Halted",   # same name as a default template
         "disks": [{"size": "2M", "blocks": [0, 2]}], "vifs": [NET0], "os": OS_DEBIAN},
        # --- placement -------------------------------------------------------
        {"name": "local-vm", "power_state": "Halted", "host": b,   # disks on xcp-ng-b's local SR
         "disks": [{"name": "local-vm root", "size": "3M", "sr": "local", "blocks": [0, 30]},
                   {"name": "local-vm swap", "size": "1M", "sr": "local", "blocks": []}],
         "vifs": [NET0]},
        {"name": "local-running", "power_state": "Running", "host": c,
         "disks": [{"size": "2M", "sr": "local", "blocks": [0, 1]}], "vifs": [NET0],
         "os": OS_UBUNTU},
        {"name": "nodisk-vm", "power_state": "Halted", "vifs": [NET0]},
        # --- names a backup tool meets ----------------------------------------
        {"name": "RESTORE_jira", "disks": [{"size": "2M", "blocks": [0]}], "vifs": [NET0]},
        {"name": "app01", "power_state": "Running", "host": a,
         "disks": [{"name": "app01 system", "size": "4M", "blocks": [0, 12]},
                   {"name": "app01 scratch [NOBAK]", "size": "4M", "blocks": [0, 50]}],
         "vifs": [NET0], "os": OS_DEBIAN},
        {"name": "PRD-print4", "power_state": "Running", "host": b,
         "disks": [{"size": "2M", "blocks": [0, 6]}], "vifs": [NET0], "os": OS_WINDOWS},
        {"name": "PRD-print7", "power_state": "Halted",
         "disks": [{"size": "2M", "blocks": [0, 7]}], "vifs": [NET0]},
        {"name": "DEV-web3", "power_state": "Running", "host": a,
         "disks": [{"size": "2M", "blocks": [0, 8]}], "vifs": [NET0], "os": OS_UBUNTU},
        {"name": "DEV-mySql", "power_state": "Halted",
         "disks": [{"size": "2M", "blocks": [0, 9]}, {"size": "1M", "blocks": [0]}],
         "vifs": [NET0]},
        {"name": "DEV-phishing-test", "power_state": "Halted",
         "disks": [{"size": "1M", "blocks": [0]}], "vifs": [NET0]},
        {"name": "PRD-fileserverSAVE", "power_state": "Halted",
         "disks": [{"size": "2M", "blocks": [0, 3]}], "vifs": [NET0]},
        # --- a custom template and a protected VM -----------------------------
        {"name": "tpl-debian-base", "template": True,
         "disks": [{"name": "tpl-debian-base root", "size": "2M", "blocks": [0, 1]}],
         "vifs": [NET0]},
        {"name": "no-export-vm", "blocked_operations": {"export": "locked by admin"},
         "disks": [{"size": "1M", "blocks": [0]}]},
        # odd size (not a multiple of 1 MiB): the XVA's last chunk is short
        {"name": "odd-size-vm", "disks": [{"size": 3 * 1048576 + 131072, "blocks": [0, 49]}]},
    ]
    return d


def simple_pool(vms=("vm1",), hosts=("host1", "host2"), release=DEFAULT_RELEASE, **extra):
    """A small pool in one line: ``simple_pool(vms=["a", {"name": "b", "power_state": "Running"}])``.
    Strings become halted VMs with one 2 MiB disk and one VIF; dicts are used as
    given (see the module docstring), with those defaults filled in."""
    d = _base(name="simple-pool", hosts=hosts, release=release)
    d["vms"] = [dict(name="Other install media", template=True, default_template=True)]
    for i, vm in enumerate(vms):
        if isinstance(vm, str):
            vm = {"name": vm}
        vm = copy.deepcopy(vm)
        vm.setdefault("disks", [{"size": "2M", "blocks": [0, i + 1]}])
        vm.setdefault("vifs", [NET0])
        d["vms"].append(vm)
    d.update(extra)
    return d


def large_pool(n=2000):
    """``n`` VMs (one small disk and one VIF each) for call-count tests."""
    d = _base(name="large-pool")
    d["vms"] = [dict(name=t, template=True, default_template=True) for t in DEFAULT_TEMPLATES]
    for i in range(n):
        d["vms"].append({"name": "vm-%04d" % i,
                         "power_state": "Running" if i % 3 == 0 else "Halted",
                         "host": d["hosts"][i % 3],
                         "disks": [{"size": "1M", "blocks": [0]}], "vifs": [NET0],
                         "os": OS_DEBIAN if i % 2 else None})
    return d


def describe(description=None):
    """None -> the demo pool; a dict -> a deep copy of it (with the ``nbd``
    entry's ``purpose`` shorthand applied to the first network)."""
    if description is None:
        return demo_pool()
    d = copy.deepcopy(description)
    purpose = (d.get("nbd") or {}).get("purpose")
    if purpose:
        nets = d.get("networks") or [{"name": NET0}]
        nets = [{"name": n} if isinstance(n, str) else n for n in nets]
        if purpose not in nets[0].setdefault("purpose", []):
            nets[0]["purpose"].append(purpose)
        d["networks"] = nets
    return d
