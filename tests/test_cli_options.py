"""The command line is declared once: connection and output options shared by every command
that talks to a pool, one settings-from-arguments path, one count of -v/-q."""

import re

import pytest

import vmbackup
from conftest import run_vmbackup


@pytest.mark.parametrize("argv, level", [
    ([], 0),
    (["-v"], 1),
    (["-vvv"], 3),
    (["-v", "--verbose", "-v"], 3),
    (["-q"], -1),
    (["-qq", "-v"], -1),
    (["--quiet", "--quiet"], -2),
    (["-e", "web01", "-vv"], 2),
    (["-e", "-vq"], 0),                 # a bundle of both counts both
    (["--", "-vvv"], 0),                # after --, nothing is an option
    (["--version"], 0),
    (["-vx"], 0),                       # not a verbosity flag
])
def test_verbosity_is_counted_once(argv, level):
    assert vmbackup.verbosity(argv) == level


def option_help(parser):
    """{option string: help} of a parser's connection group."""
    found = {}
    for action in parser._actions:
        for option in action.option_strings:
            found[option] = action.help
    return found


CONNECTION = ("--server", "--username", "--password-file", "--transport", "--xe",
              "--tls-ca-file", "--tls-fingerprint", "--insecure")


def test_backup_and_restore_share_the_connection_options():
    backup, restore = option_help(vmbackup.build_parser()), option_help(vmbackup.build_restore_parser())
    for option in CONNECTION + ("--json", "--quiet", "--verbose"):
        assert option in backup and option in restore, option
    assert {o: backup[o] for o in CONNECTION} == {o: restore[o] for o in CONNECTION}
    assert all(backup[o] for o in CONNECTION)    # restore used to have no help for them


def test_restore_help_explains_the_connection_options():
    out = run_vmbackup("restore", "--help", exit_code=0)
    assert re.search(r"--tls-fingerprint SHA256\s+pin the pool's certificate", out)
    assert "VMBACKUP_PASSWORD" in out


@pytest.mark.parametrize("argv", [["-e", "x", "--tls-fingerprint", "xyz"],
                                  ["restore", "/nowhere", "--tls-fingerprint", "xyz"]])
def test_a_bad_option_value_is_one_line_naming_it(argv):
    out = run_vmbackup(*argv, exit_code=2)
    assert out.count("\n") == 1 and "--tls-fingerprint xyz:" in out, out


def test_restore_reads_the_server_from_the_environment(monkeypatch, backup_dir):
    """VMBACKUP_SERVER counts for restore as for backup: one settings path."""
    monkeypatch.setenv("VMBACKUP_SERVER", "https://pool.example:1")
    config, password = vmbackup.load_config(vmbackup.settings_from_args(
        vmbackup.build_restore_parser().parse_args(["x"])))
    assert config.server == "https://pool.example:1" and password is None
    config, _ = vmbackup.load_config(vmbackup.settings_from_args(
        vmbackup.build_restore_parser().parse_args(["x", "-s", "https://other:2"])))
    assert config.server == "https://other:2"


@pytest.mark.parametrize("flags, traceback", [([], False), (["-v"], True), (["-vvv"], True),
                                               (["--verbose"], True), (["-q"], False)])
def test_internal_error_traceback_only_when_verbose(monkeypatch, flags, traceback, backup_dir):
    def broken(argv):
        raise RuntimeError("boom")
    monkeypatch.setitem(vmbackup.COMMANDS, "list", broken)
    out = run_vmbackup(*(["list"] + flags), exit_code=2)
    assert "internal error: RuntimeError: boom" in out
    assert ("Traceback (most recent call last)" in out) == traceback
