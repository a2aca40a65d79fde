package native

import "math"

// Logprob gives the fake's outputs a made-up distribution: the token the
// fake model produces at output out has log-probability -0.5, and the top
// alternatives are that token, then ids counting up from 0 with
// log-probabilities falling by 1 each (skipping the produced token).
func (fb *fakeBackend) Logprob(out int, tok int32, top int, dst *TokenLogprob) error {
	if out < 0 || out >= len(fb.outputs) || fb.outputs[out] < 0 {
		fb.violate("Logprob(%d): the last decode computed no logits there (%d outputs)", out, len(fb.outputs))
		return ErrNoLogits
	}
	want := fb.outputs[out]
	lp := func(t int32) float32 {
		if t == want {
			return -0.5
		}
		return -1.5 - float32(t)
	}
	dst.Token, dst.Logprob, dst.Top = tok, lp(tok), dst.Top[:0]
	for t := int32(-1); len(dst.Top) < min(top, MaxTopLogprobs); t++ {
		switch {
		case t == -1:
			dst.Top = append(dst.Top, TopLogprob{Token: want, Logprob: lp(want)})
		case t != want:
			dst.Top = append(dst.Top, TopLogprob{Token: t, Logprob: lp(t)})
		}
	}
	if math.IsNaN(float64(dst.Logprob)) {
		return ErrNoValidToken
	}
	return nil
}
