"""The simulated pool's object model: XAPI classes, records, and the operations
a backup/restore/verify tool calls (snapshot, destroy, create, tasks ...).

Records are plain dicts of native Python values (str, int, float, bool,
datetime, list, dict); the XML-RPC layer (rpc.py) encodes them the way xapi
does.  Every class and field listed here exists in real XAPI (field names and
types from xen-api's datamodel, doc/data/xenapi.json); the simulator keeps a
subset of each class's fields, chosen for what clients read.

All access goes through ``Database.lock`` (an RLock): rpc.py holds it for the
whole of a call, the HTTP handlers hold it only while they touch records.
"""
import copy
import datetime
import random
import re
import threading
import time
import uuid as uuidlib

NULL = "OpaqueRef:NULL"
EPOCH = datetime.datetime(1970, 1, 1)

# ---------------------------------------------------------------------------
# Schema.  One line per field: "<name> <type> [rw]".
# Types: s string, e enum (string), i int, f float, b bool, d datetime,
#        m map string->string, S string set, r:<Class> ref, R:<Class> ref set.
# "rw" marks fields with a generated setter (set_<f>, and add_to_/remove_from_
# for maps, add_<f>/remove_<f> for sets), as XAPI's datamodel declares them.
# ---------------------------------------------------------------------------
_SCHEMA_TEXT = {
    "session": """
        uuid s
        this_host r:host
        this_user r:user
        last_active d
        pool b
        other_config m rw
        is_local_superuser b
        subject r:subject
        validation_time d
        auth_user_sid s
        auth_user_name s
        rbac_permissions S
        tasks R:task
        parent r:session
        originator s
    """,
    "pool": """
        uuid s
        name_label s rw
        name_description s rw
        master r:host
        default_SR r:SR rw
        suspend_image_SR r:SR rw
        crash_dump_SR r:SR rw
        other_config m rw
        ha_enabled b
        ha_configuration m
        ha_statefiles S
        ha_host_failures_to_tolerate i
        ha_plan_exists_for i
        ha_allow_overcommit b rw
        ha_overcommitted b
        blobs m
        tags S rw
        gui_config m rw
        health_check_config m rw
        wlb_url s
        wlb_username s
        wlb_enabled b rw
        wlb_verify_cert b rw
        redo_log_enabled b
        redo_log_vdi r:VDI
        vswitch_controller s
        restrictions m
        metadata_VDIs R:VDI
        ha_cluster_stack s
        allowed_operations S
        current_operations m
        guest_agent_config m
        cpu_info m
        policy_no_vendor_device b rw
        live_patching_disabled b rw
        igmp_snooping_enabled b
        uefi_certificates s
        is_psr_pending b rw
        tls_verification_enabled b
        repositories R:Repository
        client_certificate_auth_enabled b
        client_certificate_auth_name s
        repository_proxy_url s
        repository_proxy_username s
        repository_proxy_password r:secret
        migration_compression b rw
        coordinator_bias b rw
        telemetry_uuid r:secret
        telemetry_frequency e
        telemetry_next_collection d
        last_update_sync d
        update_sync_frequency e
        update_sync_day i
        update_sync_enabled b
        recommendations m
    """,
    "host": """
        uuid s
        name_label s rw
        name_description s rw
        memory_overhead i
        allowed_operations S
        current_operations m
        API_version_major i
        API_version_minor i
        API_version_vendor s
        API_version_vendor_implementation m
        enabled b
        software_version m
        other_config m rw
        capabilities S
        cpu_configuration m
        sched_policy s
        supported_bootloaders S
        resident_VMs R:VM
        logging m rw
        PIFs R:PIF
        suspend_image_sr r:SR rw
        crash_dump_sr r:SR rw
        crashdumps R:host_crashdump
        patches R:host_patch
        updates R:pool_update
        PBDs R:PBD
        host_CPUs R:host_cpu
        cpu_info m
        hostname s rw
        address s rw
        metrics r:host_metrics
        license_params m
        ha_statefiles S
        ha_network_peers S
        blobs m
        tags S rw
        external_auth_type s
        external_auth_service_name s
        external_auth_configuration m
        edition s
        license_server m rw
        bios_strings m
        power_on_mode s
        power_on_config m
        local_cache_sr r:SR
        chipset_info m
        PCIs R:PCI
        PGPUs R:PGPU
        PUSBs R:PUSB
        ssl_legacy b
        guest_VCPUs_params m rw
        display e
        virtual_hardware_platform_versions S
        control_domain r:VM
        updates_requiring_reboot R:pool_update
        features R:Feature
        iscsi_iqn s
        multipathing b
        uefi_certificates s
        certificates R:Certificate
        editions S
        pending_guidances S
        tls_verification_enabled b
        last_software_update d
        https_only b
    """,
    "SR": """
        uuid s
        name_label s rw
        name_description s rw
        allowed_operations S
        current_operations m
        VDIs R:VDI
        PBDs R:PBD
        virtual_allocation i
        physical_utilisation i
        physical_size i
        type s
        content_type s
        shared b rw
        other_config m rw
        tags S rw
        sm_config m rw
        blobs m
        local_cache_enabled b
        introduced_by r:DR_task
        clustered b
        is_tools_sr b
    """,
    "PBD": """
        uuid s
        host r:host
        SR r:SR
        device_config m
        currently_attached b
        other_config m rw
    """,
    "network": """
        uuid s
        name_label s rw
        name_description s rw
        allowed_operations S
        current_operations m
        VIFs R:VIF
        PIFs R:PIF
        MTU i rw
        other_config m rw
        bridge s
        managed b
        blobs m
        tags S rw
        default_locking_mode e rw
        assigned_ips m
        purpose S
    """,
    "PIF": """
        uuid s
        device s
        network r:network
        host r:host
        MAC s
        MTU i
        VLAN i
        metrics r:PIF_metrics
        physical b
        currently_attached b
        ip_configuration_mode e
        IP s
        netmask s
        gateway s
        DNS s
        bond_slave_of r:Bond
        bond_master_of R:Bond
        VLAN_master_of r:VLAN
        VLAN_slave_of R:VLAN
        management b
        other_config m rw
        disallow_unplug b rw
        managed b
        primary_address_type e
        properties m
        capabilities S
        igmp_snooping_status e
    """,
    "VM": """
        uuid s
        allowed_operations S
        current_operations m
        name_label s rw
        name_description s rw
        power_state e
        user_version i rw
        is_a_template b rw
        is_default_template b
        suspend_VDI r:VDI
        resident_on r:host
        scheduled_to_be_resident_on r:host
        affinity r:host rw
        memory_overhead i
        memory_target i
        memory_static_max i
        memory_dynamic_max i
        memory_dynamic_min i
        memory_static_min i
        VCPUs_params m rw
        VCPUs_max i
        VCPUs_at_startup i
        actions_after_softreboot e rw
        actions_after_shutdown e rw
        actions_after_reboot e rw
        actions_after_crash e rw
        consoles R:console
        VIFs R:VIF
        VBDs R:VBD
        VUSBs R:VUSB
        crash_dumps R:crashdump
        VTPMs R:VTPM
        PV_bootloader s rw
        PV_kernel s rw
        PV_ramdisk s rw
        PV_args s rw
        PV_bootloader_args s rw
        PV_legacy_args s rw
        HVM_boot_policy s rw
        HVM_boot_params m rw
        HVM_shadow_multiplier f
        platform m rw
        PCI_bus s rw
        other_config m rw
        domid i
        domarch s
        last_boot_CPU_flags m
        is_control_domain b
        metrics r:VM_metrics
        guest_metrics r:VM_guest_metrics
        last_booted_record s
        recommendations s rw
        xenstore_data m rw
        ha_always_run b rw
        ha_restart_priority s rw
        is_a_snapshot b
        snapshot_of r:VM
        snapshots R:VM
        snapshot_time d
        transportable_snapshot_id s
        blobs m
        tags S rw
        blocked_operations m rw
        snapshot_info m
        snapshot_metadata s
        parent r:VM
        children R:VM
        bios_strings m
        protection_policy r:VMPP
        is_snapshot_from_vmpp b
        snapshot_schedule r:VMSS
        is_vmss_snapshot b
        appliance r:VM_appliance rw
        start_delay i rw
        shutdown_delay i rw
        order i rw
        VGPUs R:VGPU
        attached_PCIs R:PCI
        suspend_SR r:SR rw
        version i
        generation_id s
        hardware_platform_version i rw
        has_vendor_device b rw
        requires_reboot b
        reference_label s
        domain_type e rw
        NVRAM m rw
        pending_guidances S
    """,
    "VM_metrics": """
        uuid s
        memory_actual i
        VCPUs_number i
        VCPUs_utilisation m
        VCPUs_CPU m
        VCPUs_params m
        VCPUs_flags m
        state S
        start_time d
        install_time d
        last_updated d
        other_config m rw
        hvm b
        nested_virt b
        nomigrate b
        current_domain_type e
    """,
    "VM_guest_metrics": """
        uuid s
        os_version m
        netbios_name m
        PV_drivers_version m
        PV_drivers_up_to_date b
        memory m
        disks m
        networks m
        other m
        last_updated d
        other_config m rw
        live b
        can_use_hotplug_vbd e
        can_use_hotplug_vif e
        PV_drivers_detected b
    """,
    "VBD": """
        uuid s
        allowed_operations S
        current_operations m
        VM r:VM
        VDI r:VDI
        device s
        userdevice s rw
        bootable b rw
        mode e rw
        type e rw
        unpluggable b rw
        storage_lock b
        empty b
        other_config m rw
        currently_attached b
        status_code i
        status_detail s
        runtime_properties m
        qos_algorithm_type s rw
        qos_algorithm_params m rw
        qos_supported_algorithms S
        metrics r:VBD_metrics
    """,
    "VDI": """
        uuid s
        name_label s rw
        name_description s rw
        allowed_operations S
        current_operations m
        SR r:SR
        VBDs R:VBD
        crash_dumps R:crashdump
        virtual_size i
        physical_utilisation i
        type e
        sharable b
        read_only b
        other_config m rw
        storage_lock b
        location s
        managed b
        missing b
        parent r:VDI
        xenstore_data m rw
        sm_config m rw
        is_a_snapshot b
        snapshot_of r:VDI
        snapshots R:VDI
        snapshot_time d
        tags S rw
        allow_caching b rw
        on_boot e rw
        metadata_of_pool r:pool
        metadata_latest b
        is_tools_iso b
        cbt_enabled b
    """,
    "VIF": """
        uuid s
        allowed_operations S
        current_operations m
        device s
        network r:network
        VM r:VM
        MAC s
        MTU i
        other_config m rw
        currently_attached b
        status_code i
        status_detail s
        runtime_properties m
        qos_algorithm_type s rw
        qos_algorithm_params m rw
        qos_supported_algorithms S
        metrics r:VIF_metrics
        MAC_autogenerated b
        locking_mode e rw
        ipv4_allowed S rw
        ipv6_allowed S rw
        ipv4_configuration_mode e
        ipv4_addresses S
        ipv4_gateway s
        ipv6_configuration_mode e
        ipv6_addresses S
        ipv6_gateway s
    """,
    "VTPM": """
        uuid s
        allowed_operations S
        current_operations m
        VM r:VM
        backend r:VM
        persistence_backend e
        is_unique b
        is_protected b
    """,
    "task": """
        uuid s
        name_label s
        name_description s
        allowed_operations S
        current_operations m
        created d
        finished d
        status e
        resident_on r:host
        progress f
        type s
        result s
        error_info S
        other_config m rw
        subtask_of r:task
        subtasks R:task
        backtrace s
    """,
}


def _parse_schema():
    schema = {}
    for cls, text in _SCHEMA_TEXT.items():
        fields = {}
        for line in text.strip().splitlines():
            parts = line.split()
            name, typ = parts[0], parts[1]
            fields[name] = (typ, len(parts) > 2 and parts[2] == "rw")
        schema[cls] = fields
    return schema


SCHEMA = _parse_schema()

# Classes with a get_by_name_label message in XAPI.
NAMED_CLASSES = {"VM", "VDI", "SR", "network", "host", "task"}

_ENUM_DEFAULTS = {
    ("VM", "power_state"): "Halted",
    ("VM", "actions_after_softreboot"): "soft_reboot",
    ("VM", "actions_after_shutdown"): "destroy",
    ("VM", "actions_after_reboot"): "restart",
    ("VM", "actions_after_crash"): "restart",
    ("VM", "domain_type"): "hvm",
    ("VM_metrics", "current_domain_type"): "unspecified",
    ("VM_guest_metrics", "can_use_hotplug_vbd"): "unspecified",
    ("VM_guest_metrics", "can_use_hotplug_vif"): "unspecified",
    ("VBD", "mode"): "RW",
    ("VBD", "type"): "Disk",
    ("VDI", "type"): "user",
    ("VDI", "on_boot"): "persist",
    ("VIF", "locking_mode"): "network_default",
    ("VIF", "ipv4_configuration_mode"): "None",
    ("VIF", "ipv6_configuration_mode"): "None",
    ("network", "default_locking_mode"): "unlocked",
    ("PIF", "ip_configuration_mode"): "Static",
    ("PIF", "primary_address_type"): "IPv4",
    ("PIF", "igmp_snooping_status"): "disabled",
    ("VTPM", "persistence_backend"): "xapi",
    ("task", "status"): "pending",
    ("host", "display"): "enabled",
    ("pool", "telemetry_frequency"): "weekly",
    ("pool", "update_sync_frequency"): "weekly",
}


def default_value(cls, field):
    typ = SCHEMA[cls][field][0]
    if typ in ("s",):
        return ""
    if typ == "e":
        return _ENUM_DEFAULTS.get((cls, field), "")
    if typ == "i":
        return -1 if field in ("domid", "VLAN") else 0
    if typ == "f":
        return 1.0 if field == "HVM_shadow_multiplier" else 0.0
    if typ == "b":
        return False
    if typ == "d":
        return EPOCH
    if typ == "m":
        return {}
    if typ == "S" or typ.startswith("R:"):
        return []
    if typ.startswith("r:"):
        return NULL
    raise ValueError(typ)


_TEMPLATES = {}


def default_record(cls):
    tpl = _TEMPLATES.get(cls)
    if tpl is None:
        tpl = _TEMPLATES[cls] = {f: default_value(cls, f) for f in SCHEMA[cls]}
    return {k: (v.copy() if type(v) in (dict, list) else v) for k, v in tpl.items()}


def field_class(cls, field):
    """Target class of a ref / ref-set field, else None."""
    typ = SCHEMA[cls][field][0]
    if typ[:2] in ("r:", "R:"):
        return typ[2:]
    return None


def now():
    return datetime.datetime.utcnow().replace(microsecond=0)


def new_ref():
    return "OpaqueRef:" + str(uuidlib.uuid4())


def parse_size(value):
    """8M, "4MiB", "2G", 1048576 -> bytes."""
    if isinstance(value, int):
        return value
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", str(value), re.I)
    if not m:
        raise ValueError("bad size %r" % (value,))
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def xapi_version_tuple(text):
    out = []
    for part in str(text).split("."):
        m = re.match(r"\d+", part)
        out.append(int(m.group(0)) if m else 0)
    return tuple(out)


class ApiError(Exception):
    """A XAPI failure: ErrorDescription = [code] + params (all strings)."""

    def __init__(self, code, *params):
        self.code = code
        self.params = [str(p) for p in params]
        Exception.__init__(self, code, *self.params)

    @property
    def description(self):
        return [self.code] + self.params

    def __str__(self):
        return "Server_error(%s, [ %s ])" % (self.code, "; ".join(self.params))


def coerce(cls, field, value):
    """Convert a client-supplied value to the field's native type (like rpclib's
    unmarshalling); raises FIELD_TYPE_ERROR on a mismatch."""
    typ = SCHEMA[cls][field][0]
    try:
        if typ in ("s", "e") or typ.startswith("r:"):
            if not isinstance(value, str):
                raise TypeError
            return value
        if typ == "i":
            if isinstance(value, bool):
                raise TypeError
            return int(value)
        if typ == "f":
            return float(value)
        if typ == "b":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise TypeError
        if typ == "d":
            if isinstance(value, datetime.datetime):
                return value
            return parse_datetime(str(value))
        if typ == "m":
            if not isinstance(value, dict):
                raise TypeError
            return {str(k): (v if isinstance(v, str) else str(v)) for k, v in value.items()}
        if typ == "S" or typ.startswith("R:"):
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return [str(v) for v in value]
    except (TypeError, ValueError):
        raise ApiError("FIELD_TYPE_ERROR", field)
    return value


def parse_datetime(text):
    text = str(text)
    for fmt in ("%Y%m%dT%H:%M:%SZ", "%Y%m%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S"):
        try:
            return datetime.datetime.strptime(text, fmt)
        except ValueError:
            pass
    raise ValueError(text)


def random_mac(rng=random):
    # Xen's OUI-less locally administered range as xapi generates it
    b = [rng.randrange(256) for _ in range(6)]
    b[0] = (b[0] & 0xFE) | 0x02
    return ":".join("%02x" % x for x in b)


class Database:
    """Tables of records keyed by OpaqueRef, a uuid index, and VDI content."""

    def __init__(self, seed=0):
        self.lock = threading.RLock()
        self.tables = {cls: {} for cls in SCHEMA}
        self.by_uuid = {cls: {} for cls in SCHEMA}
        self.content = {}          # VDI ref -> xapisim.disks.Disk
        self.in_use = {}           # VDI ref -> {task ref: operation}
        self.client_created = set()  # refs created through the API (for leftovers)
        self.rng = random.Random(seed)
        self.building = True       # deterministic uuids while building the description
        self.generation = 0        # bumped on every change (event.from token)
        self.release = {}
        self.export_counter = 0    # xapi's process-global export id counter
        self.events = Events(self)  # event.from / event.inject (below)

    # -- identity ---------------------------------------------------------
    def new_uuid(self):
        if self.building:
            return str(uuidlib.UUID(int=self.rng.getrandbits(128), version=4))
        return str(uuidlib.uuid4())

    # -- CRUD -------------------------------------------------------------
    def create(self, cls, fields=None, ref=None, **kw):
        rec = default_record(cls)
        if fields:
            rec.update(fields)
        rec.update(kw)
        if not rec.get("uuid"):
            rec["uuid"] = self.new_uuid()
        ref = ref or new_ref()
        self.tables[cls][ref] = rec
        self.by_uuid[cls][rec["uuid"]] = ref
        self.generation += 1
        self.events.changed()
        return ref

    def exists(self, cls, ref):
        return ref in self.tables[cls]

    def get(self, cls, ref):
        try:
            return self.tables[cls][ref]
        except (KeyError, TypeError):
            raise ApiError("HANDLE_INVALID", cls, ref)

    def ref_of_uuid(self, cls, uuid):
        try:
            return self.by_uuid[cls][uuid]
        except (KeyError, TypeError):
            raise ApiError("UUID_INVALID", cls, uuid)

    def resolve(self, cls, ref_or_uuid):
        """A ref or a uuid -> ref (HANDLE_INVALID if neither)."""
        if ref_or_uuid in self.tables[cls]:
            return ref_or_uuid
        if ref_or_uuid in self.by_uuid[cls]:
            return self.by_uuid[cls][ref_or_uuid]
        raise ApiError("HANDLE_INVALID", cls, ref_or_uuid)

    def remove(self, cls, ref):
        rec = self.tables[cls].pop(ref)
        self.by_uuid[cls].pop(rec["uuid"], None)
        self.client_created.discard(ref)
        self.generation += 1
        self.events.changed()
        return rec

    def all(self, cls):
        return list(self.tables[cls].items())

    def touch(self):
        self.generation += 1
        self.events.changed()

    # -- convenience --------------------------------------------------------
    def pool_ref(self):
        return next(iter(self.tables["pool"]))

    def pool(self):
        return self.tables["pool"][self.pool_ref()]

    def master(self):
        return self.pool()["master"]

    def host_by_name(self, name):
        for ref, rec in self.tables["host"].items():
            if rec["name_label"] == name or rec["uuid"] == name or ref == name:
                return ref
        raise KeyError("no host %r" % name)

    def hosts_seeing_sr(self, sr):
        return [self.tables["PBD"][p]["host"] for p in self.tables["SR"][sr]["PBDs"]
                if p in self.tables["PBD"]]

    def vm_disk_srs(self, vm):
        """SRs of the VM's exportable disks (not CDs, not ISO SRs)."""
        srs = []
        for vbd in self.get("VM", vm)["VBDs"]:
            v = self.tables["VBD"].get(vbd)
            if not v or v["empty"] or v["type"] == "CD" or v["VDI"] not in self.tables["VDI"]:
                continue
            sr = self.tables["VDI"][v["VDI"]]["SR"]
            if self.tables["SR"][sr]["content_type"] == "iso":
                continue
            if sr not in srs:
                srs.append(sr)
        return srs

    def host_sees_srs(self, host, srs):
        return all(host in self.hosts_seeing_sr(sr) for sr in srs)

    def host_for_srs(self, srs, prefer=None):
        """A host that sees every SR in srs (prefer the given one, then the master)."""
        order = ([prefer] if prefer else []) + [self.master()] + list(self.tables["host"])
        for h in order:
            if h and h in self.tables["host"] and self.host_sees_srs(h, srs):
                return h
        return None

    def vdi_users(self, vdi):
        """Operations holding the VDI (exports/imports in progress)."""
        return self.in_use.get(vdi, {})


# ---------------------------------------------------------------------------
# Events (xapi_event.ml): event.from and event.inject
# ---------------------------------------------------------------------------
class Int32(int):
    """An int that XAPI types as int32 (rpclib writes ``<i4>``), e.g. the counts
    in event.from's ``valid_ref_counts``."""


# Classes whose datamodel entry has gen_events=false: no events, no subscription.
NO_EVENT_CLASSES = {"session"}


def _event_copy(rec):
    # records hold scalars, string lists and string->string maps: one level is enough
    return {k: (v.copy() if isinstance(v, (dict, list)) else v) for k, v in rec.items()}


class Events:
    """xapi's event model: every object carries the generation it was created and
    last modified at, deleted objects are remembered with the generation they went
    at, and ``event.from(classes, token, timeout)`` returns every matching object
    whose generation is newer than the token (``add`` and/or ``mod``, with the full
    record as ``snapshot``; ``del`` without one), blocking until one exists or the
    timeout passes.  Tokens are ``"%020d,%020d"`` (generation, message generation).

    Records are changed in place all over the simulator, so the generations are
    found by comparing each record with a copy taken at the last look (only once
    a client has used events, and only when ``Database.generation`` moved).
    ``Database.create/remove/touch`` call ``changed()``, which wakes the waiters.
    All methods except ``changed`` run with ``db.lock`` held."""

    KEEP_DELETED = 20000

    def __init__(self, db):
        self.db = db
        self.cond = threading.Condition(threading.Lock())
        self.waiters = 0
        self.active = False
        self.gen = 0
        self.stat = {}          # (cls, ref) -> [created, modified]
        self.shadow = {}        # (cls, ref) -> copy of the record as last seen
        self.deleted = {}       # (cls, ref) -> (created, deleted)
        self.forgotten = 0      # newest deletion generation dropped from self.deleted
        self.seen = -1          # Database.generation at the last scan
        self.view = lambda db, cls, ref: db.tables[cls][ref]   # rpc.py sets get_record's view

    # -- change tracking -----------------------------------------------------
    def changed(self):
        if self.waiters:
            with self.cond:
                self.cond.notify_all()

    def _classes(self):
        return [c for c in SCHEMA if c not in NO_EVENT_CLASSES]

    def scan(self):
        db = self.db
        if self.active and db.generation == self.seen:
            return
        self.seen = db.generation
        if not self.active:
            self.active, self.gen = True, 1
            for cls in self._classes():
                for ref in db.tables[cls]:
                    self.stat[(cls, ref)] = [1, 1]
                    self.shadow[(cls, ref)] = _event_copy(self.view(db, cls, ref))
            return
        g = self.gen + 1
        changed = False
        for cls in self._classes():
            for ref in db.tables[cls]:
                key = (cls, ref)
                rec = self.view(db, cls, ref)
                old = self.shadow.get(key)
                if old is None:
                    self.stat[key] = [g, g]
                elif old != rec:
                    self.stat[key][1] = g
                else:
                    continue
                self.shadow[key] = _event_copy(rec)
                changed = True
        for key in [k for k in self.stat if k[1] not in db.tables[k[0]]]:
            created, _ = self.stat.pop(key)
            self.shadow.pop(key, None)
            self.deleted[key] = (created, g)
            changed = True
        if len(self.deleted) > self.KEEP_DELETED:
            old = sorted(self.deleted.items(), key=lambda kv: kv[1][1])[:len(self.deleted) // 2]
            for key, (_, d) in old:
                del self.deleted[key]
                self.forgotten = max(self.forgotten, d)
        if changed:
            self.gen = g

    # -- the API -----------------------------------------------------------
    @staticmethod
    def parse_token(token):
        token = str(token)
        if token == "":
            return 0
        parts = token.split(",")
        try:
            if len(parts) != 2:
                raise ValueError(token)
            return int(parts[0])
        except ValueError:
            raise ApiError("EVENT_FROM_TOKEN_PARSE_FAILURE", token)

    def token(self):
        return "%020d,%020d" % (self.gen, 0)

    @staticmethod
    def parse_subscriptions(classes):
        subs = []
        for x in classes:
            x = str(x)
            if x == "*":
                subs.append(("*", None))
                continue
            cls, sep, ref = x.partition("/")
            if not cls:
                raise ApiError("EVENT_SUBSCRIPTION_PARSE_FAILURE", x)
            subs.append((cls.lower(), ref if sep else None))
        return subs

    @staticmethod
    def _matches(subs, cls, ref):
        lc = cls.lower()
        for c, r in subs:
            if c == "*" or (c == lc and (r is None or r == ref)):
                return True
        return False

    def _collect(self, subs, since):
        adds, mods, dels = [], [], []
        for (cls, ref), (created, modified) in self.stat.items():
            if (created > since or modified > since) and self._matches(subs, cls, ref):
                snap = self.shadow[(cls, ref)]
                if created > since:
                    adds.append(self._event(created, cls, "add", ref, snap))
                if modified > since:
                    mods.append(self._event(modified, cls, "mod", ref, snap))
        for (cls, ref), (created, deleted) in self.deleted.items():
            # created and destroyed since the token: nothing to tell (as xapi)
            if deleted > since and created <= since and self._matches(subs, cls, ref):
                dels.append(self._event(deleted, cls, "del", ref, None))
        key = lambda e: int(e["id"])   # noqa: E731
        return sorted(adds, key=key) + sorted(mods, key=key) + sorted(dels, key=key)

    @staticmethod
    def _event(gen, cls, op, ref, snapshot):
        ev = {"id": "%d" % gen, "timestamp": "0.0", "class": cls.lower(), "operation": op,
              "ref": ref}
        if snapshot is not None:
            ev["snapshot"] = snapshot
        return ev

    def valid_ref_counts(self):
        return {cls.lower(): Int32(len(self.db.tables[cls])) for cls in SCHEMA}

    def event_from(self, classes, token, timeout, session=None):
        """event.from; waits with db.lock released.  A logout of ``session`` while
        waiting answers SESSION_INVALID (xapi's ``From.on_session_deleted``)."""
        db = self.db
        since = self.parse_token(token)
        subs = self.parse_subscriptions(classes)
        deadline = time.time() + max(0.0, float(timeout))
        while True:
            self.scan()
            if since < self.forgotten:
                raise ApiError("EVENTS_LOST")
            events = self._collect(subs, since)
            if events or time.time() >= deadline:
                break
            since = self.gen
            self._wait(deadline, session)
            if session is not None and session not in db.tables["session"]:
                raise ApiError("SESSION_INVALID", session)
        return {"events": events, "valid_ref_counts": self.valid_ref_counts(),
                "token": self.token()}

    def _wait(self, deadline, session):
        db = self.db
        seen = db.generation
        db.lock.release()
        try:
            with self.cond:
                self.waiters += 1
                try:
                    while db.generation == seen and time.time() < deadline and \
                            (session is None or session in db.tables["session"]):
                        self.cond.wait(max(0.0, deadline - time.time()))
                finally:
                    self.waiters -= 1
        finally:
            db.lock.acquire()

    def inject(self, cls, ref):
        """event.inject: a ``mod`` event for the object; returns the token just
        before it, so ``event.from(.., token, ..)`` sees it."""
        db = self.db
        table = next((c for c in SCHEMA if c.lower() == str(cls).lower()), None)
        if table is None or ref not in db.tables[table]:
            raise ApiError("HANDLE_INVALID", cls, ref)
        self.scan()
        if table not in NO_EVENT_CLASSES:
            self.gen += 1
            self.stat[(table, ref)][1] = self.gen
        token = "%020d,%020d" % (self.gen - 1, 0)
        db.touch()
        self.seen = db.generation
        return token


# ---------------------------------------------------------------------------
# Helpers shared by the API operations below.
# ---------------------------------------------------------------------------
SNAPSHOT_ALLOWED_OPS = {"revert", "clone", "copy", "export", "destroy", "hard_shutdown",
                        "metadata_export"}
TEMPLATE_ALLOWED_OPS = {"clone", "copy", "export", "destroy", "provision", "metadata_export",
                        "make_into_template"}
CONCURRENT_GROUPS = [{"snapshot", "checkpoint"}, {"clone", "copy", "export"}]


def power_state_error(vm, allowed, actual):
    return ApiError("VM_BAD_POWER_STATE", vm, ", ".join(s.lower() for s in allowed),
                    actual.lower())


def check_vm_op(db, vm, op, power_states=None):
    """Refuse an operation the way xapi_vm_lifecycle does."""
    rec = db.get("VM", vm)
    if op in rec["blocked_operations"]:
        raise ApiError("OPERATION_BLOCKED", vm, rec["blocked_operations"][op])
    if rec["is_control_domain"] and op not in ("metadata_export",):
        raise ApiError("OPERATION_NOT_ALLOWED", "This operation is not allowed on the control domain")
    if rec["is_a_snapshot"] and op not in SNAPSHOT_ALLOWED_OPS:
        raise ApiError("VM_IS_SNAPSHOT", vm, op)
    if rec["is_a_template"] and not rec["is_a_snapshot"] and op not in TEMPLATE_ALLOWED_OPS:
        raise ApiError("VM_IS_TEMPLATE", vm, op)
    if power_states is not None and rec["power_state"] not in power_states:
        raise power_state_error(vm, power_states, rec["power_state"])
    current = rec["current_operations"]
    if current:
        ok = any(op in g and all(o in g for o in current.values()) for g in CONCURRENT_GROUPS)
        if not ok:
            raise ApiError("OTHER_OPERATION_IN_PROGRESS", "VM", vm,
                           ",".join(current.values()), ",".join(current.keys()))
    return rec


def vdi_in_use_error(db, vdi, op):
    """VDI_IN_USE if the VDI is attached to a running VM or held by a transfer."""
    if db.in_use.get(vdi):
        raise ApiError("VDI_IN_USE", vdi, op)
    for vbd in db.get("VDI", vdi)["VBDs"]:
        v = db.tables["VBD"].get(vbd)
        if v and v["currently_attached"]:
            raise ApiError("VDI_IN_USE", vdi, op)


def sr_charge(db, sr, phys, virt):
    srec = db.get("SR", sr)
    srec["physical_utilisation"] = max(0, srec["physical_utilisation"] + phys)
    srec["virtual_allocation"] = max(0, srec["virtual_allocation"] + virt)


def sr_check_space(db, needs):
    """needs: {sr: bytes}; SR_BACKEND_FAILURE_44 when an SR would overflow."""
    for sr, n in needs.items():
        s = db.get("SR", sr)
        if s["physical_utilisation"] + n > s["physical_size"]:
            raise ApiError("SR_BACKEND_FAILURE_44", "", "There is insufficient space", "")


def new_vdi(db, sr, disk, **fields):
    rec = {
        "SR": sr, "virtual_size": disk.virtual_size,
        "physical_utilisation": disk.physical_utilisation,
        "managed": True, "sharable": False, "read_only": False,
    }
    rec.update(fields)
    ref = db.create("VDI", rec)
    r = db.tables["VDI"][ref]
    if not r["location"]:
        r["location"] = r["uuid"]
    db.content[ref] = disk
    db.get("SR", sr)["VDIs"].append(ref)
    sr_charge(db, sr, r["physical_utilisation"], r["virtual_size"])
    return ref


def snapshot_vdi(db, vdi, driver_params=None, clone=False):
    src = db.get("VDI", vdi)
    if db.tables["SR"][src["SR"]]["content_type"] == "iso":
        raise ApiError("SR_OPERATION_NOT_SUPPORTED", src["SR"])
    disk = db.content[vdi].clone()
    sr_check_space(db, {src["SR"]: disk.physical_utilisation})
    fields = {k: copy.deepcopy(src[k]) for k in (
        "name_label", "name_description", "type", "sharable", "other_config",
        "sm_config", "xenstore_data", "tags", "on_boot", "allow_caching")}
    fields.update(is_a_snapshot=True, snapshot_of=vdi, snapshot_time=now(), read_only=False)
    fields["sm_config"].pop("vhd-parent", None)
    ref = new_vdi(db, src["SR"], disk, **fields)
    src["snapshots"].append(ref)
    if not clone:
        from xapisim import cbt
        cbt.on_snapshot(db, vdi, ref)      # the CBT log moves to the snapshot
    return ref


def destroy_vdi(db, vdi):
    rec = db.get("VDI", vdi)
    vdi_in_use_error(db, vdi, "destroy")
    for vbd in list(rec["VBDs"]):
        # xapi destroys the (unplugged) VBDs that still point at the VDI
        destroy_vbd(db, vbd)
    sr = rec["SR"]
    if sr in db.tables["SR"]:
        srec = db.tables["SR"][sr]
        if vdi in srec["VDIs"]:
            srec["VDIs"].remove(vdi)
        sr_charge(db, sr, -rec["physical_utilisation"], -rec["virtual_size"])
    src = db.tables["VDI"].get(rec["snapshot_of"])
    if src and vdi in src["snapshots"]:
        src["snapshots"].remove(vdi)
    from xapisim import cbt
    cbt.on_destroy(db, vdi)                # CBT log: link parent and child, coalesce
    db.content.pop(vdi, None)
    db.remove("VDI", vdi)


def create_vbd(db, fields):
    vm = fields.get("VM", NULL)
    vmrec = db.get("VM", vm)
    empty = bool(fields.get("empty", False))
    vdi = fields.get("VDI", NULL)
    if not empty:
        db.get("VDI", vdi)
    else:
        vdi = NULL
    rec = {k: coerce("VBD", k, v) for k, v in fields.items() if k in SCHEMA["VBD"] and k != "uuid"}
    rec["VDI"] = vdi
    rec["empty"] = empty
    userdevice = rec.get("userdevice", "")
    used = {db.tables["VBD"][b]["userdevice"] for b in vmrec["VBDs"] if b in db.tables["VBD"]}
    if userdevice in ("", "autodetect"):
        n = 0
        while str(n) in used:
            n += 1
        userdevice = str(n)
    elif userdevice in used:
        raise ApiError("DEVICE_ALREADY_EXISTS", userdevice)
    rec["userdevice"] = userdevice
    rec.setdefault("device", "")
    rec["currently_attached"] = False
    ref = db.create("VBD", rec)
    vmrec["VBDs"].append(ref)
    if vdi != NULL:
        db.tables["VDI"][vdi]["VBDs"].append(ref)
    return ref


def destroy_vbd(db, vbd):
    rec = db.get("VBD", vbd)
    vm = db.tables["VM"].get(rec["VM"])
    if vm and vbd in vm["VBDs"]:
        vm["VBDs"].remove(vbd)
    vdi = db.tables["VDI"].get(rec["VDI"])
    if vdi and vbd in vdi["VBDs"]:
        vdi["VBDs"].remove(vbd)
        if not vdi["VBDs"]:
            from xapisim import cbt
            cbt.on_vbd_gone(db, rec["VDI"])    # data_destroy's VDI_IN_USE window
    db.remove("VBD", vbd)


def create_vif(db, fields, keep_mac=True):
    vm = fields.get("VM", NULL)
    vmrec = db.get("VM", vm)
    net = fields.get("network", NULL)
    netrec = db.get("network", net)
    rec = {k: coerce("VIF", k, v) for k, v in fields.items() if k in SCHEMA["VIF"] and k != "uuid"}
    for v in vmrec["VIFs"]:
        if db.tables["VIF"].get(v, {}).get("device") == rec.get("device"):
            raise ApiError("DEVICE_ALREADY_EXISTS", rec.get("device"))
    if not rec.get("MAC") or not keep_mac:
        rec["MAC"] = random_mac(db.rng if db.building else random)
        rec["MAC_autogenerated"] = True
    if not rec.get("MTU"):
        rec["MTU"] = netrec["MTU"]
    rec["currently_attached"] = False
    ref = db.create("VIF", rec)
    vmrec["VIFs"].append(ref)
    netrec["VIFs"].append(ref)
    return ref


def destroy_vif(db, vif):
    rec = db.get("VIF", vif)
    vm = db.tables["VM"].get(rec["VM"])
    if vm and vif in vm["VIFs"]:
        vm["VIFs"].remove(vif)
    net = db.tables["network"].get(rec["network"])
    if net and vif in net["VIFs"]:
        net["VIFs"].remove(vif)
    db.remove("VIF", vif)


def copy_metrics(db, vm_rec, install_time=None):
    old = db.tables["VM_metrics"].get(vm_rec["metrics"])
    fields = copy.deepcopy(old) if old else {}
    fields.pop("uuid", None)
    if install_time:
        fields["install_time"] = install_time
    return db.create("VM_metrics", fields)


def copy_guest_metrics(db, vm_rec):
    old = db.tables["VM_guest_metrics"].get(vm_rec["guest_metrics"])
    if not old:
        return NULL
    fields = copy.deepcopy(old)
    fields.pop("uuid", None)
    return db.create("VM_guest_metrics", fields)


_SNAPSHOT_COPY_SKIP = {"uuid", "allowed_operations", "current_operations", "VBDs", "VIFs",
                       "VTPMs", "consoles", "VUSBs", "crash_dumps", "VGPUs", "attached_PCIs",
                       "snapshots", "children", "metrics", "guest_metrics", "suspend_VDI"}


def snapshot_vm(db, vm, new_name, ignore_vdis=(), checkpoint=False):
    rec = check_vm_op(db, vm, "checkpoint" if checkpoint else "snapshot")
    if checkpoint and rec["power_state"] not in ("Running", "Suspended", "Halted"):
        raise power_state_error(vm, ["Running", "Suspended", "Halted"], rec["power_state"])
    ignore = set(ignore_vdis or ())
    for v in ignore:
        db.get("VDI", v)
    # which disks to copy, and the space they need
    plan = []
    needs = {}
    for vbd in rec["VBDs"]:
        b = db.tables["VBD"][vbd]
        if b["type"] == "Disk" and not b["empty"] and b["VDI"] in db.tables["VDI"]:
            vdi = db.tables["VDI"][b["VDI"]]
            if vdi["sm_config"].get("on_boot") == "reset" or vdi["on_boot"] == "reset":
                raise ApiError("VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION")
            if b["VDI"] in ignore:
                continue
            needs[vdi["SR"]] = needs.get(vdi["SR"], 0) + db.content[b["VDI"]].physical_utilisation
        plan.append(vbd)
    sr_check_space(db, needs)
    t = now()
    fields = {k: copy.deepcopy(v) for k, v in rec.items() if k not in _SNAPSHOT_COPY_SKIP}
    for key in ("default_template", "xensource_internal"):
        fields["other_config"].pop(key, None)
    power_at = rec["power_state"]
    fields.update(
        name_label=new_name, is_a_snapshot=True, is_a_template=True, snapshot_of=vm,
        snapshot_time=t, is_default_template=False, ha_always_run=False,
        resident_on=NULL, scheduled_to_be_resident_on=NULL, domid=-1,
        power_state="Halted", parent=rec["parent"], children=[vm],
        snapshot_info={"disk-snapshot-type": "crash_consistent",
                       "power-state-at-snapshot": power_at},
        transportable_snapshot_id="", snapshot_metadata="",
    )
    if checkpoint and power_at in ("Running", "Suspended"):
        fields["power_state"] = "Suspended"
        fields["snapshot_info"]["disk-snapshot-type"] = "crash_consistent"
    snap = db.create("VM", fields)
    snaprec = db.tables["VM"][snap]
    snaprec["metrics"] = copy_metrics(db, rec)
    snaprec["guest_metrics"] = copy_guest_metrics(db, rec)
    for vbd in plan:
        b = db.tables["VBD"][vbd]
        vbdfields = {k: copy.deepcopy(b[k]) for k in (
            "device", "userdevice", "bootable", "mode", "type", "unpluggable", "empty",
            "other_config", "qos_algorithm_type", "qos_algorithm_params")}
        vbdfields["VM"] = snap
        if b["type"] == "Disk" and not b["empty"]:
            vbdfields["VDI"] = snapshot_vdi(db, b["VDI"], {"epochhint": str(uuidlib.uuid4())})
            vbdfields["other_config"]["owner"] = ""
        else:
            vbdfields["VDI"] = b["VDI"]
        create_vbd(db, vbdfields)
    for vif in rec["VIFs"]:
        v = db.tables["VIF"][vif]
        viffields = {k: copy.deepcopy(v[k]) for k in (
            "device", "network", "MAC", "MTU", "other_config", "MAC_autogenerated",
            "locking_mode", "ipv4_allowed", "ipv6_allowed", "qos_algorithm_type",
            "qos_algorithm_params")}
        viffields["VM"] = snap
        create_vif(db, viffields)
    if checkpoint and power_at in ("Running", "Suspended"):
        sr = db.pool()["default_SR"] if db.pool()["default_SR"] in db.tables["SR"] else None
        if sr:
            from xapisim.disks import Disk
            size = max(rec["memory_static_max"], 1 << 20)
            snaprec["suspend_VDI"] = new_vdi(db, sr, Disk(size, seed=hash(snap) & 0xffff, blocks=[0]),
                                             name_label="Suspend image", type="suspend")
    # snapshot bookkeeping on the source and the parent chain
    old_parent = db.tables["VM"].get(rec["parent"])
    if old_parent:
        if vm in old_parent["children"]:
            old_parent["children"].remove(vm)
        old_parent["children"].append(snap)
    rec["parent"] = snap
    rec["snapshots"].append(snap)
    db.touch()
    return snap


def destroy_vm(db, vm):
    rec = check_vm_op(db, vm, "destroy", ["Halted", "Suspended"])
    for vbd in list(rec["VBDs"]):
        if vbd in db.tables["VBD"]:
            destroy_vbd(db, vbd)
    for vif in list(rec["VIFs"]):
        if vif in db.tables["VIF"]:
            destroy_vif(db, vif)
    for cls, field in (("VM_metrics", "metrics"), ("VM_guest_metrics", "guest_metrics")):
        if rec[field] in db.tables[cls]:
            db.remove(cls, rec[field])
    src = db.tables["VM"].get(rec["snapshot_of"])
    if src and vm in src["snapshots"]:
        src["snapshots"].remove(vm)
    parent = db.tables["VM"].get(rec["parent"])
    if parent and vm in parent["children"]:
        parent["children"].remove(vm)
    for child in rec["children"]:
        c = db.tables["VM"].get(child)
        if c:
            c["parent"] = rec["parent"]
            if parent is not None and child not in parent["children"]:
                parent["children"].append(child)
    for h in db.tables["host"].values():
        if vm in h["resident_VMs"]:
            h["resident_VMs"].remove(vm)
    db.remove("VM", vm)


def start_vm(db, vm, host=None):
    rec = check_vm_op(db, vm, "start", ["Halted"])
    host = host if host in db.tables["host"] else (
        rec["affinity"] if rec["affinity"] in db.tables["host"] else None)
    srs = db.vm_disk_srs(vm)
    if host is None or not db.host_sees_srs(host, srs):
        host = db.host_for_srs(srs)
    if host is None:
        raise ApiError("VM_REQUIRES_SR", vm, srs[0] if srs else NULL)
    _make_running(db, vm, host)


def _make_running(db, vm, host):
    rec = db.tables["VM"][vm]
    rec["power_state"] = "Running"
    rec["resident_on"] = host
    db.next_domid = getattr(db, "next_domid", 0) + 1
    rec["domid"] = db.next_domid
    db.tables["host"][host]["resident_VMs"].append(vm)
    for vbd in rec["VBDs"]:
        b = db.tables["VBD"][vbd]
        b["currently_attached"] = True
        if not b["device"]:
            b["device"] = "xvd" + chr(ord("a") + int(b["userdevice"])) if b["userdevice"].isdigit() else ""
    for vif in rec["VIFs"]:
        db.tables["VIF"][vif]["currently_attached"] = True
    m = db.tables["VM_metrics"].get(rec["metrics"])
    if m:
        m["start_time"] = now()
        m["memory_actual"] = rec["memory_dynamic_max"]
        m["VCPUs_number"] = rec["VCPUs_at_startup"]
    db.touch()


def shutdown_vm(db, vm, op="hard_shutdown"):
    allowed = ["Running", "Paused", "Suspended"] if op == "hard_shutdown" else ["Running"]
    rec = check_vm_op(db, vm, op, allowed)
    rec["power_state"] = "Halted"
    host = db.tables["host"].get(rec["resident_on"])
    if host and vm in host["resident_VMs"]:
        host["resident_VMs"].remove(vm)
    rec["resident_on"] = NULL
    rec["domid"] = -1
    for vbd in rec["VBDs"]:
        db.tables["VBD"][vbd]["currently_attached"] = False
    for vif in rec["VIFs"]:
        db.tables["VIF"][vif]["currently_attached"] = False
    if rec["suspend_VDI"] in db.tables["VDI"]:
        v = rec["suspend_VDI"]
        rec["suspend_VDI"] = NULL
        destroy_vdi(db, v)
    db.touch()


def set_is_a_template(db, vm, value):
    rec = db.get("VM", vm)
    if value:
        if rec["is_a_snapshot"]:
            raise ApiError("VM_IS_SNAPSHOT", vm, "make_into_template")
        if rec["power_state"] != "Halted":
            raise power_state_error(vm, ["Halted"], rec["power_state"])
        rec["is_a_template"] = True
        rec["ha_always_run"] = False
    else:
        rec["is_a_template"] = False
        m = db.tables["VM_metrics"].get(rec["metrics"])
        if m is not None:
            m["install_time"] = now()
        else:
            rec["metrics"] = db.create("VM_metrics", install_time=now())
    db.touch()


# ---------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------
def create_task(db, label, description="", host=None, session=None):
    ref = db.create("task", name_label=label, name_description=description, created=now(),
                    status="pending", progress=0.0, allowed_operations=["cancel"],
                    resident_on=host or db.master())
    if session and session in db.tables["session"]:
        db.tables["session"][session]["tasks"].append(ref)
    return ref


def task_cancelling(db, task):
    rec = db.tables["task"].get(task)
    return bool(rec) and "cancel" in rec["current_operations"].values()


def task_progress(db, task, progress):
    rec = db.tables["task"].get(task)
    if rec and rec["status"] == "pending":
        rec["progress"] = float(progress)
        db.touch()


def task_complete(db, task, result=""):
    rec = db.tables["task"].get(task)
    if rec and rec["status"] in ("pending", "cancelling"):
        rec.update(status="success", progress=1.0, result=result, finished=now(),
                   current_operations={}, allowed_operations=["destroy"])
        db.touch()


def task_fail(db, task, description):
    rec = db.tables["task"].get(task)
    if rec and rec["status"] in ("pending", "cancelling"):
        status = "cancelled" if description and description[0] == "TASK_CANCELLED" else "failure"
        rec.update(status=status, progress=1.0, error_info=[str(x) for x in description],
                   finished=now(), current_operations={}, allowed_operations=["destroy"])
        db.touch()


def cancel_task(db, task):
    rec = db.get("task", task)
    if rec["status"] != "pending":
        raise ApiError("OPERATION_NOT_ALLOWED", "Task is not pending (status %s)" % rec["status"])
    rec["current_operations"] = {new_ref(): "cancel"}
    db.touch()


# ---------------------------------------------------------------------------
# Building a pool from a description (see pools.py for the format)
# ---------------------------------------------------------------------------
BUILD_TIME = datetime.datetime(2024, 3, 15, 10, 20, 30)


def _release(desc):
    from xapisim.pools import RELEASES, DEFAULT_RELEASE
    rel = desc.get("release", DEFAULT_RELEASE)
    if isinstance(rel, str):
        return dict(RELEASES[rel])
    base = dict(RELEASES[rel.get("base", DEFAULT_RELEASE)])
    base.update(rel)
    return base


def build(desc):
    """Description dict -> Database."""
    from xapisim.disks import Disk
    db = Database(seed=desc.get("seed", 1))
    from xapisim import cbt
    cbt.configure(db, desc.get("cbt"))    # CBT timing switches (cbt.py)
    rel = db.release = _release(desc)
    rng = db.rng
    # hosts
    hosts = []
    for i, h in enumerate(desc.get("hosts") or ["host1", "host2"]):
        if isinstance(h, str):
            h = {"name": h}
        address = h.get("address", "127.0.0.%d" % (i + 1))
        sv = {"product_version": rel["product_version"], "product_version_text": rel["product_version"][:3],
              "product_version_text_short": rel["product_version"][:3],
              "product_brand": rel["product_brand"], "platform_name": "XCP",
              "platform_version": rel["platform_version"], "build_number": rel["build_number"],
              "xapi": rel["xapi"].rsplit(".", 1)[0] if rel["xapi"].count(".") > 1 else rel["xapi"],
              "xapi_build": rel["xapi"], "xen": rel["xen"], "linux": "4.19.0+1",
              "hostname": h["name"], "network_backend": "openvswitch", "db_schema": "5.780",
              "date": "2024-03-01"}
        ref = db.create("host", name_label=h["name"], name_description=h.get("description", "Default install"),
                        hostname=h["name"], address=address, enabled=True,
                        API_version_major=rel["api"][0], API_version_minor=rel["api"][1],
                        API_version_vendor="XenSource", software_version=sv,
                        memory_overhead=1 << 30, sched_policy="credit", edition="xcp-ng",
                        cpu_info={"cpu_count": "8", "socket_count": "1", "vendor": "GenuineIntel",
                                  "speed": "2394.454", "modelname": "Intel(R) Xeon(R) CPU E5-2680 v4"},
                        capabilities=["xen-3.0-x86_64", "hvm-3.0-x86_32", "hvm-3.0-x86_64"],
                        license_params={"sku_type": "xcp-ng", "expiry": "20380119T03:14:07Z"},
                        other_config={"agent_start_time": "1710497430.", "iscsi_iqn": "iqn.2024-03.com.example:%s" % h["name"]},
                        virtual_hardware_platform_versions=["0", "1", "2"])
        hosts.append(ref)
    pool = db.create("pool", name_label=desc.get("name", "pool"), master=hosts[0],
                     other_config={"memory-ratio-hvm": "0.25", "memory-ratio-pv": "0.25"},
                     restrictions=dict({"restrict_vtpm": "false"}, **desc.get("restrictions", {})),
                     cpu_info={"cpu_count": str(8 * len(hosts)), "vendor": "GenuineIntel"})
    # networks + PIFs
    nets = []
    for i, n in enumerate(desc.get("networks") or [{"name": "Pool-wide network associated with eth0"}]):
        if isinstance(n, str):
            n = {"name": n}
        ref = db.create("network", name_label=n["name"], name_description=n.get("description", ""),
                        bridge=n.get("bridge", "xenbr%d" % i), MTU=int(n.get("mtu", 1500)), managed=True,
                        other_config=dict(n.get("other_config", {})), purpose=list(n.get("purpose", [])))
        nets.append(ref)
        for j, h in enumerate(hosts):
            hrec = db.tables["host"][h]
            pif = db.create("PIF", device="eth%d" % i, network=ref, host=h, MAC=random_mac(rng),
                            MTU=int(n.get("mtu", 1500)), physical=True, currently_attached=True,
                            ip_configuration_mode="Static" if i == 0 or n.get("ip") else "None",
                            IP=hrec["address"] if i == 0 or n.get("ip") else "",
                            netmask="255.0.0.0" if i == 0 or n.get("ip") else "",
                            management=(i == 0), managed=True)
            db.tables["network"][ref]["PIFs"].append(pif)
            hrec["PIFs"].append(pif)
    # SRs + PBDs + ISOs
    srs = []           # (ref, spec)
    for s in desc.get("srs") or [{"name": "Shared storage", "type": "nfs", "shared": True, "default": True}]:
        targets = [None]
        if s.get("host") == "*":
            targets = hosts
        elif s.get("host"):
            targets = [db.host_by_name(s["host"])]
        for host in targets:
            typ = s.get("type", "nfs")
            content = s.get("content_type", "iso" if typ == "iso" else "user")
            shared = bool(s.get("shared", host is None))
            ref = db.create("SR", name_label=s["name"], name_description=s.get("description", ""),
                            type=typ, content_type=content, shared=shared,
                            physical_size=parse_size(s.get("size", "100G")),
                            sm_config=dict(s.get("sm_config", {"devserial": "scsi-3600"} if typ == "lvm" else {})),
                            other_config=dict(s.get("other_config", {"auto-scan": "true"} if typ == "iso" else {})))
            for h in (hosts if host is None else [host]):
                dc = {"nfs": {"server": "nas01", "serverpath": "/export/xen", "nfsversion": "4"},
                      "iso": {"location": "nas01:/export/iso", "type": "nfs_iso"},
                      "lvm": {"device": "/dev/disk/by-id/scsi-3600-part3"},
                      "ext": {"device": "/dev/disk/by-id/scsi-3600-part3"}}.get(typ, {})
                pbd = db.create("PBD", host=h, SR=ref, device_config=dict(dc), currently_attached=True)
                db.tables["SR"][ref]["PBDs"].append(pbd)
                db.tables["host"][h]["PBDs"].append(pbd)
            srs.append((ref, s, host))
            for iso in s.get("isos", []):
                size = parse_size(iso.get("size", "10M")) if isinstance(iso, dict) else 10 << 20
                name = iso["name"] if isinstance(iso, dict) else iso
                new_vdi(db, ref, Disk(size, seed=rng.randrange(1 << 30), blocks=[0, 1, 2]),
                        name_label=name, location=name, type="user", read_only=True,
                        is_tools_iso=(name == "guest-tools.iso"))
    default_sr = next((r for r, s, h in srs if s.get("default")), None) or \
        next((r for r, s, h in srs if s.get("shared") and s.get("type") != "iso"), NULL)
    db.tables["pool"][pool].update(default_SR=default_sr, suspend_image_SR=default_sr,
                                    crash_dump_SR=default_sr)
    for h in hosts:
        local = next((r for r, s, hh in srs if hh == h and s.get("type") != "iso"), default_sr)
        db.tables["host"][h].update(suspend_image_sr=local, crash_dump_sr=local)
    # control domains
    for h in hosts:
        hrec = db.tables["host"][h]
        dom0 = db.create("VM", name_label="Control domain on host: %s" % hrec["name_label"],
                         name_description="The domain which manages physical devices and manages other domains",
                         power_state="Running", is_control_domain=True, resident_on=h, domid=0,
                         memory_static_max=4 << 30, memory_dynamic_max=4 << 30, memory_dynamic_min=4 << 30,
                         memory_static_min=4 << 30, memory_target=4 << 30, VCPUs_max=8, VCPUs_at_startup=8,
                         domain_type="pv", other_config={"storage_driver_domain": "OpaqueRef:NULL"},
                         metrics=db.create("VM_metrics", memory_actual=4 << 30, VCPUs_number=8,
                                           start_time=BUILD_TIME, install_time=BUILD_TIME,
                                           current_domain_type="pv"))
        hrec["control_domain"] = dom0
        hrec["resident_VMs"].append(dom0)
    ctx = _BuildCtx(db, hosts, nets, srs, default_sr)
    for spec in desc.get("vms", []):
        _build_vm(ctx, spec)
    db.building = False
    return db


class _BuildCtx(object):
    def __init__(self, db, hosts, nets, srs, default_sr):
        self.db, self.hosts, self.nets, self.srs, self.default_sr = db, hosts, nets, srs, default_sr

    def host(self, name):
        return self.db.host_by_name(name) if name else None

    def sr(self, name, vm_host):
        db = self.db
        if not name:
            return self.default_sr
        if name == "local" or name.startswith("local:"):
            h = self.host(name[6:]) if name.startswith("local:") else vm_host or self.hosts[0]
            for r, s, hh in self.srs:
                if hh == h and s.get("type") != "iso":
                    return r
            raise KeyError("no local SR on host %r" % name)
        found = [r for r, s, hh in self.srs
                 if name in (db.tables["SR"][r]["name_label"], db.tables["SR"][r]["uuid"])]
        if len(found) != 1:
            raise KeyError("SR %r matches %d SRs" % (name, len(found)))
        return found[0]

    def iso(self, name):
        for ref, rec in self.db.tables["VDI"].items():
            if rec["name_label"] == name and self.db.tables["SR"][rec["SR"]]["content_type"] == "iso":
                return ref
        raise KeyError("no ISO %r" % name)

    def net(self, n):
        if isinstance(n, int):
            return self.nets[n]
        for ref in self.nets:
            if self.db.tables["network"][ref]["name_label"] == n:
                return ref
        raise KeyError("no network %r" % n)


def _build_vm(ctx, spec):
    from xapisim.disks import Disk
    db = ctx.db
    rng = db.rng
    name = spec["name"]
    template = bool(spec.get("template"))
    power = spec.get("power_state", "Halted")
    host = ctx.host(spec.get("host"))
    memory = parse_size(spec.get("memory", "1G"))
    vcpus = int(spec.get("vcpus", 1))
    other = {}
    if spec.get("default_template"):
        other.update({"default_template": "true", "install-methods": "cdrom,nfs,http,ftp",
                      "linux_template": "true" if "Windows" not in name else "false"})
    elif not template:
        other.update({"base_template_name": spec.get("base_template", "Other install media"),
                      "mac_seed": db.new_uuid(), "import_task": "OpaqueRef:NULL"})
    other.update(spec.get("other_config", {}))
    metrics = db.create("VM_metrics", memory_actual=memory if power in ("Running", "Paused") else 0,
                        VCPUs_number=vcpus if power in ("Running", "Paused") else 0,
                        install_time=BUILD_TIME, last_updated=BUILD_TIME,
                        start_time=BUILD_TIME if power in ("Running", "Paused") else EPOCH,
                        current_domain_type=spec.get("domain_type", "hvm") if power != "Halted" else "unspecified")
    gm = NULL
    if spec.get("os") and not template:
        gm = db.create("VM_guest_metrics", os_version=dict(spec["os"]),
                       PV_drivers_version={"major": "8", "minor": "3", "micro": "0", "build": "4"},
                       PV_drivers_up_to_date=True, PV_drivers_detected=True, live=power == "Running",
                       networks={"0/ip": "10.0.%d.%d" % (rng.randrange(256), rng.randrange(1, 255))},
                       disks={}, memory={}, other={"platform-feature-multiprocessor-suspend": "1"},
                       last_updated=BUILD_TIME, can_use_hotplug_vbd="yes", can_use_hotplug_vif="yes")
    fields = dict(
        uuid=spec.get("uuid", ""), name_label=name, name_description=spec.get("description", ""),
        power_state="Halted", is_a_template=template,
        is_default_template=bool(spec.get("default_template")),
        memory_static_max=memory, memory_dynamic_max=memory, memory_dynamic_min=memory,
        memory_static_min=min(memory, 512 << 20), memory_target=memory, memory_overhead=memory // 128,
        VCPUs_max=vcpus, VCPUs_at_startup=vcpus, VCPUs_params={},
        HVM_boot_policy="BIOS order", HVM_boot_params={"order": "cd", "firmware": "bios"},
        platform=dict(spec.get("platform", {}), **{"timeoffset": "0", "device-model": "qemu-upstream-compat",
                                                   "acpi": "1", "apic": "true", "pae": "true", "nx": "true",
                                                   "videoram": "8", "hpet": "true"}),
        other_config=other, tags=list(spec.get("tags", [])),
        blocked_operations=dict(spec.get("blocked_operations", {})),
        ha_always_run=bool(spec.get("ha_always_run", False)),
        ha_restart_priority=spec.get("ha_restart_priority", ""),
        affinity=host or NULL, metrics=metrics, guest_metrics=gm,
        domain_type=spec.get("domain_type", "hvm"), domarch="x64" if power != "Halted" else "",
        user_version=1, hardware_platform_version=2, has_vendor_device=bool(spec.get("vendor_device", False)),
        generation_id="", NVRAM={}, bios_strings={"bios-vendor": "Xen", "system-manufacturer": "Xen"}
        if not template else {}, reference_label=spec.get("reference_label", ""),
    )
    vm = db.create("VM", fields)
    # disks
    disks = list(spec.get("disks", []))
    for i, d in enumerate(disks):
        if isinstance(d, (int, str)):
            d = {"size": d}
        size = parse_size(d.get("size", "2M"))
        nblocks = (size + 65535) // 65536
        blocks = d.get("blocks", 3)
        if isinstance(blocks, int):
            blocks = sorted({0} | {rng.randrange(nblocks) for _ in range(max(0, blocks - 1))})
        seed = d.get("seed", rng.randrange(1 << 30))
        sr = ctx.sr(d.get("sr"), host)
        vdi = new_vdi(db, sr, Disk(size, seed=seed, blocks=blocks),
                      name_label=d.get("name", "%s %s" % (name, i)),
                      name_description=d.get("description", "Created by template provisioner" if i == 0 else ""),
                      type=d.get("type", "system" if i == 0 else "user"),
                      sm_config={"vdi_type": "vhd"} if db.tables["SR"][sr]["type"] != "iso" else {},
                      other_config=dict(d.get("other_config", {})), tags=list(d.get("tags", [])))
        create_vbd(db, {"VM": vm, "VDI": vdi, "userdevice": str(d.get("userdevice", i)),
                        "bootable": i == 0, "mode": d.get("mode", "RW"), "type": "Disk",
                        "unpluggable": False, "empty": False,
                        "other_config": {"owner": ""} if d.get("owner", True) else {},
                        "device": "xvd%s" % chr(ord("a") + i)})
    if "cd" in spec and spec["cd"] is not None:
        cd = spec["cd"]
        create_vbd(db, {"VM": vm, "VDI": ctx.iso(cd) if cd else NULL, "userdevice": "3",
                        "bootable": False, "mode": "RO", "type": "CD", "unpluggable": True,
                        "empty": not cd, "device": "xvdd", "other_config": {}})
    for i, n in enumerate(spec.get("vifs", [])):
        create_vif(db, {"VM": vm, "network": ctx.net(n), "device": str(i),
                        "MAC": random_mac(rng), "MAC_autogenerated": True, "other_config": {},
                        "locking_mode": "network_default"})
    # person-made snapshots (taken while halted, before the power state is set)
    rec = db.tables["VM"][vm]
    for j, snap in enumerate(spec.get("snapshots", [])):
        if isinstance(snap, str):
            snap = {"name": snap}
        s = snapshot_vm(db, vm, snap["name"])
        srec = db.tables["VM"][s]
        t = BUILD_TIME - datetime.timedelta(days=7 * (len(spec["snapshots"]) - j))
        srec["snapshot_time"] = t
        srec["snapshot_info"]["power-state-at-snapshot"] = power
        for vbd in srec["VBDs"]:
            vdi = db.tables["VDI"].get(db.tables["VBD"][vbd]["VDI"])
            if vdi and vdi["is_a_snapshot"]:
                vdi["snapshot_time"] = t
    if power in ("Running", "Paused"):
        h = host
        srs = db.vm_disk_srs(vm)
        if h is None or not db.host_sees_srs(h, srs):
            h = db.host_for_srs(srs)
        _make_running(db, vm, h)
        rec["power_state"] = power
        for vbd in rec["VBDs"]:
            b = db.tables["VBD"][vbd]
            b["currently_attached"] = True
    elif power == "Suspended":
        rec["power_state"] = "Suspended"
        sr = ctx.sr(None, host)
        rec["suspend_VDI"] = new_vdi(db, sr, Disk(4 << 20, seed=rng.randrange(1 << 30), blocks=[0, 1]),
                                     name_label="Suspend image", type="suspend")
        rec["last_booted_record"] = ""
    return vm
