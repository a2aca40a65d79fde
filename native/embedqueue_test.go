package native

import (
	"math"
	"testing"
	"time"

	"github.com/kvgate/kvgate/allocator"
)

func queueReq(tenant string, lens ...int) *embedRequest {
	in := make([][]int32, len(lens))
	for i, n := range lens {
		in[i] = make([]int32, n)
	}
	return newEmbedRequest(EmbedRequest{Inputs: in, Tenant: tenant}, time.Now(), 1)
}

func weights(w map[string]float64) func(string) allocator.TenantLimits {
	return func(name string) allocator.TenantLimits { return allocator.TenantLimits{Weight: w[name]} }
}

// drainQueue fills batches until the queue is empty and returns the tokens
// each tenant got in the first `batches` batches.
func drainQueue(t *testing.T, q *embedQueue, maxTokens, maxSeqs, batches int, limits func(string) allocator.TenantLimits) map[string]int {
	t.Helper()
	got := map[string]int{}
	for b := 0; q.active() > 0; b++ {
		slots := q.next(maxTokens, maxSeqs, limits, time.Now())
		if len(slots) == 0 {
			t.Fatal("no slots with work queued")
		}
		for _, s := range slots {
			if b < batches {
				got[s.req.tenant] += len(s.req.inputs[s.index])
			}
			q.finish(s, nil)
		}
	}
	return got
}

func TestEmbedQueueFairShare(t *testing.T) {
	tests := []struct {
		name    string
		weights map[string]float64
		reqs    map[string]int // tenant: requests of 8 inputs of 4 tokens
		want    map[string]float64
	}{
		{"equal weights", nil, map[string]int{"a": 20, "b": 20}, map[string]float64{"a": 0.5, "b": 0.5}},
		{"two to one", map[string]float64{"a": 2, "b": 1}, map[string]int{"a": 20, "b": 20}, map[string]float64{"a": 2.0 / 3, "b": 1.0 / 3}},
		{"three tenants", nil, map[string]int{"a": 30, "b": 30, "c": 30}, map[string]float64{"a": 1.0 / 3, "b": 1.0 / 3, "c": 1.0 / 3}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			q := newEmbedQueue()
			for name, n := range tc.reqs {
				for range n {
					q.add(queueReq(name, 4, 4, 4, 4, 4, 4, 4, 4))
				}
			}
			got := drainQueue(t, q, 64, 16, 10, weights(tc.weights))
			total := 0
			for _, n := range got {
				total += n
			}
			for name, share := range tc.want {
				if s := float64(got[name]) / float64(total); math.Abs(s-share) > 0.05 {
					t.Errorf("tenant %s got %.3f of the tokens, want %.3f (%v)", name, s, share, got)
				}
			}
		})
	}
}

func TestEmbedQueueLateTenantIsServedNext(t *testing.T) {
	q := newEmbedQueue()
	for range 50 {
		q.add(queueReq("busy", 8, 8))
	}
	// Serve the busy tenant alone for a while: it must not bank credit
	// against a tenant that comes later, nor the other way round.
	for range 10 {
		for _, s := range q.next(32, 4, allocator.DefaultTenantLimits, time.Now()) {
			q.finish(s, nil)
		}
	}
	late := queueReq("late", 8)
	q.add(late)
	slots := q.next(32, 4, allocator.DefaultTenantLimits, time.Now())
	found := false
	for _, s := range slots {
		found = found || s.req == late
	}
	if !found {
		t.Errorf("the late tenant's input is not in the next batch")
	}
}

func TestEmbedQueueSkipsWhatDoesNotFit(t *testing.T) {
	q := newEmbedQueue()
	big := queueReq("a", 30)
	small := queueReq("b", 3)
	q.add(queueReq("c", 20))
	q.add(big)
	q.add(small)
	slots := q.next(32, 4, allocator.DefaultTenantLimits, time.Now())
	if len(slots) != 2 || slots[0].req.tenant != "c" || slots[1].req != small {
		t.Fatalf("first batch %v: want c's 20 tokens and b's 3", slots)
	}
	for _, s := range slots {
		q.finish(s, nil)
	}
	slots = q.next(32, 4, allocator.DefaultTenantLimits, time.Now())
	if len(slots) != 1 || slots[0].req != big {
		t.Fatalf("second batch %v: want the input that did not fit", slots)
	}
}

// FuzzEmbedQueue drives the queue with arbitrary requests, batch limits,
// removals and failures and checks that every batch keeps within its
// limits (what llama.cpp's encode asserts), that every input of a request
// still queued is placed exactly once, in order, and that the counters
// agree with the contents.
func FuzzEmbedQueue(f *testing.F) {
	f.Add([]byte{3, 10, 2, 4, 5, 6, 1, 200, 7}, uint8(16), uint8(4))
	f.Add([]byte{0, 0, 0, 255, 255, 1, 2, 3}, uint8(1), uint8(1))
	f.Add([]byte{9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9}, uint8(64), uint8(8))
	f.Fuzz(func(t *testing.T, ops []byte, maxTokens, maxSeqs uint8) {
		budget, seqs := int(maxTokens)+1, int(maxSeqs)%16+1
		q := newEmbedQueue()
		placed := map[*embedRequest][]int{}
		var live []*embedRequest
		limits := func(name string) allocator.TenantLimits {
			return allocator.TenantLimits{Weight: float64(len(name))} // 1, 2, 3
		}
		for i := 0; i < len(ops); i++ {
			op := ops[i]
			switch {
			case op < 150: // add a request of 1-4 inputs
				n := int(op)%4 + 1
				lens := make([]int, n)
				for j := range lens {
					lens[j] = (int(op)*(j+7))%budget + 1
				}
				r := queueReq([]string{"a", "bb", "ccc"}[int(op)%3], lens...)
				q.add(r)
				live = append(live, r)
			case op < 200: // fill and encode a batch; some fail
				slots := q.next(budget, seqs, limits, time.Now())
				tokens := 0
				for _, s := range slots {
					tokens += len(s.req.inputs[s.index])
					if s.req.removed {
						t.Fatal("a slot of a removed request")
					}
					if got := placed[s.req]; len(got) != s.index {
						t.Fatalf("input %d placed after %v", s.index, got)
					}
					placed[s.req] = append(placed[s.req], s.index)
				}
				if tokens > budget || len(slots) > seqs {
					t.Fatalf("batch of %d tokens, %d inputs over %d, %d", tokens, len(slots), budget, seqs)
				}
				if q.active() > 0 && len(slots) == 0 {
					t.Fatal("no slots with work queued")
				}
				for _, s := range slots {
					var err error
					if op == 199 {
						err = errTestEncode
					}
					q.finish(s, err)
				}
			default: // abandon a request
				if len(live) > 0 {
					q.remove(live[int(op)%len(live)])
				}
			}
			pending := 0
			for _, r := range live {
				if !r.removed {
					for _, in := range r.inputs[r.next:] {
						pending += len(in)
					}
				}
			}
			if pending != q.pendingTokens {
				t.Fatalf("pendingTokens %d, want %d", q.pendingTokens, pending)
			}
		}
		// Whatever is left drains completely.
		for q.active() > 0 {
			slots := q.next(budget, seqs, limits, time.Now())
			if len(slots) == 0 {
				t.Fatal("stuck with work queued")
			}
			for _, s := range slots {
				placed[s.req] = append(placed[s.req], s.index)
				q.finish(s, nil)
			}
		}
		for _, r := range live {
			if r.err == nil && r.ended && len(placed[r]) != len(r.inputs) {
				t.Fatalf("a finished request had %d of its %d inputs placed", len(placed[r]), len(r.inputs))
			}
		}
	})
}

var errTestEncode = errTest("encode failed")

type errTest string

func (e errTest) Error() string { return string(e) }
