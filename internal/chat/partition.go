package chat

import (
	"cmp"
	"slices"
	"strings"
)

// Fragment is a part of a partitioned prompt: a special token, or a run of
// raw text to tokenize with special-token parsing off.
type Fragment struct {
	// Special marks a special token; ID is its id.
	Special bool
	ID      int32
	// Spans are the raw text's spans, template text and contents merged in
	// order (empty for a special token).
	Spans []Span
}

// Text returns a raw fragment's text.
func (f Fragment) Text() string {
	var b strings.Builder
	for _, s := range f.Spans {
		b.WriteString(s.Text)
	}
	return b.String()
}

// SortSpecials returns the specials llama.cpp would match, in the order it
// matches them: longest text first (llama_vocab::impl::load sorts
// cache_special_tokens by text length, with std::sort, which leaves the
// order of equal lengths unspecified; here they go by id). Tokens with an
// empty text are left out: llama.cpp's partition would loop on them.
func SortSpecials(sp []Special) []Special {
	out := make([]Special, 0, len(sp))
	for _, s := range sp {
		if s.Text != "" {
			out = append(out, s)
		}
	}
	slices.SortStableFunc(out, func(a, b Special) int {
		if c := cmp.Compare(len(b.Text), len(a.Text)); c != 0 {
			return c
		}
		return cmp.Compare(a.ID, b.ID)
	})
	return out
}

// Partition splits spans on the special tokens found in its template text,
// with the rules of llama_vocab::impl::tokenizer_st_partition: each special
// (in SortSpecials order) is searched in every raw fragment in turn, each
// match splits its fragment in three, and a token with LStrip (RStrip)
// drops the whitespace at the end of the text before it (the start of the
// text after it) within the fragment. Matches are looked for only within a
// single template span, never in a content span nor across a span
// boundary, so no content byte ever becomes part of a special token.
// specials must be sorted by SortSpecials.
func Partition(spans []Span, specials []Special) []Fragment {
	frags := []Fragment{{Spans: spans}}
	// Only specials that occur in some template span can match: checking
	// each distinct piece first keeps the work small for vocabularies with
	// thousands of special tokens.
	pieces := map[string]bool{}
	for _, s := range spans {
		if !s.Content {
			pieces[s.Text] = true
		}
	}
	for _, sp := range specials {
		found := false
		for p := range pieces {
			if strings.Contains(p, sp.Text) {
				found = true
				break
			}
		}
		if !found {
			continue
		}
		var out []Fragment
		for _, f := range frags {
			if f.Special {
				out = append(out, f)
				continue
			}
			out = splitFragment(out, f.Spans, sp)
		}
		frags = out
	}
	return frags
}

// splitFragment appends to out the fragments of raw spans split on every
// match of sp in its template spans.
func splitFragment(out []Fragment, spans []Span, sp Special) []Fragment {
	for {
		si, off := findSpecial(spans, sp.Text)
		if si < 0 {
			if len(spans) > 0 {
				out = append(out, Fragment{Spans: spans})
			}
			return out
		}
		left := append(slices.Clone(spans[:si]), Span{Text: spans[si].Text[:off]})
		right := append([]Span{{Text: spans[si].Text[off+len(sp.Text):]}}, spans[si+1:]...)
		if sp.LStrip {
			left = trimRightSpans(left)
		}
		if sp.RStrip {
			right = trimLeftSpans(right)
		}
		if left = dropEmpty(left); len(left) > 0 {
			out = append(out, Fragment{Spans: left})
		}
		out = append(out, Fragment{Special: true, ID: sp.ID})
		spans = dropEmpty(right)
	}
}

// findSpecial returns the span index and offset of the first occurrence of
// text within a template span, or -1.
func findSpecial(spans []Span, text string) (int, int) {
	for i, s := range spans {
		if s.Content {
			continue
		}
		if j := strings.Index(s.Text, text); j >= 0 {
			return i, j
		}
	}
	return -1, 0
}

func trimRightSpans(spans []Span) []Span {
	for i := len(spans) - 1; i >= 0; i-- {
		t := spans[i].Text
		j := len(t)
		for j > 0 && isSpace(t[j-1]) {
			j--
		}
		spans[i].Text = t[:j]
		if j > 0 {
			break
		}
	}
	return spans
}

func trimLeftSpans(spans []Span) []Span {
	for i := range spans {
		t := spans[i].Text
		j := 0
		for j < len(t) && isSpace(t[j]) {
			j++
		}
		spans[i].Text = t[j:]
		if j < len(t) {
			break
		}
	}
	return spans
}

func dropEmpty(spans []Span) []Span {
	out := spans[:0]
	for _, s := range spans {
		if s.Text != "" {
			out = append(out, s)
		}
	}
	return out
}
