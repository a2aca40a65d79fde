package chat

import (
	"strings"
	"testing"
)

// FuzzRender renders fuzzed conversations through a fuzzed template (text
// before, between and after each content, possibly trimming it, and with
// strip flags on the specials) and checks that Render never panics, that
// every special id it yields comes from the template's own text, never from
// a content, and, without strip flags, that the fragments spell the
// rendering byte for byte.
//
// Run longer with: go test ./internal/chat/ -run '^$' -fuzz FuzzRender -fuzztime 60s
func FuzzRender(f *testing.F) {
	f.Add("<|im_start|>", "\n", "<|im_end|>\n", false, false, "Hi <|im_end|> there", "<|im_start|>x", uint8(0))
	f.Add("<s>[", "]<m>", "<mm>", true, true, " <m> ", "", uint8(3))
	f.Add("", "", "", false, false, "", "", uint8(0))
	f.Add("<|start_header_id|>", "<|end_header_id|>\n\n", "<|eot_id|>", true, false, "  x  ", "<|eot_id|>", uint8(1))
	f.Add("\U000F0000", "1\U000F0001", "<", false, true, "\U000F00000\U000F0001", "m>", uint8(2))
	f.Fuzz(func(t *testing.T, pre, mid, post string, trim, strip bool, c0, c1 string, flags uint8) {
		msgs := []Message{{"system", c0}, {"user", c1}, {"assistant", c0 + c1}}
		render := func(m []Message, add bool) (string, error) {
			var b strings.Builder
			for _, x := range m {
				c := x.Content
				if trim {
					c = TrimC(c)
				}
				b.WriteString(pre + x.Role + mid + c + post)
			}
			if add {
				b.WriteString(pre + "assistant" + mid)
			}
			return b.String(), nil
		}
		specials := []Special{
			{ID: 1, Text: "<s>"}, {ID: 5, Text: "<m>", LStrip: strip && flags&1 != 0, RStrip: strip && flags&2 != 0},
			{ID: 6, Text: "<mm>"}, {ID: 10, Text: "<|im_start|>"}, {ID: 11, Text: "<|im_end|>"},
			{ID: 12, Text: "<|start_header_id|>"}, {ID: 13, Text: "<|end_header_id|>"}, {ID: 14, Text: "<|eot_id|>"},
			{ID: 20, Text: "\n"},
		}
		tmpl := New("fuzz", render, Vocab{Specials: specials, BOS: 1, AddBOS: flags&4 != 0, TokenizeRaw: fakeTokenize})
		add := flags&8 != 0
		p, err := tmpl.Render(msgs, add)
		if err != nil {
			return
		}
		real, _ := render(msgs, add)
		if p.Text != real {
			t.Fatalf("text %q, want %q", p.Text, real)
		}
		// Count the specials the template text alone holds: render with
		// empty contents through the sentinel split and partition only the
		// template spans.
		sentinel, _ := render(SentinelMessages(msgs), add)
		spans, err := Split(real, sentinel, msgs)
		if err != nil {
			t.Fatalf("Render succeeded but Split fails: %v", err)
		}
		var tmplText strings.Builder
		for _, s := range spans {
			if !s.Content {
				tmplText.WriteString(s.Text)
				tmplText.WriteString("\x00")
			} else if s.Text != msgs[s.Message].Content && s.Text != TrimC(msgs[s.Message].Content) {
				t.Fatalf("content span %q is neither messages[%d]'s content nor its trim", s.Text, s.Message)
			}
		}
		frags := Partition(spans, tmpl.specials)
		var rebuilt strings.Builder
		for _, fr := range frags {
			if fr.Special {
				for _, sp := range specials {
					if sp.ID == fr.ID {
						if !strings.Contains(tmplText.String(), sp.Text) {
							t.Fatalf("special %q is not in the template text", sp.Text)
						}
						rebuilt.WriteString(sp.Text)
					}
				}
				continue
			}
			for _, s := range fr.Spans {
				if s.Content && !strings.Contains(msgs[s.Message].Content, s.Text) {
					t.Fatalf("content span %q is not part of messages[%d]", s.Text, s.Message)
				}
			}
			rebuilt.WriteString(fr.Text())
		}
		if !strip && rebuilt.String() != real {
			t.Fatalf("fragments spell %q, want %q", rebuilt.String(), real)
		}
		nSpecial := 0
		for _, fr := range frags {
			if fr.Special {
				nSpecial++
			}
		}
		got := 0
		for _, id := range p.IDs {
			if id < 1000 {
				got++
			}
		}
		bos := 0
		if tmpl.vocab.AddBOS && !(len(frags) > 0 && frags[0].Special && frags[0].ID == 1) {
			bos = 1
		}
		if got != nSpecial+bos {
			t.Fatalf("%d special ids, want %d from the template (+%d BOS)", got, nSpecial, bos)
		}
	})
}
