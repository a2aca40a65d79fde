package llama

/*
#include <stdlib.h>
#include "llama_api.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"github.com/kvgate/kvgate/native"
	"math/rand/v2"
	"strings"
	"unsafe"
)

// llamaDefaultSeed is LLAMA_DEFAULT_SEED: llama_sampler_init_dist replaces
// it with a seed from std::random_device, which throws (and aborts the
// process, through the C boundary) where no entropy source can be opened.
const llamaDefaultSeed = 0xFFFFFFFF

// drawSeed returns the seed kvgate gives llama_sampler_init_dist: never
// LLAMA_DEFAULT_SEED.
func drawSeed(p native.SamplingParams) uint32 {
	seed := p.Seed
	if !p.HasSeed {
		seed = rand.Uint32()
		for seed == llamaDefaultSeed {
			seed = rand.Uint32()
		}
	}
	if seed == llamaDefaultSeed {
		seed--
	}
	return seed
}

// maxStages is the longest pipeline NewSampler builds: logit bias,
// penalties, top_k, top_p, min_p, temp and dist.
const maxStages = 7

// Sampler draws tokens with llama.cpp's samplers, applied one by one by
// kv_sample (shim.c) instead of through a llama.cpp chain, so that every
// sampler sees candidates it can handle. Like a Context it must stay on the
// goroutine that uses the context.
type Sampler struct {
	stages [maxStages]*C.struct_llama_sampler
	n      int
	// grammar is the grammar sampler, nil for none; kv_sample applies it
	// lazily, outside the stages.
	grammar *C.struct_llama_sampler
	// err is why the sampler cannot draw (a grammar llama.cpp refused);
	// Sample returns it.
	err error
	// checked counts the tokens drawn under the grammar; resampled those
	// the grammar rejected, which took the whole-vocabulary mask.
	checked, resampled uint64
	// greedy: the one stage is greedy (no penalties, no bias), so Sample
	// picks the largest logit itself (kv_sample_greedy, or
	// kv_sample_greedy_grammar with a grammar), with the same result.
	greedy bool
}

// samplerStages builds the samplers of p in order: logit bias → penalties →
// top_k → top_p → min_p → temp → dist, or logit bias → penalties → greedy
// when the temperature is 0 or less. A stage a parameter disables is left
// out, which is what it would do in the chain. nVocab is the vocabulary's
// size, for the logit bias.
func samplerStages(p native.SamplingParams, nVocab int, add func(*C.struct_llama_sampler)) {
	if len(p.LogitBias) > 0 {
		bias := make([]C.llama_logit_bias, len(p.LogitBias))
		for i, b := range p.LogitBias {
			bias[i] = C.llama_logit_bias{token: C.llama_token(b.Token), bias: C.float(b.Bias)}
		}
		// llama.cpp copies the array.
		add(C.llama_sampler_init_logit_bias(C.int32_t(nVocab), C.int32_t(len(bias)), &bias[0]))
	}
	if p.HasPenalties() {
		if lastN := p.PenaltyWindow(); lastN > 0 {
			repeat := p.RepeatPenalty
			if repeat == 0 {
				repeat = 1
			}
			add(C.llama_sampler_init_penalties(C.int32_t(lastN), C.float(repeat),
				C.float(p.FrequencyPenalty), C.float(p.PresencePenalty)))
		}
	}
	if p.Temperature <= 0 {
		add(C.llama_sampler_init_greedy())
		return
	}
	if p.TopK > 0 {
		add(C.llama_sampler_init_top_k(C.int32_t(p.TopK)))
	}
	if p.TopP > 0 && p.TopP < 1 {
		add(C.llama_sampler_init_top_p(C.float(p.TopP), 1))
	}
	if p.MinP > 0 {
		add(C.llama_sampler_init_min_p(C.float(p.MinP), 1))
	}
	add(C.llama_sampler_init_temp(C.float(p.Temperature)))
	add(C.llama_sampler_init_dist(C.uint32_t(drawSeed(p))))
}

// NewSampler builds the samplers for p (see samplerStages) without a
// grammar; it is Model.NewSampler for a model-less caller. It accepts any
// p; Sample reports parameters that leave nothing to draw.
func NewSampler(p native.SamplingParams) *Sampler {
	p.Grammar, p.LogitBias = "", nil
	return newSampler(nil, p)
}

// NewSampler builds the samplers for p over m's vocabulary, its grammar
// included. A grammar llama.cpp's parser refuses makes every Sample fail
// with an error wrapping native.ErrBadGrammar; CheckGrammar tells it
// beforehand. The grammar must have passed internal/grammar's Check: some
// grammars the parser accepts make llama.cpp abort.
func (m *Model) NewSampler(p native.SamplingParams) *Sampler {
	return newSampler(m, p)
}

func newSampler(m *Model, p native.SamplingParams) *Sampler {
	s := &Sampler{}
	nVocab := 0
	if m != nil {
		nVocab = m.info.VocabSize
	}
	samplerStages(p, nVocab, func(smpl *C.struct_llama_sampler) {
		s.stages[s.n] = smpl
		s.n++
	})
	if p.Grammar != "" && m != nil {
		s.grammar, s.err = m.initGrammar(p.Grammar)
	}
	s.greedy = p.Temperature <= 0 && s.n == 1
	return s
}

// CheckGrammar parses gbnf with llama.cpp's grammar parser, for m's
// vocabulary, and returns an error wrapping native.ErrBadGrammar with the
// parser's reason when it does not parse. The grammar must have passed
// internal/grammar's Check first. It is safe for concurrent use.
func (m *Model) CheckGrammar(gbnf string) error {
	g, err := m.initGrammar(gbnf)
	if g != nil {
		C.llama_sampler_free(g)
	}
	return err
}

func (m *Model) initGrammar(gbnf string) (*C.struct_llama_sampler, error) {
	if strings.IndexByte(gbnf, 0) >= 0 {
		return nil, fmt.Errorf("%w: it holds a NUL byte", native.ErrBadGrammar)
	}
	str, root := C.CString(gbnf), C.CString("root")
	defer C.free(unsafe.Pointer(str))
	defer C.free(unsafe.Pointer(root))
	g := C.llama_sampler_init_grammar(m.vocab, str, root)
	if g == nil {
		// The parser prints its reason to stderr itself, not through
		// llama.cpp's log: the service reports internal/grammar's, which
		// mirrors the parser and runs first.
		return nil, fmt.Errorf("%w: llama.cpp's grammar parser refused it", native.ErrBadGrammar)
	}
	return g, nil
}

// Accept records tok in the history of the samplers that keep one (the
// penalties) without sampling.
func (s *Sampler) Accept(tok int32) {
	if s.n > 0 {
		C.kv_sampler_accept(&s.stages[0], C.int32_t(s.n), C.llama_token(tok))
	}
}

// Sample draws the next token from output i of c's last Decode and accepts
// it. It reuses c's candidate buffer, so it does not allocate. It fails with
// native.ErrNoValidToken when the parameters left no candidate with a finite
// logit, and with native.ErrNoLogits when output i has no logits; the token is then
// -1 and nothing is accepted.
func (s *Sampler) Sample(c *Context, i int) (int32, error) {
	if !c.hasOutput(i) {
		return -1, fmt.Errorf("%w: index %d", native.ErrNoLogits, i)
	}
	if s.n == 0 {
		return -1, errors.New("sample: the sampler was freed")
	}
	if s.err != nil {
		return -1, s.err
	}
	vocab := c.model.info.VocabSize
	var tok C.llama_token
	switch {
	case s.greedy && s.grammar == nil:
		tok = C.kv_sample_greedy(c.ptr, C.int32_t(i), C.int32_t(vocab))
	case s.greedy:
		tok = C.kv_sample_greedy_grammar(s.stages[0], s.grammar, c.ptr, C.int32_t(i), c.cand, C.int32_t(vocab))
	default:
		tok = C.kv_sample(&s.stages[0], C.int32_t(s.n), s.grammar, c.ptr, C.int32_t(i), c.cand, C.int32_t(vocab))
	}
	if s.grammar != nil && tok >= 0 {
		s.checked++
		if tok&C.KV_SAMPLE_RESAMPLED != 0 {
			s.resampled++
			tok &^= C.KV_SAMPLE_RESAMPLED
		}
	}
	switch {
	case tok >= 0 && int(tok) < vocab:
		return int32(tok), nil
	case tok == C.KV_SAMPLE_NO_FINITE:
		return -1, native.ErrNoValidToken
	case tok == C.KV_SAMPLE_NO_LOGITS:
		return -1, fmt.Errorf("%w: index %d", native.ErrNoLogits, i)
	default:
		return -1, fmt.Errorf("sample: the samplers selected no token (code %d)", int(tok))
	}
}

// GrammarCounts returns the tokens drawn under the sampler's grammar and
// how many of them the grammar rejected at first, which made the sampler
// mask the whole vocabulary and draw again (the lazy check's misses).
func (s *Sampler) GrammarCounts() (checked, resampled uint64) { return s.checked, s.resampled }

// Free releases the samplers. It is idempotent.
func (s *Sampler) Free() {
	for i := range s.n {
		C.llama_sampler_free(s.stages[i])
		s.stages[i] = nil
	}
	s.n = 0
	if s.grammar != nil {
		C.llama_sampler_free(s.grammar)
		s.grammar = nil
	}
}

// chainSampler is the sampler kvgate used before Sampler: the same samplers
// in one llama.cpp chain, sampled with llama_sampler_sample. It aborts the
// process on the parameters Sampler survives; the tests use it, with
// ordinary parameters only, to check that Sampler draws the same tokens.
type chainSampler struct {
	ptr *C.struct_llama_sampler
}

func newChainSampler(p native.SamplingParams) *chainSampler {
	chain := C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
	samplerStages(p, 0, func(smpl *C.struct_llama_sampler) { C.llama_sampler_chain_add(chain, smpl) })
	return &chainSampler{ptr: chain}
}

func (s *chainSampler) accept(tok int32) { C.llama_sampler_accept(s.ptr, C.llama_token(tok)) }

func (s *chainSampler) sample(c *Context, i int) int32 {
	return int32(C.llama_sampler_sample(s.ptr, c.ptr, C.int32_t(i)))
}

func (s *chainSampler) free() { C.llama_sampler_free(s.ptr) }

// kvSampleNoFinite is KV_SAMPLE_NO_FINITE, for the tests.
const kvSampleNoFinite = int32(C.KV_SAMPLE_NO_FINITE)

// greedyPick runs kv_greedy_pick on logits for the tests.
func greedyPick(logits []float32) int32 {
	if len(logits) == 0 {
		return int32(C.KV_SAMPLE_NO_FINITE)
	}
	buf := (*C.float)(C.malloc(C.size_t(len(logits)) * 4))
	defer C.free(unsafe.Pointer(buf))
	copy(unsafe.Slice((*float32)(unsafe.Pointer(buf)), len(logits)), logits)
	return int32(C.kv_greedy_pick(buf, C.int32_t(len(logits))))
}

// sanitizeCandidates runs kv_sanitize_candidates on logits (in place) for
// the tests, and returns the sorted flag it leaves and the count of finite
// candidates.
func sanitizeCandidates(logits []float32, sorted bool) (bool, int) {
	if len(logits) == 0 {
		return sorted, 0
	}
	// C memory: the array struct points at the data, and cgo does not let
	// C see Go memory that holds Go pointers.
	data := (*C.llama_token_data)(C.malloc(C.size_t(len(logits)) * C.size_t(unsafe.Sizeof(C.llama_token_data{}))))
	defer C.free(unsafe.Pointer(data))
	cur := (*C.llama_token_data_array)(C.malloc(C.size_t(unsafe.Sizeof(C.llama_token_data_array{}))))
	defer C.free(unsafe.Pointer(cur))
	d := unsafe.Slice(data, len(logits))
	for i, l := range logits {
		d[i] = C.llama_token_data{id: C.llama_token(i), logit: C.float(l)}
	}
	*cur = C.llama_token_data_array{data: data, size: C.size_t(len(logits)), selected: -1, sorted: C.bool(sorted)}
	finite := C.kv_sanitize_candidates(cur)
	for i := range logits {
		logits[i] = float32(d[i].logit)
	}
	return bool(cur.sorted), int(finite)
}

// NewSampler returns a sampler of p that draws from c's outputs, as the
// decode worker uses it (native.Backend).
func (c *Context) NewSampler(p native.SamplingParams) native.Sampler {
	return boundSampler{c.model.NewSampler(p), c}
}

// Logprob computes the log-softmax of output out of the last Decode (the
// model's raw distribution): the log-probability of tok, and the top most
// likely tokens, most likely first and ties by id, appended to dst.Top[:0].
func (c *Context) Logprob(out int, tok int32, top int, dst *native.TokenLogprob) error {
	if !c.hasOutput(out) {
		return fmt.Errorf("%w: index %d", native.ErrNoLogits, out)
	}
	top = min(max(top, 0), native.MaxTopLogprobs)
	var ids [native.MaxTopLogprobs]C.int32_t
	var lps [native.MaxTopLogprobs]C.float
	var lp C.float
	n := C.kv_logprobs(c.ptr, C.int32_t(out), C.int32_t(c.model.info.VocabSize), C.llama_token(tok),
		C.int32_t(top), &ids[0], &lps[0], &lp)
	switch {
	case n == C.KV_SAMPLE_NO_FINITE:
		return native.ErrNoValidToken
	case n < 0:
		return fmt.Errorf("%w: index %d, token %d", native.ErrNoLogits, out, tok)
	}
	dst.Token, dst.Logprob, dst.Top = tok, float32(lp), dst.Top[:0]
	for k := range int(n) {
		dst.Top = append(dst.Top, native.TopLogprob{Token: int32(ids[k]), Logprob: float32(lps[k])})
	}
	return nil
}

// boundSampler is a Sampler with the context it samples from.
type boundSampler struct {
	*Sampler
	c *Context
}

// Sample draws from output out of the context's last Decode.
func (b boundSampler) Sample(out int) (int32, error) { return b.Sampler.Sample(b.c, out) }

var _ native.Backend = (*Context)(nil)
