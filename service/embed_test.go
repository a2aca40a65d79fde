package service

import (
	"context"
	"math"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/kvgate/kvgate/allocator"
	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/native"
)

// wordModel tokenizes a text as [CLS] (101), one token per word, [SEP]
// (102), as BERT's WordPiece does for short words.
type wordModel struct{}

func (wordModel) Tokenize(text string, addSpecial, _ bool) ([]int32, error) {
	var ids []int32
	if addSpecial {
		ids = append(ids, 101)
	}
	for _, w := range strings.Fields(text) {
		ids = append(ids, 1000+int32(len(w)))
	}
	if addSpecial {
		ids = append(ids, 102)
	}
	return ids, nil
}
func (wordModel) ValidTokens(ids []int32) int {
	for i, id := range ids {
		if id < 0 || id >= 2000 {
			return i
		}
	}
	return -1
}
func (wordModel) AddsEndToken() bool { return true }

// fakeEmbedder returns, for each input, a vector of (3, 4) scaled by the
// input's length, or err.
type fakeEmbedder struct {
	err  error
	last native.EmbedRequest
}

func (f *fakeEmbedder) Embed(_ context.Context, req native.EmbedRequest) (native.EmbedResult, error) {
	f.last = req
	if f.err != nil {
		return native.EmbedResult{}, f.err
	}
	out := make([][]float32, len(req.Inputs))
	for i, in := range req.Inputs {
		out[i] = []float32{3 * float32(len(in)), 4 * float32(len(in))}
	}
	return native.EmbedResult{Vectors: out, QueueWait: 2 * time.Millisecond}, nil
}
func (f *fakeEmbedder) Stats() native.EmbedStats { return native.EmbedStats{Requests: 7} }

func newTestEmbed(e Embedder) *EmbedService {
	return NewEmbedService(EmbedConfig{
		Dimensions: 2, VocabSize: 2000, MaxInputTokens: 8, MaxInputs: 4, MaxInputBytes: 100, BatchTokens: 16, MaxQueue: 2,
	}, wordModel{}, e)
}

func text(s string) *kvgatev1.EmbedInput {
	return &kvgatev1.EmbedInput{Input: &kvgatev1.EmbedInput_Text{Text: s}}
}

func ids(v ...int32) *kvgatev1.EmbedInput {
	return &kvgatev1.EmbedInput{Input: &kvgatev1.EmbedInput_Tokens{Tokens: &kvgatev1.TokenList{Ids: v}}}
}

// fields returns the BadRequest field violations of err.
func fields(err error) []string {
	var out []string
	for _, d := range status.Convert(err).Details() {
		if br, ok := d.(*errdetails.BadRequest); ok {
			for _, v := range br.GetFieldViolations() {
				out = append(out, v.GetField())
			}
		}
	}
	return out
}

func TestEmbedValidation(t *testing.T) {
	long := "one two three four five six seven eight nine" // 9 words + 2 special tokens
	tests := []struct {
		name   string
		req    *kvgatev1.EmbedRequest
		fields []string // nil: accepted
	}{
		{"empty batch", &kvgatev1.EmbedRequest{}, []string{"inputs"}},
		{"over the input limit", &kvgatev1.EmbedRequest{Inputs: []*kvgatev1.EmbedInput{text("a"), text("b"), text("c"), text("d"), text("e")}}, []string{"inputs"}},
		{"empty text", &kvgatev1.EmbedRequest{Inputs: []*kvgatev1.EmbedInput{text("a"), text("")}}, []string{"inputs[1].text"}},
		{"empty tokens", &kvgatev1.EmbedRequest{Inputs: []*kvgatev1.EmbedInput{ids()}}, []string{"inputs[0].tokens.ids"}},
		{"unset input", &kvgatev1.EmbedRequest{Inputs: []*kvgatev1.EmbedInput{{}}}, []string{"inputs[0]"}},
		{"text over the byte limit", &kvgatev1.EmbedRequest{Inputs: []*kvgatev1.EmbedInput{text(strings.Repeat("x", 101))}}, []string{"inputs[0].text"}},
		{"long text refused", &kvgatev1.EmbedRequest{Inputs: []*kvgatev1.EmbedInput{text("a"), text(long)}}, []string{"inputs[1].text"}},
		{"long text refused explicitly", &kvgatev1.EmbedRequest{Truncation: kvgatev1.Truncation_TRUNCATION_REFUSE, Inputs: []*kvgatev1.EmbedInput{text(long)}}, []string{"inputs[0].text"}},
		{"long text truncated", &kvgatev1.EmbedRequest{Truncation: kvgatev1.Truncation_TRUNCATION_END, Inputs: []*kvgatev1.EmbedInput{text(long)}}, nil},
		{"long tokens refused", &kvgatev1.EmbedRequest{Inputs: []*kvgatev1.EmbedInput{ids(1, 2, 3, 4, 5, 6, 7, 8, 9)}}, []string{"inputs[0].tokens.ids"}},
		{"long tokens truncated", &kvgatev1.EmbedRequest{Truncation: kvgatev1.Truncation_TRUNCATION_END, Inputs: []*kvgatev1.EmbedInput{ids(1, 2, 3, 4, 5, 6, 7, 8, 9)}}, nil},
		{"bad id past the cut is cut", &kvgatev1.EmbedRequest{Truncation: kvgatev1.Truncation_TRUNCATION_END, Inputs: []*kvgatev1.EmbedInput{ids(1, 2, 3, 4, 5, 6, 7, 8, -9)}}, nil},
		{"bad id", &kvgatev1.EmbedRequest{Inputs: []*kvgatev1.EmbedInput{ids(1, 2000)}}, []string{"inputs[0].tokens.ids"}},
		{"negative id", &kvgatev1.EmbedRequest{Inputs: []*kvgatev1.EmbedInput{text("ok"), ids(-1)}}, []string{"inputs[1].tokens.ids"}},
		{"unknown truncation", &kvgatev1.EmbedRequest{Truncation: 9, Inputs: []*kvgatev1.EmbedInput{text("a")}}, []string{"truncation"}},
		{"request id too long", &kvgatev1.EmbedRequest{RequestId: strings.Repeat("r", 129), Inputs: []*kvgatev1.EmbedInput{text("a")}}, []string{"request_id"}},
		{"two bad inputs", &kvgatev1.EmbedRequest{Inputs: []*kvgatev1.EmbedInput{text(""), text("fine"), ids()}}, []string{"inputs[0].text", "inputs[2].tokens.ids"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := &fakeEmbedder{}
			resp, err := newTestEmbed(f).Embed(context.Background(), tc.req)
			if tc.fields == nil {
				if err != nil {
					t.Fatal(err)
				}
				if len(resp.GetEmbeddings()) != len(tc.req.GetInputs()) {
					t.Fatalf("%d embeddings", len(resp.GetEmbeddings()))
				}
				return
			}
			if status.Code(err) != codes.InvalidArgument {
				t.Fatalf("code %v (%v), want INVALID_ARGUMENT", status.Code(err), err)
			}
			if got := fields(err); strings.Join(got, ",") != strings.Join(tc.fields, ",") {
				t.Errorf("violations %v, want %v", got, tc.fields)
			}
			if f.last.Inputs != nil {
				t.Error("a refused request reached the worker")
			}
		})
	}
}

func TestEmbedTruncationKeepsSeparator(t *testing.T) {
	f := &fakeEmbedder{}
	resp, err := newTestEmbed(f).Embed(context.Background(), &kvgatev1.EmbedRequest{
		Truncation: kvgatev1.Truncation_TRUNCATION_END,
		Inputs:     []*kvgatev1.EmbedInput{text("a bb ccc dddd eeeee ffffff ggggggg hhhhhhhh iiiiiiiii"), ids(1, 2, 3, 4, 5, 6, 7, 8, 9), text("short")},
	})
	if err != nil {
		t.Fatal(err)
	}
	want := [][]int32{{101, 1001, 1002, 1003, 1004, 1005, 1006, 102}, {1, 2, 3, 4, 5, 6, 7, 8}, {101, 1005, 102}}
	for i, w := range want {
		if got := f.last.Inputs[i]; !slices.Equal(got, w) {
			t.Errorf("input %d: %v, want %v", i, got, w)
		}
		e := resp.GetEmbeddings()[i]
		if int(e.GetTokens()) != len(w) || e.GetTruncated() != (i < 2) {
			t.Errorf("embedding %d: tokens %d truncated %v", i, e.GetTokens(), e.GetTruncated())
		}
	}
	if got := resp.GetUsage().GetPromptTokens(); got != 19 {
		t.Errorf("prompt tokens %d, want 19", got)
	}
}

func TestEmbedNormalize(t *testing.T) {
	for _, norm := range []bool{false, true} {
		resp, err := newTestEmbed(&fakeEmbedder{}).Embed(context.Background(), &kvgatev1.EmbedRequest{
			Normalize: norm, Inputs: []*kvgatev1.EmbedInput{text("a b c")},
		})
		if err != nil {
			t.Fatal(err)
		}
		v := resp.GetEmbeddings()[0].GetValues()
		n := math.Hypot(float64(v[0]), float64(v[1]))
		want := 25.0 // (3, 4) times 5 tokens
		if norm {
			want = 1
		}
		if math.Abs(n-want) > 1e-6 || math.Abs(float64(v[0])/float64(v[1])-0.75) > 1e-6 {
			t.Errorf("normalize %v: %v, norm %v, want %v", norm, v, n, want)
		}
	}
}

func TestEmbedStatusMapping(t *testing.T) {
	tests := []struct {
		name   string
		svc    *EmbedService
		code   codes.Code
		reason string
	}{
		{"no model", NewEmbedService(EmbedConfig{}, nil, nil), codes.FailedPrecondition, ReasonNoEmbeddingModel},
		{"queue full", newTestEmbed(&fakeEmbedder{err: allocator.NewRejectError(allocator.RejectError{Reason: allocator.ReasonQueueFull, RetryAfter: time.Second}, allocator.ErrQueueFull)}),
			codes.ResourceExhausted, allocator.ReasonQueueFull},
		{"draining", newTestEmbed(&fakeEmbedder{err: allocator.NewRejectError(allocator.RejectError{Reason: allocator.ReasonDraining}, allocator.ErrDraining)}),
			codes.Unavailable, allocator.ReasonDraining},
		{"closed", newTestEmbed(&fakeEmbedder{err: native.ErrEngineClosed}), codes.Unavailable, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.svc.Embed(context.Background(), &kvgatev1.EmbedRequest{Inputs: []*kvgatev1.EmbedInput{text("a")}})
			st := status.Convert(err)
			if st.Code() != tc.code {
				t.Fatalf("code %v (%v), want %v", st.Code(), err, tc.code)
			}
			var reason string
			retry := false
			for _, d := range st.Details() {
				switch d := d.(type) {
				case *errdetails.ErrorInfo:
					reason = d.GetReason()
				case *errdetails.RetryInfo:
					retry = true
				}
			}
			if reason != tc.reason {
				t.Errorf("reason %q, want %q", reason, tc.reason)
			}
			if retry != (tc.code == codes.ResourceExhausted) {
				t.Errorf("RetryInfo %v for %v", retry, tc.code)
			}
		})
	}
	for _, call := range []func(s *EmbedService) error{
		func(s *EmbedService) error { _, err := s.GetEmbeddingModelInfo(context.Background(), nil); return err },
		func(s *EmbedService) error { _, err := s.GetEmbeddingStats(context.Background(), nil); return err },
	} {
		if code := status.Code(call(NewEmbedService(EmbedConfig{}, nil, nil))); code != codes.FailedPrecondition {
			t.Errorf("code %v without a model", code)
		}
	}
}

// FuzzValidateEmbed parses arbitrary bytes as an EmbedRequest and
// validates it: validateEmbed must never panic, must refuse with
// INVALID_ARGUMENT and at least one field violation, or accept inputs that
// are non-empty, within the token limit and the vocabulary, with the
// separator last where a text was cut.
func FuzzValidateEmbed(f *testing.F) {
	for _, req := range []*kvgatev1.EmbedRequest{
		{Inputs: []*kvgatev1.EmbedInput{text("a b"), ids(1, 2, 3)}},
		{Truncation: kvgatev1.Truncation_TRUNCATION_END, Inputs: []*kvgatev1.EmbedInput{text("a b c d e f g h i j k"), ids(1, 2, 3, 4, 5, 6, 7, 8, 9, -1)}},
		{Truncation: 7, RequestId: "x", Inputs: []*kvgatev1.EmbedInput{{}, ids(-5), text("")}},
	} {
		b, err := proto.Marshal(req)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	lim := embedLimits{maxInputs: 4, maxInputBytes: 100, maxInputTokens: 8, maxRequestID: 16, vocab: 2000, addsEnd: true}
	f.Fuzz(func(t *testing.T, b []byte) {
		var req kvgatev1.EmbedRequest
		if proto.Unmarshal(b, &req) != nil {
			return
		}
		out, err := validateEmbed(&req, lim, func(s string) ([]int32, error) { return wordModel{}.Tokenize(s, true, false) })
		if err != nil {
			if status.Code(err) != codes.InvalidArgument || len(fields(err)) == 0 {
				t.Fatalf("refusal %v without a field violation", err)
			}
			return
		}
		if len(out) != len(req.GetInputs()) || len(out) == 0 || len(out) > lim.maxInputs {
			t.Fatalf("%d inputs accepted of %d", len(out), len(req.GetInputs()))
		}
		for i, in := range out {
			if len(in.ids) == 0 || len(in.ids) > lim.maxInputTokens || wordModel.ValidTokens(wordModel{}, in.ids) >= 0 {
				t.Fatalf("input %d accepted: %v", i, in.ids)
			}
			if in.truncated && req.GetInputs()[i].GetText() != "" && in.ids[len(in.ids)-1] != 102 {
				t.Fatalf("input %d cut without its separator: %v", i, in.ids)
			}
		}
	})
}
