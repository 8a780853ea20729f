"""Reports a watched backup needs, against the real servers and validators: the mail (a real
SMTP server, aiosmtpd, on 127.0.0.1: STARTTLS and implicit TLS with a self-signed
certificate that is verified, AUTH, a server that is down), syslog (a real datagram socket:
RFC 3164 framing and priorities), the log file and -q, and the Prometheus textfile
(`promtool check metrics`). Each report reads the run's one Outcome; a report that cannot
be made is one warning of the run and changes nothing else."""
import datetime
import email
import email.policy
import json
import os
import re
import socket
import subprocess
import threading

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

import vmbackup
from conftest import run_vmbackup

SMTP_USER, SMTP_PASSWORD = "backup", "s3cret-pässword"


# -- a real SMTP server ---------------------------------------------------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """Self-signed certificates: `good` names 127.0.0.1 and localhost, `wrong` another host."""
    folder = tmp_path_factory.mktemp("certs")
    made = {}
    for kind, san in (("good", "IP:127.0.0.1,DNS:localhost"), ("wrong", "DNS:mail.example.org")):
        crt, key = folder / (kind + ".crt"), folder / (kind + ".key")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=vmbackup test %s" % kind, "-addext", "subjectAltName=" + san,
                        "-keyout", str(key), "-out", str(crt)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        made[kind] = (str(crt), str(key))
    return made


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Inbox:
    """What the server received: envelopes, and the users who logged in."""

    def __init__(self):
        self.envelopes, self.logins = [], []

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append(envelope)
        return "250 OK"

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        ok = (auth_data.login.decode(), auth_data.password.decode()) == (SMTP_USER, SMTP_PASSWORD)
        if ok:
            self.logins.append(auth_data.login.decode())
        return AuthResult(success=ok, handled=False)

    @property
    def messages(self):
        return [email.message_from_bytes(e.original_content or e.content, policy=email.policy.default)
                for e in self.envelopes]


@pytest.fixture
def smtp(certs):
    """start(security, cert, auth) -> (Inbox, port): a real SMTP server on 127.0.0.1."""
    import ssl
    started = []

    def start(security="none", cert="good", auth=False):
        inbox, port = Inbox(), free_port()
        kwargs = {}
        if security != "none":
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*certs[cert])
            kwargs["ssl_context" if security == "ssl" else "tls_context"] = context
            if security == "starttls":
                kwargs["require_starttls"] = True
        if auth:
            kwargs.update(authenticator=inbox.authenticate, auth_require_tls=security != "none",
                          auth_required=True)
        controller = Controller(inbox, hostname="127.0.0.1", port=port, **kwargs)
        controller.start()
        started.append(controller)
        return inbox, port

    yield start
    for controller in started:
        controller.stop()


def mail_config(tmp_path, port, security="none", ca=None, auth=False, extra=""):
    """A config file with the mail settings (and no selector: the command line gives them)."""
    lines = ["mail_to=ops@example.org, Bäckup Team <team@example.org>",
             "mail_from=vmbackup@backup.example.org", "mail_on=always",
             "smtp_server=127.0.0.1", "smtp_port=%d" % port, "smtp_security=" + security,
             "smtp_timeout=10"]
    if ca:
        lines.append("smtp_ca_file=" + ca)
    if auth:
        pw = tmp_path / "smtp.pw"
        pw.write_text(SMTP_PASSWORD + "\n")
        pw.chmod(0o600)
        lines += ["smtp_username=" + SMTP_USER, "smtp_password_file=%s" % pw]
    path = tmp_path / "mail.cfg"
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return path


# -- a real syslog socket --------------------------------------------------------------

class SyslogSocket:
    """A datagram socket that keeps every packet it is sent (read in a thread, as a daemon does)."""

    def __init__(self, family, address):
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.address = address if family == socket.AF_UNIX else "127.0.0.1:%d" % \
            self.sock.getsockname()[1]
        self.sock.settimeout(0.2)
        self.packets, self.done = [], threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while not self.done.is_set():
            try:
                self.packets.append(self.sock.recv(65536))
            except socket.timeout:
                continue

    def stop(self):
        self.done.set()
        self.thread.join()
        self.sock.setblocking(False)
        while True:     # what is still queued
            try:
                self.packets.append(self.sock.recv(65536))
            except BlockingIOError:
                break
        self.sock.close()
        return self.packets


#: RFC 3164: <PRI>Mmm dd hh:mm:ss [HOSTNAME ]TAG[PID]: MSG
FRAME_RE = re.compile(r"^<(\d{1,3})>(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
                      r"([ 123]\d) (\d\d:\d\d:\d\d) (?:(\S+) )?vmbackup\[(\d+)\]: (.*)$", re.S)


def frames(packets):
    """Return [(facility, severity, hostname, message)] of RFC 3164 packets; fail on any other."""
    out = []
    for packet in packets:
        assert len(packet) <= 1024
        match = FRAME_RE.match(packet.decode("utf-8"))
        assert match, packet
        pri = int(match.group(1))
        out.append((pri // 8, pri % 8, match.group(5), match.group(7)))
    return out


# -- metrics ---------------------------------------------------------------------------

def promtool(path):
    proc = subprocess.run(["promtool", "check", "metrics"], stdin=open(str(path), "rb"),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.returncode == 0, proc.stdout.decode()
    return proc.stdout.decode()


SAMPLE_RE = re.compile(r'^([a-z_]+)(?:\{(.*)\})? (\S+)$')
LABEL_RE = re.compile(r'([a-z_]+)="((?:[^"\\]|\\.)*)"')


def unescape(value):
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def samples(path):
    """Return {(name, frozenset(labels)): value} of a textfile."""
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            continue
        name, labels, value = SAMPLE_RE.match(line).groups()
        pairs = frozenset((k, unescape(v)) for k, v in LABEL_RE.findall(labels or ""))
        found[(name, pairs)] = float(value)
    return found


def value(found, name, **labels):
    """Return the one sample of `name` whose labels include `labels`."""
    hits = [v for (n, pairs), v in found.items()
            if n == name and set(labels.items()) <= set(pairs)]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


# -- the three runs of "Done when", over both transports ---------------------------------

def ok(pool):
    return ["-e", "PRD-print7"], "PRD-print7"


def vm_warning(pool):   # an export dropped once, retried: the VM succeeds with a warning
    pool.faults.drop_export(after_bytes=100000, times=1, path="/export")
    return ["-e", "db01", "--retries", "1"], "db01"


def vm_failure(pool):
    pool.faults.drop_export(after_bytes=100000, times=10, path="/export")
    return ["-e", "db01"], "db01"


RUNS = [(ok, 0, "SUCCESS", "S:1 W:0 E:0", "success"),
        (vm_warning, 1, "WARNING", "S:1 W:1 E:0", "warning"),
        (vm_failure, 2, "ERROR", "S:0 W:0 E:1", "error")]


@pytest.mark.parametrize("event, code, word, counts, status", RUNS, ids=[r[0].__name__ for r in RUNS])
def test_mail_syslog_metrics_and_log_file_of_a_run(sim_pool, transport, backup_dir, tmp_path, smtp,
                                                    certs, event, code, word, counts, status):
    inbox, port = smtp("starttls", auth=True)
    syslog = SyslogSocket(socket.AF_UNIX, str(tmp_path / "log"))
    metrics, log_file = tmp_path / "vmbackup.prom", tmp_path / "vmbackup.log"
    config = mail_config(tmp_path, port, "starttls", ca=certs["good"][0], auth=True,
                         extra="syslog=1\nsyslog_address=%s\nsyslog_facility=local3\n"
                               "metrics_file=%s\nlog_file=%s\n" % (syslog.address, metrics,
                                                                   log_file))
    args, vm = event(sim_pool)
    out = run_vmbackup("-c", config, *transport(sim_pool), "-d", backup_dir, "--json",
                       tmp_path / "run.json", *args, exit_code=code)
    packets = syslog.stop()
    assert "done: %s, exit %d" % (counts, code) in out

    # the mail: STARTTLS with the certificate verified against smtp_ca_file, AUTH, both recipients
    (envelope,), (msg,) = inbox.envelopes, inbox.messages
    assert inbox.logins == [SMTP_USER]
    assert envelope.rcpt_tos == ["ops@example.org", "team@example.org"]
    assert msg["Subject"] == "[vmbackup] %s demo-pool: %s" % (word, counts)
    body = msg.get_content()
    row = next(l for l in body.splitlines() if l.startswith(vm + " "))
    assert row.split()[:3] == [vm, "vm-export", status]
    assert "Space left in backup_dir %s: " % backup_dir in body
    assert "vmbackup.py list -d %s" % backup_dir in body and "less %s" % log_file in body
    data = json.loads((tmp_path / "run.json").read_text())
    for problem in data["problems"]:
        assert "%s %s: %s" % ("FAILED" if problem["severity"] == "error" else "WARNING",
                              problem["unit"], problem["message"]) in body
    if status == "error":   # what failed, with its own log lines
        failed = body[body.index("FAILED db01: "):]
        assert re.search(r"\n    \S+ \S+ ERROR vm=db01: FAILED: ", failed)
    else:
        assert "FAILED" not in body

    # syslog: every line framed as RFC 3164, facility local3, severities as logged
    got = frames(packets)
    assert {f for f, _, _, _ in got} == {19} and {h for _, _, h, _ in got} == {None}
    by_text = {m: sev for _, sev, _, m in got}
    assert by_text["done: %s, exit %d" % (counts, code)] == 6
    recaps = [sev for text, sev in by_text.items() if text.startswith("recap: ")]
    assert recaps == ([4] if status == "warning" else [3] if status == "error" else [])
    assert any(text.startswith("mailed the report to ops@example.org") for text in by_text)

    # the log file: the lines stderr showed, in the same format
    logged = log_file.read_text(encoding="utf-8").splitlines()
    assert logged and all(line in out for line in logged)
    assert any(line.endswith("INFO done: %s, exit %d" % (counts, code)) for line in logged)

    # the metrics file: valid for promtool, and what the Outcome says
    promtool(metrics)
    found = samples(metrics)
    assert value(found, "vmbackup_last_run_exit_code") == code
    s, w, e = (int(n) for n in re.findall(r"\d+", counts))
    assert (value(found, "vmbackup_last_run_succeeded"), value(found, "vmbackup_last_run_warnings"),
            value(found, "vmbackup_last_run_errors")) == (s, w, e)
    assert value(found, "vmbackup_vm_last_run_status", vm=vm) == {"success": 0, "warning": 1,
                                                                  "error": 2}[status]
    last = value(found, "vmbackup_vm_last_success_timestamp_seconds", vm=vm, mode="vm-export")
    kept = value(found, "vmbackup_vm_backups_kept", vm=vm)
    if status == "error":
        assert (last, kept) == (0, 0)
    else:
        assert (kept, value(found, "vmbackup_vm_last_run_size_bytes", vm=vm)) == (1, data["vms"][0]["bytes"])
        assert value(found, "vmbackup_last_run_start_timestamp_seconds") <= last \
            <= value(found, "vmbackup_last_run_end_timestamp_seconds") + 1
    assert not [n for n in os.listdir(str(tmp_path)) if n.endswith(".part")]


def test_last_success_survives_a_run_in_which_the_vm_failed(sim_pool, api, backup_dir, tmp_path):
    metrics = tmp_path / "vmbackup.prom"
    args = api(sim_pool) + ["-d", backup_dir, "--metrics-file", metrics, "-e", "db01"]
    run_vmbackup(*args)
    first = samples(metrics)
    good = value(first, "vmbackup_vm_last_success_timestamp_seconds", vm="db01")
    size = value(first, "vmbackup_vm_last_success_size_bytes", vm="db01")
    (folder,) = os.listdir(str(backup_dir / "db01"))
    assert good == pytest.approx(datetime.datetime.strptime(
        json.loads((backup_dir / "db01" / folder / "backup.json").read_text())["finished"],
        "%Y-%m-%dT%H:%M:%S.%f").timestamp(), abs=0.01)
    metrics.unlink()    # read from the backup folders, not from the last metrics file
    sim_pool.faults.drop_export(after_bytes=100000, times=10, path="/export")
    run_vmbackup(*args, exit_code=2)
    second = samples(metrics)
    promtool(metrics)
    assert value(second, "vmbackup_vm_last_run_status", vm="db01") == 2
    assert value(second, "vmbackup_vm_last_success_timestamp_seconds", vm="db01") == good
    assert value(second, "vmbackup_vm_last_success_size_bytes", vm="db01") == size
    assert value(second, "vmbackup_vm_backups_kept", vm="db01") == 1
    assert value(second, "vmbackup_last_run_exit_code") == 2


HOSTILE = ["quote's \"double\"", "new\nline", "web/slash\\back", "ünïcødé VM 日本語 ✓",
           "$(touch pwned)"]


def test_metrics_of_hostile_names_pool_db_and_hosts_pass_promtool(sim_pool, api, backup_dir,
                                                                   tmp_path):
    import re as regex
    metrics = tmp_path / "vmbackup.prom"
    selectors = [a for name in HOSTILE for a in ("-e", regex.escape(name) + "$")]
    run_vmbackup(*api(sim_pool), "-d", backup_dir, "--metrics-file", metrics, "--pool-db-backup",
                 "--host-backup", *selectors)
    promtool(metrics)
    found = samples(metrics)
    for name in HOSTILE:
        assert value(found, "vmbackup_vm_last_run_status", vm=name) == 0
        assert value(found, "vmbackup_vm_backups_kept", vm=name) == 1
    for unit in ["pool database"] + ["host backup of %s" % h for h in ("xcp-ng-a", "xcp-ng-b",
                                                                      "xcp-ng-c")]:
        assert value(found, "vmbackup_pool_backup_last_run_status", unit=unit) == 0
        assert value(found, "vmbackup_pool_backup_kept", unit=unit) == 1
        assert value(found, "vmbackup_pool_backup_last_success_timestamp_seconds", unit=unit) > 0
    assert oct(os.stat(str(metrics)).st_mode & 0o777) == oct(0o644)


def test_a_run_that_cannot_start_still_mails_and_writes_its_metrics(tmp_path, smtp):
    inbox, port = smtp()
    config = mail_config(tmp_path, port)
    metrics = tmp_path / "vmbackup.prom"
    out = run_vmbackup("-c", config, "-e", "web01", "-d", tmp_path / "missing", "--server",
                       "http://127.0.0.1:9/", "--metrics-file", metrics, exit_code=2)
    assert "backup_dir=" in out
    (msg,) = inbox.messages
    assert msg["Subject"] == "[vmbackup] ERROR 127.0.0.1:9: S:0 W:0 E:1"
    assert "The run did not start: backup_dir=%s" % (tmp_path / "missing") in msg.get_content()
    promtool(metrics)
    found = samples(metrics)
    assert value(found, "vmbackup_last_run_exit_code") == 2
    assert value(found, "vmbackup_last_run_errors") == 1
    assert not [n for (n, _) in found if n.startswith("vmbackup_vm_")]


def test_a_password_file_others_can_read_stops_the_run_and_still_reports(tmp_path, smtp):
    """Its settings were read: the mail, the metrics file and the log file say why."""
    inbox, port = smtp()
    pw, metrics, log_file = tmp_path / "xapi.pw", tmp_path / "vmbackup.prom", tmp_path / "v.log"
    pw.write_text("secret\n")
    pw.chmod(0o644)
    out = run_vmbackup("-c", mail_config(tmp_path, port), "-e", "web01", "-d", tmp_path, "-q",
                       "--server", "http://127.0.0.1:9/", "--password-file", pw,
                       "--metrics-file", metrics, "--log-file", log_file, exit_code=2)
    reason = "password file %s is readable by other users (mode 644); run: chmod 600 %s" % (pw, pw)
    assert out == "vmbackup.py: error: %s\n" % reason
    (msg,) = inbox.messages
    assert msg["Subject"] == "[vmbackup] ERROR 127.0.0.1:9: S:0 W:0 E:1"
    assert reason in msg.get_content()
    assert value(samples(metrics), "vmbackup_last_run_exit_code") == 2
    assert log_file.read_text().splitlines()[-1].endswith(" ERROR " + reason)


# -- a mail that cannot be sent: one warning, nothing else changes ------------------------

def warned_run(sim_pool, api, backup_dir, tmp_path, config, code=1):
    """Back up PRD-print7 (which succeeds) with `config`'s mail settings; return the output."""
    status_log, metrics = tmp_path / "status.log", tmp_path / "vmbackup.prom"
    out = run_vmbackup("-c", config, *api(sim_pool), "-d", backup_dir, "-e", "PRD-print7",
                       "--status-log", status_log, "--metrics-file", metrics,
                       "--json", tmp_path / "run.json", exit_code=code)
    (folder,) = os.listdir(str(backup_dir / "PRD-print7"))
    assert "success" in os.listdir(str(backup_dir / "PRD-print7" / folder))   # the backup stands
    assert status_log.read_text().splitlines()[-1].endswith(",end,WARNING,S:1 W:1 E:0")
    assert value(samples(metrics), "vmbackup_last_run_warnings") == 1
    (warning,) = json.loads((tmp_path / "run.json").read_text())["warnings"]
    assert "WARNING recap: WARNING (run): " + warning in out
    return warning


def test_a_server_that_is_down_is_a_warning_after_three_tries(sim_pool, api, backup_dir, tmp_path,
                                                             monkeypatch):
    monkeypatch.setattr(vmbackup, "MAIL_RETRY_DELAY", 0)
    port = free_port()
    warning = warned_run(sim_pool, api, backup_dir, tmp_path, mail_config(tmp_path, port))
    assert warning.startswith("mail to ops@example.org, Bäckup Team <team@example.org> not sent: "
                              "127.0.0.1:%d (smtp_security=none): " % port)
    assert warning.endswith("(try 3 of 3)")


@pytest.mark.parametrize("ca", ["wrong", None], ids=["certificate-for-another-name", "no-ca-file"])
def test_a_certificate_that_does_not_match_is_refused(sim_pool, api, backup_dir, tmp_path, smtp,
                                                      certs, ca):
    inbox, port = smtp("starttls", cert="wrong" if ca else "good")
    config = mail_config(tmp_path, port, "starttls", ca=certs[ca][0] if ca else None)
    warning = warned_run(sim_pool, api, backup_dir, tmp_path, config)
    assert "TLS certificate refused" in warning and warning.endswith("(try 1 of 3)")
    assert inbox.envelopes == []


def test_a_wrong_smtp_password_is_a_warning(sim_pool, api, backup_dir, tmp_path, smtp, certs):
    inbox, port = smtp("starttls", auth=True)
    config = mail_config(tmp_path, port, "starttls", ca=certs["good"][0], auth=True)
    (tmp_path / "smtp.pw").write_text("not the password\n")
    warning = warned_run(sim_pool, api, backup_dir, tmp_path, config)
    assert "login as backup refused: 535" in warning and inbox.envelopes == []


def test_an_exposed_smtp_password_file_is_not_used(sim_pool, api, backup_dir, tmp_path, smtp, certs):
    inbox, port = smtp("starttls", auth=True)
    config = mail_config(tmp_path, port, "starttls", ca=certs["good"][0], auth=True)
    (tmp_path / "smtp.pw").chmod(0o644)
    warning = warned_run(sim_pool, api, backup_dir, tmp_path, config)
    assert "password file %s is readable by other users" % (tmp_path / "smtp.pw") in warning
    assert inbox.envelopes == []


def test_no_password_is_sent_unencrypted_to_another_host(tmp_path):
    config = vmbackup.build_config(None, {"mail_to": ("a@example.org",), "smtp_server": "mail.example.org",
                                          "smtp_username": "u", "smtp_password_file": "/nonexistent"})
    with pytest.raises(vmbackup.MailFailed, match="not sending the SMTP password unencrypted"):
        vmbackup.send_mail(config, vmbackup.build_mail(config, "s", "b"))


@pytest.mark.parametrize("mail_on, code", [("always", 1), ("error", 0)], ids=["mailed", "not-mailed"])
def test_the_preview_warns_of_mail_settings_the_run_would_refuse(sim_pool, api, backup_dir,
                                                                 tmp_path, mail_on, code):
    """The SMTP password would cross the network in clear: the run warns when it mails."""
    cfg = write(tmp_path / "m.cfg", "mail_to=a@example.org\nsmtp_server=mail.example.org\n"
                                    "smtp_username=u\nmail_on=%s\n" % mail_on)
    args = api(sim_pool) + ["-c", cfg, "-d", backup_dir, "-e", "PRD-print7"]
    preview = run_vmbackup(*args, "--preview", "--json", tmp_path / "preview.json", exit_code=code)
    run_vmbackup(*args, "--json", tmp_path / "run.json", exit_code=code)
    warnings = json.loads((tmp_path / "run.json").read_text())["warnings"]
    assert json.loads((tmp_path / "preview.json").read_text())["warnings"] == warnings
    assert ("not sending the SMTP password unencrypted to mail.example.org" in preview) == (code == 1)


# -- implicit TLS, non-ASCII names -------------------------------------------------------

def test_ssl_and_non_ascii_names_in_subject_and_body(transport, backup_dir, tmp_path, smtp, certs):
    from xapisim import pools, start_pool
    vm = "ünïcødé VM 日本語 ✓"
    desc = pools.simple_pool(vms=["ok-vm", {"name": vm, "blocked_operations": {"export": "admin"}}],
                             name="pööl ✓ 本番")
    inbox, port = smtp("ssl")
    config = mail_config(tmp_path, port, "ssl", ca=certs["good"][0])
    with start_pool(desc) as pool:
        run_vmbackup("-c", config, *transport(pool), "-d", backup_dir, "-e", "ok-vm", "-e", vm,
                     exit_code=2)
    (msg,) = inbox.messages
    assert msg["Subject"] == "[vmbackup] ERROR pööl ✓ 本番: S:1 W:0 E:1"
    body = msg.get_content()
    (row,) = [l for l in body.splitlines() if l.startswith(vm + " ")]
    assert row[len(vm):].split()[:2] == ["vm-export", "error"]
    assert "FAILED %s: " % vm in body and "vm=%s: " % vm in body


@pytest.mark.parametrize("mail_on, code, sent", [
    ("error", 0, False), ("error", 1, False), ("error", 2, True),
    ("warning", 0, False), ("warning", 1, True), ("warning", 2, True),
    ("always", 0, True), ("always", 1, True), ("always", 2, True),
], ids=lambda v: str(v))
def test_mail_on(mail_on, code, sent):
    assert vmbackup.mail_wanted(mail_on, code) is sent


def test_mail_on_error_sends_nothing_for_a_good_run(sim_pool, api, backup_dir, tmp_path, smtp):
    inbox, port = smtp()
    config = mail_config(tmp_path, port)
    config.write_text(config.read_text().replace("mail_on=always", "mail_on=error"))
    run_vmbackup("-c", config, *api(sim_pool), "-d", backup_dir, "-e", "PRD-print7")
    assert inbox.envelopes == []


def test_test_mail_sends_one_message(tmp_path, smtp, certs):
    inbox, port = smtp("starttls", auth=True)
    config = mail_config(tmp_path, port, "starttls", ca=certs["good"][0], auth=True)
    out = run_vmbackup("--test-mail", "-c", config, fork=True)
    (msg,) = inbox.messages
    assert msg["Subject"] == "[vmbackup] TEST %s: mail settings work" % socket.gethostname()
    assert "smtp_server:   127.0.0.1:%d" % port in msg.get_content()
    assert "test mail sent to ops@example.org" in out


def test_test_mail_to_a_server_that_is_down_exits_2(tmp_path, monkeypatch):
    monkeypatch.setattr(vmbackup, "MAIL_RETRY_DELAY", 0)
    config = mail_config(tmp_path, free_port())
    out = run_vmbackup("--test-mail", "-c", config, exit_code=2)
    assert "vmbackup.py: error: mail to ops@example.org" in out and "(try 3 of 3)" in out


# -- logs: -q, --log-file, syslog --------------------------------------------------------

@pytest.mark.parametrize("event, code", [(ok, 0), (vm_warning, 1), (vm_failure, 2)],
                         ids=["ok", "vm_warning", "vm_failure"])
def test_quiet_prints_only_warnings_and_errors(sim_pool, api, backup_dir, tmp_path, event, code):
    args, _ = event(sim_pool)
    log_file = tmp_path / "vmbackup.log"
    out = run_vmbackup("-q", *api(sim_pool), "-d", backup_dir, "--log-file", log_file, *args,
                       exit_code=code, fork=True)
    lines = out.splitlines()
    assert all(re.match(r"^\S+ \S+ (WARNING|ERROR) ", l) for l in lines), out
    assert bool(lines) == (code != 0)     # cron mails only when something is wrong
    logged = log_file.read_text().splitlines()
    assert all(l in logged for l in lines)   # -q quiets the terminal, not the log file
    assert any(l.endswith("INFO done: %s" % l.split("done: ")[-1]) for l in logged if "done: " in l)


def test_log_file_is_appended(sim_pool, api, backup_dir, tmp_path):
    log_file = tmp_path / "vmbackup.log"
    log_file.write_text("an older line\n")
    for _ in range(2):
        run_vmbackup(*api(sim_pool), "-d", backup_dir, "--log-file", log_file, "-e", "PRD-print7")
    text = log_file.read_text()
    assert text.startswith("an older line\n") and text.count("INFO done: S:1 W:0 E:0, exit 0") == 2


def test_the_log_file_says_why_a_run_could_not_start(sim_pool, api, tmp_path):
    """The cron form (-q --log-file): the file has the error line stderr shows, not just the mail."""
    log_file, missing = tmp_path / "vmbackup.log", tmp_path / "not-mounted"
    out = run_vmbackup("-q", *api(sim_pool), "-d", missing, "--log-file", log_file, "-e", "PRD-print7",
                       exit_code=2)
    reason = "backup_dir=%s (command line): the folder does not exist" % missing
    assert out == "vmbackup.py: error: %s\n" % reason
    (line,) = log_file.read_text().splitlines()
    assert line.endswith(" ERROR " + reason)


def test_syslog_over_udp_names_the_host(sim_pool, api, backup_dir, tmp_path):
    syslog = SyslogSocket(socket.AF_INET, ("127.0.0.1", 0))
    run_vmbackup(*api(sim_pool), "-d", backup_dir, "-e", "PRD-print7", "--syslog", "-c",
                 write(tmp_path / "s.cfg", "syslog_address=%s\n" % syslog.address))
    got = frames(syslog.stop())
    assert got and {(f, h) for f, _, h, _ in got} == {(1, socket.gethostname().split(".")[0])}
    assert any(m == "done: S:1 W:0 E:0, exit 0" and sev == 6 for _, sev, _, m in got)


def write(path, text):
    path.write_text(text)
    return path


def test_syslog_that_cannot_be_reached_is_a_warning(sim_pool, api, backup_dir, tmp_path):
    out = run_vmbackup(*api(sim_pool), "-d", backup_dir, "-e", "PRD-print7", "--syslog", "-c",
                       write(tmp_path / "s.cfg", "syslog_address=%s\n" % (tmp_path / "nolog")),
                       exit_code=1)
    assert "WARNING recap: WARNING (run): cannot send to syslog at %s" % (tmp_path / "nolog") in out


@pytest.mark.parametrize("levelno, facility, text, expected", [
    (40, "user", "x", b"<11>Dec  6 09:05:01 vmbackup[42]: x"),
    (30, "daemon", "w", b"<28>Dec  6 09:05:01 vmbackup[42]: w"),
    (20, "local0", "i", b"<134>Dec  6 09:05:01 vmbackup[42]: i"),
    (10, "local7", "d", b"<191>Dec  6 09:05:01 vmbackup[42]: d"),
    (20, "user", "é" * 600, ("<14>Dec  6 09:05:01 vmbackup[42]: " + "é" * 495).encode()),
], ids=["error", "warning-daemon", "info-local0", "debug-local7", "cut-at-1024-bytes"])
def test_syslog_frame(levelno, facility, text, expected):
    frame = vmbackup.syslog_frame(facility, levelno, datetime.datetime(2026, 12, 6, 9, 5, 1), text, 42)
    assert frame == expected and len(frame) <= 1024


@pytest.mark.parametrize("raw, escaped", [
    ("web01", "web01"), ('quote\'s "double"', 'quote\'s \\"double\\"'),
    ("new\nline", "new\\nline"), ("back\\slash", "back\\\\slash"), ("ünï ✓", "ünï ✓"),
], ids=["plain", "quotes", "newline", "backslash", "unicode"])
def test_escape_label(raw, escaped):
    assert vmbackup.escape_label(raw) == escaped


@pytest.mark.parametrize("option, message", [
    ("--metrics-file", "cannot write metrics_file %s: No such file or directory"),
    ("--log-file", "cannot append to log_file %s: No such file or directory"),
], ids=["metrics-file", "log-file"])
def test_a_report_file_that_cannot_be_written_is_a_warning(sim_pool, api, backup_dir, tmp_path,
                                                          option, message):
    target = tmp_path / "no-such-folder" / "file"
    out = run_vmbackup(*api(sim_pool), "-d", backup_dir, "-e", "PRD-print7", option, target,
                       "--json", tmp_path / "run.json", exit_code=1)
    assert json.loads((tmp_path / "run.json").read_text())["warnings"] == [message % target]
    assert "WARNING recap: WARNING (run): " + message % target in out
    (folder,) = os.listdir(str(backup_dir / "PRD-print7"))
    assert "success" in os.listdir(str(backup_dir / "PRD-print7" / folder))


def test_the_mail_counts_a_metrics_file_that_cannot_be_written(sim_pool, api, backup_dir, tmp_path,
                                                               smtp):
    """The run exits 1 for it: the mail says so too (with mail_on=warning it is sent at all)."""
    inbox, port = smtp()
    config = mail_config(tmp_path, port, extra="mail_on=warning\n")
    target = tmp_path / "no-such-folder" / "vmbackup.prom"
    run_vmbackup("-c", config, *api(sim_pool), "-d", backup_dir, "-e", "PRD-print7",
                 "--metrics-file", target, exit_code=1)
    (msg,) = inbox.messages
    assert msg["Subject"] == "[vmbackup] WARNING demo-pool: S:1 W:1 E:0"
    assert "cannot write metrics_file %s" % target in msg.get_content()


def test_metrics_count_a_mail_that_cannot_be_sent(sim_pool, api, backup_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(vmbackup, "MAIL_RETRY_DELAY", 0)
    metrics = tmp_path / "vmbackup.prom"
    run_vmbackup("-c", mail_config(tmp_path, free_port()), *api(sim_pool), "-d", backup_dir,
                 "-e", "PRD-print7", "--metrics-file", metrics, exit_code=1)
    assert value(samples(metrics), "vmbackup_last_run_warnings") == 1
    assert value(samples(metrics), "vmbackup_last_run_exit_code") == 1


def test_the_preview_warns_of_report_files_and_sockets_the_run_cannot_use(sim_pool, api, backup_dir,
                                                                          tmp_path):
    """The preview exits 1 as the run would, with the run's own words; it creates nothing."""
    missing = tmp_path / "no-such-folder"
    args = api(sim_pool) + ["-d", backup_dir, "-e", "PRD-print7", "--metrics-file",
                            missing / "vmbackup.prom", "--log-file", missing / "vmbackup.log",
                            "-c", write(tmp_path / "s.cfg", "syslog=1\nsyslog_address=%s\n"
                                        % (missing / "log"))]
    preview = run_vmbackup(*args, "--preview", "--json", tmp_path / "preview.json", exit_code=1)
    assert "Preview: the run would end with warnings (exit 1, S:1 W:3 E:0)" in preview
    run_vmbackup(*args, "--json", tmp_path / "run.json", exit_code=1)
    warnings = json.loads((tmp_path / "run.json").read_text())["warnings"]
    assert sorted(json.loads((tmp_path / "preview.json").read_text())["warnings"]) == sorted(warnings)
    assert not missing.exists()


def test_reports_on_python36(sim_pool, backup_dir, tmp_path, smtp, certs):
    """dom0's Python 3.6 (XCP-ng 8.3, XenServer 8): smtplib, ssl and email as 3.6 has them."""
    from test_python36 import PY36
    if PY36 is None:
        pytest.skip("no Python 3.6 interpreter on this machine")
    import shutil
    import XenAPI
    lib = tmp_path / "lib36"
    shutil.copytree(os.path.dirname(XenAPI.__file__), str(lib / "XenAPI"))
    inbox, port = smtp("starttls", auth=True)
    syslog = SyslogSocket(socket.AF_UNIX, str(tmp_path / "log"))
    metrics = tmp_path / "vmbackup.prom"
    config = mail_config(tmp_path, port, "starttls", ca=certs["good"][0], auth=True,
                         extra="syslog=1\nsyslog_address=%s\nmetrics_file=%s\n"
                               % (syslog.address, metrics))
    pw = tmp_path / "pw"
    pw.write_text(sim_pool.password + "\n")
    pw.chmod(0o600)
    env = dict(os.environ, PYTHONPATH=str(lib))
    env.pop("PYTHONHOME", None)
    for args in (["--test-mail", "-c", config],
                 ["-c", config, "--server", sim_pool.url, "--password-file", pw, "--transport",
                  "api", "-d", backup_dir, "-e", "PRD-print7", "-q"]):
        proc = subprocess.run([PY36, vmbackup.__file__] + [str(a) for a in args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True, timeout=300)
        assert proc.returncode == 0, proc.stdout
    assert [str(m["Subject"]).split()[1:2] for m in inbox.messages] == [["TEST"], ["SUCCESS"]], \
        [e.original_content[:600] for e in inbox.envelopes]
    assert inbox.logins == [SMTP_USER, SMTP_USER]     # the non-ASCII password, as UTF-8
    promtool(metrics)
    assert any(m == "done: S:1 W:0 E:0, exit 0" for _, _, _, m in frames(syslog.stop()))


def P(severity, unit, message="m"):
    return vmbackup.RunProblem(severity, unit, message)


@pytest.mark.parametrize("problems, groups", [
    ([P("warning", "a"), P("error", "a")], [("a", 2)]),
    ([P("warning", "a"), P("error", "b"), P("error", "")], [("b", 1), ("", 1), ("a", 1)]),
    ([P("warning", ""), P("warning", "")], [("", 1), ("", 1)]),
    ([P("warning", "a"), P("warning", "b"), P("error", "c")], [("c", 1), ("a", 1), ("b", 1)]),
], ids=["one-unit-warned-then-failed", "failures-first", "run-problems-apart", "order-kept-within"])
def test_the_mail_groups_problems_by_unit_failures_first(problems, groups):
    assert [(u, len(found)) for u, found in vmbackup.problem_groups(problems)] == groups


def test_credentials_in_a_refused_server_url_stay_out_of_the_mail(tmp_path, smtp):
    inbox, port = smtp()
    out = run_vmbackup("-c", mail_config(tmp_path, port), "-e", "web01", "-d", tmp_path,
                       "--server", "http://root:s3cret@127.0.0.1:9/", exit_code=2)
    (msg,) = inbox.messages
    assert msg["Subject"] == "[vmbackup] ERROR 127.0.0.1:9: S:0 W:0 E:1"
    assert "s3cret" not in out and "s3cret" not in msg.as_string()


@pytest.mark.parametrize("config_file, expected", [
    ("/etc/vmbackup/week end.cfg",
     ["  vmbackup.py list -d '/srv/my backups'",
      "  vmbackup.py -c '/etc/vmbackup/week end.cfg' --preview", "  less '/var/log/vm backup.log'"]),
    (None, ["  vmbackup.py list -d '/srv/my backups'"]),
], ids=["config-file", "command-line-run"])
def test_the_mails_commands_work_when_pasted(config_file, expected):
    """Paths are shell-quoted; a command-line run's preview would need its own arguments."""
    config = vmbackup.build_config(None, {"backup_dir": "/srv/my backups",
                                          "log_file": "/var/log/vm backup.log"}, (), config_file)
    body = vmbackup.mail_body(config, vmbackup.RunRecord().outcome(), "p", [], None)
    commands = body.split("To see more:\n", 1)[1].splitlines()
    assert set(expected) <= set(commands)
    assert [c for c in commands if "--preview" in c] == [c for c in expected if "--preview" in c]


@pytest.mark.parametrize("server, record_pool, expected", [
    ("https://pool-master.example.org/", None, "pool-master.example.org"),
    ("http://127.0.0.1:8080", None, "127.0.0.1:8080"),
    ("unix:/var/lib/xcp/xapi", None, socket.gethostname()),
    (None, None, socket.gethostname()),
    ("https://pool-master.example.org", "demo-pool", "demo-pool"),
    ("http://root:xenroot@127.0.0.1:8080/", None, "127.0.0.1:8080"),
], ids=["https", "http-port", "local-socket", "this-host", "pool-read", "refused-credentials"])
def test_the_subject_names_the_pool(server, record_pool, expected):
    config = vmbackup.build_config(None, {"server": server})
    assert vmbackup.pool_name(config, record_pool) == expected


@pytest.mark.parametrize("text, columns", [
    ("web01", 5), ("日本語", 6), ("ünïcødé VM 日本語 ✓", 19), ("e\u0301", 1), ("", 0),
], ids=["ascii", "wide", "mixed", "combining", "empty"])
def test_display_width(text, columns):
    assert vmbackup.display_width(text) == columns


def test_mail_table_columns_line_up_for_wide_names():
    """A VM named in CJK characters must not push its row's columns out of line."""
    record = vmbackup.RunRecord()
    for name in ("web01", "ünïcødé VM 日本語 ✓", "数据库服务器" * 5):
        record.results.append(vmbackup.VmResult(name, "", "vm-export", "success", bytes=2 << 20))
    lines = vmbackup.summary_table(record.outcome())
    starts = {vmbackup.display_width(line[:line.index("vm-export" if "vm-export" in line else "MODE")])
              for line in lines}
    assert len(starts) == 1, lines
    assert any(line.startswith("数据库") and "\u2026" in line for line in lines)
