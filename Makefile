# kvgate build. ggml's CPU kernels must be compiled with SIMD: without
# -march flags they are built for baseline x86-64 and run several times
# slower. Override CGO_CFLAGS / CGO_CXXFLAGS to build for another target.
CGO_CFLAGS   ?= -O3 -march=native
CGO_CXXFLAGS ?= -O3 -march=native
export CGO_CFLAGS CGO_CXXFLAGS
export CGO_ENABLED := 1

BIN   := $(CURDIR)/.bin
GO    ?= go
export PATH := $(BIN):$(PATH)

.PHONY: all build tools gen gen-check lint vet test test-short serve clean

all: build

## build: compile the kvgate binary into .bin/kvgate.
build:
	$(GO) build -o $(BIN)/kvgate ./cmd/kvgate

## tools: install the pinned code generators and grpcurl into .bin/.
tools:
	./scripts/tools.sh

## gen: regenerate gen/ from proto/ with buf.
gen: tools
	buf generate

## gen-check: fail when the committed generated code is stale.
gen-check: gen
	git diff --exit-code -- gen/
	@test -z "$$(git status --porcelain -- gen/)" || (echo "gen/ has untracked generated files"; git status --porcelain -- gen/; exit 1)

## lint: buf lint, gofmt and go vet.
lint: tools
	buf lint
	@test -z "$$(gofmt -l $$(git ls-files '*.go' | grep -v '^gen/'))" || (gofmt -l $$(git ls-files '*.go' | grep -v '^gen/'); exit 1)
	$(GO) vet ./...

## test: everything CI runs: lint, generated-code staleness, and all tests.
test: gen-check lint build
	$(GO) test -count=1 -timeout 45m ./...

## serve: run the server on the default model (fetched and verified on first use).
serve: build
	$(BIN)/kvgate serve

clean:
	rm -rf $(BIN)
