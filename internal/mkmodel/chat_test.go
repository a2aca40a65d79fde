package mkmodel

import (
	"errors"
	"slices"
	"testing"
)

// TestWithChatTemplate checks that each embedded template is written with
// its family's markers as control tokens, its end marker as the EOT token,
// and that markers a vocabulary already has are retyped, not duplicated.
func TestWithChatTemplate(t *testing.T) {
	base, err := BuiltinVocab(0)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range ChatTemplates() {
		t.Run(name, func(t *testing.T) {
			v, err := WithChatTemplate(base, name)
			if err != nil {
				t.Fatal(err)
			}
			kv := map[string]any{}
			for _, e := range v.KVs() {
				if _, dup := kv[e.Key]; dup {
					t.Fatalf("key %s written twice", e.Key)
				}
				kv[e.Key] = e.Value
			}
			toks, types := kv["tokenizer.ggml.tokens"].([]string), kv["tokenizer.ggml.token_type"].([]int32)
			scores := kv["tokenizer.ggml.scores"].([]float32)
			if len(toks) != v.Size() || len(types) != len(toks) || len(scores) != len(toks) {
				t.Fatalf("%d tokens, %d types, %d scores, size %d", len(toks), len(types), len(scores), v.Size())
			}
			want, _ := ChatTemplateText(name)
			if kv["tokenizer.chat_template"] != want {
				t.Errorf("tokenizer.chat_template is not the %s template", name)
			}
			for _, m := range chatMarkers[name] {
				id := slices.Index(toks, m)
				if id < 0 || types[id] != tokenControl || slices.Index(toks[id+1:], m) >= 0 {
					t.Errorf("marker %q: id %d, not one control token", m, id)
				}
			}
			if eot := kv["tokenizer.ggml.eot_token_id"].(uint32); toks[eot] != chatMarkers[name][0] {
				t.Errorf("eot_token_id %d is %q, want %q", eot, toks[eot], chatMarkers[name][0])
			}
			// Applying it again changes nothing: markers are found, not added.
			again, err := WithChatTemplate(v, name)
			if err != nil || again.Size() != v.Size() {
				t.Errorf("again: size %d, %v; want %d", again.Size(), err, v.Size())
			}
		})
	}
	if _, err := WithChatTemplate(base, "nope"); !errors.Is(err, ErrSpec) {
		t.Errorf("unknown template: %v, want ErrSpec", err)
	}
}
