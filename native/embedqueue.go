package native

import (
	"math"
	"time"

	"github.com/kvgate/kvgate/allocator"
)

// embedRequest is one queued embedding request: its inputs, where its
// vectors go, and how far the worker has got with it. Its fields are
// guarded by the EmbedEngine's mutex, except vectors[i], which the worker
// writes while it encodes input i, and err, which is final once done is
// closed.
type embedRequest struct {
	inputs  [][]int32
	vectors [][]float32
	tenant  string
	arrived time.Time
	started time.Time // when its first input was put in a batch
	next    int       // the next input to put in a batch
	left    int       // inputs not encoded yet
	err     error
	done    chan struct{}
	ended   bool // done is closed
	removed bool // out of the queue: finished, failed or abandoned
}

func newEmbedRequest(req EmbedRequest, arrived time.Time, dims int) *embedRequest {
	r := &embedRequest{
		inputs: req.Inputs, tenant: req.Tenant, arrived: arrived, left: len(req.Inputs),
		done: make(chan struct{}), vectors: make([][]float32, len(req.Inputs)),
	}
	flat := make([]float32, len(req.Inputs)*dims)
	for i := range r.vectors {
		r.vectors[i] = flat[i*dims : (i+1)*dims : (i+1)*dims]
	}
	return r
}

func (r *embedRequest) startedLocked() bool { return !r.started.IsZero() }

// fail ends r with err, once.
func (r *embedRequest) fail(err error) {
	if r.ended {
		return
	}
	r.err, r.ended = err, true
	close(r.done)
}

// embedSlot is one input of a request placed in a batch.
type embedSlot struct {
	req   *embedRequest
	index int
}

// embedTenant is one tenant's part of the queue: its requests with inputs
// not yet placed in a batch, oldest first, and its virtual time, the
// tokens it has been served divided by its weight.
type embedTenant struct {
	name  string
	reqs  []*embedRequest
	vtime float64
}

// embedQueue is the embedding worker's fair queue. Batches are filled by
// weighted fair queueing by tokens: the next input always comes from the
// tenant with the least virtual time (tokens served over its weight) whose
// oldest request's next input still fits the batch, and a tenant that
// arrives (or comes back) starts at the least virtual time of the tenants
// waiting, so that idle time earns no credit. Within a tenant requests
// run in arrival order. It is pure data, guarded by the EmbedEngine's
// mutex, so that it can be tested and fuzzed alone.
type embedQueue struct {
	tenants map[string]*embedTenant // tenants with inputs not yet placed
	order   []*embedTenant          // the same, in arrival order, for ties
	reqs    map[*embedRequest]struct{}
	// vclock is the virtual time of the last input placed: the start of a
	// tenant that arrives when none waits.
	vclock        float64
	pendingTokens int // tokens of the inputs not yet placed
}

func newEmbedQueue() *embedQueue {
	return &embedQueue{tenants: map[string]*embedTenant{}, reqs: map[*embedRequest]struct{}{}}
}

// add queues r behind its tenant's other requests.
func (q *embedQueue) add(r *embedRequest) {
	q.reqs[r] = struct{}{}
	for _, in := range r.inputs[r.next:] {
		q.pendingTokens += len(in)
	}
	t := q.tenants[r.tenant]
	if t == nil {
		start := q.vclock
		for _, o := range q.order {
			start = min(start, o.vtime)
		}
		t = &embedTenant{name: r.tenant, vtime: start}
		q.tenants[r.tenant] = t
		q.order = append(q.order, t)
	}
	t.reqs = append(t.reqs, r)
}

// dropTenant forgets t once it has nothing left to place.
func (q *embedQueue) dropTenant(t *embedTenant) {
	delete(q.tenants, t.name)
	for i, o := range q.order {
		if o == t {
			q.order = append(q.order[:i], q.order[i+1:]...)
			break
		}
	}
}

// weight returns a tenant's share weight, 1 where the limit is invalid.
func weight(limits func(string) allocator.TenantLimits, name string) float64 {
	w := limits(name).Weight
	if !(w > 0) || math.IsInf(w, 1) {
		return 1
	}
	return w
}

// next fills a batch of at most maxTokens tokens and maxSeqs inputs and
// returns its slots; now is the start time of requests that get their
// first slot. An input longer than maxTokens is never placed: the engine
// refuses such inputs before they are queued.
func (q *embedQueue) next(maxTokens, maxSeqs int, limits func(string) allocator.TenantLimits, now time.Time) []embedSlot {
	var slots []embedSlot
	tokens := 0
	for len(slots) < maxSeqs {
		var best *embedTenant
		for _, t := range q.order {
			r := t.reqs[0]
			if tokens+len(r.inputs[r.next]) > maxTokens {
				continue
			}
			if best == nil || t.vtime < best.vtime {
				best = t
			}
		}
		if best == nil {
			break
		}
		r := best.reqs[0]
		n := len(r.inputs[r.next])
		slots = append(slots, embedSlot{req: r, index: r.next})
		if r.started.IsZero() {
			r.started = now
		}
		r.next++
		tokens += n
		q.pendingTokens -= n
		q.vclock = best.vtime
		best.vtime += float64(n) / weight(limits, best.name)
		if r.next == len(r.inputs) {
			best.reqs = best.reqs[1:]
			if len(best.reqs) == 0 {
				q.dropTenant(best)
			}
		}
	}
	return slots
}

// finish records that slot s was encoded (err nil) or failed, and ends
// its request when it was the last input or failed. A slot of a request
// already removed is ignored.
func (q *embedQueue) finish(s embedSlot, err error) {
	r := s.req
	if r.removed {
		return
	}
	r.left--
	switch {
	case err != nil:
		q.remove(r)
		r.fail(err)
	case r.left == 0:
		q.remove(r)
		r.ended = true
		close(r.done)
	}
}

// remove takes r out of the queue, with its inputs not yet placed.
func (q *embedQueue) remove(r *embedRequest) {
	if r.removed {
		return
	}
	r.removed = true
	delete(q.reqs, r)
	for _, in := range r.inputs[r.next:] {
		q.pendingTokens -= len(in)
	}
	t := q.tenants[r.tenant]
	if t == nil {
		return
	}
	for i, o := range t.reqs {
		if o == r {
			t.reqs = append(t.reqs[:i:i], t.reqs[i+1:]...)
			break
		}
	}
	if len(t.reqs) == 0 {
		q.dropTenant(t)
	}
}

// active returns the requests queued or being encoded.
func (q *embedQueue) active() int { return len(q.reqs) }

// queued returns the requests none of whose inputs was placed yet.
func (q *embedQueue) queued() int {
	n := 0
	for r := range q.reqs {
		if r.started.IsZero() {
			n++
		}
	}
	return n
}

// tenantActive returns the active requests of one tenant.
func (q *embedQueue) tenantActive(name string) int {
	n := 0
	for r := range q.reqs {
		if r.tenant == name {
			n++
		}
	}
	return n
}

// all returns every active request.
func (q *embedQueue) all() []*embedRequest {
	out := make([]*embedRequest, 0, len(q.reqs))
	for r := range q.reqs {
		out = append(out, r)
	}
	return out
}
