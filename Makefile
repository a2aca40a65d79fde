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

.PHONY: all build tools grpcurl gen-tools gen gen-check lint vet test test-short serve clean

all: build

# The first build compiles llama.cpp and ggml, about 160 C/C++ files, which
# takes minutes and prints nothing while it runs; later builds come from Go's
# build cache. `go list` tells from the cache alone (in under a second)
# whether a cgo package of llama.cpp/ggml must be compiled for these
# CGO_CFLAGS, so only such a build says so, and lists packages with -v.
LLAMA_STALE := $(GO) list -deps -f '{{if and .Stale .CgoFiles}}{{.ImportPath}}{{end}}' ./cmd/kvgate | grep -q '^github.com/ollama/ollama/'

## build: compile the kvgate binary into .bin/kvgate.
build:
	@v=; if $(LLAMA_STALE); then \
	  echo "kvgate: first build with these CGO_CFLAGS: compiling llama.cpp and ggml's C/C++ (about 3 minutes on 2 cores, more on a busy machine; later builds take seconds)."; \
	  echo "kvgate: -v lists each package once compiled; llama.cpp's C++ files take most of the time, with no output while they compile. ggml's compiler warnings (-Wstringop-overflow in repack.cpp) are expected."; \
	  v="-v "; \
	fi; \
	echo "$(GO) build $$v-o $(BIN)/kvgate ./cmd/kvgate"; \
	$(GO) build $$v-o $(BIN)/kvgate ./cmd/kvgate

## tools: install every pinned tool (grpcurl, buf and the protoc plugins) into .bin/.
tools:
	./scripts/tools.sh all

## grpcurl: install the pinned grpcurl into .bin/ (the README's examples use it).
grpcurl:
	./scripts/tools.sh grpcurl

## gen-tools: install buf and the protoc plugins into .bin/ (for gen, gen-check, lint).
gen-tools:
	./scripts/tools.sh gen

## gen: regenerate gen/ from proto/ with buf.
gen: gen-tools
	buf generate

## gen-check: fail when the committed generated code is stale.
gen-check: gen
	git diff --exit-code -- gen/
	@test -z "$$(git status --porcelain -- gen/)" || (echo "gen/ has untracked generated files"; git status --porcelain -- gen/; exit 1)

## lint: buf lint, gofmt and go vet.
lint: gen-tools
	buf lint
	@test -z "$$(gofmt -l $$(git ls-files '*.go' | grep -v '^gen/'))" || (gofmt -l $$(git ls-files '*.go' | grep -v '^gen/'); exit 1)
	$(GO) vet ./...

## test: everything CI runs: lint, generated-code staleness, and all tests.
# Skips whose reason matches FAIL_SKIPS fail the run: a test that skips for
# a missing file or tool is a gap, not a pass. Every skip is listed at the end.
FAIL_SKIPS ?= (?i)not (found|installed)|no such file|missing
test: gen-check lint build grpcurl
	$(GO) run ./scripts/testreport -fail-skips '$(FAIL_SKIPS)' -- -count=1 -timeout 45m ./...

## serve: run the server on the default model (fetched and verified on first use);
## ARGS passes serve flags, e.g. make serve ARGS="--ctx 8192 --max-seqs 8".
ARGS ?=
serve: build
	$(BIN)/kvgate serve $(ARGS)

clean:
	rm -rf $(BIN)
