# vmbackup: `make demo` backs up the simulated demo pool into ./demo-backups;
# `make test` runs the whole test suite. Both set up their own virtualenv.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
APT_PACKAGES = xva-img qemu-utils zstd gzip curl openssl

.PHONY: all venv deps test demo sim bench clean

all: test

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

# System tools the tests check files with (Debian/Ubuntu; run as root or with sudo).
deps:
	@missing=""; for t in xva-img qemu-img zstd gzip curl openssl; do \
	  command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing $(APT_PACKAGES) (missing:$$missing)"; \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq $(APT_PACKAGES); fi

test: venv deps
	$(VENV)/bin/vermin --no-tips --target=3.6- --violations vmbackup.py
	$(PY) -m pytest

demo: venv
	$(PY) tests/demo.py demo-backups

sim: venv
	$(PY) tests/xapisim --port 8080

bench: venv deps
	$(PY) bench/sim_export_raw.py
	$(PY) bench/vmbackup_export.py

clean:
	rm -rf $(VENV) demo-backups .pytest_cache
