package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"

	"github.com/kvgate/kvgate/allocator"
	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/native"
	"github.com/kvgate/kvgate/service"
)

type serveConfig struct {
	listen       string
	model        string
	ctx          int
	threads      int
	batch        int
	maxSeqs      int
	maxQueue     int
	streamBuffer int
	maxStop      int
	drainTimeout time.Duration
	logLevel     string
	logFormat    string
	llamaLog     string
	prefixCache  bool
	admission    string
	watermark    int
}

func serveFlags(c *serveConfig) *flag.FlagSet {
	fs := flag.NewFlagSet("kvgate serve", flag.ContinueOnError)
	fs.StringVar(&c.listen, "listen", "localhost:50051", "address to serve gRPC on")
	fs.StringVar(&c.model, "model", "", "GGUF model file (default: stories260K, fetched once from the Go module proxy)")
	fs.IntVar(&c.ctx, "ctx", 4096, "KV cells in the pool shared by all sequences (llama.cpp pads to a multiple of 256)")
	fs.IntVar(&c.threads, "threads", 0, "CPU threads for llama.cpp (0: all)")
	fs.IntVar(&c.batch, "batch", 512, "token budget of one decode step")
	fs.IntVar(&c.maxSeqs, "max-seqs", 64, "most sequences running at once (at most 256)")
	fs.IntVar(&c.maxQueue, "max-queue", 256, "most requests waiting for admission")
	fs.IntVar(&c.streamBuffer, "stream-buffer", 1024, "events a stream may buffer before its reader counts as too slow")
	fs.IntVar(&c.maxStop, "max-stop", 16, "most stop strings per request")
	fs.DurationVar(&c.drainTimeout, "drain-timeout", 60*time.Second, "on SIGTERM, how long running streams may finish")
	fs.StringVar(&c.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	fs.StringVar(&c.logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&c.llamaLog, "llama-log", "error", "llama.cpp log level: none, error, warn, info, debug")
	fs.BoolVar(&c.prefixCache, "prefix-cache", true, "keep finished sequences' cells as a prefix cache shared by later requests")
	fs.StringVar(&c.admission, "admission", "reserve", "admission policy: reserve (prompt + max_tokens up front) or optimistic (prompt + watermark; preempts when cells run out)")
	fs.IntVar(&c.watermark, "watermark", 64, "optimistic admission: free cells a request must leave beside its prompt")
	return fs
}

func newLogger(c *serveConfig) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.logLevel)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: level}
	switch c.logFormat {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", c.logFormat)
}

func llamaLogLevel(s string) (native.LogLevel, error) {
	switch s {
	case "none":
		return native.LogNone, nil
	case "error":
		return native.LogError, nil
	case "warn":
		return native.LogWarn, nil
	case "info":
		return native.LogInfo, nil
	case "debug":
		return native.LogDebug, nil
	}
	return 0, fmt.Errorf("--llama-log %q: want none, error, warn, info or debug", s)
}

func serve(ctx context.Context, args []string) error {
	var c serveConfig
	fs := serveFlags(&c)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	log, err := newLogger(&c)
	if err != nil {
		return err
	}
	ll, err := llamaLogLevel(c.llamaLog)
	if err != nil {
		return err
	}
	switch {
	case c.ctx < 1:
		return fmt.Errorf("--ctx %d: must be positive", c.ctx)
	case c.maxSeqs < 1 || c.maxSeqs > native.MaxSequenceIDs:
		return fmt.Errorf("--max-seqs %d: must be in [1, %d]", c.maxSeqs, native.MaxSequenceIDs)
	case c.batch < 1:
		return fmt.Errorf("--batch %d: must be positive", c.batch)
	case c.maxQueue < 0:
		return fmt.Errorf("--max-queue %d: must be >= 0", c.maxQueue)
	case c.maxStop < 0:
		return fmt.Errorf("--max-stop %d: must be >= 0", c.maxStop)
	}
	native.Init(ll)
	checkCPU(log)

	path := c.model
	if path == "" {
		dir, err := modelCacheDir()
		if err != nil {
			return err
		}
		path, err = ensureModel(ctx, defaultModel, dir, func(format string, args ...any) {
			log.Info(fmt.Sprintf(format, args...))
		})
		if err != nil {
			return err
		}
	}
	model, err := loadWithProgress(path, log)
	if err != nil {
		return err
	}
	defer model.Close()
	info := model.Info()

	engine, err := native.NewEngine(model, native.EngineConfig{
		Cells: c.ctx, Batch: c.batch, MaxSequences: c.maxSeqs, Threads: c.threads, StreamBuffer: c.streamBuffer,
	})
	if err != nil {
		return fmt.Errorf("create llama.cpp context: %w", err)
	}
	defer engine.Close()

	limits := service.DefaultLimits()
	limits.MaxStopStrings = c.maxStop
	limits.MaxSequenceTokens = min(engine.Cells(), info.TrainingContext)
	var policy allocator.Policy
	switch c.admission {
	case "reserve":
		policy = allocator.PolicyReserve
	case "optimistic":
		policy = allocator.PolicyOptimistic
	default:
		return fmt.Errorf("--admission %q: want reserve or optimistic", c.admission)
	}
	seqIDs := c.maxSeqs
	if c.prefixCache {
		seqIDs = native.MaxSequenceIDs // the ids beyond running ones hold cached prefixes
	}
	alloc, err := allocator.New(allocator.Config{
		Cells:             engine.Cells(),
		MaxSequences:      seqIDs,
		MaxRunning:        c.maxSeqs,
		MaxQueue:          c.maxQueue,
		MaxSequenceTokens: limits.MaxSequenceTokens,
		PrefixCache:       c.prefixCache,
		OnEvict:           engine.Evict,
		Policy:            policy,
		Watermark:         min(c.watermark, engine.Cells()-1),
	})
	if err != nil {
		return err
	}
	svc := service.New(service.Config{
		Limits: limits, Cells: engine.Cells(), MaxSequences: c.maxSeqs, MaxQueue: c.maxQueue,
	}, model, alloc, engine)

	srv := grpc.NewServer(
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 2 * time.Minute, Timeout: 20 * time.Second}),
	)
	svc.Register(srv)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(srv, hs)
	for _, name := range []string{"", kvgatev1.GenerateService_ServiceDesc.ServiceName, kvgatev1.CacheService_ServiceDesc.ServiceName} {
		hs.SetServingStatus(name, healthpb.HealthCheckResponse_SERVING)
	}
	reflection.Register(srv)

	lis, err := net.Listen("tcp", c.listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	log.Info("kvgate listening", "addr", lis.Addr().String(), "model", filepath.Base(path),
		"arch", info.Architecture, "kv_cells", engine.Cells(), "max_seqs", c.maxSeqs, "batch", engine.Batch())

	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(lis) }()

	select {
	case err := <-serveErr:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	// Graceful drain: stop advertising, refuse new work, let running
	// streams finish, then stop.
	log.Info("draining", "timeout", c.drainTimeout, "running", alloc.Stats().Running, "queued", alloc.Stats().Queued)
	hs.Shutdown()
	alloc.Drain()
	select {
	case <-alloc.Idle():
	case <-time.After(c.drainTimeout):
		log.Warn("drain timeout: cancelling running streams", "running", alloc.Stats().Running)
	}
	engine.Close() // ends whatever still runs with UNAVAILABLE
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		srv.Stop()
		<-stopped
	}
	st := alloc.Stats()
	log.Info("stopped", "cells_used", st.CellsUsed, "cells_reserved", st.CellsReserved, "running", st.Running)
	if err := <-serveErr; err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("serve: %w", err)
	}
	return nil
}

// loadWithProgress loads the model, drawing a progress bar when stderr is a
// terminal.
func loadWithProgress(path string, log *slog.Logger) (*native.Model, error) {
	var progress func(float32)
	if fi, err := os.Stderr.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
		last := -1
		progress = func(f float32) {
			pct := int(f * 100)
			if pct == last {
				return
			}
			last = pct
			const width = 30
			n := pct * width / 100
			fmt.Fprintf(os.Stderr, "\rloading %s [%s%s] %3d%%", filepath.Base(path),
				strings.Repeat("#", n), strings.Repeat(" ", width-n), pct)
			if pct >= 100 {
				fmt.Fprintln(os.Stderr)
			}
		}
	}
	start := time.Now()
	m, err := native.LoadModel(path, native.LoadOptions{Progress: progress})
	if err != nil {
		return nil, err
	}
	info := m.Info()
	log.Info("model loaded", "path", path, "arch", info.Architecture, "params", info.ParameterCount,
		"vocab", info.VocabSize, "ctx_train", info.TrainingContext, "took", time.Since(start).Round(time.Millisecond))
	return m, nil
}

// checkCPU logs llama.cpp's CPU features and warns when SIMD the CPU has was
// not compiled in.
func checkCPU(log *slog.Logger) {
	sys := native.SystemInfo()
	log.Info("llama.cpp system info", "features", sys, "threads", runtime.NumCPU())
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
