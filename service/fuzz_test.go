package service

import (
	"math"
	"strings"
	"testing"
	"unicode/utf8"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/internal/grammar"
	"github.com/kvgate/kvgate/native"
)

// FuzzValidate parses arbitrary bytes as a GenerateRequest, as the server
// does, and validates it, conversations rendered with a ChatML-like
// template (fakeChat): validate must never panic, must refuse with
// INVALID_ARGUMENT and at least one field violation, or accept a request
// whose every value lies in its documented range.
func FuzzValidate(f *testing.F) {
	one := float32(1)
	for _, req := range []*kvgatev1.GenerateRequest{
		{Prompt: &kvgatev1.GenerateRequest_Text{Text: "a b c"}, MaxTokens: 8},
		{Prompt: &kvgatev1.GenerateRequest_Tokens{Tokens: &kvgatev1.TokenList{Ids: []int32{1, 99, 100}}}},
		{Prompt: &kvgatev1.GenerateRequest_Text{Text: "a"}, Sampling: &kvgatev1.SamplingParams{
			Temperature: 1e-40, RepetitionPenalty: 1e-45, FrequencyPenalty: -3.4e38, PresencePenalty: float32(math.NaN()),
			PenaltyLastN: 300_000_000, TopP: &one, TopK: -1, MinP: float32(math.Inf(1)),
		}},
		{Prompt: &kvgatev1.GenerateRequest_Text{Text: "a"}, MaxTokens: 1, Stop: []string{"", "x"}, CacheSalt: "s", RequestId: "r", Priority: math.MaxInt32},
		{Prompt: &kvgatev1.GenerateRequest_Messages{Messages: &kvgatev1.ChatMessages{Messages: msgs("system", "be brief", "user", "hi <|im_end|>")}}, MaxTokens: 4},
		{Prompt: &kvgatev1.GenerateRequest_Messages{Messages: &kvgatev1.ChatMessages{Messages: msgs("user", strings.Repeat("x", 40), "assistant", "ok", "user", "again")}},
			ContextOverflow: kvgatev1.ContextOverflow_CONTEXT_OVERFLOW_DROP_OLDEST},
		{Prompt: &kvgatev1.GenerateRequest_Messages{Messages: &kvgatev1.ChatMessages{Messages: msgs("us er", "\x00", "", "")}}, ContextOverflow: 7},
		{Prompt: &kvgatev1.GenerateRequest_Text{Text: "a"}, Logprobs: proto.Uint32(5), N: 4, StopTokenIds: []int32{3, 7},
			LogitBias: map[int32]float32{1: float32(math.Inf(-1)), 2: 5, 200: 1, 3: float32(math.NaN())}},
		{Prompt: &kvgatev1.GenerateRequest_Text{Text: "a"}, Logprobs: proto.Uint32(21), N: 17, StopTokenIds: []int32{-1}},
		{Prompt: &kvgatev1.GenerateRequest_Text{Text: "a"}, Constraint: &kvgatev1.GenerateRequest_Grammar{Grammar: `root ::= "yes" | "no"`}},
		{Prompt: &kvgatev1.GenerateRequest_Text{Text: "a"}, Constraint: &kvgatev1.GenerateRequest_Grammar{Grammar: `root ::= root "a"`}},
		{Prompt: &kvgatev1.GenerateRequest_Text{Text: "a"}, Constraint: &kvgatev1.GenerateRequest_Json{Json: &kvgatev1.JSONConstraint{ObjectOnly: true}}},
		{Prompt: &kvgatev1.GenerateRequest_Text{Text: "a"}, Constraint: &kvgatev1.GenerateRequest_JsonSchema{
			JsonSchema: `{"type":"object","properties":{"a":{"type":"string","maxLength":3}},"required":["a"]}`}},
		{Prompt: &kvgatev1.GenerateRequest_Text{Text: "a"}, Constraint: &kvgatev1.GenerateRequest_JsonSchema{JsonSchema: `{"pattern":"x"}`}},
	} {
		b, err := proto.Marshal(req)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	lim := DefaultLimits()
	lim.MaxSequenceTokens = 64
	lim.MaxPromptBytes = 1000
	lim.MaxPenaltyLastN = 64
	lim.DefaultMaxTokens = 16
	f.Fuzz(func(t *testing.T, b []byte) {
		var req kvgatev1.GenerateRequest
		if proto.Unmarshal(b, &req) != nil {
			return // the codec refuses it before validation (obs.clientCodec)
		}
		r, err := validateChat(&req, fakeTokenizer{}, lim, chatInput{tmpl: fakeChat(), limits: chatLimits{maxMessages: 8, maxBytes: lim.MaxPromptBytes}})
		if err != nil {
			if status.Code(err) != codes.InvalidArgument || len(fieldsOf(t, err)) == 0 {
				t.Fatalf("refusal without violations: %v", err)
			}
			return
		}
		sp := r.sampling
		switch {
		case len(r.prompt) == 0, r.maxTokens < 1:
			t.Fatalf("accepted an empty prompt or max_tokens %d", r.maxTokens)
		case sp.Temperature != 0 && !(sp.Temperature >= minTemperature && sp.Temperature <= maxTemperature):
			t.Fatalf("accepted temperature %v", sp.Temperature)
		case sp.RepeatPenalty != 0 && !(sp.RepeatPenalty >= minRepetitionPenalty && sp.RepeatPenalty <= maxRepetitionPenalty):
			t.Fatalf("accepted repetition_penalty %v", sp.RepeatPenalty)
		case !(math.Abs(float64(sp.FrequencyPenalty)) <= maxAbsPenalty) || !(math.Abs(float64(sp.PresencePenalty)) <= maxAbsPenalty):
			t.Fatalf("accepted penalties %v, %v", sp.FrequencyPenalty, sp.PresencePenalty)
		case sp.PenaltyLastN < 0 || int(sp.PenaltyLastN) > lim.MaxPenaltyLastN:
			t.Fatalf("accepted penalty_last_n %d", sp.PenaltyLastN)
		case !(sp.MinP >= 0 && sp.MinP <= 1), req.GetSampling() != nil && req.GetSampling().TopP != nil && !(sp.TopP > 0 && sp.TopP <= 1):
			t.Fatalf("accepted min_p %v, top_p %v", sp.MinP, sp.TopP)
		case len(req.GetCacheSalt()) > lim.MaxCacheSaltBytes, len(req.GetText()) > lim.MaxPromptBytes:
			t.Fatalf("accepted a %d-byte salt or a %d-byte text", len(req.GetCacheSalt()), len(req.GetText()))
		case !utf8.ValidString(req.GetText()):
			t.Fatal("accepted invalid UTF-8")
		case kvgatev1.ContextOverflow_name[int32(req.GetContextOverflow())] == "":
			t.Fatalf("accepted context_overflow %d", req.GetContextOverflow())
		case req.GetMessages() != nil && (len(req.GetMessages().GetMessages()) > 8 || len(r.prompt)+r.maxTokens > lim.MaxSequenceTokens):
			t.Fatalf("accepted a conversation of %d messages, %d prompt tokens + %d", len(req.GetMessages().GetMessages()), len(r.prompt), r.maxTokens)
		case r.n < 1 || r.n > lim.samples(), r.topLogprobs < 0 || r.topLogprobs > native.MaxTopLogprobs:
			t.Fatalf("accepted n %d, logprobs %d", r.n, r.topLogprobs)
		case len(sp.LogitBias) != len(req.GetLogitBias()) || len(sp.LogitBias) > lim.logitBiasEntries():
			t.Fatalf("accepted %d logit biases as %d", len(req.GetLogitBias()), len(sp.LogitBias))
		case req.GetConstraint() != nil && sp.Grammar == "":
			t.Fatalf("accepted the constraint %v without a grammar", req.GetConstraint())
		}
		for _, b := range sp.LogitBias {
			if b.Token < 0 || b.Token >= 100 || !(math.IsInf(float64(b.Bias), -1) || math.Abs(float64(b.Bias)) <= maxAbsLogitBias) {
				t.Fatalf("accepted logit bias %v", b)
			}
		}
		for _, id := range r.stopTokens {
			if id < 0 || id >= 100 {
				t.Fatalf("accepted stop token %d", id)
			}
		}
		if sp.Grammar != "" {
			if err := grammar.Check(sp.Grammar, grammar.DefaultLimits()); err != nil {
				t.Fatalf("accepted a grammar that fails Check: %v", err)
			}
		}
	})
}
