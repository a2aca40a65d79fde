// Package llama binds kvgate to llama.cpp through cgo: the model, the
// context (a native.Backend), the sampler and the ABI check. It is thin:
// the scheduling is the decode worker's, in package native.
//
// llama.cpp is linked from the Go module github.com/ollama/ollama v0.17.4,
// whose package llama/llama.cpp/src builds libllama and ggml's CPU backend.
// cgo cannot include headers from another module, so llama_api.h declares
// the part of llama.h that kvgate calls; abi_test.go checks those
// declarations against the linked library.
//
// Threading: vocabulary operations (tokenize, detokenize) are thread-safe in
// llama.cpp and may be called from any goroutine. Everything that touches a
// context (decode, memory, sampling) runs on the Engine's worker goroutine,
// which is locked to its OS thread for its whole life (native.Engine). Every C object is
// freed explicitly by its owner; no finalizers are used.
package llama

/*
#cgo CFLAGS: -std=c11
#include <stdlib.h>
#include "llama_api.h"
*/
import "C"

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"github.com/kvgate/kvgate/internal/chat"
	"github.com/kvgate/kvgate/native"
	"io"
	"os"
	"runtime/cgo"
	"strconv"
	"strings"
	"sync"
	"unicode/utf8"
	"unsafe"

	// Links libllama and ggml's CPU backend into the binary.
	_ "github.com/ollama/ollama/llama/llama.cpp/src"
)

// LogLevel selects which llama.cpp log lines reach stderr.
type LogLevel int

// Log levels, as in ggml.
const (
	LogNone  LogLevel = C.KV_GGML_LOG_LEVEL_NONE
	LogDebug LogLevel = C.KV_GGML_LOG_LEVEL_DEBUG
	LogInfo  LogLevel = C.KV_GGML_LOG_LEVEL_INFO
	LogWarn  LogLevel = C.KV_GGML_LOG_LEVEL_WARN
	LogError LogLevel = C.KV_GGML_LOG_LEVEL_ERROR
)

var initOnce sync.Once

// Init initialises the llama.cpp backend once per process and routes its
// log through kvgate's filter. Later calls only change the log level.
func Init(level LogLevel) {
	initOnce.Do(func() {
		C.kv_log_install(C.int(level))
		C.llama_backend_init()
	})
	C.kv_log_set_level(C.int(level))
}

// SystemInfo returns the CPU features llama.cpp was compiled for and detected.
func SystemInfo() string {
	Init(LogError)
	return strings.TrimSpace(C.GoString(C.llama_print_system_info()))
}

func lastLlamaError() string {
	var buf [512]C.char
	n := C.kv_log_last_error(&buf[0], C.int(len(buf)))
	return strings.TrimSpace(C.GoStringN(&buf[0], n))
}

// Errors of model loading.
var (
	// ErrModelNotFound means the model file does not exist or is unreadable.
	ErrModelNotFound = errors.New("model file not found")
	// ErrModelInvalid means the file is not a GGUF model llama.cpp can load.
	ErrModelInvalid = errors.New("invalid model file")
	// ErrModelUnsupported means the model loads but its memory does not work
	// as one KV cell per token, which kvgate's allocator requires.
	ErrModelUnsupported = errors.New("unsupported model")
)

// LoadOptions tunes model loading.
type LoadOptions struct {
	// Progress, when set, is called with values in [0, 1] while the weights
	// load. It runs on the loading goroutine.
	Progress func(fraction float32)
	// UseMmap maps the weights instead of reading them (the default is
	// true; set NoMmap to disable).
	NoMmap bool
}

// Model is a loaded GGUF model. It is safe for concurrent use by the
// vocabulary methods; Close must be called once, after every Engine using it
// has been closed.
type Model struct {
	ptr   *C.struct_llama_model
	vocab *C.struct_llama_vocab
	path  string
	info  native.ModelInfo
	// specials are the tokens llama.cpp matches in text before tokenizing
	// it, read once at load for chat rendering (chat.go).
	specials []chat.Special

	closeOnce sync.Once
}

// loadProgress is what the progress callback of one load sees.
type loadProgress struct {
	ctx context.Context
	fn  func(float32)
}

//export kvgoProgress
func kvgoProgress(progress C.float, handle C.uintptr_t) C.bool {
	p, ok := cgo.Handle(handle).Value().(*loadProgress)
	if !ok {
		return C.bool(true)
	}
	if p.fn != nil {
		p.fn(float32(progress))
	}
	// Returning false makes llama.cpp abandon the load and free what it
	// allocated.
	return C.bool(p.ctx.Err() == nil)
}

// checkGGUF reports a clear error for a file that cannot be a GGUF model,
// before llama.cpp sees it.
func checkGGUF(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("%w: %s: %w", ErrModelNotFound, path, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("%w: %s: %w", ErrModelNotFound, path, err)
	}
	if st.IsDir() {
		return fmt.Errorf("%w: %s is a directory", ErrModelNotFound, path)
	}
	var magic [4]byte
	if _, err := io.ReadFull(f, magic[:]); err != nil {
		return fmt.Errorf("%w: %s: too short to be a GGUF file (%d bytes)", ErrModelInvalid, path, st.Size())
	}
	if !bytes.Equal(magic[:], []byte("GGUF")) {
		return fmt.Errorf("%w: %s: not a GGUF file (magic %q)", ErrModelInvalid, path, magic[:])
	}
	return nil
}

// LoadModel loads a GGUF model for CPU inference. It refuses models whose
// memory is not one KV cell per token (recurrent, hybrid, sliding-window,
// encoder-decoder and diffusion models), with ErrModelUnsupported.
func LoadModel(path string, opts LoadOptions) (*Model, error) {
	return LoadModelContext(context.Background(), path, opts)
}

// LoadModelContext is LoadModel, abandoned when ctx is done: llama.cpp
// stops at its next progress report (many times a second while weights are
// read) and the error wraps ctx.Err().
func LoadModelContext(ctx context.Context, path string, opts LoadOptions) (*Model, error) {
	return loadModel(ctx, path, opts, (*Model).checkSupported)
}

// loadModel loads the model at path and frees it again when check refuses
// it.
func loadModel(ctx context.Context, path string, opts LoadOptions, check func(*Model) error) (*Model, error) {
	Init(LogError)
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("load %s: %w", path, err)
	}
	if err := checkGGUF(path); err != nil {
		return nil, err
	}
	params := C.llama_model_default_params()
	params.n_gpu_layers = 0
	params.use_mmap = C.bool(!opts.NoMmap)
	h := cgo.NewHandle(&loadProgress{ctx: ctx, fn: opts.Progress})
	defer h.Delete()
	C.kv_model_params_set_progress(&params, C.uintptr_t(h))
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	C.kv_log_clear_error()
	ptr := C.llama_model_load_from_file(cpath, params)
	if ptr == nil && ctx.Err() != nil {
		return nil, fmt.Errorf("load %s: %w", path, ctx.Err())
	}
	if ptr == nil {
		msg := lastLlamaError()
		if msg == "" {
			msg = "llama.cpp could not load it"
		}
		return nil, fmt.Errorf("%w: %s: %s", ErrModelInvalid, path, msg)
	}
	m := &Model{ptr: ptr, vocab: C.llama_model_get_vocab(ptr), path: path}
	m.info = m.readInfo()
	if err := check(m); err != nil {
		C.llama_model_free(ptr)
		return nil, err
	}
	m.specials = m.readSpecials()
	return m, nil
}

func (m *Model) checkSupported() error {
	var why string
	switch {
	case bool(C.llama_model_is_recurrent(m.ptr)):
		why = "recurrent models (Mamba, RWKV) keep per-sequence state, not one KV cell per token"
	case bool(C.llama_model_is_hybrid(m.ptr)):
		why = "hybrid models keep recurrent state beside the KV cache"
	case bool(C.llama_model_is_diffusion(m.ptr)):
		why = "diffusion models do not decode token by token"
	case bool(C.llama_model_has_encoder(m.ptr)):
		why = "encoder-decoder and encoder-only models are not served"
	case C.llama_model_n_swa(m.ptr) > 0:
		why = "sliding-window attention caches do not hold one cell per token"
	case m.info.VocabSize <= 0:
		why = "the model has no vocabulary"
	default:
		why = m.checkVocab()
	}
	if why != "" {
		return fmt.Errorf("%w: %s (%s): %s", ErrModelUnsupported, m.path, m.info.Architecture, why)
	}
	return nil
}

// Vocabulary types, as in llama.h's enum llama_vocab_type.
const (
	vocabNone = 0
	vocabSPM  = 1
	vocabWPM  = 3
)

// checkVocab returns why the tokenizer could abort the process on some
// input text, or "". llama.cpp's tokenizer asserts or throws (and a C++
// exception through the C API aborts) where the vocabulary lacks what it
// assumes:
//   - every type but RWKV asserts BOS (and EOS) exist when the vocabulary
//     asks for them to be added; WordPiece adds BOS and SEP always;
//   - the SentencePiece tokenizer spells text it has no token for as byte
//     tokens (llm_tokenizer_spm_session::resegment), and byte_to_token
//     throws std::out_of_range when one of the 256 is missing.
func (m *Model) checkVocab() string {
	v := m.vocab
	typ := int(C.llama_vocab_type(v))
	bos, eos, sep := C.llama_vocab_bos(v), C.llama_vocab_eos(v), C.llama_vocab_sep(v)
	switch {
	case typ == vocabNone:
		return "the model has no tokenizer"
	case bool(C.llama_vocab_get_add_bos(v)) && bos < 0:
		return "the vocabulary asks for a BOS token but has none"
	case bool(C.llama_vocab_get_add_eos(v)) && eos < 0:
		return "the vocabulary asks for an EOS token but has none"
	case typ == vocabWPM && (bos < 0 || sep < 0):
		return "the WordPiece vocabulary lacks the BOS or SEP token it always adds"
	case typ == vocabSPM:
		var have [256]bool
		for id := range C.llama_vocab_n_tokens(v) {
			t := C.GoString(C.llama_vocab_get_text(v, id))
			switch {
			case len(t) == 6 && strings.HasPrefix(t, "<0x") && t[5] == '>':
				if b, err := strconv.ParseUint(t[3:5], 16, 8); err == nil && strings.ToUpper(t[3:5]) == t[3:5] {
					have[b] = true
				}
			case len(t) == 1:
				have[t[0]] = true
			}
		}
		for b, ok := range have {
			if !ok {
				return fmt.Sprintf("the SentencePiece vocabulary has no byte token for 0x%02X, which llama.cpp's tokenizer needs for text outside the vocabulary", b)
			}
		}
	}
	return ""
}

func (m *Model) metaString(key string) string {
	ckey := C.CString(key)
	defer C.free(unsafe.Pointer(ckey))
	var buf [256]C.char
	n := C.llama_model_meta_val_str(m.ptr, ckey, &buf[0], C.size_t(len(buf)))
	if n < 0 {
		return ""
	}
	return C.GoString(&buf[0])
}

func (m *Model) readInfo() native.ModelInfo {
	var desc [256]C.char
	C.llama_model_desc(m.ptr, &desc[0], C.size_t(len(desc)))
	return native.ModelInfo{
		Path:            m.path,
		Architecture:    m.metaString("general.architecture"),
		Description:     C.GoString(&desc[0]),
		ParameterCount:  uint64(C.llama_model_n_params(m.ptr)),
		SizeBytes:       uint64(C.llama_model_size(m.ptr)),
		TrainingContext: int(C.llama_model_n_ctx_train(m.ptr)),
		VocabSize:       int(C.llama_vocab_n_tokens(m.vocab)),
		EmbeddingSize:   int(C.llama_model_n_embd(m.ptr)),
		Layers:          int(C.llama_model_n_layer(m.ptr)),
		Heads:           int(C.llama_model_n_head(m.ptr)),
		HeadsKV:         int(C.llama_model_n_head_kv(m.ptr)),
		HasChatTemplate: C.llama_model_chat_template(m.ptr, nil) != nil,
		AddBOS:          bool(C.llama_vocab_get_add_bos(m.vocab)),
		BOS:             int32(C.llama_vocab_bos(m.vocab)),
		EOS:             int32(C.llama_vocab_eos(m.vocab)),
	}
}

// Info returns the model's metadata.
func (m *Model) Info() native.ModelInfo { return m.info }

// Close frees the model. It is idempotent.
func (m *Model) Close() {
	m.closeOnce.Do(func() {
		if m.ptr != nil {
			C.llama_model_free(m.ptr)
			m.ptr = nil
			m.vocab = nil
		}
	})
}

// ValidTokens returns the index of the first token id outside the
// vocabulary, or -1 when every id is valid.
func (m *Model) ValidTokens(ids []int32) int {
	n := int32(m.info.VocabSize)
	for i, id := range ids {
		if id < 0 || id >= n {
			return i
		}
	}
	return -1
}

// MaxTokenizeBytes is the longest text Tokenize accepts. llama.cpp's
// tokenizer holds about 30 bytes of temporary memory per byte of text
// (copies of the text, its code points, its fragments), and a failed
// allocation in there throws std::bad_alloc through the C API, which aborts
// the process: 16 MiB of text costs about half a gigabyte.
const MaxTokenizeBytes = 16 << 20

// Tokenize returns the token ids of text. addSpecial adds a
// beginning-of-sequence token when the model uses one; parseSpecial parses
// special-token markers written in the text. Text longer than
// MaxTokenizeBytes is refused.
func (m *Model) Tokenize(text string, addSpecial, parseSpecial bool) ([]int32, error) {
	if len(text) > MaxTokenizeBytes {
		return nil, fmt.Errorf("tokenize: text of %d bytes is longer than %d", len(text), MaxTokenizeBytes)
	}
	ctext := C.CString(text)
	defer C.free(unsafe.Pointer(ctext))
	capacity := len(text) + 8
	for range 2 {
		out := make([]int32, capacity)
		var first *C.llama_token
		if capacity > 0 {
			first = (*C.llama_token)(unsafe.Pointer(&out[0]))
		}
		n := C.llama_tokenize(m.vocab, ctext, C.int32_t(len(text)), first, C.int32_t(capacity),
			C.bool(addSpecial), C.bool(parseSpecial))
		if n >= 0 {
			return out[:n], nil
		}
		if n == -2147483648 {
			return nil, errors.New("tokenize: result overflows int32")
		}
		capacity = int(-n)
	}
	return nil, errors.New("tokenize: token count changed between calls")
}

// AppendPiece appends the text of one token to dst, rendering special
// tokens when renderSpecial is set and stripping a leading space when lstrip
// is. A token outside the vocabulary appends nothing (llama.cpp would throw
// std::out_of_range, which aborts the process).
func (m *Model) AppendPiece(dst []byte, tok int32, renderSpecial bool, lstrip bool) []byte {
	if tok < 0 || int(tok) >= m.info.VocabSize {
		return dst
	}
	var strip C.int32_t
	if lstrip {
		strip = 1
	}
	var small [64]byte
	n := C.llama_token_to_piece(m.vocab, C.llama_token(tok), (*C.char)(unsafe.Pointer(&small[0])),
		C.int32_t(len(small)), strip, C.bool(renderSpecial))
	if n >= 0 {
		return append(dst, small[:n]...)
	}
	big := make([]byte, -n)
	n = C.llama_token_to_piece(m.vocab, C.llama_token(tok), (*C.char)(unsafe.Pointer(&big[0])),
		C.int32_t(len(big)), strip, C.bool(renderSpecial))
	if n < 0 {
		return dst
	}
	return append(dst, big[:n]...)
}

// Detokenize returns the concatenated pieces of ids: the same text that
// Generate streams for them. Invalid UTF-8 is replaced by U+FFFD. It returns
// native.ErrTokenOutOfRange for an id outside the vocabulary.
func (m *Model) Detokenize(ids []int32, opts native.DetokenizeOptions) (string, error) {
	if i := m.ValidTokens(ids); i >= 0 {
		return "", fmt.Errorf("%w: ids[%d] = %d, vocabulary size %d", native.ErrTokenOutOfRange, i, ids[i], m.info.VocabSize)
	}
	var out []byte
	for i, id := range ids {
		out = m.AppendPiece(out, id, opts.RenderSpecial, opts.StripLeadingSpace && i == 0)
	}
	if !utf8.Valid(out) {
		return strings.ToValidUTF8(string(out), "\uFFFD"), nil
	}
	return string(out), nil
}

// IsEOG reports whether tok ends generation (EOS, EOT and the like).
func (m *Model) IsEOG(tok int32) bool {
	return bool(C.llama_vocab_is_eog(m.vocab, C.llama_token(tok)))
}

var _ native.Vocab = (*Model)(nil)
