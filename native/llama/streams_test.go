package llama

import (
	"errors"
	"math"
	"runtime"
	"testing"

	"github.com/kvgate/kvgate/native"
)

// onThread runs f on a goroutine locked to its OS thread, as every use of a
// context must be, and returns its errors.
func onThread(f func(check func(string, error))) []error {
	done := make(chan []error)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		var out []error
		defer func() { done <- out }()
		f(func(name string, err error) {
			if err != nil {
				out = append(out, errors.New(name+": "+err.Error()))
			}
		})
	}()
	return <-done
}

// TestStreamsContext checks a context with a KV stream per sequence: its
// sizes, that ids outside its n_seq_max (which llama.cpp GGML_ASSERTs on
// in every memory call of such a cache) are refused without reaching C,
// and that SeqCopy between streams, which llama.cpp can only do for whole
// streams, gives the copy exactly the prefix asked for, with the same
// next-token logits as recomputing it.
func TestStreamsContext(t *testing.T) {
	m := stories(t)
	errs := onThread(func(check func(string, error)) {
		c, err := NewContext(m, ContextParams{Cells: 1024, Batch: 64, MaxSequences: 4, Threads: 1, Streams: true})
		if err != nil {
			check("new context", err)
			return
		}
		defer c.Close()
		if c.Cells() != 1024 || c.SequenceCells() != 256 || !c.Streams() {
			check("sizes", errors.New("want 1024 cells in streams of 256"))
		}
		for _, seq := range []int{4, 5, 255, native.MaxSequenceIDs, -2, math.MaxInt32} {
			if c.SeqRemove(seq, -1, -1) {
				check("SeqRemove", errors.New("accepted an id outside the streams"))
			}
			c.SeqCopy(0, seq, -1, -1)
			c.SeqCopy(seq, 0, -1, -1)
			c.SeqKeep(seq)
			if c.SeqPosMax(seq) != -1 || c.SeqPosMin(seq) != -1 {
				check("SeqPos", errors.New("a position for an id outside the streams"))
			}
		}
		b := native.NewBatch(64)
		b.Add(1, 0, 4, true) // a valid id for the batch type, not for this context
		if err := c.Decode(b); !errors.Is(err, ErrInvalidBatch) {
			check("decode with sequence 4 of 4", errors.New("want ErrInvalidBatch, got "+errString(err)))
		}

		prompt, _ := m.Tokenize("Once upon a time, there was a little girl", true, false)
		n := len(prompt)
		// The reference: the whole prompt decoded in sequence 2.
		b.Reset()
		for i, tok := range prompt {
			b.Add(tok, i, 2, i == n-1)
		}
		if err := c.Decode(b); err != nil {
			check("decode the reference", err)
			return
		}
		want := append([]float32(nil), c.Logits(n-1)...)
		// Sequence 0 holds the prompt and more; sequence 1 gets a copy of
		// its first n-1 tokens and decodes the last one itself.
		b.Reset()
		for i, tok := range append(prompt, 500, 501) {
			b.Add(tok, i, 0, false)
		}
		if err := c.Decode(b); err != nil {
			check("decode sequence 0", err)
			return
		}
		c.SeqCopy(0, 1, 0, n-1)
		if got := c.SeqPosMax(1); got != n-2 {
			check("copy", errors.New("the copy does not end at the prefix"))
		}
		if c.SeqPosMax(0) != n+1 {
			check("copy", errors.New("the source changed"))
		}
		c.SeqCopy(0, 1, 3, 5) // a partial range cannot be copied between streams: a no-op
		if c.SeqPosMax(1) != n-2 || c.SeqPosMin(1) != 0 {
			check("partial copy", errors.New("changed the cache"))
		}
		b.Reset()
		b.Add(prompt[n-1], n-1, 1, true)
		if err := c.Decode(b); err != nil {
			check("decode after the copy", err)
			return
		}
		got := c.Logits(0)
		worst, arg, argWant := 0.0, 0, 0
		for i := range got {
			worst = math.Max(worst, math.Abs(float64(got[i]-want[i])))
			if got[i] > got[arg] {
				arg = i
			}
			if want[i] > want[argWant] {
				argWant = i
			}
		}
		if arg != argWant || worst > 1e-3 {
			check("logits after the copy", errors.New("differ from recomputing the prompt"))
			t.Logf("argmax %d, want %d; largest difference %g", arg, argWant, worst)
		}
		// The source's stream is untouched by the copy's decode.
		if c.SeqPosMax(0) != n+1 || c.SeqPosMax(1) != n-1 {
			check("after the copy's decode", errors.New("wrong positions"))
		}
	})
	for _, err := range errs {
		t.Error(err)
	}
}
