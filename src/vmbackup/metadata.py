"""What a backup writes about its VM: vm-metadata, NAUbackup's .cfg files, the manifest's parts.

Owns: write_cfg_files/save_vm_metadata, file_entry/pool_info (manifest parts).
Reading a backup folder back (manifest, .cfg files, file kinds) is store's.
Imports: errors, util, selection, store, formats.xva.
"""

import os
import xml.dom.minidom

from vmbackup import __version__

from vmbackup.errors import ExportFailed
from vmbackup.formats.xva import ova_xml_from_tar
from vmbackup.selection import vm_disks
from vmbackup.store import METADATA_FILE, inside, safe_dirname
from vmbackup.util import one_line, printable, sha256_file, write_text


def cfg_text(pairs):
    """Return NAUbackup's `key=value` lines, control characters escaped so each stays one line."""
    return "".join("%s=%s\n" % (key, printable(value)) for key, value in pairs)


def os_version(view, vm):
    """Return the guest's OS name from its guest metrics, or ''."""
    metrics = view.guest_metrics.get(vm.get("guest_metrics"), {})
    version = metrics.get("os_version", {}) or {}
    return version.get("name") or version.get("distro") or ""


def write_cfg_files(folder, view, vm_ref):
    """Write vm.cfg, DISK-<dev>/vbd.cfg + vdi.cfg and VIFs/vif-<dev>.cfg; return their paths."""
    vm = view.vms[vm_ref]
    written = []

    def put(rel, pairs):
        path = inside(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_text(path, cfg_text(pairs))
        written.append(rel)

    put("vm.cfg", [("name_label", vm["name_label"]), ("name_description", vm.get("name_description", "")),
                   ("memory_dynamic_max", vm.get("memory_dynamic_max", "")),
                   ("VCPUs_max", vm.get("VCPUs_max", "")),
                   ("VCPUs_at_startup", vm.get("VCPUs_at_startup", "")),
                   ("os_version", os_version(view, vm)), ("orig_uuid", vm["uuid"])])
    for disk in vm_disks(vm, view.vbds, view.vdis):
        vbd, vdi = view.vbds[disk.vbd_ref], disk.vdi
        base = "DISK-" + safe_dirname(disk.device)
        put(base + "/vbd.cfg", [(k, vbd.get(k, "")) for k in
                                ("userdevice", "bootable", "mode", "type", "unpluggable", "empty")]
            + [("orig_uuid", vbd.get("uuid", ""))])
        put(base + "/vdi.cfg", [(k, vdi.get(k, "")) for k in
                                ("name_label", "name_description", "virtual_size", "type",
                                 "sharable", "read_only")]
            + [("orig_uuid", vdi.get("uuid", "")),
               ("orig_sr_uuid", view.srs.get(vdi.get("SR"), {}).get("uuid", ""))])
    for vif_ref in vm.get("VIFs", ()):
        vif = view.vifs.get(vif_ref)
        if not vif:
            continue
        network = view.networks.get(vif.get("network"), {})
        put("VIFs/vif-%s.cfg" % safe_dirname(vif.get("device", "")),
            [("device", vif.get("device", "")), ("network_name_label", network.get("name_label", "")),
             ("MTU", vif.get("MTU", "")), ("MAC", vif.get("MAC", "")),
             ("other_config", vif.get("other_config", {})), ("orig_uuid", vif.get("uuid", ""))])
    return written


def save_vm_metadata(transport, vm, folder):
    """Export the VM's XAPI metadata and save its ova.xml pretty-printed as vm-metadata.xml."""
    tmp = os.path.join(folder, ".metadata.tar.part")
    try:
        transport.export_metadata(vm, tmp)
        raw = ova_xml_from_tar(tmp)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    try:
        pretty = xml.dom.minidom.parseString(raw).toprettyxml(indent="  ")
    except Exception as exc:  # noqa: BLE001 - expat raises several types
        raise ExportFailed("metadata export: ova.xml does not parse: %s" % one_line(exc))
    write_text(os.path.join(folder, METADATA_FILE), pretty)
    return METADATA_FILE


def file_entry(folder, rel, digest=None):
    """Return the manifest entry {name, size, sha256} of a file in a backup folder."""
    path = os.path.join(folder, rel)
    return {"name": rel, "size": os.path.getsize(path), "sha256": digest or sha256_file(path)}


def pool_info(view):
    """Return what the manifest records about the pool's master."""
    master = view.master
    software = master.get("software_version", {}) or {}
    return {"master": master.get("hostname") or master.get("name_label", ""),
            "product_brand": software.get("product_brand", ""),
            "product_version": software.get("product_version", ""),
            "xapi": software.get("xapi", ""),
            "api_version": "%s.%s" % (master.get("API_version_major", "?"),
                                      master.get("API_version_minor", "?"))}


#: The manifest's format: readers refuse a newer one rather than guess.
MANIFEST_FORMAT = 1


def manifest_record(vm, mode, transport, started, finished, files, disks=(), skipped=(),
                    compress=None, vdi_format=None, pool=None):
    """Return a backup.json: what was backed up (vm: name, uuid, power_state), how, and every file.

    `disks` are {device, userdevice, vdi_uuid, name_label, virtual_size, file} and `files`
    are file_entry()s; the one place the manifest's shape is written down.
    """
    return {
        "tool": "vmbackup", "version": __version__, "format": MANIFEST_FORMAT,
        "vm": dict(vm), "mode": mode, "transport": transport,
        "started": started, "finished": finished,
        "compress": compress if mode == "vm-export" else None,
        "vdi_format": vdi_format if mode == "vdi-export" else None,
        "disks": [dict(d) for d in disks], "skipped_disks": list(skipped),
        "files": list(files), "pool": pool or {},
    }

