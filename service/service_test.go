package service

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"

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
		{"zero max_tokens", text("a", 0), []string{"max_tokens"}},
		{"max_tokens over the limit", text("a", 65), []string{"max_tokens"}},
		{"prompt + max_tokens over the limit", text("a b c", 62), []string{"text"}},
		{"bad token", with(text("a", 1), func(r *kvgatev1.GenerateRequest) {
			r.Prompt = &kvgatev1.GenerateRequest_Tokens{Tokens: &kvgatev1.TokenList{Ids: []int32{1, 100}}}
		}), []string{"tokens.ids[1]"}},
		{"NaN temperature and zero top_p", with(text("a", 1), func(r *kvgatev1.GenerateRequest) {
			r.Sampling = &kvgatev1.SamplingParams{Temperature: nan, TopP: &zero}
		}), []string{"sampling.temperature", "sampling.top_p"}},
		{"negative top_k, min_p above 1", with(text("a", 1), func(r *kvgatev1.GenerateRequest) {
			r.Sampling = &kvgatev1.SamplingParams{TopK: -1, MinP: 2}
		}), []string{"sampling.top_k", "sampling.min_p"}},
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
	tests := []struct {
		name   string
		err    error
		code   codes.Code
		reason string
	}{
		{"queue full", rej(allocator.ReasonQueueFull), codes.ResourceExhausted, allocator.ReasonQueueFull},
		{"never fits", rej(allocator.ReasonNeverFits), codes.InvalidArgument, allocator.ReasonNeverFits},
		{"draining", rej(allocator.ReasonDraining), codes.Unavailable, allocator.ReasonDraining},
		{"slow consumer", native.ErrSlowConsumer, codes.ResourceExhausted, ReasonSlowConsumer},
		{"aborted", native.ErrSequenceAborted, codes.Aborted, "NO_KV_SLOT"},
		{"engine closed", native.ErrEngineClosed, codes.Unavailable, ""},
		{"cancelled", fmt.Errorf("x: %w", context.Canceled), codes.Canceled, ""},
		{"deadline", context.DeadlineExceeded, codes.DeadlineExceeded, ""},
		{"other", errors.New("boom"), codes.Internal, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := toStatus(context.Background(), tt.err)
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
			if wantRetry := tt.reason == allocator.ReasonQueueFull; retry != wantRetry {
				t.Errorf("RetryInfo present %v, want %v", retry, wantRetry)
			}
		})
	}
}
