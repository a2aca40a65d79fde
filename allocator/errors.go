package allocator

import (
	"errors"
	"fmt"
	"strings"
	"time"
)

// Reasons for refusing a request. The strings are used verbatim as
// google.rpc.ErrorInfo reasons and as keys of Stats.Rejected.
const (
	// ReasonQueueFull means the wait queue was full.
	ReasonQueueFull = "QUEUE_FULL"
	// ReasonKVCellsExhausted means the estimated wait for KV cells outlasts
	// the caller's deadline.
	ReasonKVCellsExhausted = "KV_CELLS_EXHAUSTED"
	// ReasonNeverFits means PromptTokens+MaxTokens exceeds
	// min(Cells, MaxSequenceTokens), or a sample group's
	// PromptTokens+N×MaxTokens exceeds Cells, so the request can never be
	// admitted.
	ReasonNeverFits = "NEVER_FITS"
	// ReasonDraining means Drain was called.
	ReasonDraining = "DRAINING"
	// ReasonDeadlineExceeded means the context deadline passed before the
	// request was admitted.
	ReasonDeadlineExceeded = "DEADLINE_EXCEEDED"
	// ReasonCancelled means the context was cancelled before the request was
	// admitted.
	ReasonCancelled = "CANCELLED"
	// ReasonQueueTimeout means the request's own QueueTimeout passed while it
	// was queued.
	ReasonQueueTimeout = "QUEUE_TIMEOUT"
)

// reasons lists every refusal reason, so that Stats.Rejected has a key for
// each of them.
var reasons = [...]string{
	ReasonQueueFull,
	ReasonKVCellsExhausted,
	ReasonNeverFits,
	ReasonDraining,
	ReasonDeadlineExceeded,
	ReasonCancelled,
	ReasonQueueTimeout,
}

// Sentinel errors, one per refusal reason that does not come from a context.
// A *RejectError wraps the one matching its Reason; refusals caused by a
// context wrap context.DeadlineExceeded or context.Canceled instead.
var (
	// ErrQueueFull is wrapped by refusals with ReasonQueueFull.
	ErrQueueFull = errors.New("allocator: wait queue full")
	// ErrKVCellsExhausted is wrapped by refusals with ReasonKVCellsExhausted.
	ErrKVCellsExhausted = errors.New("allocator: KV cells exhausted")
	// ErrNeverFits is wrapped by refusals with ReasonNeverFits.
	ErrNeverFits = errors.New("allocator: request can never fit")
	// ErrDraining is wrapped by refusals with ReasonDraining.
	ErrDraining = errors.New("allocator: draining")
	// ErrQueueTimeout is wrapped by refusals with ReasonQueueTimeout.
	ErrQueueTimeout = errors.New("allocator: queue timeout")
)

// Errors that signal a bug in the caller rather than a refusal.
var (
	// ErrInvalidConfig is wrapped by the error New returns for a bad Config.
	ErrInvalidConfig = errors.New("allocator: invalid config")
	// ErrInvalidRequest is wrapped by the error Admit returns for a Request
	// with PromptTokens or MaxTokens below 1, a negative QueueTimeout, or an
	// N outside 0..MaxSamples or above MaxRunning; by the error
	// Lease.Charge returns for a negative count; and by the error of
	// Lease.Requeue for a member of a sample group.
	ErrInvalidRequest = errors.New("allocator: invalid request")
	// ErrOverCharge is wrapped by the error Lease.Charge returns when the
	// charge would exceed the lease's original reservation.
	ErrOverCharge = errors.New("allocator: charge exceeds reservation")
	// ErrReleased is wrapped by the error Lease.Charge returns after the
	// lease was released.
	ErrReleased = errors.New("allocator: lease released")
)

// RejectError is the error Admit returns when it refuses a request. Use
// errors.Is with the sentinel errors (ErrQueueFull and so on), or with
// context.DeadlineExceeded or context.Canceled for refusals caused by the
// context, or errors.As to read the fields.
type RejectError struct {
	// Reason is one of the Reason constants.
	Reason string
	// CellsNeeded is PromptTokens+MaxTokens of the refused request
	// (PromptTokens+N×MaxTokens for a sample group).
	CellsNeeded int
	// CellsFree is the number of free cells at the moment of refusal.
	CellsFree int
	// CellsTotal is Config.Cells.
	CellsTotal int
	// QueueDepth is the number of other requests waiting at the moment of
	// refusal.
	QueueDepth int
	// Limit is, for NEVER_FITS, the limit that was exceeded:
	// min(Cells, MaxSequenceTokens), or Cells for a sample group whose
	// samples each fit but not all together. It is 0 for other reasons.
	Limit int
	// RetryAfter estimates when a retry could succeed. It is 0 when retrying
	// is pointless (NEVER_FITS, DRAINING) or when the caller gave up
	// (DEADLINE_EXCEEDED, CANCELLED).
	RetryAfter time.Duration

	errs []error
}

// Error describes the refusal.
func (e *RejectError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "allocator: %s: need %d cells", e.Reason, e.CellsNeeded)
	if e.Reason == ReasonNeverFits {
		fmt.Fprintf(&b, ", limit %d", e.Limit)
	} else {
		fmt.Fprintf(&b, ", %d of %d free, %d queued", e.CellsFree, e.CellsTotal, e.QueueDepth)
	}
	if e.RetryAfter > 0 {
		fmt.Fprintf(&b, ", retry after %v", e.RetryAfter)
	}
	if e.Reason == ReasonDeadlineExceeded || e.Reason == ReasonCancelled {
		if n := len(e.errs); n > 0 {
			b.WriteString(": ")
			b.WriteString(e.errs[n-1].Error())
		}
	}
	return b.String()
}

// Unwrap returns the errors the refusal wraps: the sentinel for its Reason,
// or the context's error and, when it differs, the context's cause.
func (e *RejectError) Unwrap() []error { return e.errs }

// NewRejectError returns a copy of r that wraps causes: a refusal built
// outside the allocator, such as the embedding queue's, which shares the
// allocator's reasons and their mapping onto gRPC status.
func NewRejectError(r RejectError, causes ...error) *RejectError {
	r.errs = causes
	return &r
}
