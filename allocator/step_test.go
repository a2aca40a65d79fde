package allocator

import (
	"errors"
	"math"
	"slices"
	"testing"
)

// seqTokens returns n distinct token ids starting at from.
func seqTokens(from, n int) []int32 {
	t := make([]int32, n)
	for i := range t {
		t[i] = int32(from + i)
	}
	return t
}

// TestApplyVictim checks which running sequence Apply preempts when a Grow
// finds the pool full under PolicyOptimistic: one of the most loaded
// tenant (cells held over weight), among those the lowest priority, among
// those the newest; never a lease that is not running, or not among the
// candidates.
func TestApplyVictim(t *testing.T) {
	type seq struct {
		tenant   string
		priority int32
		cells    int
		// released leases stay among the candidates; their cells go to a
		// lease outside them, so that the pool stays full.
		released bool
		// absent leases run but are not among the candidates.
		absent bool
	}
	tests := []struct {
		name    string
		weights map[string]float64
		seqs    []seq // in start order
		want    int   // index of the victim
	}{
		{"one tenant: the most recent", nil, []seq{{"", 0, 4, false, false}, {"", 0, 4, false, false}, {"", 0, 4, false, false}}, 2},
		{"one tenant: the lowest priority", nil, []seq{{"", 1, 4, false, false}, {"", -3, 4, false, false}, {"", 2, 4, false, false}}, 1},
		{"one tenant: the most recent of the lowest priority", nil, []seq{{"", 1, 4, false, false}, {"", 0, 4, false, false}, {"", 0, 4, false, false}, {"", 5, 4, false, false}}, 2},
		{"two tenants: the loaded one, despite a higher priority", nil,
			[]seq{{"a", 9, 5, false, false}, {"b", -9, 1, false, false}, {"a", 9, 5, false, false}, {"b", -9, 1, false, false}}, 2},
		{"two tenants: priority orders within the loaded one", nil,
			[]seq{{"a", 1, 3, false, false}, {"a", 0, 3, false, false}, {"b", -5, 2, false, false}, {"a", 2, 3, false, false}}, 1},
		{"three tenants", nil,
			[]seq{{"a", 0, 2, false, false}, {"b", 0, 3, false, false}, {"c", 0, 1, false, false}, {"b", 1, 3, false, false}, {"a", 0, 2, false, false}}, 1},
		{"the weight divides the load", map[string]float64{"a": 4},
			[]seq{{"a", 0, 8, false, false}, {"b", 0, 3, false, false}}, 1},
		{"an infinite load beats any finite one", map[string]float64{"a": 5e-324},
			[]seq{{"a", 2, 1, false, false}, {"b", 0, 20, false, false}}, 0},
		// Tenant loads cannot be NaN: an invalid weight counts as 1.
		{"a NaN weight counts as 1", map[string]float64{"a": math.NaN()},
			[]seq{{"a", 0, 5, false, false}, {"b", 0, 4, false, false}}, 0},
		{"a released lease is never chosen", nil,
			[]seq{{"", 0, 4, false, false}, {"", 0, 4, false, false}, {"", -100, 4, true, false}}, 1},
		{"a lease outside the candidates is never chosen", nil,
			[]seq{{"", 0, 4, false, false}, {"", 0, 4, false, false}, {"", -100, 4, false, true}}, 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			total := 0
			for _, s := range tc.seqs {
				total += s.cells
			}
			a := mustNew(t, Config{Cells: total, MaxSequences: 16, MaxQueue: 8, Policy: PolicyOptimistic,
				Tenants: func(name string) TenantLimits { return TenantLimits{Weight: tc.weights[name]} }})
			leases := make([]*Lease, len(tc.seqs))
			toks := make([][]int32, len(tc.seqs))
			for i, s := range tc.seqs {
				toks[i] = seqTokens(100*i, s.cells)
				leases[i] = mustAdmit(t, a, Request{Prompt: toks[i], MaxTokens: 1, Tenant: s.tenant, Priority: s.priority})
				if err := leases[i].Commit(toks[i]); err != nil {
					t.Fatal(err)
				}
			}
			var st Step
			for i, s := range tc.seqs {
				if s.released {
					leases[i].Release()
					filler := mustAdmit(t, a, Request{Prompt: seqTokens(10000, s.cells), MaxTokens: 1, Tenant: "filler"})
					_ = filler.Commit(seqTokens(10000, s.cells))
				}
				if !s.absent {
					st.Running = append(st.Running, Candidate{leases[i], toks[i]})
				}
			}
			grower := leases[0]
			if tc.want == 0 {
				grower = leases[1]
			}
			st.Grow = []*Lease{grower}
			a.Apply(&st)
			want := Preemption{leases[tc.want], false}
			if len(st.Failed) != 0 || !slices.Equal(st.Preempted, []Preemption{want}) {
				t.Fatalf("preempted %v, failed %v; want only lease %d", st.Preempted, st.Failed, tc.want)
			}
			if grower.Reserved() != 1 || len(st.Resumed) != 0 || a.Stats().Preemptions != 1 {
				t.Errorf("the grower has %d cells reserved, resumed %v, %d preemptions; want 1 cell, none resumed, 1 preemption",
					grower.Reserved(), st.Resumed, a.Stats().Preemptions)
			}
			mustInvariants(t, a)
		})
	}
}

// TestApplyPreemptsOnlyWhatGrowthNeeds is the regression test of a cascade:
// with no watermark a preempted sequence fits again in the cells it frees,
// and Apply used to admit it again at once, before the Grow that needed
// them, so that every running sequence, the grower last, was preempted
// and resumed and the Grow got nothing. Apply must preempt one sequence,
// give its cell to the Grow, and keep the victim queued.
func TestApplyPreemptsOnlyWhatGrowthNeeds(t *testing.T) {
	for _, watermark := range []int{0, 1, 3} {
		a := mustNew(t, Config{Cells: 12 + watermark, MaxSequences: 4, MaxQueue: 4, Policy: PolicyOptimistic, Watermark: watermark})
		var st Step
		for i := range 3 {
			toks := seqTokens(10*i, 4)
			l := mustAdmit(t, a, Request{Prompt: toks, MaxTokens: 8})
			if err := l.Commit(toks); err != nil {
				t.Fatal(err)
			}
			st.Running = append(st.Running, Candidate{l, toks})
		}
		// The oldest takes the watermark's cells: the pool is full.
		first := &st.Running[0]
		if err := first.Lease.Grow(watermark); err != nil {
			t.Fatal(err)
		}
		more := seqTokens(100, watermark)
		if err := first.Lease.Commit(more); err != nil {
			t.Fatal(err)
		}
		first.Tokens = append(first.Tokens, more...)
		st.Grow = []*Lease{st.Running[0].Lease}
		a.Apply(&st)
		if len(st.Preempted) != 1 || st.Preempted[0].Lease != st.Running[2].Lease || len(st.Resumed) != 0 || len(st.Failed) != 0 {
			t.Errorf("watermark %d: preempted %v, resumed %v, failed %v; want the newest only, queued", watermark, st.Preempted, st.Resumed, st.Failed)
		}
		if s := a.Stats(); s.Preemptions != 1 || s.Queued != 1 || s.CellsFree != 3 {
			t.Errorf("watermark %d: %+v", watermark, s)
		}
		mustInvariants(t, a)
	}
}

// TestApplyYieldsOnlyToAFairWaiter checks Grow's yield to another tenant's
// waiter: it yields when that tenant would stay within its fair share
// with the waiter admitted, and not when the waiter alone outgrows the
// share, which would make the two tenants preempt each other back and
// forth before either produced a token.
func TestApplyYieldsOnlyToAFairWaiter(t *testing.T) {
	tests := []struct {
		name       string
		used       int // cells tenant a's sequence holds, of 40
		waiterNeed int // tenant b's queued prompt
		wantYield  bool
	}{
		{"a waiter within its share", 34, 10, true},
		{"a waiter just below its share", 30, 19, true},
		{"a waiter of exactly its share", 24, 20, false},
		{"a waiter beyond its share", 24, 25, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a := mustNew(t, Config{Cells: 40, MaxSequences: 4, MaxQueue: 4, Policy: PolicyOptimistic})
			toks := seqTokens(0, tc.used)
			l := mustAdmit(t, a, Request{Prompt: toks, MaxTokens: 2, Tenant: "a"})
			if err := l.Commit(toks); err != nil {
				t.Fatal(err)
			}
			enqueue(t, a, Request{Prompt: seqTokens(1000, tc.waiterNeed), MaxTokens: 1, Tenant: "b"})
			err := l.Grow(1)
			if got := errors.Is(err, ErrNoCells); got != tc.wantYield || !got && err != nil {
				t.Errorf("Grow: %v, want a yield: %v", err, tc.wantYield)
			}
			mustInvariants(t, a)
		})
	}
}

// TestApplyYieldGoesToTheWaiter is the regression test of a livelock: a
// lone sequence that yields to another tenant's waiter is its own victim,
// and when it resumed at once, in the cells its preemption freed, it
// yielded again at its next growth, for ever. The waiter must get the
// cells, and the sequence wait until they come back.
func TestApplyYieldGoesToTheWaiter(t *testing.T) {
	a := mustNew(t, Config{Cells: 64, MaxSequences: 4, MaxQueue: 4, Policy: PolicyOptimistic, Watermark: 2})
	toks := seqTokens(0, 51)
	l := mustAdmit(t, a, Request{Prompt: toks, MaxTokens: 10, Tenant: "a"})
	if err := l.Commit(toks); err != nil {
		t.Fatal(err)
	}
	w := enqueue(t, a, Request{Prompt: seqTokens(1000, 15), MaxTokens: 5, Tenant: "b"})
	st := Step{Grow: []*Lease{l}, Running: []Candidate{{l, toks}}}
	a.Apply(&st)
	if len(st.Preempted) != 1 || st.Preempted[0].Lease != l || len(st.Resumed) != 0 || len(st.Failed) != 0 {
		t.Fatalf("preempted %v, resumed %v, failed %v; want the lone sequence preempted and queued", st.Preempted, st.Resumed, st.Failed)
	}
	lw := granted(w)
	if lw == nil {
		t.Fatal("the waiter the sequence yielded to was not admitted")
	}
	mustInvariants(t, a)
	st = Step{}
	a.Apply(&st)
	if len(st.Resumed) != 0 {
		t.Fatalf("resumed %v into the waiter's cells", st.Resumed)
	}
	st = Step{Ends: []End{{lw, true}}}
	a.Apply(&st)
	if !slices.Equal(st.Resumed, []*Lease{l}) {
		t.Fatalf("resumed %v once the waiter ended, want the sequence", st.Resumed)
	}
	l.Release()
	mustInvariants(t, a)
}

// TestApplyEndBeforeCopyLeavesNoCache is the regression test of a cached
// entry with no cells: a lease granted a shared prefix that ends before its
// owner copied the prefix (a preempted sequence resumed and cancelled by
// the same Apply) holds nothing in the KV cache, and must not stay as a
// cache entry that later requests copy from. Nor may a lease that has not
// copied its own prefix be another's source.
func TestApplyEndBeforeCopyLeavesNoCache(t *testing.T) {
	a := mustNew(t, Config{Cells: 64, MaxSequences: 4, MaxQueue: 4, Policy: PolicyOptimistic, PrefixCache: true})
	p := seqTokens(0, 20)
	// A lease holding id 0 until first has id 1, so that second gets id
	// 0: among equally cheap sources the lowest id wins.
	dummy := mustAdmit(t, a, Request{Prompt: seqTokens(100, 2), MaxTokens: 1, NoCache: true})
	first := mustAdmit(t, a, Request{Prompt: p, MaxTokens: 4})
	dummy.Release()
	st := Step{Commits: []Commit{{first, p}}, Ends: []End{{first, true}}}
	a.Apply(&st)
	if !slices.Equal(st.Kept, []bool{true}) {
		t.Fatalf("kept %v", st.Kept)
	}
	second := mustAdmit(t, a, Request{Prompt: p, MaxTokens: 4})
	if _, src, n := second.Prepared(); src != first.SeqID() || n != 19 {
		t.Fatalf("second shares %d tokens from %d, want 19 from %d", n, src, first.SeqID())
	}
	// Before second copies its prefix, a third request must share from
	// the cached entry, not from second.
	third := mustAdmit(t, a, Request{Prompt: p, MaxTokens: 4})
	if _, src, n := third.Prepared(); src != first.SeqID() || n != 19 {
		t.Errorf("third shares %d tokens from %d, want 19 from %d (second has copied nothing yet)", n, src, first.SeqID())
	}
	st = Step{Ends: []End{{second, true}}}
	a.Apply(&st)
	if !slices.Equal(st.Kept, []bool{false}) {
		t.Errorf("a lease that never copied its prefix was kept as cache: kept %v", st.Kept)
	}
	st = Step{Copied: []*Lease{third}, Ends: []End{{third, true}}}
	a.Apply(&st)
	mustInvariants(t, a)
	mustCheck(t, a)
}

// TestApplyResetsOutputs checks that Apply empties every output before it
// answers, so that a reused Step carries nothing over.
func TestApplyResetsOutputs(t *testing.T) {
	a := mustNew(t, Config{Cells: 16, MaxSequences: 4, MaxQueue: 4, Policy: PolicyOptimistic})
	other := mustAdmit(t, a, Request{Prompt: seqTokens(0, 2), MaxTokens: 2})
	st := Step{
		Evicted:   []int{1, 2},
		Kept:      []bool{true},
		Failed:    []Failure{{other, errors.New("old")}},
		Preempted: []Preemption{{other, true}},
		Resumed:   []*Lease{other},
	}
	a.Apply(&st)
	if len(st.Evicted)+len(st.Kept)+len(st.Failed)+len(st.Preempted)+len(st.Resumed) != 0 {
		t.Errorf("outputs after an empty Apply: %+v", st)
	}
	if a.Stats().Applies != 1 {
		t.Errorf("Applies = %d, want 1", a.Stats().Applies)
	}
	other.Release()
}

// TestApplyReportsEvictionsOnce checks that an eviction, whether Admit or
// Apply's own growth made it, is reported by the next Apply and by no
// later one, and that Kept follows Ends.
func TestApplyReportsEvictionsOnce(t *testing.T) {
	a := mustNew(t, Config{Cells: 20, MaxSequences: 4, MaxQueue: 4, Policy: PolicyOptimistic, PrefixCache: true})
	toks := seqTokens(0, 10)
	l1 := mustAdmit(t, a, Request{Prompt: toks, MaxTokens: 5})
	l2 := mustAdmit(t, a, Request{Prompt: seqTokens(100, 5), MaxTokens: 5, NoCache: true})
	seq1 := l1.SeqID()
	var st Step
	st.Commits = []Commit{{l1, toks}, {l2, seqTokens(100, 5)}}
	st.Ends = []End{{l1, true}, {l2, true}}
	a.Apply(&st)
	if !slices.Equal(st.Kept, []bool{true, false}) || len(st.Evicted) != 0 {
		t.Fatalf("kept %v, evicted %v; want the cached one kept and the NoCache one not", st.Kept, st.Evicted)
	}
	// Admission evicts the cached sequence for room.
	l3 := mustAdmit(t, a, Request{Prompt: seqTokens(200, 15), MaxTokens: 5})
	st = Step{}
	a.Apply(&st)
	if !slices.Equal(st.Evicted, []int{seq1}) {
		t.Fatalf("evicted %v, want [%d]", st.Evicted, seq1)
	}
	a.Apply(&st)
	if len(st.Evicted) != 0 {
		t.Fatalf("evicted %v reported again", st.Evicted)
	}
	// Growth evicts within Apply: reported by the same Apply.
	_ = l3.Commit(seqTokens(200, 15))
	st = Step{Ends: []End{{l3, true}}}
	a.Apply(&st)
	l4 := mustAdmit(t, a, Request{Prompt: seqTokens(300, 3), MaxTokens: 17})
	_ = l4.Commit(seqTokens(300, 3))
	seq3 := l3.SeqID()
	var evicted []int
	for range 17 {
		st = Step{Grow: []*Lease{l4}, Running: []Candidate{{l4, nil}}}
		a.Apply(&st)
		if len(st.Failed) > 0 || len(st.Preempted) > 0 {
			t.Fatalf("growth failed %v, preempted %v", st.Failed, st.Preempted)
		}
		evicted = append(evicted, st.Evicted...)
		_ = l4.Commit([]int32{1})
	}
	if !slices.Equal(evicted, []int{seq3}) || a.Stats().Evictions != 2 {
		t.Errorf("growth evicted %v (%d evictions in all), want [%d] once", evicted, a.Stats().Evictions, seq3)
	}
	l4.Release()
	mustInvariants(t, a)
}

// TestApplyReportsResumes checks that a lease Apply preempted is reported
// in Resumed by the Apply after it is admitted again, once, and that
// Resumes signals it.
func TestApplyReportsResumes(t *testing.T) {
	a := mustNew(t, Config{Cells: 12, MaxSequences: 4, MaxQueue: 4, Policy: PolicyOptimistic, Watermark: 1})
	t1, t2 := seqTokens(0, 5), seqTokens(100, 5)
	l1 := mustAdmit(t, a, Request{Prompt: t1, MaxTokens: 7})
	l2 := mustAdmit(t, a, Request{Prompt: t2, MaxTokens: 7})
	st := Step{Commits: []Commit{{l1, t1}, {l2, t2}}}
	a.Apply(&st)
	if err := l1.Grow(2); err != nil {
		t.Fatal(err)
	}
	_ = l1.Commit([]int32{7, 8})
	st = Step{Grow: []*Lease{l1}, Running: []Candidate{{l1, append(t1, 7, 8)}, {l2, t2}}}
	a.Apply(&st)
	if len(st.Preempted) != 1 || st.Preempted[0].Lease != l2 || len(st.Resumed) != 0 {
		t.Fatalf("preempted %v, resumed %v; want l2 preempted and queued", st.Preempted, st.Resumed)
	}
	// The owner may be woken for the next Apply, which has no room for
	// l2 yet.
	select {
	case <-a.Resumes():
	default:
	}
	st = Step{}
	a.Apply(&st)
	if len(st.Resumed) != 0 {
		t.Fatalf("resumed %v with no room", st.Resumed)
	}
	st = Step{Ends: []End{{l1, true}}}
	a.Apply(&st)
	if !slices.Equal(st.Resumed, []*Lease{l2}) {
		t.Fatalf("resumed %v, want l2", st.Resumed)
	}
	select {
	case <-a.Resumes():
	default:
		t.Error("Resumes not signalled")
	}
	if seq, src, n := l2.Prepared(); seq < 0 || src != -1 || n != 0 || l2.Reserved() != 5 {
		t.Errorf("resumed lease: Prepared %d %d %d, %d reserved; want a fresh sequence for its 5 tokens", seq, src, n, l2.Reserved())
	}
	a.Apply(&st)
	if len(st.Resumed) != 0 {
		t.Errorf("resumed %v reported again", st.Resumed)
	}
	l2.Release()
	mustInvariants(t, a)
}

// TestApplyCommitAgrees runs the same steps through Apply and through the
// Lease methods on two allocators: they must agree on every count, on
// failures included.
func TestApplyCommitAgrees(t *testing.T) {
	for _, policy := range []Policy{PolicyReserve, PolicyOptimistic} {
		cfg := Config{Cells: 40, MaxSequences: 4, MaxQueue: 4, Policy: policy, PrefixCache: true}
		byApply, byLease := mustNew(t, cfg), mustNew(t, cfg)
		req := Request{Prompt: seqTokens(0, 8), MaxTokens: 6}
		la, ll := mustAdmit(t, byApply, req), mustAdmit(t, byLease, req)
		steps := [][]int32{seqTokens(0, 8), {1}, {2}, {3}, {4}, {5}, {6}, {7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33}}
		for i, toks := range steps {
			var st Step
			if i > 0 {
				st.Grow = []*Lease{la}
				st.Running = []Candidate{{la, nil}}
			}
			var errLease error
			if i > 0 {
				errLease = ll.Grow(1)
			}
			byApply.Apply(&st)
			if (len(st.Failed) > 0) != (errLease != nil) {
				t.Fatalf("%v step %d: Apply failed %v, Grow %v", policy, i, st.Failed, errLease)
			}
			st = Step{Commits: []Commit{{la, toks}}}
			byApply.Apply(&st)
			errLease = ll.Commit(toks)
			if (len(st.Failed) > 0) != (errLease != nil) || errLease != nil && !errors.Is(st.Failed[0].Err, ErrOverCharge) {
				t.Fatalf("%v step %d: Apply failed %v, Commit %v", policy, i, st.Failed, errLease)
			}
			sa, sl := byApply.Stats(), byLease.Stats()
			if sa.CellsUsed != sl.CellsUsed || sa.CellsReserved != sl.CellsReserved || la.Charged() != ll.Charged() {
				t.Fatalf("%v step %d: Apply's allocator uses %d and reserves %d (%d charged), the Lease's %d and %d (%d)",
					policy, i, sa.CellsUsed, sa.CellsReserved, la.Charged(), sl.CellsUsed, sl.CellsReserved, ll.Charged())
			}
		}
		st := Step{Ends: []End{{la, true}}}
		byApply.Apply(&st)
		if keep := ll.Finish(); len(st.Kept) != 1 || st.Kept[0] != keep {
			t.Errorf("%v: Apply kept %v, Finish %v", policy, st.Kept, keep)
		}
		if sa, sl := byApply.Stats(), byLease.Stats(); sa.CellsUsed != sl.CellsUsed || sa.CellsCached != sl.CellsCached || sa.Running != 0 || sl.Running != 0 {
			t.Errorf("%v: after the end, Apply's %+v, the Lease's %+v", policy, sa, sl)
		}
		mustInvariants(t, byApply)
		mustInvariants(t, byLease)
	}
}
