package bench

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
)

// ErrConfig reports a benchmark configuration that cannot run.
var ErrConfig = errors.New("invalid benchmark configuration")

// FirstTokenID is the smallest token id a prompt uses. Ids 0, 1 and 2 are
// the unknown, beginning- and end-of-sequence tokens of llama-style
// vocabularies; prompts leave them out so that every prompt token is
// ordinary text.
const FirstTokenID = 3

// WorkloadKind names the shape of the requests a benchmark sends.
type WorkloadKind string

// The workloads.
const (
	// Fixed sends prompts of exactly InputTokens tokens and asks for
	// exactly OutputTokens tokens.
	Fixed WorkloadKind = "fixed"
	// Mixed draws each request's prompt and output lengths from
	// Distribution between InputMin..InputMax and OutputMin..OutputMax.
	Mixed WorkloadKind = "mixed"
	// SharedPrefix sends prompts of InputTokens tokens whose first
	// PrefixTokens tokens are one of Prefixes common prefixes, followed by
	// a suffix unique to the request, and asks for OutputTokens tokens.
	SharedPrefix WorkloadKind = "shared-prefix"
)

// Distribution names how the Mixed workload draws lengths.
type Distribution string

// The length distributions.
const (
	// Uniform draws every integer between the bounds with equal
	// probability.
	Uniform Distribution = "uniform"
	// LogNormal draws x with ln x normal, centred on the geometric mean of
	// the bounds (the median is sqrt(min*max)) with a standard deviation of
	// a quarter of ln(max/min), so that the bounds lie two standard
	// deviations out; draws outside the bounds are redrawn. It gives many
	// short and few long requests, like real traffic.
	LogNormal Distribution = "lognormal"
)

// Workload describes the requests a benchmark sends. Every request sets
// ignore_eos, so each successful request generates exactly its asked-for
// number of tokens.
type Workload struct {
	// Kind selects the workload.
	Kind WorkloadKind `json:"kind"`
	// InputTokens is the prompt length of Fixed and SharedPrefix requests,
	// prefix included.
	InputTokens int `json:"input_tokens,omitempty"`
	// OutputTokens is the output length of Fixed and SharedPrefix
	// requests.
	OutputTokens int `json:"output_tokens,omitempty"`
	// Distribution is how Mixed draws lengths.
	Distribution Distribution `json:"distribution,omitempty"`
	// InputMin and InputMax bound Mixed prompt lengths, inclusive.
	InputMin int `json:"input_min,omitempty"`
	// InputMax is the longest Mixed prompt.
	InputMax int `json:"input_max,omitempty"`
	// OutputMin and OutputMax bound Mixed output lengths, inclusive.
	OutputMin int `json:"output_min,omitempty"`
	// OutputMax is the longest Mixed output.
	OutputMax int `json:"output_max,omitempty"`
	// PrefixTokens is the length of SharedPrefix's common prefix; it must
	// be less than InputTokens.
	PrefixTokens int `json:"prefix_tokens,omitempty"`
	// Prefixes is the number of distinct common prefixes SharedPrefix
	// cycles through, one request after the other; 0 means 1.
	Prefixes int `json:"prefixes,omitempty"`
}

// Limits are the server's bounds on one request, from its Target's Info
// (kvgate's GetModelInfo). A zero field is not checked.
type Limits struct {
	// VocabSize is the number of token ids; prompts use
	// FirstTokenID..VocabSize-1.
	VocabSize int
	// MaxSequenceTokens bounds prompt plus output tokens.
	MaxSequenceTokens int
	// MaxPromptTokens bounds prompt tokens.
	MaxPromptTokens int
	// MaxCompletionTokens bounds output tokens.
	MaxCompletionTokens int
}

// withDefaults fills in the zero-means-default fields.
func (w Workload) withDefaults() Workload {
	if w.Kind == Mixed && w.Distribution == "" {
		w.Distribution = LogNormal
	}
	if w.Kind == SharedPrefix && w.Prefixes == 0 {
		w.Prefixes = 1
	}
	return w
}

// longest returns the largest prompt and output lengths the workload asks
// for.
func (w Workload) longest() (input, output int) {
	if w.Kind == Mixed {
		return w.InputMax, w.OutputMax
	}
	return w.InputTokens, w.OutputTokens
}

// Validate reports whether the workload is well formed and every request
// it makes fits lim.
func (w Workload) Validate(lim Limits) error {
	w = w.withDefaults()
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrConfig, fmt.Sprintf(format, args...))
	}
	switch w.Kind {
	case Fixed, SharedPrefix:
		if w.InputTokens < 1 || w.OutputTokens < 1 {
			return bad("%s workload needs input and output tokens >= 1 (got %d and %d)", w.Kind, w.InputTokens, w.OutputTokens)
		}
		if w.Kind == SharedPrefix {
			if w.PrefixTokens < 1 || w.PrefixTokens >= w.InputTokens {
				return bad("shared-prefix workload needs 1 <= prefix tokens < input tokens (got %d and %d)", w.PrefixTokens, w.InputTokens)
			}
			if w.Prefixes < 1 {
				return bad("prefixes %d: must be >= 1", w.Prefixes)
			}
		}
	case Mixed:
		if w.InputMin < 1 || w.InputMax < w.InputMin || w.OutputMin < 1 || w.OutputMax < w.OutputMin {
			return bad("mixed workload needs 1 <= min <= max for input (%d..%d) and output (%d..%d)",
				w.InputMin, w.InputMax, w.OutputMin, w.OutputMax)
		}
		if w.Distribution != Uniform && w.Distribution != LogNormal {
			return bad("distribution %q: want %s or %s", w.Distribution, Uniform, LogNormal)
		}
	default:
		return bad("workload %q: want %s, %s or %s", w.Kind, Fixed, Mixed, SharedPrefix)
	}
	if lim.VocabSize > 0 && lim.VocabSize <= FirstTokenID {
		return bad("vocabulary of %d tokens has no ordinary token ids", lim.VocabSize)
	}
	in, out := w.longest()
	if lim.MaxPromptTokens > 0 && in > lim.MaxPromptTokens {
		return bad("prompts of up to %d tokens exceed the server's limit of %d", in, lim.MaxPromptTokens)
	}
	if lim.MaxCompletionTokens > 0 && out > lim.MaxCompletionTokens {
		return bad("outputs of up to %d tokens exceed the server's limit of %d", out, lim.MaxCompletionTokens)
	}
	if lim.MaxSequenceTokens > 0 && in+out > lim.MaxSequenceTokens {
		return bad("%d prompt + %d output tokens exceed the server's limit of %d per request", in, out, lim.MaxSequenceTokens)
	}
	return nil
}

// Prompt is one request's input.
type Prompt struct {
	// Tokens are the prompt's token ids.
	Tokens []int32
	// OutputTokens is the number of tokens to generate.
	OutputTokens int
}

// Generator makes the requests of a workload, deterministically from a
// seed. It is not safe for concurrent use.
type Generator struct {
	w        Workload
	vocab    int
	rng      *rand.Rand
	prefixes [][]int32
	offset   int
	n        int
}

// NewGenerator returns a generator of w's requests over a vocabulary of
// vocab tokens.
func NewGenerator(w Workload, vocab int, seed uint64) (*Generator, error) {
	w = w.withDefaults()
	if err := w.Validate(Limits{VocabSize: vocab}); err != nil {
		return nil, err
	}
	if vocab <= FirstTokenID {
		return nil, fmt.Errorf("%w: vocabulary of %d tokens", ErrConfig, vocab)
	}
	g := &Generator{w: w, vocab: vocab, rng: rand.New(rand.NewPCG(seed, 0x6b7667617465))}
	g.offset = g.rng.IntN(vocab - FirstTokenID)
	if w.Kind == SharedPrefix {
		g.prefixes = make([][]int32, w.Prefixes)
		for i := range g.prefixes {
			g.prefixes[i] = g.tokens(make([]int32, w.PrefixTokens))
			// Distinct prefixes differ in their first token.
			g.prefixes[i][0] = g.cycled(i)
		}
	}
	return g, nil
}

// cycled returns the i-th id in a cycle through the ordinary ids, starting
// at a place chosen by the seed, so that consecutive requests differ in a
// chosen position.
func (g *Generator) cycled(i int) int32 {
	return int32(FirstTokenID + (g.offset+i)%(g.vocab-FirstTokenID))
}

// tokens fills ids with random ordinary token ids.
func (g *Generator) tokens(ids []int32) []int32 {
	for i := range ids {
		ids[i] = int32(FirstTokenID + g.rng.IntN(g.vocab-FirstTokenID))
	}
	return ids
}

// length draws a length between lo and hi inclusive.
func (g *Generator) length(lo, hi int) int {
	return DrawLength(g.rng, g.w.Distribution, lo, hi)
}

// DrawLength draws a length between lo and hi inclusive from d (see
// Uniform and LogNormal).
func DrawLength(r *rand.Rand, d Distribution, lo, hi int) int {
	if hi <= lo {
		return lo
	}
	if d == LogNormal {
		a, b := math.Log(float64(lo)), math.Log(float64(hi))
		mu, sigma := (a+b)/2, (b-a)/4
		for range 64 {
			x := int(math.Round(math.Exp(mu + sigma*r.NormFloat64())))
			if x >= lo && x <= hi {
				return x
			}
		}
		return int(math.Round(math.Exp(mu))) // practically unreachable
	}
	return lo + r.IntN(hi-lo+1)
}

// Next returns the next request's prompt. The first token after any shared
// prefix cycles through the vocabulary, so no two of vocab-3 consecutive
// requests share more than their common prefix.
func (g *Generator) Next() Prompt {
	i := g.n
	g.n++
	var p Prompt
	switch g.w.Kind {
	case Fixed:
		p.Tokens = g.tokens(make([]int32, g.w.InputTokens))
		p.OutputTokens = g.w.OutputTokens
	case Mixed:
		p.Tokens = g.tokens(make([]int32, g.length(g.w.InputMin, g.w.InputMax)))
		p.OutputTokens = g.length(g.w.OutputMin, g.w.OutputMax)
	case SharedPrefix:
		prefix := g.prefixes[i%len(g.prefixes)]
		p.Tokens = make([]int32, g.w.InputTokens)
		copy(p.Tokens, prefix)
		g.tokens(p.Tokens[len(prefix):])
		p.OutputTokens = g.w.OutputTokens
		p.Tokens[len(prefix)] = g.cycled(i / len(g.prefixes))
		return p
	}
	p.Tokens[0] = g.cycled(i)
	return p
}
