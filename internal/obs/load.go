package obs

import (
	"context"
	"sync"
	"time"

	"google.golang.org/grpc/orca"

	"github.com/kvgate/kvgate/allocator"
	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
)

const (
	// loadWindow is the window over which request and error rates are
	// measured.
	loadWindow = 10 * time.Second
	// loadTick is how often the rates are recorded.
	loadTick = time.Second
	// minUtilization floors the reported application utilization:
	// weighted_round_robin ignores a report whose utilization is 0, so an
	// idle replica would keep the weight of its last busy report.
	minUtilization = 0.01
	// nominalQPS is the rps_fractional of every report; see ServerMetrics.
	nominalQPS = 1
)

// serverErrorReasons are the refusals that count as errors in the eps of
// the load report: the server could not take the call. Client-side causes
// (NEVER_FITS, cancellation, deadlines) do not.
var serverErrorReasons = []string{
	allocator.ReasonQueueFull, allocator.ReasonKVCellsExhausted, allocator.ReasonQueueTimeout, allocator.ReasonDraining,
}

// LoadReporter produces kvgate's ORCA load reports (see ServerMetrics and
// the README's "Operations" section). It is an orca.ServerMetricsProvider
// for both orca.CallMetricsServerOption (per-call reports in trailers) and
// orca.Register (out-of-band reports). Run records the request and error
// rates once a second; utilization and queue depth are read afresh for
// every report.
type LoadReporter struct {
	snap Snapshot

	mu      sync.Mutex
	samples []loadSample // oldest first, spanning at least loadWindow once old enough
	rps     float64
	eps     float64
}

type loadSample struct {
	t                time.Time
	requests, errors uint64
}

// NewLoadReporter returns a LoadReporter over snap, with rates measured
// from now on.
func NewLoadReporter(snap Snapshot) *LoadReporter {
	r := &LoadReporter{snap: snap}
	r.record(time.Now())
	return r
}

// Run records the rates every second until ctx is done.
func (r *LoadReporter) Run(ctx context.Context) {
	t := time.NewTicker(loadTick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			r.record(now)
		}
	}
}

// counts returns the calls that reached admission and those the server
// refused for lack of room or because it drains.
func counts(s *kvgatev1.GetCacheStatsResponse) (requests, errors uint64) {
	requests = s.GetAdmittedTotal()
	for _, n := range s.GetRejectedTotal() {
		requests += n
	}
	for _, reason := range serverErrorReasons {
		errors += s.GetRejectedTotal()[reason]
	}
	return requests, errors
}

// record takes a sample and computes the request and error rates over the
// last loadWindow (or since the start, but over at least a second).
func (r *LoadReporter) record(now time.Time) {
	req, errs := counts(r.snap())
	r.mu.Lock()
	defer r.mu.Unlock()
	r.samples = append(r.samples, loadSample{t: now, requests: req, errors: errs})
	// Keep the newest sample at least loadWindow old, and all after it.
	i := 0
	for i+1 < len(r.samples) && now.Sub(r.samples[i+1].t) >= loadWindow {
		i++
	}
	r.samples = r.samples[i:]
	first := r.samples[0]
	secs := max(now.Sub(first.t), time.Second).Seconds()
	r.rps = float64(req-first.requests) / secs
	r.eps = float64(errs-first.errors) / secs
}

// ServerMetrics returns the current load report:
//
//   - application_utilization: the queue-weighted utilization, that is the
//     cells in use plus the cells the queued requests need, over the pool;
//     at least 0.01, and above 1 when requests queue behind a full pool.
//     Cells in use are used + reserved - cached: cells held only by the
//     prefix cache are evictable and count as free.
//   - rps_fractional: 1, a nominal rate (see below).
//   - eps: calls refused with RESOURCE_EXHAUSTED or UNAVAILABLE per second
//     over the last 10 s.
//   - utilization["kv_cells"]: cells in use over the pool, in [0, 1];
//     utilization["kv_demand"]: the queue-weighted utilization capped at 1.
//   - named_metrics["queue_depth"], ["sequences_running"], and ["rps"], the
//     calls that reached admission per second over the last 10 s.
//
// weighted_round_robin weighs an endpoint qps / (utilization + eps/qps),
// and ignores a report whose qps or utilization is 0. With the true request
// rate as qps, the weights of lightly loaded replicas would follow their
// recent traffic, each call raising the weight of the replica that served
// it, so one replica would take most of the next burst. With a nominal qps
// of 1 the weight is 1 / (utilization + refusals per second): equal for
// idle replicas, and falling as a replica's KV cells and queue fill up or
// as it refuses calls.
func (r *LoadReporter) ServerMetrics() *orca.ServerMetrics {
	r.mu.Lock()
	rps, eps := r.rps, r.eps
	r.mu.Unlock()
	s := r.snap()
	total := float64(max(s.GetCellsTotal(), 1))
	inUse := max(int64(s.GetCellsUsed())+int64(s.GetCellsReserved())-int64(s.GetCellsCached()), 0)
	// The queue's demand is what its requests need at admission.
	demand := (float64(inUse) + float64(s.GetCellsQueued())) / total
	return &orca.ServerMetrics{
		CPUUtilization: -1,
		MemUtilization: -1,
		AppUtilization: max(demand, minUtilization),
		QPS:            nominalQPS,
		EPS:            eps,
		Utilization:    map[string]float64{"kv_cells": float64(inUse) / total, "kv_demand": min(demand, 1)},
		RequestCost:    map[string]float64{},
		NamedMetrics: map[string]float64{
			"queue_depth":       float64(s.GetSequencesQueued()),
			"sequences_running": float64(s.GetSequencesRunning()),
			"rps":               rps,
		},
	}
}
