package native

import "errors"

// The types and errors below are shared by the worker and the llama.cpp
// binding (package native/llama), which implements Backend and Vocab.

// MaxSequenceIDs is llama.cpp's LLAMA_MAX_SEQ: sequence ids of a unified
// cache lie in [0, 256).
const MaxSequenceIDs = 256

// ErrNoKVSlot is llama_decode's return 1: no free KV cells for the
// batch. The cache is left unchanged. With kvgate's allocator this is a
// bug, never an expected outcome.
var ErrNoKVSlot = errors.New("llama_decode: no KV slot for the batch")

// ModelInfo describes a loaded model.
type ModelInfo struct {
	Path            string
	Architecture    string
	Description     string
	ParameterCount  uint64
	SizeBytes       uint64
	TrainingContext int
	VocabSize       int
	EmbeddingSize   int
	Layers          int
	Heads           int
	HeadsKV         int
	HasChatTemplate bool
	AddBOS          bool
	BOS, EOS        int32
}

// DetokenizeOptions controls Detokenize.
type DetokenizeOptions struct {
	// RenderSpecial renders special tokens (BOS, EOS, control tokens) as text.
	RenderSpecial bool
	// StripLeadingSpace drops the space a SentencePiece vocabulary puts
	// before the first word.
	StripLeadingSpace bool
}

// ErrTokenOutOfRange reports a token id outside [0, vocab size).
var ErrTokenOutOfRange = errors.New("token id out of range")

// ErrNoValidToken ends a sequence whose sampling parameters, applied to the
// step's logits, left no candidate with a finite logit to draw from (for
// example a temperature so small that every logit divided by it overflows
// to -inf, or penalties that push every candidate to -inf or NaN).
var ErrNoValidToken = errors.New("the sampling parameters left no token with a finite probability")

// ErrNoLogits reports a Sample from an output index that the last Decode did
// not compute logits for.
var ErrNoLogits = errors.New("no logits for that output of the last decode")

// MaxPenaltyLastN is the largest penalty window NewSampler builds. llama.cpp
// allocates the window's ring buffer (4 bytes a token) up front, with no
// bound of its own, so NewSampler clamps SamplingParams.PenaltyLastN to this;
// the service refuses larger values before they get here.
const MaxPenaltyLastN = 1 << 16

// DefaultPenaltyLastN is the penalty window when SamplingParams.PenaltyLastN
// is 0.
const DefaultPenaltyLastN = 64

// SamplingParams chooses how each next token is drawn. The zero value is
// greedy decoding. NewSampler accepts any values, NaN, infinities and
// subnormals included: values that leave no token to draw make Sample fail
// with ErrNoValidToken instead of reaching llama.cpp's asserts.
type SamplingParams struct {
	// Temperature; 0 or less means greedy. NaN makes every logit NaN, so
	// Sample fails with ErrNoValidToken.
	Temperature float32
	// TopK keeps the k most likely tokens; 0 or less disables.
	TopK int32
	// TopP keeps the smallest set reaching this probability; a value
	// outside (0, 1), or NaN, disables.
	TopP float32
	// MinP drops tokens below MinP times the best one; a value of 0 or
	// less, or NaN, disables.
	MinP float32
	// RepeatPenalty over the last PenaltyLastN tokens; 0 or 1 disables.
	RepeatPenalty float32
	// FrequencyPenalty; 0 disables.
	FrequencyPenalty float32
	// PresencePenalty; 0 disables.
	PresencePenalty float32
	// PenaltyLastN is the penalty window: 0 means DefaultPenaltyLastN,
	// values above MaxPenaltyLastN mean MaxPenaltyLastN, and a negative
	// value turns the penalties off (llama.cpp's llama_sampler_init_penalties
	// takes a negative window as 0, which disables them).
	PenaltyLastN int32
	// Seed of the draw, used when HasSeed is set; otherwise a random seed.
	// llama.cpp reads seed 0xFFFFFFFF (LLAMA_DEFAULT_SEED) as "pick one at
	// random", so that seed draws as 0xFFFFFFFE does.
	Seed    uint32
	HasSeed bool
	// LogitBias is added to the logits of its tokens before every other
	// stage; a bias of -inf bans the token. Any bias turns the greedy fast
	// path off. The ids must lie in the vocabulary (the service checks).
	LogitBias []LogitBias
	// Grammar is a GBNF grammar whose rule "root" constrains the output,
	// applied lazily: each token is drawn as without it and checked, and
	// only a rejected token makes the sampler mask the whole vocabulary
	// with the grammar and draw again. "" means no grammar. NewSampler
	// fails with an error wrapping ErrBadGrammar when llama.cpp cannot
	// parse it; the service checks it in Go first (internal/grammar), so
	// that no grammar reaches llama.cpp's asserts.
	Grammar string
}

// LogitBias is an additive bias on one token's logit.
type LogitBias struct {
	Token int32
	Bias  float32
}

// ErrBadGrammar reports a grammar llama.cpp's parser refused.
var ErrBadGrammar = errors.New("the grammar does not parse")

// TokenLogprob is a sampled token's log-probability under the model's raw
// distribution (the log-softmax of its logits, before bias, penalties,
// temperature, filters and grammar), with the most likely tokens of that
// step.
type TokenLogprob struct {
	Token   int32
	Logprob float32
	// Top holds the most likely tokens, most likely first, ties by id.
	Top []TopLogprob
}

// TopLogprob is one of the most likely tokens of a step.
type TopLogprob struct {
	Token   int32
	Logprob float32
}

// MaxTopLogprobs is the most alternatives a logprobs request may ask for.
const MaxTopLogprobs = 20

// HasPenalties reports whether any penalty is active.
func (p SamplingParams) HasPenalties() bool {
	return (p.RepeatPenalty != 0 && p.RepeatPenalty != 1) || p.FrequencyPenalty != 0 || p.PresencePenalty != 0
}

// PenaltyWindow returns the window a sampler gives llama.cpp's penalties
// sampler: 0 (off) for a negative value, the default for 0, and at most
// MaxPenaltyLastN.
func (p SamplingParams) PenaltyWindow() int32 {
	switch n := p.PenaltyLastN; {
	case n < 0:
		return 0
	case n == 0:
		return DefaultPenaltyLastN
	default:
		return min(n, MaxPenaltyLastN)
	}
}
