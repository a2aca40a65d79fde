package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"

	"github.com/kvgate/kvgate/allocator"
	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/internal/obs"
	"github.com/kvgate/kvgate/native"
	"github.com/kvgate/kvgate/service"
)

type serveConfig struct {
	listen        string
	model         string
	ctx           int
	threads       int
	batch         int
	maxSeqs       int
	maxQueue      int
	streamBuffer  int
	maxStop       int
	drainTimeout  time.Duration
	logLevel      string
	logFormat     string
	llamaLog      string
	prefixCache   bool
	deterministic bool
	admission     string
	watermark     int
	kvType        string

	// Limits.
	maxPromptTokens     int
	maxCompletionTokens int
	maxRecvMsgSize      int

	// Operations: metrics, auth, TLS, connections.
	metricsListen   string
	pprof           bool
	authTokens      string
	tlsCert         string
	tlsKey          string
	clientCA        string
	maxConnAge      time.Duration
	maxConnAgeGrace time.Duration

	// Hardening: bounds on what one client can hold.
	maxStreamsPerConn int
	maxConnections    int
	handshakeTimeout  time.Duration
	maxConnIdle       time.Duration
	maxPromptBytes    int
	defaultMaxTokens  int
	maxTokenizeBytes  int
	tokenizerBudget   int

	// Tenants: server-wide defaults of the limits the token file may set.
	maxPriority     int
	tenantMaxShare  float64
	tenantMaxQueued int
}

// Bounds of flags that size memory.
const (
	maxStreamBuffer = 1 << 16
)

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
	fs.StringVar(&c.kvType, "kv-type", "f16", "KV cache element type: f16 (half the memory) or f32 (full precision)")
	fs.BoolVar(&c.deterministic, "deterministic", false, "make every stream's tokens bit-for-bit those of the same request run alone, whatever runs beside it (needs --prefix-cache=false; costs a padding token on one-token steps, and held steps and recomputation when cells run short)")
	fs.IntVar(&c.watermark, "watermark", 64, "optimistic admission: free cells a request must leave beside its prompt")
	fs.IntVar(&c.maxPromptTokens, "max-prompt-tokens", 0, "most prompt tokens per request (0: as many as fit a sequence)")
	fs.IntVar(&c.maxCompletionTokens, "max-completion-tokens", 0, "largest max_tokens per request (0: as many as fit a sequence)")
	fs.IntVar(&c.maxRecvMsgSize, "max-recv-msg-size", 4<<20, "largest request message in bytes")
	fs.StringVar(&c.metricsListen, "metrics-listen", "", "address to serve Prometheus /metrics and /healthz on (empty: off)")
	fs.BoolVar(&c.pprof, "pprof", false, "serve net/http/pprof under /debug/pprof/ on the metrics listener")
	fs.StringVar(&c.authTokens, "auth-tokens", "", "file of bearer tokens, one per line, required on every call but health and reflection (reloaded on SIGHUP)")
	fs.StringVar(&c.tlsCert, "tls-cert", "", "PEM certificate of the server: serve TLS (reloaded on SIGHUP)")
	fs.StringVar(&c.tlsKey, "tls-key", "", "PEM private key of --tls-cert")
	fs.StringVar(&c.clientCA, "client-ca", "", "PEM CA certificates: require client certificates signed by one of them (mutual TLS)")
	fs.DurationVar(&c.maxConnAge, "max-connection-age", 0, "close connections after this age so clients re-resolve and rebalance (0: never)")
	fs.DurationVar(&c.maxConnAgeGrace, "max-connection-age-grace", 0, "how long streams on an aged connection may finish (0: --drain-timeout); make it outlast the longest generation")
	fs.IntVar(&c.maxStreamsPerConn, "max-streams-per-conn", 128, "most concurrent calls on one connection (HTTP/2 MAX_CONCURRENT_STREAMS); grpc-go clients queue beyond it")
	fs.IntVar(&c.maxConnections, "max-connections", 512, "most open client connections; more are closed as soon as they are accepted")
	fs.DurationVar(&c.handshakeTimeout, "handshake-timeout", 5*time.Second, "a connection that has not finished its TLS and HTTP/2 handshake by then is closed")
	fs.DurationVar(&c.maxConnIdle, "max-connection-idle", 5*time.Minute, "close a connection that has had no call for this long (0: never)")
	fs.IntVar(&c.maxPromptBytes, "max-prompt-bytes", 0, "longest prompt text in bytes, checked before tokenizing (0: as long as max_prompt_tokens tokens of the model can spell)")
	fs.IntVar(&c.defaultMaxTokens, "default-max-tokens", 256, "max_tokens of a request that leaves it unset, shortened to what the prompt leaves of a sequence (0: refuse such requests)")
	fs.IntVar(&c.maxTokenizeBytes, "max-tokenize-bytes", service.DefaultMaxTokenizeBytes, "longest text of one Tokenize call")
	fs.IntVar(&c.tokenizerBudget, "tokenizer-budget", service.DefaultWorkBudget, "tokenizer work in flight at once, in bytes of text, for Tokenize, Detokenize and Generate prompts; Tokenize and Detokenize past it get RESOURCE_EXHAUSTED")
	fs.IntVar(&c.maxPriority, "max-priority", service.DefaultMaxPriority, "highest request priority a tenant may use unless its token-file line sets max-priority; higher ones get PERMISSION_DENIED")
	fs.Float64Var(&c.tenantMaxShare, "tenant-max-share", 1, "fraction of the KV cells one tenant's running requests may hold unless its token-file line sets max-share")
	fs.IntVar(&c.tenantMaxQueued, "tenant-max-queued", 0, "most queued requests of one tenant unless its token-file line sets max-queued (0: only --max-queue)")
	return fs
}

// check validates the flags that need no model.
func (c *serveConfig) check() error {
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
	case c.threads < 0:
		return fmt.Errorf("--threads %d: must be >= 0 (0: all CPUs)", c.threads)
	case c.streamBuffer < 1 || c.streamBuffer > maxStreamBuffer:
		return fmt.Errorf("--stream-buffer %d: must be in [1, %d]", c.streamBuffer, maxStreamBuffer)
	case c.maxStreamsPerConn < 1:
		return fmt.Errorf("--max-streams-per-conn %d: must be positive", c.maxStreamsPerConn)
	case c.maxConnections < 1:
		return fmt.Errorf("--max-connections %d: must be positive", c.maxConnections)
	case c.handshakeTimeout <= 0:
		return fmt.Errorf("--handshake-timeout %v: must be positive", c.handshakeTimeout)
	case c.maxConnIdle < 0:
		return fmt.Errorf("--max-connection-idle %v: must be >= 0", c.maxConnIdle)
	case c.maxPromptBytes < 0:
		return fmt.Errorf("--max-prompt-bytes %d: must be >= 0", c.maxPromptBytes)
	case c.defaultMaxTokens < 0:
		return fmt.Errorf("--default-max-tokens %d: must be >= 0", c.defaultMaxTokens)
	case c.maxTokenizeBytes < 1:
		return fmt.Errorf("--max-tokenize-bytes %d: must be positive", c.maxTokenizeBytes)
	case c.tokenizerBudget < c.maxTokenizeBytes:
		return fmt.Errorf("--tokenizer-budget %d: must be at least --max-tokenize-bytes %d", c.tokenizerBudget, c.maxTokenizeBytes)
	case c.maxPriority < math.MinInt32 || c.maxPriority > math.MaxInt32:
		return fmt.Errorf("--max-priority %d: must be a 32-bit integer", c.maxPriority)
	case !(c.tenantMaxShare > 0 && c.tenantMaxShare <= 1):
		return fmt.Errorf("--tenant-max-share %v: must be in (0, 1]", c.tenantMaxShare)
	case c.tenantMaxQueued < 0:
		return fmt.Errorf("--tenant-max-queued %d: must be >= 0", c.tenantMaxQueued)
	case c.maxPromptTokens < 0:
		return fmt.Errorf("--max-prompt-tokens %d: must be >= 0", c.maxPromptTokens)
	case c.maxCompletionTokens < 0:
		return fmt.Errorf("--max-completion-tokens %d: must be >= 0", c.maxCompletionTokens)
	case c.maxRecvMsgSize < 1:
		return fmt.Errorf("--max-recv-msg-size %d: must be positive", c.maxRecvMsgSize)
	case c.drainTimeout < 0:
		return fmt.Errorf("--drain-timeout %v: must be >= 0", c.drainTimeout)
	case c.maxConnAge < 0 || c.maxConnAgeGrace < 0:
		return fmt.Errorf("--max-connection-age %v, --max-connection-age-grace %v: must be >= 0", c.maxConnAge, c.maxConnAgeGrace)
	case c.deterministic && c.prefixCache:
		return errors.New("--deterministic needs --prefix-cache=false: a shared prefix pins a sequence's first cells where another put them")
	case c.deterministic && c.maxSeqs >= native.RetiredSequence:
		return fmt.Errorf("--max-seqs %d: --deterministic keeps two sequence ids for itself (at most %d)", c.maxSeqs, native.RetiredSequence-1)
	case c.pprof && c.metricsListen == "":
		return errors.New("--pprof needs --metrics-listen")
	case (c.tlsCert == "") != (c.tlsKey == ""):
		return errors.New("--tls-cert and --tls-key go together")
	case c.clientCA != "" && c.tlsCert == "":
		return errors.New("--client-ca needs --tls-cert and --tls-key")
	}
	return nil
}

// llamaThreads returns the thread count llama.cpp will use: --threads, or
// every CPU when it is 0 (native.ContextParams.Threads).
func (c *serveConfig) llamaThreads() int {
	if c.threads > 0 {
		return c.threads
	}
	return runtime.NumCPU()
}

// connectionGrace returns how long streams on a connection past
// --max-connection-age may go on: --max-connection-age-grace, by default
// the drain timeout, the same bound on a stream that SIGTERM gives.
func (c *serveConfig) connectionGrace() time.Duration {
	if c.maxConnAgeGrace > 0 {
		return c.maxConnAgeGrace
	}
	return c.drainTimeout
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
	if err := c.check(); err != nil {
		return err
	}
	// A SIGHUP while the model loads must neither kill the process nor be
	// lost: catch it now, act on it once serving.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	// Read the credentials before the slow part, so a typo fails fast.
	sec, err := loadSecurity(&c)
	if err != nil {
		return err
	}
	native.Init(ll)
	checkCPU(log, c.llamaThreads())

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

	var metrics *obs.Metrics
	ecfg := native.EngineConfig{
		Cells: c.ctx, Batch: c.batch, MaxSequences: c.maxSeqs, Threads: c.threads, StreamBuffer: c.streamBuffer,
		KVType: c.kvType, Deterministic: c.deterministic,
	}
	if c.metricsListen != "" {
		metrics = obs.NewMetrics()
		ecfg.OnStep = metrics.OnStep
	}
	engine, err := native.NewEngine(model, ecfg)
	if err != nil {
		return fmt.Errorf("create llama.cpp context: %w", err)
	}
	defer engine.Close()

	limits := service.DefaultLimits()
	limits.MaxStopStrings = c.maxStop
	limits.MaxSequenceTokens = min(engine.Cells(), info.TrainingContext)
	limits.MaxPromptTokens = c.maxPromptTokens
	limits.MaxCompletionTokens = c.maxCompletionTokens
	limits.MaxPromptBytes = c.maxPromptBytes
	limits.DefaultMaxTokens = c.defaultMaxTokens
	tenants := tenantPolicy{tokens: sec.tokens, maxPriority: int32(c.maxPriority), maxShare: c.tenantMaxShare, maxQueued: c.tenantMaxQueued}
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
		Tenants:           tenants.limits,
		StepRate:          engine.StepRate,
		Batch:             engine.Batch(),
	})
	if err != nil {
		return err
	}
	scfg := service.Config{
		Limits: limits, Cells: engine.Cells(), MaxSequences: c.maxSeqs, MaxQueue: c.maxQueue,
		AdmissionPolicy: policy.String(), PrefixCache: c.prefixCache, Deterministic: c.deterministic,
		Tenant: tenants.of, MaxTokenizeBytes: c.maxTokenizeBytes, WorkBudget: c.tokenizerBudget,
	}
	if metrics != nil {
		scfg.Observer = metrics
	}
	svc := service.New(scfg, model, alloc, engine)
	snapshot := func() *kvgatev1.GetCacheStatsResponse {
		st, _ := svc.GetCacheStats(context.Background(), &kvgatev1.GetCacheStatsRequest{})
		return st
	}

	// Background work owned by serve: load-report sampling and SIGHUP
	// reloads. Both stop when bg is cancelled, and serve waits for them.
	bg, stopBG := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer wg.Wait()
	defer stopBG()
	load := obs.NewLoadReporter(snapshot)
	wg.Go(func() { load.Run(bg) })
	wg.Go(func() { reloadOnHangup(bg, log, sec, hup) })

	// auxDone ends the health-watch, ORCA and reflection streams at the end
	// of the drain, so that GracefulStop need not wait for those clients.
	auxDone, endAux := context.WithCancel(context.Background())
	defer endAux()
	srv, hs, err := newGRPCServer(&c, serverDeps{
		log: log, metrics: metrics, security: sec, load: load, shutdown: auxDone, service: svc,
	})
	if err != nil {
		return err
	}

	var metricsSrv *http.Server
	metricsErr := make(chan error, 1)
	if metrics != nil {
		metrics.AddSnapshot(snapshot)
		metrics.InitializeGRPC(srv)
		mlis, err := net.Listen("tcp", c.metricsListen)
		if err != nil {
			return fmt.Errorf("metrics listen: %w", err)
		}
		metricsSrv = &http.Server{Handler: metrics.Handler(obs.HandlerOptions{Pprof: c.pprof}), ReadHeaderTimeout: 10 * time.Second}
		log.Info("metrics listening", "addr", mlis.Addr().String(), "pprof", c.pprof)
		go func() { metricsErr <- metricsSrv.Serve(mlis) }()
	}

	tcp, err := net.Listen("tcp", c.listen)
	if err != nil {
		if metricsSrv != nil {
			_ = metricsSrv.Close()
			<-metricsErr
		}
		return fmt.Errorf("listen: %w", err)
	}
	lis := newLimitListener(tcp, c.maxConnections, metrics)
	log.Info("kvgate listening", "addr", lis.Addr().String(), "model", filepath.Base(path),
		"arch", info.Architecture, "kv_cells", engine.Cells(), "max_seqs", c.maxSeqs, "batch", engine.Batch(),
		"deterministic", c.deterministic, "tls", sec.certs != nil, "mtls", c.clientCA != "", "auth", sec.tokens != nil)

	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(lis) }()

	var failed error
	select {
	case err := <-serveErr:
		failed = fmt.Errorf("serve: %w", err)
		serveErr <- nil
	case err := <-metricsErr:
		failed = fmt.Errorf("metrics: %w", err)
		metricsErr <- nil
	case <-ctx.Done():
	}
	drain(log, &c, hs, alloc, engine, metrics)
	endAux()
	stopServer(srv)
	if metricsSrv != nil {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = metricsSrv.Shutdown(sctx)
		cancel()
		if err := <-metricsErr; err != nil && !errors.Is(err, http.ErrServerClosed) && failed == nil {
			failed = fmt.Errorf("metrics: %w", err)
		}
	}
	if err := <-serveErr; err != nil && !errors.Is(err, grpc.ErrServerStopped) && failed == nil {
		failed = fmt.Errorf("serve: %w", err)
	}
	stopBG()
	wg.Wait()
	st := snapshot()
	inUse := int64(st.GetCellsUsed()) + int64(st.GetCellsReserved()) - int64(st.GetCellsCached())
	log.Info("stopped", "cells_in_use", inUse, "cells_used", st.GetCellsUsed(), "cells_reserved", st.GetCellsReserved(),
		"cells_cached", st.GetCellsCached(), "running", st.GetSequencesRunning())
	return failed
}

// drain stops taking work and lets running streams finish: health turns
// NOT_SERVING, new Generate calls get UNAVAILABLE, and the streams still
// running after --drain-timeout are ended with UNAVAILABLE by closing the
// engine. When it returns every lease is released and the prefix cache is
// dropped: no cell is in use.
func drain(log *slog.Logger, c *serveConfig, hs *health.Server, alloc *allocator.Allocator, engine *native.Engine, metrics *obs.Metrics) {
	st := alloc.Stats()
	log.Info("draining", "timeout", c.drainTimeout, "running", st.Running, "queued", st.Queued)
	if metrics != nil {
		metrics.SetDraining(true)
	}
	hs.Shutdown()
	alloc.Drain()
	t := time.NewTimer(c.drainTimeout)
	defer t.Stop()
	select {
	case <-alloc.Idle():
	case <-t.C:
		log.Warn("drain timeout: cancelling running streams", "running", alloc.Stats().Running)
	}
	engine.Close() // ends whatever still runs with UNAVAILABLE
	// The prefix cache goes with the context: free its cells too.
	if n := alloc.FlushCache(); n > 0 {
		log.Info("prefix cache dropped", "cells", n)
	}
}

// stopServer stops srv gracefully, waiting at most 5 s for calls to end
// (after the drain and the end of the auxiliary streams only unary calls
// can still be running) before it closes every connection.
func stopServer(srv *grpc.Server) {
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	t := time.NewTimer(5 * time.Second)
	defer t.Stop()
	select {
	case <-stopped:
	case <-t.C:
		srv.Stop()
		<-stopped
	}
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

// checkCPU logs llama.cpp's CPU features and the threads it will use, and
// warns when SIMD the CPU has was not compiled in.
func checkCPU(log *slog.Logger, threads int) {
	sys := native.SystemInfo()
	log.Info("llama.cpp system info", "features", sys, "threads", threads, "cpus", runtime.NumCPU())
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
