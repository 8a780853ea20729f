"""The `xe` stand-in: XenServer's command line client, re-done over XAPI.

Real `xe` is a thin client (ocaml/xe-cli/newcli.ml) that posts the command
line to the `/cli` handler of xapi; the CLI server (ocaml/xapi-cli-server/)
then runs the command with ordinary XAPI calls and tells the thin client what
to print and which HTTP transfers to make.  This module plays both halves in
one process: it makes the same XML-RPC calls the CLI server makes (through the
official `XenAPI` package) and the same HTTP GET/PUT requests the thin client
makes (raw HTTP/1.0, `session_id` and `task_id` in the query, following 302
redirects), and prints what both would print.  Facts used are in
shared/xapi-facts.md section 8; where it was silent the behaviour follows the
xapi sources named in the comments.

Deliberate simplifications (all invisible to a caller that only looks at
stdout, stderr, exit codes and files):
  * records are read with `<Class>.get_all_records` and filtered here, where
    the real CLI server calls `get_all_records_where` with expression "true";
  * tasks are waited for by polling `task.get_status` instead of the event
    system; after each VM operation the real CLI server also calls
    `message.get`, which is skipped;
  * only a subset of the ~1000 commands exists (see COMMANDS), and records
    carry the fields a backup tool meets rather than every field;
  * "local" means the unix socket in $XAPISIM_SOCKET (dom0's
    /var/lib/xcp/xapi).  Real xe also treats `-s 127.0.0.1` as local (it
    tries the socket first and never uses TLS to 127.0.0.1), but in the
    simulator 127.0.0.x addresses stand for other hosts, so `-s` always means
    TCP here;
  * HTTP transfers of a socket session go over the same socket (real xe makes
    them over TCP to 127.0.0.1:80); absolute URLs (another host, redirects)
    use TCP with the port and scheme of $XAPISIM_URL standing for the
    well-known 443 when no `-s` was given;
  * a task that never finishes is given up after $XE_TASK_TIMEOUT seconds
    (default 300) where real xe would wait forever.
"""

import errno
import os
import re
import signal
import socket
import ssl
import stat
import sys
import time
import urllib.parse
import http.client
import xmlrpc.client

try:
    import XenAPI
except ImportError:  # pragma: no cover - reported at run time
    XenAPI = None

API_VERSION = "2.21"
THIN_CLI_PROTOCOL = (5, 0)
NID = "<not in database>"
# errors of connect() itself; anything later means the server did not talk
CONNECT_ERRNOS = (errno.ECONNREFUSED, errno.ENOENT, errno.EHOSTUNREACH, errno.ENETUNREACH,
                  errno.ETIMEDOUT, errno.EACCES, errno.EADDRNOTAVAIL, errno.ENOTSOCK)
NULLREF = "OpaqueRef:NULL"


# ---------------------------------------------------------------------------
# Exceptions mirroring the ones xapi_cli.ml's exception_handler knows about
# ---------------------------------------------------------------------------

class ApiError(Exception):
    """Api_errors.Server_error (code, params)."""

    def __init__(self, code, params=()):
        Exception.__init__(self, code)
        self.code = code
        self.params = [str(p) for p in params]


class CliFailure(Exception):
    """Cli_util.Cli_failure: printed as "Error: <msg>"."""


class RecordFailure(Exception):
    """Record_util.Record_failure: printed as "Error: <msg>"."""


class ParamError(Exception):
    """Unknown_command / ParamNotFound / ParseError (param_error)."""

    def __init__(self, prefix, text):
        Exception.__init__(self, text)
        self.prefix = prefix
        self.text = text


class OCamlFailure(Exception):
    """A plain OCaml `Failure str`: reported as INTERNAL_ERROR "Failure: str"."""


class MissingParam(Exception):
    """Records.CLI_failed_to_find_param."""


class MultipleFailure(Exception):
    def __init__(self, errs):
        Exception.__init__(self, "multiple failure")
        self.errs = errs


class ExitWithError(Exception):
    def __init__(self, code):
        Exception.__init__(self, code)
        self.code = code


class ClientSideError(Exception):
    """newcli.ml ClientSideError: "Operation failed. Error: <msg>", exit 1."""


class Interrupted(BaseException):
    """SIGINT/SIGTERM: not an Exception, so no `except Exception` swallows it."""

    def __init__(self, signum):
        BaseException.__init__(self, signum)
        self.signum = signum


# ---------------------------------------------------------------------------
# Output helpers (bytes, so names in any language pass through untouched)
# ---------------------------------------------------------------------------

def _enc(text):
    return text.encode("utf-8", "surrogateescape")


def out(text):
    sys.stdout.flush()
    sys.stdout.buffer.write(_enc(text))
    sys.stdout.buffer.flush()


def err(text):
    sys.stderr.flush()
    sys.stderr.buffer.write(_enc(text))
    sys.stderr.buffer.flush()


def ocaml_escaped(s):
    """OCaml String.escaped / %S (used by Printexc.to_string)."""
    res = []
    for byte in _enc(s):
        c = chr(byte)
        if c == '"':
            res.append('\\"')
        elif c == "\\":
            res.append("\\\\")
        elif c == "\n":
            res.append("\\n")
        elif c == "\t":
            res.append("\\t")
        elif c == "\r":
            res.append("\\r")
        elif c == "\b":
            res.append("\\b")
        elif 32 <= byte <= 126:
            res.append(c)
        else:
            res.append("\\%03d" % byte)
    return "".join(res)


# ---------------------------------------------------------------------------
# Error doc sentences (ocaml/idl/datamodel_errors.ml).  Codes missing here are
# printed as "Error code:" / "Error parameters:", as for codes that have no
# datamodel entry (e.g. SR_BACKEND_FAILURE_44, VDI_IO_ERROR, CLIENT_ERROR,
# VM_IS_SNAPSHOT).
# ---------------------------------------------------------------------------

ERRORS = {
    "INTERNAL_ERROR": (["message"], "The server failed to handle your request, due to an internal error. The given message may give details useful for debugging the problem."),
    "MESSAGE_DEPRECATED": ([], "This message has been deprecated."),
    "MESSAGE_REMOVED": ([], "This function is no longer available."),
    "PERMISSION_DENIED": (["message"], "Caller not allowed to perform this operation."),
    "LICENCE_RESTRICTION": (["feature"], "This operation is not allowed because your license lacks a needed feature. Please contact your support representative."),
    "CANNOT_CONTACT_HOST": (["host"], "Cannot forward messages because the server cannot be contacted. The server may be switched off or there may be network connectivity problems."),
    "UUID_INVALID": (["type", "uuid"], "The uuid you supplied was invalid."),
    "OBJECT_NOLONGER_EXISTS": ([], "The specified object no longer exists."),
    "MAP_DUPLICATE_KEY": (["type", "param_name", "uuid", "key"], "You tried to add a key-value pair to a map, but that key is already there."),
    "XMLRPC_UNMARSHAL_FAILURE": (["expected", "received"], "The server failed to unmarshal the XMLRPC message; it was expecting one element and received something else."),
    "MESSAGE_METHOD_UNKNOWN": (["method"], "You tried to call a method that does not exist. The method name that you used is echoed."),
    "MESSAGE_PARAMETER_COUNT_MISMATCH": (["method", "expected", "received"], "You tried to call a method with the incorrect number of parameters. The fully-qualified method name that you used, and the number of received and expected parameters are returned."),
    "VALUE_NOT_SUPPORTED": (["field", "value", "reason"], "You attempted to set a value that is not supported by this implementation. The fully-qualified field name and the value that you tried to set are returned. Also returned is a developer-only diagnostic reason."),
    "INVALID_VALUE": (["field", "value"], "The value given is invalid"),
    "FIELD_TYPE_ERROR": (["field"], "The value specified is of the wrong type"),
    "OPERATION_NOT_ALLOWED": (["reason"], "You attempted an operation that was not allowed."),
    "OPERATION_BLOCKED": (["ref", "code"], "You attempted an operation that was explicitly blocked (see the blocked_operations field of the given object)."),
    "NOT_IMPLEMENTED": (["function"], "The function is not implemented"),
    "HANDLE_INVALID": (["class", "handle"], "You gave an invalid object reference. The object may have recently been deleted. The class parameter gives the type of reference given, and the handle parameter echoes the bad value given."),
    "DB_UNIQUENESS_CONSTRAINT_VIOLATION": (["table", "field", "value"], "You attempted an operation which would have resulted in duplicate keys in the database."),
    "SESSION_AUTHENTICATION_FAILED": ([], "The credentials given by the user are incorrect, so access has been denied, and you have not been issued a session handle."),
    "SESSION_INVALID": (["handle"], "You gave an invalid session reference. It may have been invalidated by a server restart, or timed out. You should get a new session handle, using one of the session.login_ calls. This error does not invalidate the current connection. The handle parameter echoes the bad value given."),
    "VM_BAD_POWER_STATE": (["vm", "expected", "actual"], "You attempted an operation on a VM that was not in an appropriate power state at the time; for example, you attempted to start a VM that was already running. The parameters returned are the VM's handle, and the expected and actual VM state at the time of the call."),
    "VM_IS_TEMPLATE": (["vm"], "The operation attempted is not valid for a template VM"),
    "OTHER_OPERATION_IN_PROGRESS": (["class", "object"], "Another operation involving the object is currently in progress"),
    "VM_CANNOT_DELETE_DEFAULT_TEMPLATE": (["vm"], "You cannot delete the specified default template."),
    "VM_HVM_REQUIRED": (["vm"], "HVM is required for this operation"),
    "VBD_NOT_EMPTY": (["vbd"], "Operation could not be performed because the drive is not empty"),
    "VBD_IS_EMPTY": (["vbd"], "Operation could not be performed because the drive is empty"),
    "HOST_NOT_ENOUGH_FREE_MEMORY": (["needed", "available"], "Not enough server memory is available to perform this operation."),
    "DUPLICATE_VM": (["vm"], "Cannot restore this VM because it would create a duplicate"),
    "VM_SNAPSHOT_WITH_QUIESCE_FAILED": (["vm"], "The quiesced-snapshot operation failed for an unexpected reason"),
    "HOST_OFFLINE": (["host"], "You attempted an operation which involves a host which could not be contacted."),
    "NO_HOSTS_AVAILABLE": ([], "There were no servers available to complete the specified operation."),
    "HOST_NOT_LIVE": ([], "This operation cannot be completed as the server is not live."),
    "VM_REQUIRES_SR": (["vm", "sr"], "You attempted to run a VM on a host which doesn't have access to an SR needed by the VM. The VM has at least one VBD attached to a VDI in the SR."),
    "SR_NOT_ATTACHED": (["sr"], "The SR is not attached."),
    "SR_BACKEND_FAILURE": (["status", "stdout", "stderr"], "There was an SR backend failure."),
    "SR_HAS_NO_PBDS": (["sr"], "The SR has no attached PBDs"),
    "SR_FULL": (["requested", "maximum"], "The SR is full. Requested new size exceeds the maximum size"),
    "VDI_READONLY": (["vdi"], "The operation required write access but this VDI is read-only"),
    "VDI_TOO_SMALL": (["vdi", "minimum size"], "The VDI is too small. Please resize it to at least the minimum size."),
    "VDI_TOO_LARGE": (["vdi", "maximum size"], "The VDI is too large."),
    "VDI_IN_USE": (["vdi", "operation"], "This operation cannot be performed because this VDI is in use by some other operation"),
    "VDI_NOT_AVAILABLE": (["vdi"], "This operation cannot be performed because this VDI could not be properly attached to the VM."),
    "VDI_LOCATION_MISSING": (["sr", "location"], "This operation cannot be performed because the specified VDI could not be found in the specified SR"),
    "VDI_MISSING": (["sr", "vdi"], "This operation cannot be performed because the specified VDI could not be found on the storage substrate"),
    "VDI_INCOMPATIBLE_TYPE": (["vdi", "type"], "This operation cannot be performed because the specified VDI is of an incompatible type (eg: an HA statefile cannot be attached to a guest)"),
    "VDI_NOT_MANAGED": (["vdi"], "This operation cannot be performed because the system does not manage this VDI"),
    "VDI_CBT_ENABLED": (["vdi"], "The requested operation is not allowed for VDIs with CBT enabled or VMs having such VDIs, and CBT is enabled for the specified VDI."),
    "VDI_NO_CBT_METADATA": (["vdi"], "The requested operation is not allowed because the specified VDI does not have changed block tracking metadata."),
    "VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION": ([], "This operation is not permitted on VDIs in the 'on-boot=reset' mode, or on VMs having such VDIs."),
    "SR_OPERATION_NOT_SUPPORTED": (["sr"], "The SR backend does not support the operation (check the SR's allowed operations)"),
    "SR_NOT_EMPTY": ([], "The SR operation cannot be performed because the SR is not empty."),
    "SR_DEVICE_IN_USE": ([], "The SR operation cannot be performed because a device underlying the SR is in use by the server."),
    "DEVICE_ALREADY_ATTACHED": (["device"], "The device is already attached to a VM"),
    "DEVICE_ALREADY_EXISTS": (["device"], "A device with the name given already exists on the selected VM"),
    "INVALID_DEVICE": (["device"], "The device name is invalid"),
    "DEFAULT_SR_NOT_FOUND": (["sr"], "The default SR reference does not point to a valid SR"),
    "IMPORT_INCOMPATIBLE_VERSION": ([], "The import failed because this export has been created by a different (incompatible) product version"),
    "IMPORT_ERROR": (["msg"], "The VM could not be imported."),
    "IMPORT_ERROR_PREMATURE_EOF": ([], "The VM could not be imported; the end of the file was reached prematurely."),
    "IMPORT_ERROR_SOME_CHECKSUMS_FAILED": ([], "Some data checksums were incorrect; the VM may be corrupt."),
    "IMPORT_ERROR_CANNOT_HANDLE_CHUNKED": ([], "Cannot import VM using chunked encoding."),
    "IMPORT_ERROR_FAILED_TO_FIND_OBJECT": (["id"], "The VM could not be imported because a required object could not be found."),
    "IMPORT_ERROR_ATTACHED_DISKS_NOT_FOUND": ([], "The VM could not be imported because attached disks could not be found."),
    "IMPORT_ERROR_UNEXPECTED_FILE": (["filename_expected", "filename_found"], "The VM could not be imported because the XVA file is invalid: an unexpected file was encountered."),
    "BACKUP_SCRIPT_FAILED": (["log"], "The backup could not be performed because the backup script failed."),
    "RESTORE_SCRIPT_FAILED": (["log"], "The restore could not be performed because the restore script failed. Is the file corrupt?"),
    "EVENTS_LOST": ([], "Some events have been lost from the queue and cannot be retrieved."),
    "TASK_CANCELLED": (["task"], "The request was asynchronously canceled."),
    "TOO_MANY_PENDING_TASKS": ([], "The request was rejected because there are too many pending tasks on the server."),
    "TOO_BUSY": ([], "The request was rejected because the server is too busy."),
    "HOST_IS_SLAVE": (["Master IP address"], "You cannot make regular API calls directly on a slave. Please pass API calls via the master host."),
    "RBAC_PERMISSION_DENIED": (["permission", "message"], "RBAC permission denied."),
    "MAC_INVALID": (["MAC"], "The MAC address specified is not valid."),
}


# ---------------------------------------------------------------------------
# Value helpers (Record_util)
# ---------------------------------------------------------------------------

def parse_bool(param, value):
    """Record_util.bool_of_string as used by get_bool_param."""
    v = value.lower()
    if v in ("true", "t", "yes", "y", "1"):
        return True
    if v in ("false", "f", "no", "n", "0"):
        return False
    raise RecordFailure(
        "Failed to parse parameter '%s': Expected 'true','t','yes','y','1',"
        "'false','f','no','n','0' got %s" % (param, value))


def get_bool_param(params, name, default=False):
    if name in params:
        return parse_bool(name, params[name])
    return default


def ocaml_bool(value):
    """Stdlib.bool_of_string: only "true"/"false"."""
    if value == "true":
        return True
    if value == "false":
        return False
    raise ValueError("bool_of_string")


def bytes_of_string(field, text):
    """Record_util.bytes_of_string: [0-9]+ then an optional unit."""
    m = re.match(r"^\s*(-?\d+)\s*(\S*)\s*$", text)
    mult = {"bytes": 1, "b": 1, "": 1, "kib": 1 << 10, "kb": 1 << 10, "k": 1 << 10,
            "mib": 1 << 20, "mb": 1 << 20, "m": 1 << 20, "gib": 1 << 30,
            "gb": 1 << 30, "g": 1 << 30, "tib": 1 << 40, "tb": 1 << 40, "t": 1 << 40}
    if m and int(m.group(1)) >= 0 and m.group(2).lower() in mult:
        return int(m.group(1)) * mult[m.group(2).lower()]
    raise RecordFailure(
        "Failed to parse field '%s': expecting an integer (possibly with suffix "
        "KiB, MiB, GiB, TiB), got '%s'" % (field, text))


def escape_commas(s):
    """cli_printer.ml escape_commas, for --minimal."""
    return s.replace("\\", "\\\\").replace(",", "\\,")


def to_str(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, xmlrpc.client.DateTime):
        return v.value
    if isinstance(v, float):
        return "%.3f" % v
    if v is None:
        return ""
    return str(v)


def map_to_str(m):
    """Record_util.s2sm_to_string "; "."""
    if not isinstance(m, dict):
        return ""
    return "; ".join("%s: %s" % (k, to_str(v)) for k, v in m.items())


VDI_TYPES = {"system": "System", "user": "User", "ephemeral": "Ephemeral",
             "suspend": "Suspend", "crashdump": "Crashdump",
             "ha_statefile": "HA statefile", "metadata": "Metadata",
             "redo_log": "Redo log", "rrd": "rrd", "pvs_cache": "PVS cache",
             "cbt_metadata": "CBT metadata"}


# ---------------------------------------------------------------------------
# Connection
# ---------------------------------------------------------------------------

class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path):
        http.client.HTTPConnection.__init__(self, "localhost")
        self._unix_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self._unix_path)
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    """XML-RPC over dom0's unix socket (XenAPI's UDSTransport derives the
    path from the host name, which cannot hold every path)."""

    def __init__(self, path):
        xmlrpc.client.Transport.__init__(self)
        self._unix_path = path

    def make_connection(self, host):
        if self._connection and host == self._connection[0]:
            return self._connection[1]
        self._connection = host, _UnixHTTPConnection(self._unix_path)
        return self._connection[1]


class Target(object):
    """Where an HTTP request or XML-RPC call goes."""

    def __init__(self, unix_path=None, host=None, port=None, tls=False):
        self.unix_path = unix_path
        self.host = host
        self.port = port
        self.tls = tls

    def connect(self):
        if self.unix_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.unix_path)
            except Exception:
                sock.close()
                raise
            return sock
        sock = socket.create_connection((self.host, self.port))
        if self.tls:
            # Real xe goes through stunnel without checking the server's
            # certificate (newcli.ml: Stunnel.with_connect ~verify_cert:None),
            # so no verification here either.
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            sock = ctx.wrap_socket(sock, server_hostname=self.host)
        return sock

    def url(self):
        host = self.host
        if ":" in host and not host.startswith("["):
            host = "[%s]" % host
        return "%s://%s:%d/" % ("https" if self.tls else "http", host, self.port)


class Config(object):
    """Thin-client settings (newcli.ml parse_args)."""

    def __init__(self):
        self.server = None
        self.port = None
        self.username = "root"
        self.password = "null"
        self.passwordfile = ""
        self.use_ssl = True
        self.debug = False
        self.traceparent = None

    def set_keyword(self, key, value):
        if key == "server":
            self.server = value
        elif key == "port":
            try:
                p = int(value)
                if p < 0 or p > 65535:
                    raise ValueError(value)
            except ValueError:
                err("Port number must be an integer (0-65535)\n")
                raise _Usage()
            self.port = p
        elif key == "username":
            self.username = value
        elif key == "password":
            self.password = value
        elif key == "passwordfile":
            self.passwordfile = value
        elif key == "nossl":
            self.use_ssl = not ocaml_bool(value)
        elif key in ("debug", "debugonfail"):
            self.debug = value == "true"
        elif key == "traceparent":
            self.traceparent = value
        else:
            return False
        return True

    # -- targets ------------------------------------------------------------
    def local(self):
        return self.server is None

    def socket_path(self):
        return os.environ.get("XAPISIM_SOCKET") or "/var/lib/xcp/xapi"

    def _default_remote(self):
        """(tls, port) used for TCP connections to named hosts."""
        if not self.local():
            return self.use_ssl, (self.port if self.port is not None
                                  else (443 if self.use_ssl else 80))
        url = os.environ.get("XAPISIM_URL")
        if url:
            parts = urllib.parse.urlsplit(url)
            tls = parts.scheme == "https"
            return tls, parts.port or (443 if tls else 80)
        return True, 443

    def main_target(self):
        if self.local():
            return Target(unix_path=self.socket_path())
        tls, port = self._default_remote()
        return Target(host=self.server, port=port, tls=tls)

    def resolve(self, url):
        """newcli.ml parse_url: an absolute URL names another host, a path
        goes to the server the command went to."""
        if url.startswith("https://") or url.startswith("http://"):
            parts = urllib.parse.urlsplit(url)
            tls, port = self._default_remote()
            if parts.port:
                port = parts.port
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            return Target(host=parts.hostname, port=port, tls=tls), path
        return self.main_target(), url


class _Usage(Exception):
    pass


def usage():
    prog = sys.argv[0] if sys.argv else "xe"
    err("Usage: %s <cmd> [-s server] [-p port] ([-u username] [-pw password] or "
        "[-pwf <password file>]) [--traceparent traceparent] <other arguments>\n" % prog)
    err("\nA full list of commands can be obtained by running \n\t%s help -s <server> -p <port>\n" % prog)


def parse_args(argv, cfg):
    """Split off the thin client's own options; return the rest in order."""
    rest = []
    i = 0
    two = {"-s": "server", "-p": "port", "-u": "username", "-pw": "password",
           "-pwf": "passwordfile", "-h": "server", "--traceparent": "traceparent"}
    one = {"--nossl": "nossl", "--debug": "debug", "--debug-on-fail": "debugonfail"}
    while i < len(argv):
        a = argv[i]
        if a in two and i + 1 < len(argv):
            cfg.set_keyword(two[a], argv[i + 1])
            i += 2
            continue
        if a in one:
            cfg.set_keyword(one[a], "true")
            i += 1
            continue
        if "=" in a:
            k, v = a.split("=", 1)
            if cfg.set_keyword(k, v):
                i += 1
                continue
        rest.append(a)
        i += 1
    return rest


def read_password_file(cfg):
    """newcli.ml read_pwf: username on the first line, password on the second."""
    try:
        fh = open(cfg.passwordfile, "rb")
    except (IOError, OSError):
        err("Error opening password file '%s'\n" % cfg.passwordfile)
        raise ExitWithError(1)
    with fh:
        lines = fh.read().split(b"\n")
    if len(lines) < 2 or (len(lines) == 2 and lines[1] == b""):
        err("Error: password file format: expecting username on the first line, "
            "password on the second line\n")
        raise ExitWithError(1)
    cfg.username = lines[0].decode("utf-8", "surrogateescape")
    cfg.password = lines[1].decode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------
# Command line parsing on the server side (cli_frontend.ml parse_params_2)
# ---------------------------------------------------------------------------

SWITCHES = {"--force": "force", "--live": "live", "--internal": "internal",
            "-u": "username", "-pw": "password", "-s": "server", "-h": "server",
            "-p": "port", "--debug": "debug", "--minimal": "minimal", "--all": "all"}


def parse_command(args):
    if not args:
        raise _Usage()
    cmd = args[0]
    if "=" in cmd:
        raise ParamError("Syntax error", "")
    params = []
    i = 1
    while i < len(args):
        p = args[i]
        if p.startswith("--"):
            params.append((p[2:], "true"))
            i += 1
        elif p.startswith("-"):
            if i + 1 >= len(args) or p not in SWITCHES:
                raise ParamError("Syntax error", "")
            params.append((SWITCHES[p], args[i + 1]))
            i += 2
        else:
            if "=" in p:
                k, v = p.split("=", 1)
            else:
                k, v = p, ""
            params.append((k, v))
            i += 1
    return cmd, params


class Params(object):
    """Ordered key=value list with assoc-style lookups (first wins)."""

    def __init__(self, items):
        self.items = list(items)

    def __contains__(self, key):
        return any(k == key for k, _ in self.items)

    def __getitem__(self, key):
        for k, v in self.items:
            if k == key:
                return v
        raise KeyError(key)

    def get(self, key, default=None):
        for k, v in self.items:
            if k == key:
                return v
        return default

    def map_params(self, name):
        """read_map_params: `name:key=value` (or old `name-key`)."""
        n = len(name) + 1
        return [(k[n:], v) for k, v in self.items
                if k.startswith(name) and len(k) > n]


STDPARAMS = ["server", "password", "port", "username", "minimal", "force",
             "multiple", "all", "message-priority", "trace"]


# ---------------------------------------------------------------------------
# Printer (cli_printer.ml)
# ---------------------------------------------------------------------------

class Printer(object):
    def __init__(self, minimal):
        self.minimal = minimal
        self.buffer = []

    def table(self, records):
        """PTable: list of records, each a list of (name, value)."""
        if self.minimal:
            if records and records[0]:
                self.buffer.insert(0, ",".join(escape_commas(r[0][1]) for r in records))
            return
        for rec in records:
            out(multi_line_record(rec) + "\n\n")

    def plist(self, items):
        if self.minimal:
            self.buffer.insert(0, ",".join(escape_commas(s) for s in items))
            return
        for s in items:
            out(s + "\n")

    def msg(self, s):
        if not self.minimal:
            out(s + "\n")

    def stderr(self, s):
        if not self.minimal:
            err(s + "\n")

    def flush(self):
        if self.minimal:
            out(",".join(self.buffer) + "\n")


def multi_line_record(rec):
    if not rec:
        return "\n"
    maxlen = 4 + max(len(k) for k, _ in rec)
    lines = []
    for i, (k, v) in enumerate(rec):
        if i == 0:
            k = k.ljust(maxlen)
        else:
            k = k.rjust(maxlen)
        lines.append("%s: %s" % (k, v))
    return "\n".join(lines) + "\n"


def doc_lines(code, conv):
    """An error in the datamodel: its doc sentence, then ``<param name>: <value>``."""
    names, doc = ERRORS[code]
    lines = [doc]
    for i in range(max(len(names), len(conv))):
        if i < len(names) and i < len(conv):
            lines.append("%s: %s" % (names[i], conv[i]))
        elif i < len(conv):
            lines.append("<extra>: %s" % conv[i])
        else:
            lines.append("%s: <unknown>" % names[i])
    return lines


def print_api_error(code, params, refs=None):
    """Cli_util.server_error."""
    conv = [refs.convert(p) if refs else p for p in params]
    if code in ERRORS:
        for line in doc_lines(code, conv):
            err(line + "\n")
    else:
        err("Error code: %s\n" % code)
        err("Error parameters: %s\n" % ", ".join(conv))


# ---------------------------------------------------------------------------
# Reference index (xapi's Ref_index: ref -> uuid, name-label)
# ---------------------------------------------------------------------------

REF_CLASSES = ["VM", "VDI", "SR", "host", "network", "VBD", "VIF", "pool",
               "task", "PBD", "PIF", "VM_metrics", "VM_guest_metrics"]
NAMED_CLASSES = set(["VM", "VDI", "SR", "host", "network", "pool", "task"])


class RefIndex(object):
    def __init__(self, api):
        self.api = api
        self.known = {}
        self.loaded = set()

    def add(self, cls, ref, rec):
        name = rec.get("name_label") if cls in NAMED_CLASSES else None
        self.known[ref] = (rec.get("uuid", ""), name)

    def add_all(self, cls, recs):
        self.loaded.add(cls)
        for ref, rec in recs.items():
            self.add(cls, ref, rec)

    def lookup(self, ref):
        if not isinstance(ref, str) or not ref.startswith("OpaqueRef:") or ref == NULLREF:
            return None
        if ref in self.known:
            return self.known[ref]
        for cls in REF_CLASSES:
            if cls in self.loaded:
                continue
            self.loaded.add(cls)
            try:
                recs = getattr(self.api, cls).get_all_records()
            except Exception:
                continue
            for r, rec in recs.items():
                self.add(cls, r, rec)
            if ref in self.known:
                return self.known[ref]
        return None

    def uuid(self, ref):
        x = self.lookup(ref)
        return x[0] if x else NID

    def name(self, ref):
        x = self.lookup(ref)
        if x and x[1] is not None:
            return x[1]
        return NID

    def convert(self, s):
        """Cli_util.ref_convert."""
        x = self.lookup(s)
        if x is None:
            return s
        return x[0] + (" (%s)" % x[1] if x[1] is not None else "")


# ---------------------------------------------------------------------------
# Records (records.ml): each class is a list of fields in record order
# ---------------------------------------------------------------------------

class Field(object):
    def __init__(self, name, get, set=None, get_map=None, add_to_map=None,
                 remove_from_map=None, get_set=None, add_to_set=None,
                 remove_from_set=None, hidden=False, deprecated=False,
                 case_insensitive=False):
        self.name = name
        self.get = get
        self.set = set
        self.get_map = get_map
        self.add_to_map = add_to_map
        self.remove_from_map = remove_from_map
        self.get_set = get_set
        self.add_to_set = add_to_set
        self.remove_from_set = remove_from_set
        self.hidden = hidden
        self.deprecated = deprecated
        self.case_insensitive = case_insensitive

    def qualifier(self):
        if self.get_set is not None:
            q = " (SRO)" if self.add_to_set is None else " (SRW)"
        elif self.get_map is not None:
            q = " (MRO)" if self.add_to_map is None else " (MRW)"
        elif self.set is None:
            q = " ( RO)"
        else:
            q = " ( RW)"
        return q + (" [DEPRECATED]" if self.deprecated else "")


class Rec(object):
    """One object: its class, ref and record, plus lazily fetched extras."""

    def __init__(self, ctx, cls, ref, rec):
        self.ctx = ctx
        self.cls = cls
        self.ref = ref
        self.rec = rec
        self._extra = {}

    def __getitem__(self, key):
        return self.rec.get(key, "")

    def related(self, cls, key):
        """Record of the object this record's field `key` points at."""
        if (cls, key) not in self._extra:
            ref = self.rec.get(key, NULLREF)
            value = None
            if ref and ref != NULLREF:
                try:
                    value = getattr(self.ctx.api, cls).get_record(ref)
                except Exception:
                    value = None
            self._extra[(cls, key)] = value
        return self._extra[(cls, key)]

    def field(self, name):
        for f in self.fields():
            if f.name == name:
                return f
        raise MissingParam(name)

    def fields(self):
        return FIELDS[self.cls]


def _api_call(rec, method):
    return getattr(getattr(rec.ctx.api, rec.cls), method)


# getters
def g_str(key):
    return lambda r: to_str(r[key])


def g_bool(key):
    return lambda r: to_str(bool(r[key]))


def g_ref(key):
    return lambda r: r.ctx.refs.uuid(r[key])


def g_refname(key):
    return lambda r: r.ctx.refs.name(r[key])


def g_refs(key, sep="; "):
    return lambda r: sep.join(r.ctx.refs.uuid(x) for x in (r[key] or []))


def g_map(key):
    return lambda r: map_to_str(r[key] or {})


def g_set(key, sep="; "):
    return lambda r: sep.join(to_str(x) for x in (r[key] or []))


def g_ops(key):
    return lambda r: "; ".join(to_str(x) for x in (r[key] or {}).values())


def g_other(cls, link, key, kind="str", default=NID):
    def get(r):
        other = r.related(cls, link)
        if other is None:
            return default
        v = other.get(key, "")
        if kind == "map":
            return map_to_str(v or {})
        return to_str(v)
    return get


def gm_map(cls, link, key):
    def get(r):
        other = r.related(cls, link)
        return dict(other.get(key) or {}) if other else {}
    return get


# set/map accessors
def s_map(key):
    return lambda r: dict(r[key] or {})


def s_set(key):
    return lambda r: [to_str(x) for x in (r[key] or [])]


def s_refs(key):
    return lambda r: [r.ctx.refs.uuid(x) for x in (r[key] or [])]


def s_ops(key):
    return lambda r: [to_str(x) for x in (r[key] or {}).values()]


def a_map(method):
    return lambda r, k, v: _api_call(r, "add_to_" + method)(r.ref, k, v)


def r_map(method):
    return lambda r, k: _api_call(r, "remove_from_" + method)(r.ref, k)


def a_set(method):
    return lambda r, v: _api_call(r, method)(r.ref, v)


# setters
def st_str(method):
    return lambda r, v: _api_call(r, method)(r.ref, v)


def st_int(method, field):
    def setter(r, v):
        try:
            n = int(v)
        except ValueError:
            raise RecordFailure("Failed to parse parameter '%s': expecting an integer" % field)
        _api_call(r, method)(r.ref, str(n))
    return setter


def st_bytes(method, field):
    return lambda r, v: _api_call(r, method)(r.ref, str(bytes_of_string(field, v)))


def st_safe_bool(method, field):
    def setter(r, v):
        try:
            b = ocaml_bool(v)
        except ValueError:
            raise RecordFailure(
                "Failed to parse parameter '%s': expecting a boolean (true or false)" % field)
        _api_call(r, method)(r.ref, b)
    return setter


def st_bool(method):
    """Setters using Stdlib.bool_of_string; p_set turns its Invalid_argument
    into "Parameter <k> must be a boolean (true or false)"."""
    return lambda r, v: _api_call(r, method)(r.ref, ocaml_bool(v))


def st_float(method):
    return lambda r, v: _api_call(r, method)(r.ref, float(v))


def st_ref(method, cls):
    def setter(r, v):
        target = NULLREF if v == "" else getattr(r.ctx.api, cls).get_by_uuid(v)
        _api_call(r, method)(r.ref, target)
    return setter


def F(name, get, **kw):
    return Field(name, get, **kw)


def other_config(cls_key="other_config"):
    return F("other-config", g_map(cls_key), get_map=s_map(cls_key),
             add_to_map=a_map("other_config"), remove_from_map=r_map("other_config"))


def tags():
    return F("tags", g_set("tags", ", "), get_set=s_set("tags"),
             add_to_set=a_set("add_tags"), remove_from_set=a_set("remove_tags"))


def ops_fields():
    return [F("allowed-operations", g_set("allowed_operations"), get_set=s_set("allowed_operations")),
            F("current-operations", g_ops("current_operations"), get_set=s_ops("current_operations"))]


def qos_fields():
    """The qos_* fields of VBD and VIF records (records.ml)."""
    return [
        F("qos_algorithm_type", g_str("qos_algorithm_type"), set=st_str("set_qos_algorithm_type")),
        F("qos_algorithm_params", g_map("qos_algorithm_params"), get_map=s_map("qos_algorithm_params"),
          add_to_map=a_map("qos_algorithm_params"), remove_from_map=r_map("qos_algorithm_params")),
        F("qos_supported_algorithms", g_set("qos_supported_algorithms"),
          get_set=s_set("qos_supported_algorithms")),
    ]


def _vm_power(r):
    return to_str(r["power_state"]).lower()


VM_FIELDS = [
    F("uuid", g_str("uuid")),
    F("name-label", g_str("name_label"), set=st_str("set_name_label")),
    F("name-description", g_str("name_description"), set=st_str("set_name_description")),
    F("user-version", g_str("user_version"), set=st_int("set_user_version", "user-version")),
    F("is-a-template", g_bool("is_a_template"), set=st_safe_bool("set_is_a_template", "is-a-template")),
    F("is-default-template", g_bool("is_default_template"),
      set=st_safe_bool("set_is_default_template", "is-default-template")),
    F("is-a-snapshot", g_bool("is_a_snapshot")),
    F("snapshot-of", g_ref("snapshot_of")),
    F("snapshots", g_refs("snapshots")),
    F("snapshot-time", g_str("snapshot_time")),
    F("transportable-snapshot-id", g_str("transportable_snapshot_id"), hidden=True),
    F("snapshot-info", g_map("snapshot_info")),
    F("parent", g_ref("parent")),
    F("children", g_refs("children")),
    F("is-control-domain", g_bool("is_control_domain")),
    F("power-state", _vm_power),
    F("memory-actual", g_other("VM_metrics", "metrics", "memory_actual")),
    F("memory-overhead", g_str("memory_overhead")),
    F("memory-static-max", g_str("memory_static_max"), set=st_bytes("set_memory_static_max", "memory-static-max")),
    F("memory-dynamic-max", g_str("memory_dynamic_max"), set=st_bytes("set_memory_dynamic_max", "memory-dynamic-max")),
    F("memory-dynamic-min", g_str("memory_dynamic_min"), set=st_bytes("set_memory_dynamic_min", "memory-dynamic-min")),
    F("memory-static-min", g_str("memory_static_min"), set=st_bytes("set_memory_static_min", "memory-static-min")),
    F("suspend-VDI-uuid", g_ref("suspend_VDI"), set=st_ref("set_suspend_VDI", "VDI")),
    F("suspend-SR-uuid", g_ref("suspend_SR"), set=st_ref("set_suspend_SR", "SR")),
    F("VCPUs-params", g_map("VCPUs_params"), get_map=s_map("VCPUs_params"),
      add_to_map=a_map("VCPUs_params"), remove_from_map=r_map("VCPUs_params")),
    F("VCPUs-max", g_str("VCPUs_max"), set=st_int("set_VCPUs_max", "VCPUs-max")),
    F("VCPUs-at-startup", g_str("VCPUs_at_startup"), set=st_int("set_VCPUs_at_startup", "VCPUs-at-startup")),
    F("actions-after-shutdown", g_str("actions_after_shutdown"), set=st_str("set_actions_after_shutdown")),
    F("actions-after-reboot", g_str("actions_after_reboot"), set=st_str("set_actions_after_reboot")),
    F("actions-after-crash", g_str("actions_after_crash"), set=st_str("set_actions_after_crash")),
    F("console-uuids", g_refs("consoles"), get_set=s_refs("consoles")),
    F("hvm", g_other("VM_metrics", "metrics", "hvm", default="false")),
    F("platform", g_map("platform"), get_map=s_map("platform"),
      add_to_map=a_map("platform"), remove_from_map=r_map("platform")),
] + ops_fields() + [
    F("blocked-operations", g_map("blocked_operations"), get_map=s_map("blocked_operations"),
      add_to_map=a_map("blocked_operations"), remove_from_map=r_map("blocked_operations")),
    F("domain-type", g_str("domain_type"), set=st_str("set_domain_type")),
    F("current-domain-type", g_other("VM_metrics", "metrics", "current_domain_type")),
    F("HVM-boot-policy", g_str("HVM_boot_policy"), set=st_str("set_HVM_boot_policy")),
    F("HVM-boot-params", g_map("HVM_boot_params"), get_map=s_map("HVM_boot_params"),
      add_to_map=a_map("HVM_boot_params"), remove_from_map=r_map("HVM_boot_params")),
    F("HVM-shadow-multiplier", g_str("HVM_shadow_multiplier"), set=st_float("set_HVM_shadow_multiplier")),
    F("PV-kernel", g_str("PV_kernel"), set=st_str("set_PV_kernel")),
    F("PV-ramdisk", g_str("PV_ramdisk"), set=st_str("set_PV_ramdisk")),
    F("PV-args", g_str("PV_args"), set=st_str("set_PV_args")),
    F("PV-legacy-args", g_str("PV_legacy_args"), set=st_str("set_PV_legacy_args")),
    F("PV-bootloader", g_str("PV_bootloader"), set=st_str("set_PV_bootloader")),
    F("PV-bootloader-args", g_str("PV_bootloader_args"), set=st_str("set_PV_bootloader_args")),
    F("last-boot-CPU-flags", g_map("last_boot_CPU_flags")),
    F("resident-on", g_ref("resident_on")),
    F("affinity", g_ref("affinity"), set=st_ref("set_affinity", "host")),
    other_config(),
    F("dom-id", g_str("domid")),
    F("recommendations", g_str("recommendations")),
    F("xenstore-data", g_map("xenstore_data"), get_map=s_map("xenstore_data"),
      add_to_map=a_map("xenstore_data"), remove_from_map=r_map("xenstore_data")),
    F("ha-always-run", g_bool("ha_always_run"), set=st_bool("set_ha_always_run"), deprecated=True),
    F("ha-restart-priority", g_str("ha_restart_priority"), set=st_str("set_ha_restart_priority")),
    F("start-time", g_other("VM_metrics", "metrics", "start_time", default="<unknown time>")),
    F("install-time", g_other("VM_metrics", "metrics", "install_time", default="<unknown time>")),
    F("VCPUs-number", g_other("VM_metrics", "metrics", "VCPUs_number")),
    F("os-version", g_other("VM_guest_metrics", "guest_metrics", "os_version", "map"),
      get_map=gm_map("VM_guest_metrics", "guest_metrics", "os_version")),
    F("PV-drivers-version", g_other("VM_guest_metrics", "guest_metrics", "PV_drivers_version", "map"),
      get_map=gm_map("VM_guest_metrics", "guest_metrics", "PV_drivers_version")),
    F("PV-drivers-up-to-date", g_other("VM_guest_metrics", "guest_metrics", "PV_drivers_up_to_date"),
      deprecated=True),
    F("memory", g_other("VM_guest_metrics", "guest_metrics", "memory", "map"),
      get_map=gm_map("VM_guest_metrics", "guest_metrics", "memory")),
    F("disks", g_other("VM_guest_metrics", "guest_metrics", "disks", "map"),
      get_map=gm_map("VM_guest_metrics", "guest_metrics", "disks")),
    F("VBDs", g_refs("VBDs"), get_set=s_refs("VBDs")),
    F("networks", g_other("VM_guest_metrics", "guest_metrics", "networks", "map"),
      get_map=gm_map("VM_guest_metrics", "guest_metrics", "networks")),
    F("PV-drivers-detected", g_other("VM_guest_metrics", "guest_metrics", "PV_drivers_detected")),
    F("other", g_other("VM_guest_metrics", "guest_metrics", "other", "map"),
      get_map=gm_map("VM_guest_metrics", "guest_metrics", "other")),
    F("live", g_other("VM_guest_metrics", "guest_metrics", "live")),
    F("guest-metrics-last-updated", g_other("VM_guest_metrics", "guest_metrics", "last_updated")),
    tags(),
    F("appliance", g_ref("appliance")),
    F("snapshot-schedule", g_ref("snapshot_schedule")),
    F("is-vmss-snapshot", g_bool("is_vmss_snapshot")),
    F("start-delay", g_str("start_delay"), set=st_int("set_start_delay", "start-delay")),
    F("shutdown-delay", g_str("shutdown_delay"), set=st_int("set_shutdown_delay", "shutdown-delay")),
    F("order", g_str("order"), set=st_int("set_order", "order")),
    F("version", g_str("version")),
    F("generation-id", g_str("generation_id")),
    F("hardware-platform-version", g_str("hardware_platform_version")),
    F("has-vendor-device", g_bool("has_vendor_device"),
      set=st_safe_bool("set_has_vendor_device", "has-vendor-device")),
    F("requires-reboot", g_bool("requires_reboot")),
    F("reference-label", g_str("reference_label")),
]


def _vdi_type(r):
    t = to_str(r["type"])
    return VDI_TYPES.get(t, t)


VDI_FIELDS = [
    F("uuid", g_str("uuid")),
    F("name-label", g_str("name_label"), set=st_str("set_name_label")),
    F("name-description", g_str("name_description"), set=st_str("set_name_description")),
    F("is-a-snapshot", g_bool("is_a_snapshot")),
    F("snapshot-of", g_ref("snapshot_of")),
    F("snapshots", g_refs("snapshots")),
    F("snapshot-time", g_str("snapshot_time")),
] + ops_fields() + [
    F("sr-uuid", g_ref("SR")),
    F("sr-name-label", g_refname("SR")),
    F("vbd-uuids", g_refs("VBDs"), get_set=s_refs("VBDs")),
    F("crashdump-uuids", g_refs("crash_dumps"), get_set=s_refs("crash_dumps")),
    F("virtual-size", g_str("virtual_size")),
    F("physical-utilisation", g_str("physical_utilisation")),
    F("location", g_str("location")),
    F("type", _vdi_type),
    F("sharable", g_bool("sharable")),
    F("read-only", g_bool("read_only")),
    F("storage-lock", g_bool("storage_lock")),
    F("managed", g_bool("managed")),
    F("parent", g_ref("parent"), deprecated=True),
    F("missing", g_bool("missing")),
    F("is-tools-iso", g_bool("is_tools_iso")),
    other_config(),
    F("xenstore-data", g_map("xenstore_data"), get_map=s_map("xenstore_data")),
    F("sm-config", g_map("sm_config"), get_map=s_map("sm_config")),
    F("on-boot", g_str("on_boot"), set=st_str("set_on_boot")),
    F("allow-caching", g_bool("allow_caching"), set=st_bool("set_allow_caching")),
    F("metadata-latest", g_bool("metadata_latest")),
    F("metadata-of-pool", g_ref("metadata_of_pool")),
    tags(),
    F("cbt-enabled", g_bool("cbt_enabled")),
]


def _vbd_vdi_name(r):
    return "<EMPTY>" if r["empty"] is True else r.ctx.refs.name(r["VDI"])


VBD_FIELDS = [
    F("uuid", g_str("uuid")),
    F("vm-uuid", g_ref("VM")),
    F("vm-name-label", g_refname("VM")),
    F("vdi-uuid", g_ref("VDI")),
    F("vdi-name-label", _vbd_vdi_name),
] + ops_fields() + [
    F("empty", g_bool("empty")),
    F("device", g_str("device")),
    F("userdevice", g_str("userdevice"), set=st_str("set_userdevice")),
    F("bootable", g_bool("bootable"), set=st_safe_bool("set_bootable", "bootable")),
    F("mode", g_str("mode"), set=st_str("set_mode")),
    F("type", g_str("type"), set=st_str("set_type")),
    F("unpluggable", g_bool("unpluggable"), set=st_safe_bool("set_unpluggable", "unpluggable")),
    F("currently-attached", g_bool("currently_attached")),
    F("storage-lock", g_bool("storage_lock")),
    F("status-code", g_str("status_code")),
    F("status-detail", g_str("status_detail")),
] + qos_fields() + [
    other_config(),
]

VIF_FIELDS = [
    F("uuid", g_str("uuid")),
    F("vm-uuid", g_ref("VM")),
    F("vm-name-label", g_refname("VM")),
] + ops_fields() + [
    F("device", g_str("device")),
    F("MAC", g_str("MAC"), case_insensitive=True),
    F("MAC-autogenerated", g_bool("MAC_autogenerated")),
    F("MTU", g_str("MTU")),
    F("currently-attached", g_bool("currently_attached")),
] + qos_fields() + [
    other_config(),
    F("network-uuid", g_ref("network")),
    F("network-name-label", g_refname("network")),
    F("locking-mode", g_str("locking_mode"), set=st_str("set_locking_mode")),
    F("ipv4-allowed", g_set("ipv4_allowed"), get_set=s_set("ipv4_allowed"),
      add_to_set=a_set("add_ipv4_allowed"), remove_from_set=a_set("remove_ipv4_allowed")),
    F("ipv6-allowed", g_set("ipv6_allowed"), get_set=s_set("ipv6_allowed"),
      add_to_set=a_set("add_ipv6_allowed"), remove_from_set=a_set("remove_ipv6_allowed")),
]

NETWORK_FIELDS = [
    F("uuid", g_str("uuid")),
    F("name-label", g_str("name_label"), set=st_str("set_name_label")),
    F("name-description", g_str("name_description"), set=st_str("set_name_description")),
    F("VIF-uuids", g_refs("VIFs"), get_set=s_refs("VIFs")),
    F("PIF-uuids", g_refs("PIFs"), get_set=s_refs("PIFs")),
    F("MTU", g_str("MTU"), set=st_int("set_MTU", "MTU")),
    F("bridge", g_str("bridge")),
    F("managed", g_bool("managed")),
    other_config(),
    tags(),
    F("default-locking-mode", g_str("default_locking_mode"), set=st_str("set_default_locking_mode")),
    F("purpose", g_set("purpose", ", "), get_set=s_set("purpose"),
      add_to_set=a_set("add_purpose"), remove_from_set=a_set("remove_purpose")),
]


def _sr_host(r):
    pbds = r["PBDs"] or []
    if len(pbds) > 1:
        return "<shared>"
    if len(pbds) == 1:
        try:
            return r.ctx.refs.name(r.ctx.api.PBD.get_host(pbds[0]))
        except Exception:
            return NID
    return NID


SR_FIELDS = [
    F("uuid", g_str("uuid")),
    F("name-label", g_str("name_label"), set=st_str("set_name_label")),
    F("name-description", g_str("name_description"), set=st_str("set_name_description")),
    F("host", _sr_host),
] + ops_fields() + [
    F("VDIs", g_refs("VDIs"), get_set=s_refs("VDIs")),
    F("PBDs", g_refs("PBDs"), get_set=s_refs("PBDs")),
    F("virtual-allocation", g_str("virtual_allocation")),
    F("physical-utilisation", g_str("physical_utilisation")),
    F("physical-size", g_str("physical_size")),
    F("type", g_str("type")),
    F("content-type", g_str("content_type")),
    F("shared", g_bool("shared"), set=st_safe_bool("set_shared", "shared")),
    F("introduced-by", g_ref("introduced_by")),
    F("is-tools-sr", g_bool("is_tools_sr")),
    other_config(),
    F("sm-config", g_map("sm_config"), get_map=s_map("sm_config")),
    F("local-cache-enabled", g_bool("local_cache_enabled")),
    tags(),
    F("clustered", g_bool("clustered")),
]

HOST_FIELDS = [
    F("uuid", g_str("uuid")),
    F("name-label", g_str("name_label"), set=st_str("set_name_label")),
    F("name-description", g_str("name_description"), set=st_str("set_name_description")),
] + ops_fields() + [
    F("enabled", g_bool("enabled")),
    F("API-version-major", g_str("API_version_major")),
    F("API-version-minor", g_str("API_version_minor")),
    F("API-version-vendor", g_str("API_version_vendor")),
    F("API-version-vendor-implementation", g_map("API_version_vendor_implementation"),
      get_map=s_map("API_version_vendor_implementation")),
    F("logging", g_map("logging"), get_map=s_map("logging"),
      add_to_map=a_map("logging"), remove_from_map=r_map("logging")),
    F("suspend-image-sr-uuid", g_ref("suspend_image_sr"), set=st_ref("set_suspend_image_sr", "SR")),
    F("crash-dump-sr-uuid", g_ref("crash_dump_sr"), set=st_ref("set_crash_dump_sr", "SR")),
    F("software-version", g_map("software_version"), get_map=s_map("software_version")),
    F("capabilities", g_set("capabilities"), get_set=s_set("capabilities")),
    other_config(),
    F("cpu_info", g_map("cpu_info"), get_map=s_map("cpu_info")),
    F("chipset-info", g_map("chipset_info"), get_map=s_map("chipset_info")),
    F("hostname", g_str("hostname")),
    F("address", g_str("address")),
    F("supported-bootloaders", g_set("supported_bootloaders"), get_set=s_set("supported_bootloaders")),
    F("memory-overhead", g_str("memory_overhead")),
    F("memory-total", g_other("host_metrics", "metrics", "memory_total")),
    F("memory-free", g_other("host_metrics", "metrics", "memory_free")),
    F("host-metrics-live", g_other("host_metrics", "metrics", "live")),
    F("edition", g_str("edition")),
    F("license-server", g_map("license_server"), get_map=s_map("license_server")),
    F("power-on-mode", g_str("power_on_mode")),
    F("power-on-config", g_map("power_on_config"), get_map=s_map("power_on_config")),
    F("local-cache-sr", g_ref("local_cache_sr")),
    tags(),
    F("control-domain-uuid", g_ref("control_domain")),
    F("resident-vms", g_refs("resident_VMs"), get_set=s_refs("resident_VMs")),
]

POOL_FIELDS = [
    F("uuid", g_str("uuid")),
    F("name-label", g_str("name_label"), set=st_str("set_name_label")),
    F("name-description", g_str("name_description"), set=st_str("set_name_description")),
    F("master", g_ref("master")),
    F("default-SR", g_ref("default_SR"), set=st_ref("set_default_SR", "SR")),
    F("crash-dump-SR", g_ref("crash_dump_SR"), set=st_ref("set_crash_dump_SR", "SR")),
    F("suspend-image-SR", g_ref("suspend_image_SR"), set=st_ref("set_suspend_image_SR", "SR")),
    other_config(),
] + ops_fields() + [
    F("ha-enabled", g_bool("ha_enabled")),
    F("ha-configuration", g_map("ha_configuration")),
    tags(),
]

TASK_FIELDS = [
    F("uuid", g_str("uuid")),
    F("name-label", g_str("name_label")),
    F("name-description", g_str("name_description")),
    F("subtask_of", g_ref("subtask_of")),
    F("subtasks", g_refs("subtasks", ";")),
    F("resident-on", g_ref("resident_on")),
    F("status", g_str("status")),
    F("progress", lambda r: "%.3f" % float(r["progress"] or 0)),
    F("type", g_str("type")),
    F("result", g_str("result")),
    F("created", g_str("created")),
    F("finished", g_str("finished")),
    F("error_info", g_set("error_info")),
    F("allowed_operations", g_set("allowed_operations")),
    other_config(),
]

FIELDS = {"VM": VM_FIELDS, "VDI": VDI_FIELDS, "VBD": VBD_FIELDS, "VIF": VIF_FIELDS,
          "network": NETWORK_FIELDS, "SR": SR_FIELDS, "host": HOST_FIELDS,
          "pool": POOL_FIELDS, "task": TASK_FIELDS}

# CLI class name -> (API class, default filters, default list params)
CLI_CLASSES = {
    "vm": ("VM", [("is-a-template", "false")], ["name-label", "uuid", "power-state"]),
    "template": ("VM", [("is-a-template", "true"), ("is-a-snapshot", "false")],
                 ["name-label", "name-description", "uuid"]),
    "snapshot": ("VM", [("is-a-snapshot", "true")],
                 ["name-label", "name-description", "uuid", "snapshot_of",
                  "snapshot_time", "is-vmss-snapshot"]),
    "host": ("host", [], ["uuid", "name-label", "name-description"]),
    "sr": ("SR", [], ["uuid", "name-label", "name-description", "host", "type", "content-type"]),
    "vdi": ("VDI", [], ["uuid", "name-label", "name-description", "virtual-size",
                        "read-only", "sharable", "sr-uuid"]),
    "vbd": ("VBD", [], ["uuid", "vm-uuid", "vm-name-label", "vdi-uuid", "device", "empty"]),
    "vif": ("VIF", [], ["uuid", "device", "vm-uuid", "network-uuid"]),
    "network": ("network", [], ["uuid", "name-label", "name-description", "bridge"]),
    "pool": ("pool", [], ["uuid", "name-label", "name-description", "master", "default-SR"]),
    "task": ("task", [], ["uuid", "name-label", "name-description", "status", "progress"]),
}


# ---------------------------------------------------------------------------
# Filtering and selection (cli_operations.ml filter_records_on_fields)
# ---------------------------------------------------------------------------

def field_type(fieldname, rec):
    names = [f.name for f in rec.fields()]
    if fieldname in names:
        return ("normal", fieldname)
    if ":" in fieldname:
        real = fieldname[:fieldname.index(":")]
        for f in rec.fields():
            if f.name == real:
                if f.get_set is not None:
                    return ("set", f.name)
                if f.get_map is not None:
                    return ("map", f.name)
                raise CliFailure("Field '%s' is not a set or map" % f.name)
        raise CliFailure("Unknown field '%s'" % fieldname)
    maps = sorted([f for f in rec.fields() if f.get_map is not None],
                  key=lambda f: -len(f.name))
    for f in maps:
        if fieldname.startswith(f.name + "-"):
            return ("map", f.name)
    sets = sorted([f for f in rec.fields() if f.get_set is not None],
                  key=lambda f: -len(f.name))
    for f in sets:
        if fieldname.startswith(f.name + "-"):
            return ("set", f.name)
    raise CliFailure("Unknown field '%s'" % fieldname)


def safe_get(field, rec):
    try:
        return field.get(rec)
    except ApiError as e:
        if e.code == "HANDLE_INVALID":
            return "<invalid reference>"
        raise


def filter_records(records, key, value):
    if not records:
        return []
    kind, name = field_type(key, records[0])
    result = []
    if kind == "normal":
        for r in records:
            f = r.field(name)
            v = safe_get(f, r)
            if f.case_insensitive:
                ok = v.lower() == value.lower()
            else:
                ok = v == value
            if ok:
                result.append(r)
    elif kind == "map":
        mkey = key[len(name) + 1:]
        for r in records:
            try:
                m = r.field(name).get_map(r)
            except Exception:
                continue
            if mkey in m and to_str(m[mkey]) == value:
                result.append(r)
    else:
        if key[len(name) + 1:] != "contains":
            raise CliFailure("Invalid syntax for set filtering (should be set-param:contains=key)")
        for r in records:
            try:
                s = r.field(name).get_set(r)
            except Exception:
                continue
            if value in s:
                result.append(r)
    return result


def select_fields(params, records, default_params):
    ps = params.get("params")
    if ps is None:
        wanted = default_params
    elif ps == "all":
        wanted = []
    else:
        wanted = ps.split(",")
    result = []
    for r in records:
        fs = r.fields() if not wanted else [f for f in r.fields() if f.name in wanted]
        result.append([f for f in fs if not f.hidden])
    return result


def print_record_fields(printer, pairs):
    printer.table([[(f.name + f.qualifier(), safe_get(f, r)) for f in fs] for r, fs in pairs])


# ---------------------------------------------------------------------------
# The session context
# ---------------------------------------------------------------------------

class ApiProxy(object):
    """session.xenapi, with XenAPI.Failure turned into ApiError."""

    def __init__(self, target):
        self._target = target

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return ApiProxy(getattr(self._target, name))

    def __call__(self, *args):
        try:
            return self._target(*args)
        except XenAPI.Failure as e:
            details = list(e.details or ["INTERNAL_ERROR"])
            raise ApiError(str(details[0]), details[1:])


class Ctx(object):
    def __init__(self, cfg, params, printer):
        self.cfg = cfg
        self.params = params
        self.printer = printer
        self.session = None
        self.api = None
        self.refs = None
        self.cleanup_tasks = []

    def login(self):
        target = self.cfg.main_target()
        if target.unix_path is not None:
            session = XenAPI.Session("http://localhost/", transport=_UnixTransport(target.unix_path))
        else:
            session = XenAPI.Session(target.url(), ignore_ssl=True)
        # xapi_cli.ml with_session: login_with_password ~version ~originator:"cli"
        session.xenapi.login_with_password(self.cfg.username, self.cfg.password,
                                           API_VERSION, "cli")
        self.session = session
        self.api = ApiProxy(session.xenapi)
        self.refs = RefIndex(self.api)

    def logout(self):
        if self.session is not None:
            try:
                self.session.xenapi.session.logout()
            except Exception:
                pass
            self.session = None

    @property
    def session_ref(self):
        return self.session._session

    def all_records(self, cls, expr="true"):
        """<cls>.get_all_records_where, as the CLI server reads records."""
        recs = getattr(self.api, cls).get_all_records_where(expr)
        if expr == "true":
            self.refs.add_all(cls, recs)
        else:
            for ref, rec in recs.items():
                self.refs.add(cls, ref, rec)
        return [Rec(self, cls, ref, rec) for ref, rec in recs.items()]

    def record(self, cls, ref):
        rec = getattr(self.api, cls).get_record(ref)
        self.refs.add(cls, ref, rec)
        return Rec(self, cls, ref, rec)


# ---------------------------------------------------------------------------
# Tasks (cli_util.ml track / result_from_task; cli_operations.ml
# wait_for_task_complete)
# ---------------------------------------------------------------------------

def _task_deadline():
    try:
        return time.time() + float(os.environ.get("XE_TASK_TIMEOUT", "300"))
    except ValueError:
        return time.time() + 300


def _poll(ctx, task, done):
    deadline = _task_deadline()
    delay = 0.02
    while True:
        status = ctx.api.task.get_status(task)
        if done(status):
            return status
        if time.time() > deadline:
            err("Internal error\n")
            raise ExitWithError(1)
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def wait_not_pending(ctx, task):
    return _poll(ctx, task, lambda s: s != "pending")


def wait_task_complete(ctx, task):
    return _poll(ctx, task, lambda s: s in ("success", "failure", "cancelled"))


def task_error(ctx, task):
    info = ctx.api.task.get_error_info(task)
    return list(info or [])


def result_from_task(ctx, task):
    status = ctx.api.task.get_status(task)
    if status in ("cancelling", "cancelled"):
        raise ApiError("TASK_CANCELLED", [task])
    if status == "pending":
        raise OCamlFailure("wait_for_task_completion failed; task is still pending")
    if status == "success":
        return ctx.api.task.get_result(task)
    info = task_error(ctx, task)
    if info:
        raise ApiError(info[0], info[1:])
    raise OCamlFailure("Task failed but no error recorded: %s" % task)


def waiter(ctx, task):
    try:
        wait_not_pending(ctx, task)
        return result_from_task(ctx, task)
    finally:
        try:
            ctx.api.task.destroy(task)
        except Exception:
            pass


def refs_of_result(result):
    """A task result is the XML-RPC encoding of the value."""
    if not result:
        return []
    try:
        doc = "<methodResponse><params><param>%s</param></params></methodResponse>" % result
        value = xmlrpc.client.loads(doc)[0][0]
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        return [str(value)]
    except Exception:
        return re.findall(r"OpaqueRef:[^<\s]+", result)


# ---------------------------------------------------------------------------
# The thin client's HTTP transfers (newcli.ml HttpGet / HttpPut)
# ---------------------------------------------------------------------------

def _status_code(line):
    parts = line.split(b" ")
    if len(parts) < 2:
        raise OCamlFailure("Bad response from HTTP server")
    return int(parts[1])


def _read_headers(reader):
    headers = {}
    while True:
        line = reader.readline()
        if not line or line in (b"\r\n", b"\n"):
            return headers
        line = line.rstrip(b"\r\n")
        if b":" in line:
            k, v = line.split(b":", 1)
            headers[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")


class Transfer(object):
    """The HTTP connection of the transfer in progress, so that a signal can
    close it."""
    sock = None


def _sys_error_text(filename, exc):
    return 'Sys_error(%s)' % ('"%s"' % ocaml_escaped("%s: %s" % (filename, os.strerror(exc.errno))))


def http_get(ctx, url, filename):
    """Returns True for Response OK, False for Response Failed; raises
    ClientSideError when the output file cannot be opened."""
    try:
        while True:
            target, path = ctx.cfg.resolve(url)
            sock = target.connect()
            Transfer.sock = sock
            try:
                sock.sendall(b"GET " + _enc(path) + b" HTTP/1.0\r\n\r\n")
                reader = sock.makefile("rb", buffering=1 << 20)
                code = _status_code(reader.readline())
                if code == 200:
                    if filename == "":
                        fd = os.dup(1)
                    else:
                        try:
                            # O_CREAT|O_EXCL, mode 0600: an existing file is
                            # refused (newcli.ml open_out_gen).
                            fd = os.open(filename, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                        except OSError as e:
                            raise ClientSideError(_sys_error_text(filename, e))
                    try:
                        while True:
                            line = reader.readline()
                            if not line:
                                raise EOFError()
                            if line == b"\r\n":
                                break
                        # Copy until the server closes the connection.  A body
                        # cut short is not noticed here (real xe neither): the
                        # partial file is left in place and the task's final
                        # status decides what is reported.
                        while True:
                            chunk = reader.read1(1 << 20)
                            if not chunk:
                                break
                            view = memoryview(chunk)
                            while view:
                                n = os.write(fd, view)
                                view = view[n:]
                    finally:
                        os.close(fd)
                    return True
                if code == 302:
                    headers = _read_headers(reader)
                    url = headers["location"]
                    continue
                raise OCamlFailure("Unhandled response code")
            finally:
                Transfer.sock = None
                try:
                    sock.close()
                except Exception:
                    pass
    except ClientSideError:
        raise
    except Interrupted:
        raise
    except Exception:
        return False


def http_put(ctx, url, filename):
    try:
        while True:
            target, path = ctx.cfg.resolve(url)
            if not os.path.exists(filename):
                raise ClientSideError("file '%s' does not exist" % filename)
            st = os.stat(filename)
            length = ""
            if stat.S_ISREG(st.st_mode):
                length = "\r\nContent-length: %d" % st.st_size
            fh = open(filename, "rb")
            try:
                sock = target.connect()
                Transfer.sock = sock
                try:
                    sock.sendall(b"PUT " + _enc(path) + b" HTTP/1.0" + length.encode() + b"\r\n\r\n")
                    reader = sock.makefile("rb")
                    code = _status_code(reader.readline())
                    headers = _read_headers(reader)
                    if code == 200:
                        while True:
                            chunk = fh.read(1 << 20)
                            if not chunk:
                                break
                            sock.sendall(chunk)
                        return True
                    if code == 302:
                        url = headers["location"]
                        continue
                    raise OCamlFailure("Unhandled response code")
                finally:
                    Transfer.sock = None
                    try:
                        sock.close()
                    except Exception:
                        pass
            finally:
                fh.close()
    except ClientSideError:
        raise
    except Interrupted:
        raise
    except Exception:
        return False


def _client_side_failure(ctx, task, msg, owned):
    """The thin client gave up locally: it prints the reason and exits 1 at
    once.  The CLI server then notices the failure and destroys the task."""
    err("Operation failed. Error: %s\n" % msg)
    try:
        deadline = time.time() + 2
        while time.time() < deadline and ctx.api.task.get_status(task) == "pending":
            time.sleep(0.05)
        if owned:
            ctx.api.task.destroy(task)
    except Exception:
        pass
    raise ExitWithError(1)


def track_http_operation(ctx, make_url, label, transfer, filename):
    """cli_util.ml track_http_operation."""
    task = ctx.api.task.create(label, "")
    ctx.cleanup_tasks.append(task)
    try:
        url = make_url(task)
        try:
            ok = transfer(ctx, url, filename)
        except ClientSideError as e:
            _client_side_failure(ctx, task, str(e), True)
        if ok:
            wait_not_pending(ctx, task)
            if ctx.api.task.get_status(task) == "success":
                return ctx.api.task.get_result(task)
            info = task_error(ctx, task)
            if not info:
                raise ApiError("INTERNAL_ERROR", [])
            raise ApiError(info[0], info[1:])
        # 'response failed' does not tell whether the handler got the task;
        # real xe waits 1 s and then looks at the task's error.
        deadline = time.time() + 1.0
        while time.time() < deadline and ctx.api.task.get_status(task) == "pending":
            time.sleep(0.05)
        info = task_error(ctx, task)
        if not info:
            raise ApiError("CLIENT_ERROR", [])
        raise ApiError(info[0], info[1:])
    finally:
        try:
            ctx.api.task.destroy(task)
        except Exception:
            pass
        if task in ctx.cleanup_tasks:
            ctx.cleanup_tasks.remove(task)


def download_file(ctx, task, filename, url, label):
    """cli_operations.ml download_file."""
    try:
        ok = http_get(ctx, url, filename)
    except ClientSideError as e:
        _client_side_failure(ctx, task, str(e), False)
    if not ok:
        # The handler never took the task (progress still -1): fail it here.
        try:
            if float(ctx.api.task.get_progress(task)) < 0.0:
                ctx.api.task.set_status(task, "failure")
        except Exception:
            pass
    status = wait_task_complete(ctx, task)
    if status == "success":
        if ok:
            if filename != "":
                out("%s succeeded\n" % label)
        else:
            err("%s failed, unknown error.\n" % label)
            raise ExitWithError(1)
    elif status == "failure":
        info = task_error(ctx, task)
        if not info:
            # Real xe prints this and still exits 0.
            err("%s failed, unknown error\n" % label)
        else:
            raise ApiError(info[0], info[1:])
    elif status == "cancelled":
        err("%s cancelled\n" % label)
        raise ExitWithError(1)
    else:
        err("Internal error\n")
        raise ExitWithError(1)


# ---------------------------------------------------------------------------
# Generic <class>-list / -param-list / -param-get / -param-set
# ---------------------------------------------------------------------------

def cmd_list(ctx, params, cli_class):
    cls, def_filters, def_params = CLI_CLASSES[cli_class]
    records = ctx.all_records(cls)
    filters = [(k, v) for k, v in params.items
               if k not in ["params"] + STDPARAMS and not k.startswith("database:")]
    selected = records
    for k, v in def_filters + filters:
        selected = filter_records(selected, k, v)
    if get_bool_param(params, "all"):
        selected = records
    fields = select_fields(params, selected, def_params)
    print_record_fields(ctx.printer, list(zip(selected, fields)))


def _record_by_uuid(ctx, cls, uuid):
    ref = getattr(ctx.api, cls).get_by_uuid(uuid)
    return ctx.record(cls, ref)


def cmd_param_list(ctx, params, cli_class):
    cls = CLI_CLASSES[cli_class][0]
    r = _record_by_uuid(ctx, cls, params["uuid"])
    print_record_fields(ctx.printer, [(r, [f for f in r.fields() if not f.hidden])])


def cmd_param_get(ctx, params, cli_class):
    cls = CLI_CLASSES[cli_class][0]
    r = _record_by_uuid(ctx, cls, params["uuid"])
    f = r.field(params["param-name"])
    if "param-key" in params and f.get_map is not None:
        key = params["param-key"]
        m = f.get_map(r)
        if key not in m:
            raise CliFailure("Key %s not found in map" % key)
        ctx.printer.plist([to_str(m[key])])
    else:
        ctx.printer.plist([safe_get(f, r)])


def cmd_param_set(ctx, params, cli_class):
    cls = CLI_CLASSES[cli_class][0]
    r = _record_by_uuid(ctx, cls, params["uuid"])
    for k, v in params.items:
        if k in ["uuid"] + STDPARAMS:
            continue
        kind, name = field_type(k, r)
        if kind == "map":
            f = r.field(name)
            key = k[len(name) + 1:]
            if f.add_to_map is None:
                raise CliFailure("Map field '%s' is read-only." % name)
            if key in f.get_map(r):
                f.remove_from_map(r, key)
            f.add_to_map(r, key, v)
        elif kind == "set":
            raise CliFailure("Cannot param-set on set fields")
        else:
            f = r.field(k)
            if f.set is None:
                if f.add_to_map is not None:
                    raise CliFailure("Field '%s' is a map or set. use the 'name:key=value' syntax." % k)
                raise CliFailure("Field '%s' is read-only." % k)
            try:
                f.set(r, v)
            except ValueError as e:
                if str(e) == "bool_of_string":
                    raise CliFailure("Parameter %s must be a boolean (true or false)" % k)
                raise CliFailure("Parameter %s must be a floating-point number" % k)


# ---------------------------------------------------------------------------
# VM selection (select_vms / do_vm_op) and host selection
# ---------------------------------------------------------------------------

def select_vms(ctx, params, ignore, include_control=False, include_templates=False):
    items = list(params.items)
    if not include_control:
        items.insert(0, ("is-control-domain", "false"))
    if not include_templates:
        items.insert(0, ("is-a-template", "false"))
    vm_sel = None
    for k, v in items:
        if k == "vm":
            vm_sel = v
            break
    if vm_sel is None:
        records = ctx.all_records("VM")
    else:
        v = vm_sel.replace('"', '\\"')
        records = ctx.all_records(
            "VM", '(field "uuid"="%s") or (field "name__label"="%s")' % (v, v))
        removed = False
        kept = []
        for k, v in items:
            if k == "vm" and not removed:
                removed = True
                continue
            kept.append((k, v))
        items = kept
    filters = []
    for k, v in items:
        stem = k.split(":", 1)[0]
        if stem not in STDPARAMS + ignore:
            filters.append((k, v))
    for k, v in filters:
        records = filter_records(records, k, v)
    return records


def do_multiple(ctx, op, recs):
    fails = []
    results = []
    for r in recs:
        try:
            results.append(op(r))
        except ApiError as e:
            if e.code in ERRORS:
                lines = doc_lines(e.code, [ctx.refs.convert(p) for p in e.params])
                fails.append((r["uuid"], "\n".join(lines)))
            else:
                fails.append((r["uuid"], "%s: [ %s ]" % (e.code, "; ".join(e.params))))
        except (CliFailure, RecordFailure, OCamlFailure) as e:
            fails.append((r["uuid"], "INTERNAL_ERROR: [ %s ]" % e))
    if fails:
        raise MultipleFailure(list(reversed(fails)))
    return list(reversed(results))


def do_vm_op(ctx, params, op, ignore, multiple=True, include_control=False,
             include_templates=False):
    try:
        vms = select_vms(ctx, params, ignore, include_control, include_templates)
    except MissingParam as e:
        raise CliFailure("Parameter '%s' is not a field of the VM class. Failed to select "
                         "VM for operation." % e)
    return do_selected(ctx, params, op, vms, multiple, "VMs", "Multiple matches VMs found", "VM")


def do_selected(ctx, params, op, recs, multiple, plural, many, one):
    """The tail of do_vm_op / do_host_op: one record, --multiple, or a failure."""
    if not recs:
        raise CliFailure("No matching %s found" % plural)
    if len(recs) == 1:
        return [op(recs[0])]
    if multiple and get_bool_param(params, "multiple"):
        return do_multiple(ctx, op, recs)
    if not multiple:
        raise CliFailure("%s. Operation can only be performed on one %s at a time" % (many, one))
    raise CliFailure("%s. --multiple required to complete the operation" % many)


def select_hosts(ctx, params, ignore):
    items = list(params.items)
    host_sel = params.get("host")
    if host_sel is None:
        records = ctx.all_records("host")
    else:
        v = host_sel.replace('"', '\\"')
        records = ctx.all_records(
            "host", '(field "uuid"="%s") or (field "hostname"="%s") or (field "name__label"="%s")'
            % (v, v, v))
        items = [(k, v) for k, v in items if k != "host"]
    for k, v in items:
        stem = k.split(":", 1)[0]
        if stem not in STDPARAMS + ignore:
            records = filter_records(records, k, v)
    return records


def do_host_op(ctx, params, op, ignore, multiple=True):
    return do_selected(ctx, params, op, select_hosts(ctx, params, ignore), multiple, "hosts",
                       "Multiple matching hosts found", "host")


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------

def cmd_vm_snapshot_common(ctx, params, method):
    new_name = params["new-name-label"]
    desc = params.get("new-name-description")
    ignore = params.get("ignore-vdi-uuids")
    ignore_vdis = [ctx.api.VDI.get_by_uuid(u) for u in ignore.split(",")] if ignore is not None else None

    def op(vm):
        fn = getattr(ctx.api.VM, method)
        if ignore_vdis is not None:
            return fn(vm.ref, new_name, ignore_vdis)
        # Two arguments work on every release (VM.snapshot's ignore_vdis
        # exists only from xapi 21.4.0).
        return fn(vm.ref, new_name)
    new_vms = do_vm_op(ctx, params, op,
                       ["new-name-label", "new-name-description", "ignore-vdi-uuids"])
    if desc is not None:
        ctx.api.VM.set_name_description(new_vms[0], desc)
    ctx.printer.plist([ctx.api.VM.get_uuid(v) for v in new_vms])


def cmd_vm_snapshot(ctx, params):
    cmd_vm_snapshot_common(ctx, params, "snapshot")


def cmd_vm_snapshot_with_quiesce(ctx, params):
    cmd_vm_snapshot_common(ctx, params, "snapshot_with_quiesce")


def user_says_yes(ctx):
    out("Type 'yes' to continue\n")
    line = sys.stdin.buffer.readline()
    if not line:
        # The thin client's input_line raises End_of_file.
        err("Lost connection to the server.\n")
        raise ExitWithError(1)
    answer = line.rstrip(b"\n").decode("utf-8", "surrogateescape")
    if answer.strip().lower() == "yes":
        return True
    out("Aborted (you typed: '%s')\n" % answer)
    return False


def vm_uninstall_common(ctx, params, vms):
    """cli_operations.ml vm_uninstall_common."""
    api = ctx.api
    toprint = []
    todo = []
    for vm in vms:
        vdis = []
        for vbd in api.VM.get_VBDs(vm):
            try:
                oc = api.VBD.get_other_config(vbd)
                vdi = api.VBD.get_VDI(vbd)
                api.VDI.get_uuid(vdi)
                if "owner" in oc:
                    vdis.append(vdi)
            except Exception:
                pass
        suspend = NULLREF
        try:
            s = api.VM.get_suspend_VDI(vm)
            api.VDI.get_uuid(s)
            suspend = s
        except Exception:
            pass

        def string_of_vdi(vdi):
            r = api.VDI.get_record(vdi)
            shared = " ** WARNING: disk is shared by other VMs" if len(r.get("VBDs", [])) > 1 else ""
            return "VDI: %s (%s) %s" % (r["uuid"], r["name_label"], shared)

        vrec = api.VM.get_record(vm)
        toprint.append("VM : %s (%s)" % (vrec["uuid"], vrec["name_label"]))
        toprint.extend(string_of_vdi(v) for v in vdis)
        if suspend != NULLREF:
            toprint.append(string_of_vdi(suspend))
        todo.append((vm, vdis, suspend))

    def destroy_all():
        for vm, vdis, suspend in todo:
            if api.VM.get_power_state(vm) != "Halted":
                api.VM.hard_shutdown(vm)
            api.VM.destroy(vm)
            for vdi in vdis:
                api.VDI.destroy(vdi)
            if suspend != NULLREF:
                try:
                    api.VDI.destroy(suspend)
                except Exception:
                    pass

    out("The following items are about to be destroyed\n")
    for line in toprint:
        out(line + "\n")
    if get_bool_param(params, "force") or user_says_yes(ctx):
        destroy_all()
        out("All objects destroyed\n")


def cmd_vm_uninstall(ctx, params):
    vms = do_vm_op(ctx, params, lambda r: r.ref, [])
    snaps = []
    for vm in vms:
        snaps.extend(ctx.api.VM.get_snapshots(vm))
    vm_uninstall_common(ctx, params, vms + snaps)


def get_snapshot_uuid(params):
    if "snapshot-uuid" in params:
        return params["snapshot-uuid"]
    if "uuid" in params:
        return params["uuid"]
    raise CliFailure("Required parameter not found: snapshot-uuid or uuid.")


def get_snapshot_vm(ctx, uuid):
    ref = ctx.api.VM.get_by_uuid(uuid)
    if not ctx.api.VM.get_is_a_snapshot(ref):
        raise CliFailure("This operation can only be performed on a VM snapshot. %s is not a "
                         "VM snapshot." % uuid)
    return ref


def cmd_snapshot_uninstall(ctx, params):
    ref = get_snapshot_vm(ctx, get_snapshot_uuid(params))
    vm_uninstall_common(ctx, params, [ref])


def compression_of(params):
    """Compression_algorithms.of_string: matched exactly, `True` is none."""
    c = params.get("compress")
    if c in ("true", "gzip"):
        return "gzip"
    if c == "zstd":
        return "zstd"
    return "false"


def export_common(ctx, params, filename, vm, counter):
    metadata = get_bool_param(params, "metadata")
    export_snapshots = get_bool_param(params, "include-snapshots")
    preserve = get_bool_param(params, "preserve-power-state")
    if metadata:
        uri = "/export_metadata"
        extra = "&excluded_device_types=%s" % params.get("excluded-device-types", "")
    else:
        uri, extra = "/export", ""
    task = ctx.api.task.create("Export of VM", vm["uuid"])
    ctx.cleanup_tasks.append(task)
    # progress -1.0 marks that the handler has not taken the task yet.
    ctx.api.task.set_progress(task, -1.0)
    try:
        counter[0] += 1
        num = counter[0]
        f = filename + str(num) if num > 1 else filename
        url = "%s?session_id=%s&task_id=%s&ref=%s&use_compression=%s&preserve_power_state=%s" \
              "&export_snapshots=%s%s" % (
                  uri, ctx.session_ref, task, vm.ref, compression_of(params),
                  "true" if preserve else "false", "true" if export_snapshots else "false", extra)
        download_file(ctx, task, f, url, "Export")
    finally:
        try:
            ctx.api.task.destroy(task)
        except Exception:
            pass
        if task in ctx.cleanup_tasks:
            ctx.cleanup_tasks.remove(task)


def cmd_vm_export(ctx, params):
    filename = params["filename"]
    counter = [0]
    do_vm_op(ctx, params, lambda vm: export_common(ctx, params, filename, vm, counter),
             ["filename", "metadata", "compress", "preserve-power-state",
              "include-snapshots", "excluded-device-types"])


def cmd_snapshot_export(ctx, params):
    filename = params["filename"]
    uuid = params["snapshot-uuid"]
    ref = ctx.api.VM.get_by_uuid(uuid)
    if not ctx.api.VM.get_is_a_snapshot(ref):
        raise CliFailure("This operation can only be performed on a VM snapshot. %s is not a "
                         "VM snapshot." % uuid)
    export_common(ctx, params, filename, ctx.record("VM", ref), [0])


def default_sr(ctx):
    pool = ctx.api.pool.get_all()[0]
    sr = ctx.api.pool.get_default_SR(pool)
    try:
        return ctx.api.SR.get_uuid(sr)
    except Exception:
        return None


def cmd_vm_import(ctx, params):
    if "sr-uuid" in params:
        sr = ctx.api.SR.get_by_uuid(params["sr-uuid"])
    else:
        uuid = default_sr(ctx)
        if uuid is None:
            raise CliFailure("No SR specified and Pool default SR is null")
        sr = ctx.api.SR.get_by_uuid(uuid)
    restore = get_bool_param(params, "preserve")
    metadata = get_bool_param(params, "metadata")
    force = get_bool_param(params, "force")
    dry_run = get_bool_param(params, "dry-run")
    vdi_map = params.map_params("vdi")
    if "url" in params and "filename" in params:
        err("Invalid arguments. The 'url' and 'filename' parameters should not both be specified.\n")
        raise ExitWithError(1)
    if "url" in params:
        refs = getattr(ctx.api.VM, "import")(params["url"], sr, restore, force)
        out(",".join(ctx.api.VM.get_uuid(r) for r in refs) + "\n")
        return
    if "filename" not in params:
        raise OCamlFailure("Not_found")
    filename = params["filename"]
    if not metadata and dry_run:
        err("Only metadata import function support dry-run\n")
        raise ExitWithError(1)
    if filename.lower().endswith("ova.xml"):
        filename = filename[:-len("ova.xml")]

    def make_url(task):
        return "%s?session_id=%s&task_id=%s&restore=%s&force=%s&dry_run=%s%s%s" % (
            "/import_metadata" if metadata else "/import", ctx.session_ref, task,
            "true" if restore else "false", "true" if force else "false",
            "true" if dry_run else "false",
            "&sr_id=%s" % sr if sr != NULLREF else "",
            "".join("&vdi:%s=%s" % (a, b) for a, b in vdi_map))
    result = track_http_operation(ctx, make_url, "VM import", http_put, filename)
    uuids = [ctx.api.VM.get_uuid(r) for r in refs_of_result(result)]
    if not uuids and dry_run:
        uuids = ["xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"]
    out(",".join(uuids) + "\n")


def cmd_vdi_snapshot(ctx, params):
    vdi = ctx.api.VDI.get_by_uuid(params["uuid"])
    driver_params = dict(params.map_params("driver-params"))
    new = ctx.api.VDI.snapshot(vdi, driver_params)
    ctx.printer.plist([ctx.api.VDI.get_uuid(new)])


def cmd_vdi_export(ctx, params):
    filename = params["filename"]
    vdi = ctx.api.VDI.get_by_uuid(params["uuid"])
    fmt = "&format=" + params["format"] if "format" in params else ""
    base = "&base=" + params["base"] if "base" in params else ""

    def make_url(task):
        return "/export_raw_vdi?session_id=%s&task_id=%s&vdi=%s%s%s" % (
            ctx.session_ref, task, vdi, fmt, base)
    track_http_operation(ctx, make_url, "VDI export", http_get, filename)


def cmd_vdi_import(ctx, params):
    filename = params["filename"]
    vdi = ctx.api.VDI.get_by_uuid(params["uuid"])
    fmt = "&format=" + params["format"] if "format" in params else ""

    def make_url(task):
        return "/import_raw_vdi?session_id=%s&task_id=%s&vdi=%s%s" % (
            ctx.session_ref, task, vdi, fmt)
    track_http_operation(ctx, make_url, "VDI import", http_put, filename)


def cmd_vdi_create(ctx, params):
    sr = ctx.api.SR.get_by_uuid(params["sr-uuid"])
    name_label = params["name-label"]
    size = bytes_of_string("virtual-size", params["virtual-size"])
    ty = params.get("type", "user")
    if ty not in ("system", "user", "suspend", "crashdump"):
        raise CliFailure("Unknown vdi type: %s" % ty)
    sharable = get_bool_param(params, "sharable")
    sm_config = dict(params.map_params("sm-config"))
    tag_list = [k for k, _ in params.map_params("tags")]
    vdi = ctx.api.VDI.create({
        "name_label": name_label, "name_description": "", "SR": sr,
        "virtual_size": str(size), "type": ty, "sharable": sharable,
        "read_only": False, "xenstore_data": {}, "other_config": {},
        "sm_config": sm_config, "tags": tag_list})
    ctx.printer.plist([ctx.api.VDI.get_uuid(vdi)])


def vdi_call(method):
    """A command that resolves ``uuid=`` and calls ``VDI.<method>`` on it, printing
    nothing (cli_operations.ml vdi_destroy, vdi_enable_cbt, vdi_disable_cbt,
    vdi_data_destroy)."""
    def cmd(ctx, params):
        getattr(ctx.api.VDI, method)(ctx.api.VDI.get_by_uuid(params["uuid"]))
    return cmd


def vbd_call(method):
    """A command that resolves ``uuid=`` and calls ``VBD.<method>`` on it, printing nothing
    (cli_operations.ml vbd_plug)."""
    def cmd(ctx, params):
        getattr(ctx.api.VBD, method)(ctx.api.VBD.get_by_uuid(params["uuid"]))
    return cmd


def cmd_vdi_list_changed_blocks(ctx, params):
    """cli_operations.ml vdi_list_changed_blocks: ``Command (Print bitmap)``."""
    vdi_from = ctx.api.VDI.get_by_uuid(params["vdi-from-uuid"])
    vdi_to = ctx.api.VDI.get_by_uuid(params["vdi-to-uuid"])
    out(ctx.api.VDI.list_changed_blocks(vdi_from, vdi_to) + "\n")


def cmd_vbd_create(ctx, params):
    vm = ctx.api.VM.get_by_uuid(params["vm-uuid"])
    empty = "vdi-uuid" not in params
    vdi = NULLREF if empty else ctx.api.VDI.get_by_uuid(params["vdi-uuid"])
    bootable = get_bool_param(params, "bootable")
    mode = "RW"
    if "mode" in params:
        m = params["mode"].lower()
        if m not in ("ro", "rw"):
            raise CliFailure('Unknown mode: %s (should be "ro" or "rw"' % params["mode"].lower())
        mode = m.upper()
    ty = "Disk"
    if "type" in params:
        t = params["type"].lower()
        types = {"cd": "CD", "disk": "Disk", "floppy": "Floppy"}
        if t not in types:
            raise CliFailure('"Unknown type: %s (should be "cd", "disk" or "floppy"' % t)
        ty = types[t]
    unpluggable = get_bool_param(params, "unpluggable", True)
    if ty == "Disk" and empty:
        raise CliFailure("Empty VBDs can only be made for type=CD")
    vbd = ctx.api.VBD.create({
        "VM": vm, "VDI": vdi, "userdevice": params["device"], "bootable": bootable,
        "mode": mode, "type": ty, "unpluggable": unpluggable, "empty": empty,
        "qos_algorithm_type": "", "qos_algorithm_params": {}, "other_config": {},
        "device": "", "currently_attached": False})
    ctx.printer.plist([ctx.api.VBD.get_uuid(vbd)])


def _random_mac():
    b = bytearray(os.urandom(6))
    b[0] = (b[0] | 0x02) & 0xFE
    return ":".join("%02x" % x for x in b)


def cmd_vif_create(ctx, params):
    device = params["device"]
    mac = params.get("mac", "")
    if mac == "random":
        mac = _random_mac()
    vm = ctx.api.VM.get_by_uuid(params["vm-uuid"])
    network = ctx.api.network.get_by_uuid(params["network-uuid"])
    mtu = ctx.api.network.get_MTU(network)
    vif = ctx.api.VIF.create({
        "device": device, "network": network, "VM": vm, "MAC": mac, "MTU": str(mtu),
        "other_config": {}, "currently_attached": False, "qos_algorithm_type": "",
        "qos_algorithm_params": {}, "locking_mode": "network_default",
        "ipv4_allowed": [], "ipv6_allowed": []})
    ctx.printer.plist([ctx.api.VIF.get_uuid(vif)])


def cmd_vm_start(ctx, params):
    force = get_bool_param(params, "force")
    paused = get_bool_param(params, "paused")

    def op(vm):
        if "on" in params:
            host = params["on"]
            hosts = [r for r in ctx.all_records("host") if host in (r["name_label"], r["uuid"])]
            if not hosts:
                raise CliFailure("Host %s not found" % host)
            task = ctx.api.Async.VM.start_on(vm.ref, hosts[0].ref, paused, force)
        else:
            task = ctx.api.Async.VM.start(vm.ref, paused, force)
        return waiter(ctx, task)
    do_vm_op(ctx, params, op, ["on", "paused", "progress"], include_control=True)


def cmd_vm_shutdown(ctx, params):
    force = get_bool_param(params, "force")
    method = "hard_shutdown" if force else "clean_shutdown"

    def op(vm):
        return waiter(ctx, getattr(ctx.api.Async.VM, method)(vm.ref))
    do_vm_op(ctx, params, op, ["progress"])


def cmd_pool_dump_database(ctx, params):
    filename = params["file-name"]

    def make_url(task):
        master = ctx.api.pool.get_master(ctx.api.pool.get_all()[0])
        address = ctx.api.host.get_address(master)
        if ":" in address:
            address = "[%s]" % address
        return "https://%s/pool/xmldbdump?session_id=%s&task_id=%s" % (
            address, ctx.session_ref, task)
    track_http_operation(ctx, make_url, "dump database", http_get, filename)


def cmd_host_backup(ctx, params):
    filename = params["file-name"]

    def op(host):
        # uri_of_someone: the master is reached where the command went, any
        # other host at its own address (the backup is of whoever answers).
        master = ctx.api.pool.get_master(ctx.api.pool.get_all()[0])
        if host.ref == master:
            prefix = ""
        else:
            address = ctx.api.host.get_address(host.ref)
            if ":" in address:
                address = "[%s]" % address
            prefix = "https://%s" % address

        def make_url(task):
            return "%s/host_backup?session_id=%s&task_id=%s" % (prefix, ctx.session_ref, task)
        track_http_operation(ctx, make_url, "host backup download", http_get, filename)
    do_host_op(ctx, params, op, ["file-name"], multiple=False)


def cmd_help(ctx, params, argv0):
    names = [k for k, _ in params.items
             if k not in ("server", "username", "password", "port", "minimal", "all")]
    if names:
        for name in names:
            spec = COMMANDS.get(name)
            if spec is None:
                ctx.printer.plist(["Unknown command '%s'" % name])
                continue
            ctx.printer.table([[("command name        ", name),
                                ("reqd params     ", ", ".join(spec[1])),
                                ("optional params ", ", ".join(spec[2])),
                                ("description     ", spec[3])]])
        return
    text = ("Usage:\n  %s <command>\n"
            "    [ -s <server> ]            XenServer host\n"
            "    [ -p <port> ]              XenServer port number\n"
            "    [ -u <username> -pw <password> | -pwf <password file> ]\n"
            "                               User authentication (password or file)\n"
            "    [ --nossl ]                Disable SSL/TLS\n"
            "    [ --debug ]                Enable debug output\n"
            "    [ --debug-on-fail ]        Enable debug output only on failure\n"
            "    [ --traceparent <value> ]  Distributed tracing context\n"
            "    [ <other arguments> ... ]  Command-specific options\n\n"
            "To get help on a specific command:\n  %s help <command>\n\n"
            "To get a full listing of commands:\n  %s help --all\n\n"
            "Common command list\n-------------------\n" % (argv0, argv0, argv0))
    cmds = sorted(COMMANDS)
    if ctx.printer.minimal:
        ctx.printer.plist(cmds)
    else:
        ctx.printer.plist([text])
        line = "    " + cmds[0]
        lines = []
        for c in cmds[1:]:
            if len(line) + len(c) > 74:
                lines.append(line)
                line = "    " + c
            else:
                line += ", " + c
        lines.append(line)
        ctx.printer.plist(lines)


# name -> (implementation, reqd, optn, help)
COMMANDS = {}


def _register_generic():
    for cli_class in CLI_CLASSES:
        COMMANDS[cli_class + "-list"] = (
            (lambda c: lambda ctx, p: cmd_list(ctx, p, c))(cli_class), [], ["params"],
            "Lists all the %ss, filtering on the optional arguments. To filter on map "
            "parameters, use the syntax 'map-param:key=value'" % cli_class)
        COMMANDS[cli_class + "-param-list"] = (
            (lambda c: lambda ctx, p: cmd_param_list(ctx, p, c))(cli_class), ["uuid"], [],
            "Lists all the parameters of the object specified by the uuid.")
        COMMANDS[cli_class + "-param-get"] = (
            (lambda c: lambda ctx, p: cmd_param_get(ctx, p, c))(cli_class),
            ["uuid", "param-name"], ["param-key"],
            "Gets the parameter specified of the object. If the parameter is a map of "
            "key=value pairs, use 'param-key=<key>' to get the value associated with a "
            "particular key.")
        cls = CLI_CLASSES[cli_class][0]
        if any(f.set is not None or f.add_to_map is not None for f in FIELDS[cls]):
            COMMANDS[cli_class + "-param-set"] = (
                (lambda c: lambda ctx, p: cmd_param_set(ctx, p, c))(cli_class), ["uuid"], [],
                "Sets the parameter specified. If param-value is not given, the parameter is "
                "set to a null value. To set a (key,value) pair in a map parameter, use the "
                "syntax 'map-param:key=value'.")


_register_generic()
COMMANDS.update({
    "vm-snapshot": (cmd_vm_snapshot, ["new-name-label"], ["new-name-description", "ignore-vdi-uuids"],
                    "Snapshot an existing VM, using storage-level fast disk snapshot operation where available."),
    "vm-snapshot-with-quiesce": (cmd_vm_snapshot_with_quiesce, ["new-name-label"], ["new-name-description"],
                                 "Support for VSS has been removed."),
    "vm-export": (cmd_vm_export, ["filename"], ["preserve-power-state", "compress", "metadata",
                                                "include-snapshots", "excluded-device-types"],
                  "Export a VM to <filename>."),
    "snapshot-export-to-template": (cmd_snapshot_export, ["filename", "snapshot-uuid"],
                                    ["preserve-power-state"], "Export a snapshot to <filename>."),
    "vm-uninstall": (cmd_vm_uninstall, [], ["force"],
                     "Uninstall a VM. This operation will destroy those VDIs that are marked RW and "
                     "connected to this VM only. To simply destroy the VM record, use vm-destroy."),
    "snapshot-uninstall": (cmd_snapshot_uninstall, [], ["uuid", "snapshot-uuid", "force"],
                           "Uninstall a snapshot. This operation will destroy those VDIs that are "
                           "marked RW and connected to this snapshot only. To simply destroy the VM "
                           "record, use snapshot-destroy."),
    "vm-import": (cmd_vm_import, [], ["filename", "preserve", "sr-uuid", "force", "metadata",
                                      "dry-run", "vdi:"], "Import a VM."),
    "vdi-snapshot": (cmd_vdi_snapshot, ["uuid"], ["driver-params"],
                     "Snapshot a VDI on a remote SR. Returns the new snapshot's uuid."),
    "vdi-export": (cmd_vdi_export, ["uuid", "filename"], ["format", "base", "progress"], "Export a VDI."),
    "vdi-import": (cmd_vdi_import, ["uuid", "filename"], ["format", "progress"], "Import a raw VDI."),
    "vdi-create": (cmd_vdi_create, ["sr-uuid", "name-label", "virtual-size"],
                   ["sm-config:", "sharable", "tags:", "type"],
                   "Create a VDI. Type is 'system' 'user' 'suspend' or 'crashdump'."),
    "vdi-destroy": (vdi_call("destroy"), ["uuid"], [], "Destroy a VDI."),
    "vdi-enable-cbt": (vdi_call("enable_cbt"), ["uuid"], [],
                       "Enable changed block tracking on a VDI."),
    "vdi-disable-cbt": (vdi_call("disable_cbt"), ["uuid"], [],
                        "Disable changed block tracking on a VDI."),
    "vdi-data-destroy": (vdi_call("data_destroy"), ["uuid"], [],
                         "Delete the data of the VDI, but keep its changed block tracking metadata."),
    "vdi-list-changed-blocks": (cmd_vdi_list_changed_blocks, ["vdi-from-uuid", "vdi-to-uuid"], [],
                                "Write the changed blocks between the two given VDIs to the "
                                "standard output as a base64-encoded bitmap string."),
    "vbd-create": (cmd_vbd_create, ["vm-uuid", "device"],
                   ["vdi-uuid", "bootable", "type", "mode", "unpluggable"],
                   "Create a VBD. Appropriate values for the device field are listed in the "
                   "parameter 'allowed-VBD-devices' on the VM."),
    "vbd-plug": (vbd_call("plug"), ["uuid"], [], "Attempt to attach the VBD while the VM is in "
                                                  "the running state."),
    "vif-create": (cmd_vif_create, ["device", "network-uuid", "vm-uuid"], ["mac"], "Create a VIF."),
    "vm-start": (cmd_vm_start, [], ["force", "on", "paused"], "Start the selected VM(s)."),
    "vm-shutdown": (cmd_vm_shutdown, [], ["force"], "Shutdown the selected VM(s)."),
    "pool-dump-database": (cmd_pool_dump_database, ["file-name"], [],
                           "Download a dump of the pool database."),
    "host-backup": (cmd_host_backup, ["file-name"], [],
                    "Download a backup of the host's control domain."),
    "help": (None, [], [], "Display help on the given command."),
})


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def report(exc, ctx):
    """xapi_cli.ml exception_handler."""
    refs = ctx.refs if ctx is not None else None
    if isinstance(exc, ParamError):
        err(("%s: %s" % (exc.prefix, exc.text) if exc.prefix else exc.text) + "\n")
        err("For usage run: 'xe help'\n")
    elif isinstance(exc, ApiError):
        if exc.code == "SESSION_AUTHENTICATION_FAILED":
            if exc.params and exc.params[0] == "":
                err("Username/password must be specified\n")
            else:
                err("Authentication failed\n")
            err("For usage run: 'xe help'\n")
        else:
            try:
                print_api_error(exc.code, exc.params, refs)
            except Exception:
                print_api_error(exc.code, exc.params, None)
    elif isinstance(exc, (CliFailure, RecordFailure)):
        err("Error: %s\n" % exc)
    elif isinstance(exc, MissingParam):
        print_api_error("Missing parameter", [str(exc)])
    elif isinstance(exc, MultipleFailure):
        for uuid, msg in exc.errs:
            out("operation failed on %s: %s\n" % (uuid, msg))
    elif isinstance(exc, OCamlFailure):
        print_api_error("INTERNAL_ERROR", ["Failure: %s" % exc])
    else:
        print_api_error("INTERNAL_ERROR", ["%s" % exc])


def _wrap_api_errors(fn):
    try:
        return fn()
    except XenAPI.Failure as e:
        details = list(e.details or ["INTERNAL_ERROR"])
        raise ApiError(str(details[0]), details[1:])


def _on_signal(signum, frame):
    sock = Transfer.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except Exception:
            pass
    raise Interrupted(signum)


def main(argv=None):
    if argv is None:
        argv = [os.fsencode(a).decode("utf-8", "surrogateescape") for a in sys.argv[1:]]
    argv0 = sys.argv[0] if sys.argv else "xe"
    try:
        return _main(argv, argv0)
    except ExitWithError as e:
        return e.code


def _main(argv, argv0):
    if XenAPI is None:
        err("The XenAPI Python package is missing.\n")
        return 1
    if "-version" in argv:
        out("ThinCLI protocol: %d.%d\n" % THIN_CLI_PROTOCOL)
        return 0
    cfg = Config()
    try:
        helpflag = any(a in ("-help", "--help") for a in argv)
        rest = parse_args([a for a in argv if a not in ("-help", "--help")], cfg)
        if helpflag or not rest:
            raise _Usage()
    except _Usage:
        usage()
        return 0
    if cfg.passwordfile:
        read_password_file(cfg)

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    ctx = None
    try:
        try:
            cmd, items = parse_command(rest)
        except _Usage:
            usage()
            return 0
        params = Params(items + [("username", cfg.username), ("password", cfg.password)])
        minimal = False
        if "minimal" in params:
            minimal = params["minimal"] == "true"
        printer = Printer(minimal)
        ctx = Ctx(cfg, params, printer)
        if cmd == "help":
            cmd_help(ctx, params, argv0)
            printer.flush()
            return 0
        spec = COMMANDS.get(cmd)
        if spec is None:
            raise ParamError("Unknown command", cmd)
        for req in spec[1]:
            if req not in params:
                raise ParamError("Required parameter not found", req)
        try:
            _wrap_api_errors(ctx.login)
        except OSError as e:
            if isinstance(e, ssl.SSLError) or e.errno not in CONNECT_ERRNOS:
                # the thin client read nothing it could unmarshal (Connect_failure)
                err("Unable to contact server. Please check server and port settings.\n")
            else:
                err("Error: %s (calling connect )\n" % os.strerror(e.errno))
            return 1
        except (xmlrpc.client.ProtocolError, http.client.HTTPException, EOFError):
            err("Unable to contact server. Please check server and port settings.\n")
            return 1
        try:
            try:
                _wrap_api_errors(lambda: spec[0](ctx, params))
            except ApiError as e:
                # refs become "uuid (name)" while the session is still open
                e.params = [ctx.refs.convert(p) for p in e.params]
                raise
            printer.flush()
            return 0
        finally:
            for task in list(ctx.cleanup_tasks):
                try:
                    ctx.api.task.destroy(task)
                except Exception:
                    pass
            ctx.logout()
    except Interrupted as e:
        if e.signum == signal.SIGTERM:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        return 1
    except ExitWithError as e:
        return e.code
    except (ParamError, ApiError, CliFailure, RecordFailure, MissingParam,
            MultipleFailure, OCamlFailure) as e:
        report(e, ctx)
        return 1
    except XenAPI.Failure as e:
        details = list(e.details or ["INTERNAL_ERROR"])
        report(ApiError(str(details[0]), details[1:]), ctx)
        return 1
    except (xmlrpc.client.ProtocolError, xmlrpc.client.Fault):
        err("Server internal error.\n")
        return 1
    except (ConnectionError, EOFError, http.client.HTTPException):
        err("Lost connection to the server.\n")
        return 1
    except Exception as e:  # a bug here, reported the way xapi reports its own
        report(e, ctx)
        if os.environ.get("XE_DEBUG"):
            import traceback
            traceback.print_exc()
        return 1
