package server

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/kvgate/kvgate/internal/cpus"
	"github.com/kvgate/kvgate/internal/kvmem"
	"github.com/kvgate/kvgate/native/llama"
	"github.com/kvgate/kvgate/service"
)

// Config is everything a kvgate server is configured with: what the flags
// of "kvgate serve" set, each field naming its flag, plus the logger and
// the optional hooks of an embedding program. Start from DefaultConfig: a
// zero Config is not valid.
type Config struct {
	// Listen is the address to serve gRPC on (--listen). An address with
	// port 0 gets a free port; Server.Addr says which.
	Listen string
	// Listener, when not nil, is served instead of binding Listen. The
	// server owns it from Start on: Close, or a failed Start, closes it.
	Listener net.Listener
	// Model is the GGUF model file (--model). Empty: stories260K, fetched
	// once from the Go module proxy into the cache directory
	// ($KVGATE_CACHE_DIR, or the user cache directory's kvgate/models).
	Model string
	// Progress, when not nil, is called with the model's path and the
	// fraction of its weights loaded, on the loading goroutine.
	Progress func(path string, fraction float32)

	// Ctx is the number of KV cells in the pool shared by all sequences
	// (--ctx); llama.cpp pads it to a multiple of 256.
	Ctx int
	// Threads is llama.cpp's CPU thread count (--threads). 0 picks it from
	// the CPUs the process may use, its affinity mask and cgroup CPU
	// quota (internal/cpus.Available), leaving one to the Go side above
	// two (internal/cpus.DefaultThreads).
	Threads int
	// TuneThreads lets the decode worker lower the thread count, and raise
	// it back up to Threads, when decode steps show that fewer threads are
	// faster: on a machine busy with other work, ggml's spinning barriers
	// make too many threads stall (--tune-threads).
	TuneThreads bool
	// Batch is the token budget of one decode step (--batch).
	Batch int
	// MaxSeqs is the most sequences running at once (--max-seqs).
	MaxSeqs int
	// MaxQueue is the most requests waiting for admission (--max-queue).
	MaxQueue int
	// StreamBuffer is the events a stream may buffer before its reader
	// counts as too slow (--stream-buffer).
	StreamBuffer int
	// MaxStop is the most stop strings of a request (--max-stop).
	MaxStop int
	// DrainTimeout bounds how long Drain lets running streams finish
	// (--drain-timeout); it is also the default MaxConnAgeGrace.
	DrainTimeout time.Duration
	// LlamaLog is llama.cpp's log level (--llama-log): none, error, warn,
	// info or debug.
	LlamaLog string
	// PrefixCache keeps finished sequences' cells as a prefix cache shared
	// by later requests (--prefix-cache).
	PrefixCache bool
	// Deterministic makes every stream's tokens those of the same request
	// run alone (--deterministic); it needs PrefixCache off.
	Deterministic bool
	// Admission is the admission policy (--admission): reserve or
	// optimistic.
	Admission string
	// Watermark is the free cells an optimistic admission must leave beside
	// the prompt (--watermark).
	Watermark int
	// KVType is the KV cache element type (--kv-type): f16 or f32.
	KVType string
	// KVLayout is the KV cache's layout (--kv-layout): "unified", one pool
	// of Ctx cells that every sequence draws from and shares prefixes in
	// without copying; or "streams", a stream of Ctx/MaxSeqs cells for
	// each sequence (llama.cpp's default, and llama-server's with -np),
	// whose attention spans only its own stream. Streams decode faster at
	// high concurrency (see BENCHMARKS.md) but cap every sequence at its
	// stream, copy a shared prefix instead of sharing it, and need
	// Deterministic off.
	KVLayout string
	// CacheStreams is, in the streams layout with PrefixCache, how many
	// streams beyond MaxSeqs hold cached prefixes (--cache-streams; 0:
	// MaxSeqs). A finished sequence's stream stays as a cache entry until
	// a stream is needed.
	CacheStreams int

	// MaxPromptTokens is the most prompt tokens of a request
	// (--max-prompt-tokens; 0: as many as fit a sequence).
	MaxPromptTokens int
	// MaxCompletionTokens is the largest max_tokens of a request
	// (--max-completion-tokens; 0: as many as fit a sequence).
	MaxCompletionTokens int
	// MaxRecvMsgSize is the largest request message in bytes
	// (--max-recv-msg-size).
	MaxRecvMsgSize int

	// MetricsListen is the address of Prometheus /metrics and /healthz
	// (--metrics-listen; empty: off).
	MetricsListen string
	// Pprof serves net/http/pprof on the metrics listener (--pprof).
	Pprof bool
	// AuthTokens is the file of bearer tokens required on every call but
	// health and reflection (--auth-tokens; empty: none). Reload rereads
	// it.
	AuthTokens string
	// TLSCert and TLSKey are the server's PEM key pair (--tls-cert,
	// --tls-key; empty: no TLS). Reload rereads them.
	TLSCert, TLSKey string
	// ClientCA holds the PEM CA certificates that client certificates must
	// be signed by (--client-ca; empty: no mutual TLS).
	ClientCA string
	// MaxConnAge closes connections after this age (--max-connection-age;
	// 0: never).
	MaxConnAge time.Duration
	// MaxConnAgeGrace is how long streams on an aged connection may finish
	// (--max-connection-age-grace; 0: DrainTimeout).
	MaxConnAgeGrace time.Duration

	// MaxStreamsPerConn is the most concurrent calls of one connection
	// (--max-streams-per-conn).
	MaxStreamsPerConn int
	// MaxConnections is the most open client connections
	// (--max-connections).
	MaxConnections int
	// HandshakeTimeout closes a connection that has not finished its TLS
	// and HTTP/2 handshake by then (--handshake-timeout).
	HandshakeTimeout time.Duration
	// MaxConnIdle closes a connection without a call for this long
	// (--max-connection-idle; 0: never).
	MaxConnIdle time.Duration
	// MaxPromptBytes is the longest prompt text in bytes
	// (--max-prompt-bytes; 0: from MaxPromptTokens).
	MaxPromptBytes int
	// DefaultMaxTokens is the max_tokens of a request that leaves it unset
	// (--default-max-tokens; 0: refuse such requests).
	DefaultMaxTokens int
	// MaxTokenizeBytes is the longest text of one Tokenize call
	// (--max-tokenize-bytes).
	MaxTokenizeBytes int
	// TokenizerBudget is the tokenizer work in flight at once, in bytes of
	// text (--tokenizer-budget).
	TokenizerBudget int

	// MaxPriority is the highest request priority of a tenant whose token
	// line does not set one (--max-priority).
	MaxPriority int
	// TenantMaxShare is the fraction of the KV cells one tenant's running
	// requests may hold unless its token line says otherwise
	// (--tenant-max-share).
	TenantMaxShare float64
	// TenantMaxQueued is the most queued requests of one tenant unless its
	// token line says otherwise (--tenant-max-queued; 0: only MaxQueue).
	TenantMaxQueued int

	// ChatTemplate names the llama.cpp built-in chat template
	// (llama_chat_builtin_templates) that renders conversations, instead
	// of the model's own (--chat-template; empty: the model's).
	ChatTemplate string
	// MaxChatMessages is the most messages of one conversation
	// (--max-chat-messages).
	MaxChatMessages int
	// Embedding configures the embedding model and its worker
	// (server/embed.go; issue 14).
	Embedding EmbeddingConfig

	// Logger receives the server's log; nil means slog.Default().
	Logger *slog.Logger
}

// DefaultConfig returns the configuration of "kvgate serve" without flags:
// the flags' defaults.
func DefaultConfig() Config {
	return Config{
		Listen:            "localhost:50051",
		Ctx:               4096,
		Batch:             512,
		MaxSeqs:           64,
		MaxQueue:          256,
		StreamBuffer:      1024,
		MaxStop:           16,
		DrainTimeout:      60 * time.Second,
		LlamaLog:          "error",
		PrefixCache:       true,
		Admission:         "reserve",
		Watermark:         64,
		KVType:            "f16",
		KVLayout:          LayoutUnified,
		TuneThreads:       true,
		MaxRecvMsgSize:    4 << 20,
		MaxStreamsPerConn: 128,
		MaxConnections:    512,
		HandshakeTimeout:  5 * time.Second,
		MaxConnIdle:       5 * time.Minute,
		DefaultMaxTokens:  256,
		MaxTokenizeBytes:  service.DefaultMaxTokenizeBytes,
		TokenizerBudget:   service.DefaultWorkBudget,
		MaxPriority:       service.DefaultMaxPriority,
		TenantMaxShare:    1,
		MaxChatMessages:   service.DefaultMaxChatMessages,
		Embedding:         DefaultEmbeddingConfig(), // issue 14
	}
}

// Bounds of the settings that size memory.
const (
	// maxStreamBuffer is the largest StreamBuffer.
	maxStreamBuffer = 1 << 16
	// maxCtx is the largest Ctx: llama.cpp's n_ctx bound, a uint32, kept
	// within int32 so that cell counts fit every index type on the way.
	maxCtx = math.MaxInt32 - 255
)

// Validate checks the settings that need no model. Its errors name the
// "kvgate serve" flag of the field at fault, as in "--ctx 0: must be
// positive".
func (c *Config) Validate() error {
	switch {
	case c.Ctx < 1:
		return fmt.Errorf("--ctx %d: must be positive", c.Ctx)
	case c.MaxSeqs < 1 || c.MaxSeqs > maxSequenceIDs:
		return fmt.Errorf("--max-seqs %d: must be in [1, %d]", c.MaxSeqs, maxSequenceIDs)
	case c.Batch < 1:
		return fmt.Errorf("--batch %d: must be positive", c.Batch)
	case c.MaxQueue < 0:
		return fmt.Errorf("--max-queue %d: must be >= 0", c.MaxQueue)
	case c.MaxStop < 0:
		return fmt.Errorf("--max-stop %d: must be >= 0", c.MaxStop)
	case c.Threads < 0:
		return fmt.Errorf("--threads %d: must be >= 0 (0: from the CPUs the process may use)", c.Threads)
	case c.StreamBuffer < 1 || c.StreamBuffer > maxStreamBuffer:
		return fmt.Errorf("--stream-buffer %d: must be in [1, %d]", c.StreamBuffer, maxStreamBuffer)
	case c.MaxStreamsPerConn < 1:
		return fmt.Errorf("--max-streams-per-conn %d: must be positive", c.MaxStreamsPerConn)
	case c.MaxConnections < 1:
		return fmt.Errorf("--max-connections %d: must be positive", c.MaxConnections)
	case c.HandshakeTimeout <= 0:
		return fmt.Errorf("--handshake-timeout %v: must be positive", c.HandshakeTimeout)
	case c.MaxConnIdle < 0:
		return fmt.Errorf("--max-connection-idle %v: must be >= 0", c.MaxConnIdle)
	case c.MaxPromptBytes < 0:
		return fmt.Errorf("--max-prompt-bytes %d: must be >= 0", c.MaxPromptBytes)
	case c.DefaultMaxTokens < 0:
		return fmt.Errorf("--default-max-tokens %d: must be >= 0", c.DefaultMaxTokens)
	case c.MaxTokenizeBytes < 1:
		return fmt.Errorf("--max-tokenize-bytes %d: must be positive", c.MaxTokenizeBytes)
	case c.TokenizerBudget < c.MaxTokenizeBytes:
		return fmt.Errorf("--tokenizer-budget %d: must be at least --max-tokenize-bytes %d", c.TokenizerBudget, c.MaxTokenizeBytes)
	case c.MaxPriority < math.MinInt32 || c.MaxPriority > math.MaxInt32:
		return fmt.Errorf("--max-priority %d: must be a 32-bit integer", c.MaxPriority)
	case !(c.TenantMaxShare > 0 && c.TenantMaxShare <= 1):
		return fmt.Errorf("--tenant-max-share %v: must be in (0, 1]", c.TenantMaxShare)
	case c.TenantMaxQueued < 0:
		return fmt.Errorf("--tenant-max-queued %d: must be >= 0", c.TenantMaxQueued)
	case c.Ctx > maxCtx:
		return fmt.Errorf("--ctx %d: must be at most %d", c.Ctx, maxCtx)
	case kvmem.ElementSize(c.KVType) == 0:
		return fmt.Errorf("--kv-type %q: want f16 or f32", c.KVType)
	case c.Admission != "reserve" && c.Admission != "optimistic":
		return fmt.Errorf("--admission %q: want reserve or optimistic", c.Admission)
	case c.Watermark < 0:
		return fmt.Errorf("--watermark %d: must be >= 0", c.Watermark)
	case c.MaxPromptTokens < 0:
		return fmt.Errorf("--max-prompt-tokens %d: must be >= 0", c.MaxPromptTokens)
	case c.MaxCompletionTokens < 0:
		return fmt.Errorf("--max-completion-tokens %d: must be >= 0", c.MaxCompletionTokens)
	case c.MaxRecvMsgSize < 1:
		return fmt.Errorf("--max-recv-msg-size %d: must be positive", c.MaxRecvMsgSize)
	case c.DrainTimeout < 0:
		return fmt.Errorf("--drain-timeout %v: must be >= 0", c.DrainTimeout)
	case c.MaxConnAge < 0 || c.MaxConnAgeGrace < 0:
		return fmt.Errorf("--max-connection-age %v, --max-connection-age-grace %v: must be >= 0", c.MaxConnAge, c.MaxConnAgeGrace)
	case c.KVLayout != LayoutUnified && c.KVLayout != LayoutStreams:
		return fmt.Errorf("--kv-layout %q: want %s or %s", c.KVLayout, LayoutUnified, LayoutStreams)
	case c.CacheStreams < 0:
		return fmt.Errorf("--cache-streams %d: must be >= 0", c.CacheStreams)
	case c.KVLayout == LayoutStreams && c.Deterministic:
		return errors.New("--kv-layout streams and --deterministic do not go together: deterministic mode orders the cells of one shared pool")
	case c.KVLayout == LayoutStreams && c.streams() > maxSequenceIDs:
		return fmt.Errorf("--kv-layout streams: --max-seqs %d and %d cache streams make %d streams, more than %d",
			c.MaxSeqs, c.streams()-c.MaxSeqs, c.streams(), maxSequenceIDs)
	case c.KVLayout == LayoutStreams && c.Ctx < minStreamCells*c.streams():
		return fmt.Errorf("--kv-layout streams gives each of %d streams (--max-seqs %d, and as many for the prefix cache unless --cache-streams says otherwise) "+
			"--ctx/streams cells, at least %d: raise --ctx to %d, lower --max-seqs or --cache-streams, or turn the prefix cache off",
			c.streams(), c.MaxSeqs, minStreamCells, minStreamCells*c.streams())
	case c.Deterministic && c.PrefixCache:
		return errors.New("--deterministic needs --prefix-cache=false: a shared prefix pins a sequence's first cells where another put them")
	case c.Deterministic && c.MaxSeqs >= retiredSequence:
		return fmt.Errorf("--max-seqs %d: --deterministic keeps two sequence ids for itself (at most %d)", c.MaxSeqs, retiredSequence-1)
	case c.Pprof && c.MetricsListen == "":
		return errors.New("--pprof needs --metrics-listen")
	case (c.TLSCert == "") != (c.TLSKey == ""):
		return errors.New("--tls-cert and --tls-key go together")
	case c.ClientCA != "" && c.TLSCert == "":
		return errors.New("--client-ca needs --tls-cert and --tls-key")
	}
	if _, err := llamaLogLevel(c.LlamaLog); err != nil {
		return err
	}
	if err := c.Embedding.validate(c); err != nil { // issue 14
		return err
	}
	return c.validateChat()
}

// validateChat checks the chat settings: the template must be one of
// llama.cpp's built-in names, so that a typo fails at start-up rather than
// on the first conversation.
func (c *Config) validateChat() error {
	if c.MaxChatMessages < 1 {
		return fmt.Errorf("--max-chat-messages %d: must be positive", c.MaxChatMessages)
	}
	if c.ChatTemplate != "" && !slices.Contains(llama.BuiltinTemplates(), c.ChatTemplate) {
		return fmt.Errorf("--chat-template %q: not a llama.cpp built-in template; want one of %s", c.ChatTemplate, strings.Join(llama.BuiltinTemplates(), ", "))
	}
	return nil
}

// The KV layouts of Config.KVLayout.
const (
	LayoutUnified = "unified"
	LayoutStreams = "streams"
)

// minStreamCells is the smallest stream llama.cpp makes: it pads a
// stream's cells up to a multiple of 256, which would grow the pool past
// Ctx.
const minStreamCells = 256

// streams returns the KV streams of the streams layout: one per running
// sequence, and with the prefix cache CacheStreams more (MaxSeqs when 0).
func (c *Config) streams() int {
	n := c.MaxSeqs
	if c.PrefixCache {
		if c.CacheStreams > 0 {
			n += c.CacheStreams
		} else {
			n += c.MaxSeqs
		}
	}
	return n
}

// kvCells returns the cells llama.cpp will allocate for Ctx: padded to a
// multiple of 256, and with streams a multiple of 256 per stream.
func (c *Config) kvCells() int {
	n := (c.Ctx + 255) / 256 * 256
	if s := c.streams(); c.KVLayout == LayoutStreams && s > 0 {
		per := (n/s + 255) / 256 * 256
		n = per * s
	}
	return n
}

// llamaThreads returns the thread count llama.cpp will start with:
// Threads, or when it is 0 the default for the CPUs the process may use.
func (c *Config) llamaThreads() int {
	if c.Threads > 0 {
		return c.Threads
	}
	return cpus.DefaultThreads(cpus.Available().CPUs)
}

// connectionGrace returns how long streams on a connection past
// MaxConnAge may go on: MaxConnAgeGrace, by default the drain timeout, the
// same bound on a stream that a drain gives.
func (c *Config) connectionGrace() time.Duration {
	if c.MaxConnAgeGrace > 0 {
		return c.MaxConnAgeGrace
	}
	return c.DrainTimeout
}
