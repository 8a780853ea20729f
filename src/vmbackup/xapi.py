"""Talking to XAPI: endpoints, TLS pinning, the XML-RPC session and login, HTTP, tasks.

Owns: Endpoint/parse_endpoint (https, http, the local socket), the pinned and unix
HTTP connections, Xapi (one session, calls, XapiFailure), login, xapi_value, the one
timeout policy and the one mapping of TLS/connection errors, http_request (the one
path to XAPI's HTTP handlers, following its redirects) and XapiTask (the one owner
of a XAPI task: create, cancel on error, wait, destroy).
Imports: errors, util; XenAPI (the official client) when installed.
"""

import base64
import hashlib
import http.client
import re
import socket
import ssl
import time
import typing
import urllib.parse
import xmlrpc.client

from vmbackup import __version__
from vmbackup.errors import (
    CallFailed, ConfigError, ExportFailed, ExportStalled, LoginError, VmBackupError,
    XapiCallFailed, log, xapi_error_text)
from vmbackup.util import human_size, mask_credentials, one_line


try:  # the official client; dom0 ships it, elsewhere: pip install XenAPI
    import XenAPI
except ImportError:  # pragma: no cover - exercised only where XenAPI is absent
    XenAPI = None


#: dom0's local XAPI socket; root needs no password on it.
LOCAL_XAPI_SOCKET = "/var/lib/xcp/xapi"


# The timeout policy, in one place. An HTTP transfer's socket gives up after the
# run's stall_timeout without a byte; an XML-RPC call after XMLRPC_TIMEOUT; a task
# is waited for max(TASK_WAIT_MIN, stall_timeout) once its data has moved.

#: Seconds one XML-RPC call may take (XAPI answers a VM.snapshot only once it is done).
XMLRPC_TIMEOUT = 300

#: Seconds a task is waited for at least once its data has moved: an import still
#: writes its disks after the last byte is in.
TASK_WAIT_MIN = 600

#: Polling a task: the first delay and the longest one (seconds), doubling between.
TASK_POLL_FIRST, TASK_POLL_MAX = 0.05, 1.0

#: Seconds the login may take, connecting included: a hung or wrong server is named
#: quickly, not after XMLRPC_TIMEOUT. (XAPI answers a wrong password after ~5 s.)
LOGIN_TIMEOUT = 30

#: Seconds fetching a certificate's fingerprint for an error message may take.
FINGERPRINT_TIMEOUT = 10

#: HOST_IS_SLAVE answers followed at login (a member, then a master that just moved).
LOGIN_HOPS = 2

#: Redirects one HTTP request follows. XAPI redirects once, to a host that sees the
#: VM's or the disk's SRs; more hops than this is a loop.
MAX_REDIRECTS = 3

#: HTTP answers that send the client elsewhere (XAPI sends 302).
REDIRECT_STATUSES = (301, 302, 303, 307)

#: Bytes of an HTTP error page read, and characters of it quoted in the error.
ERROR_PAGE_READ, ERROR_PAGE_QUOTE = 2048, 200


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

    def redirected(self, location):
        """Return (endpoint, "path?query") that a Location header points to (same TLS settings)."""
        parts = urllib.parse.urlsplit(location)
        endpoint = self
        if parts.hostname:
            endpoint = self._replace(scheme=parts.scheme or self.scheme, host=parts.hostname,
                                     port=parts.port)
        return endpoint, parts.path + ("?" + parts.query if parts.query else "")

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
    if "@" in parts.netloc:
        raise ConfigError("server=%s: a user or password in the URL is refused (it would show in "
                          "process lists and logs); use username= and password_file="
                          % mask_credentials(server))
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

    def set_timeout(self, timeout):
        """Use `timeout` from now on, on the open connection too (after login: XMLRPC_TIMEOUT)."""
        self.timeout = timeout
        conn = self._connection[1] if self._connection else None
        if conn is not None:
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)

    def make_connection(self, host):
        if self._connection and self._connection[0] == host:
            return self._connection[1]
        self._connection = host, self.endpoint.connection(timeout=self.timeout)
        return self._connection[1]

    def single_request(self, host, handler, request_body, verbose=False):
        try:
            return xmlrpc.client.Transport.single_request(self, host, handler, request_body,
                                                          verbose)
        except BaseException:
            # xmlrpc.client drops a connection after an Exception but keeps it after
            # KeyboardInterrupt or Terminated, half-way through a request: the cleanup
            # calls that follow (task.cancel, VM.destroy) need a fresh one.
            self.close()
            raise


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


#: TLS failures (before Python 3.7 a certificate for the wrong host is a ValueError).
TLS_ERRORS = (ssl.SSLError, ssl.CertificateError)


def connection_error_text(exc):
    """Return one line for a TLS or connection error: the one wording every caller uses.

    ConnectionRefusedError(111, 'Connection refused') -> 'Connection refused'
    ssl.SSLError('[SSL: CERTIFICATE_VERIFY_FAILED] ...') -> 'TLS: [SSL: CERTIFICATE_VERIFY_FAILED] ...'
    """
    if isinstance(exc, TLS_ERRORS):
        return "TLS: " + one_line(exc)
    return one_line(getattr(exc, "strerror", None) or exc)


def transfer_error(what, exc, done, stall_timeout):
    """Return the tool's error for a connection lost (or silent) after `done` bytes of a transfer."""
    if isinstance(exc, socket.timeout):
        return ExportStalled(what, stall_timeout)
    return ExportFailed("%s: connection lost after %s: %s"
                        % (what, human_size(done), connection_error_text(exc)))


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
            except socket.timeout:
                raise XapiCallFailed(method, "no answer within %d s (the XAPI call timeout)"
                                     % XMLRPC_TIMEOUT)
            except (TLS_ERRORS + CONNECTION_ERRORS + (xmlrpc.client.Fault,)) as exc:
                if attempt + 1 >= attempts:
                    raise XapiCallFailed(method, connection_error_text(exc))
                log.info("XAPI %s: %s; retrying", method, connection_error_text(exc))
                time.sleep(self.BACKOFF * (2 ** attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def twin(self):
        """Return a Xapi on this session over a connection of its own, for another thread
        (an xmlrpc connection is not shared between threads). Never log a twin out."""
        uri = "http://localhost/" if self.endpoint.is_local else self.endpoint.url
        session = XenAPI.Session(uri, transport=EndpointTransport(self.endpoint,
                                                                  timeout=XMLRPC_TIMEOUT))
        session._session = self.session._session
        return Xapi(self.endpoint, session, self.username)

    def logout(self):
        """Log out, ignoring errors: the run is over either way."""
        try:
            self.session.xenapi.session.logout()
        except Exception as exc:  # noqa: BLE001 - logout failure must not mask the run's result
            log.debug("logout: %s", exc)


def login(endpoint, username, password, _hops=LOGIN_HOPS):
    """Return a Xapi session; follow HOST_IS_SLAVE to the master; raise LoginError."""
    if XenAPI is None:
        raise LoginError(endpoint.url, "the XenAPI package is missing (pip install XenAPI)")
    if not endpoint.is_local and not password:
        raise LoginError(endpoint.url, "no password given: use --password-file FILE (mode 0600), "
                                       "password_file= in the config file, or VMBACKUP_PASSWORD")
    uri = "http://localhost/" if endpoint.is_local else endpoint.url
    transport = EndpointTransport(endpoint, timeout=LOGIN_TIMEOUT)
    session = XenAPI.Session(uri, transport=transport)
    try:
        session.xenapi.login_with_password(username, password or "", "2.0",
                                           "vmbackup/" + __version__)
    except XenAPI.Failure as exc:
        details = [str(d) for d in exc.details]
        if details[:1] == ["HOST_IS_SLAVE"] and len(details) > 1 and _hops > 0:
            master = endpoint.with_host(details[1])
            log.info("%s is a pool member; logging in to the master %s", endpoint.url, master.url)
            return login(master, username, password, _hops - 1)
        if details[:1] == ["SESSION_AUTHENTICATION_FAILED"]:
            raise LoginError(endpoint.url, "authentication failed for user %r%s"
                             % (username, base64_hint(password)))
        raise LoginError(endpoint.url, xapi_error_text(details))
    except socket.timeout:
        raise LoginError(endpoint.url, "no answer within %d s (the login timeout): is it a "
                                       "XAPI server, and reachable?" % LOGIN_TIMEOUT)
    except TLS_ERRORS + CONNECTION_ERRORS + (xmlrpc.client.Fault,) as exc:
        raise LoginError(endpoint.url, first_contact_text(endpoint, exc))
    transport.set_timeout(XMLRPC_TIMEOUT)
    return Xapi(endpoint, session, username)


def base64_hint(password):
    """Return a hint when a password looks like NAUbackup's base64 password file ('' if not)."""
    text = (password or "").strip()
    if len(text) < 8 or len(text) % 4 or not re.match(r"^[A-Za-z0-9+/]+=*$", text):
        return ""
    try:
        base64.b64decode(text, validate=True).decode("utf-8")
    except (ValueError, UnicodeError):
        return ""
    return (" (the password looks base64-encoded: this looks like NAUbackup's base64 password "
            "file; give it as the first argument of the NAUbackup command line, or put the plain "
            "password in --password-file)")


def first_contact_text(endpoint, exc):
    """Return the one line for a connection or TLS failure at login, with what to do about it."""
    text = connection_error_text(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        seen = server_fingerprint(endpoint)
        if seen:
            return ("%s; the server's certificate has SHA-256 fingerprint %s: check it on the "
                    "host (openssl x509 -noout -fingerprint -sha256 -in /etc/xensource/xapi-ssl.pem) "
                    "and pin it with --tls-fingerprint %s (tls_fingerprint=)" % (text, seen, seen))
        return text + "; pin the server's certificate with --tls-fingerprint SHA256"
    if "WRONG_VERSION_NUMBER" in text or "UNKNOWN_PROTOCOL" in text:
        return ("%s: the server does not speak TLS on this port; if it serves plain HTTP, use "
                "http://%s" % (text, endpoint.url.split("://", 1)[-1]))
    if endpoint.scheme == "http" and isinstance(exc, (http.client.HTTPException, ConnectionError)) \
            and not isinstance(exc, ConnectionRefusedError):
        return ("%s: no HTTP answer; if the server speaks HTTPS on this port, use https://%s"
                % (text, endpoint.url.split("://", 1)[-1]))
    return text


def server_fingerprint(endpoint):
    """Return the SHA-256 fingerprint (AB:CD:...) of the certificate the server shows, or None."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((endpoint.host, endpoint.port or 443),
                                      timeout=FINGERPRINT_TIMEOUT) as sock:
            with context.wrap_socket(sock, server_hostname=endpoint.host) as tls:
                der = tls.getpeercert(binary_form=True)
    except (OSError, ValueError):
        return None
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def xapi_value(text):
    """Return the Python value of a task result: XAPI stores it XML-RPC encoded.

    '<value><array><data><value>OpaqueRef:1</value></data></array></value>' -> ['OpaqueRef:1']
    """
    if not text:
        return None
    wrapped = "<methodResponse><params><param>%s</param></params></methodResponse>" % text
    return xmlrpc.client.loads(wrapped)[0][0]


def http_request(endpoint, method, path, query, stall_timeout, content_length=None):
    """Return (response, connection) of XAPI's 200 answer to `method path?query`.

    The one HTTP path to XAPI: it follows up to MAX_REDIRECTS redirects, gives the
    socket stall_timeout, and raises ExportFailed for a TLS or connection error, an
    answer other than 200 (quoting the page) or a redirect loop. A PUT sends only its
    headers here: XAPI answers (200, or 302 to the host that sees the SR) before it
    reads the body, so the caller sends the content_length bytes after this returns.
    The caller closes both.
    """
    target = path + "?" + urllib.parse.urlencode(query)
    for _ in range(MAX_REDIRECTS + 1):
        conn = endpoint.connection(timeout=stall_timeout)
        response = None
        try:
            response = _send_head(conn, method, target, content_length)
            location = response.getheader("Location")
            if response.status in REDIRECT_STATUSES and location:
                close_http(response, conn)
                endpoint, target = endpoint.redirected(location)
                log.debug("%s %s redirected to %s", method, path, endpoint.url)
                continue
            if response.status != http.client.OK:
                page = response.read(ERROR_PAGE_READ).decode("utf-8", "replace")
                raise ExportFailed("%s %s: HTTP %d %s: %s" % (method, path, response.status,
                                                               response.reason,
                                                               one_line(page, ERROR_PAGE_QUOTE)))
            return response, conn
        except TLS_ERRORS + CONNECTION_ERRORS as exc:
            close_http(response, conn)
            raise ExportFailed("%s %s on %s: %s" % (method, path, endpoint.url,
                                                    connection_error_text(exc)))
        except BaseException:
            close_http(response, conn)
            raise
    raise ExportFailed("%s %s: too many redirects (more than %d)" % (method, path, MAX_REDIRECTS))


def _send_head(conn, method, target, content_length):
    """Send the request line and headers (no body); return the response, its status read."""
    conn.putrequest(method, target)
    if content_length is not None:
        conn.putheader("Content-Length", str(content_length))
    conn.endheaders()
    # Read the answer on the socket ourselves: conn.getresponse() would drop the socket
    # of a Connection: close answer, and a PUT's body is sent after the answer.
    response = http.client.HTTPResponse(conn.sock, method=method)
    response.begin()
    return response


def close_http(response, conn):
    """Close a response (None: not read yet) and its connection."""
    if response is not None:
        response.close()
    conn.close()


class XapiTask:
    """The one owner of a XAPI task around an HTTP transfer: create, cancel on error, wait, destroy.

        with XapiTask(xapi, "export of web01", stall_timeout) as task:
            response, conn = task.http(endpoint, "GET", "/export", {"ref": ref})
            ...
        task.record      # the finished task's record; its status is "success"

    Leaving the block normally waits for the task (unless `finish()` was called inside
    it) and raises ExportFailed unless the task succeeded: XAPI sends no Content-Length,
    so a cut stream looks finished and only the task tells. Leaving it by any exception,
    KeyboardInterrupt and Terminated included, cancels the task if it still runs. The
    task is destroyed either way.
    """

    def __init__(self, xapi, what, stall_timeout):
        self.xapi, self.what, self.stall_timeout = xapi, what, stall_timeout
        self.ref = None
        self.record = None

    def __enter__(self):
        self.ref = self.xapi.call("task.create", "vmbackup: " + self.what, "")
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is not None:
                self.cancel()
            elif self.record is None:
                try:
                    self.finish()
                except BaseException:
                    self.cancel()
                    raise
        finally:
            self.destroy()
        return False

    def http(self, endpoint, method, path, params, content_length=None):
        """Return (response, connection) of http_request for `path` run under this task.

        XAPI's error page is HTML; when the handler failed the task, the error says why
        in XAPI's own words.
        """
        query = dict(params, session_id=self.xapi.ref, task_id=self.ref)
        try:
            return http_request(endpoint, method, path, query, self.stall_timeout, content_length)
        except ExportFailed:
            reason = self.xapi.call("task.get_record", self.ref).get("error_info")
            if reason:
                raise ExportFailed("%s refused: %s" % (self.what, xapi_error_text(reason)))
            raise

    def finish(self):
        """Wait for the task; return its record; raise ExportFailed unless it succeeded."""
        record = self.wait()
        if record["status"] != "success":
            raise ExportFailed("%s failed: task %s: %s" % (
                self.what, record["status"], xapi_error_text(record.get("error_info"))))
        self.record = record
        return record

    @property
    def result(self):
        """The finished task's result as a Python value (e.g. the refs an import made)."""
        return xapi_value(self.record.get("result")) if self.record else None

    def wait(self):
        """Return the task's record once it has left `pending`; raise ExportFailed if it never does."""
        timeout = max(TASK_WAIT_MIN, self.stall_timeout)
        deadline = time.monotonic() + timeout
        delay = TASK_POLL_FIRST
        while True:
            record = self.xapi.call("task.get_record", self.ref)
            if record.get("status") not in ("pending", "cancelling"):
                return record
            if time.monotonic() > deadline:
                raise ExportFailed("%s: the task did not finish within %d seconds"
                                   % (self.what, timeout))
            time.sleep(delay)
            delay = min(delay * 2, TASK_POLL_MAX)

    def cancel(self):
        """Cancel the task if it still runs, best effort: the transfer is being abandoned."""
        try:
            if self.xapi.call("task.get_status", self.ref) == "pending":
                self.xapi.call("task.cancel", self.ref)
        except VmBackupError as exc:
            log.debug("task.cancel: %s", exc)

    def destroy(self):
        """Destroy the task, best effort (XAPI would keep it for an hour)."""
        try:
            self.xapi.call("task.destroy", self.ref)
        except VmBackupError as exc:
            log.debug("task.destroy: %s", exc)
