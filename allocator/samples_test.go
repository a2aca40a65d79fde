package allocator

import (
	"context"
	"errors"
	"slices"
	"testing"
	"testing/synctest"
)

// The tests of sample groups (Request.N > 1).

// groupOf returns the leader and its followers.
func groupOf(l *Lease) []*Lease { return append([]*Lease{l}, l.Samples()...) }

// chargedOf returns the cells charged to every lease of a group.
func chargedOf(group []*Lease) int {
	n := 0
	for _, m := range group {
		n += m.Charged()
	}
	return n
}

// TestSampleGroupAccounting admits a group under both policies, with and
// without the prefix cache, charges its prompt to the leader and
// generated tokens to every sample, and checks the ledger at each stage:
// the prompt counted once plus every sample's tokens, N sequence ids, the
// tenant holding the group's cells, and at the end nothing but the
// leader's cache entry.
func TestSampleGroupAccounting(t *testing.T) {
	cases := []struct {
		name        string
		policy      Policy
		prefixCache bool
		n           int
	}{
		{name: "reserve", policy: PolicyReserve, n: 4},
		{name: "optimistic", policy: PolicyOptimistic, n: 4},
		{name: "reserve, prefix cache", policy: PolicyReserve, prefixCache: true, n: 3},
		{name: "optimistic, prefix cache", policy: PolicyOptimistic, prefixCache: true, n: MaxSamples},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			a := mustNew(t, Config{Cells: 200, MaxSequences: 32, Policy: c.policy, PrefixCache: c.prefixCache, Watermark: 2})
			prompt := []int32{5, 6, 7, 8, 9, 10, 11, 12, 13, 14}
			const maxTok = 6
			l := mustAdmit(t, a, Request{Prompt: prompt, MaxTokens: maxTok, N: c.n, Tenant: "t"})
			group := groupOf(l)
			if len(group) != c.n {
				t.Fatalf("group of %d leases, want %d", len(group), c.n)
			}
			total := len(prompt) + c.n*maxTok
			st := a.Stats()
			if st.CellsReserved != total || st.Running != c.n || st.Admitted != 1 || st.Tenants["t"].CellsHeld != total || st.Tenants["t"].Running != c.n {
				t.Fatalf("after admission: %+v, want %d cells reserved by %d sequences", st, total, c.n)
			}
			ids := map[int]bool{}
			for i, m := range group {
				seq, src, n := m.Prepared()
				if ids[seq] || m.SampleIndex() != i || (i > 0 && (src != -1 || n != 0 || m.Reserved() != maxTok)) {
					t.Errorf("sample %d: sequence %d (seen %v), index %d, prefix %d from %d, reserved %d", i, seq, ids[seq], m.SampleIndex(), n, src, m.Reserved())
				}
				ids[seq] = true
			}
			if l.Reserved() != len(prompt)+maxTok {
				t.Errorf("leader reserves %d, want %d", l.Reserved(), len(prompt)+maxTok)
			}
			mustInvariants(t, a)

			if err := l.Commit(prompt); err != nil {
				t.Fatal(err)
			}
			generated := 0
			for i, m := range group {
				toks := []int32{int32(20 + i), int32(30 + i), int32(40 + i)}[:1+i%3]
				if err := m.Commit(toks); err != nil {
					t.Fatalf("sample %d: %v", i, err)
				}
				generated += len(toks)
				// Under both policies the reservation covers every token:
				// Grow takes nothing more.
				if err := m.Grow(maxTok - len(toks)); err != nil {
					t.Errorf("sample %d: Grow within its reservation: %v", i, err)
				}
			}
			st = a.Stats()
			if got := chargedOf(group); got != len(prompt)+generated || st.CellsUsed != got || st.CellsUsed+st.CellsReserved != total {
				t.Errorf("charged %d, used %d, reserved %d; want %d charged of %d", got, st.CellsUsed, st.CellsReserved, len(prompt)+generated, total)
			}
			mustInvariants(t, a)

			for _, m := range slices.Backward(group[1:]) {
				if m.Finish() {
					t.Errorf("sample %d stayed in the prefix cache", m.SampleIndex())
				}
				mustInvariants(t, a)
			}
			if st := a.Stats(); st.CellsUsed != l.Charged() || st.Running != 1 {
				t.Errorf("with the leader alone: used %d, running %d; want %d, 1", st.CellsUsed, st.Running, l.Charged())
			}
			kept := l.Finish()
			if kept != c.prefixCache {
				t.Errorf("leader kept %v, prefix cache %v", kept, c.prefixCache)
			}
			st = a.Stats()
			wantUsed := 0
			if c.prefixCache {
				wantUsed = len(prompt) + 1 // the leader's tokens
			}
			if st.CellsUsed != wantUsed || st.CellsCached != wantUsed || st.CellsReserved != 0 || st.Running != 0 || len(st.Tenants) != 0 {
				t.Errorf("after the group: %+v; want %d cells cached and nothing else", st, wantUsed)
			}
			mustInvariants(t, a)
		})
	}
}

// TestSampleGroupRefused checks the refusals of groups that can never run:
// ErrInvalidRequest for an N outside 0..MaxSamples or above MaxRunning,
// NEVER_FITS with the limit exceeded for too many cells; none is queued.
func TestSampleGroupRefused(t *testing.T) {
	cases := []struct {
		name      string
		n         int
		prompt    int
		maxTokens int
		invalid   bool
		limit     int
	}{
		{name: "negative", n: -1, prompt: 4, maxTokens: 4, invalid: true},
		{name: "over MaxSamples", n: MaxSamples + 1, prompt: 4, maxTokens: 4, invalid: true},
		{name: "over MaxRunning", n: 6, prompt: 4, maxTokens: 4, invalid: true},
		{name: "group over the pool", n: 5, prompt: 20, maxTokens: 17, limit: 100},
		{name: "one sample over MaxSequenceTokens", n: 2, prompt: 20, maxTokens: 41, limit: 60},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			a := mustNew(t, Config{Cells: 100, MaxSequences: 8, MaxRunning: 5, MaxQueue: 8, MaxSequenceTokens: 60})
			l, err := a.Admit(context.Background(), Request{PromptTokens: c.prompt, MaxTokens: c.maxTokens, N: c.n})
			if l != nil {
				t.Fatalf("admitted, err %v", err)
			}
			if c.invalid {
				if !errors.Is(err, ErrInvalidRequest) {
					t.Errorf("err %v, want ErrInvalidRequest", err)
				}
			} else if re := asReject(t, err); re.Reason != ReasonNeverFits || re.Limit != c.limit || re.CellsNeeded <= c.limit {
				t.Errorf("refusal %v, want NEVER_FITS over %d", re, c.limit)
			}
			if st := a.Stats(); st.Queued != 0 || st.Running != 0 {
				t.Errorf("%d queued, %d running", st.Queued, st.Running)
			}
		})
	}
}

// TestSampleGroupWaits checks that a group waits, atomically, for all its
// sequence ids and running slots and all its cells, and is admitted whole
// once they come back.
func TestSampleGroupWaits(t *testing.T) {
	cases := []struct {
		name string
		cfg  Config
		held Request // the lease that keeps the group waiting
	}{
		{name: "ids", cfg: Config{Cells: 100, MaxSequences: 4, MaxQueue: 4}, held: cells(2)},
		{name: "running slots", cfg: Config{Cells: 100, MaxSequences: 8, MaxRunning: 4, MaxQueue: 4}, held: cells(2)},
		{name: "cells", cfg: Config{Cells: 100, MaxSequences: 8, MaxQueue: 4}, held: cells(80)},
		{name: "cells, optimistic", cfg: Config{Cells: 100, MaxSequences: 8, MaxQueue: 4, Policy: PolicyOptimistic}, held: cells(80)},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				a := mustNew(t, c.cfg)
				held := mustAdmit(t, a, c.held)
				if c.cfg.Policy == PolicyOptimistic {
					if err := held.Grow(held.Reserved() + 79); err != nil {
						t.Fatal(err)
					}
				}
				res := admitAsync(context.Background(), a, Request{PromptTokens: 4, MaxTokens: 5, N: 4})
				synctest.Wait()
				pending(t, res)
				if st := a.Stats(); st.Queued != 1 || st.Running != 1 {
					t.Fatalf("queued %d, running %d; want the group queued", st.Queued, st.Running)
				}
				mustInvariants(t, a)
				held.Release()
				synctest.Wait()
				r := recv(t, res)
				if r.err != nil {
					t.Fatal(r.err)
				}
				if st := a.Stats(); st.Running != 4 || st.CellsReserved != 4+4*5 {
					t.Errorf("admitted group: running %d, reserved %d", st.Running, st.CellsReserved)
				}
				for _, m := range groupOf(r.lease) {
					m.Release()
				}
				mustInvariants(t, a)
			})
		})
	}
}

// TestSampleGroupNeverPreempted makes a single sequence run out of cells
// under optimistic admission beside a group: the group's samples are
// never victims and never requeued; the single sequence preempts itself.
func TestSampleGroupNeverPreempted(t *testing.T) {
	a := mustNew(t, Config{Cells: 24, MaxSequences: 8, MaxQueue: 4, Policy: PolicyOptimistic})
	g := mustAdmit(t, a, Request{PromptTokens: 4, MaxTokens: 4, N: 2}) // 12 cells
	single := mustAdmit(t, a, Request{PromptTokens: 4, MaxTokens: 20})
	group := groupOf(g)
	var s Step
	tokens := []int32{1, 2, 3, 4}
	if err := single.Charge(4); err != nil {
		t.Fatal(err)
	}
	for i := 0; len(s.Preempted) == 0 && i < 20; i++ {
		// The single sequence is listed oldest, so that the newest, the
		// victim among equals, is a sample of the group.
		s.Running = append(s.Running[:0], Candidate{Lease: single, Tokens: tokens})
		for _, m := range group {
			s.Running = append(s.Running, Candidate{Lease: m, Tokens: tokens})
		}
		s.Grow = append(s.Grow[:0], single)
		if group[1].Reserved() > 0 {
			s.Grow = append(s.Grow, group[1]) // within its reservation
		}
		a.Apply(&s)
		if len(s.Failed) > 0 {
			t.Fatalf("failures %+v", s.Failed)
		}
		if len(s.Preempted) == 0 {
			if err := single.Charge(1); err != nil {
				t.Fatal(err)
			}
			if group[1].Reserved() > 0 {
				if err := group[1].Charge(1); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	if len(s.Preempted) != 1 || s.Preempted[0].Lease != single {
		t.Fatalf("preempted %+v, want the single sequence only", s.Preempted)
	}
	for _, m := range group {
		if _, _, err := m.Requeue(tokens); !errors.Is(err, ErrInvalidRequest) {
			t.Errorf("Requeue of sample %d: %v, want ErrInvalidRequest", m.SampleIndex(), err)
		}
	}
	mustInvariants(t, a)
	single.Release()
	for _, m := range group {
		m.Release()
	}
	if st := a.Stats(); st.CellsUsed != 0 || st.CellsReserved != 0 || st.Running != 0 || st.Queued != 0 {
		t.Errorf("after every release: %+v", st)
	}
}

// TestSampleGroupLeaderFirst ends a leader before its followers: they end
// with it (their charges then fail with ErrReleased), and every cell
// comes back once.
func TestSampleGroupLeaderFirst(t *testing.T) {
	for _, keep := range []bool{false, true} {
		a := mustNew(t, Config{Cells: 64, MaxSequences: 8, PrefixCache: true})
		prompt := []int32{1, 2, 3, 4, 5}
		l := mustAdmit(t, a, Request{Prompt: prompt, MaxTokens: 4, N: 3})
		if err := l.Commit(prompt); err != nil {
			t.Fatal(err)
		}
		for _, f := range l.Samples() {
			if err := f.Charge(2); err != nil {
				t.Fatal(err)
			}
		}
		if keep {
			l.Finish()
		} else {
			l.Release()
		}
		for _, f := range l.Samples() {
			if err := f.Charge(1); !errors.Is(err, ErrReleased) || f.Reserved() != 0 {
				t.Errorf("keep %v: follower %d after its leader ended: Charge %v, reserved %d", keep, f.SampleIndex(), err, f.Reserved())
			}
			f.Release() // idempotent
		}
		st := a.Stats()
		if st.Running != 0 || st.CellsReserved != 0 || st.CellsUsed != st.CellsCached || (st.CellsCached > 0) != keep {
			t.Errorf("keep %v: after the group: %+v", keep, st)
		}
		mustInvariants(t, a)
	}
}
