package native

/*
#include <stdlib.h>
#include "llama_api.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"unsafe"
)

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
}

// HasPenalties reports whether any penalty is active.
func (p SamplingParams) HasPenalties() bool {
	return (p.RepeatPenalty != 0 && p.RepeatPenalty != 1) || p.FrequencyPenalty != 0 || p.PresencePenalty != 0
}

// penaltyWindow returns the window NewSampler gives llama.cpp's penalties
// sampler: 0 (off) for a negative value, the default for 0, and at most
// MaxPenaltyLastN.
func (p SamplingParams) penaltyWindow() int32 {
	switch n := p.PenaltyLastN; {
	case n < 0:
		return 0
	case n == 0:
		return DefaultPenaltyLastN
	default:
		return min(n, MaxPenaltyLastN)
	}
}

// llamaDefaultSeed is LLAMA_DEFAULT_SEED: llama_sampler_init_dist replaces
// it with a seed from std::random_device, which throws (and aborts the
// process, through the C boundary) where no entropy source can be opened.
const llamaDefaultSeed = 0xFFFFFFFF

// drawSeed returns the seed kvgate gives llama_sampler_init_dist: never
// LLAMA_DEFAULT_SEED.
func (p SamplingParams) drawSeed() uint32 {
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
}

// samplerStages builds the samplers of p in order: penalties → top_k →
// top_p → min_p → temp → dist, or penalties → greedy when the temperature
// is 0 or less. A stage a parameter disables is left out, which is what it
// would do in the chain.
func samplerStages(p SamplingParams, add func(*C.struct_llama_sampler)) {
	if p.HasPenalties() {
		if lastN := p.penaltyWindow(); lastN > 0 {
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
	add(C.llama_sampler_init_dist(C.uint32_t(p.drawSeed())))
}

// NewSampler builds the samplers for p (see samplerStages). It accepts any
// p; Sample reports parameters that leave nothing to draw.
func NewSampler(p SamplingParams) *Sampler {
	s := &Sampler{}
	samplerStages(p, func(smpl *C.struct_llama_sampler) {
		s.stages[s.n] = smpl
		s.n++
	})
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
// ErrNoValidToken when the parameters left no candidate with a finite
// logit, and with ErrNoLogits when output i has no logits; the token is then
// -1 and nothing is accepted.
func (s *Sampler) Sample(c *Context, i int) (int32, error) {
	if !c.hasOutput(i) {
		return -1, fmt.Errorf("%w: index %d", ErrNoLogits, i)
	}
	if s.n == 0 {
		return -1, errors.New("sample: the sampler was freed")
	}
	vocab := c.model.info.VocabSize
	tok := C.kv_sample(&s.stages[0], C.int32_t(s.n), c.ptr, C.int32_t(i), c.cand, C.int32_t(vocab))
	switch {
	case tok >= 0 && int(tok) < vocab:
		return int32(tok), nil
	case tok == C.KV_SAMPLE_NO_FINITE:
		return -1, ErrNoValidToken
	case tok == C.KV_SAMPLE_NO_LOGITS:
		return -1, fmt.Errorf("%w: index %d", ErrNoLogits, i)
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

func newChainSampler(p SamplingParams) *chainSampler {
	chain := C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
	samplerStages(p, func(smpl *C.struct_llama_sampler) { C.llama_sampler_chain_add(chain, smpl) })
	return &chainSampler{ptr: chain}
}

func (s *chainSampler) accept(tok int32) { C.llama_sampler_accept(s.ptr, C.llama_token(tok)) }

func (s *chainSampler) sample(c *Context, i int) int32 {
	return int32(C.llama_sampler_sample(s.ptr, c.ptr, C.int32_t(i)))
}

func (s *chainSampler) free() { C.llama_sampler_free(s.ptr) }

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
