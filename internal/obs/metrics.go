package obs

import (
	"net/http"
	"net/http/pprof"
	"sync/atomic"
	"time"

	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/reflection"

	"github.com/kvgate/kvgate/allocator"
	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
)

// Snapshot returns the server's current allocator and worker statistics,
// as GetCacheStats reports them.
type Snapshot func() *kvgatev1.GetCacheStatsResponse

// Metrics holds kvgate's Prometheus metrics. It implements the service's
// Observer interface (QueueWait, TimeToFirstToken, InterToken, Finished)
// and, through OnStep, the engine's per-step hook. Its methods are safe for
// concurrent use and never block.
type Metrics struct {
	reg      *prometheus.Registry
	grpc     *grpcprom.ServerMetrics
	draining atomic.Bool
	loading  atomic.Bool

	requests         *prometheus.CounterVec
	promptTokens     prometheus.Counter
	completionTokens prometheus.Counter
	queueWait        prometheus.Histogram
	ttft             prometheus.Histogram
	interToken       prometheus.Histogram
	batchTokens      prometheus.Histogram
	batchSequences   prometheus.Histogram
	panics           prometheus.Counter
	drainingGauge    prometheus.GaugeFunc
	connsOpen        prometheus.Gauge
	connsRefused     prometheus.Counter

	embed embedMetrics // embed_metrics.go (issue 14)
}

// latencyBuckets span a token of a tiny model to a long queue, in seconds.
var latencyBuckets = []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60}

// NewMetrics returns kvgate's metrics, registered with a fresh registry
// together with the Go runtime and process collectors and the per-RPC
// series of go-grpc-middleware's Prometheus provider (grpc_server_*).
func NewMetrics() *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		grpc: grpcprom.NewServerMetrics(grpcprom.WithServerHandlingTimeHistogram(
			grpcprom.WithHistogramBuckets(latencyBuckets))),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kvgate_generate_requests_total",
			Help: "Generate calls handled, by final gRPC code (OK for a finished stream), spelled as in grpc_code.",
		}, []string{"code"}),
		promptTokens: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kvgate_prompt_tokens_total",
			Help: "Prompt tokens received in valid Generate calls, admitted or not.",
		}),
		completionTokens: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kvgate_completion_tokens_total",
			Help: "Tokens generated for Generate calls, as reported in their usage.",
		}),
		queueWait: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "kvgate_queue_wait_seconds",
			Help:    "Time from arrival to admission of admitted Generate calls.",
			Buckets: latencyBuckets,
		}),
		ttft: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "kvgate_time_to_first_token_seconds",
			Help:    "Time from arrival to the first chunk sent.",
			Buckets: latencyBuckets,
		}),
		interToken: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "kvgate_inter_token_seconds",
			Help:    "Time between consecutive chunks of a stream.",
			Buckets: latencyBuckets,
		}),
		batchTokens: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "kvgate_batch_tokens",
			Help:    "Tokens in each decode step's batch.",
			Buckets: prometheus.ExponentialBuckets(1, 2, 13),
		}),
		batchSequences: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "kvgate_batch_sequences",
			Help:    "Sequences in each decode step's batch.",
			Buckets: prometheus.ExponentialBuckets(1, 2, 9),
		}),
		connsOpen: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kvgate_connections_open",
			Help: "Client connections open on the gRPC listener.",
		}),
		connsRefused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kvgate_connections_refused_total",
			Help: "Client connections closed on accept because --max-connections were open.",
		}),
		panics: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kvgate_handler_panics_total",
			Help: "Panics recovered in gRPC handlers (each answered INTERNAL).",
		}),
	}
	m.drainingGauge = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "kvgate_draining",
		Help: "1 while the server drains before exiting, else 0.",
	}, func() float64 {
		if m.draining.Load() {
			return 1
		}
		return 0
	})
	m.reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		m.grpc, m.requests, m.promptTokens, m.completionTokens, m.queueWait, m.ttft, m.interToken,
		m.batchTokens, m.batchSequences, m.panics, m.drainingGauge, m.connsOpen, m.connsRefused,
	)
	m.embed.register(m.reg) // issue 14
	return m
}

// ConnectionOpened counts a client connection accepted.
func (m *Metrics) ConnectionOpened() { m.connsOpen.Inc() }

// ConnectionClosed counts a client connection closed.
func (m *Metrics) ConnectionClosed() { m.connsOpen.Dec() }

// ConnectionRefused counts a client connection closed on accept because
// the limit of open connections was reached.
func (m *Metrics) ConnectionRefused() { m.connsRefused.Inc() }

// Registry returns the registry behind the metrics handler.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// AddSnapshot exports the allocator and worker statistics read from snap
// at every scrape. Call it once.
func (m *Metrics) AddSnapshot(snap Snapshot) {
	m.reg.MustRegister(snapshotCollector{snap: snap})
}

// InitializeGRPC creates the per-RPC series of every method registered on
// srv, at zero, so that rates exist before the first call.
func (m *Metrics) InitializeGRPC(srv reflection.ServiceInfoProvider) { m.grpc.InitializeMetrics(srv) }

// SetLoading marks the server as loading its model: /healthz answers 503
// until SetLoading(false).
func (m *Metrics) SetLoading(v bool) { m.loading.Store(v) }

// SetDraining marks the server as draining: kvgate_draining turns 1 and
// /healthz answers 503.
func (m *Metrics) SetDraining(v bool) { m.draining.Store(v) }

// QueueWait observes the queue wait of an admitted call.
func (m *Metrics) QueueWait(d time.Duration) { m.queueWait.Observe(d.Seconds()) }

// TimeToFirstToken observes the time from arrival to the first chunk.
func (m *Metrics) TimeToFirstToken(d time.Duration) { m.ttft.Observe(d.Seconds()) }

// InterToken observes the time between two chunks of a stream.
func (m *Metrics) InterToken(d time.Duration) { m.interToken.Observe(d.Seconds()) }

// Finished counts a Generate call by its code, and its tokens.
func (m *Metrics) Finished(code string, promptTokens, completionTokens int) {
	m.requests.WithLabelValues(code).Inc()
	m.promptTokens.Add(float64(promptTokens))
	m.completionTokens.Add(float64(completionTokens))
}

// OnStep observes one decode step's batch: its tokens and its sequences.
func (m *Metrics) OnStep(tokens, sequences int) {
	m.batchTokens.Observe(float64(tokens))
	m.batchSequences.Observe(float64(sequences))
}

// HandlerOptions configures the metrics listener's HTTP handler.
type HandlerOptions struct {
	// Pprof serves net/http/pprof under /debug/pprof/.
	Pprof bool
}

// Handler serves /metrics, /healthz (200 while serving, 503 while the model
// loads and while draining) and, with Pprof, /debug/pprof/.
func (m *Metrics) Handler(o HandlerOptions) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if m.draining.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = w.Write([]byte("draining\n"))
			return
		}
		if m.loading.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = w.Write([]byte("loading\n"))
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	if o.Pprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	return mux
}

// reasonCodes maps each allocator refusal reason to the gRPC code the
// service answers it with, spelled as grpc_server_handled_total and
// kvgate_generate_requests_total spell codes.
var reasonCodes = map[string]string{
	allocator.ReasonQueueFull:        codes.ResourceExhausted.String(),
	allocator.ReasonKVCellsExhausted: codes.ResourceExhausted.String(),
	allocator.ReasonQueueTimeout:     codes.ResourceExhausted.String(),
	allocator.ReasonNeverFits:        codes.InvalidArgument.String(),
	allocator.ReasonDraining:         codes.Unavailable.String(),
	allocator.ReasonDeadlineExceeded: codes.DeadlineExceeded.String(),
	allocator.ReasonCancelled:        codes.Canceled.String(),
}

func reasonCode(reason string) string {
	if c, ok := reasonCodes[reason]; ok {
		return c
	}
	return codes.Unknown.String()
}

// snapshotCollector exports one GetCacheStats snapshot per scrape, so the
// values of a scrape are consistent with each other.
type snapshotCollector struct{ snap Snapshot }

var (
	descCells = prometheus.NewDesc("kvgate_kv_cells",
		"KV cells by state: used (holding tokens of running sequences), reserved (promised to running sequences), free, cached (held only by the prefix cache, evictable), shared (used by two or more sequences, counted once in used).",
		[]string{"state"}, nil)
	descCellsTotal = prometheus.NewDesc("kvgate_kv_pool_cells", "KV cells in the pool.", nil, nil)
	descRunning    = prometheus.NewDesc("kvgate_sequences_running", "Sequences admitted and not yet finished.", nil, nil)
	descQueued     = prometheus.NewDesc("kvgate_queue_depth", "Requests waiting for admission.", nil, nil)
	descCachedSeqs = prometheus.NewDesc("kvgate_sequences_cached", "Finished sequences kept as prefix cache entries.", nil, nil)
	descAdmitted   = prometheus.NewDesc("kvgate_admissions_total", "Requests admitted.", nil, nil)
	descRejected   = prometheus.NewDesc("kvgate_rejections_total",
		"Requests refused by the allocator, by gRPC code and reason.", []string{"code", "reason"}, nil)
	descSteps     = prometheus.NewDesc("kvgate_decode_steps_total", "Decode steps (llama_decode batches) run.", nil, nil)
	descPrefill   = prometheus.NewDesc("kvgate_prefill_tokens_total", "Prompt tokens computed (prefilled).", nil, nil)
	descGenerated = prometheus.NewDesc("kvgate_generated_tokens_total", "Tokens generated by the worker.", nil, nil)
	descPrefixHit = prometheus.NewDesc("kvgate_prefix_cache_hit_tokens_total", "Prompt tokens whose cells were reused from the prefix cache.", nil, nil)
	descNoKVSlot  = prometheus.NewDesc("kvgate_nokvslot_total", "Times llama_decode found no KV slot (0 unless the allocator has a bug).", nil, nil)
	descSlow      = prometheus.NewDesc("kvgate_slow_consumers_total", "Streams ended because their client read too slowly.", nil, nil)
	descPreempt   = prometheus.NewDesc("kvgate_preemptions_total", "Running sequences preempted to make room.", nil, nil)
	descEvict     = prometheus.NewDesc("kvgate_evictions_total", "Prefix cache entries evicted to make room.", nil, nil)
	descDrainRate = prometheus.NewDesc("kvgate_drain_cells_per_second", "Cells released per second, smoothed: the rate behind retry estimates.", nil, nil)
	descOrder     = prometheus.NewDesc("kvgate_cell_order_events_total",
		"Deterministic mode: sequences held back (hold), recomputed (relocation) or let out of cell order (break) to keep outputs load-invariant.", []string{"event"}, nil)
	descPadding   = prometheus.NewDesc("kvgate_padding_tokens_total", "Deterministic mode: padding tokens that give every decode step two tokens and two outputs.", nil, nil)
	descThreads   = prometheus.NewDesc("kvgate_decode_threads", "llama.cpp's CPU threads for the next decode step (lower than --threads while the thread tuner finds fewer faster).", nil, nil)
	descThreadChg = prometheus.NewDesc("kvgate_thread_changes_total", "Times the thread tuner changed the thread count, probes included.", nil, nil)
	descGrammar   = prometheus.NewDesc("kvgate_grammar_tokens_total",
		"Tokens drawn under a grammar (draw: all of them; resample: those the grammar rejected at first, which cost a mask of the whole vocabulary).", []string{"kind"}, nil)
	snapshotDescs = []*prometheus.Desc{descCells, descCellsTotal, descRunning, descQueued, descCachedSeqs, descAdmitted,
		descRejected, descSteps, descPrefill, descGenerated, descPrefixHit, descNoKVSlot, descSlow, descPreempt, descEvict, descDrainRate,
		descOrder, descPadding, descThreads, descThreadChg, descGrammar}
)

// Describe sends the descriptors of every series the collector exports.
func (c snapshotCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range snapshotDescs {
		ch <- d
	}
}

// Collect takes one snapshot and sends its series.
func (c snapshotCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.snap()
	if s == nil {
		return
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge(descCellsTotal, float64(s.GetCellsTotal()))
	gauge(descCells, float64(s.GetCellsUsed()), "used")
	gauge(descCells, float64(s.GetCellsReserved()), "reserved")
	gauge(descCells, float64(s.GetCellsFree()), "free")
	gauge(descCells, float64(s.GetCellsCached()), "cached")
	gauge(descCells, float64(s.GetCellsShared()), "shared")
	gauge(descRunning, float64(s.GetSequencesRunning()))
	gauge(descQueued, float64(s.GetSequencesQueued()))
	gauge(descCachedSeqs, float64(s.GetSequencesCached()))
	gauge(descDrainRate, s.GetDrainCellsPerSecond())
	counter(descAdmitted, s.GetAdmittedTotal())
	for reason, n := range s.GetRejectedTotal() {
		counter(descRejected, n, reasonCode(reason), reason)
	}
	counter(descSteps, s.GetDecodeStepsTotal())
	counter(descPrefill, s.GetPrefillTokensTotal())
	counter(descGenerated, s.GetGeneratedTokensTotal())
	counter(descPrefixHit, s.GetPrefixHitTokensTotal())
	counter(descNoKVSlot, s.GetNokvslotTotal())
	counter(descSlow, s.GetSlowConsumerTotal())
	counter(descPreempt, s.GetPreemptionsTotal())
	counter(descEvict, s.GetEvictionsTotal())
	counter(descOrder, s.GetOrderHoldsTotal(), "hold")
	counter(descOrder, s.GetOrderRelocationsTotal(), "relocation")
	counter(descOrder, s.GetOrderBreaksTotal(), "break")
	counter(descPadding, s.GetPaddingTokensTotal())
	gauge(descThreads, float64(s.GetDecodeThreads()))
	counter(descThreadChg, s.GetThreadChangesTotal())
	counter(descGrammar, s.GetGrammarTokensTotal(), "draw")
	counter(descGrammar, s.GetGrammarResamplesTotal(), "resample")
}
