package native

import "math"

// Backend is the worker's view of one llama.cpp context: decode a batch, sample from its outputs, and edit the cache's
// sequences. Package native/llama implements it; the worker's tests use a
// fake that checks llama.cpp's rules. The worker calls every method on its
// own goroutine, locked to its OS thread, from the Open that created the
// backend to Close.
type Backend interface {
	// Cells returns the KV cells of the pool, after llama.cpp's padding.
	Cells() int
	// SequenceCells returns the most cells one sequence may hold: Cells in
	// one pool shared by every sequence (a unified cache), the size of a
	// stream where each sequence has a KV stream of its own.
	SequenceCells() int
	// BatchSize returns the most tokens one Decode may carry.
	BatchSize() int
	// Threads returns the CPU threads the backend decodes with.
	Threads() int
	// SetThreads sets the CPU threads of the next decodes (at least 1); the
	// worker calls it between decodes (llama_set_n_threads).
	SetThreads(n int)
	// Decode runs the model on b. An error wrapping ErrNoKVSlot leaves the
	// cache unchanged; any other error is a failed computation. An empty
	// batch is a no-op.
	Decode(b *Batch) error
	// Logprob computes the log-softmax of output out of the last Decode,
	// the model's raw distribution: the log-probability of tok, and the top
	// (at most MaxTopLogprobs) most likely tokens, most likely first and
	// ties by id, appended to dst.Top[:0].
	Logprob(out int, tok int32, top int, dst *TokenLogprob) error
	// NewSampler returns a sampler that draws from the outputs of the
	// backend's last Decode. The caller frees it.
	NewSampler(p SamplingParams) Sampler
	// SeqRemove removes sequence seq's tokens with positions in [p0, p1),
	// a negative bound being open. It returns false when a partial removal
	// is impossible. A cell is freed when its last sequence leaves it.
	SeqRemove(seq, p0, p1 int) bool
	// SeqCopy gives sequence dst the cells of src with positions in
	// [p0, p1). In a unified cache the cells are shared, not copied, and
	// no cell in the range may hold dst already. With a stream per
	// sequence, dst's stream becomes a copy of src's prefix [0, p1) (p0
	// must be 0 or open), and dst must hold no cells.
	SeqCopy(src, dst, p0, p1 int)
	// SeqPosMax returns the largest position of seq in the cache, or -1.
	SeqPosMax(seq int) int
	// Close frees the context.
	Close()
}

// Sampler draws a sequence's tokens.
type Sampler interface {
	// Accept records a token of the sequence, for penalties.
	Accept(tok int32)
	// Sample draws a token from output out of the last Decode. It fails
	// with ErrNoValidToken when the parameters leave nothing to draw.
	Sample(out int) (int32, error)
	// Free releases the sampler; it is idempotent.
	Free()
}

// GrammarCounter is implemented by a Sampler with a grammar that counts its
// lazy checks: the tokens drawn under the grammar, and those the grammar
// rejected at first (which took a whole-vocabulary mask). The worker adds
// them to EngineStats when the sampler is freed.
type GrammarCounter interface {
	GrammarCounts() (checked, resampled uint64)
}

// Vocab is what the worker needs of the model's vocabulary. Its methods
// are safe for concurrent use.
type Vocab interface {
	// ValidTokens returns the index of the first id outside the
	// vocabulary, or -1.
	ValidTokens(ids []int32) int
	// IsEOG reports whether tok ends generation.
	IsEOG(tok int32) bool
	// AppendPiece appends the text of tok to dst.
	AppendPiece(dst []byte, tok int32, renderSpecial, lstrip bool) []byte
}

// Batch is the tokens of one decode step, with one sequence id each. The
// worker fills it; Backend.Decode reads it. Its slices all have Len
// entries.
type Batch struct {
	Tokens []int32
	Pos    []int32
	Seq    []int32
	Logits []bool
	cap    int
	bad    bool
}

// NewBatch returns an empty batch for up to capacity tokens.
func NewBatch(capacity int) *Batch {
	return &Batch{
		Tokens: make([]int32, 0, capacity), Pos: make([]int32, 0, capacity),
		Seq: make([]int32, 0, capacity), Logits: make([]bool, 0, capacity), cap: capacity,
	}
}

// Len returns the number of tokens in the batch.
func (b *Batch) Len() int { return len(b.Tokens) }

// Cap returns the batch's capacity.
func (b *Batch) Cap() int { return b.cap }

// Reset empties the batch.
func (b *Batch) Reset() {
	b.Tokens, b.Pos, b.Seq, b.Logits = b.Tokens[:0], b.Pos[:0], b.Seq[:0], b.Logits[:0]
	b.bad = false
}

// Add appends a token of sequence seq at position pos. When logits is true,
// its logits are computed; Add returns the token's index in the batch, the
// output index to sample from. A position outside [0, MaxInt32) or a
// sequence id outside [0, MaxSequenceIDs) makes the batch invalid (Invalid):
// llama.cpp would assert on it. Add panics when the batch is full: the
// caller owns the batch's capacity.
func (b *Batch) Add(tok int32, pos, seq int, logits bool) int {
	i := len(b.Tokens)
	if i >= b.cap {
		panic("native: batch overflow")
	}
	if pos < 0 || pos >= math.MaxInt32 || seq < 0 || seq >= MaxSequenceIDs {
		b.bad = true
	}
	b.Tokens = append(b.Tokens, tok)
	b.Pos = append(b.Pos, int32(pos))
	b.Seq = append(b.Seq, int32(seq))
	b.Logits = append(b.Logits, logits)
	return i
}

// Invalid reports that an Add since the last Reset took a position or
// sequence id llama.cpp would not survive: a backend must refuse the batch.
func (b *Batch) Invalid() bool { return b.bad }
