package allocator

import (
	"math/bits"
	"time"
)

// plan is how a request would be admitted now: the cached prefix it would
// share and the cells it would take.
type plan struct {
	src     *entry  // the entry to copy the prefix from; nil for none
	prefix  int     // tokens shared
	full    []*node // nodes shared whole
	partial *node   // a node shared for its first k tokens
	k       int
	admit   int // free cells required for admission
	reserve int // cells reserved by the lease
}

// planLocked matches w's prompt against its partition of the prefix cache.
// At least the last prompt token is always recomputed, so that it yields
// logits.
func (a *Allocator) planLocked(w *waiter) plan {
	var p plan
	if a.cfg.PrefixCache && !w.noCache && len(w.prompt) > 1 {
		full, partial, k, depth := a.tree.match(w.partition(), w.prompt[:len(w.prompt)-1])
		if depth > 0 {
			deepest := partial
			if deepest == nil {
				deepest = full[len(full)-1]
			}
			if src := a.sourceLocked(deepest); src != nil {
				p.src, p.prefix, p.full, p.partial, p.k = src, depth, full, partial, k
			}
		}
	}
	fresh := w.tokens - p.prefix
	switch {
	case w.resume != nil:
		// A preempted sequence recomputes its tokens; it has no more
		// tokens to reserve than that, its growth comes from Grow.
		p.reserve, p.admit = fresh, min(fresh+a.cfg.Watermark, a.cfg.Cells)
	case a.cfg.Policy == PolicyOptimistic:
		p.reserve, p.admit = fresh, min(fresh+a.cfg.Watermark, a.cfg.Cells)
	default:
		p.reserve = fresh + w.maxTok
		p.admit = p.reserve
	}
	if w.n > 1 {
		// A sample group reserves every sample's budget up front, under
		// both policies: the leader's reserve is fresh + maxTok, each
		// follower's maxTok.
		p.reserve = fresh + w.n*w.maxTok
		p.admit = p.reserve
	}
	return p
}

// samples returns the sequences w runs: its group's size, or 1.
func (w *waiter) samples() int { return max(w.n, 1) }

// partition returns the part of the prefix cache w may share.
func (w *waiter) partition() partition { return partition{tenant: w.tenant, salt: w.salt} }

// sourceLocked returns the entry to copy a prefix ending in node n from:
// of the entries whose path includes n, the one that pinning would keep
// from eviction the fewest extra cells for (a running one costs none). An
// entry whose own prefix has not been copied yet is no source: its path
// names cells its sequence does not hold in the KV cache until the owner
// copies them (its source, which is pinned, holds them).
func (a *Allocator) sourceLocked(n *node) *entry {
	var best *entry
	bestCost := 0
	for _, e := range a.entries {
		if e.lease != nil && !e.lease.copied {
			continue
		}
		through, cost := false, 0
		for _, pn := range e.path {
			if pn == n {
				through = true
			}
			if pn.hold == 0 {
				cost += len(pn.tokens)
			}
		}
		if through && (best == nil || cost < bestCost || (cost == bestCost && e.seq < best.seq)) {
			best, bestCost = e, cost
		}
	}
	return best
}

// tryGrantLocked admits w now if it can, evicting cache as needed, and
// returns its lease; it returns nil and changes nothing else if w must wait.
func (a *Allocator) tryGrantLocked(w *waiter, now time.Time) *Lease {
	if a.running+w.samples() > a.cfg.MaxRunning {
		return nil
	}
	p := a.planLocked(w)
	// Pin the source first, so that making room cannot evict it.
	a.pinLocked(p.src)
	if p.src != nil && (p.admit > a.availLocked() || !a.idsAvailableLocked(w.samples())) {
		// The pinned source keeps too much from eviction: admit without
		// sharing instead, if that fits.
		a.unpinLocked(p.src)
		w2 := *w
		w2.noCache = true
		p = a.planLocked(&w2)
	}
	if p.admit > a.availLocked() || !a.idsAvailableLocked(w.samples()) {
		a.unpinLocked(p.src)
		return nil
	}
	a.makeRoomLocked(p.admit)
	for a.idsFreeLocked() < w.samples() {
		a.evictOneLocked()
	}
	return a.grantLocked(w, p, now)
}

// grantLocked carries out plan p for w: it takes a sequence id, records
// the new entry's shared prefix in the tree, reserves its cells and
// charges them to w's tenant.
func (a *Allocator) grantLocked(w *waiter, p plan, now time.Time) *Lease {
	seq := a.takeIDLocked()
	path := append([]*node(nil), p.full...)
	if p.partial != nil {
		upper := a.tree.split(p.partial, p.k)
		for _, e := range a.entries {
			e.path = fixPath(e.path, upper, p.partial)
		}
		path = append(path, upper)
	}
	e := &entry{seq: seq, part: w.partition(), path: path, depth: p.prefix}
	a.tree.addUser(path, true, true)
	a.entries[seq] = e

	l := w.resume
	if l == nil {
		l = &Lease{a: a, admitted: now, waited: max(now.Sub(w.enqueued), 0), noCache: w.noCache, priority: w.priority,
			tenant: w.tenant, salt: w.salt, maxTok: w.maxTok, prompt: w.tokens}
		a.admitted++
		a.prompts += uint64(w.tokens)
	} else {
		l.waiter = nil
		if l.stepped {
			// Requeued by Apply: the owner learns of the resume from the
			// next Apply, and is woken if it waits for one.
			a.resumed = append(a.resumed, l)
			select {
			case a.wake <- struct{}{}:
			default:
			}
		}
	}
	l.seq, l.entry, l.cells, l.charged = seq, e, p.reserve, 0
	l.fresh = w.tokens - p.prefix
	t := a.tenantLocked(w.tenant)
	t.held += p.reserve
	t.running++
	l.src, l.prefix, l.copied = p.src, p.prefix, p.src == nil
	e.lease = l
	a.touchLocked(p.src)
	a.reserved += p.reserve
	a.running++
	a.prefixHits += uint64(p.prefix)
	if w.n > 1 {
		a.growGroupLocked(l, w.n, now)
	}
	return l
}

// growGroupLocked turns the just granted leader l into a sample group of n
// leases: it moves (n-1)×maxTok of l's reservation to n-1 followers, each
// with a sequence id and an entry of its own. A follower's entry starts
// empty (the prompt's cells are the leader's, which the owner shares with
// the follower by llama_memory_seq_cp) and holds only the follower's
// generated tokens, never shared: followers use no prefix cache.
func (a *Allocator) growGroupLocked(l *Lease, n int, now time.Time) {
	t := a.tenantLocked(l.tenant)
	l.samples = make([]*Lease, 0, n-1)
	for i := 1; i < n; i++ {
		seq := a.takeIDLocked()
		e := &entry{seq: seq, part: l.entry.part}
		a.entries[seq] = e
		f := &Lease{a: a, admitted: now, waited: l.waited, noCache: true, priority: l.priority,
			tenant: l.tenant, salt: l.salt, maxTok: l.maxTok, prompt: l.prompt,
			seq: seq, entry: e, cells: l.maxTok, copied: true, leader: l, index: i}
		e.lease = f
		l.cells -= l.maxTok
		t.running++
		a.running++
		l.samples = append(l.samples, f)
	}
}

// pinLocked keeps e's cells until a new sequence has copied them.
func (a *Allocator) pinLocked(e *entry) {
	if e == nil {
		return
	}
	e.pins++
	if e.pins == 1 && e.lease == nil {
		a.tree.holdPath(e.path, 1)
	}
}

// unpinLocked undoes pinLocked.
func (a *Allocator) unpinLocked(e *entry) {
	if e == nil {
		return
	}
	e.pins--
	if e.pins == 0 && e.lease == nil {
		a.tree.holdPath(e.path, -1)
	}
}

// makeRoomLocked evicts cached entries, least recently used first, until
// need cells are free or nothing more can go.
func (a *Allocator) makeRoomLocked(need int) {
	for el := a.lru.Back(); el != nil && need > a.freeLocked(); {
		prev := el.Prev()
		if e := el.Value.(*entry); e.pins == 0 {
			a.evictLocked(e)
		}
		el = prev
	}
}

// evictOneLocked evicts the least recently used unpinned cached entry, for
// its sequence id.
func (a *Allocator) evictOneLocked() {
	for el := a.lru.Back(); el != nil; el = el.Prev() {
		if e := el.Value.(*entry); e.pins == 0 {
			a.evictLocked(e)
			return
		}
	}
}

// evictLocked drops a cached entry; the next Apply tells the cache's owner.
func (a *Allocator) evictLocked(e *entry) {
	a.lru.Remove(e.lru)
	e.lru = nil
	freed := a.tree.removeUser(e.part, e.path, false, false)
	a.used = a.tree.cells
	delete(a.entries, e.seq)
	a.freeIDLocked(e.seq)
	a.evictions++
	a.drained.add(a.now(), freed)
	a.noteEvictedLocked(e.seq)
}

// idsFreeLocked returns how many sequence ids are free.
func (a *Allocator) idsFreeLocked() int {
	n := 0
	for i := range a.seqUsed {
		n += bits.OnesCount64(a.seqValid[i] &^ a.seqUsed[i])
	}
	return n
}

// idsAvailableLocked reports whether n sequence ids are free or can be
// freed by evicting cached entries.
func (a *Allocator) idsAvailableLocked(n int) bool {
	have := a.idsFreeLocked()
	for el := a.lru.Back(); el != nil && have < n; el = el.Prev() {
		if el.Value.(*entry).pins == 0 {
			have++
		}
	}
	return have >= n
}

// takeIDLocked takes the lowest free sequence id.
func (a *Allocator) takeIDLocked() int {
	for i := range a.seqUsed {
		if free := a.seqValid[i] &^ a.seqUsed[i]; free != 0 {
			b := bits.TrailingZeros64(free)
			a.seqUsed[i] |= 1 << b
			return i*64 + b
		}
	}
	panic("allocator: no free sequence id")
}

func (a *Allocator) freeIDLocked(seq int) { a.seqUsed[seq/64] &^= 1 << (seq % 64) }

// endLocked ends l's running entry. With keep, and when the prefix cache
// is on and the lease may use it, the entry stays as cache and endLocked
// returns true: its cells stay in the KV cache. Otherwise the entry's cells
// that nobody else uses are freed and the caller must remove the sequence
// from the KV cache. An entry that a new sequence is about to copy from is
// always kept.
func (a *Allocator) endLocked(l *Lease, keep, countDrain bool) bool {
	e := l.entry
	// A lease that ends before its owner copied its prefix (one resumed
	// and ended by the same Apply, say) holds none of its entry's cells in
	// the KV cache: it cannot stay as cache.
	copied := l.copied
	if !l.copied {
		l.copied = true
		a.unpinLocked(l.src)
	}
	unreserved := l.cells - l.charged
	a.reserved -= unreserved
	a.running--
	if t := a.tenants[l.tenant]; t != nil {
		t.held -= l.cells
		t.running--
		a.tidyTenantLocked(l.tenant)
	}
	keep = (keep && copied && a.cfg.PrefixCache && !l.noCache && e.depth > 0) || e.pins > 0
	freed := 0
	if keep {
		for _, n := range e.path {
			n.running--
		}
		if e.pins == 0 {
			a.tree.holdPath(e.path, -1)
		}
		e.lease = nil
		e.lru = a.lru.PushFront(e)
	} else {
		freed = a.tree.removeUser(e.part, e.path, true, true)
		delete(a.entries, e.seq)
		a.freeIDLocked(e.seq)
	}
	a.used = a.tree.cells
	l.entry = nil
	if countDrain {
		a.drained.add(a.now(), unreserved+freed)
	}
	return keep
}

// returnLocked undoes a grant that was never used: the caller gave up at
// the moment it was admitted.
func (a *Allocator) returnLocked(l *Lease) {
	for _, f := range l.samples {
		f.released = true
		a.endLocked(f, false, false)
	}
	l.released = true
	a.endLocked(l, false, false)
}

// touchLocked marks a cached entry as just used.
func (a *Allocator) touchLocked(e *entry) {
	if e != nil && e.lru != nil {
		a.lru.MoveToFront(e.lru)
	}
}
