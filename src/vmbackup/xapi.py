"""Talking to XAPI: endpoints, TLS pinning, the XML-RPC session and login.

Owns: Endpoint/parse_endpoint (https, http, the local socket), the pinned and unix
HTTP connections, Xapi (one session, calls, XapiFailure), login, xapi_value.
Imports: errors, util; XenAPI (the official client) when installed.
"""

import hashlib
import http.client
import socket
import ssl
import time
import typing
import urllib.parse
import xmlrpc.client

from vmbackup import __version__
from vmbackup.errors import (
    CallFailed, ConfigError, LoginError, VmBackupError, XapiCallFailed, log, xapi_error_text)
from vmbackup.util import one_line


try:  # the official client; dom0 ships it, elsewhere: pip install XenAPI
    import XenAPI
except ImportError:  # pragma: no cover - exercised only where XenAPI is absent
    XenAPI = None


#: dom0's local XAPI socket; root needs no password on it.
LOCAL_XAPI_SOCKET = "/var/lib/xcp/xapi"


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (dom0's local xapi), for XML-RPC and the export handlers."""

    def __init__(self, path, timeout=None):
        http.client.HTTPConnection.__init__(self, "localhost", timeout=timeout)
        self.socket_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.timeout is not None:
            sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS that accepts exactly one certificate, by SHA-256 fingerprint.

    XenServer ships a self-signed certificate; pinning it is safer than switching
    verification off.
    """

    def __init__(self, host, port=None, fingerprint=None, timeout=None):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        http.client.HTTPSConnection.__init__(self, host, port, timeout=timeout, context=context)
        self.fingerprint = fingerprint

    def connect(self):
        http.client.HTTPSConnection.connect(self)
        seen = hashlib.sha256(self.sock.getpeercert(binary_form=True)).hexdigest()
        if seen != self.fingerprint:
            self.close()
            raise ssl.SSLError("certificate fingerprint %s does not match tls_fingerprint %s"
                               % (seen, self.fingerprint))


class Endpoint(typing.NamedTuple):
    """Where XAPI answers: a unix socket, or http(s)://host:port."""
    scheme: str                 # unix, http or https
    host: str                   # host name or address; the socket path for unix
    port: typing.Optional[int]
    ca_file: typing.Optional[str] = None
    fingerprint: typing.Optional[str] = None
    insecure: bool = False

    @property
    def url(self):
        if self.scheme == "unix":
            return "unix:" + self.host
        default = 443 if self.scheme == "https" else 80
        port = "" if self.port in (None, default) else ":%d" % self.port
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s://%s%s/" % (self.scheme, host, port)

    @property
    def is_local(self):
        return self.scheme == "unix"

    def with_host(self, host):
        """Return this endpoint pointed at another pool host (same scheme, port and TLS)."""
        if self.scheme == "unix":
            return Endpoint("https", host, None, self.ca_file, self.fingerprint, self.insecure)
        return self._replace(host=host)

    def connection(self, timeout=None):
        """Return a new, unconnected http.client connection to this endpoint."""
        if self.scheme == "unix":
            return UnixHTTPConnection(self.host, timeout=timeout)
        if self.scheme == "http":
            return http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        if self.fingerprint:
            return PinnedHTTPSConnection(self.host, self.port, self.fingerprint, timeout=timeout)
        return http.client.HTTPSConnection(self.host, self.port, timeout=timeout,
                                           context=self.ssl_context())

    def ssl_context(self):
        if self.insecure:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        return ssl.create_default_context(cafile=self.ca_file)


def parse_endpoint(server, ca_file=None, fingerprint=None, insecure=False):
    """Return the Endpoint for a --server value; None means this host's local socket.

    >>> parse_endpoint("pool1.example.org").url
    'https://pool1.example.org/'
    """
    if not server:
        return Endpoint("unix", LOCAL_XAPI_SOCKET, None)
    if server.startswith("unix:"):
        path = server[len("unix:"):]
        if path.startswith("//"):
            path = path[2:]
        return Endpoint("unix", path, None)
    if "://" not in server:
        server = "https://" + server
    parts = urllib.parse.urlsplit(server)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("server=%s: expected https://host, http://host or unix:/path" % server)
    try:
        port = parts.port
    except ValueError:
        raise ConfigError("server=%s: bad port" % server)
    return Endpoint(parts.scheme, parts.hostname, port, ca_file, fingerprint, insecure)


class EndpointTransport(xmlrpc.client.Transport):
    """xmlrpc transport that opens its connections through an Endpoint."""

    def __init__(self, endpoint, timeout=None):
        xmlrpc.client.Transport.__init__(self)
        self.endpoint = endpoint
        self.timeout = timeout

    def make_connection(self, host):
        if self._connection and self._connection[0] == host:
            return self._connection[1]
        self._connection = host, self.endpoint.connection(timeout=self.timeout)
        return self._connection[1]


class XapiFailure(CallFailed):
    """{}"""

    def __init__(self, method, details):
        VmBackupError.__init__(self, "%s: %s" % (method, xapi_error_text(details)))
        self.method = method
        self.details = [str(d) for d in details]

    @property
    def code(self):
        return self.details[0] if self.details else ""


#: Errors of the connection itself, as opposed to XAPI's answers.
CONNECTION_ERRORS = (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError)


class Xapi:
    """A logged-in XAPI session: `call("VM.get_all_records")`, retries, logout."""

    #: Read-only calls are retried on a dropped connection or a 5xx, with backoff.
    RETRIES, BACKOFF = 3, 1.0

    def __init__(self, endpoint, session, username):
        self.endpoint = endpoint
        self.session = session
        self.username = username

    @property
    def ref(self):
        return self.session._session

    def call(self, method, *args, retry=None):
        """Return XAPI's answer to `method(*args)`; raise XapiFailure or XapiCallFailed."""
        if retry is None:
            retry = ".get_" in method or method.endswith((".get_all", ".get_record"))
        attempts = self.RETRIES + 1 if retry else 1
        for attempt in range(attempts):
            try:
                target = self.session.xenapi
                for part in method.split("."):
                    target = getattr(target, part)
                return target(*args)
            except XenAPI.Failure as exc:
                raise XapiFailure(method, exc.details)
            except (CONNECTION_ERRORS + (xmlrpc.client.Fault,)) as exc:
                if attempt + 1 >= attempts:
                    raise XapiCallFailed(method, one_line(exc))
                log.info("XAPI %s: %s; retrying", method, one_line(exc))
                time.sleep(self.BACKOFF * (2 ** attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def logout(self):
        """Log out, ignoring errors: the run is over either way."""
        try:
            self.session.xenapi.session.logout()
        except Exception as exc:  # noqa: BLE001 - logout failure must not mask the run's result
            log.debug("logout: %s", exc)


def login(endpoint, username, password, _redirects=2):
    """Return a Xapi session; follow HOST_IS_SLAVE to the master; raise LoginError."""
    if XenAPI is None:
        raise LoginError(endpoint.url, "the XenAPI package is missing (pip install XenAPI)")
    uri = "http://localhost/" if endpoint.is_local else endpoint.url
    session = XenAPI.Session(uri, transport=EndpointTransport(endpoint, timeout=300))
    try:
        session.xenapi.login_with_password(username, password or "", "2.0",
                                           "vmbackup/" + __version__)
    except XenAPI.Failure as exc:
        details = [str(d) for d in exc.details]
        if details[:1] == ["HOST_IS_SLAVE"] and len(details) > 1 and _redirects > 0:
            master = endpoint.with_host(details[1])
            log.info("%s is a pool member; logging in to the master %s", endpoint.url, master.url)
            return login(master, username, password, _redirects - 1)
        if details[:1] == ["SESSION_AUTHENTICATION_FAILED"]:
            raise LoginError(endpoint.url, "authentication failed for user %r" % username)
        raise LoginError(endpoint.url, xapi_error_text(details))
    except ssl.SSLError as exc:
        raise LoginError(endpoint.url, "TLS: %s" % one_line(getattr(exc, "reason", None) or exc))
    except CONNECTION_ERRORS + (xmlrpc.client.Fault,) as exc:
        raise LoginError(endpoint.url, one_line(getattr(exc, "strerror", None) or exc))
    return Xapi(endpoint, session, username)


def xapi_value(text):
    """Return the Python value of a task result: XAPI stores it XML-RPC encoded.

    '<value><array><data><value>OpaqueRef:1</value></data></array></value>' -> ['OpaqueRef:1']
    """
    if not text:
        return None
    wrapped = "<methodResponse><params><param>%s</param></params></methodResponse>" % text
    return xmlrpc.client.loads(wrapped)[0][0]
