package obs

import (
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// embedMetrics are the embedding service's metrics (issue 14).
type embedMetrics struct {
	requests     *prometheus.CounterVec
	inputs       prometheus.Counter
	tokens       prometheus.Counter
	truncated    prometheus.Counter
	queueWait    prometheus.Histogram
	encodes      prometheus.Counter
	encodeTime   prometheus.Histogram
	batchInputs  prometheus.Histogram
	batchTokens  prometheus.Histogram
	queueDepth   prometheus.GaugeFunc
	queueDepthFn atomic.Pointer[func() int]
}

func (e *embedMetrics) register(reg *prometheus.Registry) {
	e.requests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "kvgate_embed_requests_total", Help: "Embed calls finished, by gRPC code.",
	}, []string{"code"})
	e.inputs = prometheus.NewCounter(prometheus.CounterOpts{Name: "kvgate_embed_inputs_total", Help: "Inputs of Embed calls accepted."})
	e.tokens = prometheus.NewCounter(prometheus.CounterOpts{Name: "kvgate_embed_tokens_total", Help: "Tokens of Embed calls accepted, after truncation."})
	e.truncated = prometheus.NewCounter(prometheus.CounterOpts{Name: "kvgate_embed_truncated_total", Help: "Inputs cut by TRUNCATION_END."})
	e.queueWait = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "kvgate_embed_queue_wait_seconds", Help: "Time from an Embed call's arrival to the encode of its first input.", Buckets: latencyBuckets,
	})
	e.encodes = prometheus.NewCounter(prometheus.CounterOpts{Name: "kvgate_embed_encode_calls_total", Help: "Encode calls (llama_decode on the embedding context)."})
	e.encodeTime = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "kvgate_embed_encode_seconds", Help: "Duration of one encode call.", Buckets: latencyBuckets,
	})
	e.batchInputs = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "kvgate_embed_batch_inputs", Help: "Inputs packed into one encode call.", Buckets: prometheus.ExponentialBuckets(1, 2, 9),
	})
	e.batchTokens = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "kvgate_embed_batch_tokens", Help: "Tokens of one encode call.", Buckets: prometheus.ExponentialBuckets(1, 2, 14),
	})
	e.queueDepth = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "kvgate_embed_queue_depth", Help: "Embedding requests waiting for their first encode.",
	}, func() float64 {
		if fn := e.queueDepthFn.Load(); fn != nil {
			return float64((*fn)())
		}
		return 0
	})
	reg.MustRegister(e.requests, e.inputs, e.tokens, e.truncated, e.queueWait, e.encodes, e.encodeTime,
		e.batchInputs, e.batchTokens, e.queueDepth)
}

// EmbedFinished counts an Embed call by its code, with its inputs, tokens,
// truncated inputs and queue wait (the service's EmbedObserver).
func (m *Metrics) EmbedFinished(code string, inputs, tokens, truncated int, queueWait time.Duration) {
	e := &m.embed
	e.requests.WithLabelValues(code).Inc()
	if code == "OK" {
		e.inputs.Add(float64(inputs))
		e.tokens.Add(float64(tokens))
		e.truncated.Add(float64(truncated))
		e.queueWait.Observe(queueWait.Seconds())
	}
}

// OnEncode observes one encode call of the embedding worker.
func (m *Metrics) OnEncode(inputs, tokens int, d time.Duration) {
	e := &m.embed
	e.encodes.Inc()
	e.encodeTime.Observe(d.Seconds())
	e.batchInputs.Observe(float64(inputs))
	e.batchTokens.Observe(float64(tokens))
}

// SetEmbedQueue makes kvgate_embed_queue_depth report fn's value.
func (m *Metrics) SetEmbedQueue(fn func() int) { m.embed.queueDepthFn.Store(&fn) }
