package llama

import (
	"errors"
	"github.com/kvgate/kvgate/native"
	"github.com/kvgate/kvgate/native/cellmap"
	"math/rand/v2"
	"slices"
	"testing"
)

// TestCellMapMatchesLlama drives llama.cpp and the cell map through the same
// random decodes, removals and prefix copies, and checks after every one
// that each sequence's cells hold the same positions in the same cell order
// in both, and that both agree on when a batch does not fit. The second
// configuration's batches run to more than one 512-token ubatch.
func TestCellMapMatchesLlama(t *testing.T) {
	m := stories(t)
	configs := []struct {
		cells, batch, seeds, ops int
	}{
		{cells: 256, batch: 48, seeds: 4, ops: 300},
		{cells: 2048, batch: 800, seeds: 1, ops: 150},
	}
	for _, cfg := range configs {
		for seed := range uint64(cfg.seeds) {
			r := rand.New(rand.NewPCG(seed, 11))
			const seqs = 8
			c, err := NewContext(m, ContextParams{Cells: cfg.cells, Batch: cfg.batch, MaxSequences: seqs, Threads: 1})
			if err != nil {
				t.Fatal(err)
			}
			cm := cellmap.New(c.Cells(), min(c.BatchSize(), 512))
			b := native.NewBatch(cfg.batch)
			next := make([]int, seqs) // next position of each sequence
			var bs, bp, cells []int32
			inOrder := make([]bool, seqs) // each sequence's cells ascend in position (a copy inherits its source's order)
			var broken cellmap.SeqSet
			ops := map[string]int{}
			for op := range cfg.ops {
				broken = cellmap.SeqSet{} // only a decode breaks order
				decoded := false
				switch k := r.IntN(10); {
				case k < 5: // decode tokens of a few sequences, interleaved
					b.Reset()
					bs, bp = bs[:0], bp[:0]
					take := make([]int, seqs)
					for range 1 + r.IntN(cfg.batch-8) {
						s := r.IntN(seqs)
						tok := int32(3 + r.IntN(500))
						b.Add(tok, next[s]+take[s], s, false)
						bs, bp = append(bs, int32(s)), append(bp, int32(next[s]+take[s]))
						take[s]++
					}
					cm.Mark()
					var fits bool
					broken = cellmap.SeqSet{}
					cells, fits = cm.Place(bs, bp, cells[:0], -1, &broken)
					err := c.Decode(b)
					switch {
					case err == nil && fits:
						for s := range next {
							next[s] += take[s]
						}
						decoded = true
						if len(bs) > 512 {
							ops["decode of two ubatches"]++
						}
						ops["decode"]++
					case errors.Is(err, ErrNoKVSlot) && !fits:
						cm.Rollback()
						broken = cellmap.SeqSet{}
						ops["no slot"]++
					default:
						t.Fatalf("seed %d op %d: llama.cpp says %v, the cell map says fits=%v", seed, op, err, fits)
					}
				case k < 7: // a sequence leaves
					s := r.IntN(seqs)
					c.SeqRemove(s, -1, -1)
					cm.Remove(s)
					next[s] = 0
					ops["remove"]++
				default: // an empty sequence shares another's prefix
					src, dst := r.IntN(seqs), r.IntN(seqs)
					if src == dst || next[src] < 2 {
						continue
					}
					c.SeqRemove(dst, -1, -1) // copies go into an empty sequence
					cm.Remove(dst)
					n := 1 + r.IntN(next[src]-1)
					c.SeqCopy(src, dst, 0, n)
					cm.CopyPrefix(src, dst, n)
					next[dst] = n
					ops["copy"]++
				}
				for s := range seqs {
					want := cm.Ordered(s)
					if len(want) == 0 {
						if c.SeqPosMax(s) >= 0 {
							t.Fatalf("seed %d op %d: seq %d has cells in llama.cpp, none in the map", seed, op, s)
						}
						inOrder[s] = true
						continue
					}
					got, err := c.cellOrder(s)
					if err != nil {
						t.Fatal(err)
					}
					if !slices.Equal(got, want) {
						t.Fatalf("seed %d op %d: seq %d positions in cell order: llama.cpp %v, map %v", seed, op, s, got, want)
					}
					// place flags exactly the sequences a batch puts out of order.
					ascending := slices.IsSorted(got)
					if decoded && inOrder[s] && ascending == broken.Has(s) {
						t.Fatalf("seed %d op %d: seq %d: in order %v, but place flagged it broken: %v", seed, op, s, ascending, broken.Has(s))
					}
					inOrder[s] = ascending
					if !ascending {
						ops["out of order"]++
					}
				}
			}
			c.Close()
			t.Logf("%d cells, batch %d, seed %d: %v", cfg.cells, cfg.batch, seed, ops)
			if cfg.batch > 512 && ops["decode of two ubatches"] == 0 {
				t.Errorf("no batch ran to two ubatches: %v", ops)
			}
			if ops["no slot"] == 0 || ops["copy"] == 0 || ops["out of order"] == 0 {
				t.Errorf("seed %d: the run never hit a full cache or a prefix copy: %v", seed, ops)
			}
		}
	}
}
