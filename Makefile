# shimd: the two commands a new user needs are `make run` and `make test`.
VENV    ?= .venv
# Empty: deploy/python.sh picks the interpreter (the distribution's first).
PYTHON  ?=
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test deps deb-deps py-deps native tools proto lint bench soak clean

deps: deb-deps py-deps native

# The compiled runc shim (shims/native), from crates.io at the versions in its Cargo.lock; without cargo,
# runc pods run under the Python shim (handlers' shim = "auto").
# rustup installs cargo in ~/.cargo/bin, which a non-login shell's PATH may lack.
CARGO ?= $(shell command -v cargo 2>/dev/null || echo $$HOME/.cargo/bin/cargo)
native:
	@if [ -x "$(CARGO)" ]; then \
		"$(CARGO)" build -q --release --locked --manifest-path shims/native/Cargo.toml; \
	else echo "native: cargo not found; runc pods will run under the Python shim" >&2; fi

deb-deps:
	@bash deploy/deps.sh

py-deps: $(STAMP)

# critest, crictl and kubelet, built from their Go modules at pinned versions into .tools/bin; a criu
# for the checkpoint tests in .tools/criu when the system's cannot run on this kernel.
tools:
	@bash tests/tools/install.sh
	@bash tests/tools/criu.sh || echo "tools: no criu for the checkpoint round trip (tests/tools/criu.sh failed); it will be skipped" >&2

$(STAMP): pyproject.toml
	@test -x $(PY) || { py=$$(PYTHON=$(PYTHON) bash deploy/python.sh) && "$$py" -m venv $(VENV); }
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

CNI_DIR ?= /etc/cni/net.d

run: deps
	@if [ -z "$$(ls -A $(CNI_DIR) 2>/dev/null)" ]; then \
		mkdir -p $(CNI_DIR) && $(VENV)/bin/shimd config cni-default > $(CNI_DIR)/10-shimd.conflist && \
		echo "installed shimd's default CNI network in $(CNI_DIR)/10-shimd.conflist"; fi
	@$(VENV)/bin/shimd serve $(SHIMD_ARGS)

# Lint and tests (the compiled shim's own, then pytest) always run; any failing fails the target.
test: deps tools
	@rc=0; $(PY) -m ruff check shimd shims shimproto tests || rc=1; \
	if [ -x "$(CARGO)" ]; then "$(CARGO)" test -q --release --locked --manifest-path shims/native/Cargo.toml || rc=1; fi; \
	$(PY) -m pytest $(PYTEST_ARGS) || rc=1; exit $$rc

proto: py-deps
	@$(PY) shimd/api/generate.py

lint: py-deps
	@$(PY) -m ruff check shimd shims shimproto tests

bench: deps
	@$(PY) -m tests.bench $(BENCH_ARGS)

# The fault-tolerance tests at full size (200 random operations under SIGKILL, 100 parallel pods, a long
# fuzz run), then a 10-minute create/exec/remove soak (SOAK_MINUTES to change it).
SOAK_MINUTES ?= 10
soak: deps
	@SHIMD_CHAOS_OPS=200 SHIMD_PARALLEL_PODS=100 SHIMD_FUZZ_EXAMPLES=1000 \
		$(PY) -m pytest tests/reliability -p no:cacheprovider $(PYTEST_ARGS)
	@$(PY) -m tests.bench.bench_soak --minutes $(SOAK_MINUTES)

clean:
	rm -rf $(VENV) .tools tests/.generated .pytest_cache .ruff_cache shims/native/target
