package service

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kvgate/kvgate/allocator"
	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/native"
)

// fakeTokenizer splits text on spaces into one token per word, ids 1..n;
// its vocabulary has 100 tokens.
type fakeTokenizer struct{}

func (fakeTokenizer) Tokenize(text string, _, _ bool) ([]int32, error) {
	ids := []int32{1}
	for range strings.Fields(text) {
		ids = append(ids, int32(len(ids)+1))
	}
	return ids, nil
}

func (fakeTokenizer) ValidTokens(ids []int32) int {
	for i, id := range ids {
		if id < 0 || id >= 100 {
			return i
		}
	}
	return -1
}

func (fakeTokenizer) Info() native.ModelInfo { return native.ModelInfo{VocabSize: 100} }

func fieldsOf(t *testing.T, err error) []string {
	t.Helper()
	st, _ := status.FromError(err)
	var fields []string
	for _, d := range st.Details() {
		if br, ok := d.(*errdetails.BadRequest); ok {
			for _, v := range br.GetFieldViolations() {
				fields = append(fields, v.GetField())
			}
		}
	}
	return fields
}

func TestValidate(t *testing.T) {
	lim := DefaultLimits()
	lim.MaxSequenceTokens = 64
	lim.MaxStopStrings = 2
	lim.MaxCompletionTokens = 100
	lim.MaxPromptTokens = 32
	lim.MaxPromptBytes = 1000
	lim.MaxPenaltyLastN = 48
	nan := float32(math.NaN())
	one, zero := float32(1), float32(0)
	text := func(s string, n uint32) *kvgatev1.GenerateRequest {
		return &kvgatev1.GenerateRequest{Prompt: &kvgatev1.GenerateRequest_Text{Text: s}, MaxTokens: n}
	}
	with := func(r *kvgatev1.GenerateRequest, f func(*kvgatev1.GenerateRequest)) *kvgatev1.GenerateRequest {
		f(r)
		return r
	}
	tests := []struct {
		name   string
		req    *kvgatev1.GenerateRequest
		fields []string // nil: valid
	}{
		{"valid", text("a b c", 8), nil},
		{"valid sampling", with(text("a", 8), func(r *kvgatev1.GenerateRequest) {
			r.Sampling = &kvgatev1.SamplingParams{Temperature: 0.7, TopP: &one, TopK: 40, MinP: 0.05}
		}), nil},
		{"no prompt", &kvgatev1.GenerateRequest{MaxTokens: 1}, []string{"prompt"}},
		{"empty text", text("", 8), []string{"text"}},
		{"zero max_tokens without a server default", text("a", 0), []string{"max_tokens"}},
		// Too long for a sequence: left to the allocator (NEVER_FITS), so
		// that the refusal is counted; see TestToStatus.
		{"max_tokens over the sequence limit", text("a", 65), nil},
		{"prompt + max_tokens over the sequence limit", text("a b c", 62), nil},
		{"max_tokens over max_completion_tokens", text("a", 101), []string{"max_tokens"}},
		{"text over max_prompt_bytes, not tokenized", text(strings.Repeat("a ", 600), 1), []string{"text"}},
		{"prompt over max_prompt_tokens", text(strings.Repeat("a ", 40), 1), []string{"text"}},
		{"cache_salt too long", with(text("a", 1), func(r *kvgatev1.GenerateRequest) { r.CacheSalt = strings.Repeat("s", 257) }), []string{"cache_salt"}},
		{"bad token", with(text("a", 1), func(r *kvgatev1.GenerateRequest) {
			r.Prompt = &kvgatev1.GenerateRequest_Tokens{Tokens: &kvgatev1.TokenList{Ids: []int32{1, 100}}}
		}), []string{"tokens.ids[1]"}},
		{"NaN temperature and zero top_p", with(text("a", 1), func(r *kvgatev1.GenerateRequest) {
			r.Sampling = &kvgatev1.SamplingParams{Temperature: nan, TopP: &zero}
		}), []string{"sampling.temperature", "sampling.top_p"}},
		{"negative top_k, min_p above 1", with(text("a", 1), func(r *kvgatev1.GenerateRequest) {
			r.Sampling = &kvgatev1.SamplingParams{TopK: -1, MinP: 2}
		}), []string{"sampling.top_k", "sampling.min_p"}},
		{"the four crashers", with(text("a", 1), func(r *kvgatev1.GenerateRequest) {
			r.Sampling = &kvgatev1.SamplingParams{Temperature: 1e-40, RepetitionPenalty: 1e-45, FrequencyPenalty: -3.4e38, PresencePenalty: -3.4e38}
		}), []string{"sampling.temperature", "sampling.repetition_penalty", "sampling.frequency_penalty", "sampling.presence_penalty"}},
		{"edges of the ranges", with(text("a", 1), func(r *kvgatev1.GenerateRequest) {
			r.Sampling = &kvgatev1.SamplingParams{Temperature: 100, RepetitionPenalty: 0.01, FrequencyPenalty: -2, PresencePenalty: 2, PenaltyLastN: 48}
		}), nil},
		{"just outside the ranges", with(text("a", 1), func(r *kvgatev1.GenerateRequest) {
			r.Sampling = &kvgatev1.SamplingParams{Temperature: 100.5, RepetitionPenalty: 100.5, FrequencyPenalty: 2.01, PresencePenalty: -2.01, PenaltyLastN: 49}
		}), []string{"sampling.temperature", "sampling.repetition_penalty", "sampling.frequency_penalty", "sampling.presence_penalty", "sampling.penalty_last_n"}},
		{"infinities and tiny temperature", with(text("a", 1), func(r *kvgatev1.GenerateRequest) {
			inf := float32(math.Inf(1))
			r.Sampling = &kvgatev1.SamplingParams{Temperature: 0.0009, MinP: nan, TopP: &inf, RepetitionPenalty: -inf}
		}), []string{"sampling.temperature", "sampling.top_p", "sampling.min_p", "sampling.repetition_penalty"}},
		{"huge and negative penalty_last_n", with(text("a", 1), func(r *kvgatev1.GenerateRequest) {
			r.Sampling = &kvgatev1.SamplingParams{PenaltyLastN: 300_000_000}
		}), []string{"sampling.penalty_last_n"}},
		{"negative penalty_last_n", with(text("a", 1), func(r *kvgatev1.GenerateRequest) {
			r.Sampling = &kvgatev1.SamplingParams{PenaltyLastN: -1}
		}), []string{"sampling.penalty_last_n"}},
		{"too many stops", with(text("a", 1), func(r *kvgatev1.GenerateRequest) { r.Stop = []string{"x", "y", "z"} }), []string{"stop"}},
		{"empty stop", with(text("a", 1), func(r *kvgatev1.GenerateRequest) { r.Stop = []string{""} }), []string{"stop[0]"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := validate(tt.req, fakeTokenizer{}, lim)
			if tt.fields == nil {
				if err != nil || r == nil {
					t.Fatalf("validate: %v", err)
				}
				return
			}
			if status.Code(err) != codes.InvalidArgument {
				t.Fatalf("code %v, want InvalidArgument (%v)", status.Code(err), err)
			}
			got := fieldsOf(t, err)
			if fmt.Sprint(got) != fmt.Sprint(tt.fields) {
				t.Fatalf("violations %v, want %v", got, tt.fields)
			}
		})
	}
}

func TestToStatus(t *testing.T) {
	rej := func(reason string) error {
		// Build a real RejectError through the allocator.
		a, err := allocator.New(allocator.Config{Cells: 8, MaxSequences: 1, MaxQueue: 0})
		if err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		switch reason {
		case allocator.ReasonQueueFull:
			if _, err := a.Admit(ctx, allocator.Request{PromptTokens: 4, MaxTokens: 4}); err != nil {
				t.Fatal(err)
			}
			_, err = a.Admit(ctx, allocator.Request{PromptTokens: 1, MaxTokens: 1})
		case allocator.ReasonNeverFits:
			_, err = a.Admit(ctx, allocator.Request{PromptTokens: 5, MaxTokens: 5})
		case allocator.ReasonDraining:
			a.Drain()
			_, err = a.Admit(ctx, allocator.Request{PromptTokens: 1, MaxTokens: 1})
		}
		return err
	}
	past, cancelPast := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancelPast()
	var nf *allocator.RejectError
	if !errors.As(rej(allocator.ReasonNeverFits), &nf) {
		t.Fatal("no NEVER_FITS refusal")
	}
	tests := []struct {
		name   string
		ctx    context.Context // nil: background
		err    error
		code   codes.Code
		reason string
		fields []string // BadRequest violations, when checked
	}{
		{name: "never fits, with both fields", err: &neverFitsError{RejectError: nf, promptField: "text", promptTokens: 5, maxTokens: 5},
			code: codes.InvalidArgument, reason: allocator.ReasonNeverFits, fields: []string{"text", "max_tokens"}},
		{name: "priority above the tenant's limit", err: &PriorityError{Tenant: "a", Priority: 11, Max: 10},
			code: codes.PermissionDenied, reason: ReasonPriorityNotAllowed},
		{name: "no valid token", err: fmt.Errorf("step: %w", native.ErrNoValidToken),
			code: codes.InvalidArgument, reason: ReasonNoValidToken, fields: []string{"sampling"}},
		{name: "tokenizer budget spent", err: errWorkBudget, code: codes.ResourceExhausted, reason: ReasonWorkBudget},
		{name: "model still loading", err: ErrLoading, code: codes.Unavailable, reason: ReasonModelLoading},
		{name: "engine refuses the request", err: fmt.Errorf("%w: empty prompt", native.ErrBadRequest), code: codes.InvalidArgument},
		{name: "cancelled at the deadline", ctx: past, err: fmt.Errorf("x: %w", context.Canceled), code: codes.DeadlineExceeded},
		{"queue full", nil, rej(allocator.ReasonQueueFull), codes.ResourceExhausted, allocator.ReasonQueueFull, nil},
		{"never fits", nil, rej(allocator.ReasonNeverFits), codes.InvalidArgument, allocator.ReasonNeverFits, nil},
		{"draining", nil, rej(allocator.ReasonDraining), codes.Unavailable, allocator.ReasonDraining, nil},
		{"slow consumer", nil, native.ErrSlowConsumer, codes.ResourceExhausted, ReasonSlowConsumer, nil},
		{"aborted", nil, native.ErrSequenceAborted, codes.Aborted, "NO_KV_SLOT", nil},
		{"engine closed", nil, native.ErrEngineClosed, codes.Unavailable, "", nil},
		{"cancelled", nil, fmt.Errorf("x: %w", context.Canceled), codes.Canceled, "", nil},
		{"deadline", nil, context.DeadlineExceeded, codes.DeadlineExceeded, "", nil},
		{"other", nil, errors.New("boom"), codes.Internal, "", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := tt.ctx
			if ctx == nil {
				ctx = context.Background()
			}
			err := toStatus(ctx, tt.err)
			st, _ := status.FromError(err)
			if st.Code() != tt.code {
				t.Fatalf("code %v, want %v (%v)", st.Code(), tt.code, err)
			}
			var reason string
			var retry bool
			for _, d := range st.Details() {
				switch d := d.(type) {
				case *errdetails.ErrorInfo:
					reason = d.GetReason()
					if d.GetDomain() != ErrorDomain {
						t.Errorf("domain %q", d.GetDomain())
					}
				case *errdetails.RetryInfo:
					retry = d.GetRetryDelay().AsDuration() > 0
				}
			}
			if reason != tt.reason {
				t.Errorf("ErrorInfo reason %q, want %q", reason, tt.reason)
			}
			if wantRetry := tt.reason == allocator.ReasonQueueFull || tt.reason == ReasonWorkBudget || tt.reason == ReasonModelLoading; retry != wantRetry {
				t.Errorf("RetryInfo present %v, want %v", retry, wantRetry)
			}
			if tt.fields != nil {
				if got := fieldsOf(t, err); fmt.Sprint(got) != fmt.Sprint(tt.fields) {
					t.Errorf("violations %v, want %v", got, tt.fields)
				}
			}
		})
	}
}

// TestEndBeforeDeadline checks the margin by which a call ends itself
// before its deadline: a tenth of the time left, within [20 ms, 200 ms].
// The time left is read inside endBeforeDeadline, so the test brackets that
// moment with two clock readings and expects the margin the rule gives for
// some instant between them: exact, however long the machine takes between
// the calls.
func TestEndBeforeDeadline(t *testing.T) {
	rule := func(left time.Duration) time.Duration {
		return min(max(left/10, 20*time.Millisecond), 200*time.Millisecond)
	}
	for _, tc := range []struct {
		left, margin time.Duration // margin: the rule's at the full time left
	}{
		{100 * time.Millisecond, 20 * time.Millisecond},
		{time.Second, 100 * time.Millisecond},
		{time.Minute, 200 * time.Millisecond},
	} {
		if got := rule(tc.left); got != tc.margin {
			t.Fatalf("the test's rule gives %v for %v left, want %v", got, tc.left, tc.margin)
		}
		parent, cancel := context.WithDeadline(context.Background(), time.Now().Add(tc.left))
		pd, _ := parent.Deadline()
		before := time.Now()
		ctx, cancel2 := endBeforeDeadline(parent)
		after := time.Now()
		d, ok := ctx.Deadline()
		// The margin shrinks with the time left, so the later reading
		// gives the smallest it may be and the earlier the largest.
		lo, hi := rule(pd.Sub(after)), rule(pd.Sub(before))
		if got := pd.Sub(d); !ok || got < lo || got > hi {
			t.Errorf("%v left: margin %v, want within [%v, %v] (%v with the full time left)", tc.left, got, lo, hi, tc.margin)
		}
		cancel2()
		cancel()
	}
	ctx, cancel := endBeforeDeadline(context.Background())
	defer cancel()
	if _, ok := ctx.Deadline(); ok {
		t.Error("a call without a deadline got one")
	}
}

// TestDefaultMaxTokens checks that an unset max_tokens takes the server's
// default, shortened to what the prompt leaves of a sequence.
func TestDefaultMaxTokens(t *testing.T) {
	lim := DefaultLimits()
	lim.MaxSequenceTokens = 64
	lim.DefaultMaxTokens = 20
	for _, tc := range []struct {
		words int // the fake tokenizer gives words + 1 tokens
		want  int
	}{{1, 20}, {42, 20}, {49, 14}, {63, 1}, {80, 1}} {
		req := &kvgatev1.GenerateRequest{Prompt: &kvgatev1.GenerateRequest_Text{Text: strings.Repeat("a ", tc.words)}}
		r, err := validate(req, fakeTokenizer{}, lim)
		if err != nil {
			t.Fatalf("%d words: %v", tc.words, err)
		}
		if r.maxTokens != tc.want {
			t.Errorf("%d words: max_tokens %d, want %d", tc.words, r.maxTokens, tc.want)
		}
	}
	// An explicit max_tokens is kept as sent.
	r, err := validate(&kvgatev1.GenerateRequest{Prompt: &kvgatev1.GenerateRequest_Text{Text: "a"}, MaxTokens: 50}, fakeTokenizer{}, lim)
	if err != nil || r.maxTokens != 50 {
		t.Errorf("explicit max_tokens: %v, %v", r, err)
	}
}

// TestGateBeforeReady checks that every call the Gate answers before Ready
// ends UNAVAILABLE with reason MODEL_LOADING and a retry delay.
func TestGateBeforeReady(t *testing.T) {
	var g Gate
	ctx := context.Background()
	calls := []struct {
		name string
		call func() error
	}{
		{"Tokenize", func() error { _, err := g.Tokenize(ctx, &kvgatev1.TokenizeRequest{Text: "a"}); return err }},
		{"Detokenize", func() error { _, err := g.Detokenize(ctx, &kvgatev1.DetokenizeRequest{}); return err }},
		{"GetModelInfo", func() error { _, err := g.GetModelInfo(ctx, &kvgatev1.GetModelInfoRequest{}); return err }},
		{"GetCacheStats", func() error { _, err := g.GetCacheStats(ctx, &kvgatev1.GetCacheStatsRequest{}); return err }},
	}
	for _, c := range calls {
		t.Run(c.name, func(t *testing.T) {
			st, _ := status.FromError(c.call())
			if st.Code() != codes.Unavailable {
				t.Fatalf("code %v, want UNAVAILABLE", st.Code())
			}
			var reason string
			var retry bool
			for _, d := range st.Details() {
				switch d := d.(type) {
				case *errdetails.ErrorInfo:
					reason = d.GetReason()
				case *errdetails.RetryInfo:
					retry = d.GetRetryDelay().AsDuration() > 0
				}
			}
			if reason != ReasonModelLoading || !retry {
				t.Errorf("reason %q, retry info %v; want %s with a retry delay", reason, retry, ReasonModelLoading)
			}
		})
	}
	if g.Service() != nil {
		t.Error("Service() is not nil before Ready")
	}
}
