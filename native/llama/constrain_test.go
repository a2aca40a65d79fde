package llama

import (
	"cmp"
	"errors"
	"math"
	"slices"
	"testing"

	"github.com/kvgate/kvgate/native"
)

// refLogSoftmax is the log-softmax of logits in float64, written
// independently of kv_logprobs: the test's reference.
func refLogSoftmax(logits []float32) []float64 {
	m := math.Inf(-1)
	for _, l := range logits {
		m = math.Max(m, float64(l))
	}
	sum := 0.0
	for _, l := range logits {
		sum += math.Exp(float64(l) - m)
	}
	lse := m + math.Log(sum)
	out := make([]float64, len(logits))
	for i, l := range logits {
		out[i] = float64(l) - lse
	}
	return out
}

// TestLogprobsMatchLogSoftmax checks Context.Logprob on real rows of logits
// against a log-softmax computed here from llama_get_logits_ith
// (Context.Logits): every value within 1e-4, all at most 0, the top N
// sorted with ties by id, and the top-1 alternative the greedy token.
func TestLogprobsMatchLogSoftmax(t *testing.T) {
	forEachRig(t, func(t *testing.T, r *samplingRig) {
		for _, top := range []int{0, 1, 5, native.MaxTopLogprobs} {
			for i := range r.rows {
				var lp native.TokenLogprob
				var greedy int32
				var err error
				var ref []float64
				out, _ := r.row(i)
				r.do(func() {
					s := NewSampler(native.SamplingParams{})
					defer s.Free()
					greedy, err = s.Sample(r.ctx, out)
					if err != nil {
						return
					}
					ref = refLogSoftmax(r.ctx.Logits(out))
					// A token other than the greedy one too, on odd rows.
					tok := greedy
					if i%2 == 1 {
						tok = int32(i*37) % int32(len(ref))
					}
					err = r.ctx.Logprob(out, tok, top, &lp)
				})
				if err != nil {
					t.Fatalf("row %d: %v", i, err)
				}
				if d := math.Abs(float64(lp.Logprob) - ref[lp.Token]); d > 1e-4 || lp.Logprob > 0 {
					t.Errorf("row %d: token %d logprob %v, reference %v", i, lp.Token, lp.Logprob, ref[lp.Token])
				}
				if len(lp.Top) != top {
					t.Fatalf("row %d: %d alternatives, want %d", i, len(lp.Top), top)
				}
				if top > 0 && lp.Top[0].Token != greedy {
					t.Errorf("row %d: top-1 %d, greedy %d", i, lp.Top[0].Token, greedy)
				}
				// The reference's own top N, ties by id.
				ids := make([]int32, len(ref))
				for k := range ids {
					ids[k] = int32(k)
				}
				slices.SortStableFunc(ids, func(a, b int32) int { return cmp.Compare(ref[b], ref[a]) })
				for k, alt := range lp.Top {
					if alt.Logprob > 0 || math.Abs(float64(alt.Logprob)-ref[alt.Token]) > 1e-4 {
						t.Errorf("row %d: alternative %d (%d) logprob %v, reference %v", i, k, alt.Token, alt.Logprob, ref[alt.Token])
					}
					if k > 0 && alt.Logprob > lp.Top[k-1].Logprob {
						t.Errorf("row %d: alternatives not sorted at %d: %v", i, k, lp.Top)
					}
					if alt.Token != ids[k] {
						t.Errorf("row %d: alternative %d is %d, the reference's is %d", i, k, alt.Token, ids[k])
					}
				}
			}
		}
	})
}

// TestLogitBias checks the logit-bias stage: a banned token (-inf) is never
// drawn in 1,000 draws at temperature 1, and a positive bias just larger
// than the gap between the greedy token and the runner-up, computed from
// the logits, makes the runner-up the greedy choice.
func TestLogitBias(t *testing.T) {
	forEachRig(t, func(t *testing.T, r *samplingRig) {
		out, _ := r.row(0)
		var logits []float32
		r.do(func() { logits = slices.Clone(r.ctx.Logits(out)) })
		best, second := int32(-1), int32(-1)
		for i, l := range logits {
			switch {
			case best < 0 || l > logits[best]:
				best, second = int32(i), best
			case second < 0 || l > logits[second]:
				second = int32(i)
			}
		}
		gap := logits[best] - logits[second]
		t.Run("ban", func(t *testing.T) {
			// Ban the 8 most likely tokens, the greedy one among them.
			ids := make([]int32, len(logits))
			for i := range ids {
				ids[i] = int32(i)
			}
			slices.SortFunc(ids, func(a, b int32) int { return cmp.Compare(logits[b], logits[a]) })
			banned := ids[:8]
			var bias []native.LogitBias
			for _, id := range banned {
				bias = append(bias, native.LogitBias{Token: id, Bias: float32(math.Inf(-1))})
			}
			var drawn []int32
			r.do(func() {
				s := r.model.NewSampler(native.SamplingParams{Temperature: 1, Seed: 7, HasSeed: true, LogitBias: bias})
				defer s.Free()
				for i := range 1000 {
					o, _ := r.row(i)
					tok, err := s.Sample(r.ctx, o)
					if err != nil {
						t.Errorf("draw %d: %v", i, err)
						return
					}
					drawn = append(drawn, tok)
				}
			})
			for i, tok := range drawn {
				if slices.Contains(banned, tok) {
					t.Fatalf("draw %d is banned token %d", i, tok)
				}
			}
			if len(drawn) != 1000 {
				t.Fatalf("%d draws", len(drawn))
			}
		})
		t.Run("greedy", func(t *testing.T) {
			var plain, biased int32
			r.do(func() {
				s := NewSampler(native.SamplingParams{})
				plain, _ = s.Sample(r.ctx, out)
				s.Free()
				s = r.model.NewSampler(native.SamplingParams{LogitBias: []native.LogitBias{{Token: second, Bias: gap + 0.5}}})
				biased, _ = s.Sample(r.ctx, out)
				s.Free()
			})
			if plain != best || biased != second {
				t.Fatalf("greedy %d (want %d), with a bias of %v on %d: %d", plain, best, gap+0.5, second, biased)
			}
		})
	})
}

// TestGrammarSampling draws whole outputs under a grammar from real logits
// (the rig's rows in turn), greedy and at temperature 1 over 20 seeds, and
// checks that each is a sentence of the grammar that ends with an
// end-of-generation token: the lazy check lets through only what the
// grammar allows, and masks the vocabulary when the drawn token is refused.
func TestGrammarSampling(t *testing.T) {
	grammars := []struct {
		name, gbnf string
		ok         func(string) bool
	}{
		{"yes or no", `root ::= "yes" | "no"`, func(s string) bool { return s == "yes" || s == "no" }},
		{"digits", `root ::= [0-9]{2,4} "!"`, func(s string) bool {
			n := len(s) - 1
			if n < 2 || n > 4 || s[n] != '!' {
				return false
			}
			for _, c := range s[:n] {
				if c < '0' || c > '9' {
					return false
				}
			}
			return true
		}},
	}
	forEachRig(t, func(t *testing.T, r *samplingRig) {
		for _, g := range grammars {
			for seed := range uint32(21) {
				p := native.SamplingParams{Temperature: 1, Seed: seed, HasSeed: true, Grammar: g.gbnf}
				if seed == 20 {
					p = native.SamplingParams{Grammar: g.gbnf} // greedy
				}
				var text []byte
				var err error
				ended := false
				drawn := uint64(0)
				var checked, resampled uint64
				r.do(func() {
					s := r.model.NewSampler(p)
					defer s.Free()
					defer func() { checked, resampled = s.GrammarCounts() }()
					for i := range 32 {
						out, _ := r.row(i)
						var tok int32
						if tok, err = s.Sample(r.ctx, out); err != nil {
							return
						}
						drawn++
						if r.model.IsEOG(tok) {
							ended = true
							return
						}
						text = r.model.AppendPiece(text, tok, false, false)
					}
				})
				// The story prompts' logits never favour these outputs: the
				// lazy check must have missed at least once, never more
				// often than it checked.
				if checked != drawn || resampled == 0 || resampled > checked {
					t.Errorf("%s, seed %d: %d drawn, %d checked, %d resampled", g.name, seed, drawn, checked, resampled)
				}
				if err != nil {
					t.Fatalf("%s, seed %d: %v", g.name, seed, err)
				}
				if !ended || !g.ok(string(text)) {
					t.Errorf("%s, seed %d (%+v): %q, ended %v", g.name, seed, p, text, ended)
				}
			}
		}
	})
}

// TestCheckGrammar checks that a grammar llama.cpp's parser refuses gives
// native.ErrBadGrammar, from CheckGrammar and from a sampler's Sample, and
// that a good one passes. (The parser prints its reason to stderr, out of
// kvgate's reach; internal/grammar gives the reason.)
func TestCheckGrammar(t *testing.T) {
	m := stories(t)
	tests := []struct {
		gbnf string
		ok   bool
	}{
		{`root ::= "yes" | "no"`, true},
		{`root ::= x`, false},
		{`root ::= "unterminated`, false},
		{`nope ::= "a"`, false},
		{"root ::= \"a\x00\"", false},
	}
	for _, tc := range tests {
		err := m.CheckGrammar(tc.gbnf)
		if tc.ok {
			if err != nil {
				t.Errorf("%q: %v", tc.gbnf, err)
			}
			continue
		}
		if !errors.Is(err, native.ErrBadGrammar) {
			t.Errorf("%q: %v, want ErrBadGrammar", tc.gbnf, err)
			continue
		}
		t.Logf("%q: %v", tc.gbnf, err)
		r := newSamplingRig(t)
		var serr error
		r.do(func() {
			s := r.model.NewSampler(native.SamplingParams{Grammar: tc.gbnf})
			defer s.Free()
			out, _ := r.row(0)
			_, serr = s.Sample(r.ctx, out)
		})
		if !errors.Is(serr, native.ErrBadGrammar) {
			t.Errorf("%q: Sample gave %v, want ErrBadGrammar", tc.gbnf, serr)
		}
	}
}
