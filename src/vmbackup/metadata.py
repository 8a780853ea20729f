"""What a backup folder says about itself: vm-metadata, NAUbackup's .cfg files, the manifest.

Owns: write_cfg_files/save_vm_metadata, file_entry/pool_info (manifest parts),
read_cfg/read_manifest, FILE_KINDS/file_kind.
Imports: errors, util, selection, store, formats.xva.
"""

import json
import os
import xml.dom.minidom

from vmbackup.errors import BadFile, ExportFailed
from vmbackup.formats.xva import ova_xml_from_tar
from vmbackup.selection import vm_disks
from vmbackup.store import MANIFEST, inside, safe_dirname
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
    write_text(os.path.join(folder, "vm-metadata.xml"), pretty)
    return "vm-metadata.xml"


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


#: NAUbackup marks a complete backup with `success`, or `success_compress` for large files.

#: What a check of one file can say.
FILE_KINDS = (("xva", (".xva", ".xva.gz", ".xva.zst")), ("vhd", (".vhd",)), ("raw", (".raw",)),
              ("metadata", ("vm-metadata.xml",)))


def file_kind(name):
    """Return the kind of a backup file by its name: xva, vhd, raw, metadata, or None."""
    for kind, endings in FILE_KINDS:
        if name.endswith(endings):
            return kind
    return None


def read_cfg(path):
    """Return the key=value pairs of a NAUbackup .cfg file as a dict ({} if unreadable)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return dict(line.rstrip("\n").split("=", 1) for line in handle if "=" in line)
    except OSError:
        return {}


def read_manifest(folder):
    """Return the backup.json of a backup folder as a dict, or None if absent; raise BadFile."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BadFile("%s does not parse: %s" % (MANIFEST, one_line(exc)))
    if not isinstance(manifest, dict) or manifest.get("tool") != "vmbackup" \
            or not isinstance(manifest.get("files"), list):
        raise BadFile("%s is not a vmbackup manifest" % MANIFEST)
    if manifest.get("format") != 1:
        raise BadFile("%s has format %r; this vmbackup reads format 1"
                      % (MANIFEST, manifest.get("format")))
    return manifest
