// Package allocator owns the KV cells of a llama.cpp unified KV cache and
// decides which requests may run, so that llama_decode never runs out of KV
// slots, no tenant starves the others, and no tenant can read another's
// prompts through the prefix cache.
//
// # Ledger
//
// The pool holds Config.Cells cells, one per token, shared by every sequence.
// Each cell is in exactly one of three states:
//
//   - used: a token of a running sequence or of the prefix cache is in the
//     cache;
//   - reserved: promised to a running sequence for a token it may still
//     produce (its prompt not yet decoded, or generation budget not yet spent);
//   - free: neither.
//
// The Allocator keeps the totals, and each Lease keeps its own share: a lease
// is created holding Reserved() = PromptTokens+MaxTokens cells (less the
// prompt tokens it shares from the prefix cache), and Lease.Charge moves
// cells from its reserved share to its used (charged) share as tokens enter
// the cache. Lease.Release returns all of a lease's cells, used and
// reserved, and its sequence id, whatever the reason the sequence ended. At
// every moment used + reserved <= total. Stats.CellsUsed counts the used
// cells: those charged by running sequences and those of the prefix cache
// (Stats.CellsCached), each cell once however many sequences share it.
//
// # Reserve policy
//
// A request is admitted only when PromptTokens+MaxTokens cells are free and a
// sequence id (0..MaxSequences-1; the lowest free one is handed out) is free.
// Reserving the worst case up front means a running sequence can always
// place its next token: the cells it will ever need are already set aside.
// A request whose worst case exceeds min(Cells, MaxSequenceTokens) can never
// be admitted and is refused at once with NEVER_FITS; the RejectError
// carries CellsNeeded (PromptTokens+MaxTokens) and Limit.
//
// # Tenants
//
// Every request belongs to a tenant, Request.Tenant ("" is the default
// tenant). Config.Tenants gives each tenant its TenantLimits: a Weight, a
// MaxShare cap and a MaxQueued bound; invalid values (NaN, infinities,
// negative numbers) count as the defaults. A tenant's load is the cells its
// running leases hold — their reserved plus charged cells, cells shared from
// the prefix cache not counted — divided by its weight (Lease.Load, which
// the engine uses to preempt a sequence of the most loaded tenant). A
// tenant is below its cap while those cells are fewer than MaxShare·Cells
// and its running leases fewer than MaxShare·MaxRunning (under optimistic
// admission a lease holds few cells at first, and a tenant could otherwise
// take every running slot). Its fair share is the pool in proportion to its
// weight among the tenants with running or waiting requests.
// Stats.Tenants reports every tenant that has running leases or queued
// requests.
//
// # Queue
//
// A request that cannot be admitted at once waits in a bounded queue
// (Config.MaxQueue in all; a tenant's MaxQueued for its own requests; past
// either, QUEUE_FULL). The queue has two parts:
//
//   - the preempted sequences waiting to resume (Lease.Requeue), in the
//     order they were preempted. They are running streams: each goes first
//     within its tenant, and ahead of an equally loaded tenant's requests,
//     and they stay queued through Drain;
//   - one queue per tenant, ordered by Request.Priority, highest first, and
//     by arrival among equal priorities. Priority orders a tenant's own
//     requests only, never requests of different tenants.
//
// Whenever cells or a sequence id come back (or a waiter leaves, or a new
// waiter changes which head comes next), the queue is pumped, repeatedly,
// by the fair pick: among the tenants that have waiters and are below their
// cap, the tenant with the smallest load, and among equal loads the one
// whose head is a preempted sequence, else whose head arrived first. A
// tenant's head is its first preempted sequence, else its queue's head.
// Under optimistic admission a preempted sequence thus never takes the
// cells its preemption freed ahead of a less loaded tenant. The head is
// admitted if it fits,
// which raises the tenant's load for the next pick; if it does not fit,
// pumping stops. So admission is head-of-line over the fair order: a large
// request is not starved by a stream of small ones, and a waiter behind it
// in the fair order is never admitted ahead of it. A tenant at its cap is
// skipped, so it never blocks the others; a tenant below its cap may still
// be admitted when that admission takes it above the cap, so a tenant can
// always run at least one request that fits the pool.
//
// Under the optimistic policy Lease.Grow yields to the fair pick: it
// reports ErrNoCells when the next waiter belongs to another tenant that,
// with the waiter admitted, would hold less than its fair share, the
// growing lease's tenant holds more than its own, and the growth would
// leave the waiter no room. The engine then preempts a sequence of the most
// loaded tenant, whose cells go to the waiter. Two tenants within their
// shares never make each other yield, so they cannot preempt each other
// back and forth; nor do two tenants whose sequences outgrow their shares,
// since neither's waiter would stay within its share.
//
// A new request is admitted at once only when it would be the waiter
// pumping admits next and it fits: no preempted sequence waits, its tenant
// is below its cap, it goes ahead of its tenant's queued requests, and its
// tenant's load is below that of every other tenant pumping could pick (at
// equal loads the other tenant's head arrived first). A waiter leaves the
// queue when its context ends (DEADLINE_EXCEEDED or CANCELLED), when its
// Request.QueueTimeout passes (QUEUE_TIMEOUT) or when the Allocator drains
// (DRAINING); a waiter that left never holds a lease.
//
// # Prefix cache
//
// With Config.PrefixCache, a finished sequence's cells stay in the KV cache
// as a prefix that later requests with the same prompt prefix share. The
// cache is partitioned by (Request.Tenant, Request.CacheSalt): each
// partition has its own prefix tree, and a request only ever shares cells
// with (has Lease.CachedTokens() > 0 from) entries left by requests with
// exactly the same Tenant and CacheSalt. A preempted sequence resumes in
// its own partition. Eviction, sequence ids and cell counts are global: the
// cache is evicted least recently used first across all partitions
// whenever cells or sequence ids are needed.
//
// # Sample groups
//
// A request with Request.N > 1 (at most MaxSamples) asks for N samples of
// one prompt. The samples share the prompt's cells: the KV cache's owner
// decodes the prompt once, under the leader's sequence id (sample 0), and
// then tags the same cells with each follower's id (llama_memory_seq_cp in
// a unified cache). The group is admitted atomically: it needs N sequence
// ids (free or freed by evicting the cache), N running slots, and
// (PromptTokens − shared prefix) + N·MaxTokens free cells, under both
// policies — a group reserves every cell up front even under
// PolicyOptimistic, so none of its samples ever grows beyond its
// reservation, and none is ever a preemption victim or requeued. A group
// that could never fit is refused at once: NEVER_FITS, with Limit Cells,
// when PromptTokens + N·MaxTokens exceeds Cells (or, Limit as for one
// sequence, when PromptTokens+MaxTokens exceeds min(Cells,
// MaxSequenceTokens)); an N outside 0..MaxSamples, or above MaxRunning,
// is an ErrInvalidRequest.
//
// The leader's lease (what Admit returns) reserves the prompt and its own
// MaxTokens; each follower (Lease.Samples) reserves MaxTokens and is
// charged only its own generated tokens, which never enter the prefix
// cache. The group's charged cells are therefore the prompt once plus the
// tokens of every sample. The prompt's cells are the leader's: followers
// end first, and the leader's cells (which a normal Finish may keep as a
// prefix cache entry, as for any sequence) come back only at the leader's
// own end; ending the leader first ends its running followers with it. For
// tenancy, fairness and the queue the group is one request of that many
// cells (its waiter needs them all), though it counts N sequences against
// MaxRunning and a tenant's running share.
//
// # Estimate
//
// Before a request with a wait budget (the context deadline, or the
// QueueTimeout if that ends sooner) is queued, and for the RetryAfter of
// QUEUE_FULL, KV_CELLS_EXHAUSTED and QUEUE_TIMEOUT, the Allocator estimates
// how long it would wait. RetryAfter is that estimate clamped to
// [MinRetryDelay, MaxRetryDelay], or one second (clamped) when there is no
// estimate. Which estimate is used, and whether it may refuse the request
// with KV_CELLS_EXHAUSTED, depends on Config.StepRate and the policy:
//
// Schedule (StepRate set, PolicyReserve, StepRate() > 0 and finite). Under
// the reserve policy every running lease releases its cells at the latest
// once its remaining tokens are generated: after ceil(uncharged prompt
// tokens / Config.Batch) prefill steps (one step without a Batch) plus one
// step per reserved cell beyond them. The Allocator simulates the schedule
// from now: at each lease end, in steps, its cells come back, and the
// waiters are admitted in the order pumping would admit them (preempted
// sequences first, which under the reserve policy do not occur, then the
// fair pick, with caps, head-of-line, MaxRunning,
// and the cells free or evictable now), each then running for its own
// prefill and MaxTokens steps; a waiter ahead whose own deadline passes
// before it is admitted leaves the simulated queue. The estimate is the
// step at which the new request would be admitted, as the newest arrival of
// its priority in its tenant's queue, divided by StepRate(). Sequences may
// end earlier than their budget (end of generation), never later, so with
// full budgets this is an upper bound. To refuse only when the request is
// confidently past its deadline, every generation budget in the simulation
// — of running leases and of waiters — is scaled by the observed mean
// fraction of MaxTokens that finished leases generated (an exponentially
// weighted moving average, weight 0.1 per finished lease, starting at 1),
// and the request is refused with KV_CELLS_EXHAUSTED only when that
// optimistic estimate exceeds its wait budget. Otherwise it is queued, and
// ends with DEADLINE_EXCEEDED or QUEUE_TIMEOUT if its budget really passes.
// Prefix hits, which make waiters need fewer cells, and cells held by
// shared prefixes (counted back only when every lease has ended) are not
// foreseen. Each waiter is admitted and each lease ends at most once in the
// simulation, so it takes O((running + queued) log n) under the lock.
//
// Drain rate (StepRate set, but unknown or PolicyOptimistic, where the
// schedule is unknowable). No request is refused on an estimate. The
// RetryAfter estimate is the drain-rate estimate below.
//
// Legacy (StepRate nil). The Allocator measures how fast cells come back
// (Stats.DrainCellsPerSecond, the cells released per second over the last
// ten seconds). The cells that must be released before the request can run
// are
//
//	needed by the request + needed by the waiters ahead of it − free now
//
// where the waiters ahead are the preempted sequences, the requests of its
// tenant ahead of it, and, of every other tenant, the requests the fair
// pick would admit before its tenant's load is reached (lease ends not
// foreseen); the wait is that count divided by the drain rate. When the
// drain rate is known and the estimate outlasts the wait budget, the
// request is refused with KV_CELLS_EXHAUSTED. The drain rate is low after
// idle time, so this estimate can refuse requests that would have run in
// time; a server that can measure its step rate should set StepRate.
//
// All methods are safe for concurrent use. The Allocator starts no
// goroutines: a queued Admit waits on its own channel and any timer it
// creates is stopped before it returns.
package allocator
