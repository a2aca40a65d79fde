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

// maxStages is the longest pipeline NewSampler builds: penalties, top_k,
// top_p, min_p, temp and dist.
const maxStages = 6

// Sampler draws tokens with llama.cpp's samplers, applied one by one by
// kv_sample (shim.c) instead of through a llama.cpp chain, so that every
// sampler sees candidates it can handle. Like a Context it must stay on the
// goroutine that uses the context.
type Sampler struct {
	stages [maxStages]*C.struct_llama_sampler
	n      int
	// greedy: the one stage is greedy (no penalties), so Sample picks the
	// largest logit itself (kv_sample_greedy), with the same result.
	greedy bool
}

// samplerStages builds the samplers of p in order: penalties → top_k →
// top_p → min_p → temp → dist, or penalties → greedy when the temperature
// is 0 or less. A stage a parameter disables is left out, which is what it
// would do in the chain.
func samplerStages(p native.SamplingParams, add func(*C.struct_llama_sampler)) {
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

// NewSampler builds the samplers for p (see samplerStages). It accepts any
// p; Sample reports parameters that leave nothing to draw.
func NewSampler(p native.SamplingParams) *Sampler {
	s := &Sampler{}
	samplerStages(p, func(smpl *C.struct_llama_sampler) {
		s.stages[s.n] = smpl
		s.n++
	})
	s.greedy = p.Temperature <= 0 && s.n == 1
	return s
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
	vocab := c.model.info.VocabSize
	var tok C.llama_token
	if s.greedy {
		tok = C.kv_sample_greedy(c.ptr, C.int32_t(i), C.int32_t(vocab))
	} else {
		tok = C.kv_sample(&s.stages[0], C.int32_t(s.n), c.ptr, C.int32_t(i), c.cand, C.int32_t(vocab))
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

// Free releases the samplers. It is idempotent.
func (s *Sampler) Free() {
	for i := range s.n {
		C.llama_sampler_free(s.stages[i])
		s.stages[i] = nil
	}
	s.n = 0
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
	samplerStages(p, func(smpl *C.struct_llama_sampler) { C.llama_sampler_chain_add(chain, smpl) })
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
	return boundSampler{NewSampler(p), c}
}

// boundSampler is a Sampler with the context it samples from.
type boundSampler struct {
	*Sampler
	c *Context
}

// Sample draws from output out of the context's last Decode.
func (b boundSampler) Sample(out int) (int32, error) { return b.Sampler.Sample(b.c, out) }

var _ native.Backend = (*Context)(nil)
