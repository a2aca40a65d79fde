package grammar

import (
	"math"
	"math/rand"
	"strings"
)

// sampler generates random strings from a parsed grammar by walking its AST.
// Below softDepth it picks alternatives and repetition counts at random;
// beyond it, it picks the alternative with the shortest derivation and the
// minimum repetition count, so every walk terminates.
type sampler struct {
	g         *Grammar
	rng       *rand.Rand
	height    map[string]int
	softDepth int
	out       strings.Builder
}

func newSampler(g *Grammar, seed int64) *sampler {
	s := &sampler{g: g, rng: rand.New(rand.NewSource(seed)), height: map[string]int{}, softDepth: 24}
	for _, r := range g.Rules {
		s.height[r.Name] = math.MaxInt32
	}
	for changed := true; changed; {
		changed = false
		for _, r := range g.Rules {
			if h := s.altsHeight(r.Alts); h < s.height[r.Name] {
				s.height[r.Name] = h
				changed = true
			}
		}
	}
	return s
}

func (s *sampler) altsHeight(alts []Alt) int {
	best := math.MaxInt32
	for _, a := range alts {
		best = min(best, s.altHeight(a))
	}
	return best
}

func (s *sampler) altHeight(a Alt) int {
	h := 0
	for i := range a.Items {
		h = max(h, s.itemHeight(&a.Items[i]))
	}
	return h
}

func (s *sampler) itemHeight(it *Item) int {
	switch it.Kind {
	case KindRef:
		if h := s.height[it.Name]; h < math.MaxInt32 {
			return h + 1
		}
		return math.MaxInt32
	case KindGroup:
		if h := s.altsHeight(it.Alts); h < math.MaxInt32 {
			return h + 1
		}
		return math.MaxInt32
	case KindRepeat:
		if it.Min == 0 {
			return 0
		}
		return s.itemHeight(it.Sub)
	}
	return 0
}

// Generate returns one string derived from the root rule.
func (s *sampler) Generate() string {
	s.out.Reset()
	s.alts(s.g.Rule("root").Alts, 0)
	return s.out.String()
}

func (s *sampler) alts(alts []Alt, depth int) {
	var a Alt
	if depth < s.softDepth {
		a = alts[s.rng.Intn(len(alts))]
	} else {
		best := math.MaxInt32
		for _, c := range alts {
			if h := s.altHeight(c); h < best {
				best, a = h, c
			}
		}
	}
	for i := range a.Items {
		s.item(&a.Items[i], depth)
	}
}

// candidates are tried for negated classes and '.'.
var candidates = []rune("abcxyzABC019 _-.,:;!?{}[]\"\\/\t\né€😀\x01")

func (s *sampler) item(it *Item, depth int) {
	switch it.Kind {
	case KindLiteral:
		s.out.WriteString(string(it.Runes))
	case KindAny:
		s.out.WriteRune(candidates[s.rng.Intn(len(candidates))])
	case KindClass:
		if !it.Negated {
			r := it.Ranges[s.rng.Intn(len(it.Ranges))]
			s.out.WriteRune(r.Lo + rune(s.rng.Int63n(int64(r.Hi-r.Lo)+1)))
			return
		}
		for _, i := range s.rng.Perm(len(candidates)) {
			c, in := candidates[i], false
			for _, r := range it.Ranges {
				in = in || (r.Lo <= c && c <= r.Hi)
			}
			if !in {
				s.out.WriteRune(c)
				return
			}
		}
		panic("no candidate outside the negated class")
	case KindRef:
		s.alts(s.g.Rule(it.Name).Alts, depth+1)
	case KindGroup:
		s.alts(it.Alts, depth+1)
	case KindRepeat:
		n := it.Min
		if depth < s.softDepth {
			hi := it.Max
			if hi < 0 || hi > it.Min+24 {
				hi = it.Min + 3
			}
			n += s.rng.Intn(hi - it.Min + 1)
		}
		for i := 0; i < n; i++ {
			s.item(it.Sub, depth+1)
		}
	case KindToken:
		// Tokens have no text of their own; the generated string omits them.
	}
}
