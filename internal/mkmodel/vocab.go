package mkmodel

import (
	"fmt"
	"strings"
	"sync"
)

// Token types of tokenizer.ggml.token_type, as in llama.cpp's
// llama_token_type.
const (
	tokenNormal  int32 = 1
	tokenUnknown int32 = 2
	tokenControl int32 = 3
	tokenByte    int32 = 6
)

// spaceMark is SentencePiece's visible space, U+2581, which starts the
// pieces of words that follow a space.
const spaceMark = "\u2581"

// Vocab is a tokenizer: the tokenizer.* metadata entries of a GGUF file.
type Vocab struct {
	kvs    []KV
	size   int
	model  string
	source string
}

// Size returns the number of tokens.
func (v *Vocab) Size() int { return v.size }

// Model returns the tokenizer model, tokenizer.ggml.model: "llama" for
// SentencePiece, "gpt2" for byte-level BPE.
func (v *Vocab) Model() string { return v.model }

// Source describes where the vocabulary came from: a file path, or
// "built-in".
func (v *Vocab) Source() string { return v.source }

// KVs returns the tokenizer.* metadata entries. The caller must not modify
// them.
func (v *Vocab) KVs() []KV { return v.kvs }

// LoadVocab reads the tokenizer of the GGUF file at path (a model or a
// vocabulary-only file such as llama.cpp's ggml-vocab-*.gguf). Every
// tokenizer.* entry is kept verbatim, with its value type.
func LoadVocab(path string) (*Vocab, error) {
	kvs, err := ReadKVs(path)
	if err != nil {
		return nil, fmt.Errorf("load vocabulary: %w", err)
	}
	v := &Vocab{source: path}
	for _, kv := range kvs {
		if !strings.HasPrefix(kv.Key, "tokenizer.") {
			continue
		}
		v.kvs = append(v.kvs, kv)
		switch kv.Key {
		case "tokenizer.ggml.tokens":
			toks, ok := kv.Value.([]string)
			if !ok {
				return nil, fmt.Errorf("load vocabulary %s: %w: tokenizer.ggml.tokens is %T, not a string array", path, ErrFormat, kv.Value)
			}
			v.size = len(toks)
		case "tokenizer.ggml.model":
			v.model, _ = kv.Value.(string)
		}
	}
	if v.size == 0 {
		return nil, fmt.Errorf("load vocabulary %s: %w: no tokenizer.ggml.tokens", path, ErrFormat)
	}
	if v.model == "" {
		return nil, fmt.Errorf("load vocabulary %s: %w: no tokenizer.ggml.model", path, ErrFormat)
	}
	return v, nil
}

// builtinWords are the common words whose pieces the built-in vocabulary
// carries, in order of preference.
var builtinWords = []string{
	"the", "and", "to", "a", "was", "he", "she", "it", "of", "in", "they",
	"her", "his", "said", "with", "you", "I", "that", "is", "on", "for",
	"day", "One", "Once", "upon", "time", "there", "little", "big", "happy",
	"play", "friend", "saw", "very", "wanted", "had", "Tim", "Lily", "mom",
}

var builtinMinSize = sync.OnceValue(func() int { return len(builtinPieces()) })

// BuiltinVocabMinSize returns the size of the smallest built-in
// vocabulary: its special, byte, character and word-piece tokens.
func BuiltinVocabMinSize() int { return builtinMinSize() }

// builtinPieces returns the fixed part of the built-in vocabulary: the
// special tokens, the 256 byte tokens, the printable ASCII characters and
// the SentencePiece prefixes of builtinWords.
func builtinPieces() []string {
	toks := []string{"<unk>", "<s>", "</s>"}
	for b := range 256 {
		toks = append(toks, fmt.Sprintf("<0x%02X>", b))
	}
	toks = append(toks, spaceMark)
	for c := '!'; c <= '~'; c++ {
		toks = append(toks, string(c))
	}
	seen := map[string]bool{}
	for _, t := range toks {
		seen[t] = true
	}
	// SentencePiece merges adjacent pieces only when their concatenation
	// is a token, so a word is reachable through all of its prefixes.
	for _, w := range builtinWords {
		word := spaceMark + w
		for i := len(spaceMark) + 1; i <= len(word); i++ {
			if p := word[:i]; !seen[p] {
				seen[p] = true
				toks = append(toks, p)
			}
		}
	}
	return toks
}

// BuiltinVocab returns a SentencePiece ("llama") vocabulary of size tokens
// that needs no file: <unk>, <s>, </s>, the 256 byte tokens <0x00>..<0xFF>
// (so that any text tokenizes, by byte fallback), the printable ASCII
// characters, pieces of a few common English words, and then made-up
// syllable words up to size. size 0 means BuiltinVocabMinSize().
func BuiltinVocab(size int) (*Vocab, error) {
	toks := builtinPieces()
	if size == 0 {
		size = len(toks)
	}
	if size < len(toks) {
		return nil, fmt.Errorf("built-in vocabulary: size %d is below the minimum %d", size, len(toks))
	}
	if size > 1<<24 {
		return nil, fmt.Errorf("built-in vocabulary: size %d is too large", size)
	}
	toks = appendFiller(toks, size, spaceMark)
	scores := make([]float32, size)
	types := make([]int32, size)
	for i := range toks {
		switch {
		case i == 0:
			types[i] = tokenUnknown
		case i < 3:
			types[i] = tokenControl
		case i < 3+256:
			types[i] = tokenByte
		default:
			types[i] = tokenNormal
			// Earlier pieces win SentencePiece merges, like frequent
			// pieces in a trained vocabulary.
			scores[i] = -float32(i - 3 - 256)
		}
	}
	return &Vocab{
		size:   size,
		model:  "llama",
		source: "built-in",
		kvs: []KV{
			{"tokenizer.ggml.model", "llama"},
			{"tokenizer.ggml.pre", "default"},
			{"tokenizer.ggml.tokens", toks},
			{"tokenizer.ggml.scores", scores},
			{"tokenizer.ggml.token_type", types},
			{"tokenizer.ggml.bos_token_id", uint32(1)},
			{"tokenizer.ggml.eos_token_id", uint32(2)},
			{"tokenizer.ggml.unknown_token_id", uint32(0)},
			{"tokenizer.ggml.add_bos_token", true},
			{"tokenizer.ggml.add_eos_token", false},
		},
	}, nil
}

// appendFiller appends made-up words that start with space, the
// vocabulary's mark of a leading space ("▁bado", "▁kimelu", ... or "Ġbado",
// ...), to toks until it holds size tokens, skipping any already present.
// Random-weight models emit them, so generated text is visible words rather
// than stray bytes.
func appendFiller(toks []string, size int, space string) []string {
	if len(toks) >= size {
		return toks
	}
	const consonants, vowels = "bdfghklmnprstvwz", "aeiou"
	var syl []string
	for _, c := range consonants {
		for _, v := range vowels {
			syl = append(syl, string(c)+string(v))
		}
	}
	seen := make(map[string]bool, size)
	for _, t := range toks {
		seen[t] = true
	}
	// Words of 2, 3, 4, ... syllables, in a fixed order.
	idx := []int{0, 0}
	for len(toks) < size {
		var b strings.Builder
		b.WriteString(space)
		for _, i := range idx {
			b.WriteString(syl[i])
		}
		if w := b.String(); !seen[w] {
			seen[w] = true
			toks = append(toks, w)
		}
		// Advance idx like an odometer, growing it when it wraps.
		k := len(idx) - 1
		for k >= 0 {
			idx[k]++
			if idx[k] < len(syl) {
				break
			}
			idx[k] = 0
			k--
		}
		if k < 0 {
			idx = append(idx, 0)
		}
	}
	return toks
}
