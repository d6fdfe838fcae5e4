# BMI developer entry points. Every target sets up what it needs (see `setup`).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := .stamps
PROTO_SRC := $(wildcard proto/bmi/v1/*.proto)
GEN_DIR := clients/python
DEBIAN_PACKAGES := ceph-mon ceph-osd ceph-mgr ceph-common python3-rados python3-rbd \
	tgt tgt-rbd libiscsi-bin qemu-system-x86 qemu-utils qemu-block-extra ipxe-qemu \
	protobuf-compiler postgresql
PYTEST_ARGS ?=

.PHONY: setup debian-packages venv proto test unit integration lint demo bench clean ceph-up

setup: $(STAMPS)/debian $(STAMPS)/venv proto

debian-packages: $(STAMPS)/debian

# Idempotent and quiet: apt runs only when a package is missing.
$(STAMPS)/debian: Makefile
	@mkdir -p $(STAMPS)
	@missing=$$(for p in $(DEBIAN_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends $$missing >/dev/null || exit 1; \
	fi
	@touch $@

venv: $(STAMPS)/venv

# The venv sees Debian's rados/rbd bindings (built for Python 3.11) through a
# directory holding only those two modules, so no other Debian package leaks in.
$(STAMPS)/venv: pyproject.toml $(STAMPS)/debian
	@mkdir -p $(STAMPS)
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	@mkdir -p $(VENV)/debian-ceph
	@ln -sf /usr/lib/python3/dist-packages/rados.cpython-311-x86_64-linux-gnu.so $(VENV)/debian-ceph/
	@ln -sf /usr/lib/python3/dist-packages/rbd.cpython-311-x86_64-linux-gnu.so $(VENV)/debian-ceph/
	@echo "$(CURDIR)/$(VENV)/debian-ceph" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/debian-ceph.pth"
		@$(PY) -m pip install -q -e '.[dev]' >$(STAMPS)/pip.log 2>&1 || { cat $(STAMPS)/pip.log; exit 1; }
	@$(PY) -c 'import rados, rbd' || { echo "rados/rbd bindings not importable"; exit 1; }
	@touch $@

proto: $(STAMPS)/proto

$(STAMPS)/proto: $(PROTO_SRC) $(STAMPS)/venv
	@$(PY) -m grpc_tools.protoc -I proto --python_out=$(GEN_DIR) --pyi_out=$(GEN_DIR) \
		--grpc_python_out=$(GEN_DIR) $(PROTO_SRC)
	@touch $@

lint: setup
	$(VENV)/bin/ruff check .

unit: setup
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

# Integration tests start their own throwaway Ceph cluster (and PostgreSQL when
# BMI_TEST_POSTGRES_URL is set).
test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(PY) -m bmi_server.devenv.demo

# Benchmarks (never part of `make test`): quick by default, BENCH_SCALE=full for the
# large profile. Writes bench/results/latest.json and provision.png.
bench: setup $(STAMPS)/bench
	$(PY) -m bench.run $(BENCH)

$(STAMPS)/bench: pyproject.toml
	@$(PY) -m pip install -q -e '.[bench]' >$(STAMPS)/pip-bench.log 2>&1 || { cat $(STAMPS)/pip-bench.log; exit 1; }
	@touch $@

ceph-up: setup
	$(PY) -m bmi_server.devenv.ceph_cluster start

clean:
	rm -rf $(STAMPS) $(VENV) .pytest_cache .ruff_cache
	rm -f $(GEN_DIR)/bmi/v1/*_pb2*.py $(GEN_DIR)/bmi/v1/*_pb2*.pyi
