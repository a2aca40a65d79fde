package native

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"

	"github.com/kvgate/kvgate/allocator"
)

// mixRequest is one request of a random mix, with how the test drives it.
type mixRequest struct {
	req Request
	// after is the index of an earlier request whose stream must have
	// delivered midAt events (or ended, or been refused) before this one
	// is submitted; -1 submits at once.
	after int
	midAt int
	// cancelAfter cancels the request's context once its reader has read
	// that many events (0: right after Submit); -1 never.
	cancelAfter int
	// cancelStep cancels it from OnStep after that many decode steps; 0
	// never.
	cancelStep int
}

// mix is a random engine configuration and the requests to run on it.
type mix struct {
	cells, batch  int
	cfg           EngineConfig
	reqs          []mixRequest
	smallBuffer   bool
	smallQueue    bool
	describeShort string
}

// newMix draws a mix from r: a small pool, so that preemption and
// eviction happen, prompts longer than the batch, shared prefixes, and
// cancellations.
func newMix(r *rand.Rand) mix {
	var m mix
	m.cfg.Deterministic = r.IntN(3) == 0
	m.cells = 48 + 16*r.IntN(8)
	m.batch = 4 + r.IntN(13)
	a := allocator.Config{MaxSequences: 2 + r.IntN(6), MaxQueue: 256, Watermark: r.IntN(5)}
	if r.IntN(2) == 0 {
		a.Policy = allocator.PolicyOptimistic
	}
	a.PrefixCache = !m.cfg.Deterministic && r.IntN(3) > 0
	if r.IntN(4) == 0 {
		a.MaxRunning = 1 + r.IntN(a.MaxSequences)
	}
	if r.IntN(8) == 0 {
		a.MaxQueue = 2
		m.smallQueue = true
	}
	m.cfg.Admission = a
	if r.IntN(8) == 0 {
		m.cfg.StreamBuffer = 8
		m.smallBuffer = true
	}
	tenants := []string{""}
	if r.IntN(3) == 0 {
		tenants = []string{"a", "b", "c"}
	}
	bases := [][]int32{prompt(r, 40), prompt(r, 40), prompt(r, 40)}
	n := 8 + r.IntN(16)
	for i := range n {
		var mr mixRequest
		var p []int32
		if r.IntN(3) > 0 {
			p = append(slices.Clone(bases[r.IntN(len(bases))][:1+r.IntN(40)]), prompt(r, r.IntN(8))...)
		} else {
			p = prompt(r, 1+r.IntN(40))
		}
		maxTokens := 1 + r.IntN(30)
		if r.IntN(20) > 0 {
			// Most requests fit the pool; the others are refused.
			maxTokens = max(1, min(maxTokens, m.cells-2-len(p)))
		}
		mr.req = Request{Prompt: p, MaxTokens: maxTokens, IgnoreEOS: r.IntN(10) < 7,
			NoCache: r.IntN(10) == 0, Priority: int32(r.IntN(3) - 1), Tenant: tenants[r.IntN(len(tenants))]}
		mr.after, mr.cancelAfter = -1, -1
		if i > 0 && r.IntN(3) == 0 {
			mr.after, mr.midAt = r.IntN(i), 1+r.IntN(6)
		}
		switch k := r.IntN(20); {
		case k < 3:
			mr.cancelAfter = r.IntN(7)
		case k < 5:
			mr.cancelStep = 1 + r.IntN(60)
		}
		m.reqs = append(m.reqs, mr)
	}
	// Some requests ask for several samples (not in deterministic mode,
	// which refuses them). They are drawn from a generator of their own,
	// seeded last, so that the rest of a mix is what it was before.
	rn := rand.New(rand.NewPCG(r.Uint64(), 0x6e73))
	running := a.MaxRunning
	if running == 0 {
		running = a.MaxSequences
	}
	groups := 0
	for i := range m.reqs {
		if !m.cfg.Deterministic && running > 1 && rn.IntN(4) == 0 {
			m.reqs[i].req.N = 2 + rn.IntN(min(running-1, 4))
			groups++
		}
	}
	m.describeShort = fmt.Sprintf("cells %d, batch %d, %d sequences (%d running), %v, watermark %d, prefix cache %v, deterministic %v, buffer %d, queue %d, %d requests (%d sample groups)",
		m.cells, m.batch, a.MaxSequences, a.MaxRunning, a.Policy, a.Watermark, a.PrefixCache, m.cfg.Deterministic, m.cfg.StreamBuffer, a.MaxQueue, n, groups)
	return m
}

// mixTally sums what the runs of TestWorkerProperty exercised.
type mixTally struct {
	mu                                                      sync.Mutex
	streams, refused, cancelled, slow, cached, samples      int
	reasons                                                 map[string]int
	preempted, evicted, relocated, held, padded, disordered uint64
}

// runMix runs m and checks every property the engine promises: the fake
// saw no broken rule, every stream equals its solo run (a prefix of it
// when it ended early), every Submit returned a stream that ended or a
// refusal, and the allocator and the cache hold nothing but the prefix
// cache at the end.
func runMix(t *testing.T, m mix, tally *mixTally) {
	fb := newFakeBackend(m.cells, m.batch)
	ctxs := make([]context.Context, len(m.reqs))
	cancels := make([]context.CancelFunc, len(m.reqs))
	for i := range m.reqs {
		ctxs[i], cancels[i] = context.WithCancel(context.Background())
		defer cancels[i]()
	}
	steps := 0
	cfg := m.cfg
	cfg.OnStep = func(int, int) {
		steps++
		for i, mr := range m.reqs {
			if mr.cancelStep == steps {
				cancels[i]()
			}
		}
	}
	e := startEngine(t, fb, cfg)

	type outcome struct {
		stream *Stream
		err    error
		got    []delivered // by sample index
	}
	outcomes := make([]outcome, len(m.reqs))
	mids := make([]chan struct{}, len(m.reqs))
	for i := range mids {
		mids[i] = make(chan struct{})
	}
	var wg sync.WaitGroup
	for i, mr := range m.reqs {
		wg.Go(func() {
			mid := sync.OnceFunc(func() { close(mids[i]) })
			defer mid()
			if mr.after >= 0 {
				<-mids[mr.after]
			}
			s, err := e.Submit(ctxs[i], mr.req)
			outcomes[i].stream, outcomes[i].err = s, err
			if err != nil {
				return
			}
			d := make([]delivered, max(mr.req.N, 1))
			if mr.cancelAfter == 0 {
				cancels[i]()
			}
			events := 0
			for ev := range s.Events() {
				d[ev.Index].add(ev)
				if events++; events == mr.cancelAfter {
					cancels[i]()
				}
				if events == mr.midAt {
					mid()
				}
			}
			for k, res := range s.Results() {
				d[k].res = res
			}
			outcomes[i].got = d
		})
	}
	wg.Wait()

	preempted := 0
	tally.mu.Lock()
	defer tally.mu.Unlock()
	for i, o := range outcomes {
		mr := m.reqs[i]
		name := fmt.Sprintf("request %d (prompt %d, max %d)", i, len(mr.req.Prompt), mr.req.MaxTokens)
		if o.err != nil {
			tally.refused++
			var re *allocator.RejectError
			if errors.As(o.err, &re) {
				tally.reasons[re.Reason]++
			}
			switch {
			case !errors.As(o.err, &re):
				t.Errorf("%s: Submit failed with %v, not a refusal", name, o.err)
			case re.Reason == allocator.ReasonNeverFits && len(mr.req.Prompt)+max(mr.req.N, 1)*mr.req.MaxTokens > e.Cells():
			case re.Reason == allocator.ReasonQueueFull && m.smallQueue:
			case re.Reason == allocator.ReasonCancelled && mr.cancelStep > 0:
			default:
				t.Errorf("%s: refused with %v", name, o.err)
			}
			continue
		}
		tally.streams++
		if len(o.got) > 1 {
			tally.samples += len(o.got)
		}
		c := o.stream.CachedTokens()
		if c > 0 {
			tally.cached++
		}
		for k, d := range o.got {
			name := fmt.Sprintf("%s sample %d of %d", name, k, len(o.got))
			checkStream(t, name, mr.req, d)
			switch err := d.res.Err; {
			case err == nil:
			case errors.Is(err, context.Canceled) && (mr.cancelAfter >= 0 || mr.cancelStep > 0):
				tally.cancelled++
			case errors.Is(err, ErrSlowConsumer) && m.smallBuffer:
				tally.slow++
			default:
				t.Errorf("%s: ended with %v", name, err)
			}
			if c != d.res.CachedTokens || c < 0 || c > max(len(mr.req.Prompt)-1, 0) || c > 0 && (!m.cfg.Admission.PrefixCache || mr.req.NoCache) {
				t.Errorf("%s: %d cached tokens (result %d)", name, c, d.res.CachedTokens)
			}
			if len(o.got) > 1 && d.res.Preempted != 0 {
				t.Errorf("%s: a sample was preempted %d times", name, d.res.Preempted)
			}
			preempted += d.res.Preempted
		}
	}
	st, ast := e.Stats(), e.Allocator().Stats()
	if st.NoKVSlot != 0 || st.Aborted != 0 {
		t.Errorf("llama.cpp found no slot %d times (%d sequences aborted) although the allocator had counted the room", st.NoKVSlot, st.Aborted)
	}
	if uint64(preempted) != st.Preempted || ast.Preemptions != st.Preempted {
		t.Errorf("results count %d preemptions, the engine %d, the allocator %d", preempted, st.Preempted, ast.Preemptions)
	}
	if m.cfg.Admission.Policy == allocator.PolicyReserve && st.Preempted != 0 {
		t.Errorf("reserve admission preempted %d times", st.Preempted)
	}
	if m.cfg.Deterministic && st.Disordered == 0 && len(fb.disorders) > 0 {
		t.Errorf("cells out of position order after decodes (sequence: decodes) %v, yet no forced break counted", fb.disorders)
	}
	if st.Evicted > ast.Evictions {
		t.Errorf("the engine removed %d evicted sequences, the allocator evicted %d", st.Evicted, ast.Evictions)
	}
	checkSettled(t, e)
	// An eviction made by an admission that was then undone (its Submit
	// gave up at that moment) reaches the worker only at its next step:
	// run one, so that the cache must match the allocator's count.
	flush := Request{Prompt: []int32{1}, MaxTokens: 1, NoCache: true}
	checkStream(t, "flush", flush, readAll(mustSubmit(t, e, context.Background(), flush)))
	if st, ast := e.Stats(), e.Allocator().Stats(); st.Evicted != ast.Evictions {
		t.Errorf("the engine removed %d evicted sequences, the allocator evicted %d", st.Evicted, ast.Evictions)
	}
	checkClosedCells(t, e, fb)
	tally.preempted += st.Preempted
	tally.evicted += st.Evicted
	tally.relocated += st.Relocated
	tally.held += st.Held
	tally.padded += st.Padded
	tally.disordered += st.Disordered
}

// TestWorkerProperty runs random request mixes on random small engines
// (both admission policies, prefix cache on and off, deterministic on and
// off) and checks runMix's properties after each, then that the mixes
// exercised preemption, eviction, prefix sharing, relocation and
// cancellation at all.
func TestWorkerProperty(t *testing.T) {
	seeds := 64
	if testing.Short() {
		seeds = 16
	}
	tally := mixTally{reasons: map[string]int{}}
	for seed := range seeds {
		m := newMix(rand.New(rand.NewPCG(uint64(seed), 0x6b7667)))
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			runMix(t, m, &tally)
			if t.Failed() {
				t.Logf("mix: %s", m.describeShort)
			}
		})
	}
	t.Logf("%d streams (%d samples of groups), %d refused %v, %d cancelled, %d slow, %d with a cached prefix; %d preemptions, %d evictions, %d relocations, %d held, %d padded, %d disordered",
		tally.streams, tally.samples, tally.refused, tally.reasons, tally.cancelled, tally.slow, tally.cached, tally.preempted, tally.evicted, tally.relocated, tally.held, tally.padded, tally.disordered)
	if !testing.Short() && (tally.preempted == 0 || tally.evicted == 0 || tally.cached == 0 || tally.relocated == 0 || tally.cancelled == 0 || tally.samples == 0) {
		t.Error("the mixes missed preemption, eviction, prefix sharing, relocation, cancellation or sample groups: make them harder")
	}
}
