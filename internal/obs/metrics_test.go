package obs

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
)

// TestMetricsHandler checks the exported series, /healthz and pprof.
func TestMetricsHandler(t *testing.T) {
	m := NewMetrics()
	m.AddSnapshot(func() *kvgatev1.GetCacheStatsResponse {
		return &kvgatev1.GetCacheStatsResponse{
			CellsTotal: 512, CellsUsed: 10, CellsReserved: 20, CellsFree: 482, SequencesQueued: 2,
			AdmittedTotal: 7, RejectedTotal: map[string]uint64{"QUEUE_FULL": 3, "DRAINING": 1},
			GeneratedTokensTotal: 99, PreemptionsTotal: 4, DecodeThreads: 3, ThreadChangesTotal: 6,
		}
	})
	m.Finished("OK", 5, 9)
	m.Finished("ResourceExhausted", 5, 0)
	m.OnStep(17, 3)
	m.TimeToFirstToken(20 * time.Millisecond)
	srv := httptest.NewServer(m.Handler(HandlerOptions{Pprof: true}))
	defer srv.Close()

	get := func(path string) (int, string) {
		t.Helper()
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	code, body := get("/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics: %d", code)
	}
	for _, want := range []string{
		`kvgate_kv_pool_cells 512`,
		`kvgate_kv_cells{state="used"} 10`,
		`kvgate_kv_cells{state="reserved"} 20`,
		`kvgate_queue_depth 2`,
		`kvgate_admissions_total 7`,
		`kvgate_rejections_total{code="ResourceExhausted",reason="QUEUE_FULL"} 3`,
		`kvgate_rejections_total{code="Unavailable",reason="DRAINING"} 1`,
		`kvgate_generated_tokens_total 99`,
		`kvgate_preemptions_total 4`,
		`kvgate_decode_threads 3`,
		`kvgate_thread_changes_total 6`,
		`kvgate_generate_requests_total{code="OK"} 1`,
		`kvgate_generate_requests_total{code="ResourceExhausted"} 1`,
		`kvgate_prompt_tokens_total 10`,
		`kvgate_completion_tokens_total 9`,
		`kvgate_batch_tokens_count 1`,
		`kvgate_batch_sequences_sum 3`,
		`kvgate_time_to_first_token_seconds_count 1`,
		`kvgate_draining 0`,
		`go_goroutines `,
	} {
		if !strings.Contains(body, want+"\n") && !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	m.SetLoading(true)
	if code, body := get("/healthz"); code != http.StatusServiceUnavailable || body != "loading\n" {
		t.Errorf("/healthz while loading: %d %q", code, body)
	}
	m.SetLoading(false)
	if code, body := get("/healthz"); code != http.StatusOK || body != "ok\n" {
		t.Errorf("/healthz while serving: %d %q", code, body)
	}
	m.SetDraining(true)
	if code, _ := get("/healthz"); code != http.StatusServiceUnavailable {
		t.Errorf("/healthz while draining: %d", code)
	}
	if _, body := get("/metrics"); !strings.Contains(body, "kvgate_draining 1\n") {
		t.Error("kvgate_draining is not 1 while draining")
	}
	if code, _ := get("/debug/pprof/"); code != http.StatusOK {
		t.Errorf("/debug/pprof/: %d", code)
	}
	noPprof := httptest.NewServer(m.Handler(HandlerOptions{}))
	defer noPprof.Close()
	resp, err := http.Get(noPprof.URL + "/debug/pprof/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("/debug/pprof/ without Pprof: %d", resp.StatusCode)
	}
}
