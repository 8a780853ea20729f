"""Configuration: NAUbackup's key=value files, the modern command line, precedence, errors.

Pure functions, no server: parse_config, parse_selector, build_config, parse_legacy."""
import os
import re

import pytest

import vmbackup
from vmbackup import ConfigError, Selector, parse_config, parse_selector
from conftest import run_vmbackup

# A config written the way NAUbackup's documentation writes one: comments, excludes
# first, vdi-export lines before vm-export lines, :N overrides, regex lines.
NAU_CONFIG = """\
# Example VmBackup config, as NAUbackup documents it
pool_db_backup=1
max_backups=4
backup_dir=/snapshots/BACKUPS
status_log=/snapshots/NAUbackup/status.log
vdi_export_format=raw

# excludes must come before the export lines
exclude=DEV-phishing-test
exclude=PRD-PRINT$
exclude=PRD-a.*
exclude=DEV-V.*TEMP$

vdi-export=DEV-web3
vdi-export=DEV-web3:7
vdi-export=DEV-.*(TEST|test).*
vdi-export=DEV-.*[Tt]est.*

vm-export=.*SAVE$:5
vm-export=PRD-.*print[4-5]$:5
vm-export=PRD-.*print[6-8]$:10
vm-export=PRD-.*print[\\d{1,}]$:8
vm-export=PROD.*
vm-export=DEV.*:2
vm-export=my-third-vm:3
"""


def test_nau_documented_config_parses():
    parsed = parse_config(NAU_CONFIG, "nau.cfg")
    assert parsed.values == {"pool_db_backup": True, "max_backups": 4,
                             "backup_dir": "/snapshots/BACKUPS",
                             "status_log": "/snapshots/NAUbackup/status.log",
                             "vdi_export_format": "raw"}
    assert parsed.origins["max_backups"] == "nau.cfg:3"
    modes = [s.mode for s in parsed.selectors]
    assert modes.count("exclude") == 4 and modes.count("vdi-export") == 4
    assert modes.count("vm-export") == 7
    by_pattern = {(s.mode, s.pattern): s for s in parsed.selectors}
    assert parsed.selectors[4] == Selector("vdi-export", "DEV-web3", None, (), "nau.cfg:14")
    assert parsed.selectors[5] == Selector("vdi-export", "DEV-web3", 7, (), "nau.cfg:15")
    assert by_pattern[("vm-export", "PRD-.*print[\\d{1,}]$")].max_backups == 8
    assert by_pattern[("vm-export", ".*SAVE$")].max_backups == 5
    assert by_pattern[("vm-export", "my-third-vm")].is_plain


@pytest.mark.parametrize("text, mode, expected", [
    ("web01", "vm-export", ("web01", None, ())),
    ("web01:3", "vm-export", ("web01", 3, ())),
    ("web01:-1", "vm-export", ("web01", None, ())),
    ("web01:", "vm-export", ("web01", None, ())),
    ("DEV mySql", "vm-export", ("DEV mySql", None, ())),
    ("PRD-.*print[6-8]$:10", "vm-export", ("PRD-.*print[6-8]$", 10, ())),
    ("DEV-web3:7:xvda;xvdb", "vdi-export", ("DEV-web3", 7, ("xvda", "xvdb"))),
    ("DEV-web3::xvdb", "vdi-export", ("DEV-web3", None, ("xvdb",))),
    ("DEV-web3:-1:xvdc", "vdi-export", ("DEV-web3", None, ("xvdc",))),
    ("a(?:b|c):2", "vm-export", ("a(?:b|c)", 2, ())),
], ids=lambda v: str(v))
def test_parse_selector(text, mode, expected):
    sel = parse_selector(text, mode)
    assert (sel.pattern, sel.max_backups, sel.devices) == expected


@pytest.mark.parametrize("text, message", [
    ("PRD-[", "invalid regex"),
    ("web01:0", "at least 1"),
    ("(unclosed", "invalid regex"),
    ("", "empty"),
])
def test_parse_selector_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        parse_selector(text, "vm-export")


@pytest.mark.parametrize("line, message", [
    ("max_backups=abc", "weekly.cfg:3: max_backups=abc: not a whole number"),
    ("max_backups=0", "weekly.cfg:3: max_backups=0: must be at least 1"),
    ("vdi_export_format=qcow", "weekly.cfg:3: vdi_export_format=qcow: expected one of raw, vhd"),
    ("vm-export=PRD-[", "weekly.cfg:3: vm-export=PRD-[: invalid regex"),
    ("pool_db_backup=maybe", "weekly.cfg:3: pool_db_backup=maybe: expected true or false"),
    ("compress=lz4", "weekly.cfg:3: compress=lz4: expected false, true, gzip or zstd"),
    ("space_threshold=120", "weekly.cfg:3: space_threshold=120: must be between 0 and 100"),
    ("frobnicate=1", "weekly.cfg:3: unknown key 'frobnicate'"),
    ("just some words", "weekly.cfg:3: not a key=value line"),
    ("tls_fingerprint=abc", "weekly.cfg:3: tls_fingerprint=abc: expected a SHA-256"),
    ("syslog_address=logs:notaport", "weekly.cfg:3: syslog_address=logs:notaport: expected a unix "
     "socket path (/dev/log) or host:port with a port from 1 to 65535"),
    ("syslog_address=logs:70000", "weekly.cfg:3: syslog_address=logs:70000: expected a unix"),
    ("syslog_address=logs.example.org", "weekly.cfg:3: syslog_address=logs.example.org: expected"),
])
def test_config_errors_name_file_line_key_value(line, message):
    text = "# comment\nbackup_dir=/b\n%s\n" % line
    with pytest.raises(ConfigError) as info:
        parse_config(text, "weekly.cfg")
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_unknown_keys_skipped_with_ignore_extra_keys():
    parsed = parse_config("frobnicate=1\nmax_backups=2\n", "x.cfg", ignore_extra_keys=True)
    assert parsed.values == {"max_backups": 2}


def test_values_may_contain_equals_and_keys_both_spellings():
    parsed = parse_config("vm_export=a(?=b).*\nvdi_export=web:2\nmeta-export=x\n", "x.cfg")
    assert [(s.mode, s.pattern) for s in parsed.selectors] == [
        ("vm-export", "a(?=b).*"), ("vdi-export", "web"), ("meta-export", "x")]


@pytest.mark.parametrize("value, expected", [
    ("false", None), ("False", None), ("0", None), ("true", "gzip"), ("True", "gzip"),
    ("gzip", "gzip"), ("zstd", "zstd"), ("none", None)])
def test_compress_values(value, expected):
    assert parse_config("compress=%s\n" % value, "c").values["compress"] == expected


def test_precedence_defaults_file_command_line():
    parsed = parse_config("max_backups=7\nbackup_dir=/from/file\nvm-export=web.*\nexclude=web9\n", "p.cfg")
    config = vmbackup.build_config(parsed, {"backup_dir": "/from/cli"},
                                   [parse_selector("db01", "vm-export"),
                                    parse_selector("web8", "exclude")], "p.cfg")
    assert config.max_backups == 7 and config.where("max_backups") == "p.cfg:1"
    assert config.backup_dir == "/from/cli" and config.where("backup_dir") == "command line"
    assert config.vdi_export_format == "raw" and config.where("vdi_export_format") == "default"
    # command-line export selectors replace the file's; excludes add up
    assert [(s.mode, s.pattern) for s in config.selectors] == [
        ("exclude", "web9"), ("vm-export", "db01"), ("exclude", "web8")]
    # a config-file run gets NAUbackup's status log unless the file names one
    assert config.status_log == vmbackup.DEFAULT_STATUS_LOG


def test_example_cfg_is_current_and_parses():
    """example.cfg shows every key, and parses without errors."""
    path = os.path.join(os.path.dirname(vmbackup.__file__), "example.cfg")
    with open(path) as handle:
        text = handle.read()
    assert text == vmbackup.example_config()
    parsed = parse_config(text, "example.cfg")
    for key in vmbackup.SETTINGS:
        assert key + "=" in text
    # a safe example: its selectors are commented out, and each parses once uncommented
    assert parsed.selectors == []
    uncommented = re.sub(r"(?m)^#((?:vm|vdi|meta)-export|exclude)=", r"\1=", text)
    assert len(parse_config(uncommented, "example.cfg").selectors) == 9


# -- the NAUbackup command line ---------------------------------------------

@pytest.mark.parametrize("argv, expect", [
    (["password", "DEV-mySql"], ("vm-export", "DEV-mySql", False)),
    (["password", "vdi-export=DEV-mySql"], ("vdi-export", "DEV-mySql", False)),
    (["password", "vm-export=DEV-mySql:3"], ("vm-export", "DEV-mySql", False)),
    (["password", "DEV mySql"], ("vm-export", "DEV mySql", False)),
    (["password", "DEV-my.*"], ("vm-export", "DEV-my.*", False)),
    (["password", ".*", "preview"], ("vm-export", ".*", True)),
    (["password", "DEV-mySql", "Preview", "compress=True", "pre_clean=true",
      "ignore_extra_keys=False"], ("vm-export", "DEV-mySql", True)),
])
def test_legacy_selector_invocations(argv, expect):
    inv = vmbackup.parse_legacy(argv)
    assert inv.legacy and inv.password == "password" and inv.config_file is None
    (sel,) = inv.cli_selectors
    assert (sel.mode, sel.pattern, inv.preview) == expect


def test_legacy_flags_and_config_file(tmp_path):
    cfg = tmp_path / "weekend.cfg"
    cfg.write_text("backup_dir=%s\nvm-export=web01\n" % tmp_path)
    inv = vmbackup.parse_legacy(["password", str(cfg), "preview", "compress=True",
                                 "pre_clean=True", "ignore_extra_keys=true"])
    assert inv.config_file == str(cfg) and inv.preview and inv.ignore_extra_keys
    assert inv.cli_values == {"compress": "gzip", "pre_clean": True}
    inv = vmbackup.parse_legacy(["password", str(cfg), "compress=False"])
    assert inv.cli_values == {"compress": None} and not inv.preview


def test_legacy_password_file_is_base64(tmp_path):
    pw = tmp_path / "VmBackup.pass"
    out = run_vmbackup("s3cret!", "create-password-file=%s" % pw)
    assert "wrote password file" in out
    assert oct(pw.stat().st_mode & 0o777) == "0o600"
    assert pw.read_text().strip() == "czNjcmV0IQ=="
    inv = vmbackup.parse_legacy([str(pw), "web01"])
    assert inv.password == "s3cret!"
    # refuses to overwrite
    run_vmbackup("other", "create-password-file=%s" % pw, exit_code=2)


@pytest.mark.parametrize("argv, message", [
    (["password"], "expected <password|password-file>"),
    (["password", "foo=bar"], "neither a config file nor a vm-selector"),
    (["password", "web01", "bogus"], "unexpected argument 'bogus'"),
    (["password", "web01", "compress=maybe"], "compress=maybe: expected True or False"),
    (["password", "PRD-["], "invalid regex"),
])
def test_legacy_usage_errors_exit_2(argv, message):
    out = run_vmbackup(*argv, exit_code=2)
    assert message in out
    assert "Traceback" not in out


@pytest.mark.parametrize("word, text", [("help", "usage (NAUbackup compatible)"),
                                        ("config", "max_backups=4"),
                                        ("example", "password weekend.cfg")])
def test_legacy_help_words(word, text):
    assert text in run_vmbackup(word)
    assert text in run_vmbackup("password", word)


def test_modern_help_lists_exit_status():
    out = run_vmbackup("--help")
    assert "EXIT STATUS" in out and "--vdi-export" in out and "--password-file" in out
    assert vmbackup.EXIT_STATUS_TEXT in out


@pytest.mark.parametrize("args, message", [
    (["-e", "PRD-["], "--vm-export PRD-[: invalid regex"),
    (["-e", "x", "--max-backups", "0"], "--max-backups 0: must be at least 1"),
    (["-e", "x", "--space-threshold", "x"], "--space-threshold x: not a number"),
    ([], "nothing to back up"),
    (["-c", "/nonexistent/weekly.cfg"], "cannot read config file /nonexistent/weekly.cfg"),
    (["--bogus"], "unrecognized arguments"),
])
def test_modern_usage_errors_exit_2(args, message):
    out = run_vmbackup(*args, exit_code=2)
    assert message in out
    assert "Traceback" not in out


def test_modern_password_file_must_be_private(tmp_path, backup_dir):
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    pw.chmod(0o644)
    out = run_vmbackup("-e", "web01", "-d", backup_dir, "--password-file", pw,
                       "--server", "http://127.0.0.1:9/", exit_code=2)
    assert "readable by other users" in out and "chmod 600" in out
    assert "secret" not in out


def test_config_error_is_one_line_with_exit_2(tmp_path):
    cfg = tmp_path / "bad.cfg"
    cfg.write_text("backup_dir=/x\nmax_backups=many\n")
    out = run_vmbackup("-c", cfg, exit_code=2)
    assert out.strip() == "vmbackup.py: error: %s:2: max_backups=many: not a whole number" % cfg
    out = run_vmbackup("-c", cfg, "-v", exit_code=2)
    assert "max_backups=many" in out
    cfg.write_text("backup_dir=/x\nsyslog=1\nsyslog_address=host:notaport\n")
    out = run_vmbackup("-c", cfg, exit_code=2)
    assert out.strip() == "vmbackup.py: error: %s:3: syslog_address=host:notaport: expected a " \
        "unix socket path (/dev/log) or host:port with a port from 1 to 65535" % cfg


@pytest.mark.parametrize("value", ["/dev/log", "/run/systemd/journal/dev-log", "logs:514",
                                   "10.0.0.5:1514", "[fe80::1]:514"])
def test_syslog_addresses_that_parse(value):
    assert parse_config("syslog_address=%s\n" % value).values["syslog_address"] == value
