"""The run's reports to the outside: the mail, the metrics file, and what the log sinks met.

Owns: mail_wanted, mail_subject, mail_body (pure readers of an Outcome), build_mail,
send_mail (SMTP with none/starttls/ssl, AUTH, retries), MailFailed, test_mail,
send_reports (what run.report_run calls: each report that cannot be made is a warning
of the run, never a crash and never a lost backup), report_problems (the preview's check).
Imports: errors, util, config, store, report, logsinks, metrics.
"""

import base64
import datetime
import email.charset
import email.header
import email.mime.text
import email.utils
import os
import shlex
import smtplib
import socket
import ssl
import time

from vmbackup import __version__
from vmbackup.config import read_password_file
from vmbackup.errors import EXIT_OK, EXIT_WARNING, PROG, VmBackupError, log
from vmbackup.logsinks import run_lines, sink_problems, write_problem
from vmbackup.metrics import backup_history, metrics_text, write_metrics
from vmbackup.report import exit_code_for, status_word, tally
from vmbackup.util import display_width, free_space, human_size, one_line, printable


class MailFailed(VmBackupError):
    """mail to {} not sent: {}"""


#: mail_on -> the lowest exit code that is mailed.
MAIL_ON = {"always": 0, "warning": 1, "error": 2}


#: Tries of one mail, and the seconds waited before the second, third... (times the try).
MAIL_TRIES = 3
MAIL_RETRY_DELAY = 10.0


#: The default port of each smtp_security.
SMTP_PORTS = {"none": 25, "starttls": 587, "ssl": 465}


def mail_wanted(mail_on, code):
    """Return True if a run that exits `code` is mailed under `mail_on`.

    >>> mail_wanted("error", 1), mail_wanted("warning", 1), mail_wanted("always", 0)
    (False, True, True)
    """
    return code >= MAIL_ON[mail_on]


def pool_name(config, record_pool):
    """Return the pool's name for the subject: its name_label, else the server, else this host."""
    if record_pool:
        return record_pool
    server = config.server or ""
    if "://" not in server:     # this host's xapi (none, or unix:/path)
        return socket.gethostname()
    host = server.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]   # never user:password
    return host or socket.gethostname()


def mail_subject(prefix, outcome, pool):
    """Return '[vmbackup] ERROR demo-pool: S:10 W:1 E:2'."""
    return "%s %s %s: %s" % (prefix, status_word(exit_code_for(outcome)), printable(pool),
                             tally(outcome))


def duration(seconds):
    """Return '0:03:12' for 192 seconds."""
    seconds = int(round(seconds or 0))
    return "%d:%02d:%02d" % (seconds // 3600, seconds // 60 % 60, seconds % 60)


def summary_table(outcome):
    """Return the lines of the table of units: VM, mode, status, size, time, message."""
    rows = [("VM", "MODE", "STATUS", "SIZE", "TIME", "MESSAGE")]
    for r in outcome.results:
        rows.append((printable(r.name), r.mode, r.status, human_size(r.bytes) if r.bytes else "-",
                     duration(r.seconds), one_line(r.message, 100) if r.message else ""))
    widths = [min(40, max(display_width(row[i]) for row in rows)) for i in range(5)]
    return [("  ".join(fit(cell, w) for cell, w in zip(row, widths)) + "  " + row[5]).rstrip()
            for row in rows]


def fit(cell, width):
    """Return `cell` padded to `width` columns, or cut to them with an ellipsis (a wide
    character counts two columns, so the table's columns line up for any VM name)."""
    if display_width(cell) <= width:
        return cell + " " * (width - display_width(cell))
    while display_width(cell) > width - 1:
        cell = cell[:-1]
    return cell + " " * (width - 1 - display_width(cell)) + "\u2026"


def unit_lines(lines, unit):
    """Return the log lines of one unit (its `vm=<name>: ` lines), at most the last 40."""
    mark = " vm=%s: " % printable(unit)
    return [line for line in lines if mark in line][-40:]


def problem_groups(problems):
    """Return [(unit, [RunProblem])]: each unit's problems together, units that failed first
    (the run's own problems are one group per problem, unit '')."""
    groups = []
    for problem in problems:
        if problem.unit and groups and groups[-1][0] == problem.unit:
            groups[-1][1].append(problem)
        else:
            groups.append((problem.unit, [problem]))
    return sorted(groups, key=lambda g: 0 if any(p.severity == "error" for p in g[1]) else 1)


def mail_body(config, outcome, pool, lines, space):
    """Return the plain-text report of a run: what failed first, then every unit's row.

    `lines` are the run's log lines (logsinks.RunLines), `space` the (free, total,
    percent) of backup_dir or None; nothing is counted here that the Outcome does not say.
    """
    code = exit_code_for(outcome)
    out = ["vmbackup %s on %s: %s, %s, exit %d" % (__version__, socket.gethostname(),
                                                   status_word(code), tally(outcome), code),
           "pool:     %s" % printable(pool),
           "started:  %s" % outcome.started, "finished: %s (%s)" % (
               outcome.finished, duration((outcome.finished - outcome.started).total_seconds())),
           "config:   %s" % (config.config_file or "(command line)"), ""]
    if outcome.cannot_start:
        out += ["The run did not start: %s" % outcome.cannot_start, ""]
    problems = outcome.all_problems()
    if problems:
        out.append("What failed or warned (%d):" % len(problems))
        for unit, found in problem_groups(problems):
            out.append("")
            for problem in found:
                out.append("%s %s: %s" % ("FAILED" if problem.severity == "error" else "WARNING",
                                          printable(unit) if unit else "(run)", problem.message))
            if unit:
                out.extend("    " + line for line in unit_lines(lines, unit))
        out.append("")
    if outcome.results:
        out += summary_table(outcome) + [""]
    if space:
        free, total, percent = space
        out.append("Space left in backup_dir %s: %s free of %s (%.1f%% free)."
                   % (config.backup_dir, human_size(free), human_size(total), percent))
    else:
        out.append("backup_dir %s: not there, no space to tell." % config.backup_dir)
    out += ["", "To see more:"]
    if config.log_file:
        out += ["  # this run's log", "  less %s" % shlex.quote(config.log_file)]
    if config.syslog:
        out += ["  # this run's log in the journal",
                "  journalctl -t vmbackup --since '%s'" % outcome.started]
    if config.status_log and os.path.isdir(os.path.dirname(config.status_log) or "."):
        out += ["  # the status log (one line per VM and run)",
                "  tail %s" % shlex.quote(config.status_log)]
    out += ["  # every backup in backup_dir, with its status",
            "  %s list -d %s" % (PROG, shlex.quote(config.backup_dir))]
    if config.config_file:      # a command-line run's preview needs that run's arguments
        out += ["  # what the next run would do (changes nothing)",
                "  %s -c %s --preview" % (PROG, shlex.quote(config.config_file))]
    return "\n".join(out) + "\n"


def build_mail(config, subject, body):
    """Return the message (UTF-8 plain text, quoted-printable) from mail_from to mail_to.

    Built with the email package's compat32 classes and headers encoded here: Python 3.6's
    newer policy folds an address list with a non-ASCII name into a header of stray CRs.
    """
    charset = email.charset.Charset("utf-8")
    charset.body_encoding = email.charset.QP
    msg = email.mime.text.MIMEText(body, "plain", charset)
    sender = config.mail_from or "vmbackup@%s" % socket.getfqdn()
    msg["From"] = encode_addresses([sender])
    msg["To"] = encode_addresses(config.mail_to or ())
    msg["Subject"] = encode_text(subject, "Subject")
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["Message-ID"] = email.utils.make_msgid(
        "vmbackup", email.utils.parseaddr(sender)[1].rpartition("@")[2] or None)
    msg["X-Mailer"] = "vmbackup %s" % __version__
    return msg


def encode_text(text, header_name=None):
    """Return a header value: `text` when ASCII, else RFC 2047 encoded words (a Header,
    folded as a header named `header_name`; without one, the encoded text)."""
    try:
        text.encode("ascii")
        return text
    except UnicodeEncodeError:
        header = email.header.Header(text, "utf-8", header_name=header_name)
        return header if header_name else header.encode()


def encode_addresses(addresses):
    """Return 'Name <a@b>, c@d' with non-ASCII names as encoded words."""
    return ", ".join(email.utils.formataddr((encode_text(name) if name else "", addr))
                     for name, addr in email.utils.getaddresses(list(addresses)))


def is_loopback(host):
    """Return True for a server on this host (localhost, 127.x, ::1)."""
    return host in ("localhost", "::1") or host.startswith("127.")


def smtp_connect(config, password):
    """Return a logged-in smtplib connection to smtp_server; raise OSError or SMTPException."""
    security, host = config.smtp_security, config.smtp_server
    port = config.smtp_port or SMTP_PORTS[security]
    context = None
    if security != "none":
        context = ssl.create_default_context(cafile=config.smtp_ca_file)
    if security == "ssl":
        smtp = smtplib.SMTP_SSL(host, port, timeout=config.smtp_timeout, context=context)
    else:
        smtp = smtplib.SMTP(host, port, timeout=config.smtp_timeout)
    try:
        if security == "starttls":
            smtp.starttls(context=context)
        if config.smtp_username:
            smtp_login(smtp, config.smtp_username, password or "")
    except BaseException:
        smtp.close()
        raise
    return smtp


def smtp_login(smtp, username, password):
    """Log in; raise SMTPAuthenticationError. Credentials beyond ASCII go as UTF-8 AUTH PLAIN
    (RFC 4616), which smtplib's login cannot send."""
    try:
        (username + password).encode("ascii")
    except UnicodeEncodeError:
        smtp.ehlo_or_helo_if_needed()
        token = base64.b64encode(("\0%s\0%s" % (username, password)).encode("utf-8"))
        code, reply = smtp.docmd("AUTH", "PLAIN " + token.decode("ascii"))
        if code != 235:
            raise smtplib.SMTPAuthenticationError(code, reply)
        return
    smtp.login(username, password)


def retryable(exc):
    """Return True for what a second try may cure: a refused or dropped connection, a 4xx."""
    if isinstance(exc, (ssl.SSLError, ssl.CertificateError, smtplib.SMTPAuthenticationError)):
        return False
    if isinstance(exc, smtplib.SMTPResponseException):
        return 400 <= exc.smtp_code < 500
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return all(400 <= code < 500 for code, _ in exc.recipients.values())
    return isinstance(exc, (OSError, smtplib.SMTPException))


def failure_text(config, exc):
    """Return one line for an SMTP failure, naming the server and what to check."""
    where = "%s:%s (smtp_security=%s)" % (config.smtp_server,
                                          config.smtp_port or SMTP_PORTS[config.smtp_security],
                                          config.smtp_security)
    if isinstance(exc, (ssl.SSLError, ssl.CertificateError)):
        return ("%s: TLS certificate refused: %s (set smtp_ca_file to the CA that signed it, "
                "and smtp_server to a name the certificate holds)" % (where, one_line(exc)))
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return "%s: login as %s refused: %s %s" % (where, config.smtp_username, exc.smtp_code,
                                                     one_line(exc.smtp_error.decode("utf-8",
                                                                                    "replace")))
    if isinstance(exc, smtplib.SMTPResponseException):
        return "%s: %s %s" % (where, exc.smtp_code,
                              one_line(exc.smtp_error.decode("utf-8", "replace")))
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return "%s: recipients refused: %s" % (where, ", ".join(sorted(exc.recipients)))
    return "%s: %s" % (where, one_line(getattr(exc, "strerror", None) or exc))


def smtp_password(config):
    """Return the SMTP password the settings give (None: no AUTH); raise MailFailed when
    they forbid sending it (in clear to another host, a file others can read)."""
    to = ", ".join(config.mail_to or ())
    try:
        if config.smtp_username:
            if config.smtp_security == "none" and not is_loopback(config.smtp_server):
                raise MailFailed(to, "not sending the SMTP password unencrypted to %s: set "
                                     "smtp_security=starttls or ssl" % config.smtp_server)
            if config.smtp_password_file:
                return read_password_file(config.smtp_password_file)
    except VmBackupError as exc:
        raise MailFailed(to, str(exc)) if not isinstance(exc, MailFailed) else exc
    return None


def send_mail(config, msg, sleep=time.sleep):
    """Send `msg` through smtp_server, trying MAIL_TRIES times; raise MailFailed."""
    to, password = ", ".join(config.mail_to or ()), smtp_password(config)
    for attempt in range(1, MAIL_TRIES + 1):
        try:
            smtp = smtp_connect(config, password)
            try:
                smtp.send_message(msg)
            finally:
                try:
                    smtp.quit()
                except (OSError, smtplib.SMTPException):
                    smtp.close()
            return attempt
        except (OSError, smtplib.SMTPException, ValueError) as exc:
            text = failure_text(config, exc)
            if attempt == MAIL_TRIES or not retryable(exc):
                raise MailFailed(to, "%s (try %d of %d)" % (text, attempt, MAIL_TRIES))
            log.info("mail try %d of %d failed: %s; trying again in %gs",
                     attempt, MAIL_TRIES, text, MAIL_RETRY_DELAY * attempt)
            sleep(MAIL_RETRY_DELAY * attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def mail_report(config, outcome, pool):
    """Mail the run's report if mail_on asks for it; raise MailFailed."""
    code = exit_code_for(outcome)
    if not config.mail_to or not mail_wanted(config.mail_on, code):
        return
    lines = run_lines()
    try:
        space = free_space(config.backup_dir) if os.path.isdir(config.backup_dir) else None
    except OSError:
        space = None
    msg = build_mail(config, mail_subject(config.mail_subject_prefix, outcome, pool),
                     mail_body(config, outcome, pool, lines.lines if lines else [], space))
    tries = send_mail(config, msg)
    log.info("mailed the report to %s (%s)%s", ", ".join(config.mail_to), msg["Subject"],
             "" if tries == 1 else " on try %d" % tries)


def send_reports(config, record):
    """Write the metrics file and mail the report of a run; what fails is a warning of the run.

    Called by run.report_run before it writes the status log's `end` line, so that line,
    the exit code and --json count these warnings. The metrics file is written first, so
    the mail counts a metrics file that cannot be written; a mail that cannot be sent is
    then written into the metrics file again. Only the mail cannot count its own failure.
    """
    lines = run_lines()
    if lines:
        for problem in lines.problems:
            record.log.warning("%s", problem)
        lines.problems[:] = []
    metrics_written = write_run_metrics(config, record)
    pool = pool_name(config, getattr(record, "pool", None))
    try:
        mail_report(config, record.outcome(), pool)
    except MailFailed as exc:
        record.log.warning("%s", exc)
    except Exception as exc:  # noqa: BLE001 - a report never costs the run
        log.debug("traceback", exc_info=True)
        record.log.warning("mail not sent: internal error: %s: %s", type(exc).__name__,
                           one_line(exc))
    else:
        return
    if metrics_written:
        write_run_metrics(config, record)


def report_problems(config, code):
    """Return the warnings a run with `config` ending with exit `code` would get from a log
    file, syslog socket or metrics file it cannot use, or mail settings it refuses (the
    preview's check; nothing is written, no mail is sent)."""
    problems = sink_problems(config)
    if config.metrics_file and write_problem(config.metrics_file):
        problems.append("cannot write metrics_file %s: %s"
                        % (config.metrics_file, write_problem(config.metrics_file)))
    if config.mail_to and mail_wanted(config.mail_on, max(code, EXIT_WARNING if problems else 0)):
        try:
            smtp_password(config)
        except MailFailed as exc:
            problems.append(str(exc))
    return problems


def write_run_metrics(config, record):
    """Write the metrics file of the run so far; return whether it was written (a failure
    is a warning of the run)."""
    if not config.metrics_file:
        return False
    try:
        outcome = record.outcome()
        text = metrics_text(outcome, backup_history(config, outcome),
                            os.path.basename(config.config_file or ""))
        write_metrics(config.metrics_file, text)
        return True
    except OSError as exc:
        record.log.warning("cannot write metrics_file %s: %s", config.metrics_file,
                           exc.strerror or exc)
    except Exception as exc:  # noqa: BLE001 - a report never costs the run
        log.debug("traceback", exc_info=True)
        record.log.warning("cannot write metrics_file %s: internal error: %s: %s",
                           config.metrics_file, type(exc).__name__, one_line(exc))
    return False


def test_mail(config):
    """Send a test message with the mail settings of `config`; return the exit code."""
    if not config.mail_to:
        raise MailFailed("(nobody)", "mail_to is not set in %s" % (config.config_file
                                                                   or "the command line"))
    port = config.smtp_port or SMTP_PORTS[config.smtp_security]
    body = "\n".join([
        "This is a test message from vmbackup %s on %s." % (__version__, socket.gethostname()),
        "",
        "Reports are sent when a run ends with: %s (mail_on=%s)." % (
            {"always": "anything", "warning": "warnings or errors", "error": "errors"}[
                config.mail_on], config.mail_on),
        "smtp_server:   %s:%d" % (config.smtp_server, port),
        "smtp_security: %s" % config.smtp_security,
        "smtp_username: %s" % (config.smtp_username or "-"),
        "config:        %s" % (config.config_file or "(command line)"),
        "sent at:       %s" % datetime.datetime.now().replace(microsecond=0), ""])
    msg = build_mail(config, "%s TEST %s: mail settings work" % (
        config.mail_subject_prefix, socket.gethostname()), body)
    send_mail(config, msg)
    log.info("test mail sent to %s through %s:%d", ", ".join(config.mail_to),
             config.smtp_server, port)
    return EXIT_OK
