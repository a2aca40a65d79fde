package allocator

import (
	"context"
	"slices"
	"testing"
)

// cacheOne runs prompt to completion as tenant and salt, committing it
// whole, and leaves it in the prefix cache.
func cacheOne(t *testing.T, a *Allocator, prompt []int32, tenant, salt string) *Lease {
	t.Helper()
	l, err := a.Admit(context.Background(), Request{Prompt: prompt, MaxTokens: 1, Tenant: tenant, CacheSalt: salt})
	if err != nil {
		t.Fatal(err)
	}
	l.Copied()
	_, n := l.Prefix()
	if err := l.Commit(prompt[n:]); err != nil {
		t.Fatal(err)
	}
	if !l.Finish() {
		t.Fatal("a finished sequence was not cached")
	}
	return l
}

func TestPrefixPartitions(t *testing.T) {
	type part struct{ tenant, salt string }
	tests := []struct {
		name          string
		first, second part
		wantHit       bool
	}{
		{"default tenant, no salt", part{}, part{}, true},
		{"same tenant and salt", part{"acme", "s1"}, part{"acme", "s1"}, true},
		{"same tenant, no salt", part{"acme", ""}, part{"acme", ""}, true},
		{"other tenant", part{"acme", ""}, part{"umbrella", ""}, false},
		{"other tenant, same salt", part{"acme", "s1"}, part{"umbrella", "s1"}, false},
		{"default tenant and a named one", part{}, part{"acme", ""}, false},
		{"other salt", part{"acme", "s1"}, part{"acme", "s2"}, false},
		{"salt and none", part{"acme", "s1"}, part{"acme", ""}, false},
		{"tenant and salt swapped", part{"x", ""}, part{"", "x"}, false},
	}
	prompt := []int32{1, 2, 3, 4, 5, 6, 7, 8}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := mustNew(t, Config{Cells: 64, MaxSequences: 4, PrefixCache: true})
			first := cacheOne(t, a, prompt, tt.first.tenant, tt.first.salt)
			l, err := a.Admit(context.Background(), Request{Prompt: prompt, MaxTokens: 1, Tenant: tt.second.tenant, CacheSalt: tt.second.salt})
			if err != nil {
				t.Fatal(err)
			}
			src, n := l.Prefix()
			want := 0
			if tt.wantHit {
				want = len(prompt) - 1
			}
			if l.CachedTokens() != want || n != want {
				t.Fatalf("CachedTokens %d, Prefix() = %d, %d; want %d", l.CachedTokens(), src, n, want)
			}
			if tt.wantHit && src != first.SeqID() {
				t.Fatalf("shares from sequence %d, want %d", src, first.SeqID())
			}
			l.Copied()
			if err := l.Commit(prompt[n:]); err != nil {
				t.Fatal(err)
			}
			mustCheck(t, a)
			s := a.Stats()
			wantUsed, wantShared := 2*len(prompt), 0
			if tt.wantHit {
				wantUsed, wantShared = len(prompt)+1, len(prompt)-1
			}
			if s.CellsUsed != wantUsed || s.CellsShared != wantShared || s.PrefixHitTokens != uint64(want) {
				t.Fatalf("used %d shared %d hits %d; want %d %d %d", s.CellsUsed, s.CellsShared, s.PrefixHitTokens, wantUsed, wantShared, want)
			}
			l.Finish()
			mustCheck(t, a)
			if s := a.Stats(); s.CellsCached != s.CellsUsed || s.Cached != 2 || s.Running != 0 {
				t.Fatalf("after both finished: %+v", s)
			}
			if n := a.FlushCache(); n != wantUsed {
				t.Fatalf("FlushCache freed %d, want %d", n, wantUsed)
			}
			mustCheck(t, a)
			if len(a.tree.roots) != 0 {
				t.Fatalf("%d partition roots left after the flush", len(a.tree.roots))
			}
		})
	}
}

// TestPartitionsShareOneLRU checks that eviction is least recently used
// across partitions: pressure from one partition evicts another's cache.
func TestPartitionsShareOneLRU(t *testing.T) {
	var evicted []int
	a := mustNew(t, Config{Cells: 30, MaxSequences: 4, PrefixCache: true})
	p := []int32{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
	older := cacheOne(t, a, p, "acme", "")
	newer := cacheOne(t, a, p, "umbrella", "")
	if s := a.Stats(); s.CellsCached != 20 || s.CellsEvictable != 20 || s.Cached != 2 {
		t.Fatalf("two partitions cached: %+v", s)
	}
	// A third tenant needing 15 cells evicts the older entry only.
	l := mustAdmit(t, a, Request{PromptTokens: 5, MaxTokens: 10, Tenant: "initech"})
	evicted = append(evicted, evictions(a)...)
	if !slices.Equal(evicted, []int{older.SeqID()}) {
		t.Fatalf("evicted %v, want [%d]", evicted, older.SeqID())
	}
	mustCheck(t, a)
	l.Release()
	// The newer entry still serves its own tenant.
	hit := mustAdmit(t, a, Request{Prompt: p, MaxTokens: 1, Tenant: "umbrella"})
	if src, n := hit.Prefix(); src != newer.SeqID() || n != len(p)-1 {
		t.Fatalf("Prefix() = %d, %d; want %d, %d", src, n, newer.SeqID(), len(p)-1)
	}
	hit.Copied()
	hit.Release()
	mustCheck(t, a)
}

// TestRequeueKeepsPartition checks that a preempted sequence resumes in its
// own partition: it shares its own cached cells again, another tenant with
// the same tokens does not.
func TestRequeueKeepsPartition(t *testing.T) {
	a := mustNew(t, Config{Cells: 40, MaxSequences: 4, MaxQueue: 4, PrefixCache: true, Policy: PolicyOptimistic})
	ctx := context.Background()
	toks := []int32{1, 2, 3, 4, 5, 6, 7, 8}
	l, err := a.Admit(ctx, Request{Prompt: toks, MaxTokens: 8, Tenant: "acme", CacheSalt: "s"})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Commit(toks); err != nil {
		t.Fatal(err)
	}
	keep, resumed, err := l.Requeue(toks)
	if err != nil || !keep {
		t.Fatalf("Requeue = %v, %v", keep, err)
	}
	<-resumed
	if l.Tenant() != "acme" || l.CachedTokens() != len(toks)-1 {
		t.Fatalf("resumed as tenant %q sharing %d tokens; want acme, %d", l.Tenant(), l.CachedTokens(), len(toks)-1)
	}
	l.Copied()
	other, err := a.Admit(ctx, Request{Prompt: toks, MaxTokens: 1, Tenant: "umbrella", CacheSalt: "s"})
	if err != nil {
		t.Fatal(err)
	}
	if other.CachedTokens() != 0 {
		t.Fatalf("another tenant shares %d tokens of a resumed sequence", other.CachedTokens())
	}
	other.Release()
	l.Release()
	mustCheck(t, a)
}
