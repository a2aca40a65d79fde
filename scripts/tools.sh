#!/usr/bin/env bash
# Install pinned tools into $REPO/.bin.
#
# Usage: scripts/tools.sh [TOOL|GROUP]...
#
#   grpcurl   the gRPC client the README's examples use (about 2 minutes to
#             build from source on 2 cores, seconds with a warm Go cache)
#   gen       buf, protoc-gen-go and protoc-gen-go-grpc: what `make gen`,
#             `make gen-check` and `make lint` need (buf is large: several
#             minutes to build from source on 2 cores)
#   all       everything (the default)
#
# A single tool can also be named (buf, protoc-gen-go, protoc-gen-go-grpc).
#
# Idempotent: a tool is rebuilt only when .bin/<tool> is missing, its stamp
# file .bin/.<tool>.version does not hold the pinned version, or the binary's
# own build info (go version -m) names another module version.
set -euo pipefail

# Pinned versions: change them here, and only here.
BUF_VERSION=v1.75.0                 # needs Go >= 1.26.7
PROTOC_GEN_GO_VERSION=v1.36.12      # keep equal to google.golang.org/protobuf in go.mod
PROTOC_GEN_GO_GRPC_VERSION=v1.6.2
GRPCURL_VERSION=v1.9.4

# name  package  version
TOOLS=(
  "buf                github.com/bufbuild/buf/cmd/buf                     ${BUF_VERSION}"
  "protoc-gen-go      google.golang.org/protobuf/cmd/protoc-gen-go        ${PROTOC_GEN_GO_VERSION}"
  "protoc-gen-go-grpc google.golang.org/grpc/cmd/protoc-gen-go-grpc       ${PROTOC_GEN_GO_GRPC_VERSION}"
  "grpcurl            github.com/fullstorydev/grpcurl/cmd/grpcurl         ${GRPCURL_VERSION}"
)

# Groups of tools, by the make targets that need them.
GROUP_gen="buf protoc-gen-go protoc-gen-go-grpc"
GROUP_all="buf protoc-gen-go protoc-gen-go-grpc grpcurl"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
BIN="$REPO/.bin"
mkdir -p "$BIN"

GO="${GO:-go}"

# up_to_date NAME PKG VERSION: true when .bin/NAME is the pinned build.
up_to_date() {
  local name=$1 pkg=$2 version=$3 exe="$BIN/$1" stamp="$BIN/.$1.version"
  [[ -x "$exe" && -f "$stamp" ]] || return 1
  [[ "$(cat "$stamp")" == "$version" ]] || return 1
  # The stamp alone could be stale; the binary's build info cannot lie.
  "$GO" version -m "$exe" 2>/dev/null | awk -v pkg="$pkg" -v ver="$version" '
    $1 == "path" && $2 == pkg { p = 1 }
    $1 == "mod" && $3 == ver  { m = 1 }
    END { exit !(p && m) }'
}

# entry NAME: the TOOLS line of NAME, or nothing.
entry() {
  local e name
  for e in "${TOOLS[@]}"; do
    read -r name _ <<<"$e"
    [[ "$name" == "$1" ]] && { printf '%s\n' "$e"; return; }
  done
}

# Expand the arguments (groups and tool names) into the tools to install.
[[ $# -gt 0 ]] || set -- all
wanted=()
for arg in "$@"; do
  group="GROUP_${arg//-/_}"
  if [[ -n "${!group:-}" ]]; then
    read -r -a names <<<"${!group}"
    wanted+=("${names[@]}")
  elif [[ -n "$(entry "$arg")" ]]; then
    wanted+=("$arg")
  else
    echo "tools: unknown tool or group \"$arg\" (groups: grpcurl, gen, all; tools: buf, protoc-gen-go, protoc-gen-go-grpc, grpcurl)" >&2
    exit 2
  fi
done

declare -A seen=()
for name in "${wanted[@]}"; do
  [[ -z "${seen[$name]:-}" ]] || continue
  seen[$name]=1
  read -r name pkg version <<<"$(entry "$name")"
  if up_to_date "$name" "$pkg" "$version"; then
    echo "tools: $name $version up to date"
    continue
  fi
  case "$name" in
    buf) echo "tools: installing $name $version (built from source: several minutes on 2 cores with a cold Go cache)" ;;
    *)   echo "tools: installing $name $version" ;;
  esac
  rm -f "$BIN/.$name.version"
  # Pure-Go tools: no cgo, so the Makefile's CGO_* flags do not apply.
  # GOFLAGS is overridden so a caller's -mod=... cannot break `go install pkg@version`.
  GOBIN="$BIN" CGO_ENABLED=0 GOFLAGS=-buildvcs=false "$GO" install "$pkg@$version"
  printf '%s\n' "$version" >"$BIN/.$name.version"
done
