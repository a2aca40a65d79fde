package server

import (
	"bufio"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"strings"

	"github.com/kvgate/kvgate/internal/cpus"
	"github.com/kvgate/kvgate/native/llama"
)

// llamaLogLevel parses Config.LlamaLog.
func llamaLogLevel(s string) (llama.LogLevel, error) {
	switch s {
	case "none":
		return llama.LogNone, nil
	case "error":
		return llama.LogError, nil
	case "warn":
		return llama.LogWarn, nil
	case "info":
		return llama.LogInfo, nil
	case "debug":
		return llama.LogDebug, nil
	}
	return 0, fmt.Errorf("--llama-log %q: want none, error, warn, info or debug", s)
}

// initLlama initializes llama.cpp with the log level named by level
// (Config.LlamaLog, already validated).
func initLlama(level string) {
	l, _ := llamaLogLevel(level)
	llama.Init(l)
}

// checkCPU logs llama.cpp's CPU features and the threads it will use, and
// warns when SIMD the CPU has was not compiled in.
func checkCPU(log *slog.Logger, threads int) {
	sys := llama.SystemInfo()
	log.Info("llama.cpp system info", "features", sys, "threads", threads, "cpus", cpus.Available().String())
	if runtime.GOARCH != "amd64" {
		return
	}
	flags := cpuFlags()
	var missing []string
	for _, f := range []struct{ cpu, llama string }{{"avx2", "AVX2 = 1"}, {"fma", "FMA = 1"}, {"f16c", "F16C = 1"}} {
		if flags[f.cpu] && !strings.Contains(sys, f.llama) {
			missing = append(missing, strings.ToUpper(f.cpu))
		}
	}
	if len(missing) > 0 {
		log.Warn("llama.cpp was built without SIMD this CPU has; decoding will be several times slower. "+
			`Rebuild with CGO_CFLAGS="-O3 -march=native" CGO_CXXFLAGS="-O3 -march=native" (the Makefile does)`,
			"missing", strings.Join(missing, ","))
	}
}

// cpuFlags returns the CPU flags /proc/cpuinfo lists, or nil where it
// cannot be read.
func cpuFlags() map[string]bool {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	out := map[string]bool{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "flags") {
			if _, v, ok := strings.Cut(line, ":"); ok {
				for _, fl := range strings.Fields(v) {
					out[fl] = true
				}
			}
			break
		}
	}
	return out
}
