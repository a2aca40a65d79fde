package native

import (
	"bytes"
	"strings"
	"unicode/utf8"
)

// textBuffer holds generated text that may not be streamed yet: the tail of
// a multi-byte character whose remaining bytes are still to come, and a tail
// that could be the beginning of a stop string. It also tracks which token
// ids are complete, so that a chunk carries exactly the tokens whose text it
// finishes.
type textBuffer struct {
	stops [][]byte
	pend  []byte
	toks  []int32
	ends  []int // ends[i] is the offset in pend where toks[i]'s text ends
	// lps[i] is toks[i]'s log-probability, kept only when the sequence
	// asked for them (pushLogprob).
	lps []TokenLogprob
}

func (t *textBuffer) reset(stops []string) {
	t.stops = t.stops[:0]
	for _, s := range stops {
		t.stops = append(t.stops, []byte(s))
	}
	t.pend = t.pend[:0]
	t.toks = t.toks[:0]
	t.ends = t.ends[:0]
	t.lps = t.lps[:0]
}

// pushLogprob records the log-probability of the token push is about to
// append; a sequence that asks for logprobs calls it before every push.
func (t *textBuffer) pushLogprob(lp TokenLogprob) { t.lps = append(t.lps, lp) }

// push appends a token's text. It returns the index in pend where a stop
// string starts (and which stop string), or -1.
func (t *textBuffer) push(tok int32, piece []byte) (stopAt int, stop string) {
	old := len(t.pend)
	t.pend = append(t.pend, piece...)
	t.toks = append(t.toks, tok)
	t.ends = append(t.ends, len(t.pend))
	stopAt = -1
	for _, s := range t.stops {
		// Only a match that ends in the new bytes is new.
		from := max(0, old-len(s)+1)
		if i := bytes.Index(t.pend[from:], s); i >= 0 && (stopAt < 0 || from+i < stopAt) {
			stopAt, stop = from+i, string(s)
		}
	}
	return stopAt, stop
}

// safeLen returns how many bytes of pend can be streamed now: none of the
// held-back tail can start a stop string, and the prefix ends on a
// character boundary.
func (t *textBuffer) safeLen() int {
	n := len(t.pend)
	for _, s := range t.stops {
		for k := min(len(s)-1, len(t.pend)); k > 0; k-- {
			if bytes.HasSuffix(t.pend, s[:k]) {
				n = min(n, len(t.pend)-k)
				break
			}
		}
	}
	return completeUTF8(t.pend[:n])
}

// completeUTF8 returns the length of the longest prefix of b that does not
// end inside an incomplete multi-byte character.
func completeUTF8(b []byte) int {
	n := len(b)
	// A character is at most 4 bytes: look back at most 3 for its start.
	for i := n - 1; i >= 0 && i >= n-utf8.UTFMax; i-- {
		if utf8.RuneStart(b[i]) {
			if !utf8.FullRune(b[i:]) {
				return i
			}
			return n
		}
	}
	return n
}

// take removes the first n bytes of pend and returns them as valid UTF-8,
// with the ids of the tokens whose text ends within them, and their
// log-probabilities when they were recorded. When all is true, every pending
// token is returned with them.
func (t *textBuffer) take(n int, all bool) (string, []int32, []TokenLogprob) {
	k := 0
	for k < len(t.ends) && (all || t.ends[k] <= n) {
		k++
	}
	var ids []int32
	var lps []TokenLogprob
	if k > 0 {
		ids = make([]int32, k)
		copy(ids, t.toks[:k])
		if len(t.lps) >= k {
			lps = make([]TokenLogprob, k)
			copy(lps, t.lps[:k])
			clear(t.lps[copy(t.lps, t.lps[k:]):])
			t.lps = t.lps[:len(t.lps)-k]
		}
	}
	text := string(t.pend[:n])
	if !utf8.ValidString(text) {
		text = strings.ToValidUTF8(text, "\uFFFD")
	}
	rest := copy(t.pend, t.pend[n:])
	t.pend = t.pend[:rest]
	kept := copy(t.toks, t.toks[k:])
	t.toks = t.toks[:kept]
	copy(t.ends, t.ends[k:])
	t.ends = t.ends[:kept]
	for i := range t.ends {
		t.ends[i] = max(0, t.ends[i]-n)
	}
	return text, ids, lps
}
