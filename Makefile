# Developer commands. Everything runs offline with the tools from `pip install -e '.[dev]'`.
PYTHON ?= python
BIN := $(dir $(shell $(PYTHON) -c 'import sys; print(sys.executable)'))
export PATH := $(BIN):$(PATH)

.PHONY: gen lint typecheck breaking release-contracts test check googleapis

## googleapis: refresh the vendored google/api and google/rpc protos (proto/third_party) from the
## installed googleapis-common-protos, after its pin moves (tests/proto checks they match)
googleapis:
	$(PYTHON) -m agentplex.gateway.googleapis proto/third_party/googleapis

## gen: regenerate gen/python from proto/ (buf drives grpcio-tools' protoc)
gen:
	buf lint
	rm -rf gen/python/agentplex
	mkdir -p gen/python
	buf generate

## lint: buf lint on the contracts, ruff on the code, import-linter on who may import whom
lint:
	buf lint
	ruff check .
	ruff format --check .
	lint-imports

## typecheck: mypy strict on agentplex and the tests (needs the strict editable install, README)
typecheck:
	mypy

## breaking: agentplex.v1 against the last released contracts, proto/released.json (wire and JSON)
breaking:
	mkdir -p .build
	buf build -o .build/contracts.binpb
	buf breaking .build/contracts.binpb --against proto/released.json --config buf.yaml

## release-contracts: record today's contracts as the released state every change is checked against
release-contracts: breaking
	buf build --exclude-source-info -o '-#format=json' | $(PYTHON) -m json.tool --indent 1 > proto/released.json

## test: the whole suite (the same command CI runs)
test:
	pytest

## check: lint, then the whole suite
check: lint typecheck breaking test
