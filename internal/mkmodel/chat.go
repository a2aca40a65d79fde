package mkmodel

import (
	_ "embed"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
)

// chatTemplatesJSON holds Hugging Face chat templates copied from the Go
// module github.com/ollama/ollama v0.17.4, file template/index.json (each
// entry's "source" names the entry), so that mkmodel needs no module
// directory at run time.
//
//go:embed chat_templates.json
var chatTemplatesJSON []byte

// chatFamily is a chat template and the marker tokens of its family.
type chatFamily struct {
	Name     string `json:"name"`
	Source   string `json:"source"`
	Template string `json:"template"`
	// markers are the family's control tokens; end is the one that ends an
	// assistant turn, made EOG through tokenizer.ggml.eot_token_id.
	markers []string
	end     string
}

// chatMarkers are the marker tokens of each family, as in the families'
// tokenizers (the end marker first).
var chatMarkers = map[string][]string{
	"chatml":           {"<|im_end|>", "<|im_start|>"},
	"phi-3":            {"<|end|>", "<|system|>", "<|user|>", "<|assistant|>"},
	"llama3-instruct":  {"<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>"},
	"gemma-instruct":   {"<end_of_turn>", "<start_of_turn>"},
	"mistral-instruct": {"</s>", "[INST]", "[/INST]"},
	"zephyr":           {"<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"},
}

var chatFamilies = sync.OnceValues(func() ([]chatFamily, error) {
	var fams []chatFamily
	if err := json.Unmarshal(chatTemplatesJSON, &fams); err != nil {
		return nil, fmt.Errorf("chat templates: %w", err)
	}
	for i := range fams {
		m := chatMarkers[fams[i].Name]
		if len(m) == 0 {
			return nil, fmt.Errorf("chat templates: no markers for %q", fams[i].Name)
		}
		fams[i].markers, fams[i].end = m, m[0]
	}
	return fams, nil
})

// ChatTemplates returns the names WithChatTemplate accepts.
func ChatTemplates() []string {
	fams, _ := chatFamilies()
	var names []string
	for _, f := range fams {
		names = append(names, f.Name)
	}
	return names
}

// ChatTemplateText returns the Jinja text of a named template.
func ChatTemplateText(name string) (string, error) {
	fams, err := chatFamilies()
	if err != nil {
		return "", err
	}
	for _, f := range fams {
		if f.Name == name {
			return f.Template, nil
		}
	}
	return "", fmt.Errorf("%w: unknown chat template %q (want one of %s)", ErrSpec, name, strings.Join(ChatTemplates(), ", "))
}

// WithChatTemplate returns a copy of v that carries the named chat
// template as tokenizer.chat_template, with the family's marker tokens
// (such as <|im_start|> and <|im_end|> for chatml) as CONTROL tokens:
// appended, or retyped where v already has them. The end marker of an
// assistant turn becomes tokenizer.ggml.eot_token_id, so llama.cpp counts it
// as end of generation. v must have tokenizer.ggml.tokens and token_type;
// scores, where present, get 0 for the new tokens.
func WithChatTemplate(v *Vocab, name string) (*Vocab, error) {
	tmpl, err := ChatTemplateText(name)
	if err != nil {
		return nil, err
	}
	fams, _ := chatFamilies()
	var fam chatFamily
	for _, f := range fams {
		if f.Name == name {
			fam = f
		}
	}
	out := &Vocab{size: v.size, model: v.model, source: v.source}
	var toks []string
	var types []int32
	var scores []float32
	ti, yi, si := -1, -1, -1
	for i, kv := range v.kvs {
		switch kv.Key {
		case "tokenizer.ggml.tokens":
			t, ok := kv.Value.([]string)
			if !ok {
				return nil, fmt.Errorf("%w: tokenizer.ggml.tokens is %T", ErrFormat, kv.Value)
			}
			toks, ti = slices.Clone(t), i
		case "tokenizer.ggml.token_type":
			t, ok := kv.Value.([]int32)
			if !ok {
				return nil, fmt.Errorf("%w: tokenizer.ggml.token_type is %T", ErrFormat, kv.Value)
			}
			types, yi = slices.Clone(t), i
		case "tokenizer.ggml.scores":
			if t, ok := kv.Value.([]float32); ok {
				scores, si = slices.Clone(t), i
			}
		}
	}
	if ti < 0 || yi < 0 || len(types) != len(toks) || (si >= 0 && len(scores) != len(toks)) {
		return nil, fmt.Errorf("%w: the vocabulary lacks tokenizer.ggml.tokens or token_type of equal lengths", ErrFormat)
	}
	end := -1
	for _, m := range fam.markers {
		id := slices.Index(toks, m)
		if id < 0 {
			id = len(toks)
			toks = append(toks, m)
			types = append(types, tokenNormal)
			if si >= 0 {
				scores = append(scores, 0)
			}
		}
		types[id] = tokenControl
		if m == fam.end {
			end = id
		}
	}
	for i, kv := range v.kvs {
		switch {
		case i == ti:
			kv.Value = toks
		case i == yi:
			kv.Value = types
		case i == si:
			kv.Value = scores
		case kv.Key == "tokenizer.chat_template", kv.Key == "tokenizer.ggml.eot_token_id", kv.Key == "llama.vocab_size":
			continue
		}
		out.kvs = append(out.kvs, kv)
	}
	out.kvs = append(out.kvs, KV{"tokenizer.chat_template", tmpl}, KV{"tokenizer.ggml.eot_token_id", uint32(end)})
	out.size = len(toks)
	return out, nil
}
