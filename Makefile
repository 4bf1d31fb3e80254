SHELL := /bin/bash
# snapview: containerd-shim-snapview-v2
#
#   make demo    build, start a private containerd, run a container with snapview, clean up
#   make test    every test: unit, e2e against real containerd + runc (and nerdctl),
#                the Docker Engine on snapview, containerd's own client suite on
#                runc and snapview, and a Kubernetes cluster
#                (e2e, docker-e2e, parity and k8s-e2e need root)

GO        ?= go
PREFIX    ?= /usr/local
CACHE     := $(CURDIR)/.cache
TOOLS     := $(CACHE)/tools
BIN       := $(CURDIR)/bin
SHIM      := $(BIN)/containerd-shim-snapview-v2
CTL       := $(BIN)/snapviewctl
# The shim with crash points compiled in, for the e2e crash matrix only.
FAULT_SHIM := $(BIN)/fault/containerd-shim-snapview-v2
# snapviewctl with crash points, for the e2e test of killed captures.
FAULT_CTL := $(BIN)/fault/snapviewctl
# The shims of earlier releases, for the upgrade test, built from this
# repository's history: the release before this one, and the last release
# whose shim performs none of the mounts snapview claims from containerd
# (the one before layered block mode).
PREVIOUS_RELEASES ?= b9d17c5 d235d52
PREVIOUS_SHIMS := $(foreach r,$(PREVIOUS_RELEASES),$(BIN)/previous-$(r)/containerd-shim-snapview-v2)

CONTAINERD_VERSION        ?= v2.4.2
CONTAINERD_COMPAT_VERSION ?= v2.2.9
RUNC_VERSION              ?= v1.5.2
K8S_VERSION               ?= v1.37.2
CNI_PLUGINS_VERSION       ?= v1.10.0
GOLANGCI_LINT_VERSION     ?= v2.15.0
NERDCTL_VERSION           ?= v2.3.5
DOCKERD_VERSION           ?= v2.0.0-beta.24
REGISTRY_VERSION          ?= v3.1.2
GOLANGCI_LINT             := $(TOOLS)/golangci-lint-$(GOLANGCI_LINT_VERSION)/golangci-lint

VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
REVISION ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
LDFLAGS  := -s -w \
	-X github.com/containerd/containerd/v2/version.Version=$(VERSION) \
	-X github.com/containerd/containerd/v2/version.Revision=$(REVISION) \
	-X github.com/containerd/containerd/v2/version.Package=github.com/snapview/snapview

# What the e2e harness and the demo are told about the tools.
E2E_ENV := SNAPVIEW_SHIM=$(SHIM) SNAPVIEW_CTL=$(CTL) SNAPVIEW_FAULT_SHIM=$(FAULT_SHIM) SNAPVIEW_FAULT_CTL=$(FAULT_CTL) SNAPVIEW_PREVIOUS_SHIMS="$(foreach r,$(PREVIOUS_RELEASES),$(r)=$(BIN)/previous-$(r)/containerd-shim-snapview-v2)" \
	SNAPVIEW_CONTAINERD=$(TOOLS)/containerd-$(CONTAINERD_VERSION)/containerd \
	SNAPVIEW_CONTAINERD_COMPAT=$(TOOLS)/containerd-$(CONTAINERD_COMPAT_VERSION)/containerd \
	SNAPVIEW_RUNC=$(TOOLS)/runc-$(RUNC_VERSION)-seccomp/runc \
	SNAPVIEW_GUEST_KERNEL=$(TOOLS)/guest-kernel/root \
	SNAPVIEW_NERDCTL=$(TOOLS)/nerdctl-$(NERDCTL_VERSION)/nerdctl \
	SNAPVIEW_DOCKERD=$(TOOLS)/dockerd-$(DOCKERD_VERSION)/dockerd \
	SNAPVIEW_REGISTRY=$(TOOLS)/registry-$(REGISTRY_VERSION)/registry

E2E_FLAGS ?= -count=1 -timeout 40m
UNIT_PKGS  = $(shell $(GO) list ./... | grep -v /tests/)

.PHONY: all build deps demo-deps k8s-deps test unit e2e docker-e2e k8s-e2e demo demo-vm bench soak parity parity-runsc fuzz install lint clean

all: build

build: $(SHIM) $(CTL)

# Module downloads on a fresh machine are kept out of the way.
QUIET := 2> >(grep -v '^go: downloading' >&2)

$(SHIM): $(shell find cmd pkg params -name '*.go') go.mod go.sum
	@echo "[build] containerd-shim-snapview-v2"
	@CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $@ ./cmd/containerd-shim-snapview-v2 $(QUIET)

$(FAULT_SHIM): $(shell find cmd pkg params -name '*.go') go.mod go.sum
	@echo "[build] containerd-shim-snapview-v2 with fault points (tests only)"
	@CGO_ENABLED=0 $(GO) build -trimpath -tags snapview_faults -ldflags '$(LDFLAGS)' -o $@ ./cmd/containerd-shim-snapview-v2 $(QUIET)

$(BIN)/previous-%/containerd-shim-snapview-v2:
	@./hack/build-previous.sh $* $@

$(FAULT_CTL): $(shell find cmd pkg snapshots params -name '*.go') go.mod go.sum
	@echo "[build] snapviewctl with fault points (tests only)"
	@CGO_ENABLED=0 $(GO) build -trimpath -tags snapview_faults -ldflags '-s -w' -o $@ ./cmd/snapviewctl $(QUIET)

$(CTL): $(shell find cmd pkg snapshots params -name '*.go') go.mod go.sum
	@echo "[build] snapviewctl"
	@CGO_ENABLED=0 $(GO) build -trimpath -ldflags '-s -w' -o $@ ./cmd/snapviewctl $(QUIET)

# Everything the tests use: both containerd versions, and the clients
# (nerdctl, dockerd, the Distribution registry).
deps:
	@TOOLS=$(TOOLS) CONTAINERD_VERSIONS="$(CONTAINERD_VERSION) $(CONTAINERD_COMPAT_VERSION)" \
		RUNC_VERSION=$(RUNC_VERSION) ./hack/install-deps.sh
	@TOOLS=$(TOOLS) NERDCTL_VERSION=$(NERDCTL_VERSION) DOCKERD_VERSION=$(DOCKERD_VERSION) \
		REGISTRY_VERSION=$(REGISTRY_VERSION) ./hack/install-clients.sh

# What the demos use: the newest containerd only.
demo-deps:
	@TOOLS=$(TOOLS) CONTAINERD_VERSIONS="$(CONTAINERD_VERSION)" \
		RUNC_VERSION=$(RUNC_VERSION) ./hack/install-deps.sh

test: build deps unit
	@if [ "$$(id -u)" -ne 0 ]; then \
		echo "make test: e2e and parity SKIPPED: they need root (mounts, loop devices, a private containerd); run 'sudo make test'"; \
	else \
		$(MAKE) --no-print-directory e2e && $(MAKE) --no-print-directory docker-e2e && \
		$(MAKE) --no-print-directory parity && $(MAKE) --no-print-directory k8s-e2e; \
	fi

unit:
	$(GO) test -count=1 $(UNIT_PKGS)

e2e: build $(FAULT_SHIM) $(FAULT_CTL) $(PREVIOUS_SHIMS) deps
	$(E2E_ENV) $(GO) test $(E2E_FLAGS) -v ./tests/e2e/ 2>&1 | tee $(CACHE)/e2e.log | grep -E '^(=== RUN|--- |\s+--- |PASS|FAIL|ok|panic|\s+\S+_test.go)' ; \
		exit $${PIPESTATUS[0]}

# Docker's Engine (dockerd, built by hack/install-clients.sh) on a private
# containerd, driven by moby's Go client from a module of its own
# (tests/docker), so that the shim's module never imports moby.
DOCKER_E2E_FLAGS ?= -count=1 -timeout 20m
docker-e2e: build deps
	cd tests/docker && $(E2E_ENV) $(GO) test $(DOCKER_E2E_FLAGS) -v ./... 2>&1 | tee $(CACHE)/docker-e2e.log | grep -E '^(=== RUN|--- |\s+--- |PASS|FAIL|ok|panic|\s+\S+_test.go)' ; \
		exit $${PIPESTATUS[0]}

# The Kubernetes components, from Kubernetes' own code (hack/k8s), and the
# CNI plugins of the Kubernetes test.
k8s-deps:
	@TOOLS=$(TOOLS) K8S_VERSION=$(K8S_VERSION) CNI_PLUGINS_VERSION=$(CNI_PLUGINS_VERSION) ./hack/install-k8s.sh

# A one-node cluster on a private containerd: snapview installed with
# kubectl apply -f deploy/, pods of its RuntimeClass through the kubelet.
K8S_E2E_FLAGS ?= -count=1 -timeout 30m
k8s-e2e: build deps k8s-deps
	$(E2E_ENV) SNAPVIEW_K8S=$(TOOLS)/kubernetes-$(K8S_VERSION) SNAPVIEW_CNI=$(TOOLS)/cni-plugins-$(CNI_PLUGINS_VERSION) \
		$(GO) test $(K8S_E2E_FLAGS) -v ./tests/k8s/ 2>&1 | tee $(CACHE)/k8s-e2e.log | grep -E '^(=== RUN|--- |\s+--- |PASS|FAIL|ok|panic|\s+\S+_test.go)' ; \
		exit $${PIPESTATUS[0]}

demo: build demo-deps
	@$(E2E_ENV) $(GO) run ./tests/demo $(QUIET)

# qemu in a block-mode container boots the image's kernel on the container's
# own disk (TCG without /dev/kvm).
demo-vm: build demo-deps
	@$(E2E_ENV) $(GO) run ./tests/demovm $(QUIET)

bench: build deps
	@$(E2E_ENV) $(GO) run ./tests/bench $(BENCH_FLAGS)

# Thousands of containers through snapview; SOAK_CYCLES scales it (a short
# version runs in make test, as the e2e TestSoakShort).
SOAK_CYCLES ?= 1000
soak: build deps
	@$(E2E_ENV) $(GO) run ./tests/soak -cycles $(SOAK_CYCLES) $(SOAK_FLAGS)

# containerd's own client integration suite on runc and on snapview, both
# daemons; PARITY_FLAGS=-run REGEX narrows it.
parity: build deps
	@$(E2E_ENV) $(GO) run ./tests/parity -cache $(CACHE)/parity $(PARITY_FLAGS)

# The same with gVisor's runsc as the OCI runtime under both shims (about
# 27 minutes: gVisor hangs in two of the suite's tests, which are ended
# after 2 minutes without output); not part of make test.
parity-runsc: build deps
	@$(E2E_ENV) $(GO) run ./tests/parity -cache $(CACHE)/parity -oci-runtime runsc -timeout 20m $(PARITY_FLAGS)

# Each fuzz target runs for FUZZTIME; `make test` runs their seed corpora.
FUZZTIME ?= 60s
FUZZ_TARGETS := ./pkg/annotations:FuzzParse ./pkg/annotations:FuzzParseVolume ./pkg/config:FuzzParse ./pkg/bundle:FuzzParseState \
	./pkg/snapshot/record:FuzzParseID ./pkg/diskstream:FuzzRestore
fuzz:
	@for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; fn=$${t##*:}; \
		echo "== $$pkg $$fn ($(FUZZTIME))"; \
		$(GO) test -run '^$$' -fuzz "^$$fn$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
	done

install: build
	install -D -m 0755 $(SHIM) $(DESTDIR)$(PREFIX)/bin/containerd-shim-snapview-v2
	install -D -m 0755 $(CTL) $(DESTDIR)$(PREFIX)/bin/snapviewctl

# golangci-lint v2 with .golangci.yml (gofmt, goimports, vet, staticcheck and
# the linters listed there), installed once into .cache/tools; also over the
# Docker tests' module.
lint: $(GOLANGCI_LINT)
	$(GOLANGCI_LINT) run ./...
	cd tests/docker && $(GOLANGCI_LINT) run ./...

$(GOLANGCI_LINT):
	@echo "[lint] installing golangci-lint $(GOLANGCI_LINT_VERSION) (first time only, about 3 minutes)"
	GOBIN=$(dir $@) $(GO) install github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(GOLANGCI_LINT_VERSION)

clean:
	rm -rf $(BIN)
	@echo "kept $(CACHE) (built tools); remove it by hand to rebuild them"
