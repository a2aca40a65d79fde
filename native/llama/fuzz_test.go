package llama

import (
	"errors"
	"github.com/kvgate/kvgate/native"
	"math"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// fuzzParams builds native.SamplingParams straight from raw fuzzed values, with no
// validation in front: every float32 bit pattern (NaN payloads, infinities,
// subnormals, extremes) and every int32 reaches NewSampler.
func fuzzParams(temp, topP, minP, repeat, freq, presence uint32, topK, lastN int32, seed uint32, hasSeed bool) native.SamplingParams {
	return native.SamplingParams{
		Temperature:      math.Float32frombits(temp),
		TopK:             topK,
		TopP:             math.Float32frombits(topP),
		MinP:             math.Float32frombits(minP),
		RepeatPenalty:    math.Float32frombits(repeat),
		FrequencyPenalty: math.Float32frombits(freq),
		PresencePenalty:  math.Float32frombits(presence),
		PenaltyLastN:     lastN,
		Seed:             seed,
		HasSeed:          hasSeed,
	}
}

// FuzzSampler samples real logits of stories260K with arbitrary sampling
// parameters. For every input, Sample must give a token in the vocabulary or
// native.ErrNoValidToken, never anything else, and the process must not abort
// (an abort kills the fuzz worker, which fails the run). It builds a
// sampler as the engine does (accepting the prompt when a penalty is on),
// then samples count%16+1 tokens in a row from different rows of logits,
// feeding each back. When count is 128 or more it samples the logits of a
// random-weight model with a 32000-token vocabulary instead: its candidates take
// the samplers' bucket sorts and top-p's adaptive sort, which stories260K's
// 512 never reach. testdata/fuzz/FuzzSampler holds the known crashers and
// other extremes, which plain go test runs.
func FuzzSampler(f *testing.F) {
	bits := math.Float32bits
	f.Add(bits(0), bits(0), bits(0), bits(0), bits(0), bits(0), int32(0), int32(0), uint32(0), false, uint8(4))
	f.Add(bits(0.8), bits(0.95), bits(0.05), bits(1.1), bits(0.2), bits(0.1), int32(40), int32(64), uint32(7), true, uint8(15))
	f.Add(bits(1), bits(0.9), bits(0), bits(1e-45), bits(0), bits(0), int32(300), int32(0), uint32(9), true, uint8(0x85))
	small, big := newSamplingRig(f), newBigVocabRig(f)
	f.Fuzz(func(t *testing.T, temp, topP, minP, repeat, freq, presence uint32, topK, lastN int32, seed uint32, hasSeed bool, count uint8) {
		p := fuzzParams(temp, topP, minP, repeat, freq, presence, topK, lastN, seed, hasSeed)
		n := int(count)%16 + 1
		r := small
		if count >= 0x80 {
			r = big
		}
		vocab := int32(r.model.Info().VocabSize)
		var bad string
		r.do(func() {
			s := NewSampler(p)
			defer s.Free()
			if p.HasPenalties() {
				_, prompt := r.row(int(seed))
				for _, tok := range prompt {
					s.Accept(tok)
				}
			}
			for i := range n {
				out, _ := r.row(int(seed) + i)
				tok, err := s.Sample(r.ctx, out)
				switch {
				case err == nil && (tok < 0 || tok >= vocab):
					bad = "token outside the vocabulary"
				case err != nil && !errors.Is(err, native.ErrNoValidToken):
					bad = err.Error()
				case err != nil && tok != -1:
					bad = "an error with a token"
				}
				if bad != "" {
					return
				}
			}
		})
		if bad != "" {
			t.Fatalf("%+v: %s", p, bad)
		}
	})
}

// TestChainSamplerAborts shows that the hazards Sampler closes are real:
// llama.cpp's own chain, sampled with llama_sampler_sample, aborts the
// process on the four crashers of FuzzSampler's seed corpus (the presence
// penalty at a temperature below 1: logit + 3.4e38 is still finite, and the
// division by the temperature overflows it), and
// llama_get_logits_ith aborts on an output index without logits (libllama
// is built without NDEBUG, so assert and the debug GGML_ABORT are live).
// Each case runs in a child process.
func TestChainSamplerAborts(t *testing.T) {
	tests := []struct {
		name string
		p    native.SamplingParams
		out  int // -1: the last row of the rig
	}{
		{"temperature 1e-40", native.SamplingParams{Temperature: 1e-40}, -1},
		{"repetition penalty 1e-45", native.SamplingParams{Temperature: 1, RepeatPenalty: 1e-45}, -1},
		{"frequency penalty -3.4e38", native.SamplingParams{Temperature: 1, FrequencyPenalty: -3.4e38}, -1},
		{"presence penalty -3.4e38", native.SamplingParams{Temperature: 0.5, PresencePenalty: -3.4e38}, -1},
		{"output without logits", native.SamplingParams{}, 1 << 20},
	}
	if name := os.Getenv("KVGATE_CHAIN_ABORT_CHILD"); name != "" {
		for _, tc := range tests {
			if tc.name != name {
				continue
			}
			r := newSamplingRig(t)
			r.do(func() {
				s := newChainSampler(tc.p)
				_, prompt := r.row(0)
				for _, tok := range prompt {
					s.accept(tok)
				}
				out := tc.out
				for i := range 8 {
					if tc.out < 0 {
						out, _ = r.row(i)
					}
					s.sample(r.ctx, out)
				}
			})
			os.Exit(0) // survived: the parent reports it
		}
		t.Fatalf("no case %q", name)
	}
	stories(t) // skip when the model is missing
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cmd := exec.Command(os.Args[0], "-test.run=^TestChainSamplerAborts$", "-test.count=1")
			cmd.Env = append(os.Environ(), "KVGATE_CHAIN_ABORT_CHILD="+tc.name)
			out, err := cmd.CombinedOutput()
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.Success() {
				t.Fatalf("the chain survived (err %v):\n%s", err, out)
			}
			for _, line := range strings.Split(string(out), "\n") {
				if strings.Contains(line, "Assertion") || strings.Contains(line, "GGML") || strings.Contains(line, "SIGABRT") {
					t.Logf("child: %s", strings.TrimSpace(line))
				}
			}
			if !strings.Contains(string(out), "SIGABRT") {
				t.Errorf("the child did not abort (%v):\n%s", err, out)
			}
		})
	}
}
