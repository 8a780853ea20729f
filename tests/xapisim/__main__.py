"""Run the demo pool in the foreground:  python3 tests/xapisim [--port N] [--tls]
(or ``python3 -m xapisim`` with tests/ on sys.path).  Ctrl-C stops it."""
import argparse
import json
import os
import signal
import sys
import threading

if not __package__:  # run as "python tests/xapisim"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import xapisim  # noqa: E402
from xapisim import pools  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python3 tests/xapisim",
                                 description="Run a simulated XenServer/XCP-ng pool in the foreground.")
    ap.add_argument("--port", type=int, default=0, help="TCP port for every host (default: a free one)")
    ap.add_argument("--tls", action="store_true", help="HTTPS with a self-signed certificate")
    ap.add_argument("--description", metavar="FILE.json",
                    help="a pool description (JSON, see pools.py); default: the demo pool")
    ap.add_argument("--release", choices=sorted(pools.RELEASES), help="pretend to be this release")
    ap.add_argument("--keepalive", type=float, default=5.0,
                    help="seconds between XVA keep-alive chunks on slow exports (default 5)")
    ap.add_argument("--auth-delay", type=float, default=5.0,
                    help="seconds before answering a wrong password (xapi: ~5, the default)")
    ap.add_argument("--no-socket", action="store_true", help="no unix socket")
    ap.add_argument("--verbose", "-v", action="store_true", help="log every HTTP request")
    args = ap.parse_args(argv)
    desc = None
    if args.description:
        with open(args.description) as f:
            desc = json.load(f)
    if args.release:
        desc = desc or pools.demo_pool()
        desc["release"] = args.release
    pool = xapisim.start_pool(desc, tls=args.tls, unix_socket=not args.no_socket,
                              keepalive=args.keepalive, port=args.port, verbose=args.verbose,
                              auth_failure_delay=args.auth_delay)
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    pwfile = os.path.join(os.environ.get("TMPDIR", "/tmp"), "xapisim-password")
    out = sys.stdout
    out.write("xapisim: simulated pool %r (%s %s, xapi %s) is running\n" % (
        pool.db.pool()["name_label"], pool.release["product_brand"], pool.release["product_version"],
        pool.release["xapi"]))
    out.write("  URL:       %s\n" % pool.url)
    for name, url in sorted(pool.host_urls.items()):
        out.write("  host %-10s %s\n" % (name + ":", url))
    out.write("  user:      %s\n  password:  %s\n" % (pool.user, pool.password))
    if pool.socket_path:
        out.write("  socket:    %s  (pre-authenticated, like dom0's /var/lib/xcp/xapi)\n" % pool.socket_path)
    if pool.cert_path:
        out.write("  cert:      %s\n  sha256:    %s\n" % (pool.cert_path, pool.cert_sha256))
    out.write("\nTry:\n")
    out.write("  XAPISIM_URL=%s XAPISIM_PASSWORD=%s %s vm-list params=name-label --minimal\n"
              % (pool.url, pool.password, pool.xe_path))
    # works as printed: a 0600 password file, an existing folder, this (venv's) Python, a selector
    pin = " --tls-fingerprint %s" % pool.cert_sha256 if pool.cert_path else ""
    out.write("  (umask 077; rm -f %s; echo %s > %s); mkdir -p /tmp/demo-backups; %s %s --server %s "
              "--password-file %s%s -d /tmp/demo-backups -e '.*' --preview\n"
              % (pwfile, pool.password, pwfile, sys.executable, os.path.join(root, "vmbackup.py"),
                 pool.url, pwfile, pin))
    out.write("  curl -s '%spool/xmldbdump' -u %s:%s | head -c 300\n" % (pool.url, pool.user, pool.password))
    out.write("Ctrl-C stops it.\n")
    out.flush()
    done = threading.Event()

    def stop(*_):
        done.set()

    signal.signal(signal.SIGTERM, stop)
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        pool.stop()
        out.write("\nxapisim: stopped\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
