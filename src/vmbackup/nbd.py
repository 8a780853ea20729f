"""The one NBD client: reads a snapshot's blocks from XAPI's NBD server (xapi-nbd).

Owns: NbdClient (fixed newstyle handshake, NBD_OPT_STARTTLS with the certificate that
VDI.get_nbd_info returns pinned and checked, NBD_OPT_EXPORT_NAME, NBD_CMD_READ,
NBD_CMD_DISC), NbdError, nbd_tls_context, connect_info.
xapi-nbd speaks only NBD_OPT_EXPORT_NAME (no GO/INFO, no structured replies), so this
client asks for nothing else (facts §7; the simulator's `protocol: xapi`).
Imports: errors; the standard library.
"""

import socket
import ssl
import struct

from vmbackup.errors import VmBackupError

NBD_MAGIC = b"NBDMAGIC"
NBD_IHAVEOPT = b"IHAVEOPT"
NBD_REPLY_MAGIC = 0x3E889045565A9
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_FLAG_FIXED_NEWSTYLE = 1
NBD_FLAG_NO_ZEROES = 2
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_STARTTLS = 5
NBD_REP_ACK = 1
NBD_CMD_READ = 0
NBD_CMD_DISC = 2
#: one read request at most this long (xapi-nbd and nbdkit accept 32 MiB; stay well below)
MAX_READ = 4 << 20


class NbdError(VmBackupError):
    """NBD {}"""


def nbd_tls_context(cert_pem):
    """Return an SSLContext that trusts exactly the PEM certificate `cert_pem`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    try:
        ctx.load_verify_locations(cadata=cert_pem)
    except (ssl.SSLError, ValueError) as e:
        raise NbdError("certificate from get_nbd_info unreadable: {}".format(e))
    return ctx


def _recv_exact(sock, n):
    """Return exactly n bytes from sock; raise NbdError if the peer closes first."""
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(min(n - len(buf), 1 << 20))
        except OSError as e:
            raise NbdError("connection failed: {}".format(e))
        if not chunk:
            raise NbdError("server closed the connection ({} of {} bytes)".format(len(buf), n))
        buf += chunk
    return bytes(buf)


class NbdClient:
    """One NBD connection to one export; a context manager that sends NBD_CMD_DISC on exit.

    NbdClient(address, port, exportname, cert=PEM, subject=name) uses TLS and checks the
    server's certificate against `cert` (hostname `subject`); cert=None means plain NBD.
    """

    def __init__(self, address, port, exportname, cert=None, subject=None, timeout=60.0):
        self.size = None
        self.tls = cert is not None
        self._handle = 0
        try:
            self.sock = socket.create_connection((address, int(port)), timeout=timeout)
        except OSError as e:
            raise NbdError("cannot connect to {}:{}: {}".format(address, port, e))
        try:
            self._handshake(exportname, cert, subject or address)
        except BaseException:
            self.sock.close()
            raise

    def _handshake(self, exportname, cert, hostname):
        """Negotiate (fixed newstyle), STARTTLS if cert, then EXPORT_NAME; sets self.size."""
        head = _recv_exact(self.sock, 18)
        if head[:16] != NBD_MAGIC + NBD_IHAVEOPT:
            raise NbdError("server is not a newstyle NBD server")
        (server_flags,) = struct.unpack(">H", head[16:])
        if not server_flags & NBD_FLAG_FIXED_NEWSTYLE:
            raise NbdError("server does not speak fixed newstyle")
        flags = NBD_FLAG_FIXED_NEWSTYLE | (server_flags & NBD_FLAG_NO_ZEROES)
        self.sock.sendall(struct.pack(">I", flags))
        if cert is not None:
            self._starttls(cert, hostname)
        name = exportname.encode("utf-8")
        self.sock.sendall(NBD_IHAVEOPT + struct.pack(">II", NBD_OPT_EXPORT_NAME, len(name)) + name)
        reply = _recv_exact(self.sock, 10)
        self.size, self.flags = struct.unpack(">QH", reply)
        if not flags & NBD_FLAG_NO_ZEROES:
            _recv_exact(self.sock, 124)

    def _starttls(self, cert, hostname):
        """Ask for TLS and wrap the socket; raise NbdError if refused or the cert differs."""
        self.sock.sendall(NBD_IHAVEOPT + struct.pack(">II", NBD_OPT_STARTTLS, 0))
        magic, opt, rtype, length = struct.unpack(">QIII", _recv_exact(self.sock, 20))
        _recv_exact(self.sock, length)
        if magic != NBD_REPLY_MAGIC or opt != NBD_OPT_STARTTLS or rtype != NBD_REP_ACK:
            raise NbdError("server refused STARTTLS (reply {:#x})".format(rtype))
        ctx = nbd_tls_context(cert)
        try:
            self.sock = ctx.wrap_socket(self.sock, server_hostname=hostname)
        except (ssl.SSLError, ssl.CertificateError, OSError) as e:
            raise NbdError("TLS with the certificate from get_nbd_info failed: {}".format(e))
        pinned = ssl.PEM_cert_to_DER_cert(cert.strip() + "\n")
        if self.sock.getpeercert(binary_form=True) != pinned:
            raise NbdError("server certificate is not the one get_nbd_info named")

    def _request(self, cmd, offset, length):
        self._handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, cmd,
                                      self._handle, offset, length))
        return self._handle

    def read(self, offset, length):
        """Return `length` bytes at `offset`; raise NbdError on any error reply or drop."""
        out = bytearray()
        while length > 0:
            n = min(length, MAX_READ)
            handle = self._request(NBD_CMD_READ, offset, n)
            magic, error, got = struct.unpack(">IIQ", _recv_exact(self.sock, 16))
            if magic != NBD_SIMPLE_REPLY_MAGIC or got != handle:
                raise NbdError("bad reply from server (magic {:#x})".format(magic))
            if error:
                raise NbdError("read of {} bytes at {} failed: error {}".format(n, offset, error))
            out += _recv_exact(self.sock, n)
            offset, length = offset + n, length - n
        return bytes(out)

    def close(self):
        """Send NBD_CMD_DISC (best effort) and close the socket."""
        try:
            self._request(NBD_CMD_DISC, 0, 0)
        except OSError:
            pass
        finally:
            self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect_info(info, allow_insecure=False, timeout=60.0):
    """Return an NbdClient for one get_nbd_info record (TLS when it carries a cert)."""
    cert = info.get("cert") or None
    if cert is None and not allow_insecure:
        raise NbdError("server {} offers only insecure NBD".format(info.get("address")))
    return NbdClient(info["address"], info["port"], info["exportname"], cert=cert,
                     subject=info.get("subject") or None, timeout=timeout)
