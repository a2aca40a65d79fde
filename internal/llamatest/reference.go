// Package llamatest holds a plain greedy reference decoder on llama.cpp,
// one sequence per context, that the tests of the decode worker and the
// server compare their output with.
package llamatest

import (
	"context"
	"fmt"
	"github.com/kvgate/kvgate/native"
	"github.com/kvgate/kvgate/native/llama"
	"runtime"
)

// GreedyReference decodes prompt greedily for up to maxTokens tokens on a
// private context, one sequence and one token per step, taking the argmax of
// the logits in Go. It shares no code with the Engine's batching or
// sampling, so tests use it as an independent oracle. It stops at an
// end-of-generation token, which it does not return.
func GreedyReference(ctx context.Context, m *llama.Model, prompt []int32, maxTokens int) ([]int32, error) {
	toks, _, err := GreedyMargins(ctx, m, prompt, maxTokens)
	return toks, err
}

// GreedyMargins is GreedyReference that also returns, for every generated
// token, the gap between the best and the second-best logit: where it is
// tiny, floating-point rounding (a different order of summation over KV
// cells, say) can flip greedy decoding.
func GreedyMargins(ctx context.Context, m *llama.Model, prompt []int32, maxTokens int) ([]int32, []float32, error) {
	if maxTokens <= 0 {
		return nil, nil, fmt.Errorf("greedy reference: max tokens %d", maxTokens)
	}
	r, err := reference(ctx, m, prompt, maxTokens, nil)
	return r.toks, r.margins, err
}

// GreedyDeficits decodes prompt followed by tokens on a private context, the
// way GreedyReference does, and returns for every token how far its logit
// falls below the best logit of its step: 0 where it is the greedy choice.
// A continuation whose deficits are all tiny is greedy up to floating-point
// rounding; one with a large deficit anywhere is not greedy there. Unlike
// GreedyReference it does not stop at an end-of-generation token.
func GreedyDeficits(ctx context.Context, m *llama.Model, prompt, tokens []int32) ([]float32, error) {
	if len(tokens) == 0 {
		return nil, fmt.Errorf("greedy deficits: no tokens")
	}
	if i := m.ValidTokens(tokens); i >= 0 {
		return nil, fmt.Errorf("greedy deficits: %w: tokens[%d] = %d", native.ErrTokenOutOfRange, i, tokens[i])
	}
	r, err := reference(ctx, m, prompt, len(tokens), tokens)
	return r.deficits, err
}

// referenceResult is what one reference decode found.
type referenceResult struct {
	toks     []int32
	margins  []float32
	deficits []float32
}

// reference runs the reference decode on a goroutine locked to its OS
// thread, as every llama.cpp call for a context must be.
func reference(ctx context.Context, m *llama.Model, prompt []int32, n int, forced []int32) (referenceResult, error) {
	if len(prompt) == 0 {
		return referenceResult{}, fmt.Errorf("greedy reference: empty prompt")
	}
	if i := m.ValidTokens(prompt); i >= 0 {
		return referenceResult{}, fmt.Errorf("greedy reference: %w: prompt[%d] = %d", native.ErrTokenOutOfRange, i, prompt[i])
	}
	type result struct {
		r   referenceResult
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		r, err := greedy(ctx, m, prompt, n, forced)
		ch <- result{r, err}
	}()
	res := <-ch
	return res.r, res.err
}

// greedy decodes up to n tokens after prompt, one per step. With forced nil
// it follows the argmax and stops at end of generation; otherwise it feeds
// forced[i] at step i and records how far that token was below the best.
func greedy(ctx context.Context, m *llama.Model, prompt []int32, n int, forced []int32) (referenceResult, error) {
	var r referenceResult
	c, err := llama.NewContext(m, llama.ContextParams{Cells: len(prompt) + n, Batch: max(len(prompt), 1), MaxSequences: 1, Threads: 1, KVType: "f32"})
	if err != nil {
		return r, err
	}
	defer c.Close()
	b := native.NewBatch(max(len(prompt), 1))
	for i, t := range prompt {
		b.Add(t, i, 0, i == len(prompt)-1)
	}
	pos := len(prompt)
	for step := 0; step < n; step++ {
		if err := ctx.Err(); err != nil {
			return r, err
		}
		if err := c.Decode(b); err != nil {
			return r, fmt.Errorf("greedy reference: %w", err)
		}
		logits := c.Logits(b.Len() - 1)
		best, second := 0, -1
		for i, v := range logits {
			switch {
			case v > logits[best]:
				best, second = i, best
			case i != best && (second < 0 || v > logits[second]):
				second = i
			}
		}
		tok := int32(best)
		if forced != nil {
			tok = forced[step]
			r.deficits = append(r.deficits, logits[best]-logits[tok])
		} else if m.IsEOG(tok) {
			break
		}
		r.toks = append(r.toks, tok)
		if second >= 0 {
			r.margins = append(r.margins, logits[best]-logits[second])
		} else {
			r.margins = append(r.margins, 0)
		}
		b.Reset()
		b.Add(tok, pos, 0, true)
		pos++
	}
	return r, nil
}
