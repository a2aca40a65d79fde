package obs

import (
	"math"
	"sync"
	"testing"
	"time"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
)

// fakeSnapshot is a settable Snapshot.
type fakeSnapshot struct {
	mu sync.Mutex
	s  *kvgatev1.GetCacheStatsResponse
}

func (f *fakeSnapshot) get() *kvgatev1.GetCacheStatsResponse {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.s
}

func (f *fakeSnapshot) set(s *kvgatev1.GetCacheStatsResponse) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.s = s
}

func near(a, b float64) bool { return math.Abs(a-b) < 1e-9 }

// TestLoadReport checks the values of a load report against their
// definitions.
func TestLoadReport(t *testing.T) {
	snap := &fakeSnapshot{s: &kvgatev1.GetCacheStatsResponse{CellsTotal: 1000, RejectedTotal: map[string]uint64{}}}
	r := NewLoadReporter(snap.get)

	// Idle: utilization is floored and qps nominal, so
	// weighted_round_robin does not ignore the report.
	sm := r.ServerMetrics()
	if !near(sm.AppUtilization, minUtilization) || sm.QPS != 1 || sm.EPS != 0 || sm.NamedMetrics["rps"] != 0 {
		t.Errorf("idle report: app %v qps %v eps %v rps %v", sm.AppUtilization, sm.QPS, sm.EPS, sm.NamedMetrics["rps"])
	}

	// 2 running sequences hold 300 used + 100 reserved cells, 50 of the
	// used ones only cached; 3 requests queue, needing 525 cells.
	snap.set(&kvgatev1.GetCacheStatsResponse{
		CellsTotal: 1000, CellsUsed: 300, CellsReserved: 100, CellsCached: 50,
		SequencesRunning: 2, SequencesQueued: 3, CellsQueued: 525,
		AdmittedTotal: 20, RejectedTotal: map[string]uint64{"QUEUE_FULL": 4, "NEVER_FITS": 1, "DRAINING": 1},
	})
	start := r.samples[0].t
	r.record(start.Add(2 * time.Second))
	sm = r.ServerMetrics()
	inUse := 350.0
	queued := 525.0
	if got := sm.Utilization["kv_cells"]; !near(got, inUse/1000) {
		t.Errorf("kv_cells = %v, want %v", got, inUse/1000)
	}
	if want := (inUse + queued) / 1000; !near(sm.AppUtilization, want) || !near(sm.Utilization["kv_demand"], min(want, 1)) {
		t.Errorf("application_utilization %v, kv_demand %v; want %v", sm.AppUtilization, sm.Utilization["kv_demand"], want)
	}
	if sm.NamedMetrics["queue_depth"] != 3 || sm.NamedMetrics["sequences_running"] != 2 {
		t.Errorf("named metrics %v", sm.NamedMetrics)
	}
	// 26 calls reached admission in 2 s; 5 of them were server refusals.
	if sm.QPS != 1 || !near(sm.NamedMetrics["rps"], 13) || !near(sm.EPS, 2.5) {
		t.Errorf("qps %v rps %v eps %v, want 1, 13 and 2.5", sm.QPS, sm.NamedMetrics["rps"], sm.EPS)
	}

	// After the window the old calls no longer count.
	r.record(start.Add(13 * time.Second))
	r.record(start.Add(14 * time.Second))
	if sm := r.ServerMetrics(); sm.NamedMetrics["rps"] != 0 || sm.EPS != 0 {
		t.Errorf("after the window: rps %v eps %v", sm.NamedMetrics["rps"], sm.EPS)
	}
	if n := len(r.samples); n > 3 {
		t.Errorf("%d samples kept", n)
	}

	// A full pool with a queue reports more than 1.
	snap.set(&kvgatev1.GetCacheStatsResponse{CellsTotal: 1000, CellsUsed: 900, CellsReserved: 100, SequencesRunning: 4, SequencesQueued: 4, CellsQueued: 1000})
	if sm := r.ServerMetrics(); !near(sm.AppUtilization, 2) || !near(sm.Utilization["kv_demand"], 1) {
		t.Errorf("saturated: app %v kv_demand %v", sm.AppUtilization, sm.Utilization["kv_demand"])
	}
}
