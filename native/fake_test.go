package native

import (
	"errors"
	"fmt"
	"math"
	"math/bits"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"
)

// This file holds the worker's test doubles: a Backend that simulates
// llama.cpp's unified KV cache and checks the rules llama.cpp enforces (by
// refusing a batch or by asserting), a Sampler whose draws depend on what
// the cache holds, and a small Vocab. They are written from llama.cpp's
// behaviour (llama-kv-cache.cpp, llama-batch.cpp), not from the worker or
// package native/cellmap, so that the tests are not circular.

// The fake vocabulary: fakeVocabSize tokens, of which fakeEOG ends
// generation; token i reads "t<i> ".
const (
	fakeVocabSize       = 64
	fakeEOG       int32 = 0
)

// fakePhantomSeq is the sequence id of cells a test occupies behind the
// allocator's back (fakeBackend.occupy), so that llama.cpp's pool is
// smaller than the allocator believes.
const fakePhantomSeq = 200

// fakeVocab is the Vocab of the fake model.
type fakeVocab struct{}

func (fakeVocab) ValidTokens(ids []int32) int {
	for i, t := range ids {
		if t < 0 || t >= fakeVocabSize {
			return i
		}
	}
	return -1
}

func (fakeVocab) IsEOG(tok int32) bool { return tok == fakeEOG }

func (fakeVocab) AppendPiece(dst []byte, tok int32, _, _ bool) []byte {
	if tok < 0 || tok >= fakeVocabSize {
		return dst
	}
	dst = append(dst, 't')
	dst = strconv.AppendInt(dst, int64(tok), 10)
	return append(dst, ' ')
}

// fakePiece returns the text of tok.
func fakePiece(tok int32) string { return string(fakeVocab{}.AppendPiece(nil, tok, false, false)) }

// fakeNext is the fake model: the token that follows content, the tokens
// of a sequence at positions 0, 1, ... in order. It is a hash of all of
// them, so that a sequence that sees a cell of another, misses one of its
// own, or sees them at the wrong positions draws other tokens.
func fakeNext(content []int32) int32 {
	h := uint64(14695981039346656037)
	for _, t := range content {
		h ^= uint64(uint32(t))
		h *= 1099511628211
	}
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	return int32(h % fakeVocabSize)
}

// soloRun returns what a request streams when it runs alone, computed with
// fakeNext and independently of the engine: the tokens (without a final
// end-of-generation token) and whether it ended on one. It is every
// stream's reference.
func soloRun(prompt []int32, maxTokens int, ignoreEOS bool) (toks []int32, eos bool) {
	content := slices.Clone(prompt)
	for len(toks) < maxTokens {
		t := fakeNext(content)
		if !ignoreEOS && t == fakeEOG {
			return toks, true
		}
		toks = append(toks, t)
		content = append(content, t)
	}
	return toks, false
}

// fakeSeqSet is a set of sequence ids in [0, MaxSequenceIDs).
type fakeSeqSet [MaxSequenceIDs / 64]uint64

func (s *fakeSeqSet) has(id int) bool { return s[id/64]&(1<<(id%64)) != 0 }
func (s *fakeSeqSet) add(id int)      { s[id/64] |= 1 << (id % 64) }
func (s *fakeSeqSet) del(id int)      { s[id/64] &^= 1 << (id % 64) }
func (s *fakeSeqSet) empty() bool     { return *s == fakeSeqSet{} }

// ids returns the ids in the set, in order.
func (s *fakeSeqSet) ids() []int {
	var out []int
	for w, bitsLeft := range s {
		for bitsLeft != 0 {
			b := bits.TrailingZeros64(bitsLeft)
			out = append(out, w*64+b)
			bitsLeft &^= 1 << b
		}
	}
	return out
}

// fakeCell is one KV cell: empty when pos is -1.
type fakeCell struct {
	pos  int32
	tok  int32
	seqs fakeSeqSet
}

// errFakeInvalidBatch is what the fake returns for a batch llama.cpp
// refuses with -1 (its checks in llama_batch_allocr::init).
var errFakeInvalidBatch = errors.New("fake llama_decode: invalid batch")

// errFakeCompute is a failed computation a test injects.
var errFakeCompute = errors.New("fake llama_decode: computation failed")

// fakeBackend simulates one llama.cpp context with a unified KV cache of a
// fixed number of cells, and records every breach of llama.cpp's rules as
// a violation (it runs on the worker goroutine, so it cannot fail the test
// itself; fakeBackend.check reports them). Its state is the worker's: a
// test reads it from the worker (hook, OnStep) or after Engine.Close.
type fakeBackend struct {
	cells   []fakeCell
	head    int
	used    int
	batch   int
	threads int // SetThreads
	// With clock set, each Decode moves it on by decodeCost(threads,
	// tokens), and byThreads counts the decodes at each thread count.
	clock      *fakeClock
	decodeCost func(threads, tokens int) time.Duration
	byThreads  map[int]int
	ubatch     int

	// hook, when set, runs at every Decode of a non-empty batch that
	// passed llama.cpp's checks, before the batch is placed, with the
	// number of such Decode calls so far (1 for the first); a non-nil
	// error is returned as the Decode's (wrap ErrNoKVSlot for a full
	// cache; the cache is left unchanged either way). It may block, to
	// hold the worker at a known point.
	hook func(call int, b *Batch) error
	// wrap, when set, replaces each sampler NewSampler makes, with its
	// number (0 for the first), so that a test can make one of them fail.
	wrap func(s Sampler, i int) Sampler

	calls   int   // Decode calls with a non-empty batch
	decoded int   // successful ones
	placed  []int // the cells the last successful Decode took, per token
	outputs []int32
	// copies counts SeqCopy calls between two sequences of the engine's
	// (neither retired, padding nor phantom): the sharing of a prompt by
	// the samples of a group, or of a cached prefix.
	copies   int
	samplers []*fakeSampler
	closed   bool

	violations []string
	// disorders counts, per sequence, the decodes after which the
	// sequence's cells were not in position order (padding and retired
	// cells aside).
	disorders map[int]int

	// Snapshot at Close: the cells holding a sequence of the engine's
	// (neither retired, padding nor phantom), and the cells held by
	// RetiredSequence only.
	liveAtClose, retiredAtClose int
}

// newFakeBackend returns a fake context of cells cells taking batches of
// up to batch tokens, split into ubatches as llama.cpp does (n_ubatch =
// min(batch, 512)).
func newFakeBackend(cells, batch int) *fakeBackend {
	fb := &fakeBackend{cells: make([]fakeCell, cells), batch: batch, ubatch: min(batch, 512), disorders: map[int]int{}}
	for i := range fb.cells {
		fb.cells[i].pos = -1
	}
	return fb
}

// violate records a breach of llama.cpp's rules.
func (fb *fakeBackend) violate(format string, args ...any) {
	if len(fb.violations) < 50 {
		fb.violations = append(fb.violations, fmt.Sprintf("decode %d: ", fb.calls)+fmt.Sprintf(format, args...))
	}
}

// check fails t with every violation recorded.
func (fb *fakeBackend) check(t testing.TB) {
	t.Helper()
	for _, v := range fb.violations {
		t.Errorf("llama.cpp rule broken: %s", v)
	}
}

// occupy fills the n lowest free cells with fakePhantomSeq, as if
// something outside the allocator held them. Call it before the engine
// starts.
func (fb *fakeBackend) occupy(n int) {
	p := int32(fb.posMax(fakePhantomSeq) + 1)
	for i := range fb.cells {
		if n == 0 {
			break
		}
		if c := &fb.cells[i]; c.pos < 0 {
			c.pos, c.tok = p, 1
			c.seqs.add(fakePhantomSeq)
			fb.used++
			fb.head = i + 1
			p++
			n--
		}
	}
}

func (fb *fakeBackend) Cells() int { return len(fb.cells) }

// Threads returns the thread count SetThreads last set (1 at first).
func (fb *fakeBackend) Threads() int { return max(fb.threads, 1) }

// SetThreads records n; the fake's decodes take no time either way.
func (fb *fakeBackend) SetThreads(n int) {
	if n < 1 {
		fb.violate("SetThreads(%d)", n)
	}
	fb.threads = n
}

// SequenceCells is Cells: the fake is a unified cache.
func (fb *fakeBackend) SequenceCells() int { return len(fb.cells) }
func (fb *fakeBackend) BatchSize() int     { return fb.batch }

// posMax is llama_memory_seq_pos_max.
func (fb *fakeBackend) posMax(seq int) int {
	m := -1
	for i := range fb.cells {
		if c := &fb.cells[i]; c.pos >= 0 && c.seqs.has(seq) {
			m = max(m, int(c.pos))
		}
	}
	return m
}

// findSlot is llama_kv_cache::find_slot for n tokens: starting at the
// head (or at cell 0 when the head lies more than 2n cells above the
// number of used cells), it takes the first n empty cells, wrapping at the
// end of the pool, and gives up after testing every cell once.
func (fb *fakeBackend) findSlot(n int) ([]int, bool) {
	size := len(fb.cells)
	if n > size {
		return nil, false
	}
	h := fb.head
	if h > fb.used+2*n {
		h = 0
	}
	var got []int
	for tested := 0; tested < size; tested++ {
		if h >= size {
			h = 0
		}
		if fb.cells[h].pos < 0 {
			got = append(got, h)
		}
		h++
		if len(got) == n {
			return got, true
		}
	}
	return nil, false
}

// content returns the tokens of seq at positions 0..pos, in position
// order, as the model attends to them; a missing or doubled position is a
// violation.
func (fb *fakeBackend) content(seq int, pos int32) []int32 {
	toks := make([]int32, pos+1)
	seen := make([]int, pos+1)
	for i := range fb.cells {
		c := &fb.cells[i]
		if c.pos >= 0 && c.pos <= pos && c.seqs.has(seq) {
			toks[c.pos] = c.tok
			seen[c.pos]++
		}
	}
	for p, n := range seen {
		if n != 1 {
			fb.violate("sequence %d holds position %d in %d cells at an output at position %d", seq, p, n, pos)
			break
		}
	}
	return toks
}

// Decode checks b as llama_batch_allocr::init does, places it one ubatch
// after another as llama_kv_cache::prepare and apply_ubatch do, and
// computes every requested output from the cache's content.
func (fb *fakeBackend) Decode(b *Batch) error {
	if fb.closed {
		fb.violate("Decode after Close")
		return errFakeInvalidBatch
	}
	n := b.Len()
	if n == 0 {
		return nil // llama.cpp is not called; the last outputs stay
	}
	fb.calls++
	if fb.clock != nil {
		fb.clock.advance(fb.decodeCost(fb.Threads(), n))
		if fb.byThreads == nil {
			fb.byThreads = map[int]int{}
		}
		fb.byThreads[fb.Threads()]++
	}
	fb.outputs = fb.outputs[:0]
	switch {
	case b.Invalid():
		fb.violate("the worker passed a batch Batch.Add marked invalid")
		return errFakeInvalidBatch
	case n > fb.batch:
		fb.violate("batch of %d tokens, n_batch is %d (GGML_ASSERT)", n, fb.batch)
		return errFakeInvalidBatch
	case len(b.Pos) != n || len(b.Seq) != n || len(b.Logits) != n:
		fb.violate("batch slices of lengths %d %d %d %d", n, len(b.Pos), len(b.Seq), len(b.Logits))
		return errFakeInvalidBatch
	}
	next := map[int]int32{}
	for i := range n {
		tok, pos, seq := b.Tokens[i], b.Pos[i], int(b.Seq[i])
		if tok < 0 || tok >= fakeVocabSize {
			fb.violate("token %d: id %d outside the vocabulary", i, tok)
			return errFakeInvalidBatch
		}
		if seq < 0 || seq >= MaxSequenceIDs {
			fb.violate("token %d: sequence id %d outside [0, %d)", i, seq, MaxSequenceIDs)
			return errFakeInvalidBatch
		}
		want, ok := next[seq]
		if !ok {
			want = int32(fb.posMax(seq) + 1)
		}
		if pos != want {
			fb.violate("token %d: sequence %d at position %d, want %d (positions must continue the cache: Y = X + 1)", i, seq, pos, want)
			return errFakeInvalidBatch
		}
		next[seq] = pos + 1
	}
	if fb.hook != nil {
		if err := fb.hook(fb.calls, b); err != nil {
			return err
		}
	}
	saved, savedHead, savedUsed := slices.Clone(fb.cells), fb.head, fb.used
	fb.placed = fb.placed[:0]
	for at := 0; at < n; at += fb.ubatch {
		end := min(n, at+fb.ubatch)
		slot, ok := fb.findSlot(end - at)
		if !ok {
			fb.cells, fb.head, fb.used = saved, savedHead, savedUsed
			return fmt.Errorf("fake llama_decode: %d tokens: %w", n, ErrNoKVSlot)
		}
		for k, ci := range slot {
			c := &fb.cells[ci]
			c.pos, c.tok = b.Pos[at+k], b.Tokens[at+k]
			c.seqs.add(int(b.Seq[at+k]))
			fb.used++
		}
		fb.placed = append(fb.placed, slot...)
		fb.head = slot[len(slot)-1] + 1
	}
	fb.decoded++
	for i := range n {
		t := int32(-1)
		if b.Logits[i] {
			t = fakeNext(fb.content(int(b.Seq[i]), b.Pos[i]))
		}
		fb.outputs = append(fb.outputs, t)
	}
	for seq := range next {
		if seq != PadSequence && seq != RetiredSequence && seq != fakePhantomSeq && !fb.ordered(seq) {
			fb.disorders[seq]++
		}
	}
	return nil
}

// ordered reports whether seq's cells, in cell order, hold increasing
// positions: the order flash attention sums them in.
func (fb *fakeBackend) ordered(seq int) bool {
	last := int32(-1)
	for i := range fb.cells {
		if c := &fb.cells[i]; c.pos >= 0 && c.seqs.has(seq) {
			if c.pos < last {
				return false
			}
			last = c.pos
		}
	}
	return true
}

// inRange reports whether pos lies in [p0, p1), negative bounds open.
func inRange(pos int32, p0, p1 int) bool {
	return (p0 < 0 || int(pos) >= p0) && (p1 < 0 || int(pos) < p1)
}

// SeqRemove is llama_kv_cache::seq_rm: seq (or every sequence, for -1)
// leaves the cells in the range; a cell left empty is freed, and the head
// moves down to the first freed cell.
func (fb *fakeBackend) SeqRemove(seq, p0, p1 int) bool {
	if fb.closed {
		fb.violate("SeqRemove after Close")
	}
	if seq < -1 || seq >= MaxSequenceIDs {
		fb.violate("SeqRemove of sequence %d (GGML_ASSERT)", seq)
		return false
	}
	newHead := len(fb.cells)
	for i := range fb.cells {
		c := &fb.cells[i]
		if c.pos < 0 || !inRange(c.pos, p0, p1) {
			continue
		}
		switch {
		case seq == -1:
			c.seqs = fakeSeqSet{}
		case c.seqs.has(seq):
			c.seqs.del(seq)
		default:
			continue
		}
		if c.seqs.empty() {
			c.pos, c.tok = -1, 0
			fb.used--
			newHead = min(newHead, i)
		}
	}
	if newHead < fb.head {
		fb.head = newHead
	}
	return true
}

// SeqCopy is llama_kv_cache::seq_cp in a unified cache: dst joins src's
// cells in the range. llama.cpp asserts that none of them holds dst.
func (fb *fakeBackend) SeqCopy(src, dst, p0, p1 int) {
	if fb.closed {
		fb.violate("SeqCopy after Close")
	}
	if src < 0 || src >= MaxSequenceIDs || dst < 0 || dst >= MaxSequenceIDs {
		fb.violate("SeqCopy(%d, %d) outside [0, %d) (GGML_ASSERT)", src, dst, MaxSequenceIDs)
		return
	}
	if src == dst {
		return
	}
	if src != RetiredSequence && dst != RetiredSequence && src != PadSequence && dst != PadSequence {
		fb.copies++
	}
	for i := range fb.cells {
		c := &fb.cells[i]
		if c.pos < 0 || !inRange(c.pos, p0, p1) || !c.seqs.has(src) {
			continue
		}
		if c.seqs.has(dst) {
			fb.violate("SeqCopy(%d, %d, %d, %d): cell %d (position %d) holds %d already (assert in seq_add)", src, dst, p0, p1, i, c.pos, dst)
		}
		c.seqs.add(dst)
	}
}

// SeqPosMax is llama_memory_seq_pos_max.
func (fb *fakeBackend) SeqPosMax(seq int) int {
	if fb.closed {
		fb.violate("SeqPosMax after Close")
	}
	if seq < 0 || seq >= MaxSequenceIDs {
		fb.violate("SeqPosMax of sequence %d (GGML_ASSERT)", seq)
		return -1
	}
	return fb.posMax(seq)
}

// NewSampler returns a sampler of the fake model.
func (fb *fakeBackend) NewSampler(p SamplingParams) Sampler {
	if fb.closed {
		fb.violate("NewSampler after Close")
	}
	s := &fakeSampler{fb: fb, p: p}
	fb.samplers = append(fb.samplers, s)
	if fb.wrap != nil {
		return fb.wrap(s, len(fb.samplers)-1)
	}
	return s
}

// Close records the cache's use and checks that every sampler was freed.
func (fb *fakeBackend) Close() {
	if fb.closed {
		fb.violate("Close twice")
		return
	}
	fb.closed = true
	for i, s := range fb.samplers {
		if !s.freed {
			fb.violate("sampler %d not freed at Close", i)
		}
	}
	for i := range fb.cells {
		c := &fb.cells[i]
		if c.pos < 0 {
			continue
		}
		live := false
		for _, id := range c.seqs.ids() {
			if id != RetiredSequence && id != PadSequence && id != fakePhantomSeq {
				live = true
			}
		}
		switch {
		case live:
			fb.liveAtClose++
		case c.seqs.has(RetiredSequence):
			fb.retiredAtClose++
		}
	}
}

// fakeSampler draws the token the last Decode computed for an output.
// With a positive temperature and a seed it draws a token that mixes the
// model's with the seed and its draw count, so that samplers of different
// seeds draw different tokens from the same logits, and samplers of one
// seed the same ones.
type fakeSampler struct {
	fb       *fakeBackend
	p        SamplingParams
	accepted int
	freed    bool
	draws    int
	// lastDecode and lastOut are the decode (fakeBackend.decoded) and
	// output of the sampler's last draw: several samplers may draw from
	// one output (llama.cpp allows it), one sampler only once.
	lastDecode, lastOut int
}

func (s *fakeSampler) Accept(int32) {
	if s.freed {
		s.fb.violate("Accept on a freed sampler")
	}
	s.accepted++
}

// Sample returns the output's token. An output the last Decode computed
// no logits for is a violation (llama.cpp aborts); a NaN temperature
// leaves nothing to draw, as in package native/llama.
func (s *fakeSampler) Sample(out int) (int32, error) {
	fb := s.fb
	if s.freed {
		fb.violate("Sample on a freed sampler")
	}
	if out < 0 || out >= len(fb.outputs) || fb.outputs[out] < 0 {
		fb.violate("Sample(%d): the last decode computed no logits there (%d outputs)", out, len(fb.outputs))
		return 0, ErrNoLogits
	}
	if s.draws > 0 && s.lastDecode == fb.decoded && s.lastOut == out {
		fb.violate("output %d sampled twice by one sampler", out)
	}
	s.draws++
	s.lastDecode, s.lastOut = fb.decoded, out
	if math.IsNaN(float64(s.p.Temperature)) {
		return 0, ErrNoValidToken
	}
	tok := fb.outputs[out]
	if s.p.Temperature > 0 && s.p.HasSeed {
		tok = fakeNext([]int32{tok, int32(s.p.Seed), int32(s.p.Seed >> 16), int32(s.draws)})
	}
	return tok, nil
}

func (s *fakeSampler) Free() { s.freed = true }

// fakeClock is a clock that only the fake backend's decodes move.
type fakeClock struct{ ns atomic.Int64 }

func (c *fakeClock) now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *fakeClock) advance(d time.Duration) { c.ns.Add(int64(d)) }
