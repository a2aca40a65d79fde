package allocator

import (
	"fmt"
	"time"
)

// Lease is an admitted sequence's share of the pool: a sequence id and the
// cells reserved for it, charged as its tokens enter the cache. The holder
// must call Release when the sequence ends, for whatever reason. All
// methods are safe for concurrent use.
type Lease struct {
	a        *Allocator
	seq      int
	cells    int // the original reservation
	admitted time.Time
	waited   time.Duration

	// Guarded by a.mu.
	charged  int
	released bool
}

// SeqID returns the sequence id held by the lease.
func (l *Lease) SeqID() int { return l.seq }

// Reserved returns the cells still reserved but not yet charged; 0 after
// Release.
func (l *Lease) Reserved() int {
	l.a.mu.Lock()
	defer l.a.mu.Unlock()
	if l.released {
		return 0
	}
	return l.cells - l.charged
}

// Charged returns the cells charged so far; after Release it keeps its
// final value.
func (l *Lease) Charged() int {
	l.a.mu.Lock()
	defer l.a.mu.Unlock()
	return l.charged
}

// Charge moves n cells from reserved to used as n tokens enter the cache.
// The error wraps ErrOverCharge if that would exceed the original
// reservation, ErrInvalidRequest if n is negative, and ErrReleased after
// Release; the ledger is unchanged on error.
func (l *Lease) Charge(n int) error {
	if n < 0 {
		return fmt.Errorf("%w: charge of %d cells", ErrInvalidRequest, n)
	}
	a := l.a
	a.mu.Lock()
	defer a.mu.Unlock()
	if l.released {
		return fmt.Errorf("%w: charge of %d cells to sequence %d", ErrReleased, n, l.seq)
	}
	if left := l.cells - l.charged; n > left {
		return fmt.Errorf("%w: charge of %d cells to sequence %d with %d of %d left", ErrOverCharge, n, l.seq, left, l.cells)
	}
	l.charged += n
	a.reserved -= n
	a.used += n
	return nil
}

// Release returns every cell of the lease, used and reserved, and its
// sequence id, and admits waiters that now fit. It is idempotent and safe
// to call concurrently with any other method.
func (l *Lease) Release() {
	a := l.a
	a.mu.Lock()
	defer a.mu.Unlock()
	if l.released {
		return
	}
	a.returnLocked(l)
	a.drained.add(a.now(), l.cells)
	a.pumpLocked()
	a.notifyIdleLocked()
}

// Admitted returns when the lease was granted, by Config.Now.
func (l *Lease) Admitted() time.Time { return l.admitted }

// Waited returns how long the request was queued; 0 if it was admitted at
// once.
func (l *Lease) Waited() time.Duration { return l.waited }
