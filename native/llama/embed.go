package llama

/*
#include <stdlib.h>
#include "llama_api.h"
*/
import "C"

import (
	"context"
	"errors"
	"fmt"
	"unsafe"

	"github.com/kvgate/kvgate/native"
)

// Pooling names, as GetEmbeddingModelInfo reports them.
var poolingNames = map[int]string{
	C.KV_LLAMA_POOLING_TYPE_NONE: "none",
	C.KV_LLAMA_POOLING_TYPE_MEAN: "mean",
	C.KV_LLAMA_POOLING_TYPE_CLS:  "cls",
	C.KV_LLAMA_POOLING_TYPE_LAST: "last",
	C.KV_LLAMA_POOLING_TYPE_RANK: "rank",
}

// LoadEmbeddingModel loads a GGUF embedding model (a BERT-class encoder)
// for CPU inference. It refuses what the tokenizer could abort on, as
// LoadModel does, and recurrent, hybrid, diffusion and encoder-decoder
// models; NewEmbedContext refuses the rest (a model with KV memory, a
// pooling that gives no sequence vector).
func LoadEmbeddingModel(ctx context.Context, path string, opts LoadOptions) (*Model, error) {
	return loadModel(ctx, path, opts, (*Model).checkEmbedding)
}

func (m *Model) checkEmbedding() error {
	var why string
	switch {
	case bool(C.llama_model_is_recurrent(m.ptr)), bool(C.llama_model_is_hybrid(m.ptr)):
		why = "recurrent and hybrid models are not served as embedding models"
	case bool(C.llama_model_is_diffusion(m.ptr)):
		why = "diffusion models are not served as embedding models"
	case bool(C.llama_model_has_encoder(m.ptr)) && bool(C.llama_model_has_decoder(m.ptr)):
		why = "encoder-decoder models are not served as embedding models"
	case m.info.VocabSize <= 0:
		why = "the model has no vocabulary"
	case m.info.EmbeddingSize <= 0 || C.llama_model_n_embd_inp(m.ptr) != C.llama_model_n_embd(m.ptr):
		// encode() copies n_embd_inp floats per sequence out of a pooled
		// tensor of n_embd: only equal sizes are safe.
		why = "the model's input and output embedding sizes differ"
	case m.info.TrainingContext <= 0:
		why = "the model has no training context"
	default:
		why = m.checkVocab()
	}
	if why != "" {
		return fmt.Errorf("%w: %s (%s): %s", ErrModelUnsupported, m.path, m.info.Architecture, why)
	}
	return nil
}

// EmbedParams configures an embedding context.
type EmbedParams struct {
	// Batch is the most tokens of one Encode, across its inputs: llama.cpp's
	// n_batch and n_ubatch both, since an encoder cannot split a batch.
	Batch int
	// MaxSequences is the most inputs of one Encode (n_seq_max), at most
	// native.MaxSequenceIDs.
	MaxSequences int
	// Threads is the CPU thread count; 0 means cpus.DefaultThreads of the
	// CPUs the process may use.
	Threads int
}

// EmbedContext is a llama.cpp context of an embedding model: no KV memory,
// so that llama_decode runs encode() on the whole batch at once and pools
// each sequence's output with the model's pooling. It implements
// native.EmbedBackend. It is not safe for concurrent use: create it, use it
// and close it on one goroutine locked to its OS thread.
type EmbedContext struct {
	model    *Model
	ptr      *C.struct_llama_context
	batch    int
	seqs     int
	maxInput int
	dims     int
	pooling  int
	threads  int
	cbatch   C.struct_llama_batch
}

// NewEmbedContext creates an embedding context for m. The pooling is the
// model's (its GGUF <arch>.pooling_type), mean where the model names none.
// It refuses a model whose context keeps KV memory (a decoder: its
// llama_decode would not run encode()) and one whose pooling gives no
// vector per sequence (none, or rank, a reranker's score).
func NewEmbedContext(m *Model, p EmbedParams) (*EmbedContext, error) {
	if p.Batch <= 0 {
		return nil, fmt.Errorf("new embedding context: batch %d must be positive", p.Batch)
	}
	if p.MaxSequences <= 0 || p.MaxSequences > native.MaxSequenceIDs {
		return nil, fmt.Errorf("new embedding context: max sequences %d outside [1, %d]", p.MaxSequences, native.MaxSequenceIDs)
	}
	threads := threadsOrDefault(p.Threads)
	params := C.llama_context_default_params()
	params.n_ctx = C.uint32_t(p.Batch)
	params.n_batch = C.uint32_t(p.Batch)
	params.n_ubatch = C.uint32_t(p.Batch)
	params.n_seq_max = C.uint32_t(p.MaxSequences)
	params.n_threads = C.int32_t(threads)
	params.n_threads_batch = C.int32_t(threads)
	params.embeddings = C.bool(true)
	params.kv_unified = C.bool(false) // sequence ids are then bounded by n_seq_max
	params.no_perf = C.bool(true)
	params.pooling_type = C.KV_LLAMA_POOLING_TYPE_UNSPECIFIED
	if m.metaString(m.info.Architecture+".pooling_type") == "" {
		params.pooling_type = C.KV_LLAMA_POOLING_TYPE_MEAN
	}
	C.kv_log_clear_error()
	ptr := C.llama_init_from_model(m.ptr, params)
	if ptr == nil {
		return nil, fmt.Errorf("new embedding context: %s", lastLlamaError())
	}
	c := &EmbedContext{
		model:   m,
		ptr:     ptr,
		batch:   int(min(C.llama_n_batch(ptr), C.llama_n_ubatch(ptr))),
		seqs:    int(C.llama_n_seq_max(ptr)),
		dims:    int(C.llama_model_n_embd(m.ptr)),
		pooling: int(C.llama_pooling_type(ptr)),
		threads: threads,
	}
	// Every position indexes the model's position table, which has
	// n_ctx_train rows; encode() takes at most n_ubatch tokens.
	c.maxInput = min(m.info.TrainingContext, c.batch)
	var why string
	switch {
	case C.llama_get_memory(ptr) != nil:
		why = "the model keeps KV memory (a decoder); only encoders without memory are served as embedding models"
	case c.pooling != C.KV_LLAMA_POOLING_TYPE_MEAN && c.pooling != C.KV_LLAMA_POOLING_TYPE_CLS && c.pooling != C.KV_LLAMA_POOLING_TYPE_LAST:
		why = fmt.Sprintf("pooling %q gives no embedding per input", poolingNames[c.pooling])
	case c.batch != p.Batch || c.seqs != p.MaxSequences:
		why = fmt.Sprintf("llama.cpp changed the batch to %d tokens and %d sequences", c.batch, c.seqs)
	}
	if why != "" {
		C.llama_free(ptr)
		return nil, fmt.Errorf("%w: %s (%s): %s", ErrModelUnsupported, m.path, m.info.Architecture, why)
	}
	c.cbatch = C.llama_batch_init(C.int32_t(c.batch), 0, 1)
	return c, nil
}

// BatchTokens returns the most tokens of one Encode.
func (c *EmbedContext) BatchTokens() int { return c.batch }

// MaxSequences returns the most inputs of one Encode.
func (c *EmbedContext) MaxSequences() int { return c.seqs }

// MaxInputTokens returns the most tokens of one input.
func (c *EmbedContext) MaxInputTokens() int { return c.maxInput }

// Dimensions returns the length of every vector.
func (c *EmbedContext) Dimensions() int { return c.dims }

// Pooling returns the context's pooling: "mean", "cls" or "last".
func (c *EmbedContext) Pooling() string { return poolingNames[c.pooling] }

// Threads returns the CPU threads of the next Encode.
func (c *EmbedContext) Threads() int { return c.threads }

// SetThreads sets the CPU threads of the next Encodes (llama_set_n_threads);
// n below 1 counts as 1.
func (c *EmbedContext) SetThreads(n int) {
	n = max(n, 1)
	if n != c.threads {
		C.llama_set_n_threads(c.ptr, C.int32_t(n), C.int32_t(n))
		c.threads = n
	}
}

// ErrEncodeLimits refuses a batch outside the context's limits, before
// llama.cpp sees it.
var ErrEncodeLimits = errors.New("encode: batch outside the context's limits")

// check returns why llama.cpp could abort or misread on this batch, or nil.
func (c *EmbedContext) check(inputs [][]int32, out [][]float32) error {
	if len(inputs) == 0 || len(inputs) > c.seqs || len(out) != len(inputs) {
		return fmt.Errorf("%w: %d inputs (1 to %d) for %d outputs", ErrEncodeLimits, len(inputs), c.seqs, len(out))
	}
	total := 0
	for i, in := range inputs {
		if len(in) == 0 || len(in) > c.maxInput {
			return fmt.Errorf("%w: input %d has %d tokens (1 to %d)", ErrEncodeLimits, i, len(in), c.maxInput)
		}
		if j := c.model.ValidTokens(in); j >= 0 {
			return fmt.Errorf("%w: input %d: %w: token %d = %d", ErrEncodeLimits, i, native.ErrTokenOutOfRange, j, in[j])
		}
		if len(out[i]) != c.dims {
			return fmt.Errorf("%w: output %d has %d floats, want %d", ErrEncodeLimits, i, len(out[i]), c.dims)
		}
		total += len(in)
	}
	if total > c.batch {
		return fmt.Errorf("%w: %d tokens, more than the batch of %d", ErrEncodeLimits, total, c.batch)
	}
	return nil
}

// Encode runs the model on inputs, input i as sequence i at positions
// 0..len-1, and copies each sequence's pooled vector into out[i]. Every
// limit encode() asserts on (n_ubatch >= n_tokens), and every one
// llama_batch_allocr::init checks (token ids, sequence ids below
// n_seq_max), is checked first: a batch outside them is refused with
// ErrEncodeLimits.
func (c *EmbedContext) Encode(inputs [][]int32, out [][]float32) error {
	if err := c.check(inputs, out); err != nil {
		return err
	}
	// The C batch's arrays are C memory, written from Go without a cgo
	// call per token.
	cb := &c.cbatch
	total := 0
	for _, in := range inputs {
		total += len(in)
	}
	tok := unsafe.Slice((*int32)(unsafe.Pointer(cb.token)), total)
	pos := unsafe.Slice((*int32)(unsafe.Pointer(cb.pos)), total)
	nseq := unsafe.Slice((*int32)(unsafe.Pointer(cb.n_seq_id)), total)
	seqs := unsafe.Slice(cb.seq_id, total)
	logits := unsafe.Slice((*int8)(unsafe.Pointer(cb.logits)), total)
	n := 0
	for s, in := range inputs {
		for p, t := range in {
			tok[n], pos[n], nseq[n], logits[n] = t, int32(p), 1, 1
			*(*int32)(unsafe.Pointer(seqs[n])) = int32(s)
			n++
		}
	}
	cb.n_tokens = C.int32_t(n)
	rc := int(C.llama_decode(c.ptr, *cb))
	cb.n_tokens = 0
	if err := decodeError(rc); err != nil {
		return fmt.Errorf("encode %d inputs of %d tokens: %w", len(inputs), n, err)
	}
	for s := range inputs {
		v := C.llama_get_embeddings_seq(c.ptr, C.llama_seq_id(s))
		if v == nil {
			return fmt.Errorf("encode: no embedding for sequence %d", s)
		}
		copy(out[s], unsafe.Slice((*float32)(unsafe.Pointer(v)), c.dims))
	}
	return nil
}

// Close frees the context. It is idempotent.
func (c *EmbedContext) Close() {
	if c.cbatch.token != nil {
		C.llama_batch_free(c.cbatch)
		c.cbatch = C.struct_llama_batch{}
	}
	if c.ptr != nil {
		C.llama_free(c.ptr)
		c.ptr = nil
	}
}

// AddsEndToken reports whether tokenizing with special tokens appends an
// end or separator token (BERT's [SEP]), which truncation keeps last.
func (m *Model) AddsEndToken() bool {
	return bool(C.llama_vocab_get_add_eos(m.vocab)) || bool(C.llama_vocab_get_add_sep(m.vocab))
}

var (
	_ native.EmbedBackend = (*EmbedContext)(nil)
	_ native.ThreadSetter = (*EmbedContext)(nil)
)
