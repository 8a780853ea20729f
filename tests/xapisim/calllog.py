"""Call log: every XML-RPC call and every HTTP request a simulated pool served.

    pool.calls.methods()            # ['session.login_with_password', 'VM.get_all_records', ...]
    pool.calls.count("VM.snapshot")
    pool.calls.find("VM.snapshot")[0].args   # args without the session ref
    pool.calls.http                 # [HttpRequest(method='GET', path='/export', ...)]
    pool.calls.clear()
"""
import threading
import time


class RpcCall(object):
    __slots__ = ("method", "args", "host", "time", "status", "error", "transport", "encoding")

    def __init__(self, method, args, host, transport):
        self.method = method
        self.args = args
        self.host = host            # name_label of the host whose listener got the call
        self.time = time.time()
        self.status = None          # "Success" | "Failure" | "dropped" | "http <code>"
        self.error = None           # ErrorDescription on failure
        self.transport = transport  # "tcp" | "unix"
        self.encoding = "xmlrpc"    # "xmlrpc" | "jsonrpc"

    def __repr__(self):
        return "RpcCall(%r, %r, status=%r)" % (self.method, self.args, self.status)


class HttpRequest(object):
    __slots__ = ("method", "path", "query", "status", "host", "bytes_sent", "bytes_received",
                 "time", "ended", "task", "transport", "error")

    def __init__(self, method, path, query, host, transport):
        self.method = method
        self.path = path
        self.query = query          # dict of the query string (first value per key)
        self.status = None          # HTTP status code sent
        self.host = host
        self.bytes_sent = 0         # body bytes sent
        self.bytes_received = 0     # body bytes received
        self.time = time.time()
        self.ended = None           # when the handler returned (None: still running)
        self.task = None            # task ref the handler ran under
        self.transport = transport
        self.error = None           # why the body stopped early (a string), if it did

    def __repr__(self):
        return "HttpRequest(%r, %r, status=%r, sent=%d, received=%d)" % (
            self.method, self.path, self.status, self.bytes_sent, self.bytes_received)


class CallLog(object):
    def __init__(self):
        self._lock = threading.Lock()
        self.rpc = []
        self.http = []

    # -- recording (used by the server) -----------------------------------
    def record_rpc(self, method, params, host, transport="tcp"):
        if method.startswith("session.login") or method.startswith("Async.session"):
            args = list(params)
        else:
            args = list(params[1:])
        call = RpcCall(method, args, host, transport)
        with self._lock:
            self.rpc.append(call)
        return call

    def record_http(self, method, path, query, host, transport="tcp"):
        req = HttpRequest(method, path, query, host, transport)
        with self._lock:
            self.http.append(req)
        return req

    # -- reading (used by tests) -------------------------------------------
    def methods(self):
        """Names of all XML-RPC methods called, in order."""
        with self._lock:
            return [c.method for c in self.rpc]

    def count(self, method=None):
        """How many times ``method`` was called (all calls if None)."""
        with self._lock:
            if method is None:
                return len(self.rpc)
            return sum(1 for c in self.rpc if c.method == method)

    def counts(self):
        out = {}
        for m in self.methods():
            out[m] = out.get(m, 0) + 1
        return out

    def find(self, method):
        with self._lock:
            return [c for c in self.rpc if c.method == method]

    def requests(self, path=None, method=None):
        """HTTP requests, optionally only those for ``path`` (exact) / ``method``."""
        with self._lock:
            return [r for r in self.http
                    if (path is None or r.path == path) and (method is None or r.method == method)]

    def most_at_once(self, paths, key=None):
        """The most requests for ``paths`` (a tuple) that were being served at one time:
        in all, or (``key``: a function of the request, e.g. its host) per key value."""
        with self._lock:
            reqs = [r for r in self.http if r.path in paths and r.status != 302]
        edges = []
        for r in reqs:
            k = key(r) if key else None
            edges.append((r.time, 1, k))
            edges.append((r.ended or float("inf"), -1, k))
        now, best = {}, 0
        for _, step, k in sorted(edges, key=lambda e: (e[0], e[1])):
            now[k] = now.get(k, 0) + step
            best = max(best, now[k])
        return best

    def clear(self):
        with self._lock:
            del self.rpc[:]
            del self.http[:]

    def __iter__(self):
        with self._lock:
            return iter(list(self.rpc))

    def __len__(self):
        with self._lock:
            return len(self.rpc)
