package native

/*
#include <stdlib.h>
#include "llama_api.h"
*/
import "C"

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"runtime"
	"unsafe"
)

// Decode errors. llama_decode's return codes map onto these; errors.Is
// tells them apart.
var (
	// ErrNoKVSlot is llama_decode's return 1: no free KV cells for the
	// batch. The cache is left unchanged. With kvgate's allocator this is a
	// bug, never an expected outcome.
	ErrNoKVSlot = errors.New("llama_decode: no KV slot for the batch")
	// ErrDecodeAborted is llama_decode's return 2: the abort callback fired.
	ErrDecodeAborted = errors.New("llama_decode: aborted")
	// ErrInvalidBatch is llama_decode's return -1: the batch was rejected.
	ErrInvalidBatch = errors.New("llama_decode: invalid batch")
	// ErrCompute is any other negative return: the computation failed and
	// the processed ubatches stay in the cache.
	ErrCompute = errors.New("llama_decode: computation failed")
)

// DecodeError carries llama_decode's return code.
type DecodeError struct {
	Code int
	kind error
}

func (e *DecodeError) Error() string { return fmt.Sprintf("%v (code %d)", e.kind, e.Code) }

// Unwrap returns the sentinel for the code.
func (e *DecodeError) Unwrap() error { return e.kind }

func decodeError(rc int) error {
	switch {
	case rc == 0:
		return nil
	case rc == 1:
		return &DecodeError{Code: rc, kind: ErrNoKVSlot}
	case rc == 2:
		return &DecodeError{Code: rc, kind: ErrDecodeAborted}
	case rc == -1:
		return &DecodeError{Code: rc, kind: ErrInvalidBatch}
	default:
		return &DecodeError{Code: rc, kind: ErrCompute}
	}
}

// ContextParams configures a llama.cpp context.
type ContextParams struct {
	// Cells is the size of the KV-cell pool shared by all sequences. llama.cpp
	// pads it up to a multiple of 256; Context.Cells returns the result.
	Cells int
	// Batch is the most tokens one Decode may carry.
	Batch int
	// MaxSequences bounds the sequence ids in use (at most 256).
	MaxSequences int
	// Threads is the number of CPU threads; 0 means runtime.NumCPU().
	Threads int
	// KVType is the KV cache's element type, "f16" (the default) or "f32".
	KVType string
}

// MaxSequenceIDs is llama.cpp's LLAMA_MAX_SEQ: sequence ids of a unified
// cache lie in [0, 256).
const MaxSequenceIDs = 256

// Context is a llama.cpp context with a unified KV cache. It is not safe for
// concurrent use: create it, use it and close it on one goroutine locked to
// its OS thread (runtime.LockOSThread).
type Context struct {
	model *Model
	ptr   *C.struct_llama_context
	mem   C.llama_memory_t
	cells int
	batch int
	// cand is the candidate buffer for sampling: one llama_token_data per
	// vocabulary entry, allocated once in C memory.
	cand *C.llama_token_data
	// outputs[i] tells whether token i of the last successful Decode asked
	// for logits; it has that decode's token count. llama_get_logits_ith
	// aborts the process (GGML_ABORT: libllama is built without NDEBUG)
	// for any other index, so Logits and Sampler.Sample check it first.
	outputs []bool
}

// NewContext creates a context for m with kv_unified = true: one pool of
// cells for every sequence.
func NewContext(m *Model, p ContextParams) (*Context, error) {
	if p.Cells <= 0 || p.Batch <= 0 {
		return nil, fmt.Errorf("new context: cells (%d) and batch (%d) must be positive", p.Cells, p.Batch)
	}
	if p.MaxSequences <= 0 || p.MaxSequences > MaxSequenceIDs {
		return nil, fmt.Errorf("new context: max sequences %d outside [1, %d]", p.MaxSequences, MaxSequenceIDs)
	}
	threads := p.Threads
	if threads <= 0 {
		threads = runtime.NumCPU()
	}
	params := C.llama_context_default_params()
	params.n_ctx = C.uint32_t(p.Cells)
	params.n_batch = C.uint32_t(p.Batch)
	params.n_ubatch = C.uint32_t(min(p.Batch, 512))
	params.n_seq_max = C.uint32_t(p.MaxSequences)
	params.n_threads = C.int32_t(threads)
	params.n_threads_batch = C.int32_t(threads)
	params.kv_unified = C.bool(true)
	switch p.KVType {
	case "", "f16":
		params.type_k, params.type_v = 1, 1 // GGML_TYPE_F16
	case "f32":
		params.type_k, params.type_v = 0, 0 // GGML_TYPE_F32
	default:
		return nil, fmt.Errorf("new context: KV type %q: want f16 or f32", p.KVType)
	}
	params.no_perf = C.bool(true)
	C.kv_log_clear_error()
	ptr := C.llama_init_from_model(m.ptr, params)
	if ptr == nil {
		return nil, fmt.Errorf("new context: %s", lastLlamaError())
	}
	c := &Context{
		model: m,
		ptr:   ptr,
		mem:   C.llama_get_memory(ptr),
		cells: int(C.llama_n_ctx(ptr)),
		batch: int(C.llama_n_batch(ptr)),
	}
	if c.mem == nil {
		// Encoders (BERT and the like) have no KV memory: llama_decode
		// routes them to encode(), which asserts n_ubatch >= n_tokens, and
		// every memory call is a no-op.
		C.llama_free(ptr)
		return nil, fmt.Errorf("%w: %s (%s): the model keeps no KV memory (an encoder); it cannot generate",
			ErrModelUnsupported, m.path, m.info.Architecture)
	}
	c.outputs = make([]bool, 0, c.batch)
	c.cand = (*C.llama_token_data)(C.malloc(C.size_t(m.info.VocabSize) * C.size_t(unsafe.Sizeof(C.llama_token_data{}))))
	if c.cand == nil {
		C.llama_free(ptr)
		return nil, errors.New("new context: out of memory for the sampling buffer")
	}
	return c, nil
}

// Cells returns the number of KV cells, after llama.cpp's padding.
func (c *Context) Cells() int { return c.cells }

// BatchSize returns the most tokens one Decode may carry.
func (c *Context) BatchSize() int { return c.batch }

// Close frees the context. It is idempotent.
func (c *Context) Close() {
	if c.ptr != nil {
		C.llama_free(c.ptr)
		c.ptr = nil
	}
	if c.cand != nil {
		C.free(unsafe.Pointer(c.cand))
		c.cand = nil
	}
}

// Decode runs the model on b. See the Err* variables for its failures. A
// batch with more tokens than BatchSize, or one that Batch.Add marked
// invalid, fails with ErrInvalidBatch before llama.cpp sees it (llama_decode
// asserts n_tokens <= n_batch). An empty batch is a no-op that leaves the
// last decode's outputs as they are.
func (c *Context) Decode(b *Batch) error {
	n := int(b.b.n_tokens)
	if n == 0 {
		return nil
	}
	c.outputs = c.outputs[:0]
	if b.bad || n > c.batch || n > b.cap {
		return &DecodeError{Code: -1, kind: ErrInvalidBatch}
	}
	if err := decodeError(int(C.llama_decode(c.ptr, b.b))); err != nil {
		return err
	}
	for _, l := range unsafe.Slice((*int8)(unsafe.Pointer(b.b.logits)), n) {
		c.outputs = append(c.outputs, l != 0)
	}
	return nil
}

// hasOutput reports whether output i of the last Decode has logits.
func (c *Context) hasOutput(i int) bool { return i >= 0 && i < len(c.outputs) && c.outputs[i] }

// Logits returns the logits of output i of the last Decode, or nil when the
// last Decode computed none for i. The slice points into llama.cpp's memory
// and is valid until the next Decode.
func (c *Context) Logits(i int) []float32 {
	if !c.hasOutput(i) {
		return nil
	}
	p := C.llama_get_logits_ith(c.ptr, C.int32_t(i))
	if p == nil {
		return nil
	}
	return unsafe.Slice((*float32)(unsafe.Pointer(p)), c.model.info.VocabSize)
}

// validSeq reports whether seq is a sequence id llama.cpp's memory calls
// accept: they GGML_ASSERT 0 <= seq < LLAMA_MAX_SEQ.
func validSeq(seq int) bool { return seq >= 0 && seq < MaxSequenceIDs }

// clampPos converts a position bound for llama.cpp: negative stays -1
// (open, as llama.cpp reads it), and a bound past int32 becomes MaxInt32,
// above every position Batch.Add lets in.
func clampPos(p int) C.llama_pos {
	switch {
	case p < 0:
		return -1
	case p > math.MaxInt32:
		return math.MaxInt32
	}
	return C.llama_pos(p)
}

// SeqRemove removes sequence seq's tokens with positions in [p0, p1); a
// negative bound is open, and seq -1 means every sequence. It returns false
// when a partial removal is impossible, or when seq is outside [-1,
// MaxSequenceIDs), which it leaves alone. A cell is freed only when its last
// sequence leaves it.
func (c *Context) SeqRemove(seq, p0, p1 int) bool {
	if seq != -1 && !validSeq(seq) {
		return false
	}
	return bool(C.llama_memory_seq_rm(c.mem, C.llama_seq_id(seq), clampPos(p0), clampPos(p1)))
}

// SeqCopy adds sequence dst to the cells of src with positions in [p0, p1).
// In a unified cache nothing is copied: the cells are shared. Ids outside
// [0, MaxSequenceIDs) make it a no-op. No cell in the range may hold dst
// already: llama.cpp asserts that (assert(!seq[i].test(seq_id)) in
// llama_kv_cells::seq_add); a dst that holds no cells is always safe.
func (c *Context) SeqCopy(src, dst, p0, p1 int) {
	if !validSeq(src) || !validSeq(dst) {
		return
	}
	C.llama_memory_seq_cp(c.mem, C.llama_seq_id(src), C.llama_seq_id(dst), clampPos(p0), clampPos(p1))
}

// SeqKeep removes every sequence but seq. An id outside [0,
// MaxSequenceIDs) makes it a no-op.
func (c *Context) SeqKeep(seq int) {
	if validSeq(seq) {
		C.llama_memory_seq_keep(c.mem, C.llama_seq_id(seq))
	}
}

// SeqPosMin returns the smallest position of seq in the cache, or -1 (also
// for an id outside [0, MaxSequenceIDs)).
func (c *Context) SeqPosMin(seq int) int {
	if !validSeq(seq) {
		return -1
	}
	return int(C.llama_memory_seq_pos_min(c.mem, C.llama_seq_id(seq)))
}

// SeqPosMax returns the largest position of seq in the cache, or -1 (also
// for an id outside [0, MaxSequenceIDs)).
func (c *Context) SeqPosMax(seq int) int {
	if !validSeq(seq) {
		return -1
	}
	return int(C.llama_memory_seq_pos_max(c.mem, C.llama_seq_id(seq)))
}

// Clear empties the cache.
func (c *Context) Clear() { C.llama_memory_clear(c.mem, C.bool(false)) }

// Batch is a llama_batch of fixed capacity, reused across steps.
type Batch struct {
	b   C.struct_llama_batch
	cap int
	// bad is set by an Add that llama.cpp would not survive, until Reset;
	// Decode then refuses the batch.
	bad bool
}

// NewBatch allocates a batch for up to capacity tokens, one sequence id each.
// Free must be called.
func NewBatch(capacity int) *Batch {
	return &Batch{b: C.llama_batch_init(C.int32_t(capacity), 0, 1), cap: capacity}
}

// Len returns the number of tokens in the batch.
func (b *Batch) Len() int { return int(b.b.n_tokens) }

// Cap returns the batch's capacity.
func (b *Batch) Cap() int { return b.cap }

// Reset empties the batch.
func (b *Batch) Reset() { b.b.n_tokens, b.bad = 0, false }

// Add appends a token of sequence seq at position pos. When logits is true,
// its logits are computed; Add returns the token's index in the batch, which
// is the output index to sample from. A position outside [0, MaxInt32) or a
// sequence id outside [0, MaxSequenceIDs) makes the batch invalid: Decode
// refuses it. (llama.cpp checks token and sequence ids itself, but not
// negative positions, which break its cell bookkeeping's asserts.) Add
// panics when the batch is full: the caller owns the batch's capacity.
func (b *Batch) Add(tok int32, pos, seq int, logits bool) int {
	i := int(b.b.n_tokens)
	if i >= b.cap {
		panic("native: batch overflow")
	}
	if pos < 0 || pos >= math.MaxInt32 || !validSeq(seq) {
		b.bad = true
	}
	var l C.int8_t
	if logits {
		l = 1
	}
	C.kv_batch_set(&b.b, C.int32_t(i), C.llama_token(tok), C.llama_pos(pos), C.llama_seq_id(seq), l)
	b.b.n_tokens++
	return i
}

// Free releases the batch's memory. It is idempotent.
func (b *Batch) Free() {
	if b.cap > 0 {
		C.llama_batch_free(b.b)
		b.cap = 0
		b.b = C.struct_llama_batch{}
	}
}

// cellOrder returns the positions of seq's cells in cell order, read back
// from llama.cpp's state of the sequence (llama_state_seq_get_data writes a
// position and the sequence ids for every cell, in cell order, before the
// tensors). It copies the sequence's K and V too, so it is for tests.
func (c *Context) cellOrder(seq int) ([]int32, error) {
	if !validSeq(seq) {
		return nil, fmt.Errorf("cell order: sequence id %d outside [0, %d)", seq, MaxSequenceIDs)
	}
	n := C.llama_state_seq_get_size(c.ptr, C.llama_seq_id(seq))
	buf := make([]byte, int(n))
	if n == 0 {
		return nil, errors.New("cell order: empty state")
	}
	if got := C.llama_state_seq_get_data(c.ptr, (*C.uint8_t)(unsafe.Pointer(&buf[0])), n, C.llama_seq_id(seq)); got != n {
		return nil, fmt.Errorf("cell order: state of %d bytes, wrote %d", n, got)
	}
	u32 := func(at int) uint32 { return binary.LittleEndian.Uint32(buf[at:]) }
	if len(buf) < 8 || u32(0) != 1 {
		return nil, fmt.Errorf("cell order: want one stream, state starts %x", buf[:min(8, len(buf))])
	}
	count := int(u32(4))
	out := make([]int32, 0, count)
	at := 8
	for range count {
		if at+8 > len(buf) {
			return nil, errors.New("cell order: state ends in the cell list")
		}
		out = append(out, int32(u32(at)))
		at += 8 + 4*int(u32(at+4))
	}
	return out, nil
}
