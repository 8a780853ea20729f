# vmbackup: `make` builds vmbackup.py from src/vmbackup/; `make demo` backs up the
# simulated demo pool into ./demo-backups; `make test` rebuilds vmbackup.py and runs the
# whole test suite. demo and test set up their own virtualenv.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
APT_PACKAGES = xva-img qemu-utils zstd gzip curl openssl libvhdi-utils python3-libvhdi \
               libnbd-bin nbdkit prometheus
TOOLS        = xva-img qemu-img zstd gzip curl openssl vhdiinfo nbdinfo nbdcopy nbdkit promtool
SOURCES     := $(shell find src -name '*.py' | sort)

.PHONY: all build venv deps test demo sim bench clean

all: vmbackup.py

# The shipped one-file vmbackup.py is built from the package; edit src/, never vmbackup.py.
vmbackup.py: $(SOURCES) tools/build.py
	$(PYTHON) tools/build.py

build: vmbackup.py

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

# System tools the tests check files with (Debian/Ubuntu; run as root or with sudo).
deps:
	@missing=""; for t in $(TOOLS); do \
	  command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing $(APT_PACKAGES) (missing:$$missing)"; \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
	  for p in $(APT_PACKAGES); do \
	    $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq $$p >/dev/null || exit 1; done; fi

test: vmbackup.py venv deps
	$(PYTHON) tools/build.py --check
	$(VENV)/bin/vermin --no-tips --target=3.6- --violations vmbackup.py
	$(PY) -m pytest

demo: venv
	$(PY) tests/demo.py demo-backups

sim: venv
	$(PY) tests/xapisim --port 8080

bench: venv deps
	$(PY) bench/sim_export_raw.py
	$(PY) bench/vmbackup_export.py
	$(PY) bench/jobs_scaling.py

clean:
	rm -rf $(VENV) demo-backups .pytest_cache
