// Package allocator owns the KV cells of a llama.cpp unified KV cache and
// decides which requests may run, so that llama_decode never runs out of KV
// slots.
//
// # Ledger
//
// The pool holds Config.Cells cells, one per token, shared by every sequence.
// Each cell is in exactly one of three states:
//
//   - used: a token of a running sequence is in the cache;
//   - reserved: promised to a running sequence for a token it may still
//     produce (its prompt not yet decoded, or generation budget not yet spent);
//   - free: neither.
//
// The Allocator keeps the totals, and each Lease keeps its own share: a lease
// is created holding Reserved() = PromptTokens+MaxTokens cells, and
// Lease.Charge moves cells from its reserved share to its used (charged)
// share as tokens enter the cache. Lease.Release returns all of a lease's
// cells, used and reserved, and its sequence id, whatever the reason the
// sequence ended. At every moment used + reserved <= total.
//
// # Reserve policy
//
// A request is admitted only when PromptTokens+MaxTokens cells are free and a
// sequence id (0..MaxSequences-1; the lowest free one is handed out) is free.
// Reserving the worst case up front means a running sequence can always
// place its next token: the cells it will ever need are already set aside.
// A request whose worst case exceeds min(Cells, MaxSequenceTokens) can never
// be admitted and is refused at once with NEVER_FITS.
//
// # Queue
//
// A request that cannot be admitted at once waits in a bounded queue
// (Config.MaxQueue) ordered by Request.Priority, highest first, and by
// arrival among equal priorities. Admission from the queue is strictly
// head-of-line: whenever cells or a sequence id come back, waiters are
// admitted from the head for as long as the head fits, and a waiter behind a
// head that does not fit is never admitted ahead of it, so a large request
// cannot be starved by a stream of small ones. A new request is admitted
// without queueing only when no waiter of equal or higher priority is queued.
// A waiter leaves the queue when its context ends (DEADLINE_EXCEEDED or
// CANCELLED), when its Request.QueueTimeout passes (QUEUE_TIMEOUT) or when
// the Allocator drains (DRAINING); a waiter that left never holds a lease.
//
// # Estimate
//
// The Allocator measures how fast cells come back (Stats.DrainCellsPerSecond,
// the cells released per second over the last ten seconds). Before a request
// is queued, the cells that must be released before it can run are
//
//	needed by the request + needed by the waiters ahead of it − free now
//
// and the wait is estimated as that count divided by the drain rate. When the
// drain rate is known and the estimate outlasts the caller's deadline (the
// context deadline, or the QueueTimeout if that ends sooner), the request is
// refused at once with KV_CELLS_EXHAUSTED instead of waiting in vain. The
// same estimate, clamped to [MinRetryDelay, MaxRetryDelay], is reported as
// RejectError.RetryAfter for QUEUE_FULL, KV_CELLS_EXHAUSTED and
// QUEUE_TIMEOUT; when the rate is unknown, one second (clamped) is reported.
//
// All methods are safe for concurrent use. The Allocator starts no
// goroutines: a queued Admit waits on its own channel and any timer it
// creates is stopped before it returns.
package allocator
