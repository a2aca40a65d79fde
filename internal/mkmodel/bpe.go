package mkmodel

import (
	"fmt"
	"strings"
	"sync"
)

// bpeSpace is "Ġ", U+0120: byte 0x20 (space) in GPT-2's byte-to-unicode
// mapping, which starts the tokens of words that follow a space.
const bpeSpace = "\u0120"

// bpeEndOfText is the built-in BPE vocabulary's one control token, GPT-2's
// <|endoftext|>, used as both BOS and EOS.
const bpeEndOfText = "<|endoftext|>"

// gpt2Bytes returns GPT-2's byte-to-unicode mapping (bytes_to_unicode in
// its encoder.py, unicode_byte_to_utf8 in llama.cpp) in GPT-2's vocabulary
// order: the printable bytes '!'..'~', '¡'..'¬' and '®'..'ÿ' stand for
// themselves, and the other 68 bytes (control characters, space, 0x7F..0xA0
// and the soft hyphen 0xAD) for U+0100 onwards, in byte order. order[i] is
// the byte of token i, and char[b] the text of the token of byte b.
func gpt2Bytes() (order [256]byte, char [256]string) {
	printable := func(b int) bool {
		return '!' <= b && b <= '~' || 0xA1 <= b && b <= 0xAC || 0xAE <= b && b <= 0xFF
	}
	i := 0
	for b := range 256 {
		if printable(b) {
			order[i], char[b] = byte(b), string(rune(b))
			i++
		}
	}
	n := 0
	for b := range 256 {
		if !printable(b) {
			order[i], char[b] = byte(b), string(rune(256+n))
			i++
			n++
		}
	}
	return order, char
}

// bpeWords returns the words the built-in BPE vocabulary's merges spell
// out, in byte-to-unicode form: each of builtinWords after a space
// ("Ġthe") and at the start of a text ("the").
func bpeWords() []string {
	_, char := gpt2Bytes()
	var words []string
	for _, w := range builtinWords {
		var b strings.Builder
		for _, c := range []byte(w) {
			b.WriteString(char[c])
		}
		words = append(words, bpeSpace+b.String(), b.String())
	}
	return words
}

// bpeBuiltin holds the fixed part of the built-in BPE vocabulary: the 256
// byte tokens and the tokens of the merges, in token order, and the merges
// in rank order.
var bpeBuiltin = sync.OnceValues(func() ([]string, []string) {
	order, char := gpt2Bytes()
	toks := make([]string, 0, 512)
	for _, b := range order {
		toks = append(toks, char[b])
	}
	merges, made := trainBPE(bpeWords())
	seen := make(map[string]bool, len(toks)+len(made))
	for _, t := range toks {
		seen[t] = true
	}
	for _, t := range made {
		if !seen[t] {
			seen[t] = true
			toks = append(toks, t)
		}
	}
	return toks, merges
})

// trainBPE learns byte-pair merges that spell every word of words as one
// token, as BPE training does: it repeatedly merges the most frequent
// adjacent pair of symbols (the first met, on ties) until no word has two
// symbols. Each round re-encodes the words with bpeEncode and the merges so
// far, so the segmentation it counts is exactly the one llama.cpp's BPE
// tokenizer produces. It returns the merges in rank order, as "left right",
// and the token each one makes.
func trainBPE(words []string) (merges, made []string) {
	ranks := map[[2]string]int{}
	for {
		type pairCount struct {
			pair  [2]string
			count int
		}
		var pairs []pairCount
		index := map[[2]string]int{}
		for _, w := range words {
			syms := bpeEncode(w, ranks)
			for i := 0; i+1 < len(syms); i++ {
				p := [2]string{syms[i], syms[i+1]}
				j, ok := index[p]
				if !ok {
					j = len(pairs)
					index[p] = j
					pairs = append(pairs, pairCount{pair: p})
				}
				pairs[j].count++
			}
		}
		if len(pairs) == 0 {
			return merges, made
		}
		best := pairs[0]
		for _, pc := range pairs[1:] {
			if pc.count > best.count {
				best = pc
			}
		}
		ranks[best.pair] = len(merges)
		merges = append(merges, best.pair[0]+" "+best.pair[1])
		made = append(made, best.pair[0]+best.pair[1])
	}
}

// bpeEncode splits word (in byte-to-unicode form) into symbols the way
// llama.cpp's llm_tokenizer_bpe_session does for one pre-tokenized word:
// it starts from the characters and repeatedly merges the adjacent pair of
// lowest rank, the leftmost on ties, until no adjacent pair has a rank.
func bpeEncode(word string, ranks map[[2]string]int) []string {
	var syms []string
	for _, r := range word {
		syms = append(syms, string(r))
	}
	for {
		best, at := -1, -1
		for i := 0; i+1 < len(syms); i++ {
			if r, ok := ranks[[2]string{syms[i], syms[i+1]}]; ok && (best < 0 || r < best) {
				best, at = r, i
			}
		}
		if at < 0 {
			return syms
		}
		syms[at] += syms[at+1]
		syms = append(syms[:at+1], syms[at+2:]...)
	}
}

var bpeMinSize = sync.OnceValue(func() int {
	toks, _ := bpeBuiltin()
	return len(toks) + 1
})

// BuiltinBPEVocabMinSize returns the size of the smallest built-in
// byte-level BPE vocabulary: its byte tokens, the tokens of its merges and
// <|endoftext|>.
func BuiltinBPEVocabMinSize() int { return bpeMinSize() }

// BuiltinBPEVocab returns a GPT-2-style byte-level BPE ("gpt2") vocabulary
// of size tokens that needs no file, for llama.cpp's "gpt-2"
// pre-tokenizer:
//
//   - tokens 0..255 are the 256 bytes in GPT-2's byte-to-unicode form and
//     order ("!" is token 0, "Ġ", the space, token 220), so any text
//     tokenizes and detokenizes losslessly;
//   - then the tokens of the merges (tokenizer.ggml.merges), learnt like BPE
//     training from the words of the built-in SentencePiece vocabulary after
//     a space ("Ġthe") and at the start of a text ("the"), so llama.cpp's
//     BPE tokenizer turns each of those words into one token;
//   - then made-up syllable words ("Ġbado", ...) up to size-1, which no
//     merge reaches (the model can emit them; tokenizing their text gives
//     smaller tokens);
//   - and last, as in GPT-2, the control token <|endoftext|>, which is BOS
//     and EOS (and, by its text, llama.cpp's end of turn).
//
// As with GPT-2, llama.cpp adds no BOS or EOS token when it tokenizes. size
// 0 means BuiltinBPEVocabMinSize().
func BuiltinBPEVocab(size int) (*Vocab, error) {
	fixed, merges := bpeBuiltin()
	if size == 0 {
		size = BuiltinBPEVocabMinSize()
	}
	if size < BuiltinBPEVocabMinSize() {
		return nil, fmt.Errorf("built-in BPE vocabulary: size %d is below the minimum %d", size, BuiltinBPEVocabMinSize())
	}
	if size > 1<<24 {
		return nil, fmt.Errorf("built-in BPE vocabulary: size %d is too large", size)
	}
	toks := appendFiller(append([]string(nil), fixed...), size-1, bpeSpace)
	toks = append(toks, bpeEndOfText)
	types := make([]int32, size)
	for i := range types {
		types[i] = tokenNormal
	}
	eot := uint32(size - 1)
	types[eot] = tokenControl
	return &Vocab{
		size:   size,
		model:  "gpt2",
		source: "built-in",
		kvs: []KV{
			{"tokenizer.ggml.model", "gpt2"},
			{"tokenizer.ggml.pre", "gpt-2"},
			{"tokenizer.ggml.tokens", toks},
			{"tokenizer.ggml.token_type", types},
			{"tokenizer.ggml.merges", append([]string(nil), merges...)},
			{"tokenizer.ggml.bos_token_id", eot},
			{"tokenizer.ggml.eos_token_id", eot},
			{"tokenizer.ggml.add_bos_token", false},
			{"tokenizer.ggml.add_eos_token", false},
		},
	}, nil
}
