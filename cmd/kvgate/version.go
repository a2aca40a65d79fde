package main

import (
	"fmt"
	"io"
	"runtime"
	"runtime/debug"

	llamacpp "github.com/kvgate/kvgate/native/llama"
)

// llamaCommit is the llama.cpp commit that the ollama module pinned in
// go.mod vendors (see native/llama_api.h).
const llamaCommit = "ec98e2002"

// ollamaModule is the Go module that vendors llama.cpp.
const ollamaModule = "github.com/ollama/ollama"

// versionInfo describes this binary: kvgate's version from the Go build
// info, the llama.cpp it links, the Go version and llama.cpp's CPU
// features.
func versionInfo() (kvgate, llama, goVersion, system string) {
	kvgate, llama = "(devel)", llamaCommit
	if bi, ok := debug.ReadBuildInfo(); ok {
		if v := bi.Main.Version; v != "" {
			kvgate = v
		}
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 && kvgate == "(devel)" {
				kvgate = "(devel) " + s.Value[:12]
			}
		}
		for _, d := range bi.Deps {
			if d.Path == ollamaModule {
				llama = fmt.Sprintf("%s (vendored by %s %s)", llamaCommit, ollamaModule, d.Version)
			}
		}
	}
	return kvgate, llama, runtime.Version(), llamacpp.SystemInfo()
}

// printVersion writes versionInfo, one item a line.
func printVersion(w io.Writer) {
	kvgate, llama, goVersion, system := versionInfo()
	fmt.Fprintf(w, "kvgate %s\nllama.cpp %s\ngo %s %s/%s\ncpu %s\n", kvgate, llama, goVersion, runtime.GOOS, runtime.GOARCH, system)
}
