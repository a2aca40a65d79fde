package native

/*
#include "llama_api.h"
*/
import "C"

import (
	"math/rand/v2"
)

// SamplingParams chooses how each next token is drawn. The zero value is
// greedy decoding.
type SamplingParams struct {
	// Temperature; 0 means greedy.
	Temperature float32
	// TopK keeps the k most likely tokens; 0 disables.
	TopK int32
	// TopP keeps the smallest set reaching this probability; 0 or 1 disables.
	TopP float32
	// MinP drops tokens below MinP times the best one; 0 disables.
	MinP float32
	// RepeatPenalty over the last PenaltyLastN tokens; 0 or 1 disables.
	RepeatPenalty float32
	// FrequencyPenalty; 0 disables.
	FrequencyPenalty float32
	// PresencePenalty; 0 disables.
	PresencePenalty float32
	// PenaltyLastN is the penalty window; 0 means 64.
	PenaltyLastN int32
	// Seed of the draw, used when HasSeed is set; otherwise a random seed.
	Seed    uint32
	HasSeed bool
}

// HasPenalties reports whether any penalty is active.
func (p SamplingParams) HasPenalties() bool {
	return (p.RepeatPenalty != 0 && p.RepeatPenalty != 1) || p.FrequencyPenalty != 0 || p.PresencePenalty != 0
}

// Sampler is a llama.cpp sampler chain. Like a Context it must stay on the
// goroutine that uses the context.
type Sampler struct {
	ptr *C.struct_llama_sampler
}

// NewSampler builds the chain penalties → top_k → top_p → min_p → temp →
// dist, or penalties → greedy when the temperature is 0.
func NewSampler(p SamplingParams) *Sampler {
	chain := C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
	if p.HasPenalties() {
		lastN := p.PenaltyLastN
		if lastN == 0 {
			lastN = 64
		}
		repeat := p.RepeatPenalty
		if repeat == 0 {
			repeat = 1
		}
		C.llama_sampler_chain_add(chain, C.llama_sampler_init_penalties(C.int32_t(lastN), C.float(repeat),
			C.float(p.FrequencyPenalty), C.float(p.PresencePenalty)))
	}
	if p.Temperature <= 0 {
		C.llama_sampler_chain_add(chain, C.llama_sampler_init_greedy())
		return &Sampler{ptr: chain}
	}
	if p.TopK > 0 {
		C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_k(C.int32_t(p.TopK)))
	}
	if p.TopP > 0 && p.TopP < 1 {
		C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_p(C.float(p.TopP), 1))
	}
	if p.MinP > 0 {
		C.llama_sampler_chain_add(chain, C.llama_sampler_init_min_p(C.float(p.MinP), 1))
	}
	C.llama_sampler_chain_add(chain, C.llama_sampler_init_temp(C.float(p.Temperature)))
	seed := p.Seed
	if !p.HasSeed {
		seed = rand.Uint32()
	}
	C.llama_sampler_chain_add(chain, C.llama_sampler_init_dist(C.uint32_t(seed)))
	return &Sampler{ptr: chain}
}

// Accept records tok in the chain's history (for the penalties) without
// sampling.
func (s *Sampler) Accept(tok int32) { C.llama_sampler_accept(s.ptr, C.llama_token(tok)) }

// Sample draws the next token from output i of c's last Decode and accepts
// it. It reuses c's candidate buffer, so it does not allocate. It returns -1
// if the chain selected nothing.
func (s *Sampler) Sample(c *Context, i int) int32 {
	return int32(C.kv_sample(s.ptr, c.ptr, C.int32_t(i), c.cand, C.int32_t(c.model.info.VocabSize)))
}

// Free releases the chain. It is idempotent.
func (s *Sampler) Free() {
	if s.ptr != nil {
		C.llama_sampler_free(s.ptr)
		s.ptr = nil
	}
}
