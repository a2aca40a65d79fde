package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// Schema names the version of the Report JSON format. Fields are only ever
// added under one version; a rename or a change of meaning gets a new one.
const Schema = "kvgate.bench/v1"

// Report is the result of a benchmark run, and its JSON form (see Schema).
// Every number is finite and non-negative. Counts and latencies cover the
// measured window only: warm-up requests are counted in
// Requests.Warmup and nowhere else.
type Report struct {
	// Schema is the Schema constant.
	Schema string `json:"schema"`
	// Config is the load and workload that ran.
	Config ReportConfig `json:"config"`
	// Model describes the server's model, from GetModelInfo (or
	// llama-server's GET /props and /v1/models).
	Model ModelInfo `json:"model"`
	// StartedAt is when the measured window began.
	StartedAt time.Time `json:"started_at"`
	// ElapsedSeconds is the measured window: from its start until the last
	// measured request ended.
	ElapsedSeconds float64 `json:"elapsed_s"`
	// Interrupted is true when the run was cancelled before its end.
	Interrupted bool `json:"interrupted"`
	// Requests counts the measured requests.
	Requests RequestCounts `json:"requests"`
	// Status counts measured requests by outcome: "OK" for a stream that
	// ended with a Finished event (from llama-server, an event with stop
	// true), a gRPC code name in upper snake case (such as
	// "RESOURCE_EXHAUSTED") for one that failed, and "INCOMPLETE" for a
	// stream that ended without error but without a Finished event. A
	// llama-server failure has the code of its HTTP status (400
	// INVALID_ARGUMENT, 429 RESOURCE_EXHAUSTED, 500 INTERNAL, 503
	// UNAVAILABLE, ...); a reply that breaks its protocol is INTERNAL and
	// an unreachable server UNAVAILABLE. The counts add up to
	// Requests.Sent.
	Status map[string]int `json:"status"`
	// ErrorReasons counts failed requests by the reason of the
	// google.rpc.ErrorInfo in their status (such as "QUEUE_FULL"), or by
	// the type of llama-server's error (such as
	// "exceed_context_size_error"); failures without one are not counted
	// here.
	ErrorReasons map[string]int `json:"error_reasons"`
	// Tokens counts tokens sent and received.
	Tokens TokenCounts `json:"tokens"`
	// Throughput is what the server delivered per second of the window.
	Throughput Throughput `json:"throughput"`
	// Goodput is the rate of requests that met the latency objectives.
	Goodput Goodput `json:"goodput"`
	// LatencyMS summarises latencies, in milliseconds.
	LatencyMS Latencies `json:"latency_ms"`
	// Server holds the changes of the server's GetCacheStats counters over
	// the window; null when they were not read, as from llama-server,
	// which has none.
	Server *ServerCounters `json:"server"`
}

// ReportConfig records the configuration of a run.
type ReportConfig struct {
	// Target is the server's address: kvgate's gRPC address, or
	// llama-server's base URL.
	Target string `json:"target"`
	// Mode is "closed" (Concurrency clients, each sending its next request
	// when the last ends) or "open" (Poisson arrivals at Rate per second).
	Mode string `json:"mode"`
	// Concurrency is the number of closed-loop clients; 0 in open loop.
	Concurrency int `json:"concurrency"`
	// Rate is the open-loop arrival rate per second; 0 in closed loop.
	Rate float64 `json:"rate"`
	// MaxInFlight is the open-loop cap on outstanding requests; arrivals
	// beyond it are dropped and counted in Requests.Dropped.
	MaxInFlight int `json:"max_in_flight"`
	// DurationSeconds is how long new requests were sent; 0 means no limit.
	DurationSeconds float64 `json:"duration_s"`
	// Requests is the most measured requests sent; 0 means no limit.
	Requests int `json:"requests"`
	// WarmupSeconds is the warm-up's duration; 0 means none by time.
	WarmupSeconds float64 `json:"warmup_s"`
	// WarmupRequests is the warm-up's request count; 0 means none by count.
	WarmupRequests int `json:"warmup_requests"`
	// Workload is the shape of the requests.
	Workload Workload `json:"workload"`
	// PrefixCache is false when requests set skip_prefix_cache (to
	// llama-server, cache_prompt false).
	PrefixCache bool `json:"prefix_cache"`
	// TimeoutSeconds is each request's deadline.
	TimeoutSeconds float64 `json:"timeout_s"`
	// Seed is the seed of the prompts and arrivals.
	Seed uint64 `json:"seed"`
}

// ModelInfo describes the server's model.
type ModelInfo struct {
	// Path is the model file on the server.
	Path string `json:"path"`
	// Description is llama.cpp's description, such as "llama ?B F16";
	// llama-server does not report it, and its Description is
	// "llama-server" and its build_info.
	Description string `json:"description"`
	// ParameterCount is the number of weights.
	ParameterCount uint64 `json:"parameter_count"`
	// SizeBytes is the size of the weights.
	SizeBytes uint64 `json:"size_bytes"`
	// VocabSize is the vocabulary size.
	VocabSize uint32 `json:"vocab_size"`
	// KVCells is the server's KV pool size; 0 from llama-server, which
	// does not report it.
	KVCells uint32 `json:"kv_cells"`
	// MaxRunningSequences is the most sequences the server runs at once
	// (llama-server's total_slots).
	MaxRunningSequences uint32 `json:"max_running_sequences"`
	// PrefixCache is whether the server keeps a prefix cache.
	PrefixCache bool `json:"prefix_cache"`
	// SystemInfo is llama.cpp's CPU feature line; empty from
	// llama-server, which does not report it.
	SystemInfo string `json:"system_info"`
}

// RequestCounts counts requests.
type RequestCounts struct {
	// Sent is the number of measured requests sent; it equals the sum of
	// Report.Status.
	Sent int `json:"sent"`
	// OK is the number that ended with a Finished event.
	OK int `json:"ok"`
	// Failed is Sent - OK.
	Failed int `json:"failed"`
	// Dropped counts open-loop arrivals not sent because MaxInFlight
	// requests were outstanding; they are not in Sent.
	Dropped int `json:"dropped"`
	// Warmup is the number of warm-up requests sent before the window.
	Warmup int `json:"warmup"`
}

// TokenCounts counts tokens of the measured requests.
type TokenCounts struct {
	// PromptSent is the prompt tokens of every sent request.
	PromptSent int64 `json:"prompt_sent"`
	// PromptOK is the prompt tokens of the OK requests.
	PromptOK int64 `json:"prompt_ok"`
	// Output is the tokens streamed to OK requests. With ignore_eos it is
	// the sum of their asked-for output lengths.
	Output int64 `json:"output"`
	// OutputPartial is the tokens streamed to requests that then failed.
	OutputPartial int64 `json:"output_partial"`
	// CachedReported is the sum of Started.cached_prompt_tokens (from
	// llama-server, of timings.cache_n): the prompt tokens the server says
	// it reused.
	CachedReported int64 `json:"cached_reported"`
}

// Throughput is work per second of the measured window.
type Throughput struct {
	// RequestsPerSecond counts OK requests.
	RequestsPerSecond float64 `json:"requests_per_s"`
	// OutputTokensPerSecond counts Tokens.Output.
	OutputTokensPerSecond float64 `json:"output_tokens_per_s"`
	// TotalTokensPerSecond counts Tokens.PromptOK + Tokens.Output.
	TotalTokensPerSecond float64 `json:"total_tokens_per_s"`
}

// Goodput is the rate of OK requests that met both latency objectives: a
// time to first token of at most SLOTTFTMS and a mean inter-token latency
// (the time from the first to the last token over the tokens after the
// first) of at most SLOITLMS. An objective of 0 is not checked.
type Goodput struct {
	// SLOTTFTMS is the TTFT objective in milliseconds.
	SLOTTFTMS float64 `json:"slo_ttft_ms"`
	// SLOITLMS is the inter-token latency objective in milliseconds.
	SLOITLMS float64 `json:"slo_itl_ms"`
	// Requests is the number of OK requests that met both.
	Requests int `json:"requests"`
	// RequestsPerSecond is Requests per second of the window.
	RequestsPerSecond float64 `json:"requests_per_s"`
}

// Latencies summarises the latencies of OK requests, in milliseconds.
type Latencies struct {
	// TTFT is the time from sending a request to receiving its first
	// token.
	TTFT Summary `json:"ttft"`
	// ITL is the inter-token latency: the time between consecutive chunks
	// of a stream, split evenly over the tokens of the later chunk, one
	// sample per token after each stream's first.
	ITL Summary `json:"itl"`
	// E2E is the time from sending a request to the end of its stream.
	E2E Summary `json:"e2e"`
	// Queue is the admission wait the server reported in Started; empty
	// from llama-server, which does not report it.
	Queue Summary `json:"queue"`
}

// ServerCounters are changes of the server's counters (GetCacheStats) from
// just before the measured window to just after it. Other clients of the
// same server are counted too.
type ServerCounters struct {
	// PromptTokens is prompt_tokens_total: prompt tokens of admitted
	// requests.
	PromptTokens uint64 `json:"prompt_tokens"`
	// PrefillTokens is prefill_tokens_total: prompt tokens the server
	// actually computed.
	PrefillTokens uint64 `json:"prefill_tokens"`
	// PrefixHitTokens is prefix_hit_tokens_total: prompt tokens reused from
	// the prefix cache.
	PrefixHitTokens uint64 `json:"prefix_hit_tokens"`
	// GeneratedTokens is generated_tokens_total.
	GeneratedTokens uint64 `json:"generated_tokens"`
	// DecodeSteps is decode_steps_total.
	DecodeSteps uint64 `json:"decode_steps"`
	// TokensPerStep is (PrefillTokens + GeneratedTokens) / DecodeSteps:
	// the mean batch of a decode step; 0 without steps.
	TokensPerStep float64 `json:"tokens_per_step"`
	// Admitted is admitted_total.
	Admitted uint64 `json:"admitted"`
	// Rejected is rejected_total, by reason.
	Rejected map[string]uint64 `json:"rejected"`
	// Preemptions is preemptions_total.
	Preemptions uint64 `json:"preemptions"`
	// Evictions is evictions_total.
	Evictions uint64 `json:"evictions"`
	// SlowConsumers is slow_consumer_total.
	SlowConsumers uint64 `json:"slow_consumers"`
	// NoKVSlot is nokvslot_total; it should stay 0.
	NoKVSlot uint64 `json:"nokvslot"`
}

// WriteJSON writes the report as indented JSON.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(r); err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	return nil
}

// describe returns a one-line description of the load and workload.
func (c ReportConfig) describe() string {
	var b strings.Builder
	if c.Mode == "open" {
		fmt.Fprintf(&b, "open loop, Poisson %g req/s (at most %d in flight)", c.Rate, c.MaxInFlight)
	} else {
		fmt.Fprintf(&b, "closed loop, %d clients", c.Concurrency)
	}
	var limits []string
	if c.DurationSeconds > 0 {
		limits = append(limits, fmt.Sprintf("%gs", c.DurationSeconds))
	}
	if c.Requests > 0 {
		limits = append(limits, fmt.Sprintf("%d requests", c.Requests))
	}
	fmt.Fprintf(&b, ", %s", strings.Join(limits, " or "))
	switch {
	case c.WarmupSeconds > 0:
		fmt.Fprintf(&b, " after %gs warm-up", c.WarmupSeconds)
	case c.WarmupRequests > 0:
		fmt.Fprintf(&b, " after %d warm-up requests", c.WarmupRequests)
	}
	w := c.Workload
	switch w.Kind {
	case Fixed:
		fmt.Fprintf(&b, "; fixed %d in / %d out", w.InputTokens, w.OutputTokens)
	case Mixed:
		fmt.Fprintf(&b, "; mixed %s, in %d..%d / out %d..%d", w.Distribution, w.InputMin, w.InputMax, w.OutputMin, w.OutputMax)
	case SharedPrefix:
		fmt.Fprintf(&b, "; shared-prefix %d in (%d-token prefix x %d) / %d out", w.InputTokens, w.PrefixTokens, w.Prefixes, w.OutputTokens)
	}
	if c.PrefixCache {
		b.WriteString("; prefix cache on")
	} else {
		b.WriteString("; prefix cache skipped")
	}
	return b.String()
}

// counts formats a map of counts in descending order, then by key.
func counts[V int | uint64](m map[string]V) string {
	keys := slices.Collect(maps.Keys(m))
	slices.SortFunc(keys, func(a, b string) int {
		if m[a] != m[b] {
			if m[a] > m[b] {
				return -1
			}
			return 1
		}
		return strings.Compare(a, b)
	})
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s %d", k, m[k]))
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}

// WriteText writes the report as a table for people.
func (r *Report) WriteText(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	p := func(format string, args ...any) { fmt.Fprintf(tw, format+"\n", args...) }
	m := r.Model
	cells := ""
	if m.KVCells > 0 { // llama-server does not report its cells
		cells = fmt.Sprintf(" %d KV cells,", m.KVCells)
	}
	p("target\t%s  (%s, %.1fM params,%s %d seqs)", r.Config.Target, m.Description, float64(m.ParameterCount)/1e6, cells, m.MaxRunningSequences)
	p("load\t%s", r.Config.describe())
	if r.Interrupted {
		p("\tINTERRUPTED: partial results")
	}
	p("elapsed\t%.2fs", r.ElapsedSeconds)
	q := r.Requests
	p("requests\tsent %d  ok %d  failed %d  dropped %d  (warm-up %d)", q.Sent, q.OK, q.Failed, q.Dropped, q.Warmup)
	p("status\t%s", counts(r.Status))
	if len(r.ErrorReasons) > 0 {
		p("error reasons\t%s", counts(r.ErrorReasons))
	}
	t := r.Throughput
	p("throughput\t%.2f req/s  %.1f output tok/s  %.1f total tok/s", t.RequestsPerSecond, t.OutputTokensPerSecond, t.TotalTokensPerSecond)
	g := r.Goodput
	slo := func(v float64) string {
		if v == 0 {
			return "any"
		}
		return fmt.Sprintf("<= %gms", v)
	}
	p("goodput\t%.2f req/s  (%d requests with TTFT %s and ITL %s)", g.RequestsPerSecond, g.Requests, slo(g.SLOTTFTMS), slo(g.SLOITLMS))
	p("tokens\tprompt sent %d  output %d  (partial %d)", r.Tokens.PromptSent, r.Tokens.Output, r.Tokens.OutputPartial)
	if s := r.Server; s != nil {
		p("server prefill\tprompt %d  computed %d  prefix hits %d  (client sent %d; Started reported %d cached)",
			s.PromptTokens, s.PrefillTokens, s.PrefixHitTokens, r.Tokens.PromptSent, r.Tokens.CachedReported)
		p("server steps\t%d steps  %.1f tokens/step  %d generated  %d admitted  rejected: %s",
			s.DecodeSteps, s.TokensPerStep, s.GeneratedTokens, s.Admitted, counts(s.Rejected))
		if s.Preemptions+s.Evictions+s.SlowConsumers+s.NoKVSlot > 0 {
			p("server events\tpreemptions %d  evictions %d  slow consumers %d  nokvslot %d", s.Preemptions, s.Evictions, s.SlowConsumers, s.NoKVSlot)
		}
	}
	p("")
	p("latency (ms)\tcount\tmean\tp50\tp90\tp99\tmax")
	for _, row := range []struct {
		name string
		s    Summary
	}{{"TTFT", r.LatencyMS.TTFT}, {"ITL", r.LatencyMS.ITL}, {"E2E", r.LatencyMS.E2E}, {"queue", r.LatencyMS.Queue}} {
		s := row.s
		p("  %s\t%d\t%.2f\t%.2f\t%.2f\t%.2f\t%.2f", row.name, s.Count, s.Mean, s.P50, s.P90, s.P99, s.Max)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	return nil
}
