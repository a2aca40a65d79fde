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
	if len(prompt) == 0 || maxTokens <= 0 {
		return nil, fmt.Errorf("greedy reference: empty prompt or max tokens %d", maxTokens)
	}
	if i := m.ValidTokens(prompt); i >= 0 {
		return nil, fmt.Errorf("greedy reference: %w: prompt[%d] = %d", ErrTokenOutOfRange, i, prompt[i])
	}
	type result struct {
		toks []int32
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		toks, err := greedy(ctx, m, prompt, maxTokens)
		ch <- result{toks, err}
	}()
	r := <-ch
	return r.toks, r.err
}

func greedy(ctx context.Context, m *Model, prompt []int32, maxTokens int) ([]int32, error) {
	c, err := NewContext(m, ContextParams{Cells: len(prompt) + maxTokens, Batch: max(len(prompt), 1), MaxSequences: 1, Threads: 1})
	if err != nil {
		return nil, err
	}
	defer c.Close()
	b := NewBatch(max(len(prompt), 1))
	defer b.Free()
	for i, t := range prompt {
		b.Add(t, i, 0, i == len(prompt)-1)
	}
	var out []int32
	pos := len(prompt)
	for len(out) < maxTokens {
		if err := ctx.Err(); err != nil {
			return out, err
		}
		if err := c.Decode(b); err != nil {
			return out, fmt.Errorf("greedy reference: %w", err)
		}
		logits := c.Logits(b.Len() - 1)
		best := 0
		for i, v := range logits {
			if v > logits[best] {
				best = i
			}
		}
		tok := int32(best)
		if m.IsEOG(tok) {
			break
		}
		out = append(out, tok)
		b.Reset()
		b.Add(tok, pos, 0, true)
		pos++
	}
	return out, nil
}
