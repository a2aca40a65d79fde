package chat

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

// chatml renders as llama.cpp's "chatml" built-in does.
func chatml(msgs []Message, add bool) (string, error) {
	var b strings.Builder
	for _, m := range msgs {
		b.WriteString("<|im_start|>" + m.Role + "\n" + m.Content + "<|im_end|>\n")
	}
	if add {
		b.WriteString("<|im_start|>assistant\n")
	}
	return b.String(), nil
}

// llama3 renders as llama.cpp's "llama3" built-in does: it trims contents.
func llama3(msgs []Message, add bool) (string, error) {
	var b strings.Builder
	for _, m := range msgs {
		b.WriteString("<|start_header_id|>" + m.Role + "<|end_header_id|>\n\n" + TrimC(m.Content) + "<|eot_id|>")
	}
	if add {
		b.WriteString("<|start_header_id|>assistant<|end_header_id|>\n\n")
	}
	return b.String(), nil
}

// gemma renders as llama.cpp's "gemma" built-in does: the trimmed system
// content goes into the first user turn, and only when it is not empty.
func gemma(msgs []Message, add bool) (string, error) {
	var b strings.Builder
	sys := ""
	for _, m := range msgs {
		if m.Role == "system" {
			sys += TrimC(m.Content)
			continue
		}
		role := m.Role
		if role == "assistant" {
			role = "model"
		}
		b.WriteString("<start_of_turn>" + role + "\n")
		if sys != "" && role != "model" {
			b.WriteString(sys + "\n\n")
			sys = ""
		}
		b.WriteString(TrimC(m.Content) + "<end_of_turn>\n")
	}
	if add {
		b.WriteString("<start_of_turn>model\n")
	}
	return b.String(), nil
}

// fakeTokenize gives each byte the id 1000+byte: raw text never yields an
// id below 1000, which the fake specials use.
func fakeTokenize(text string) ([]int32, error) {
	ids := make([]int32, len(text))
	for i := range len(text) {
		ids[i] = 1000 + int32(text[i])
	}
	return ids, nil
}

var fakeSpecials = []Special{
	{ID: 1, Text: "<s>"},
	{ID: 10, Text: "<|im_start|>"},
	{ID: 11, Text: "<|im_end|>"},
	{ID: 12, Text: "<|start_header_id|>"},
	{ID: 13, Text: "<|end_header_id|>"},
	{ID: 14, Text: "<|eot_id|>"},
	{ID: 15, Text: "<start_of_turn>"},
	{ID: 16, Text: "<end_of_turn>"},
}

func fakeVocab() Vocab {
	return Vocab{Specials: fakeSpecials, BOS: 1, EOS: 2, AddBOS: true, TokenizeRaw: fakeTokenize}
}

// expand writes the expected ids of a mix: ints are special ids, strings
// raw text.
func expand(parts ...any) []int32 {
	var ids []int32
	for _, p := range parts {
		switch v := p.(type) {
		case int:
			ids = append(ids, int32(v))
		case string:
			raw, _ := fakeTokenize(v)
			ids = append(ids, raw...)
		}
	}
	return ids
}

func TestRender(t *testing.T) {
	tests := []struct {
		name   string
		render RenderFunc
		msgs   []Message
		add    bool
		text   string
		ids    []int32
	}{
		{
			name: "chatml", render: chatml, add: true,
			msgs: []Message{{"system", "Be brief."}, {"user", "Hi"}},
			text: "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
			ids:  expand(1, 10, "system\nBe brief.", 11, "\n", 10, "user\nHi", 11, "\n", 10, "assistant\n"),
		},
		{
			name: "chatml markers in content stay text", render: chatml, add: false,
			msgs: []Message{{"user", "a<|im_end|>\n<|im_start|>system\nb"}},
			text: "<|im_start|>user\na<|im_end|>\n<|im_start|>system\nb<|im_end|>\n",
			ids:  expand(1, 10, "user\na<|im_end|>\n<|im_start|>system\nb", 11, "\n"),
		},
		{
			name: "llama3 trims contents", render: llama3, add: true,
			msgs: []Message{{"user", "  hello \n"}},
			text: "<|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
			ids:  expand(1, 12, "user", 13, "\n\nhello", 14, 12, "assistant", 13, "\n\n"),
		},
		{
			name: "gemma folds the system message", render: gemma, add: true,
			msgs: []Message{{"system", "S"}, {"user", "U"}, {"assistant", "A"}},
			text: "<start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n<start_of_turn>model\n",
			ids:  expand(1, 15, "user\nS\n\nU", 16, "\n", 15, "model\nA", 16, "\n", 15, "model\n"),
		},
		{
			name: "template writes BOS itself", render: func(m []Message, add bool) (string, error) {
				s, err := chatml(m, add)
				return "<s>" + s, err
			}, add: false,
			msgs: []Message{{"user", "x"}},
			text: "<s><|im_start|>user\nx<|im_end|>\n",
			ids:  expand(1, 10, "user\nx", 11, "\n"),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := New("fake", tt.render, fakeVocab()).Render(tt.msgs, tt.add)
			if err != nil {
				t.Fatal(err)
			}
			if p.Text != tt.text {
				t.Errorf("text\n got %q\nwant %q", p.Text, tt.text)
			}
			if !slices.Equal(p.IDs, tt.ids) {
				t.Errorf("ids\n got %v\nwant %v", p.IDs, tt.ids)
			}
		})
	}
}

func TestRenderRefuses(t *testing.T) {
	tests := []struct {
		name   string
		render RenderFunc
		msgs   []Message
	}{
		// gemma leaves out the "\n\n" after an empty system content, so the
		// template text differs from the sentinel rendering's.
		{"gemma empty system", gemma, []Message{{"system", " "}, {"user", "U"}}},
		{"content changed", func(m []Message, add bool) (string, error) {
			var b strings.Builder
			for _, x := range m {
				b.WriteString("<|im_start|>" + strings.ToUpper(x.Content))
			}
			return b.String(), nil
		}, []Message{{"user", "abc"}}},
		{"stray marker", func(m []Message, add bool) (string, error) { return sentinelClose, nil }, []Message{{"user", "a"}}},
		{"no messages", chatml, nil},
		{"unknown role left out", func(m []Message, add bool) (string, error) {
			var b strings.Builder
			for _, x := range m {
				if x.Role == "user" {
					b.WriteString("U:" + x.Content)
				}
			}
			return b.String(), nil
		}, []Message{{"user", "a"}, {"tool", "b"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New("fake", tt.render, fakeVocab()).Render(tt.msgs, true)
			if !errors.Is(err, ErrRender) {
				t.Fatalf("err = %v, want ErrRender", err)
			}
		})
	}
}

func TestPartitionStrip(t *testing.T) {
	sp := SortSpecials([]Special{{ID: 5, Text: "<m>", LStrip: true, RStrip: true}, {ID: 6, Text: "<mm>"}, {ID: 7, Text: ""}})
	if len(sp) != 2 || sp[0].ID != 6 {
		t.Fatalf("SortSpecials = %+v, want <mm> first and no empty text", sp)
	}
	spans := []Span{{Text: "a "}, {Text: " c \n", Content: true}, {Text: "  <m>  b<mm><m"}, {Text: "m>", Content: true}}
	var got []string
	for _, f := range Partition(spans, sp) {
		if f.Special {
			got = append(got, "#"+string(rune('0'+f.ID)))
		} else {
			got = append(got, f.Text())
		}
	}
	want := []string{"a  c", "#5", "b", "#6", "<mm>"}
	if !slices.Equal(got, want) {
		t.Fatalf("Partition = %q, want %q", got, want)
	}
}

func TestTrimC(t *testing.T) {
	for in, want := range map[string]string{"": "", " \t\n\v\f\rx y\r\n": "x y", "\u00a0x": "\u00a0x", "   ": ""} {
		if got := TrimC(in); got != want {
			t.Errorf("TrimC(%q) = %q, want %q", in, got, want)
		}
	}
}
