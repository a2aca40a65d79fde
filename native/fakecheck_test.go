package native

import (
	"errors"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/kvgate/kvgate/native/cellmap"
)

// The fake backend's own tests: it must catch what llama.cpp refuses or
// asserts on, compute outputs from what the cache holds, and place tokens
// where llama.cpp does.

// decodeSeq decodes toks of sequence seq at positions from pos on, the last
// one with logits, and returns the error.
func decodeSeq(fb *fakeBackend, seq, pos int, toks ...int32) error {
	b := NewBatch(fb.batch)
	for i, t := range toks {
		b.Add(t, pos+i, seq, i == len(toks)-1)
	}
	return fb.Decode(b)
}

// TestFakeBackendRules checks that the fake records every breach of
// llama.cpp's rules, and none where there is none.
func TestFakeBackendRules(t *testing.T) {
	tests := []struct {
		name    string
		run     func(t *testing.T, fb *fakeBackend) error
		broken  bool  // a violation must be recorded
		wantErr error // the last call's error, when it returns one
	}{
		{"a sequence decoded in order", func(t *testing.T, fb *fakeBackend) error {
			if err := decodeSeq(fb, 3, 0, 5, 6, 7); err != nil {
				return err
			}
			return decodeSeq(fb, 3, 3, 8)
		}, false, nil},
		{"a gap after the cache", func(t *testing.T, fb *fakeBackend) error {
			if err := decodeSeq(fb, 3, 0, 5, 6); err != nil {
				return err
			}
			return decodeSeq(fb, 3, 3, 8)
		}, true, errFakeInvalidBatch},
		{"a new sequence starting past 0", func(t *testing.T, fb *fakeBackend) error {
			return decodeSeq(fb, 1, 2, 5)
		}, true, errFakeInvalidBatch},
		{"positions out of order in the batch", func(t *testing.T, fb *fakeBackend) error {
			b := NewBatch(8)
			b.Add(1, 0, 0, false)
			b.Add(2, 2, 0, false)
			b.Add(3, 1, 0, true)
			return fb.Decode(b)
		}, true, errFakeInvalidBatch},
		{"a sequence id past 255", func(t *testing.T, fb *fakeBackend) error {
			return decodeSeq(fb, MaxSequenceIDs, 0, 1)
		}, true, errFakeInvalidBatch},
		{"a token outside the vocabulary", func(t *testing.T, fb *fakeBackend) error {
			return decodeSeq(fb, 0, 0, fakeVocabSize)
		}, true, errFakeInvalidBatch},
		{"a batch over n_batch", func(t *testing.T, fb *fakeBackend) error {
			b := NewBatch(32)
			for i := range 17 {
				b.Add(1, i, 0, false)
			}
			return fb.Decode(b)
		}, true, errFakeInvalidBatch},
		{"a copy onto cells that hold dst", func(t *testing.T, fb *fakeBackend) error {
			if err := decodeSeq(fb, 0, 0, 1, 2); err != nil {
				return err
			}
			fb.SeqCopy(0, 1, 0, 2)
			fb.SeqCopy(0, 1, 1, 2)
			return nil
		}, true, nil},
		{"a copy then decoding on", func(t *testing.T, fb *fakeBackend) error {
			if err := decodeSeq(fb, 0, 0, 1, 2, 3); err != nil {
				return err
			}
			fb.SeqCopy(0, 1, 0, 2)
			if got := fb.SeqPosMax(1); got != 1 {
				t.Errorf("SeqPosMax after the copy = %d, want 1", got)
			}
			return decodeSeq(fb, 1, 2, 9)
		}, false, nil},
		{"a sample without logits", func(t *testing.T, fb *fakeBackend) error {
			if err := decodeSeq(fb, 0, 0, 1, 2); err != nil {
				return err
			}
			_, err := fb.NewSampler(SamplingParams{}).Sample(0)
			return err
		}, true, ErrNoLogits},
		{"a sample after a failed decode", func(t *testing.T, fb *fakeBackend) error {
			if err := decodeSeq(fb, 0, 0, 1, 2); err != nil {
				return err
			}
			_ = decodeSeq(fb, 0, 5, 3)
			_, err := fb.NewSampler(SamplingParams{}).Sample(1)
			return err
		}, true, ErrNoLogits},
		{"a sampler left unfreed", func(t *testing.T, fb *fakeBackend) error {
			fb.NewSampler(SamplingParams{})
			fb.Close()
			return nil
		}, true, nil},
		{"a cache too full", func(t *testing.T, fb *fakeBackend) error {
			fb.occupy(14)
			before := slices.Clone(fb.cells)
			err := decodeSeq(fb, 0, 0, 1, 2, 3)
			if !slices.Equal(before, fb.cells) {
				t.Error("a refused decode changed the cache")
			}
			return err
		}, false, ErrNoKVSlot},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fb := newFakeBackend(16, 16)
			err := tc.run(t, fb)
			if broken := len(fb.violations) > 0; broken != tc.broken {
				t.Errorf("violations %q, want some: %v", fb.violations, tc.broken)
			}
			if (err == nil) != (tc.wantErr == nil) || tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
				t.Errorf("err %v, want %v", err, tc.wantErr)
			}
		})
	}
}

// TestFakeBackendOutputs checks that an output is fakeNext of the
// sequence's content: its own cells at positions up to the token's, shared
// ones included.
func TestFakeBackendOutputs(t *testing.T) {
	fb := newFakeBackend(64, 16)
	if err := decodeSeq(fb, 0, 0, 4, 5, 6); err != nil {
		t.Fatal(err)
	}
	fb.SeqCopy(0, 1, 0, 2)
	b := NewBatch(16)
	b.Add(7, 3, 0, true)
	b.Add(9, 2, 1, true)
	if err := fb.Decode(b); err != nil {
		t.Fatal(err)
	}
	s := fb.NewSampler(SamplingParams{})
	defer s.Free()
	for out, content := range [][]int32{{4, 5, 6, 7}, {4, 5, 9}} {
		if got, err := s.Sample(out); err != nil || got != fakeNext(content) {
			t.Errorf("output %d: %d, %v; want fakeNext(%v) = %d", out, got, err, content, fakeNext(content))
		}
	}
	if len(fb.violations) > 0 {
		t.Error(fb.violations)
	}
}

// TestFakeBackendMatchesCellMap runs random batches, removals and copies on
// the fake and on package cellmap's mirror, which TestCellMapMatchesLlama
// checks against llama.cpp itself: the two, written independently, must
// put every token in the same cell.
func TestFakeBackendMatchesCellMap(t *testing.T) {
	for seed := range uint64(20) {
		r := rand.New(rand.NewPCG(seed, 31))
		cells, batch := 32+r.IntN(64), 4+r.IntN(28)
		fb := newFakeBackend(cells, batch)
		fb.ubatch = 1 + r.IntN(batch) // exercise several ubatches a batch
		m := cellmap.New(cells, fb.ubatch)
		const seqs = 6
		for op := range 300 {
			switch k := r.IntN(10); {
			case k < 6:
				b := NewBatch(batch)
				var bseq, bpos []int32
				for s := range seqs {
					if r.IntN(2) == 0 {
						continue
					}
					n := 1 + r.IntN(max(1, (batch-b.Len())/2))
					if b.Len()+n > batch {
						break
					}
					p := fb.posMax(s) + 1
					for i := range n {
						b.Add(int32(r.IntN(fakeVocabSize)), p+i, s, i == n-1)
						bseq, bpos = append(bseq, int32(s)), append(bpos, int32(p+i))
					}
				}
				if b.Len() == 0 {
					continue
				}
				m.Mark()
				var broken cellmap.SeqSet
				placed, fits := m.Place(bseq, bpos, nil, -1, &broken)
				err := fb.Decode(b)
				if !fits {
					m.Rollback()
				}
				if fits != (err == nil) {
					t.Fatalf("seed %d op %d: the map fits %v, the fake says %v", seed, op, fits, err)
				}
				if fits {
					got := make([]int32, len(fb.placed))
					for i, c := range fb.placed {
						got[i] = int32(c)
					}
					if !slices.Equal(got, placed) {
						t.Fatalf("seed %d op %d: the fake placed %v, the map %v", seed, op, got, placed)
					}
				}
			case k < 9:
				s := r.IntN(seqs)
				fb.SeqRemove(s, -1, -1)
				m.Remove(s)
			default:
				src, dst := r.IntN(seqs), r.IntN(seqs)
				if src == dst {
					continue
				}
				fb.SeqRemove(dst, -1, -1)
				m.Remove(dst)
				n := r.IntN(fb.posMax(src) + 2)
				fb.SeqCopy(src, dst, 0, n)
				m.CopyPrefix(src, dst, n)
			}
		}
		if len(fb.violations) > 0 {
			t.Fatalf("seed %d: %v", seed, fb.violations)
		}
	}
}
