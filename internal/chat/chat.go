// Package chat turns a conversation into prompt token ids without letting a
// message's content become a special token.
//
// llama.cpp renders a conversation with llama_chat_apply_template into one
// string. Tokenizing that string with special-token parsing on would turn a
// marker such as "<|im_end|>" written by a user into the control token;
// tokenizing it with parsing off would lose the template's own markers. So
// the conversation is rendered twice: once with the real contents (the
// prompt text) and once with a unique sentinel in place of each content.
// The sentinel rendering splits into template pieces and content slots
// (Split), which are checked against the real rendering byte for byte; some
// built-in templates trim a content, which Split accepts and nothing else.
// Only the template pieces are then partitioned on the vocabulary's special
// tokens, with llama.cpp's own rules (Partition, the same set and order as
// llama_vocab::impl::tokenizer_st_partition); contents stay raw text. Each
// run of raw text (template text and content merged) is tokenized with
// special-token parsing off, special tokens are emitted as ids, and a BOS is
// added as llama_tokenize would add it (Template.Render).
//
// For contents without markers the ids equal those of llama_tokenize(text,
// add_special=true, parse_special=true) on the whole rendering: a
// SentencePiece tokenizer prefixes a raw fragment with a space only at the
// start or after a special token, which is where each merged raw fragment
// begins (native/llama's TestChatTokensMatchWholeText checks it on several
// vocabularies).
package chat

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Message is one turn of a conversation.
type Message struct {
	// Role is the speaker, such as "system", "user" or "assistant".
	Role string
	// Content is the turn's text.
	Content string
}

// Errors of rendering.
var (
	// ErrNoTemplate means the model has no chat template llama.cpp can
	// render, and the server names none.
	ErrNoTemplate = errors.New("no usable chat template")
	// ErrRender means the template cannot render this conversation as
	// template text around unchanged contents (see Split).
	ErrRender = errors.New("cannot render the conversation")
)

// Special is a token of the vocabulary that llama.cpp matches in text
// before tokenizing it: a control, user-defined or unknown token.
type Special struct {
	// ID is the token id.
	ID int32
	// Text is the token's text as written in a prompt.
	Text string
	// LStrip and RStrip drop the whitespace left and right of the token
	// (LLAMA_TOKEN_ATTR_LSTRIP, _RSTRIP).
	LStrip, RStrip bool
}

// Span is a part of a rendered prompt: template text, or a message's
// content.
type Span struct {
	// Text is the span's bytes.
	Text string
	// Content marks a message's content; Message is its index.
	Content bool
	Message int
}

// The sentinel stands in for message i's content in the second rendering:
// U+F0000 (a plane-15 private-use code point), i in decimal, U+F0001. It has
// no whitespace, so templates that trim a content leave it whole; roles are
// validated to letters, digits, '_' and '-', and no built-in template writes
// private-use code points, so the markers occur only where a content was.
const (
	sentinelOpen  = "\U000F0000"
	sentinelClose = "\U000F0001"
)

// Sentinel returns the stand-in of message i's content.
func Sentinel(i int) string {
	return sentinelOpen + strconv.Itoa(i) + sentinelClose
}

// SentinelMessages returns msgs with each content replaced by its
// sentinel.
func SentinelMessages(msgs []Message) []Message {
	out := make([]Message, len(msgs))
	for i, m := range msgs {
		out[i] = Message{Role: m.Role, Content: Sentinel(i)}
	}
	return out
}

// isSpace is C's isspace in the "C" locale, the test of llama.cpp's trim.
func isSpace(b byte) bool {
	return b == ' ' || b == '\t' || b == '\n' || b == '\v' || b == '\f' || b == '\r'
}

// TrimC trims s as llama-chat.cpp's trim does: C whitespace at both ends.
func TrimC(s string) string {
	i, j := 0, len(s)
	for i < j && isSpace(s[i]) {
		i++
	}
	for j > i && isSpace(s[j-1]) {
		j--
	}
	return s[i:j]
}

// parseSentinels splits a sentinel rendering into template pieces and the
// message indices of the slots between them: pieces has one more element
// than slots.
func parseSentinels(s string, n int) (pieces []string, slots []int, err error) {
	for {
		i := strings.Index(s, sentinelOpen)
		if i < 0 {
			if strings.Contains(s, sentinelClose) {
				return nil, nil, fmt.Errorf("%w: the template wrote a stray content marker", ErrRender)
			}
			return append(pieces, s), slots, nil
		}
		rest := s[i+len(sentinelOpen):]
		j := strings.Index(rest, sentinelClose)
		if j <= 0 || j > 10 {
			return nil, nil, fmt.Errorf("%w: the template changed a message's content", ErrRender)
		}
		k, perr := strconv.Atoi(rest[:j])
		if perr != nil || k < 0 || k >= n || rest[:j] != strconv.Itoa(k) {
			return nil, nil, fmt.Errorf("%w: the template changed a message's content", ErrRender)
		}
		if strings.Contains(s[:i], sentinelClose) {
			return nil, nil, fmt.Errorf("%w: the template wrote a stray content marker", ErrRender)
		}
		pieces = append(pieces, s[:i])
		slots = append(slots, k)
		s = rest[j+len(sentinelClose):]
	}
}

// Split lines up real, the rendering of msgs, with sentinel, the rendering
// of SentinelMessages(msgs), and returns real as spans of template text and
// contents. A content slot holds the message's content or, for templates
// that trim it, TrimC of it (the first of the two that the real rendering
// continues with, followed by the next template piece). The spans' texts
// concatenated equal real byte for byte, or Split fails with ErrRender: the
// template then renders contents in some other way (such as leaving out
// empty ones), and the conversation cannot be split safely. A message the
// template leaves out altogether (a role it does not know) is an ErrRender
// too, rather than silently lost.
func Split(real, sentinel string, msgs []Message) ([]Span, error) {
	pieces, slots, err := parseSentinels(sentinel, len(msgs))
	if err != nil {
		return nil, err
	}
	seen := make([]bool, len(msgs))
	for _, i := range slots {
		seen[i] = true
	}
	for i, ok := range seen {
		if !ok {
			return nil, fmt.Errorf("%w: the template leaves out messages[%d] (role %q): it does not know the role", ErrRender, i, msgs[i].Role)
		}
	}
	spans := make([]Span, 0, len(pieces)+len(slots))
	pos := 0
	for k, p := range pieces {
		if !strings.HasPrefix(real[pos:], p) {
			return nil, fmt.Errorf("%w: the template renders this conversation differently around its contents (an empty content can do that)", ErrRender)
		}
		if p != "" {
			spans = append(spans, Span{Text: p})
		}
		pos += len(p)
		if k == len(slots) {
			break
		}
		i := slots[k]
		next := pieces[k+1]
		c := msgs[i].Content
		switch t := TrimC(c); {
		case strings.HasPrefix(real[pos:], c+next):
		case t != c && strings.HasPrefix(real[pos:], t+next):
			c = t
		default:
			return nil, fmt.Errorf("%w: the template changed the content of messages[%d]", ErrRender, i)
		}
		if c != "" {
			spans = append(spans, Span{Text: c, Content: true, Message: i})
		}
		pos += len(c)
	}
	if pos != len(real) {
		return nil, fmt.Errorf("%w: the template renders this conversation differently around its contents", ErrRender)
	}
	return spans, nil
}
