package service

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/protoadapt"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/kvgate/kvgate/allocator"
	"github.com/kvgate/kvgate/internal/chat"
	"github.com/kvgate/kvgate/native"
)

// ErrorDomain is the google.rpc.ErrorInfo domain of kvgate's errors.
const ErrorDomain = "kvgate.v1"

// ReasonSlowConsumer is the ErrorInfo reason of a stream ended because its
// client read too slowly.
const ReasonSlowConsumer = "SLOW_CONSUMER"

// ReasonPriorityNotAllowed is the ErrorInfo reason of a request whose
// priority exceeds its tenant's limit.
const ReasonPriorityNotAllowed = "PRIORITY_NOT_ALLOWED"

// ReasonNoValidToken is the ErrorInfo reason of a stream whose sampling
// parameters left no token with a finite probability.
const ReasonNoValidToken = "NO_VALID_TOKEN"

// ReasonWorkBudget is the ErrorInfo reason of a Tokenize or Detokenize
// call refused because the server's tokenizer work budget was spent.
const ReasonWorkBudget = "TOKENIZER_BUSY"

// ReasonNoChatTemplate is the ErrorInfo reason of a conversation sent to
// a server whose model has no usable chat template.
const ReasonNoChatTemplate = "NO_CHAT_TEMPLATE"

// PriorityError refuses a request whose priority exceeds its tenant's
// limit. Such a request is refused, not clamped, so that a client learns
// of its mistake.
type PriorityError struct {
	Tenant   string
	Priority int32
	Max      int32
}

// Error describes the refusal.
func (e *PriorityError) Error() string {
	return fmt.Sprintf("priority %d exceeds the limit of %d of tenant %s", e.Priority, e.Max, e.Tenant)
}

// neverFitsError is a NEVER_FITS refusal with the request's fields, so
// that its BadRequest names both fields that make it too long.
type neverFitsError struct {
	*allocator.RejectError
	promptField  string
	promptTokens int
	maxTokens    int
	n            int // samples (GenerateRequest.n), at least 1
}

func (e *neverFitsError) Unwrap() error { return e.RejectError }

// errWorkBudget refuses tokenizer work when the budget is spent.
var errWorkBudget = errors.New("the server's tokenizer work budget is spent")

// workRetryDelay is the retry delay advised when the tokenizer budget is
// spent: tokenizer calls take milliseconds.
const workRetryDelay = 100 * time.Millisecond

// endBeforeDeadline returns a context that ends a little before ctx's
// deadline: a tenth of the time left, at least 20 ms and at most 200 ms.
// Near its deadline a client resets the stream (RST_STREAM CANCEL), which
// the server would see as a cancellation; ending first, the server sends
// DEADLINE_EXCEEDED itself, so that client, log and metrics agree.
func endBeforeDeadline(ctx context.Context) (context.Context, context.CancelFunc) {
	d, ok := ctx.Deadline()
	if !ok {
		return context.WithCancel(ctx)
	}
	margin := min(max(time.Until(d)/10, 20*time.Millisecond), 200*time.Millisecond)
	return context.WithDeadline(ctx, d.Add(-margin))
}

// deadlinePassed reports whether ctx's deadline has passed.
func deadlinePassed(ctx context.Context) bool {
	d, ok := ctx.Deadline()
	return ok && !time.Now().Before(d)
}

// PushbackTrailer is the trailer through which gRPC's built-in retry reads
// the server's pushback. A negative value tells the client not to retry.
const PushbackTrailer = "grpc-retry-pushback-ms"

// errInvalid builds an INVALID_ARGUMENT status with BadRequest field
// violations.
func errInvalid(msg string, violations ...*errdetails.BadRequest_FieldViolation) error {
	st := status.New(codes.InvalidArgument, msg)
	if ds, err := st.WithDetails(&errdetails.BadRequest{FieldViolations: violations}); err == nil {
		st = ds
	}
	return st.Err()
}

func violation(field, desc string) *errdetails.BadRequest_FieldViolation {
	return &errdetails.BadRequest_FieldViolation{Field: field, Description: desc}
}

// toStatus is the one map from kvgate's domain errors to gRPC status. It
// sets the pushback trailer on ctx's call where the error asks for one, so it
// must be called from the handler before it returns.
func toStatus(ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	if st := embedStatus(err); st != nil { // issue 14: embeddings
		return st
	}
	var (
		rej  *allocator.RejectError
		nf   *neverFitsError
		prio *PriorityError
	)
	switch {
	case errors.As(err, &nf):
		return neverFitsStatus(ctx, nf)
	case errors.As(err, &rej):
		return rejectStatus(ctx, rej)
	case errors.As(err, &prio):
		setPushback(ctx, -1)
		return withInfo(codes.PermissionDenied, prio.Error(), ReasonPriorityNotAllowed, map[string]string{
			"tenant": prio.Tenant, "priority": strconv.Itoa(int(prio.Priority)), "max_priority": strconv.Itoa(int(prio.Max)),
		})
	case errors.Is(err, ErrLoading):
		setPushback(ctx, loadingRetryDelay)
		return withInfo(codes.Unavailable, err.Error()+"; retry shortly, or send the call to another replica", ReasonModelLoading,
			map[string]string{"retry_after_ms": strconv.FormatInt(loadingRetryDelay.Milliseconds(), 10)},
			&errdetails.RetryInfo{RetryDelay: durationpb.New(loadingRetryDelay)})
	case errors.Is(err, errWorkBudget):
		setPushback(ctx, workRetryDelay)
		return withInfo(codes.ResourceExhausted, err.Error()+"; retry shortly", ReasonWorkBudget,
			map[string]string{"retry_after_ms": strconv.FormatInt(workRetryDelay.Milliseconds(), 10)},
			&errdetails.RetryInfo{RetryDelay: durationpb.New(workRetryDelay)})
	case errors.Is(err, native.ErrNoValidToken):
		st := status.New(codes.InvalidArgument, "sampling failed: "+native.ErrNoValidToken.Error())
		if ds, e := st.WithDetails(
			&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{violation("sampling", native.ErrNoValidToken.Error())}},
			&errdetails.ErrorInfo{Reason: ReasonNoValidToken, Domain: ErrorDomain},
		); e == nil {
			st = ds
		}
		return st.Err()
	case errors.Is(err, native.ErrSamples):
		return errInvalid(err.Error(), violation("n", err.Error()))
	case errors.Is(err, native.ErrBadRequest):
		return errInvalid(err.Error(), violation("request", err.Error()))
	case errors.Is(err, native.ErrSlowConsumer):
		return withInfo(codes.ResourceExhausted, "stream closed: the client read too slowly and its buffer filled up",
			ReasonSlowConsumer, nil)
	case errors.Is(err, native.ErrSequenceAborted):
		return withInfo(codes.Aborted, "sequence aborted: llama.cpp found no KV slot even for the smallest batch",
			"NO_KV_SLOT", nil)
	case errors.Is(err, native.ErrEngineClosed):
		setPushback(ctx, -1)
		return status.Error(codes.Unavailable, "server is shutting down")
	case errors.Is(err, context.Canceled) && deadlinePassed(ctx):
		// The client reset the stream at its deadline.
		return status.Error(codes.DeadlineExceeded, "deadline exceeded")
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, "request cancelled by the client")
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, "deadline exceeded")
	case errors.Is(err, native.ErrTokenOutOfRange):
		return errInvalid(err.Error(), violation("ids", err.Error()))
	case errors.Is(err, chat.ErrNoTemplate):
		setPushback(ctx, -1)
		return withInfo(codes.FailedPrecondition, err.Error(), ReasonNoChatTemplate, nil)
	case errors.Is(err, chat.ErrRender):
		return errInvalid(err.Error(), violation("messages", err.Error()))
	}
	return status.Error(codes.Internal, err.Error())
}

func rejectStatus(ctx context.Context, rej *allocator.RejectError) error {
	meta := map[string]string{
		"cells_needed": strconv.Itoa(rej.CellsNeeded),
		"cells_free":   strconv.Itoa(rej.CellsFree),
		"cells_total":  strconv.Itoa(rej.CellsTotal),
		"queue_depth":  strconv.Itoa(rej.QueueDepth),
	}
	switch rej.Reason {
	case allocator.ReasonQueueFull, allocator.ReasonKVCellsExhausted:
		delay := rej.RetryAfter
		if delay <= 0 {
			delay = time.Second
		}
		setPushback(ctx, delay)
		meta["retry_after_ms"] = strconv.FormatInt(delay.Milliseconds(), 10)
		msg := fmt.Sprintf("KV cells exhausted: need %d cells, %d free of %d, %d queued; retry in %v",
			rej.CellsNeeded, rej.CellsFree, rej.CellsTotal, rej.QueueDepth, delay.Round(time.Millisecond))
		if rej.Reason == allocator.ReasonQueueFull {
			msg = fmt.Sprintf("admission queue full (%d waiting); retry in %v", rej.QueueDepth, delay.Round(time.Millisecond))
		}
		return withInfo(codes.ResourceExhausted, msg, rej.Reason, meta, &errdetails.RetryInfo{RetryDelay: durationpb.New(delay)})
	case allocator.ReasonNeverFits:
		setPushback(ctx, -1)
		desc := fmt.Sprintf("prompt tokens + max_tokens = %d exceeds the limit of %d tokens per sequence", rej.CellsNeeded, rej.Limit)
		st := status.New(codes.InvalidArgument, desc)
		if ds, err := st.WithDetails(
			&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{violation("max_tokens", desc)}},
			&errdetails.ErrorInfo{Reason: rej.Reason, Domain: ErrorDomain, Metadata: meta},
		); err == nil {
			st = ds
		}
		return st.Err()
	case allocator.ReasonDraining:
		// No pushback: a client whose retry policy covers UNAVAILABLE
		// retries on another replica after its own backoff.
		return withInfo(codes.Unavailable, "server is draining: send new requests to another replica", rej.Reason, nil)
	case allocator.ReasonCancelled:
		if deadlinePassed(ctx) {
			return withInfo(codes.DeadlineExceeded, "deadline exceeded while waiting in the admission queue", allocator.ReasonDeadlineExceeded, meta)
		}
		return withInfo(codes.Canceled, "request cancelled while waiting in the admission queue", rej.Reason, meta)
	case allocator.ReasonDeadlineExceeded:
		return withInfo(codes.DeadlineExceeded, "deadline exceeded while waiting in the admission queue", rej.Reason, meta)
	case allocator.ReasonQueueTimeout:
		setPushback(ctx, time.Second)
		return withInfo(codes.ResourceExhausted, "queue_timeout_ms passed while waiting in the admission queue", rej.Reason, meta,
			&errdetails.RetryInfo{RetryDelay: durationpb.New(time.Second)})
	}
	return status.Error(codes.Internal, rej.Error())
}

// neverFitsStatus is INVALID_ARGUMENT for a request too long for any
// sequence, naming both fields that make it so.
func neverFitsStatus(ctx context.Context, nf *neverFitsError) error {
	setPushback(ctx, -1)
	rej := nf.RejectError
	desc := fmt.Sprintf("%d prompt tokens + max_tokens %d = %d exceeds the server's max_sequence_tokens limit of %d tokens per sequence",
		nf.promptTokens, nf.maxTokens, nf.promptTokens+nf.maxTokens, rej.Limit)
	vs := []*errdetails.BadRequest_FieldViolation{violation(nf.promptField, desc), violation("max_tokens", desc)}
	if nf.n > 1 && nf.promptTokens+nf.maxTokens <= rej.Limit {
		// One sample fits; n of them do not.
		desc = fmt.Sprintf("%d prompt tokens + n %d * max_tokens %d = %d cells exceed the server's %d KV cells",
			nf.promptTokens, nf.n, nf.maxTokens, nf.promptTokens+nf.n*nf.maxTokens, rej.Limit)
		vs = []*errdetails.BadRequest_FieldViolation{violation("n", desc), violation("max_tokens", desc)}
	}
	meta := map[string]string{"cells_needed": strconv.Itoa(rej.CellsNeeded), "limit": strconv.Itoa(rej.Limit)}
	st := status.New(codes.InvalidArgument, desc)
	if ds, err := st.WithDetails(
		&errdetails.BadRequest{FieldViolations: vs},
		&errdetails.ErrorInfo{Reason: rej.Reason, Domain: ErrorDomain, Metadata: meta},
	); err == nil {
		st = ds
	}
	return st.Err()
}

func withInfo(code codes.Code, msg, reason string, meta map[string]string, extra ...*errdetails.RetryInfo) error {
	st := status.New(code, msg)
	details := []protoadapt.MessageV1{&errdetails.ErrorInfo{Reason: reason, Domain: ErrorDomain, Metadata: meta}}
	for _, e := range extra {
		details = append(details, e)
	}
	if ds, err := st.WithDetails(details...); err == nil {
		st = ds
	}
	return st.Err()
}

// setPushback sets grpc-retry-pushback-ms on the call: a delay, or a
// negative value ("do not retry") when d < 0.
func setPushback(ctx context.Context, d time.Duration) {
	ms := int64(-1)
	if d >= 0 {
		ms = d.Milliseconds()
	}
	_ = grpc.SetTrailer(ctx, metadata.Pairs(PushbackTrailer, strconv.FormatInt(ms, 10)))
}

// ---- embeddings (issue 14) ----------------------------------------------------

// ErrorInfo reasons of calls to a service whose model the server did not
// load.
const (
	// ReasonNoEmbeddingModel: EmbeddingService on a server without
	// --embedding-model.
	ReasonNoEmbeddingModel = "NO_EMBEDDING_MODEL"
	// ReasonNoGenerationModel: GenerateService on a server that serves an
	// embedding model only.
	ReasonNoGenerationModel = "NO_GENERATION_MODEL"
)

// embedStatus maps the errors of the embedding service and of a missing
// model, or returns nil for toStatus to go on. The embedding queue's
// refusals are *allocator.RejectError and go through rejectStatus like
// Generate's.
func embedStatus(err error) error {
	var ie *native.EmbedInputError
	switch {
	case errors.Is(err, native.ErrNoEmbeddingModel):
		return withInfo(codes.FailedPrecondition, "this server has no embedding model: start it with --embedding-model PATH",
			ReasonNoEmbeddingModel, nil)
	case errors.Is(err, native.ErrNoGenerationModel):
		return withInfo(codes.FailedPrecondition, "this server has no generation model: it serves embeddings only (start it with --model PATH)",
			ReasonNoGenerationModel, nil)
	case errors.As(err, &ie):
		return errInvalid(ie.Error(), violation(fmt.Sprintf("inputs[%d]", ie.Index), ie.Reason))
	}
	return nil
}

// ---- end of embeddings -----------------------------------------------------------
