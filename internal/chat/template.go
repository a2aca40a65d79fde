package chat

import (
	"errors"
	"fmt"
)

// RenderFunc renders a conversation with a chat template, adding the
// assistant's generation prompt after the last message when addAssistant is
// set: llama_chat_apply_template, or a fake in tests.
type RenderFunc func(msgs []Message, addAssistant bool) (string, error)

// Vocab is what rendering needs of the model's vocabulary.
type Vocab struct {
	// Specials are the vocabulary's control, user-defined and unknown
	// tokens, in any order.
	Specials []Special
	// BOS and EOS are the beginning- and end-of-sequence tokens; AddBOS and
	// AddEOS say whether llama_tokenize adds them (llama_vocab_get_add_bos,
	// _add_eos).
	BOS, EOS       int32
	AddBOS, AddEOS bool
	// TokenizeRaw tokenizes text with special-token parsing off and
	// without BOS or EOS: llama_tokenize(parse_special=false,
	// add_special=false).
	TokenizeRaw func(text string) ([]int32, error)
}

// Template renders conversations into prompt text and token ids. It is
// safe for concurrent use when its RenderFunc and TokenizeRaw are.
type Template struct {
	name     string
	render   RenderFunc
	vocab    Vocab
	specials []Special
}

// New returns a Template named name (the built-in template that renders it,
// for reports) over render and v.
func New(name string, render RenderFunc, v Vocab) *Template {
	return &Template{name: name, render: render, vocab: v, specials: SortSpecials(v.Specials)}
}

// Name returns the template's name.
func (t *Template) Name() string { return t.name }

// Prompt is a rendered conversation.
type Prompt struct {
	// Text is the rendering with the real contents.
	Text string
	// IDs are its token ids: BOS when the vocabulary adds one and the
	// template did not write it, the template's special tokens, and the
	// raw text (contents included) tokenized with special parsing off.
	IDs []int32
}

// Render renders msgs and tokenizes the result so that only the template's
// markers become special tokens. It fails with ErrRender when the template
// does not render the contents unchanged (or trimmed) between its own text,
// and with the render or tokenize error otherwise.
func (t *Template) Render(msgs []Message, addAssistant bool) (Prompt, error) {
	if len(msgs) == 0 {
		return Prompt{}, fmt.Errorf("%w: no messages", ErrRender)
	}
	real, err := t.render(msgs, addAssistant)
	if err != nil {
		return Prompt{}, err
	}
	sentinel, err := t.render(SentinelMessages(msgs), addAssistant)
	if err != nil {
		return Prompt{}, err
	}
	spans, err := Split(real, sentinel, msgs)
	if err != nil {
		return Prompt{}, err
	}
	ids, err := t.Tokenize(spans)
	if err != nil {
		return Prompt{}, err
	}
	return Prompt{Text: real, IDs: ids}, nil
}

// Tokenize returns the token ids of spans (see Render).
func (t *Template) Tokenize(spans []Span) ([]int32, error) {
	if t.vocab.TokenizeRaw == nil {
		return nil, errors.New("chat: no tokenizer")
	}
	frags := Partition(spans, t.specials)
	var ids []int32
	// llama_tokenize(add_special) puts BOS first whatever follows, which
	// doubles it when the template writes the BOS text itself (llama.cpp
	// warns "Added a BOS token to the prompt as specified by the model but
	// the prompt also starts with a BOS token"); llama-server's chat path
	// avoids the double, and so does this.
	if t.vocab.AddBOS && !(len(frags) > 0 && frags[0].Special && frags[0].ID == t.vocab.BOS) {
		ids = append(ids, t.vocab.BOS)
	}
	for _, f := range frags {
		if f.Special {
			ids = append(ids, f.ID)
			continue
		}
		raw, err := t.vocab.TokenizeRaw(f.Text())
		if err != nil {
			return nil, fmt.Errorf("chat: tokenize: %w", err)
		}
		ids = append(ids, raw...)
	}
	if t.vocab.AddEOS {
		ids = append(ids, t.vocab.EOS)
	}
	return ids, nil
}
