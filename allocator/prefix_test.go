package allocator

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

// checkTreeLocked recomputes every count of the prefix tree from the
// entries and compares.
func (a *Allocator) checkTreeLocked() error {
	users := map[*node]int{}
	hold := map[*node]int{}
	running := map[*node]int{}
	for seq, e := range a.entries {
		if e.seq != seq {
			return fmt.Errorf("entry %d filed under %d", e.seq, seq)
		}
		depth := 0
		parent := a.tree.roots[e.part]
		if len(e.path) > 0 && parent == nil {
			return fmt.Errorf("entry %d: partition %+v has no root", seq, e.part)
		}
		for _, n := range e.path {
			if n.parent != parent {
				return fmt.Errorf("entry %d: path is not a chain", seq)
			}
			parent = n
			depth += len(n.tokens)
			users[n]++
			if e.lease != nil || e.pins > 0 {
				hold[n]++
			}
			if e.lease != nil {
				running[n]++
			}
		}
		if depth != e.depth {
			return fmt.Errorf("entry %d: depth %d, path holds %d tokens", seq, e.depth, depth)
		}
		if (e.lease == nil) != (e.lru != nil) {
			return fmt.Errorf("entry %d: cached %v but in LRU %v", seq, e.lease == nil, e.lru != nil)
		}
		if a.seqUsed[seq/64]&(1<<(seq%64)) == 0 {
			return fmt.Errorf("entry %d holds no sequence id", seq)
		}
	}
	cells, evictable := 0, 0
	var walk func(n *node) error
	walk = func(n *node) error {
		for _, c := range n.children {
			if c.parent != n {
				return errors.New("child with the wrong parent")
			}
			if c.users != users[c] || c.hold != hold[c] || c.running != running[c] {
				return fmt.Errorf("node %v: users %d hold %d running %d, want %d %d %d",
					c.tokens, c.users, c.hold, c.running, users[c], hold[c], running[c])
			}
			if c.users == 0 || len(c.tokens) == 0 {
				return fmt.Errorf("node %v with %d users left in the tree", c.tokens, c.users)
			}
			cells += len(c.tokens)
			if c.hold == 0 {
				evictable += len(c.tokens)
			}
			if err := walk(c); err != nil {
				return err
			}
		}
		return nil
	}
	for part, r := range a.tree.roots {
		if len(r.children) == 0 {
			return fmt.Errorf("empty root of partition %+v lingers", part)
		}
		if r.parent != nil || len(r.tokens) != 0 {
			return fmt.Errorf("root of partition %+v is not a root", part)
		}
		if err := walk(r); err != nil {
			return err
		}
	}
	switch {
	case cells != a.tree.cells || cells != a.used:
		return fmt.Errorf("tree holds %d cells, counted %d, used %d", cells, a.tree.cells, a.used)
	case evictable != a.tree.evictable:
		return fmt.Errorf("evictable %d, counted %d", evictable, a.tree.evictable)
	case a.lru.Len() != len(a.entries)-a.running:
		return fmt.Errorf("%d cached in LRU, %d entries, %d running", a.lru.Len(), len(a.entries), a.running)
	}
	return a.checkLocked()
}

func mustCheck(t *testing.T, a *Allocator) {
	t.Helper()
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.checkTreeLocked(); err != nil {
		t.Fatal(err)
	}
}

// kvModel mirrors what llama.cpp holds per sequence id when the engine
// follows the allocator's instructions, to check that every prefix copy
// reads cells that really hold the prompt's tokens.
type kvModel map[int][]int32

func (kv kvModel) start(t *testing.T, l *Lease, prompt []int32) {
	t.Helper()
	src, n := l.Prefix()
	seq := l.SeqID()
	if len(kv[seq]) != 0 {
		t.Fatalf("sequence %d handed out while llama.cpp still holds %v", seq, kv[seq])
	}
	if n > 0 {
		have := kv[src]
		if len(have) < n || !slices.Equal(have[:n], prompt[:n]) {
			t.Fatalf("copy of %d tokens from sequence %d holding %v for prompt %v", n, src, have, prompt)
		}
		kv[seq] = slices.Clone(prompt[:n])
	}
	l.Copied()
}

func TestPrefixSharing(t *testing.T) {
	var evicted []int
	a, err := New(Config{Cells: 64, MaxSequences: 8, MaxRunning: 4, MaxQueue: 4, PrefixCache: true})
	if err != nil {
		t.Fatal(err)
	}
	kv := kvModel{}
	ctx := context.Background()
	run := func(prompt []int32, gen int) (*Lease, bool) {
		t.Helper()
		l, err := a.Admit(ctx, Request{Prompt: prompt, MaxTokens: gen + 1})
		if err != nil {
			t.Fatal(err)
		}
		evicted = append(evicted, evictions(a)...)
		kv.start(t, l, prompt)
		_, n := l.Prefix()
		rest := prompt[n:]
		if err := l.Commit(rest); err != nil {
			t.Fatal(err)
		}
		kv[l.SeqID()] = append(kv[l.SeqID()], rest...)
		for i := range gen {
			tok := int32(1000 + i)
			if err := l.Commit([]int32{tok}); err != nil {
				t.Fatal(err)
			}
			kv[l.SeqID()] = append(kv[l.SeqID()], tok)
		}
		mustCheck(t, a)
		seq := l.SeqID()
		keep := l.Finish()
		if !keep {
			delete(kv, seq)
		}
		mustCheck(t, a)
		return l, keep
	}
	p1 := []int32{1, 2, 3, 4, 5, 6, 7, 8}
	l1, keep := run(p1, 4)
	if !keep {
		t.Fatal("a finished sequence was not cached")
	}
	st := a.Stats()
	if st.CellsUsed != 12 || st.CellsCached != 12 || st.Cached != 1 || st.CellsReserved != 0 {
		t.Fatalf("after one sequence: %+v", st)
	}
	// Same first 5 tokens: 5 shared.
	p2 := []int32{1, 2, 3, 4, 5, 60, 70}
	l2, err := a.Admit(ctx, Request{Prompt: p2, MaxTokens: 3})
	if err != nil {
		t.Fatal(err)
	}
	if src, n := l2.Prefix(); src != l1.SeqID() || n != 5 || l2.CachedTokens() != 5 {
		t.Fatalf("Prefix() = %d, %d; want %d, 5", src, n, l1.SeqID())
	}
	if st := a.Stats(); st.CellsReserved != 2+3 || st.PrefixHitTokens != 5 {
		t.Fatalf("reserved %d (want the 2 unshared prompt tokens + 3), hits %d", st.CellsReserved, st.PrefixHitTokens)
	}
	kv.start(t, l2, p2)
	if err := l2.Commit(p2[5:]); err != nil {
		t.Fatal(err)
	}
	kv[l2.SeqID()] = append(kv[l2.SeqID()], p2[5:]...)
	mustCheck(t, a)
	if st := a.Stats(); st.CellsUsed != 12+2 || st.CellsShared != 5 {
		t.Fatalf("shared cells counted twice? %+v", st)
	}
	l2.Finish()
	mustCheck(t, a)
	// The whole prompt cached: all but the last token are shared.
	l3, err := a.Admit(ctx, Request{Prompt: p1, MaxTokens: 1})
	if err != nil {
		t.Fatal(err)
	}
	if _, n := l3.Prefix(); n != len(p1)-1 {
		t.Fatalf("identical prompt shares %d tokens, want %d", n, len(p1)-1)
	}
	kv.start(t, l3, p1)
	delete(kv, l3.SeqID())
	l3.Release()
	mustCheck(t, a)
	// A request that opts out shares nothing.
	l4, err := a.Admit(ctx, Request{Prompt: p1, MaxTokens: 1, NoCache: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, n := l4.Prefix(); n != 0 {
		t.Fatalf("NoCache request shares %d tokens", n)
	}
	kv.start(t, l4, p1)
	_ = l4.Commit(p1)
	delete(kv, l4.SeqID())
	if l4.Finish() {
		t.Fatal("a NoCache request left its cells behind")
	}
	mustCheck(t, a)
	if len(evicted) != 0 {
		t.Fatalf("evicted %v without pressure", evicted)
	}
	// Pressure: a request needing 60 of 64 cells evicts the cache.
	big, err := a.Admit(ctx, Request{Prompt: []int32{9, 9, 9}, MaxTokens: 57})
	if err != nil {
		t.Fatal(err)
	}
	mustCheck(t, a)
	evicted = append(evicted, evictions(a)...)
	if len(evicted) == 0 || a.Stats().Evictions == 0 {
		t.Fatal("nothing evicted under pressure")
	}
	for _, seq := range evicted {
		delete(kv, seq)
	}
	kv.start(t, big, []int32{9, 9, 9})
	big.Release()
	mustCheck(t, a)
}

func TestPinnedSourceSurvivesEviction(t *testing.T) {
	var evicted []int
	a, _ := New(Config{Cells: 32, MaxSequences: 4, MaxRunning: 4, MaxQueue: 4, PrefixCache: true})
	ctx := context.Background()
	p := []int32{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
	l1, _ := a.Admit(ctx, Request{Prompt: p, MaxTokens: 1})
	_ = l1.Commit(p)
	l1.Finish()
	// l2 will copy 9 tokens from l1's entry but has not yet.
	l2, err := a.Admit(ctx, Request{Prompt: p, MaxTokens: 1})
	if err != nil {
		t.Fatal(err)
	}
	// A request that needs every free cell cannot evict the pinned source.
	ctxT, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if _, err := a.Admit(ctxT, Request{PromptTokens: 20, MaxTokens: 10}); err == nil {
		t.Fatal("admitted by evicting a pinned prefix")
	}
	evicted = append(evicted, evictions(a)...)
	if len(evicted) != 0 {
		t.Fatalf("evicted %v while pinned", evicted)
	}
	l2.Copied()
	mustCheck(t, a)
	l2.Release()
	l3, err := a.Admit(ctx, Request{PromptTokens: 20, MaxTokens: 12})
	if err != nil {
		t.Fatal(err)
	}
	evicted = append(evicted, evictions(a)...)
	if len(evicted) != 1 || evicted[0] != l1.SeqID() {
		t.Fatalf("evicted %v, want [%d]", evicted, l1.SeqID())
	}
	l3.Release()
	mustCheck(t, a)
}

func TestSequenceIDPressureEvictsLRU(t *testing.T) {
	var evicted []int
	a, _ := New(Config{Cells: 1000, MaxSequences: 3, MaxRunning: 2, MaxQueue: 4, PrefixCache: true})
	ctx := context.Background()
	seqs := []int{}
	for i := range 4 {
		p := []int32{int32(100 * (i + 1)), 5}
		l, err := a.Admit(ctx, Request{Prompt: p, MaxTokens: 1})
		if err != nil {
			t.Fatal(err)
		}
		_ = l.Commit(p)
		seqs = append(seqs, l.SeqID())
		l.Finish()
	}
	evicted = append(evicted, evictions(a)...)
	if len(evicted) != 1 || evicted[0] != seqs[0] {
		t.Fatalf("evicted %v, want the least recently used %d", evicted, seqs[0])
	}
	mustCheck(t, a)
}

func TestOptimisticGrowAndRequeue(t *testing.T) {
	a, _ := New(Config{Cells: 20, MaxSequences: 4, MaxQueue: 4, Policy: PolicyOptimistic, Watermark: 2})
	ctx := context.Background()
	l1, err := a.Admit(ctx, Request{Prompt: []int32{1, 2, 3, 4, 5}, MaxTokens: 15, Priority: 1})
	if err != nil {
		t.Fatal(err)
	}
	l2, err := a.Admit(ctx, Request{Prompt: []int32{6, 7, 8, 9, 10}, MaxTokens: 15})
	if err != nil {
		t.Fatal(err)
	}
	if st := a.Stats(); st.CellsReserved != 10 {
		t.Fatalf("optimistic admission reserved %d, want the prompts only (10)", st.CellsReserved)
	}
	_ = l1.Commit([]int32{1, 2, 3, 4, 5})
	_ = l2.Commit([]int32{6, 7, 8, 9, 10})
	grown := 0
	for {
		if err := l1.Grow(1); err != nil {
			if !errors.Is(err, ErrNoCells) {
				t.Fatal(err)
			}
			break
		}
		_ = l1.Commit([]int32{42})
		grown++
	}
	if grown != 10 {
		t.Fatalf("grew %d cells, want the 10 free", grown)
	}
	keep, resumed, err := l2.Requeue([]int32{6, 7, 8, 9, 10})
	if err != nil || keep {
		t.Fatalf("Requeue = %v, %v", keep, err)
	}
	mustCheck(t, a)
	if a.Stats().Preemptions != 1 {
		t.Fatal("preemption not counted")
	}
	select {
	case <-resumed:
		t.Fatal("resumed although l1 holds the cells")
	default:
	}
	if err := l1.Grow(1); err != nil {
		t.Fatalf("Grow after the preemption: %v", err)
	}
	_ = l1.Commit([]int32{43})
	l1.Finish()
	select {
	case <-resumed:
	case <-time.After(time.Second):
		t.Fatal("the preempted sequence was not resumed when cells came back")
	}
	if err := l2.Commit([]int32{6, 7, 8, 9, 10}); err != nil {
		t.Fatalf("resumed lease cannot recommit its tokens: %v", err)
	}
	mustCheck(t, a)
	l2.Finish()
	mustCheck(t, a)
	if st := a.Stats(); st.CellsUsed != 0 || st.CellsReserved != 0 || st.Running != 0 || st.Queued != 0 {
		t.Fatalf("not empty at the end: %+v", st)
	}
}

// TestPrefixProperty drives random requests over a small alphabet (so that
// prompts share prefixes), of a few tenants and cache salts, through the
// allocator the way the engine does, under both policies, and checks the
// tree, the ledger, every copy, and that no copy crosses a partition.
func TestPrefixProperty(t *testing.T) {
	for _, policy := range []Policy{PolicyReserve, PolicyOptimistic} {
		for seed := range uint64(6) {
			t.Run(fmt.Sprintf("%v/%d", policy, seed), func(t *testing.T) {
				prefixScenario(t, rand.New(rand.NewPCG(seed, 99)), policy, 400)
			})
		}
	}
}

func prefixScenario(t *testing.T, r *rand.Rand, policy Policy, ops int) {
	kv := kvModel{}
	a, err := New(Config{Cells: 96, MaxSequences: 10, MaxRunning: 4, MaxQueue: 0, PrefixCache: true,
		Policy: policy, Watermark: 4})
	if err != nil {
		t.Fatal(err)
	}
	type live struct {
		l      *Lease
		prompt []int32
		toks   []int32 // in the cache
		left   int
	}
	var running []*live
	ctx := context.Background()
	// Partitions are drawn from their own source, so that the other draws
	// stay as they were before there were partitions. parts records the
	// partition of the request each sequence id last ran.
	pr := rand.New(rand.NewPCG(r.Uint64(), 3))
	parts := map[int]partition{}
	for range ops {
		switch op := r.IntN(10); {
		case op < 4: // admit
			n := 1 + r.IntN(12)
			prompt := make([]int32, n)
			for i := range prompt {
				prompt[i] = int32(r.IntN(3))
			}
			part := partition{tenant: []string{"", "t1", "t2"}[pr.IntN(3)], salt: []string{"", "s"}[pr.IntN(2)]}
			l, err := a.Admit(ctx, Request{Prompt: prompt, MaxTokens: 1 + r.IntN(10), NoCache: r.IntN(8) == 0,
				Tenant: part.tenant, CacheSalt: part.salt})
			if err != nil {
				continue // QUEUE_FULL: nothing waits here
			}
			for _, seq := range evictions(a) {
				delete(kv, seq)
			}
			if src, n := l.Prefix(); n > 0 && parts[src] != part {
				t.Fatalf("request of %+v shares %d tokens from sequence %d of %+v", part, n, src, parts[src])
			}
			parts[l.SeqID()] = part
			kv.start(t, l, prompt)
			_, pre := l.Prefix()
			running = append(running, &live{l: l, prompt: prompt, toks: slices.Clone(prompt[:pre]), left: len(prompt) - pre})
		case op < 8 && len(running) > 0: // step one sequence
			s := running[r.IntN(len(running))]
			var tok []int32
			if s.left > 0 {
				k := 1 + r.IntN(s.left)
				tok = s.prompt[len(s.prompt)-s.left : len(s.prompt)-s.left+k]
				s.left -= k
			} else {
				if err := s.l.Grow(1); err != nil {
					if errors.Is(err, ErrOverCharge) {
						break // reserve policy: max tokens reached
					}
					if !errors.Is(err, ErrNoCells) {
						t.Fatal(err)
					}
					// Preempt it.
					seq := s.l.SeqID()
					keep, _, err := s.l.Requeue(s.toks)
					if err != nil {
						t.Fatal(err)
					}
					if !keep {
						delete(kv, seq)
					}
					s.l.Release() // the test gives up on it
					running = slices.DeleteFunc(running, func(x *live) bool { return x == s })
					break
				}
				for _, seq := range evictions(a) {
					delete(kv, seq)
				}
				tok = []int32{int32(r.IntN(3))}
			}
			if err := s.l.Commit(tok); err != nil {
				if errors.Is(err, ErrOverCharge) {
					break // max tokens reached
				}
				t.Fatal(err)
			}
			s.toks = append(s.toks, tok...)
			kv[s.l.SeqID()] = append(kv[s.l.SeqID()], tok...)
		case len(running) > 0: // finish
			i := r.IntN(len(running))
			s := running[i]
			seq := s.l.SeqID()
			if !s.l.Finish() {
				delete(kv, seq)
			}
			running = slices.Delete(running, i, i+1)
		}
		mustCheck(t, a)
	}
	for _, s := range running {
		seq := s.l.SeqID()
		if !s.l.Finish() {
			delete(kv, seq)
		}
	}
	mustCheck(t, a)
	st := a.Stats()
	if st.CellsUsed != st.CellsCached || st.CellsReserved != 0 || st.Running != 0 {
		t.Fatalf("at the end: %+v", st)
	}
}

// FuzzPrefixCache runs the prefix scenario from fuzzed seeds; the seed
// corpus runs in every go test.
func FuzzPrefixCache(f *testing.F) {
	for seed := range uint64(4) {
		f.Add(seed, uint8(seed%2))
	}
	f.Fuzz(func(t *testing.T, seed uint64, policy uint8) {
		prefixScenario(t, rand.New(rand.NewPCG(seed, 7)), Policy(policy%2), 200)
	})
}
