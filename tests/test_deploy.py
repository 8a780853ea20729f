"""The container and service examples, checked as far as this machine can without building
an image: the Dockerfile statically (a pinned base, a non-root user, no secret in any
layer, the entrypoint the README documents), then its install and entrypoint commands
run here, outside a container, against the simulated pool; the Kubernetes manifests parse
(PyYAML) and fit the image; the systemd units pass `systemd-analyze verify`."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig

import pytest
import XenAPI
import yaml

import vmbackup
from conftest import ROOT

EXAMPLES = os.path.join(ROOT, "examples")


def read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as handle:
        return handle.read()


def dockerfile():
    """Return [(INSTRUCTION, arguments)] of the Dockerfile (continuations joined, comments out)."""
    lines, joined = [], ""
    for line in read("Dockerfile").splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        joined += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            word, _, rest = joined.strip().partition(" ")
            lines.append((word.upper(), rest.strip()))
            joined = ""
    return lines


def args_of(instruction):
    (value,) = [v for k, v in dockerfile() if k == instruction]
    return json.loads(value)


def build_args():
    return dict(v.split("=", 1) for k, v in dockerfile() if k == "ARG")


def test_dockerfile_base_is_a_slim_python_pinned_by_version():
    (base,) = [v for k, v in dockerfile() if k == "FROM"]
    assert re.match(r"^python:3\.\d+\.\d+-slim-[a-z]+$", base), base


def test_dockerfile_runs_as_the_documented_non_root_user_and_entrypoint():
    steps = dockerfile()
    user = [v for k, v in steps if k == "USER"]
    assert user == ["vmbackup"]
    (useradd,) = [v for k, v in steps if k == "RUN" and "useradd" in v]
    uid = int(re.search(r"--uid (\d+)", useradd).group(1))
    assert uid >= 1000 and " vmbackup" in useradd
    last_run = max(i for i, (k, _) in enumerate(steps) if k == "RUN")
    assert steps.index(("USER", "vmbackup")) > last_run     # nothing after it runs as root
    assert args_of("ENTRYPOINT") == ["vmbackup"]
    assert args_of("CMD") == ["-c", "/etc/vmbackup/vmbackup.cfg"]
    assert "/backups" in args_of("VOLUME")
    readme = read("README.md")
    assert "uid %d" % uid in readme and "ENTRYPOINT" in readme
    k8s = list(yaml.safe_load_all(read("examples", "kubernetes", "vmbackup.yaml")))
    pod = next(d for d in k8s if d["kind"] == "CronJob")["spec"]["jobTemplate"]["spec"]["template"]
    assert pod["spec"]["securityContext"]["runAsUser"] == uid


def test_no_secret_goes_into_any_layer():
    steps = dockerfile()
    copied = [w for k, v in steps if k in ("COPY", "ADD") for w in v.split()[:-1]]
    assert copied and set(copied) <= {"pyproject.toml", "README.md", "LICENSE", "vmbackup.py"}
    assert not [k for k, _ in steps if k == "ADD"]
    for key, value in steps:
        if key in ("ENV", "ARG", "LABEL"):
            assert not re.search(r"pass|secret|token|key", value, re.I), value
    ignored = [l for l in read(".dockerignore").split("\n") if l and not l.startswith("#")]
    assert ignored[0] == "*" and sorted(ignored[1:]) == sorted("!" + c for c in copied)


def test_dockerfile_install_and_entrypoint_back_up_the_simulated_pool(sim_pool, tmp_path):
    """RUN pip install ... and ENTRYPOINT + CMD, here: a fresh virtualenv stands for the image."""
    steps, arg = dockerfile(), build_args()
    src = tmp_path / "vmbackup-src"
    src.mkdir()
    (copy,) = [v.split() for k, v in steps if k == "COPY"]
    for name in copy[:-1]:
        shutil.copy(os.path.join(ROOT, name), str(src / name))
    (install,) = [v for k, v in steps if k == "RUN" and "pip install" in v]
    pip = shlex.split(install.split("&&")[0].replace("${XENAPI_VERSION}", arg["XENAPI_VERSION"]))
    assert pip[:2] == ["pip", "install"]
    # XenAPI is pinned to a release; the suite does not reach PyPI, so the XenAPI the
    # tests run with is copied in beside the install rather than downloaded
    pinned = [p for p in pip if p.startswith("XenAPI==")]
    assert len(pinned) == 1 and re.match(r"^XenAPI==\d+\.\d+\.\d+$", pinned[0]), pinned
    pip = [str(src) if p == copy[-1].rstrip("/") else p for p in pip if p not in pinned]
    env = tmp_path / "image"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    # the image's python runs pip; pip, setuptools and wheel come from the suite's own
    # site-packages (PYTHONPATH, for this command only), as the image's come with its base
    proc = subprocess.run([str(env / "bin" / "python"), "-m"] + pip
                          + ["--no-index", "--no-deps", "--no-build-isolation", "-q"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                          env=dict(os.environ, PYTHONPATH=sysconfig.get_paths()["purelib"]))
    assert proc.returncode == 0, proc.stdout
    site = subprocess.run([str(env / "bin" / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
    shutil.copytree(os.path.dirname(XenAPI.__file__), os.path.join(site, "XenAPI"))

    # the mounts: the example config (selecting one VM), the password file, /backups
    backups = tmp_path / "backups"
    backups.mkdir()
    password = tmp_path / "xapi-password"
    password.write_text(sim_pool.password + "\n")
    password.chmod(0o600)
    config = read("examples", "vmbackup.cfg")
    config = re.sub(r"(?m)^server=.*$", "server=" + sim_pool.url, config)
    config = re.sub(r"(?m)^tls_fingerprint=.*\n", "", config)
    config = config.replace("password_file=/run/secrets/xapi-password", "password_file=%s" % password)
    config = config.replace("backup_dir=/backups", "backup_dir=%s" % backups)
    config = config.replace("#vm-export=PRD-.*", "vm-export=PRD-print7")
    mounted = tmp_path / "vmbackup.cfg"
    mounted.write_text(config)
    cmd = [str(mounted) if a == "/etc/vmbackup/vmbackup.cfg" else a for a in args_of("CMD")]
    proc = subprocess.run([str(env / "bin" / args_of("ENTRYPOINT")[0])] + cmd,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                          cwd=str(backups), env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
                          timeout=300)
    assert proc.returncode == 0, proc.stdout
    assert "done: S:2 W:0 E:0, exit 0" in proc.stdout      # PRD-print7 and the pool database
    (folder,) = os.listdir(str(backups / "PRD-print7"))
    assert "success" in os.listdir(str(backups / "PRD-print7" / folder))


def test_docker_run_example_mounts_what_the_config_reads():
    script = read("examples", "docker-run.sh")
    config = vmbackup.parse_config(read("examples", "vmbackup.cfg"), "examples/vmbackup.cfg")
    mounts = re.findall(r"-v ([^\s:]+):([^\s:]+)(?::ro)?\s", script)
    targets = {target for _, target in mounts}
    assert config.values["password_file"] in targets and config.values["backup_dir"] in targets
    assert args_of("CMD")[1] in targets


def test_kubernetes_cronjob_fits_the_image():
    docs = {d["kind"]: d for d in yaml.safe_load_all(read("examples", "kubernetes", "vmbackup.yaml"))}
    assert set(docs) == {"Secret", "ConfigMap", "PersistentVolumeClaim", "CronJob"}
    cron = docs["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid" and cron["jobTemplate"]["spec"]["backoffLimit"] == 0
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"] is True
    assert pod["terminationGracePeriodSeconds"] >= 300     # room to destroy the snapshots
    volumes = {v["name"]: v for v in pod["volumes"]}
    (main,) = pod["containers"]
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    assert main["args"] == args_of("CMD")
    assert volumes[mounts["/backups"]]["persistentVolumeClaim"]["claimName"] == \
        docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert volumes[mounts["/etc/vmbackup"]]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    config = vmbackup.parse_config(docs["ConfigMap"]["data"]["vmbackup.cfg"], "ConfigMap")
    assert config.values["backup_dir"] == "/backups"
    # the password: the Secret, copied by the init container to a 0600 file the config names
    (init,) = pod["initContainers"]
    assert init["command"][:3] == ["install", "-m", "0600"]
    source, target = init["command"][3:]
    init_mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    secret_dir, key = os.path.split(source)
    assert volumes[init_mounts[secret_dir]]["secret"]["secretName"] == docs["Secret"]["metadata"]["name"]
    assert key in docs["Secret"]["stringData"]
    assert target == config.values["password_file"]
    assert mounts[os.path.dirname(target)] == init_mounts[os.path.dirname(target)]
    assert "emptyDir" in volumes[mounts[os.path.dirname(target)]]


def unit(name):
    """Return {section: {key: value}} of a systemd unit file (last value wins)."""
    found, section = {}, None
    for line in read("examples", "systemd", name).splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = found.setdefault(line[1:-1], {})
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            section[key] = value
    return found


def test_systemd_units_are_a_oneshot_service_and_a_persistent_timer():
    service, timer = unit("vmbackup.service"), unit("vmbackup.timer")
    assert service["Service"]["Type"] == "oneshot"
    assert shlex.split(service["Service"]["ExecStart"])[0] == "/usr/local/bin/vmbackup.py"
    assert service["Service"]["KillMode"] == "mixed"
    assert timer["Timer"]["Persistent"] == "true" and timer["Timer"]["OnCalendar"]
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_systemd_setup_makes_a_config_the_service_can_use(tmp_path):
    """The service's own setup lines turn examples/vmbackup.cfg (made for the container's
    /backups and /run/secrets) into the config ExecStart reads, with a backup_dir the
    sandbox lets it write and a password file the setup creates."""
    text = read("examples", "systemd", "vmbackup.service")
    service = unit("vmbackup.service")["Service"]
    (setup,) = [l.lstrip("# ").strip() for l in text.splitlines() if l.startswith("#   sed ")]
    words = shlex.split(setup)
    assert words[-3:-1] == ["../vmbackup.cfg", ">"]
    assert words[-1] == shlex.split(service["ExecStart"])[2]
    made = subprocess.run(words[:-3] + [os.path.join(EXAMPLES, "vmbackup.cfg")], check=True,
                          stdout=subprocess.PIPE, universal_newlines=True).stdout
    config = vmbackup.parse_config(made, "vmbackup.cfg").values
    assert config["backup_dir"] in service["ReadWritePaths"].split()
    assert "> %s)" % config["password_file"] in text
    assert service["User"] == "vmbackup" and "chown vmbackup %s" % config["password_file"] in text


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_units(tmp_path):
    """In a root that holds the system's units and the installed vmbackup.py (verify checks
    that ExecStart's program exists)."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", str(root / "usr/lib/systemd/system"), symlinks=True)
    (root / "usr/local/bin").mkdir(parents=True)
    shutil.copy(vmbackup.__file__, str(root / "usr/local/bin/vmbackup.py"))
    os.chmod(str(root / "usr/local/bin/vmbackup.py"), 0o755)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for name in ("vmbackup.service", "vmbackup.timer"):
        shutil.copy(os.path.join(EXAMPLES, "systemd", name), str(units / name))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", "--root=%s" % root,
                           "/etc/systemd/system/vmbackup.service",
                           "/etc/systemd/system/vmbackup.timer"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout
