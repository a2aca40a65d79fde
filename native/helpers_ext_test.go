//go:build cgo

package native_test

import (
	"sync"
	"sync/atomic"
	"testing"

	"github.com/kvgate/kvgate/internal/testmodels"
	"github.com/kvgate/kvgate/native"
	"github.com/kvgate/kvgate/native/llama"
)

// The real-model tests of the decode worker: black-box tests that run
// native.Engine on llama.cpp (package native/llama) with stories260K and
// compare its output with the independent reference decoder of package
// internal/llamatest. They need cgo; the worker's pure-Go tests, against a
// fake backend, are package native's own.

var (
	storiesOnce  sync.Once
	storiesModel *llama.Model
	storiesErr   error
)

// stories loads stories260K once for the package's tests, fetched and
// verified on first use.
func stories(t testing.TB) *llama.Model {
	t.Helper()
	path := testmodels.Path(t, testmodels.Stories260K)
	storiesOnce.Do(func() { storiesModel, storiesErr = llama.LoadModel(path, llama.LoadOptions{}) })
	if storiesErr != nil {
		t.Fatalf("load stories260K: %v", storiesErr)
	}
	return storiesModel
}

// openContext returns an EngineConfig.Open that creates a llama.cpp
// context of m with params p.
func openContext(m *llama.Model, p llama.ContextParams) func() (native.Backend, error) {
	return func() (native.Backend, error) {
		c, err := llama.NewContext(m, p)
		if err != nil {
			return nil, err
		}
		return c, nil
	}
}

// newEngine starts an engine on stories260K with a context of params p and
// the rest of cfg, on one thread (the test machines are small and shared),
// and closes it when t ends. Admission.MaxSequences defaults to
// p.MaxSequences; the allocator's policy is cfg's (reserve by default).
func newEngine(t *testing.T, p llama.ContextParams, cfg native.EngineConfig) *native.Engine {
	t.Helper()
	m := stories(t)
	p.Threads = 1
	if cfg.Admission.MaxSequences == 0 {
		cfg.Admission.MaxSequences = p.MaxSequences
	}
	cfg.Open, cfg.Vocab = openContext(m, p), m
	e, err := native.NewEngine(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	return e
}

// collected is everything a stream delivered.
type collected struct {
	text   string
	ids    []int32
	steps  []uint64
	result native.Result
}

// collect drains s and returns what it delivered and how it ended.
func collect(s *native.Stream) collected {
	var c collected
	for ev := range s.Events() {
		c.text += ev.Text
		c.ids = append(c.ids, ev.Tokens...)
		c.steps = append(c.steps, ev.Step)
	}
	c.result = s.Result()
	return c
}

// firstDiff returns the index of the first token where a and b differ, or
// the shorter length when one is a prefix of the other.
func firstDiff(a, b []int32) int {
	j := 0
	for j < len(a) && j < len(b) && a[j] == b[j] {
		j++
	}
	return j
}

// stepGate holds the worker, from the engine's OnStep hook, in the first
// decode step after arm until the function arm returned is called: a test
// hands over several sequences while the first one's first step waits, so
// that all of them run from the next step on whatever the scheduling.
// Submit needs nothing of the worker (admission is the allocator's), so
// the sequences handed over meanwhile cannot deadlock with the hold.
type stepGate struct {
	armed atomic.Pointer[chan struct{}]
}

// onStep is the engine's OnStep hook, or part of it.
func (g *stepGate) onStep(int, int) {
	if ch := g.armed.Swap(nil); ch != nil {
		<-*ch
	}
}

// arm makes the next step wait, and returns the function that lets it go
// on. That function is idempotent: defer it, so that a failing test never
// leaves the worker held.
func (g *stepGate) arm() (open func()) {
	ch := make(chan struct{})
	g.armed.Store(&ch)
	return sync.OnceFunc(func() {
		g.armed.CompareAndSwap(&ch, nil) // no step came: disarm
		close(ch)
	})
}
