// Package mkmodel writes llama-architecture GGUF models with random
// weights and realistic shapes, so that throughput can be measured at a real
// model's compute cost without downloading one. The files load in
// llama.cpp: the tensor names, shapes and metadata types follow its
// LLM_ARCH_LLAMA loader, and the tokenizer is copied from another GGUF file
// or built in: a SentencePiece vocabulary with byte fallback (BuiltinVocab)
// or a GPT-2-style byte-level BPE one (BuiltinBPEVocab). WriteVocabFile
// writes a tokenizer alone, as a vocabulary-only GGUF file.
//
// Writing streams the tensor data through a buffer, so models of any size
// are written in constant memory; the weights are a deterministic function
// of the seed.
package mkmodel

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
)

// Spec describes a model to write.
type Spec struct {
	// Name is written as general.name.
	Name string
	// Embedding is the width of the residual stream (n_embd).
	Embedding int
	// Layers is the number of transformer blocks.
	Layers int
	// Heads is the number of attention (query) heads; Embedding must be a
	// multiple of it, with an even quotient (the head size, rotated by RoPE).
	Heads int
	// HeadsKV is the number of key/value heads; 0 means Heads. Heads must be
	// a multiple of it (grouped-query attention).
	HeadsKV int
	// FeedForward is the hidden width of the SwiGLU feed-forward network.
	FeedForward int
	// ContextLength is the training context, llama.context_length.
	ContextLength int
	// VocabSize is the size of the built-in vocabulary when Vocab is nil;
	// 0 means BuiltinVocabMinSize(). It is ignored when Vocab is set.
	VocabSize int
	// Vocab, when set, is the tokenizer to write (from LoadVocab,
	// BuiltinVocab or BuiltinBPEVocab); nil means a built-in SentencePiece
	// vocabulary of VocabSize tokens.
	Vocab *Vocab
	// TiedEmbeddings leaves out output.weight, so that llama.cpp computes
	// the logits with token_embd.weight, as llama2.c's models do.
	TiedEmbeddings bool
	// Type is the type of the weight matrices: TypeF32, TypeF16 or
	// TypeQ8_0. Norm weights are always f32.
	Type GGMLType
	// Seed selects the random weights.
	Seed uint64
	// RopeFreqBase is llama.rope.freq_base; 0 means 10000.
	RopeFreqBase float32
	// NormEps is the RMS norm epsilon; 0 means 1e-5.
	NormEps float32
}

// presets are the named shapes, in the order Presets lists them.
var presets = []Spec{
	{Name: "tiny", Embedding: 128, Layers: 4, Heads: 4, FeedForward: 384, ContextLength: 16384, VocabSize: 512, TiedEmbeddings: true},
	{Name: "15m", Embedding: 288, Layers: 6, Heads: 6, FeedForward: 768, ContextLength: 4096, VocabSize: 32000, TiedEmbeddings: true},
	{Name: "110m", Embedding: 768, Layers: 12, Heads: 12, FeedForward: 2048, ContextLength: 4096, VocabSize: 32000, TiedEmbeddings: true},
}

// Presets returns the names of the preset shapes, smallest first.
func Presets() []string {
	names := make([]string, len(presets))
	for i, p := range presets {
		names[i] = p.Name
	}
	return names
}

// Preset returns the spec of a named shape, with f16 weights and seed 0:
//
//   - "tiny": n_embd 128, 4 layers, 4 heads, FFN 384, 512 tokens, context
//     16384; about 0.9M parameters, for fast tests and long streams.
//   - "15m": the shape of llama2.c's stories15M (n_embd 288, 6 layers, 6
//     heads, FFN 768, 32000 tokens, tied embeddings).
//   - "110m": the shape of llama2.c's stories110M (n_embd 768, 12 layers,
//     12 heads, FFN 2048, 32000 tokens, tied embeddings).
func Preset(name string) (Spec, error) {
	for _, p := range presets {
		if strings.EqualFold(p.Name, name) {
			p.Type = TypeF16
			return p, nil
		}
	}
	return Spec{}, fmt.Errorf("unknown preset %q (want one of %s)", name, strings.Join(Presets(), ", "))
}

// withDefaults returns s with its zero-means-default fields filled in.
func (s Spec) withDefaults() Spec {
	if s.HeadsKV == 0 {
		s.HeadsKV = s.Heads
	}
	if s.RopeFreqBase == 0 {
		s.RopeFreqBase = 10000
	}
	if s.NormEps == 0 {
		s.NormEps = 1e-5
	}
	if s.Name == "" {
		s.Name = "random"
	}
	return s
}

// NVocab returns the number of tokens the model will have.
func (s Spec) NVocab() int {
	switch {
	case s.Vocab != nil:
		return s.Vocab.Size()
	case s.VocabSize > 0:
		return s.VocabSize
	}
	return BuiltinVocabMinSize()
}

// HeadSize returns the size of one attention head, Embedding / Heads.
func (s Spec) HeadSize() int {
	if s.Heads <= 0 {
		return 0
	}
	return s.Embedding / s.Heads
}

// String summarises the shape, such as "n_embd 288, 6 layers, 6 heads
// (6 kv), ffn 768, vocab 32000, ctx 4096, tied, f16".
func (s Spec) String() string {
	s = s.withDefaults()
	tied := "untied"
	if s.TiedEmbeddings {
		tied = "tied"
	}
	return fmt.Sprintf("n_embd %d, %d layers, %d heads (%d kv), ffn %d, vocab %d, ctx %d, %s, %s",
		s.Embedding, s.Layers, s.Heads, s.HeadsKV, s.FeedForward, s.NVocab(), s.ContextLength, tied, s.Type)
}

// ErrSpec reports a spec that cannot make a loadable model.
var ErrSpec = errors.New("invalid model spec")

// Validate reports whether llama.cpp can load a model of this spec.
func (s Spec) Validate() error {
	s = s.withDefaults()
	var why string
	switch {
	case s.Embedding <= 0 || s.Layers <= 0 || s.Heads <= 0 || s.FeedForward <= 0 || s.ContextLength <= 0:
		why = fmt.Sprintf("embedding %d, layers %d, heads %d, feed-forward %d and context %d must be positive",
			s.Embedding, s.Layers, s.Heads, s.FeedForward, s.ContextLength)
	case s.Layers > 512:
		why = fmt.Sprintf("%d layers is more than llama.cpp's 512", s.Layers)
	case s.Embedding%s.Heads != 0:
		why = fmt.Sprintf("embedding %d is not a multiple of %d heads", s.Embedding, s.Heads)
	case s.HeadSize()%2 != 0:
		why = fmt.Sprintf("head size %d is odd; RoPE rotates pairs", s.HeadSize())
	case s.HeadsKV < 0 || s.Heads%s.HeadsKV != 0:
		why = fmt.Sprintf("%d heads is not a multiple of %d kv heads", s.Heads, s.HeadsKV)
	case s.Type != TypeF32 && s.Type != TypeF16 && s.Type != TypeQ8_0:
		why = fmt.Sprintf("weight type %s is not f32, f16 or q8_0", s.Type)
	case s.Type == TypeQ8_0 && (s.Embedding%q8BlockSize != 0 || s.FeedForward%q8BlockSize != 0):
		why = fmt.Sprintf("q8_0 needs rows that are multiples of %d; embedding %d, feed-forward %d",
			q8BlockSize, s.Embedding, s.FeedForward)
	case s.Vocab == nil && s.VocabSize != 0 && s.VocabSize < BuiltinVocabMinSize():
		why = fmt.Sprintf("vocabulary size %d is below the built-in vocabulary's minimum %d", s.VocabSize, BuiltinVocabMinSize())
	case s.NVocab() >= math.MaxInt32:
		why = fmt.Sprintf("vocabulary size %d is too large", s.NVocab())
	}
	if why != "" {
		return fmt.Errorf("%w: %s", ErrSpec, why)
	}
	return nil
}

// tensor is one tensor to write: random weights with the given fan-in, or
// ones (norms).
type tensor struct {
	TensorInfo
	ones bool
}

// tensors returns the model's tensors with their data offsets, in file
// order.
func (s Spec) tensors() []tensor {
	s = s.withDefaults()
	embd, vocab, ff := int64(s.Embedding), int64(s.NVocab()), int64(s.FeedForward)
	kv := int64(s.HeadSize() * s.HeadsKV)
	var ts []tensor
	add := func(name string, typ GGMLType, dims ...int64) {
		ts = append(ts, tensor{TensorInfo: TensorInfo{Name: name, Dims: dims, Type: typ}, ones: typ == TypeF32 && len(dims) == 1})
	}
	// ggml's ne order: a matrix for y = W x with x of size n_in and y of
	// size n_out has dims [n_in, n_out].
	add("token_embd.weight", s.Type, embd, vocab)
	for i := range s.Layers {
		blk := fmt.Sprintf("blk.%d.", i)
		add(blk+"attn_norm.weight", TypeF32, embd)
		add(blk+"attn_q.weight", s.Type, embd, embd)
		add(blk+"attn_k.weight", s.Type, embd, kv)
		add(blk+"attn_v.weight", s.Type, embd, kv)
		add(blk+"attn_output.weight", s.Type, embd, embd)
		add(blk+"ffn_norm.weight", TypeF32, embd)
		add(blk+"ffn_gate.weight", s.Type, embd, ff)
		add(blk+"ffn_down.weight", s.Type, ff, embd)
		add(blk+"ffn_up.weight", s.Type, embd, ff)
	}
	add("output_norm.weight", TypeF32, embd)
	if !s.TiedEmbeddings {
		add("output.weight", s.Type, embd, vocab)
	}
	var off int64
	for i := range ts {
		ts[i].Offset = uint64(off)
		off += pad(ts[i].Bytes(), Alignment)
	}
	return ts
}

// ParameterCount returns the number of weights, as llama.cpp's
// llama_model_n_params counts them.
func (s Spec) ParameterCount() int64 {
	var n int64
	for _, t := range s.tensors() {
		n += t.Elements()
	}
	return n
}

// FileSize returns the size of the file Write writes for s.
func (s Spec) FileSize() (int64, error) {
	if err := s.Validate(); err != nil {
		return 0, err
	}
	kvs, err := s.metadata()
	if err != nil {
		return 0, err
	}
	ts := s.tensors()
	w := &writer{w: bufio.NewWriter(io.Discard)}
	if err := writeHeader(w, kvs, ts); err != nil {
		return 0, err
	}
	last := ts[len(ts)-1]
	return w.n + int64(last.Offset) + pad(last.Bytes(), Alignment), nil
}

// metadata returns the GGUF metadata entries of the model.
func (s Spec) metadata() ([]KV, error) {
	s = s.withDefaults()
	v := s.Vocab
	if v == nil {
		var err error
		if v, err = BuiltinVocab(s.VocabSize); err != nil {
			return nil, err
		}
	}
	kvs := []KV{
		{"general.architecture", "llama"},
		{"general.name", s.Name},
		{"general.description", fmt.Sprintf("random weights (kvgate mkmodel, seed %d); tokenizer %s %s", s.Seed, v.Model(), filepath.Base(v.Source()))},
		{"general.alignment", uint32(Alignment)},
		{"general.file_type", s.Type.fileType()},
	}
	if s.Type == TypeQ8_0 {
		kvs = append(kvs, KV{"general.quantization_version", uint32(2)})
	}
	kvs = append(kvs,
		KV{"llama.context_length", uint32(s.ContextLength)},
		KV{"llama.embedding_length", uint32(s.Embedding)},
		KV{"llama.block_count", uint32(s.Layers)},
		KV{"llama.feed_forward_length", uint32(s.FeedForward)},
		KV{"llama.attention.head_count", uint32(s.Heads)},
		KV{"llama.attention.head_count_kv", uint32(s.HeadsKV)},
		KV{"llama.rope.dimension_count", uint32(s.HeadSize())},
		KV{"llama.rope.freq_base", s.RopeFreqBase},
		KV{"llama.attention.layer_norm_rms_epsilon", s.NormEps},
		KV{"llama.vocab_size", uint32(v.Size())},
	)
	return append(kvs, v.KVs()...), nil
}

func writeHeader(w *writer, kvs []KV, ts []tensor) error {
	w.bytes([]byte(ggufMagic))
	w.u32(ggufVersion)
	w.u64(uint64(len(ts)))
	w.u64(uint64(len(kvs)))
	for _, kv := range kvs {
		if err := w.kv(kv); err != nil {
			return err
		}
	}
	for _, t := range ts {
		w.str(t.Name)
		w.u32(uint32(len(t.Dims)))
		for _, d := range t.Dims {
			w.u64(uint64(d))
		}
		w.u32(uint32(t.Type))
		w.u64(t.Offset)
	}
	w.pad(Alignment)
	return w.err
}

// Write writes the model s to w and returns the number of bytes written.
// The tensor data is generated and written in chunks, so memory use does
// not grow with the model. It stops early when ctx is done.
func Write(ctx context.Context, w io.Writer, s Spec) (int64, error) {
	if err := s.Validate(); err != nil {
		return 0, err
	}
	s = s.withDefaults()
	kvs, err := s.metadata()
	if err != nil {
		return 0, err
	}
	ts := s.tensors()
	bw := &writer{w: bufio.NewWriterSize(w, 1<<20)}
	if err := writeHeader(bw, kvs, ts); err != nil {
		return bw.n, fmt.Errorf("write model: %w", err)
	}
	const chunk = 1 << 16 // elements; a multiple of every block size
	vals := make([]float32, chunk)
	enc := make([]byte, 4*chunk)
	for _, t := range ts {
		if err := ctx.Err(); err != nil {
			return bw.n, fmt.Errorf("write model: %w", err)
		}
		r := newRNG(s.Seed, t.Name)
		// Uniform in [-a, a) has variance a²/3: 1/fan-in keeps the
		// activations' scale from layer to layer.
		a := float32(math.Sqrt(3 / float64(t.Dims[0])))
		for left := t.Elements(); left > 0; {
			n := min(left, chunk)
			v := vals[:n]
			if t.ones {
				for i := range v {
					v[i] = 1
				}
			} else {
				r.fill(v, a)
			}
			b := enc[:t.Type.rowBytes(n)]
			t.Type.encode(b, v)
			bw.bytes(b)
			left -= n
		}
		bw.pad(Alignment)
	}
	if bw.err == nil {
		bw.err = bw.w.Flush()
	}
	if bw.err != nil {
		return bw.n, fmt.Errorf("write model: %w", bw.err)
	}
	return bw.n, nil
}

// WriteFile writes the model s to path and returns the file's size. It
// writes a temporary file in the same directory and renames it, so path
// never holds a partial model.
func WriteFile(ctx context.Context, path string, s Spec) (int64, error) {
	if err := s.Validate(); err != nil {
		return 0, err
	}
	return writeFile(path, "write model", func(w io.Writer) (int64, error) { return Write(ctx, w, s) })
}

// writeFile writes path through write, into a temporary file in the same
// directory that it renames to path once complete. what starts the
// messages of its own errors.
func writeFile(path, what string, write func(io.Writer) (int64, error)) (int64, error) {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return 0, fmt.Errorf("%s: %w", what, err)
	}
	tmp := f.Name()
	n, err := write(f)
	if err == nil {
		if cerr := f.Chmod(0o644); cerr != nil {
			err = fmt.Errorf("%s: %w", what, cerr)
		}
	}
	if cerr := f.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("%s: %w", what, cerr)
	}
	if err == nil {
		if rerr := os.Rename(tmp, path); rerr != nil {
			err = fmt.Errorf("%s: %w", what, rerr)
		}
	}
	if err != nil {
		os.Remove(tmp)
		return 0, err
	}
	return n, nil
}

// vocabSpec is the shape whose hyperparameters a vocabulary-only file
// carries: the "tiny" preset's.
var vocabSpec = presets[0]

// WriteVocabFile writes a vocabulary-only GGUF file to path, as llama.cpp's
// convert_hf_to_gguf.py --vocab-only writes (its ggml-vocab-*.gguf test
// files): general.architecture "llama", the hyperparameters of the "tiny"
// preset with v's size as llama.vocab_size, v's tokenizer.* entries, and no
// tensors. llama.cpp reads the tokenizer from it (llama_model_params
// vocab_only) but cannot load it as a model, which has weights; LoadVocab
// reads it back. It returns the file's size, and writes path the way
// WriteFile does, so path never holds a partial file.
func WriteVocabFile(ctx context.Context, path string, v *Vocab) (int64, error) {
	if v == nil || v.Size() == 0 {
		return 0, fmt.Errorf("write vocabulary: %w: no tokens", ErrSpec)
	}
	s := vocabSpec
	s.Name = "kvgate-vocab-" + v.Model()
	s.Vocab = v
	s.Type = TypeF16
	if err := s.Validate(); err != nil {
		return 0, fmt.Errorf("write vocabulary: %w", err)
	}
	kvs, err := s.metadata()
	if err != nil {
		return 0, fmt.Errorf("write vocabulary: %w", err)
	}
	for i := range kvs {
		if kvs[i].Key == "general.description" {
			kvs[i].Value = fmt.Sprintf("vocabulary only (kvgate mkmodel); tokenizer %s %s", v.Model(), filepath.Base(v.Source()))
		}
	}
	return writeFile(path, "write vocabulary", func(w io.Writer) (int64, error) {
		if err := ctx.Err(); err != nil {
			return 0, fmt.Errorf("write vocabulary: %w", err)
		}
		bw := &writer{w: bufio.NewWriterSize(w, 1<<20)}
		if err := writeHeader(bw, kvs, nil); err != nil {
			return bw.n, fmt.Errorf("write vocabulary: %w", err)
		}
		if err := bw.w.Flush(); err != nil {
			return bw.n, fmt.Errorf("write vocabulary: %w", err)
		}
		return bw.n, nil
	})
}

// rng is splitmix64: fast, and good enough for weights nobody trains.
type rng struct{ s uint64 }

// newRNG returns the generator of one tensor, so that each tensor's
// weights depend only on the seed and its name.
func newRNG(seed uint64, name string) *rng {
	h := fnv.New64a()
	h.Write([]byte(name))
	r := &rng{s: seed ^ h.Sum64()}
	r.next()
	return r
}

func (r *rng) next() uint64 {
	r.s += 0x9e3779b97f4a7c15
	z := r.s
	z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
	z = (z ^ z>>27) * 0x94d049bb133111eb
	return z ^ z>>31
}

// fill sets v to values uniform in [-a, a), two per 64 random bits.
func (r *rng) fill(v []float32, a float32) {
	k := a / (1 << 31)
	i := 0
	for ; i+1 < len(v); i += 2 {
		x := r.next()
		v[i] = float32(int32(x)) * k
		v[i+1] = float32(int32(x>>32)) * k
	}
	if i < len(v) {
		v[i] = float32(int32(r.next())) * k
	}
}
