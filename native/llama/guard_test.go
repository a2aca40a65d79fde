package llama

import (
	"errors"
	"github.com/kvgate/kvgate/native"
	"math"
	"runtime"
	"strings"
	"testing"
)

// TestContextGuards feeds a context the values that reach GGML_ASSERTs and
// asserts in llama.cpp's batch and memory code (see ASSERTS.md): each must
// come back as an error or a no-op, and the context must go on working.
func TestContextGuards(t *testing.T) {
	m := stories(t)
	type result struct {
		name string
		err  error
	}
	done := make(chan []result)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		var out []result
		check := func(name string, err error) { out = append(out, result{name, err}) }
		defer func() { done <- out }()
		c, err := NewContext(m, ContextParams{Cells: 256, Batch: 8, MaxSequences: 2, Threads: 1})
		if err != nil {
			check("new context", err)
			return
		}
		defer c.Close()
		b := native.NewBatch(16)
		wantInvalid := func(name string, fill func()) {
			b.Reset()
			fill()
			if err := c.Decode(b); !errors.Is(err, ErrInvalidBatch) {
				check(name, errors.New("decode did not fail with ErrInvalidBatch: "+errString(err)))
			}
			if c.SeqPosMax(0) != -1 {
				check(name, errors.New("the refused batch left cells behind"))
			}
		}
		wantInvalid("negative position", func() { b.Add(1, -1, 0, true) })
		wantInvalid("position past int32", func() { b.Add(1, math.MaxInt32+5, 0, true) })
		wantInvalid("negative sequence id", func() { b.Add(1, 0, -1, true) })
		wantInvalid("sequence id 256", func() { b.Add(1, 0, native.MaxSequenceIDs, true) })
		wantInvalid("sequence id past int32", func() { b.Add(1, 0, math.MaxInt32+1, true) })
		wantInvalid("token id outside the vocabulary", func() { b.Add(int32(m.Info().VocabSize), 0, 0, true) })
		wantInvalid("more tokens than n_batch", func() {
			for i := range 9 {
				b.Add(1, i, 0, i == 8)
			}
		})
		for _, seq := range []int{-2, math.MinInt32, native.MaxSequenceIDs, 1 << 40} {
			if c.SeqRemove(seq, -1, -1) {
				check("SeqRemove", errors.New("accepted a bad sequence id"))
			}
			c.SeqCopy(seq, 0, -1, -1)
			c.SeqCopy(0, seq, -1, -1)
			c.SeqKeep(seq)
			if c.SeqPosMin(seq) != -1 || c.SeqPosMax(seq) != -1 {
				check("SeqPos", errors.New("a position for a bad sequence id"))
			}
			if _, err := c.cellOrder(seq); err == nil {
				check("cellOrder", errors.New("accepted a bad sequence id"))
			}
		}
		// The context still decodes and samples.
		b.Reset()
		for i, tok := range []int32{1, 100, 200} {
			b.Add(tok, i, 0, i == 2)
		}
		if err := c.Decode(b); err != nil {
			check("decode after the refusals", err)
			return
		}
		c.SeqCopy(0, 1, 0, 1<<40) // a bound past int32 is clamped, not wrapped
		if c.SeqPosMax(1) != 2 {
			check("SeqCopy", errors.New("sequence 1 did not get the copied cells"))
		}
		s := NewSampler(native.SamplingParams{})
		defer s.Free()
		if _, err := s.Sample(c, 2); err != nil {
			check("sample after the refusals", err)
		}
		if _, err := s.Sample(c, 1); !errors.Is(err, native.ErrNoLogits) {
			check("sample a token without logits", errors.New("want native.ErrNoLogits, got "+errString(err)))
		}
	}()
	for _, r := range <-done {
		if r.err != nil {
			t.Errorf("%s: %v", r.name, r.err)
		}
	}
}

func errString(err error) string {
	if err == nil {
		return "nil"
	}
	return err.Error()
}

// TestVocabularyGuards checks the tokenizer and detokenizer bounds that keep
// llama.cpp from throwing through its C API.
func TestVocabularyGuards(t *testing.T) {
	m := stories(t)
	vocab := int32(m.Info().VocabSize)
	for _, tok := range []int32{-1, math.MinInt32, vocab, math.MaxInt32} {
		if got := m.AppendPiece([]byte("x"), tok, true, false); string(got) != "x" {
			t.Errorf("AppendPiece(%d) appended %q", tok, got[1:])
		}
	}
	if got := m.AppendPiece(nil, 300, false, false); len(got) == 0 {
		t.Error("AppendPiece of a valid token appended nothing")
	}
	tests := []struct {
		name    string
		text    string
		wantErr bool
	}{
		{"at the bound", strings.Repeat("a", 1<<10), false},
		{"invalid UTF-8", "\xff\xfe\xc3(\xe2\x28\xa1 \x00 once", false},
		{"characters outside the vocabulary", "日本語 🙂 \u0000 \U0010FFFF", false},
		{"past MaxTokenizeBytes", strings.Repeat("a", MaxTokenizeBytes+1), true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ids, err := m.Tokenize(tc.text, true, true)
			if (err != nil) != tc.wantErr {
				t.Fatalf("Tokenize error = %v, want error %v", err, tc.wantErr)
			}
			if i := m.ValidTokens(ids); i >= 0 {
				t.Fatalf("token %d = %d outside the vocabulary", i, ids[i])
			}
		})
	}
}
