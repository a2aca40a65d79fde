package llama

import (
	"errors"
	"github.com/kvgate/kvgate/native"
	"math"
	"math/rand/v2"
	"slices"
	"testing"
)

func TestSanitizeCandidates(t *testing.T) {
	inf, nan := float32(math.Inf(1)), float32(math.NaN())
	tests := []struct {
		name       string
		in         []float32
		sorted     bool
		want       []float32
		wantSorted bool
		wantFinite int
	}{
		{"finite logits are left alone", []float32{1.5, -2, 0, 3e38}, false, []float32{1.5, -2, 0, 3e38}, false, 4},
		{"NaN becomes -inf", []float32{nan, 1, nan}, false, []float32{-inf, 1, -inf}, false, 1},
		{"+inf becomes FLT_MAX", []float32{inf, 2}, false, []float32{math.MaxFloat32, 2}, false, 2},
		{"-inf stays and is not finite", []float32{-inf, -inf, 7}, false, []float32{-inf, -inf, 7}, false, 1},
		{"nothing finite", []float32{nan, -inf, nan}, false, []float32{-inf, -inf, -inf}, false, 0},
		{"subnormals and extremes are finite", []float32{1e-45, -math.MaxFloat32, math.SmallestNonzeroFloat32}, false,
			[]float32{1e-45, -math.MaxFloat32, math.SmallestNonzeroFloat32}, false, 3},
		{"a truly sorted array stays sorted", []float32{5, 5, 1, -inf}, true, []float32{5, 5, 1, -inf}, true, 3},
		{"a falsely sorted array is unsorted", []float32{1, 5, 0}, true, []float32{1, 5, 0}, false, 3},
		{"sorted with NaN first is unsorted", []float32{nan, 5, 0}, true, []float32{-inf, 5, 0}, false, 2},
		{"sorted with +inf first stays sorted", []float32{inf, 5}, true, []float32{math.MaxFloat32, 5}, true, 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := append([]float32(nil), tc.in...)
			sorted, finite := sanitizeCandidates(got, tc.sorted)
			for i := range got {
				if got[i] != tc.want[i] {
					t.Errorf("logit %d = %v, want %v", i, got[i], tc.want[i])
				}
			}
			if sorted != tc.wantSorted || finite != tc.wantFinite {
				t.Errorf("sorted %v, finite %d; want %v, %d", sorted, finite, tc.wantSorted, tc.wantFinite)
			}
		})
	}
}

func TestPenaltyWindowAndSeed(t *testing.T) {
	windows := []struct {
		lastN, want int32
	}{
		{0, native.DefaultPenaltyLastN},
		{1, 1},
		{native.MaxPenaltyLastN, native.MaxPenaltyLastN},
		{native.MaxPenaltyLastN + 1, native.MaxPenaltyLastN},
		{math.MaxInt32, native.MaxPenaltyLastN},
		{-1, 0},
		{math.MinInt32, 0},
	}
	for _, w := range windows {
		if got := (native.SamplingParams{PenaltyLastN: w.lastN}).PenaltyWindow(); got != w.want {
			t.Errorf("PenaltyLastN %d: window %d, want %d", w.lastN, got, w.want)
		}
	}
	seeds := []struct {
		seed, want uint32
	}{
		{0, 0},
		{42, 42},
		{llamaDefaultSeed - 1, llamaDefaultSeed - 1},
		{llamaDefaultSeed, llamaDefaultSeed - 1},
	}
	for _, s := range seeds {
		if got := drawSeed(native.SamplingParams{Seed: s.seed, HasSeed: true}); got != s.want {
			t.Errorf("seed %#x: draws with %#x, want %#x", s.seed, got, s.want)
		}
	}
	for range 1000 {
		if drawSeed(native.SamplingParams{}) == llamaDefaultSeed {
			t.Fatal("a random seed was LLAMA_DEFAULT_SEED")
		}
	}
}

// TestSamplerMatchesChain checks that, for ordinary parameters, Sampler
// draws exactly the tokens that llama.cpp's own chain and
// llama_sampler_sample drew before kvgate applied the samplers one by one:
// greedy and seeded sampling, with and without each filter and penalty.
func TestSamplerMatchesChain(t *testing.T) {
	tests := []struct {
		name string
		p    native.SamplingParams
	}{
		{"greedy", native.SamplingParams{}},
		{"greedy with penalties", native.SamplingParams{RepeatPenalty: 1.3, FrequencyPenalty: 0.5, PresencePenalty: 0.4, PenaltyLastN: 16}},
		{"temperature 1", native.SamplingParams{Temperature: 1, Seed: 1, HasSeed: true}},
		{"temperature 0.7", native.SamplingParams{Temperature: 0.7, Seed: 2, HasSeed: true}},
		{"temperature 1.8", native.SamplingParams{Temperature: 1.8, Seed: 3, HasSeed: true}},
		{"top-k 40", native.SamplingParams{Temperature: 0.9, TopK: 40, Seed: 4, HasSeed: true}},
		{"top-k 200 (bucket sort)", native.SamplingParams{Temperature: 1.2, TopK: 200, Seed: 5, HasSeed: true}},
		{"top-p 0.9", native.SamplingParams{Temperature: 1, TopP: 0.9, Seed: 6, HasSeed: true}},
		{"min-p 0.05", native.SamplingParams{Temperature: 1, MinP: 0.05, Seed: 7, HasSeed: true}},
		{"everything", native.SamplingParams{Temperature: 0.8, TopK: 50, TopP: 0.95, MinP: 0.02, RepeatPenalty: 1.1,
			FrequencyPenalty: 0.3, PresencePenalty: 0.2, PenaltyLastN: 64, Seed: 8, HasSeed: true}},
		{"penalties, default window", native.SamplingParams{Temperature: 1, RepeatPenalty: 1.5, Seed: 9, HasSeed: true}},
		{"negative penalties", native.SamplingParams{Temperature: 1, FrequencyPenalty: -1, PresencePenalty: -2, Seed: 10, HasSeed: true}},
		{"seed 0", native.SamplingParams{Temperature: 1, TopK: 10, HasSeed: true}},
	}
	const steps = 48
	forEachRig(t, func(t *testing.T, r *samplingRig) {
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				var got, want []int32
				r.do(func() {
					s, ref := NewSampler(tc.p), newChainSampler(tc.p)
					defer s.Free()
					defer ref.free()
					if tc.p.HasPenalties() {
						_, prompt := r.row(0)
						for _, tok := range prompt {
							s.Accept(tok)
							ref.accept(tok)
						}
					}
					for i := range steps {
						out, _ := r.row(i)
						tok, err := s.Sample(r.ctx, out)
						if err != nil {
							t.Errorf("step %d: %v", i, err)
							return
						}
						got = append(got, tok)
						want = append(want, ref.sample(r.ctx, out))
					}
				})
				if !equal(got, want) {
					t.Fatalf("Sampler drew %v\nthe chain drew %v", got, want)
				}
				distinct := map[int32]bool{}
				for _, tok := range got {
					distinct[tok] = true
				}
				t.Logf("%d steps, %d distinct tokens", steps, len(distinct))
			})
		}
	})
}

// forEachRig runs f on the stories260K rig and on the 32000-token rig
// (skipped when that model is missing).
func forEachRig(t *testing.T, f func(t *testing.T, r *samplingRig)) {
	rigs := []struct {
		name string
		rig  func(testing.TB) *samplingRig
	}{
		{"stories260K", newSamplingRig},
		{"random-32000", newBigVocabRig},
	}
	for _, rg := range rigs {
		t.Run(rg.name, func(t *testing.T) { f(t, rg.rig(t)) })
	}
}

// TestSamplerExtremes samples with values that used to abort the process
// in llama.cpp's samplers. Each must give a token in the vocabulary or
// native.ErrNoValidToken, and the ones that leave nothing finite must give the
// error.
func TestSamplerExtremes(t *testing.T) {
	nan, inf := float32(math.NaN()), float32(math.Inf(1))
	const (
		either = iota
		token
		noToken
	)
	tests := []struct {
		name string
		p    native.SamplingParams
		want int
	}{
		// The four crashers found by hand (GGML_ASSERT(found) in the notes;
		// it is assert(found) in llama_sampler_dist_apply).
		{"temperature 1e-40", native.SamplingParams{Temperature: 1e-40}, either},
		{"repetition penalty 1e-45", native.SamplingParams{Temperature: 1, RepeatPenalty: 1e-45}, token},
		{"frequency penalty -3.4e38", native.SamplingParams{Temperature: 1, FrequencyPenalty: -3.4e38}, token},
		{"presence penalty -3.4e38", native.SamplingParams{Temperature: 1, PresencePenalty: -3.4e38}, token},
		{"temperature NaN", native.SamplingParams{Temperature: nan}, noToken},
		{"temperature +inf", native.SamplingParams{Temperature: inf}, token},
		{"temperature -inf is greedy", native.SamplingParams{Temperature: -inf}, token},
		{"temperature subnormal", native.SamplingParams{Temperature: math.SmallestNonzeroFloat32}, either},
		{"temperature MaxFloat32", native.SamplingParams{Temperature: math.MaxFloat32}, token},
		{"top-p NaN", native.SamplingParams{Temperature: 1, TopP: nan}, token},
		{"top-p subnormal", native.SamplingParams{Temperature: 1, TopP: 1e-45}, token},
		{"min-p +inf", native.SamplingParams{Temperature: 1, MinP: inf}, token},
		{"min-p NaN", native.SamplingParams{Temperature: 1, MinP: nan}, token},
		{"min-p subnormal", native.SamplingParams{Temperature: 1, MinP: 1e-45}, token},
		{"top-k MaxInt32", native.SamplingParams{Temperature: 1, TopK: math.MaxInt32}, token},
		{"top-k MinInt32", native.SamplingParams{Temperature: 1, TopK: math.MinInt32}, token},
		{"repetition penalty NaN", native.SamplingParams{Temperature: 1, RepeatPenalty: nan}, token},
		{"repetition penalty +inf", native.SamplingParams{Temperature: 1, RepeatPenalty: inf}, token},
		{"repetition penalty -inf", native.SamplingParams{Temperature: 1, RepeatPenalty: -inf}, either},
		{"greedy, repetition penalty 1e-45", native.SamplingParams{RepeatPenalty: 1e-45}, token},
		{"frequency penalty +3.4e38", native.SamplingParams{Temperature: 1, FrequencyPenalty: 3.4e38}, token},
		{"frequency penalty NaN", native.SamplingParams{Temperature: 1, FrequencyPenalty: nan}, token},
		{"frequency +inf, presence -inf", native.SamplingParams{Temperature: 1, FrequencyPenalty: inf, PresencePenalty: -inf}, token},
		{"greedy, presence penalty -inf", native.SamplingParams{PresencePenalty: -inf}, token},
		{"everything NaN", native.SamplingParams{Temperature: nan, TopP: nan, MinP: nan, RepeatPenalty: nan, FrequencyPenalty: nan,
			PresencePenalty: nan}, noToken},
		{"penalty window MaxInt32", native.SamplingParams{Temperature: 1, RepeatPenalty: 2, PenaltyLastN: math.MaxInt32}, token},
		{"penalty window MinInt32", native.SamplingParams{Temperature: 1, RepeatPenalty: 2, PenaltyLastN: math.MinInt32}, token},
		{"seed LLAMA_DEFAULT_SEED", native.SamplingParams{Temperature: 1, Seed: llamaDefaultSeed, HasSeed: true}, token},
	}
	forEachRig(t, func(t *testing.T, r *samplingRig) {
		vocab := int32(r.model.Info().VocabSize)
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				var toks []int32
				var errs []error
				r.do(func() {
					s := NewSampler(tc.p)
					defer s.Free()
					_, prompt := r.row(0)
					for _, tok := range prompt {
						s.Accept(tok)
					}
					for i := range 8 {
						out, _ := r.row(i)
						tok, err := s.Sample(r.ctx, out)
						toks, errs = append(toks, tok), append(errs, err)
					}
				})
				for i, err := range errs {
					switch {
					case err == nil && (toks[i] < 0 || toks[i] >= vocab):
						t.Errorf("sample %d: token %d outside the vocabulary", i, toks[i])
					case err != nil && !errors.Is(err, native.ErrNoValidToken):
						t.Errorf("sample %d: %v, want a token or native.ErrNoValidToken", i, err)
					case err != nil && toks[i] != -1:
						t.Errorf("sample %d: error %v with token %d, want -1", i, err, toks[i])
					case tc.want == token && err != nil:
						t.Errorf("sample %d: %v, want a token", i, err)
					case tc.want == noToken && err == nil:
						t.Errorf("sample %d: token %d, want native.ErrNoValidToken", i, toks[i])
					}
				}
				t.Logf("tokens %v", toks)
			})
		}
	})
}

// TestSampleAllocations checks that sampling a token allocates nothing.
func TestSampleAllocations(t *testing.T) {
	r := newSamplingRig(t)
	var allocs float64
	r.do(func() {
		s := NewSampler(native.SamplingParams{Temperature: 0.8, TopK: 40, TopP: 0.9, RepeatPenalty: 1.1, Seed: 1, HasSeed: true})
		defer s.Free()
		out, _ := r.row(0)
		allocs = testing.AllocsPerRun(50, func() {
			if _, err := s.Sample(r.ctx, out); err != nil {
				t.Error(err)
			}
		})
	})
	if allocs != 0 {
		t.Errorf("Sample allocates %v times per call", allocs)
	}
}

// TestSampleBadOutput samples from output indices the last decode computed
// no logits for: llama_get_logits_ith would abort the process there.
func TestSampleBadOutput(t *testing.T) {
	r := newSamplingRig(t)
	for _, i := range []int{-1, -100, r.rows[0] - 1, 1 << 20, math.MaxInt32 + 1} {
		var err error
		var logits []float32
		r.do(func() {
			s := NewSampler(native.SamplingParams{})
			defer s.Free()
			_, err = s.Sample(r.ctx, i)
			logits = r.ctx.Logits(i)
		})
		if !errors.Is(err, native.ErrNoLogits) {
			t.Errorf("Sample(%d) error = %v, want native.ErrNoLogits", i, err)
		}
		if logits != nil {
			t.Errorf("Logits(%d) returned %d values", i, len(logits))
		}
	}
}

func equal(a, b []int32) bool { return slices.Equal(a, b) }

// greedyReference is the greedy sampler alone on sanitized candidates, in
// Go: NaN counts as -inf, +inf as FLT_MAX, the first largest logit wins,
// and no finite logit is no token.
func greedyReference(logits []float32) int32 {
	best, bestL := int32(-1), float32(math.Inf(-1))
	for i, l := range logits {
		switch {
		case l != l:
			l = float32(math.Inf(-1))
		case math.IsInf(float64(l), 1):
			l = math.MaxFloat32
		}
		if l > bestL {
			best, bestL = int32(i), l
		}
	}
	if best < 0 {
		return kvSampleNoFinite
	}
	return best
}

// TestGreedyPick checks kv_greedy_pick, the greedy fast path, against the
// greedy sampler's rule on sanitized candidates, for the extremes and for
// random arrays sprinkled with them.
func TestGreedyPick(t *testing.T) {
	inf, nan := float32(math.Inf(1)), float32(math.NaN())
	tests := []struct {
		name   string
		logits []float32
		want   int32
	}{
		{"one", []float32{0}, 0},
		{"first of a tie", []float32{1, 3, 3, 2}, 1},
		{"NaN is never chosen", []float32{nan, -5, nan}, 1},
		{"all NaN", []float32{nan, nan}, kvSampleNoFinite},
		{"all -inf", []float32{-inf, -inf}, kvSampleNoFinite},
		{"+inf wins", []float32{1, inf, 2}, 1},
		{"FLT_MAX before +inf ties with it", []float32{math.MaxFloat32, inf}, 0},
		{"+inf before FLT_MAX", []float32{0, inf, math.MaxFloat32}, 1},
		{"-FLT_MAX is finite", []float32{-inf, -math.MaxFloat32}, 1},
		{"the last", []float32{-1, -2, 7}, 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := greedyPick(tc.logits); got != tc.want {
				t.Errorf("kv_greedy_pick = %d, want %d", got, tc.want)
			}
			if ref := greedyReference(tc.logits); ref != tc.want {
				t.Errorf("the reference = %d, want %d", ref, tc.want)
			}
		})
	}
	r := rand.New(rand.NewPCG(1, 2))
	special := []float32{nan, inf, -inf, math.MaxFloat32, -math.MaxFloat32, 0}
	for i := range 2000 {
		logits := make([]float32, 1+r.IntN(300))
		for j := range logits {
			logits[j] = float32(r.NormFloat64() * 4)
			if r.IntN(10) == 0 {
				logits[j] = special[r.IntN(len(special))]
			}
			if r.IntN(20) == 0 && j > 0 {
				logits[j] = logits[r.IntN(j)] // ties
			}
		}
		if got, want := greedyPick(logits), greedyReference(logits); got != want {
			t.Fatalf("array %d %v: kv_greedy_pick = %d, want %d", i, logits, got, want)
		}
	}
}
