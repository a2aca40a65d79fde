package llama

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
	"unsafe"

	"github.com/kvgate/kvgate/internal/cpus"
	"github.com/kvgate/kvgate/native"
)

// Decode errors. llama_decode's return codes map onto these; errors.Is
// tells them apart.
var (
	// ErrNoKVSlot is native.ErrNoKVSlot: llama_decode's return 1.
	ErrNoKVSlot = native.ErrNoKVSlot
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
		return &DecodeError{Code: rc, kind: native.ErrNoKVSlot}
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
	// Threads is the number of CPU threads; 0 means
	// cpus.DefaultThreads of the CPUs the process may use (its affinity
	// and cgroup quota, cpus.Available).
	Threads int
	// KVType is the KV cache's element type, "f16" (the default) or "f32".
	KVType string
	// Streams gives each of the MaxSequences sequences a KV stream of its
	// own (llama.cpp's kv_unified = false) instead of one pool shared by
	// every sequence. A stream holds Cells/MaxSequences cells, padded up
	// to a multiple of 256 (so the pool may grow), and a sequence never
	// holds more: attention then spans only a sequence's own stream,
	// where in one pool every token's attention scans every used cell.
	// Sequence ids are 0..MaxSequences-1, and a prefix is copied between
	// streams, not shared.
	Streams bool
}

// Context is a llama.cpp context with a unified KV cache, or a KV stream per
// sequence (ContextParams.Streams). It is not safe for
// concurrent use: create it, use it and close it on one goroutine locked to
// its OS thread (runtime.LockOSThread).
type Context struct {
	model *Model
	ptr   *C.struct_llama_context
	mem   C.llama_memory_t
	cells int
	batch int
	// seqIDs bounds the sequence ids memory calls take: llama.cpp asserts
	// on an id outside its stream map (LLAMA_MAX_SEQ in a unified cache,
	// n_seq_max with a stream per sequence).
	seqIDs int
	// seqCells is the most cells one sequence may hold.
	seqCells int
	// streams: a KV stream per sequence.
	streams bool
	// threads is the CPU thread count of the next decodes.
	threads int
	// cand is the candidate buffer for sampling: one llama_token_data per
	// vocabulary entry, allocated once in C memory.
	cand *C.llama_token_data
	// outputs[i] tells whether token i of the last successful Decode asked
	// for logits; it has that decode's token count. llama_get_logits_ith
	// aborts the process (GGML_ABORT: libllama is built without NDEBUG)
	// for any other index, so Logits and Sampler.Sample check it first.
	outputs []bool
	// cbatch is the llama_batch Decode fills from a native.Batch.
	cbatch C.struct_llama_batch
}

// threadsOrDefault returns n, or for n <= 0 the default thread count:
// cpus.DefaultThreads of the CPUs the process may use. Decode and embedding
// contexts share it.
func threadsOrDefault(n int) int {
	if n > 0 {
		return n
	}
	return cpus.DefaultThreads(cpus.Available().CPUs)
}

// NewContext creates a context for m: by default with kv_unified = true, one
// pool of cells for every sequence; with p.Streams, a KV stream per
// sequence.
func NewContext(m *Model, p ContextParams) (*Context, error) {
	if p.Cells <= 0 || p.Batch <= 0 {
		return nil, fmt.Errorf("new context: cells (%d) and batch (%d) must be positive", p.Cells, p.Batch)
	}
	if p.MaxSequences <= 0 || p.MaxSequences > native.MaxSequenceIDs {
		return nil, fmt.Errorf("new context: max sequences %d outside [1, %d]", p.MaxSequences, native.MaxSequenceIDs)
	}
	threads := threadsOrDefault(p.Threads)
	params := C.llama_context_default_params()
	params.n_ctx = C.uint32_t(p.Cells)
	params.n_batch = C.uint32_t(p.Batch)
	params.n_ubatch = C.uint32_t(min(p.Batch, 512))
	params.n_seq_max = C.uint32_t(p.MaxSequences)
	params.n_threads = C.int32_t(threads)
	params.n_threads_batch = C.int32_t(threads)
	params.kv_unified = C.bool(!p.Streams)
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
		model:   m,
		ptr:     ptr,
		mem:     C.llama_get_memory(ptr),
		cells:   int(C.llama_n_ctx(ptr)),
		batch:   int(C.llama_n_batch(ptr)),
		streams: p.Streams,
		threads: threads,
	}
	c.seqIDs, c.seqCells = native.MaxSequenceIDs, c.cells
	if p.Streams {
		c.seqIDs, c.seqCells = int(C.llama_n_seq_max(ptr)), int(C.llama_n_ctx_seq(ptr))
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
	c.cbatch = C.llama_batch_init(C.int32_t(c.batch), 0, 1)
	c.cand = (*C.llama_token_data)(C.malloc(C.size_t(m.info.VocabSize) * C.size_t(unsafe.Sizeof(C.llama_token_data{}))))
	if c.cand == nil {
		C.llama_free(ptr)
		return nil, errors.New("new context: out of memory for the sampling buffer")
	}
	return c, nil
}

// Cells returns the number of KV cells, after llama.cpp's padding.
func (c *Context) Cells() int { return c.cells }

// SequenceCells returns the most cells one sequence may hold: Cells in a
// unified cache, a stream's cells (llama_n_ctx_seq) with a stream per
// sequence.
func (c *Context) SequenceCells() int { return c.seqCells }

// Threads returns the CPU threads of the next decodes.
func (c *Context) Threads() int { return c.threads }

// SetThreads sets the CPU threads of the next decodes, for single tokens
// and batches alike (llama_set_n_threads); n below 1 counts as 1. ggml's
// CPU threadpool is created for each graph in this build (no OpenMP, no
// attached threadpool), so the change costs nothing.
func (c *Context) SetThreads(n int) {
	n = max(n, 1)
	if n != c.threads {
		C.llama_set_n_threads(c.ptr, C.int32_t(n), C.int32_t(n))
		c.threads = n
	}
}

// Streams reports whether each sequence has a KV stream of its own.
func (c *Context) Streams() bool { return c.streams }

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
	if c.cbatch.token != nil {
		C.llama_batch_free(c.cbatch)
		c.cbatch = C.struct_llama_batch{}
	}
}

// Decode runs the model on b. See the Err* variables for its failures. A
// batch with more tokens than BatchSize, or one that Batch.Add marked
// invalid, fails with ErrInvalidBatch before llama.cpp sees it (llama_decode
// asserts n_tokens <= n_batch). An empty batch is a no-op that leaves the
// last decode's outputs as they are.
func (c *Context) Decode(b *native.Batch) error {
	n := b.Len()
	if n == 0 {
		return nil
	}
	c.outputs = c.outputs[:0]
	if b.Invalid() || n > c.batch {
		return &DecodeError{Code: -1, kind: ErrInvalidBatch}
	}
	// The C batch's arrays are C memory, written from Go without a cgo
	// call per token.
	cb := &c.cbatch
	tok := unsafe.Slice((*int32)(unsafe.Pointer(cb.token)), n)
	pos := unsafe.Slice((*int32)(unsafe.Pointer(cb.pos)), n)
	nseq := unsafe.Slice((*int32)(unsafe.Pointer(cb.n_seq_id)), n)
	seqs := unsafe.Slice(cb.seq_id, n)
	logits := unsafe.Slice((*int8)(unsafe.Pointer(cb.logits)), n)
	copy(tok, b.Tokens)
	copy(pos, b.Pos)
	for i := range n {
		if int(b.Seq[i]) >= c.seqIDs { // a stream per sequence: n_seq_max ids
			return &DecodeError{Code: -1, kind: ErrInvalidBatch}
		}
		nseq[i] = 1
		*(*int32)(unsafe.Pointer(seqs[i])) = b.Seq[i]
		logits[i] = 0
		if b.Logits[i] {
			logits[i] = 1
		}
	}
	cb.n_tokens = C.int32_t(n)
	if err := decodeError(int(C.llama_decode(c.ptr, *cb))); err != nil {
		return err
	}
	c.outputs = append(c.outputs, b.Logits...)
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
// accept: they GGML_ASSERT 0 <= seq < LLAMA_MAX_SEQ in a unified cache, and
// 0 <= seq < n_seq_max with a stream per sequence.
func (c *Context) validSeq(seq int) bool { return seq >= 0 && seq < c.seqIDs }

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
// when a partial removal is impossible, or when seq is neither -1 nor one
// of the context's ids, which it leaves alone. A cell is freed only when its
// last sequence leaves it.
func (c *Context) SeqRemove(seq, p0, p1 int) bool {
	if seq != -1 && !c.validSeq(seq) {
		return false
	}
	return bool(C.llama_memory_seq_rm(c.mem, C.llama_seq_id(seq), clampPos(p0), clampPos(p1)))
}

// SeqCopy gives sequence dst the cells of src with positions in [p0, p1).
// Ids outside the context's range make it a no-op.
//
// In a unified cache nothing is copied: the cells are shared. No cell in the
// range may hold dst already: llama.cpp asserts that
// (assert(!seq[i].test(seq_id)) in llama_kv_cells::seq_add); a dst that
// holds no cells is always safe.
//
// With a stream per sequence, llama.cpp copies only whole streams (it
// GGML_ASSERTs on a partial range): dst's stream becomes a copy of src's,
// made at the start of the next Decode, and the copy is then cut back to
// [0, p1). A p0 above 0 cannot be copied and leaves the cache alone.
func (c *Context) SeqCopy(src, dst, p0, p1 int) {
	if !c.validSeq(src) || !c.validSeq(dst) {
		return
	}
	if !c.streams {
		C.llama_memory_seq_cp(c.mem, C.llama_seq_id(src), C.llama_seq_id(dst), clampPos(p0), clampPos(p1))
		return
	}
	if src == dst || p0 > 0 {
		return
	}
	C.llama_memory_seq_cp(c.mem, C.llama_seq_id(src), C.llama_seq_id(dst), -1, -1)
	if p1 >= 0 {
		C.llama_memory_seq_rm(c.mem, C.llama_seq_id(dst), clampPos(p1), -1)
	}
}

// SeqKeep removes every sequence but seq. An id outside the context's ids
// makes it a no-op.
func (c *Context) SeqKeep(seq int) {
	if c.validSeq(seq) {
		C.llama_memory_seq_keep(c.mem, C.llama_seq_id(seq))
	}
}

// SeqPosMin returns the smallest position of seq in the cache, or -1 (also
// for an id outside the context's ids).
func (c *Context) SeqPosMin(seq int) int {
	if !c.validSeq(seq) {
		return -1
	}
	return int(C.llama_memory_seq_pos_min(c.mem, C.llama_seq_id(seq)))
}

// SeqPosMax returns the largest position of seq in the cache, or -1 (also
// for an id outside the context's ids).
func (c *Context) SeqPosMax(seq int) int {
	if !c.validSeq(seq) {
		return -1
	}
	return int(C.llama_memory_seq_pos_max(c.mem, C.llama_seq_id(seq)))
}

// Clear empties the cache.
func (c *Context) Clear() { C.llama_memory_clear(c.mem, C.bool(false)) }

// cellOrder returns the positions of seq's cells in cell order, read back
// from llama.cpp's state of the sequence (llama_state_seq_get_data writes a
// position and the sequence ids for every cell, in cell order, before the
// tensors). It copies the sequence's K and V too, so it is for tests.
func (c *Context) cellOrder(seq int) ([]int32, error) {
	if !c.validSeq(seq) {
		return nil, fmt.Errorf("cell order: sequence id %d outside [0, %d)", seq, c.seqIDs)
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
