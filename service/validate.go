package service

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"unicode/utf8"

	"google.golang.org/genproto/googleapis/rpc/errdetails"

	"github.com/kvgate/kvgate/allocator"
	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/internal/chat"
	"github.com/kvgate/kvgate/native"
)

// Limits are the server-side bounds on a request. They are reported by
// GetModelInfo, and the INVALID_ARGUMENT field violations of a request that
// exceeds one name it by its GetModelInfo field.
type Limits struct {
	// MaxSequenceTokens bounds prompt tokens + max_tokens: the smaller of
	// the KV pool and the model's training context.
	MaxSequenceTokens int
	// MaxPromptTokens bounds the prompt's tokens; 0 means no bound beyond
	// MaxSequenceTokens.
	MaxPromptTokens int
	// MaxCompletionTokens bounds max_tokens; 0 means no bound beyond
	// MaxSequenceTokens.
	MaxCompletionTokens int
	// MaxStopStrings bounds the number of stop strings.
	MaxStopStrings int
	// MaxStopStringBytes bounds each stop string's length.
	MaxStopStringBytes int
	// MaxRequestIDBytes bounds request_id.
	MaxRequestIDBytes int
	// MaxCacheSaltBytes bounds cache_salt.
	MaxCacheSaltBytes int
	// MaxPromptBytes bounds the prompt text in bytes, checked before the
	// text is tokenized; 0 means no bound beyond the message size. New
	// tightens it to what max_prompt_tokens tokens of the model can spell.
	MaxPromptBytes int
	// MaxPenaltyLastN bounds sampling.penalty_last_n; 0 means
	// native.MaxPenaltyLastN. New tightens it to MaxSequenceTokens.
	MaxPenaltyLastN int
	// MaxGrammarBytes bounds a grammar or JSON Schema; 0 means
	// DefaultMaxGrammarBytes.
	MaxGrammarBytes int
	// MaxLogitBias bounds the logit_bias entries; 0 means
	// DefaultMaxLogitBias.
	MaxLogitBias int
	// MaxSamples bounds n; 0 means DefaultMaxSamples.
	MaxSamples int
	// DefaultMaxTokens is the max_tokens of a request that leaves it
	// unset, shortened to what its prompt leaves of MaxSequenceTokens; 0
	// refuses such a request. New clamps it to MaxCompletionTokens.
	DefaultMaxTokens int
}

// effectiveLimit returns the bound a limit sets in effect: limit, unless it
// is unset (0) or looser than bound.
func effectiveLimit(limit, bound int) int {
	if limit <= 0 || limit > bound {
		limit = bound
	}
	return max(limit, 0)
}

// DefaultLimits returns the limits used when a flag does not set them.
func DefaultLimits() Limits {
	return Limits{MaxStopStrings: 16, MaxStopStringBytes: 256, MaxRequestIDBytes: 128, MaxCacheSaltBytes: 256}
}

// Defaults of the structured-output and token-control limits.
const (
	// DefaultMaxGrammarBytes bounds a grammar or a JSON Schema's text.
	DefaultMaxGrammarBytes = 64 << 10
	// DefaultMaxLogitBias bounds the logit_bias entries.
	DefaultMaxLogitBias = 1024
	// DefaultMaxSamples bounds n: the allocator's bound.
	DefaultMaxSamples = allocator.MaxSamples
	// maxAbsLogitBias bounds a finite logit bias; -inf bans a token.
	maxAbsLogitBias = 100
)

// grammarBytes, logitBiasEntries and samples return the limits in effect.
func (l Limits) grammarBytes() int     { return cmp.Or(l.MaxGrammarBytes, DefaultMaxGrammarBytes) }
func (l Limits) logitBiasEntries() int { return cmp.Or(l.MaxLogitBias, DefaultMaxLogitBias) }
func (l Limits) samples() int          { return cmp.Or(l.MaxSamples, DefaultMaxSamples) }

// tokenizer is the part of the model that validation needs.
type tokenizer interface {
	Tokenize(text string, addSpecial, parseSpecial bool) ([]int32, error)
	ValidTokens(ids []int32) int
	Info() native.ModelInfo
}

// request is a validated GenerateRequest.
type request struct {
	prompt      []int32
	promptField string // the field that holds the prompt, for violations
	maxTokens   int
	sampling    native.SamplingParams
	stop        []string
	priority    int32
	ignoreEOS   bool
	dropped     int // messages dropped to fit (CONTEXT_OVERFLOW_DROP_OLDEST)
	stopTokens  []int32
	logprobs    bool
	topLogprobs int
	n           int
}

// chatInput is what validation needs to render a conversation: the
// template (nil: the server has none) and the conversation's bounds.
type chatInput struct {
	tmpl   *chat.Template
	limits chatLimits
}

// Sampling ranges: see SamplingParams in the .proto for why. They keep
// every logit finite through llama.cpp's samplers.
const (
	minTemperature       = 1e-3
	maxTemperature       = 100
	minRepetitionPenalty = 0.01
	maxRepetitionPenalty = 100
	maxAbsPenalty        = 2 // frequency and presence penalties, as in OpenAI's API
	defaultPenaltyLastN  = 64
)

// validate checks a GenerateRequest and tokenizes its prompt. Every problem
// is reported at once, as BadRequest field violations. A prompt text longer
// than lim.MaxPromptBytes is refused before it is tokenized. Whether
// prompt + max_tokens fits a sequence is left to the allocator, which
// refuses it with NEVER_FITS.
func validate(req *kvgatev1.GenerateRequest, m tokenizer, lim Limits) (*request, error) {
	return validateChat(req, m, lim, chatInput{limits: chatLimits{maxMessages: DefaultMaxChatMessages, maxBytes: lim.MaxPromptBytes}})
}

// validateChat is validate with a chat template for conversation prompts.
// A conversation is checked (checkMessages) before it is rendered, and
// rendered to fit (fitChat) with the request's max_tokens, or 1 when it is
// unset (the default is then shortened to what the prompt leaves). A
// server without a template refuses it with chat.ErrNoTemplate, which
// toStatus makes FAILED_PRECONDITION.
func validateChat(req *kvgatev1.GenerateRequest, m tokenizer, lim Limits, ch chatInput) (*request, error) {
	var vs []*errdetails.BadRequest_FieldViolation
	bad := func(field, format string, args ...any) {
		vs = append(vs, violation(field, fmt.Sprintf(format, args...)))
	}
	out := &request{maxTokens: int(req.GetMaxTokens()), priority: req.GetPriority(), ignoreEOS: req.GetIgnoreEos()}

	if policy := req.GetContextOverflow(); kvgatev1.ContextOverflow_name[int32(policy)] == "" {
		bad("context_overflow", "unknown value %d", int32(policy))
	}

	promptField := "prompt"
	switch p := req.GetPrompt().(type) {
	case *kvgatev1.GenerateRequest_Text:
		promptField = "text"
		if p.Text == "" {
			bad("text", "the prompt text is empty")
		} else if !utf8.ValidString(p.Text) {
			bad("text", "the prompt text is not valid UTF-8")
		} else if lim.MaxPromptBytes > 0 && len(p.Text) > lim.MaxPromptBytes {
			bad("text", "%d bytes exceed the server's max_prompt_bytes limit of %d: the text cannot fit in max_prompt_tokens tokens",
				len(p.Text), lim.MaxPromptBytes)
		} else {
			ids, err := m.Tokenize(p.Text, true, true)
			if err != nil {
				bad("text", "cannot tokenize: %v", err)
			}
			out.prompt = ids
			if len(ids) == 0 {
				bad("text", "the prompt text has no tokens")
			}
		}
	case *kvgatev1.GenerateRequest_Tokens:
		promptField = "tokens.ids"
		ids := p.Tokens.GetIds()
		if len(ids) == 0 {
			bad("tokens.ids", "the prompt token list is empty")
		} else if i := m.ValidTokens(ids); i >= 0 {
			bad(fmt.Sprintf("tokens.ids[%d]", i), "token id %d is outside the vocabulary [0, %d)", ids[i], m.Info().VocabSize)
		}
		out.prompt = ids
	case *kvgatev1.GenerateRequest_Messages:
		promptField = "messages"
		before := len(vs)
		msgs, _ := checkMessages(p.Messages.GetMessages(), ch.limits, "messages.messages", bad)
		if len(vs) > before {
			break
		}
		if ch.tmpl == nil {
			return nil, errNoTemplate
		}
		cp, err := fitChat(ch.tmpl, msgs, max(out.maxTokens, 1), req.GetContextOverflow(), lim, "messages")
		switch {
		case errors.Is(err, chat.ErrRender):
			bad("messages", "%v", err)
		case err != nil:
			return nil, err
		default:
			out.prompt, out.dropped = cp.IDs, cp.dropped
		}
	default:
		bad("prompt", "set text, tokens or messages")
	}

	out.promptField = promptField
	if lim.MaxPromptTokens > 0 && len(out.prompt) > lim.MaxPromptTokens {
		bad(promptField, "%d prompt tokens exceed the server's max_prompt_tokens limit of %d", len(out.prompt), lim.MaxPromptTokens)
	}
	out.n = 1
	switch n := req.GetN(); {
	case n == 0:
	case int64(n) > int64(lim.samples()):
		bad("n", "must be in [1, %d] (the server's max_samples), got %d", lim.samples(), n)
	default:
		out.n = int(n)
	}
	if out.maxTokens == 0 && lim.DefaultMaxTokens > 0 && len(out.prompt) > 0 {
		// Unset: the server's default, as much of it as the prompt leaves
		// room for, shared by the n samples (at least 1, so that a prompt
		// that fills the sequence is still refused as too long).
		out.maxTokens = max(min(lim.DefaultMaxTokens, (lim.MaxSequenceTokens-len(out.prompt))/out.n), 1)
	}
	switch {
	case out.maxTokens < 1:
		bad("max_tokens", "must be at least 1 (the server has no default_max_tokens)")
	case lim.MaxCompletionTokens > 0 && out.maxTokens > lim.MaxCompletionTokens:
		bad("max_tokens", "%d exceeds the server's max_completion_tokens limit of %d", out.maxTokens, lim.MaxCompletionTokens)
	}

	if s := req.GetSampling(); s != nil {
		out.sampling = validateSampling(s, lim, bad)
	}

	if n := len(req.GetStop()); n > lim.MaxStopStrings {
		bad("stop", "%d stop strings exceed the server's max_stop_strings limit of %d", n, lim.MaxStopStrings)
	} else {
		for i, s := range req.GetStop() {
			switch {
			case s == "":
				bad(fmt.Sprintf("stop[%d]", i), "a stop string must not be empty")
			case len(s) > lim.MaxStopStringBytes:
				bad(fmt.Sprintf("stop[%d]", i), "%d bytes exceed the server's max_stop_string_bytes limit of %d", len(s), lim.MaxStopStringBytes)
			}
		}
		out.stop = req.GetStop()
	}
	vocab := m.Info().VocabSize
	if len(req.GetLogitBias()) > 0 {
		out.sampling.LogitBias = validateLogitBias(req.GetLogitBias(), vocab, lim, bad)
	}
	if ids := req.GetStopTokenIds(); len(ids) > lim.MaxStopStrings {
		bad("stop_token_ids", "%d stop token ids exceed the server's max_stop_strings limit of %d", len(ids), lim.MaxStopStrings)
	} else if i := m.ValidTokens(ids); i >= 0 {
		bad(fmt.Sprintf("stop_token_ids[%d]", i), "token id %d is outside the vocabulary [0, %d)", ids[i], vocab)
	} else {
		out.stopTokens = ids
	}
	if req.Logprobs != nil {
		if n := req.GetLogprobs(); n > native.MaxTopLogprobs {
			bad("logprobs", "must be in [0, %d] (the server's max_logprobs), got %d", native.MaxTopLogprobs, n)
		} else {
			out.logprobs, out.topLogprobs = true, int(n)
		}
	}
	out.sampling.Grammar = constraintGrammar(req, m, lim, bad)
	if n := len(req.GetRequestId()); n > lim.MaxRequestIDBytes {
		bad("request_id", "%d bytes exceed the limit of %d", n, lim.MaxRequestIDBytes)
	}
	if n := len(req.GetCacheSalt()); n > lim.MaxCacheSaltBytes {
		bad("cache_salt", "%d bytes exceed the limit of %d", n, lim.MaxCacheSaltBytes)
	}
	if len(vs) > 0 {
		return nil, errInvalid(fmt.Sprintf("invalid GenerateRequest: %s: %s", vs[0].Field, vs[0].Description), vs...)
	}
	return out, nil
}

// validateSampling checks SamplingParams against the documented ranges and
// returns the engine's parameters, reporting each bad field through bad.
func validateSampling(s *kvgatev1.SamplingParams, lim Limits, bad func(field, format string, args ...any)) native.SamplingParams {
	var sp native.SamplingParams
	if t := s.GetTemperature(); t != 0 && !(t >= minTemperature && t <= maxTemperature) {
		bad("sampling.temperature", "must be 0 (greedy) or in [%v, %v], got %v", minTemperature, maxTemperature, t)
	}
	sp.Temperature = s.GetTemperature()
	if s.GetTopK() < 0 {
		bad("sampling.top_k", "must be >= 0, got %d", s.GetTopK())
	}
	sp.TopK = s.GetTopK()
	if s.TopP != nil {
		if p := s.GetTopP(); !(p > 0 && p <= 1) {
			bad("sampling.top_p", "must be in (0, 1], got %v", p)
		}
		sp.TopP = s.GetTopP()
	}
	if p := s.GetMinP(); !(p >= 0 && p <= 1) {
		bad("sampling.min_p", "must be in [0, 1], got %v", p)
	}
	sp.MinP = s.GetMinP()
	if r := s.GetRepetitionPenalty(); r != 0 && !(r >= minRepetitionPenalty && r <= maxRepetitionPenalty) {
		bad("sampling.repetition_penalty", "must be 0 (off) or in [%v, %v], got %v", minRepetitionPenalty, maxRepetitionPenalty, r)
	}
	sp.RepeatPenalty = s.GetRepetitionPenalty()
	if f := s.GetFrequencyPenalty(); !(f >= -maxAbsPenalty && f <= maxAbsPenalty) {
		bad("sampling.frequency_penalty", "must be in [-%d, %d], got %v", maxAbsPenalty, maxAbsPenalty, f)
	}
	sp.FrequencyPenalty = s.GetFrequencyPenalty()
	if f := s.GetPresencePenalty(); !(f >= -maxAbsPenalty && f <= maxAbsPenalty) {
		bad("sampling.presence_penalty", "must be in [-%d, %d], got %v", maxAbsPenalty, maxAbsPenalty, f)
	}
	sp.PresencePenalty = s.GetPresencePenalty()
	maxLastN := lim.MaxPenaltyLastN
	if maxLastN <= 0 {
		maxLastN = native.MaxPenaltyLastN
	}
	if n := s.GetPenaltyLastN(); n < 0 || int(n) > maxLastN {
		bad("sampling.penalty_last_n", "must be in [0, %d] (the server's max_penalty_last_n), got %d", maxLastN, n)
	}
	sp.PenaltyLastN = s.GetPenaltyLastN()
	if s.Seed != nil {
		sp.Seed, sp.HasSeed = s.GetSeed(), true
	}
	return sp
}

// validateLogitBias checks logit_bias against the vocabulary and the
// documented range and returns it as the engine's list, in token order.
func validateLogitBias(bias map[int32]float32, vocab int, lim Limits, bad func(field, format string, args ...any)) []native.LogitBias {
	if len(bias) > lim.logitBiasEntries() {
		bad("logit_bias", "%d entries exceed the server's max_logit_bias limit of %d", len(bias), lim.logitBiasEntries())
		return nil
	}
	out := make([]native.LogitBias, 0, len(bias))
	for _, tok := range slices.Sorted(maps.Keys(bias)) {
		b := bias[tok]
		field := fmt.Sprintf("logit_bias[%d]", tok)
		switch {
		case tok < 0 || int(tok) >= vocab:
			bad(field, "token id %d is outside the vocabulary [0, %d)", tok, vocab)
		case math.IsInf(float64(b), -1):
			// Bans the token.
		case !(b >= -maxAbsLogitBias && b <= maxAbsLogitBias):
			bad(field, "the bias must be in [-%d, %d] or -infinity (ban), got %v", maxAbsLogitBias, maxAbsLogitBias, b)
		}
		out = append(out, native.LogitBias{Token: tok, Bias: b})
	}
	return out
}
