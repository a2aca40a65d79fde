package native

import (
	"context"
	"fmt"
	"runtime"
)

// GreedyReference decodes prompt greedily for up to maxTokens tokens on a
// private context, one sequence and one token per step, taking the argmax of
// the logits in Go. It shares no code with the Engine's batching or
// sampling, so tests use it as an independent oracle. It stops at an
// end-of-generation token, which it does not return.
func GreedyReference(ctx context.Context, m *Model, prompt []int32, maxTokens int) ([]int32, error) {
	toks, _, err := GreedyMargins(ctx, m, prompt, maxTokens)
	return toks, err
}

// GreedyMargins is GreedyReference that also returns, for every generated
// token, the gap between the best and the second-best logit: where it is
// tiny, floating-point rounding (a different order of summation over KV
// cells, say) can flip greedy decoding.
func GreedyMargins(ctx context.Context, m *Model, prompt []int32, maxTokens int) ([]int32, []float32, error) {
	if len(prompt) == 0 || maxTokens <= 0 {
		return nil, nil, fmt.Errorf("greedy reference: empty prompt or max tokens %d", maxTokens)
	}
	if i := m.ValidTokens(prompt); i >= 0 {
		return nil, nil, fmt.Errorf("greedy reference: %w: prompt[%d] = %d", ErrTokenOutOfRange, i, prompt[i])
	}
	type result struct {
		toks    []int32
		margins []float32
		err     error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		toks, margins, err := greedy(ctx, m, prompt, maxTokens)
		ch <- result{toks, margins, err}
	}()
	r := <-ch
	return r.toks, r.margins, r.err
}

func greedy(ctx context.Context, m *Model, prompt []int32, maxTokens int) ([]int32, []float32, error) {
	c, err := NewContext(m, ContextParams{Cells: len(prompt) + maxTokens, Batch: max(len(prompt), 1), MaxSequences: 1, Threads: 1, KVType: "f32"})
	if err != nil {
		return nil, nil, err
	}
	defer c.Close()
	b := NewBatch(max(len(prompt), 1))
	defer b.Free()
	for i, t := range prompt {
		b.Add(t, i, 0, i == len(prompt)-1)
	}
	var out []int32
	var margins []float32
	pos := len(prompt)
	for len(out) < maxTokens {
		if err := ctx.Err(); err != nil {
			return out, margins, err
		}
		if err := c.Decode(b); err != nil {
			return out, margins, fmt.Errorf("greedy reference: %w", err)
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
		if m.IsEOG(tok) {
			break
		}
		out = append(out, tok)
		if second >= 0 {
			margins = append(margins, logits[best]-logits[second])
		} else {
			margins = append(margins, 0)
		}
		b.Reset()
		b.Add(tok, pos, 0, true)
		pos++
	}
	return out, margins, nil
}
