package llama

/*
#include <stdlib.h>
#include <string.h>
#include "llama_api.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"unsafe"

	"github.com/kvgate/kvgate/internal/chat"
)

// ErrUnknownTemplate means llama_chat_apply_template does not recognize a
// template: it is neither a built-in name nor a Jinja template whose
// markers match one of the built-in families.
var ErrUnknownTemplate = errors.New("llama.cpp does not recognize the chat template")

// MaxChatBytes bounds a rendered conversation: a longer one could not be
// tokenized (MaxTokenizeBytes).
const MaxChatBytes = MaxTokenizeBytes

// BuiltinTemplates returns the names of llama.cpp's built-in chat
// templates (llama_chat_builtin_templates), sorted.
func BuiltinTemplates() []string {
	n := C.llama_chat_builtin_templates(nil, 0)
	if n <= 0 {
		return nil
	}
	ptrs := make([]*C.char, n)
	n = C.llama_chat_builtin_templates(&ptrs[0], C.size_t(len(ptrs)))
	names := make([]string, 0, n)
	for _, p := range ptrs[:min(int(n), len(ptrs))] {
		names = append(names, C.GoString(p))
	}
	slices.Sort(names)
	return names
}

// ApplyTemplate renders msgs with tmpl (a built-in name or a model's Jinja
// template, which llama.cpp matches to a built-in family), adding the
// assistant's generation prompt after the last message when addAssistant
// is set. Every value is checked before it reaches llama.cpp: at least one
// message, non-empty roles (openchat writes role[0]), no NUL byte in any
// string (they are C strings), and a result of at most MaxChatBytes.
// llama_chat_apply_template returns the length it needs; a buffer too small
// is grown once to that length.
func ApplyTemplate(tmpl string, msgs []chat.Message, addAssistant bool) (string, error) {
	switch {
	case tmpl == "":
		return "", fmt.Errorf("chat template: %w: empty", ErrUnknownTemplate)
	case strings.IndexByte(tmpl, 0) >= 0:
		return "", fmt.Errorf("chat template: %w: it holds a NUL byte", ErrUnknownTemplate)
	case len(msgs) == 0:
		return "", errors.New("chat template: no messages")
	}
	total := len(tmpl) + 1
	for i, m := range msgs {
		if m.Role == "" {
			return "", fmt.Errorf("chat template: messages[%d]: empty role", i)
		}
		if strings.IndexByte(m.Role, 0) >= 0 || strings.IndexByte(m.Content, 0) >= 0 {
			return "", fmt.Errorf("chat template: messages[%d]: a NUL byte", i)
		}
		total += len(m.Role) + len(m.Content) + 2
		if total > MaxChatBytes {
			return "", fmt.Errorf("chat template: the messages are longer than %d bytes", MaxChatBytes)
		}
	}
	// One C block: the template, then each role and content, NUL-ended,
	// and the message array after them.
	arr := C.size_t(len(msgs)) * C.size_t(unsafe.Sizeof(C.llama_chat_message{}))
	block := C.malloc(C.size_t(total) + arr + 16)
	if block == nil {
		return "", errors.New("chat template: out of memory")
	}
	defer C.free(block)
	bytes := unsafe.Slice((*byte)(block), total)
	off := 0
	put := func(s string) *C.char {
		p := (*C.char)(unsafe.Pointer(&bytes[off]))
		off += copy(bytes[off:], s)
		bytes[off] = 0
		off++
		return p
	}
	ctmpl := put(tmpl)
	pad := (16 - (uintptr(block)+uintptr(total))%16) % 16
	cmsgs := unsafe.Slice((*C.llama_chat_message)(unsafe.Add(block, uintptr(total)+pad)), len(msgs))
	for i, m := range msgs {
		cmsgs[i].role = put(m.Role)
		cmsgs[i].content = put(m.Content)
	}
	size := min(2*total+256*len(msgs)+1024, MaxChatBytes)
	for range 2 {
		buf := C.malloc(C.size_t(size))
		if buf == nil {
			return "", errors.New("chat template: out of memory")
		}
		n := C.llama_chat_apply_template(ctmpl, &cmsgs[0], C.size_t(len(msgs)), C.bool(addAssistant), (*C.char)(buf), C.int32_t(size))
		switch {
		case n < 0:
			C.free(buf)
			return "", fmt.Errorf("chat template: %w", ErrUnknownTemplate)
		case int(n) <= size:
			out := C.GoStringN((*C.char)(buf), C.int(n))
			C.free(buf)
			return out, nil
		case int(n) > MaxChatBytes:
			C.free(buf)
			return "", fmt.Errorf("chat template: the rendering of %d bytes is longer than %d", n, MaxChatBytes)
		}
		C.free(buf)
		size = int(n)
	}
	return "", errors.New("chat template: the rendering's length changed between calls")
}

// probes are the conversations that tell built-in templates apart: system,
// user and assistant turns, contents with spaces around (which some
// families trim), with and without the generation prompt.
var probes = []struct {
	msgs []chat.Message
	add  bool
}{
	{[]chat.Message{{Role: "system", Content: " Sys one "}, {Role: "user", Content: "User one"}, {Role: "assistant", Content: " Bot one "}, {Role: "user", Content: "User two "}}, true},
	{[]chat.Message{{Role: "user", Content: "Only user"}}, false},
	{[]chat.Message{{Role: "user", Content: "U"}, {Role: "assistant", Content: "A"}}, false},
	{[]chat.Message{{Role: "user", Content: "U"}, {Role: "tool", Content: "T"}}, true}, // exaone3 and exaone4 differ in tool turns alone
}

func probe(tmpl string) ([]string, error) {
	out := make([]string, len(probes))
	for i, p := range probes {
		s, err := ApplyTemplate(tmpl, p.msgs, p.add)
		if err != nil {
			return nil, err
		}
		out[i] = s
	}
	return out, nil
}

// DetectTemplate returns the name of the built-in template that llama.cpp
// renders tmpl with. llama.cpp does not export its detection
// (llm_chat_detect_template is internal C++), so the name is found through
// the public API: tmpl is rendered on a few probe conversations, and the
// first built-in name (sorted) whose renderings are the same byte for byte
// is it; a tmpl that is itself a built-in name is that name.
// TestDetectBuiltins checks that the probes tell every built-in apart. It
// returns ErrUnknownTemplate when llama.cpp does not recognize tmpl.
func DetectTemplate(tmpl string) (string, error) {
	names := BuiltinTemplates()
	if slices.Contains(names, tmpl) {
		return tmpl, nil
	}
	want, err := probe(tmpl)
	if err != nil {
		return "", err
	}
	for _, name := range names {
		got, err := probe(name)
		if err == nil && slices.Equal(got, want) {
			return name, nil
		}
	}
	return "", fmt.Errorf("chat template: %w: it renders like no built-in template", ErrUnknownTemplate)
}

// RawChatTemplate returns the model's tokenizer.chat_template
// (llama_model_chat_template), or "" when it has none.
func (m *Model) RawChatTemplate() string {
	p := C.llama_model_chat_template(m.ptr, nil)
	if p == nil {
		return ""
	}
	return C.GoString(p)
}

// Token attributes, as in llama.h's enum llama_token_attr.
const (
	attrUnknown     = 1 << 0
	attrControl     = 1 << 3
	attrUserDefined = 1 << 4
	attrLStrip      = 1 << 7
	attrRStrip      = 1 << 8
)

// tokenAttr returns the llama_token_attr bits of a token, 0 outside the
// vocabulary.
func (m *Model) tokenAttr(id int32) int32 {
	if id < 0 || int(id) >= m.info.VocabSize {
		return 0
	}
	return int32(C.llama_vocab_get_attr(m.vocab, C.llama_token(id)))
}

// readSpecials returns the tokens llama.cpp matches in text before
// tokenizing it (cache_special_tokens in llama-vocab.cpp): those with the
// attribute CONTROL, USER_DEFINED or UNKNOWN, with their strip flags.
func (m *Model) readSpecials() []chat.Special {
	var out []chat.Special
	for id := range C.llama_vocab_n_tokens(m.vocab) {
		attr := C.llama_vocab_get_attr(m.vocab, id)
		if attr&(attrUnknown|attrControl|attrUserDefined) == 0 {
			continue
		}
		out = append(out, chat.Special{
			ID: int32(id), Text: C.GoString(C.llama_vocab_get_text(m.vocab, id)),
			LStrip: attr&attrLStrip != 0, RStrip: attr&attrRStrip != 0,
		})
	}
	return out
}

// ChatVocab returns what package chat needs of the vocabulary: the special
// tokens (read once, at load), BOS and EOS and whether llama_tokenize adds
// them, and a tokenizer with special-token parsing off.
func (m *Model) ChatVocab() chat.Vocab {
	return chat.Vocab{
		Specials: m.specials,
		BOS:      m.info.BOS, EOS: m.info.EOS,
		AddBOS: m.info.AddBOS, AddEOS: bool(C.llama_vocab_get_add_eos(m.vocab)),
		TokenizeRaw: func(text string) ([]int32, error) { return m.Tokenize(text, false, false) },
	}
}

// ChatTemplate returns the chat template of m: the built-in named override
// when it is set, else the model's own template. The template renders with
// the model's template text itself (so llama.cpp's detection decides, not
// the probe), and is named after the built-in DetectTemplate finds. A model
// without a template, or with one llama.cpp does not recognize, gets an
// error wrapping chat.ErrNoTemplate; an override that is not a built-in
// name gets ErrUnknownTemplate, listing the names.
func (m *Model) ChatTemplate(override string) (*chat.Template, error) {
	tmpl, name := override, override
	if override != "" {
		if !slices.Contains(BuiltinTemplates(), override) {
			return nil, fmt.Errorf("%w: %q is not a built-in template (want one of %s)", ErrUnknownTemplate, override, strings.Join(BuiltinTemplates(), ", "))
		}
	} else {
		tmpl = m.RawChatTemplate()
		if tmpl == "" {
			return nil, fmt.Errorf("%w: the model has no tokenizer.chat_template; start the server with --chat-template NAME", chat.ErrNoTemplate)
		}
		var err error
		if name, err = DetectTemplate(tmpl); err != nil {
			return nil, fmt.Errorf("%w: llama.cpp does not recognize the model's chat template (%w); start the server with --chat-template NAME", chat.ErrNoTemplate, err)
		}
	}
	render := func(msgs []chat.Message, add bool) (string, error) { return ApplyTemplate(tmpl, msgs, add) }
	return chat.New(name, render, m.ChatVocab()), nil
}
