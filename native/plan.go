package native

import (
	"math"

	"github.com/kvgate/kvgate/native/cellmap"
)

// The cell map's sequence ids are llama.cpp's.
var _ [MaxSequenceIDs - cellmap.Sequences]struct{}
var _ [cellmap.Sequences - MaxSequenceIDs]struct{}

// planner decides each step's batch and how a sequence's cells leave the
// cache. There are two: plainPlanner, and orderedPlanner for deterministic
// mode (EngineConfig.Deterministic). All methods run on the worker.
type planner interface {
	// fill builds the step's batch in the engine's batch, at most budget
	// tokens, from the active sequences: one token for each decoding
	// sequence, then prefill chunks. It returns false when nothing can run.
	fill(e *Engine, budget int) bool
	// decoded learns the outcome of the Decode of the batch fill built.
	decoded(e *Engine, err error)
	// release takes seq's cells out of the cache when the sequence is done
	// with them.
	release(e *Engine, seq int)
	// remove removes seq's cells at once: an eviction, or stale cells.
	remove(e *Engine, seq int)
	// idle runs when no sequence is running or paused.
	idle(e *Engine)
	// produced notes that the sequence under seq sampled a token; forget
	// that it left the batch (ended or preempted).
	produced(seq int)
	forget(seq int)
}

// plainPlanner places tokens wherever llama.cpp puts them.
type plainPlanner struct{}

func (plainPlanner) fill(e *Engine, budget int) bool {
	b := e.w.b
	b.Reset()
	for _, s := range e.w.active {
		s.out, s.chunk = -1, 0
		if s.state == stateDecode {
			s.out = b.Add(s.next, s.nPast, s.seq, true)
		}
	}
	for _, s := range e.w.active {
		if s.state != statePrefill {
			continue
		}
		room := budget - b.Len()
		if room <= 0 {
			break
		}
		n := min(room, len(s.toks)-s.nPast)
		last := s.nPast+n == len(s.toks)
		for i := range n {
			idx := b.Add(s.toks[s.nPast+i], s.nPast+i, s.seq, last && i == n-1)
			if last && i == n-1 {
				s.out = idx
			}
		}
		s.chunk = n
	}
	return true
}

func (plainPlanner) decoded(*Engine, error)     {}
func (plainPlanner) release(e *Engine, seq int) { e.w.be.SeqRemove(seq, -1, -1) }
func (plainPlanner) remove(e *Engine, seq int)  { e.w.be.SeqRemove(seq, -1, -1) }
func (plainPlanner) idle(*Engine)               {}
func (plainPlanner) produced(int)               {}
func (plainPlanner) forget(int)                 {}

// holdState is what an orderedPlanner tracks of one sequence id.
type holdState struct {
	held  int  // steps in a row the sequence was held back
	skip  bool // held back this step
	force bool // may break its cell order this step, to make progress
	moves int  // times recomputed to keep order since its last token
}

// orderedPlanner keeps every sequence's cells in position order (see
// EngineConfig.Deterministic) by mirroring llama.cpp's cell placement.
type orderedPlanner struct {
	cmap       *cellmap.Map
	order      []*sequence
	bseq, bpos []int32
	placed     []int32
	outputs    int
	padIdx     int
	hold       [MaxSequenceIDs]holdState
}

func newOrderedPlanner(cells, batch, maxSeqs int) *orderedPlanner {
	return &orderedPlanner{
		cmap:   cellmap.New(cells, min(batch, 512)),
		order:  make([]*sequence, 0, maxSeqs),
		bseq:   make([]int32, 0, batch),
		bpos:   make([]int32, 0, batch),
		placed: make([]int32, 0, batch),
		padIdx: -1,
	}
}

// remove removes seq's tokens from the cache and from the mirror.
func (o *orderedPlanner) remove(e *Engine, seq int) {
	e.w.be.SeqRemove(seq, -1, -1)
	o.cmap.Remove(seq)
}

// release moves seq's cells to RetiredSequence instead of freeing them
// (seq_cp then seq_rm frees nothing and leaves llama.cpp's head alone), so
// that no hole opens below a running sequence.
func (o *orderedPlanner) release(e *Engine, seq int) {
	if o.cmap.MaxCell[seq] >= 0 {
		e.w.be.SeqCopy(seq, RetiredSequence, -1, -1)
		o.cmap.CopyPrefix(seq, RetiredSequence, math.MaxInt32)
	}
	o.remove(e, seq)
}

// retired reports whether RetiredSequence holds cells.
func (o *orderedPlanner) retired() bool { return o.cmap.MaxCell[RetiredSequence] >= 0 }

// idle frees the retired cells: nothing runs that a hole could disorder.
func (o *orderedPlanner) idle(e *Engine) {
	if o.retired() {
		o.remove(e, RetiredSequence)
	}
}

func (o *orderedPlanner) produced(seq int) { o.hold[seq].moves = 0 }
func (o *orderedPlanner) forget(seq int)   { o.hold[seq] = holdState{} }

// put adds a token to the batch and to the record of its sequences and
// positions.
func (o *orderedPlanner) put(b *Batch, tok int32, pos, seq int, logits bool) int {
	o.bseq = append(o.bseq, int32(seq))
	o.bpos = append(o.bpos, int32(pos))
	if logits {
		o.outputs++
	}
	return b.Add(tok, pos, seq, logits)
}

// build fills the batch, leaving out sequences held back this step. It puts
// each sequence's tokens together, the sequences whose highest cell is
// lowest first (new ones, with no cells, lead: they may fill holes below
// everyone else), and pads the batch to two tokens and, if any token asks
// for logits, two outputs.
func (o *orderedPlanner) build(e *Engine, budget int) {
	b := e.w.b
	b.Reset()
	o.order = o.order[:0]
	room := budget
	for _, s := range e.w.active {
		s.out, s.chunk = -1, 0
		if !o.hold[s.seq].skip && s.state == stateDecode {
			room--
			o.order = append(o.order, s)
		}
	}
	for _, s := range e.w.active {
		if o.hold[s.seq].skip || s.state != statePrefill || room <= 0 {
			continue
		}
		s.chunk = min(room, len(s.toks)-s.nPast)
		room -= s.chunk
		o.order = append(o.order, s)
	}
	top := func(s *sequence) int32 { return o.cmap.MaxCell[s.seq] }
	for i := 1; i < len(o.order); i++ {
		for j := i; j > 0 && top(o.order[j]) < top(o.order[j-1]); j-- {
			o.order[j], o.order[j-1] = o.order[j-1], o.order[j]
		}
	}
	o.bseq, o.bpos, o.outputs, o.padIdx = o.bseq[:0], o.bpos[:0], 0, -1
	for _, s := range o.order {
		if s.state == stateDecode {
			s.out = o.put(b, s.next, s.nPast, s.seq, true)
			continue
		}
		last := s.nPast+s.chunk == len(s.toks)
		for i := range s.chunk {
			out := last && i == s.chunk-1
			if idx := o.put(b, s.toks[s.nPast+i], s.nPast+i, s.seq, out); out {
				s.out = idx
			}
		}
	}
	if n := b.Len(); n > 0 && (n < 2 || o.outputs == 1) {
		o.padIdx = o.put(b, 0, 0, PadSequence, true)
	}
}

// fill builds the batch and places it on the mirror of llama.cpp's cells:
// it holds back every sequence whose tokens would land below cells it
// already holds, until the rest fits in order. A sequence held HoldLimit
// steps in a row, or one whose hold would leave the step empty, is
// recomputed from its first token, which lets it go wherever there is
// room; one that still cannot go anywhere in order runs out of order
// (counted in Disordered) so that the engine never stalls.
func (o *orderedPlanner) fill(e *Engine, budget int) bool {
	for _, s := range e.w.active {
		h := &o.hold[s.seq]
		h.skip, h.force = false, false
		if h.held >= HoldLimit && o.cmap.MaxCell[s.seq] >= 0 && h.moves < MoveLimit {
			o.relocate(e, s)
		}
	}
	for {
		o.build(e, budget)
		if e.w.b.Len() == 0 {
			// Everyone is held: free the one held longest.
			var v *sequence
			for _, s := range e.w.active {
				if o.hold[s.seq].skip && (v == nil || o.hold[s.seq].held > o.hold[v.seq].held) {
					v = s
				}
			}
			if v == nil {
				return false
			}
			h := &o.hold[v.seq]
			h.skip = false
			if o.cmap.MaxCell[v.seq] >= 0 && h.moves < MoveLimit {
				o.relocate(e, v)
			} else {
				h.force = true
				e.disordered.Add(1)
			}
			continue
		}
		o.cmap.Mark()
		var broken cellmap.SeqSet
		var fits bool
		o.placed, fits = o.cmap.Place(o.bseq, o.bpos, o.placed[:0], PadSequence, &broken)
		if !fits && o.retired() {
			// The allocator counts retired cells as free: free them now.
			o.cmap.Rollback()
			o.remove(e, RetiredSequence)
			continue
		}
		if !fits {
			break // llama.cpp will say so too; the step shrinks
		}
		held := false
		for _, s := range e.w.active {
			h := &o.hold[s.seq]
			if h.skip || h.force || !broken.Has(s.seq) {
				continue
			}
			if h.moves >= MoveLimit && h.held >= HoldLimit {
				h.force = true // recomputed often enough: go on out of order
				e.disordered.Add(1)
				continue
			}
			h.skip, held = true, true
		}
		if !held {
			break
		}
		o.cmap.Rollback()
	}
	for _, s := range e.w.active {
		h := &o.hold[s.seq]
		switch {
		case h.skip:
			h.held++
			e.held.Add(1)
		case s.out >= 0 || s.chunk > 0:
			h.held = 0
		}
	}
	return true
}

// decoded rolls the mirror back when llama.cpp refused the batch, and
// removes the padding token.
func (o *orderedPlanner) decoded(e *Engine, err error) {
	if err != nil {
		o.cmap.Rollback()
	}
	if o.padIdx >= 0 {
		o.remove(e, PadSequence)
		e.padded.Add(1)
	}
}

// relocate drops s's cells and sends it back to prefill: it recomputes its
// prompt and generated tokens (bit-identically) in whatever cells are free,
// which keeps them in order. The allocator keeps its cells counted; it
// does not commit its tokens again.
func (o *orderedPlanner) relocate(e *Engine, s *sequence) {
	// Freed, not retired: s's own recompute, which goes first in the
	// batch, is what fills these cells.
	o.remove(e, s.seq)
	s.nPast, s.state = 0, statePrefill
	h := &o.hold[s.seq]
	h.held = 0
	h.moves++
	e.relocated.Add(1)
}
