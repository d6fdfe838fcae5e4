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
	protobuf-compiler postgresql kmod e2fsprogs bubblewrap \
	mmdebstrap grub-pc-bin grub-efi-amd64-bin mtools dosfstools fdisk ovmf ipxe openssh-client
PYTEST_ARGS ?=

.PHONY: setup debian-packages venv proto test unit integration lint demo bench profile chaos clean ceph-up

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
test: setup proto-check
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(PY) -m bmi_server.devenv.demo

# Benchmarks (never part of `make test`): quick by default, BENCH_SCALE=full for the
# large profile. Writes bench/results/latest.json, latest.md and latest.png.
bench: setup $(STAMPS)/bench
	$(PY) -m bench.run $(BENCH)

# Where the server's time goes under one benchmark's load (py-spy on bmi-server):
# PROFILE=provision|boot_storm|agent_storm, PROFILE_ARGS=--gil for Python CPU only.
# Writes bench/results/profile-<load>.txt.
PROFILE ?= agent_storm
profile: setup $(STAMPS)/bench
	$(PY) -m bench.profile $(PROFILE) $(PROFILE_ARGS)

# Load and faults together (never part of `make test`): 10 operators provisioning and
# deprovisioning under a 1000-node boot storm for CHAOS_MINUTES, then DB, Ceph and tgtd
# must agree and the server's memory be flat. Writes bench/results/chaos.md.
CHAOS_MINUTES ?= 10
chaos: setup
	$(PY) -m bench.chaos --minutes $(CHAOS_MINUTES) $(CHAOS)

$(STAMPS)/bench: pyproject.toml
	@$(PY) -m pip install -q -e '.[bench]' >$(STAMPS)/pip-bench.log 2>&1 || { cat $(STAMPS)/pip-bench.log; exit 1; }
	@touch $@

ceph-up: setup
	$(PY) -m bmi_server.devenv.ceph_cluster start

clean:
	rm -rf $(STAMPS) $(VENV) .pytest_cache .ruff_cache
	rm -f $(GEN_DIR)/bmi/v1/*_pb2*.py $(GEN_DIR)/bmi/v1/*_pb2*.pyi

# The node agent's kernel + initramfs in build/agent-image (gitignored), from Debian
# packages fetched with apt-get download (kept in build/agent-image/debs). The builder
# (bmi_server/devenv/agent_image.py) skips the build when its inputs are unchanged.
.PHONY: agent-image
agent-image: setup
	@$(PY) -m bmi_server.devenv.agent_image

# A Debian 12 golden image that boots through BMI by sanboot on BIOS and UEFI:
# build/os-image/debian-12.qcow2 (gitignored), built with mmdebstrap from Debian's packages
# (.debs kept in build/os-image/debs). The builder (bmi_server/devenv/os_image.py) skips the
# build when its inputs (package versions, the builder itself) are unchanged.
.PHONY: os-image
os-image: setup
	@$(PY) -m bmi_server.devenv.os_image

# --- Go client stubs, proto hygiene, docs ---------------------------------------------------
# Debian packages these need, kept apart from DEBIAN_PACKAGES: Go, Debian's Go gRPC/protobuf
# libraries (/usr/share/gocode) and protoc plugins, and protobuf's well-known .proto files.
# golang-github-golang-protobuf-1-5-dev, not the 1-3 that golang-google-grpc-dev would pick:
# 1.3 cannot marshal messages made by Debian's APIv2 protoc-gen-go.
# npm (for buf) comes from Debian's nodejs + npm only if no npm is installed already.
TOOL_PACKAGES := golang-go golang-google-grpc-dev golang-google-protobuf-dev \
	golang-github-golang-protobuf-1-5-dev protoc-gen-go protoc-gen-go-grpc libprotobuf-dev
GO_MODULE := github.com/CCI-MOC/bmi/clients/go
GO_GEN_DIR := clients/go/bmi/v1
# protoc-gen-go-grpc writes a *_grpc.pb.go only for files that declare a service.
GO_STUBS := $(patsubst proto/bmi/v1/%.proto,$(GO_GEN_DIR)/%.pb.go,$(PROTO_SRC)) \
	$(patsubst proto/bmi/v1/%.proto,$(GO_GEN_DIR)/%_grpc.pb.go,\
	  $(shell grep -l '^service ' $(PROTO_SRC) 2>/dev/null))
GO_SRC := clients/go/go.mod $(shell find clients/go/cmd clients/go/cli clients/go/retry -name '*.go' 2>/dev/null)
GO_BIN := build/go/bin/bmi-list-images
GO_PATH_DIR := build/go/gopath
# Offline, reproducible: GOPATH mode over Debian's /usr/share/gocode, nothing downloaded.
# The module is linked into a private GOPATH under its import path.
GO_ENV := GO111MODULE=off GOPROXY=off GOFLAGS= GOCACHE=$(CURDIR)/build/go/cache \
	GOPATH=$(CURDIR)/$(GO_PATH_DIR):/usr/share/gocode
GO_PACKAGES := $(GO_MODULE)/bmi/v1 $(GO_MODULE)/retry $(GO_MODULE)/cli \
	$(GO_MODULE)/cmd/bmi-list-images \
	$(GO_MODULE)/cmd/bmi-import-url
BUF := node_modules/.bin/buf
BUF_ENV := BUF_CACHE_DIR=$(CURDIR)/build/buf-cache

.PHONY: tool-packages go proto-check proto-baseline docs

setup: $(STAMPS)/tools

tool-packages: $(STAMPS)/tools

# Idempotent and quiet, like $(STAMPS)/debian.
$(STAMPS)/tools: Makefile
	@mkdir -p $(STAMPS)
	@missing=$$(for p in $(TOOL_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	command -v npm >/dev/null || missing="$$missing nodejs npm"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends $$missing >/dev/null || exit 1; \
	fi
	@touch $@

# Go stubs (gitignored, never committed) with Debian's protoc-gen-go and protoc-gen-go-grpc;
# then vet, unit-test and build the example against Debian's gRPC.
go: $(GO_BIN)
	@:

$(GO_STUBS) &: $(PROTO_SRC) | $(STAMPS)/tools
	@rm -rf $(GO_GEN_DIR) && mkdir -p $(GO_GEN_DIR)
	@protoc -I proto -I /usr/include --go_out=clients/go --go_opt=module=$(GO_MODULE) \
		--go-grpc_out=clients/go --go-grpc_opt=module=$(GO_MODULE) $(PROTO_SRC)

$(GO_BIN): $(GO_STUBS) $(GO_SRC)
	@mkdir -p $(GO_PATH_DIR)/src/$(dir $(GO_MODULE)) $(dir $@)
	@ln -sfn $(CURDIR)/clients/go $(GO_PATH_DIR)/src/$(GO_MODULE)
	@$(GO_ENV) go vet $(GO_PACKAGES)
	@out=$$($(GO_ENV) go test -count=1 $(GO_PACKAGES) 2>&1) || { echo "$$out"; exit 1; }
	@$(GO_ENV) go build -o $@ $(GO_MODULE)/cmd/bmi-list-images
	@$(GO_ENV) go build -o $(dir $@)bmi-import-url $(GO_MODULE)/cmd/bmi-import-url

# buf from the npm registry into ./node_modules, exactly as package-lock.json says.
$(BUF): package.json package-lock.json | $(STAMPS)/tools
	@npm ci --no-audit --no-fund --loglevel=error >/dev/null
	@touch $@

# buf lint (STANDARD + COMMENTS, see buf.yaml), buf format, and buf breaking against the
# image of the last release (proto/baseline.binpb).
proto-check: $(BUF)
	@$(BUF_ENV) $(BUF) lint
	@$(BUF_ENV) $(BUF) format --diff --exit-code
	@$(BUF_ENV) $(BUF) breaking --against proto/baseline.binpb

# At a release: make the current API the baseline later changes must stay compatible with.
proto-baseline: $(BUF)
	$(BUF_ENV) $(BUF) build --exclude-source-info -o proto/baseline.binpb

# docs/api.md from the proto comments; the lifecycle table in docs/architecture.md from
# bmi_server/core/lifecycle.py. tests/test_docs.py fails when either is stale.
docs: $(STAMPS)/venv
	@$(PY) tools/gen_api_docs.py -o docs/api.md
	@$(PY) tools/gen_state_table.py docs/architecture.md
