# Developer commands. Everything runs offline with the tools from `pip install -e '.[dev]'`.
PYTHON ?= python
BIN := $(dir $(shell $(PYTHON) -c 'import sys; print(sys.executable)'))
export PATH := $(BIN):$(PATH)

.PHONY: gen lint breaking test check googleapis

## googleapis: stage google/api/*.proto from the installed googleapis-common-protos for buf
googleapis:
	$(PYTHON) -m agentplex.gateway.googleapis .build/googleapis

## gen: regenerate gen/python from proto/ (buf drives grpcio-tools' protoc)
gen: googleapis
	buf lint
	rm -rf gen/python/agentplex
	mkdir -p gen/python
	buf generate

## lint: buf lint on the contracts, ruff on the code
lint: googleapis
	buf lint
	ruff check .
	ruff format --check .

## breaking: agentplex.v1 against its first published version (wire and JSON)
breaking: googleapis
	buf breaking --against ".git#ref=$$(git rev-list --max-parents=0 HEAD)"

## test: the whole suite (the same command CI runs)
test:
	pytest

## check: lint, then the whole suite
check: lint breaking test
