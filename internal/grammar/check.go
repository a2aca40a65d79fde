package grammar

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"sort"
	"strings"
	"unicode/utf8"
)

// cRepetitionThreshold is llama.cpp's MAX_REPETITION_THRESHOLD: a bound of
// a {m,n} repetition above it makes the C parser throw.
const cRepetitionThreshold = 2000

// ErrTooLarge is wrapped by every error that refuses a grammar or a schema
// because it exceeds one of the size, depth or work limits.
var ErrTooLarge = errors.New("grammar: input exceeds a size limit")

// Limits bounds what Check accepts. The zero value of a field means "use the
// default" (see DefaultLimits).
type Limits struct {
	// MaxBytes bounds the length of the GBNF text in bytes.
	MaxBytes int
	// MaxRules bounds the number of rules after llama.cpp's expansion,
	// counting the rules it synthesises for groups and repetitions.
	MaxRules int
	// MaxDepth bounds the nesting of parentheses; llama.cpp parses groups by
	// recursive descent, so deep nesting would overflow the C stack.
	MaxDepth int
	// MaxRepetition bounds m and n in {m}, {m,} and {m,n}. Values above
	// llama.cpp's own threshold (2000) are clamped to it.
	MaxRepetition int
	// MaxElements bounds the total number of llama_grammar_element entries
	// of all rules after repetition expansion, as llama.cpp builds them.
	MaxElements int
	// MaxInitWork bounds the number of recursive calls llama.cpp's left
	// recursion detector makes at init; it does not memoise, so a chain of
	// alternatives that all start with the same nullable rules costs an
	// exponential number of calls.
	MaxInitWork int
}

// DefaultLimits returns the limits the service uses: 64 KiB of text, 4096
// rules, nesting depth 64, repetition bounds up to 1000 (half of llama.cpp's
// hard limit, which is already far beyond what a JSON schema needs), 1<<17
// expanded elements (1 MiB of C memory per copy of the rules) and 1<<20
// left-recursion detector calls.
func DefaultLimits() Limits {
	return Limits{
		MaxBytes:      64 << 10,
		MaxRules:      4096,
		MaxDepth:      64,
		MaxRepetition: 1000,
		MaxElements:   1 << 17,
		MaxInitWork:   1 << 20,
	}
}

func (l Limits) withDefaults() Limits {
	d := DefaultLimits()
	if l.MaxBytes <= 0 {
		l.MaxBytes = d.MaxBytes
	}
	if l.MaxRules <= 0 {
		l.MaxRules = d.MaxRules
	}
	if l.MaxDepth <= 0 {
		l.MaxDepth = d.MaxDepth
	}
	if l.MaxRepetition <= 0 {
		l.MaxRepetition = d.MaxRepetition
	}
	if l.MaxRepetition > cRepetitionThreshold {
		l.MaxRepetition = cRepetitionThreshold
	}
	if l.MaxElements <= 0 {
		l.MaxElements = d.MaxElements
	}
	if l.MaxInitWork <= 0 {
		l.MaxInitWork = d.MaxInitWork
	}
	return l
}

// Reasons reported in Error.Reason.
const (
	ReasonSyntax         = "syntax"
	ReasonUndefinedRule  = "undefined_rule"
	ReasonDuplicateRule  = "duplicate_rule"
	ReasonMissingRoot    = "missing_root"
	ReasonLeftRecursion  = "left_recursion"
	ReasonTooLarge       = "too_large"
	ReasonTooDeep        = "too_deep"
	ReasonTooComplex     = "too_complex"
	ReasonBadChar        = "bad_char"
	ReasonBadRange       = "bad_range"
	ReasonBadRepetition  = "bad_repetition"
	ReasonBadToken       = "bad_token"
	ReasonInvalidEncoded = "invalid_encoding"
	ReasonUnproductive   = "unproductive"
)

// Error describes why Check refused a grammar, in a shape that maps onto a
// gRPC BadRequest field violation.
type Error struct {
	// Offset is the byte offset in the GBNF text where the problem was found.
	Offset int
	// Line and Col are the 1-based line and column (in bytes) of Offset.
	Line, Col int
	// Rule is the name of the rule concerned, when known.
	Rule string
	// Reason is a short machine-readable reason such as "syntax".
	Reason string
	// Msg is the human-readable detail.
	Msg string

	wrapped error
}

// Error returns a full sentence naming the problem and where it is.
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("invalid grammar")
	if e.Rule != "" {
		fmt.Fprintf(&b, " in rule %q", e.Rule)
	}
	fmt.Fprintf(&b, " at line %d, column %d (byte %d): %s (%s)", e.Line, e.Col, e.Offset, e.Msg, e.Reason)
	return b.String()
}

// Unwrap returns ErrTooLarge for size-limit errors and nil otherwise.
func (e *Error) Unwrap() error { return e.wrapped }

// ItemKind tells what an Item is.
type ItemKind int

// Item kinds.
const (
	// KindLiteral is a quoted string; Runes holds its code points.
	KindLiteral ItemKind = iota
	// KindClass is a [...] class; Ranges and Negated describe it.
	KindClass
	// KindAny is '.', any single character.
	KindAny
	// KindRef is a reference to the rule named Name.
	KindRef
	// KindGroup is a parenthesised group; Alts holds its alternatives.
	KindGroup
	// KindRepeat repeats Sub between Min and Max times (Max < 0: unbounded).
	KindRepeat
	// KindToken is <[id]> (or !<[id]> when Negated).
	KindToken
)

// Range is an inclusive range of code points.
type Range struct {
	// Lo and Hi are the bounds; a single character has Lo == Hi.
	Lo, Hi rune
	// span records that the text wrote lo-hi (llama.cpp then stores an extra
	// element even when lo == hi), so that printing keeps the expansion.
	span bool
}

// Item is one element of a sequence.
type Item struct {
	// Kind says which of the other fields are meaningful.
	Kind ItemKind
	// Offset is the byte offset of the item in the GBNF text.
	Offset int
	// Runes holds a literal's code points.
	Runes []rune
	// Ranges holds a class's ranges (a single character is Lo == Hi).
	Ranges []Range
	// Negated marks [^...] classes and !<[id]> tokens.
	Negated bool
	// Name is the rule a reference names.
	Name string
	// Alts holds a group's alternatives.
	Alts []Alt
	// Sub is the repeated item of a repetition.
	Sub *Item
	// Min and Max bound a repetition; Max < 0 means unbounded.
	Min, Max int
	// TokenID is the id of a token reference.
	TokenID uint32
}

// Alt is one alternative: a sequence of items (empty means the empty string).
type Alt struct{ Items []Item }

// Rule is a named rule with its alternatives.
type Rule struct {
	Name   string
	Offset int
	Alts   []Alt
}

// Grammar is the parsed form of a GBNF text.
type Grammar struct {
	// Rules lists the user-written rules in source order.
	Rules []*Rule
	// Elements is the total number of llama_grammar_element entries
	// llama.cpp would build, and CRules the number of rules it would build.
	Elements, CRules int

	byName map[string]*Rule
}

// Rule returns the rule named name, or nil.
func (g *Grammar) Rule(name string) *Rule { return g.byName[name] }

// Check reports whether llama.cpp's grammar parser and initialiser would
// accept gbnf without crashing, throwing, recursing without bound or using
// excessive memory; it returns a *Error when not.
func Check(gbnf string, lim Limits) error {
	_, err := Parse(gbnf, lim)
	return err
}

// C element types, as in llama-grammar.h.
const (
	cEnd = iota
	cAlt
	cRef
	cChar
	cCharNot
	cRngUpper
	cCharAlt
	cCharAny
	cToken
	cTokenNot
)

type celem struct {
	typ int
	val uint32
}

type parser struct {
	src     string
	lim     Limits
	ids     map[string]int // symbol ids, as llama_grammar_parser::symbol_ids
	nsyms   int
	crules  [][]celem
	nelems  int
	g       *Grammar
	firstRf map[string]int // offset of the first reference to each name
	rule    string         // current rule name
}

func (p *parser) errAt(off int, reason, format string, args ...any) *Error {
	line, col := 1, 1
	for i := 0; i < off && i < len(p.src); i++ {
		if p.src[i] == '\n' {
			line++
			col = 1
		} else {
			col++
		}
	}
	e := &Error{Offset: off, Line: line, Col: col, Rule: p.rule, Reason: reason, Msg: fmt.Sprintf(format, args...)}
	if reason == ReasonTooLarge || reason == ReasonTooDeep || reason == ReasonTooComplex {
		e.wrapped = ErrTooLarge
	}
	return e
}

func (p *parser) at(i int) byte {
	if i < len(p.src) {
		return p.src[i]
	}
	return 0
}

func isWordChar(c byte) bool {
	return ('a' <= c && c <= 'z') || ('A' <= c && c <= 'Z') || c == '-' || ('0' <= c && c <= '9')
}

func isDigit(c byte) bool { return '0' <= c && c <= '9' }

func (p *parser) space(pos int, newlineOK bool) int {
	for {
		c := p.at(pos)
		switch {
		case c == ' ' || c == '\t':
			pos++
		case c == '#':
			for pos < len(p.src) && p.src[pos] != '\r' && p.src[pos] != '\n' {
				pos++
			}
		case newlineOK && (c == '\r' || c == '\n'):
			pos++
		default:
			return pos
		}
	}
}

func (p *parser) symbol(name string) int {
	if id, ok := p.ids[name]; ok {
		return id
	}
	id := p.nsyms
	p.ids[name] = id
	p.nsyms++
	return id
}

// generated mirrors generate_symbol_id; '_' is not a word character, so the
// generated names never collide with user names.
func (p *parser) generated() (int, error) {
	id := p.nsyms
	p.nsyms++
	if p.nsyms > p.lim.MaxRules {
		return 0, errors.New("rules")
	}
	return id, nil
}

func (p *parser) addRule(id int, r []celem) {
	for len(p.crules) <= id {
		p.crules = append(p.crules, nil)
	}
	p.crules[id] = r
}

func (p *parser) grow(pos, n int) error {
	p.nelems += n
	if p.nelems > p.lim.MaxElements {
		return p.errAt(pos, ReasonTooLarge, "the grammar expands to more than %d elements", p.lim.MaxElements)
	}
	return nil
}

// Parse parses gbnf as llama_grammar_parser::parse does and applies the
// checks of Check, returning the grammar's AST.
func Parse(gbnf string, lim Limits) (*Grammar, error) {
	lim = lim.withDefaults()
	p := &parser{src: gbnf, lim: lim, ids: map[string]int{}, firstRf: map[string]int{},
		g: &Grammar{byName: map[string]*Rule{}}}
	if len(gbnf) > lim.MaxBytes {
		return nil, p.errAt(0, ReasonTooLarge, "the grammar is %d bytes, more than the limit of %d", len(gbnf), lim.MaxBytes)
	}
	if i := strings.IndexByte(gbnf, 0); i >= 0 {
		return nil, p.errAt(i, ReasonInvalidEncoded, "the grammar contains a NUL byte, which would end the C string early")
	}
	if !utf8.ValidString(gbnf) {
		for i := 0; i < len(gbnf); {
			r, n := utf8.DecodeRuneInString(gbnf[i:])
			if r == utf8.RuneError && n == 1 {
				return nil, p.errAt(i, ReasonInvalidEncoded, "the grammar is not valid UTF-8")
			}
			i += n
		}
	}
	pos := p.space(0, true)
	for pos < len(gbnf) {
		var err error
		pos, err = p.parseRule(pos)
		if err != nil {
			return nil, err
		}
	}
	p.rule = ""
	// Every referenced rule must be defined.
	for name, id := range p.ids {
		if id >= len(p.crules) || p.crules[id] == nil {
			p.rule = name
			return nil, p.errAt(p.firstRf[name], ReasonUndefinedRule, "rule %q is referenced but never defined", name)
		}
	}
	if p.g.byName["root"] == nil {
		return nil, p.errAt(len(gbnf), ReasonMissingRoot, "the grammar has no rule named \"root\"")
	}
	p.g.Elements, p.g.CRules = p.nelems, len(p.crules)
	if err := p.checkInit(); err != nil {
		return nil, err
	}
	return p.g, nil
}

func (p *parser) parseRule(pos int) (int, error) {
	start := pos
	for isWordChar(p.at(pos)) {
		pos++
	}
	if pos == start {
		return 0, p.errAt(pos, ReasonSyntax, "expecting a rule name")
	}
	name := p.src[start:pos]
	p.rule = name
	if p.g.byName[name] != nil {
		return 0, p.errAt(start, ReasonDuplicateRule, "rule %q is defined twice (llama.cpp would silently keep the last)", name)
	}
	id := p.symbol(name)
	if p.nsyms > p.lim.MaxRules {
		return 0, p.errAt(start, ReasonTooLarge, "the grammar has more than %d rules", p.lim.MaxRules)
	}
	pos = p.space(pos, false)
	if !strings.HasPrefix(p.src[pos:], "::=") {
		return 0, p.errAt(pos, ReasonSyntax, "expecting ::=")
	}
	pos = p.space(pos+3, true)
	r := &Rule{Name: name, Offset: start}
	p.g.Rules = append(p.g.Rules, r)
	p.g.byName[name] = r
	pos, alts, err := p.parseAlternates(pos, id, false, 0)
	if err != nil {
		return 0, err
	}
	r.Alts = alts
	switch c := p.at(pos); {
	case c == '\r':
		pos++
		if p.at(pos) == '\n' {
			pos++
		}
	case c == '\n':
		pos++
	case pos < len(p.src):
		return 0, p.errAt(pos, ReasonSyntax, "expecting newline or end of input")
	}
	return p.space(pos, true), nil
}

func (p *parser) parseAlternates(pos, id int, nested bool, depth int) (int, []Alt, error) {
	var rule []celem
	var alts []Alt
	for {
		var alt Alt
		var err error
		pos, err = p.parseSequence(pos, &rule, &alt, nested, depth)
		if err != nil {
			return 0, nil, err
		}
		alts = append(alts, alt)
		if p.at(pos) != '|' {
			break
		}
		rule = append(rule, celem{cAlt, 0})
		if err := p.grow(pos, 1); err != nil {
			return 0, nil, err
		}
		pos = p.space(pos+1, true)
	}
	rule = append(rule, celem{cEnd, 0})
	if err := p.grow(pos, 1); err != nil {
		return 0, nil, err
	}
	p.addRule(id, rule)
	return pos, alts, nil
}

// parseChar mirrors parse_char.
func (p *parser) parseChar(pos int) (rune, int, error) {
	c := p.at(pos)
	if c == '\\' {
		n := 0
		switch p.at(pos + 1) {
		case 'x':
			n = 2
		case 'u':
			n = 4
		case 'U':
			n = 8
		case 't':
			return '\t', pos + 2, nil
		case 'r':
			return '\r', pos + 2, nil
		case 'n':
			return '\n', pos + 2, nil
		case '\\', '"', '[', ']':
			return rune(p.at(pos + 1)), pos + 2, nil
		default:
			return 0, 0, p.errAt(pos, ReasonSyntax, "unknown escape")
		}
		var v uint64
		for i := 0; i < n; i++ {
			h := p.at(pos + 2 + i)
			switch {
			case '0' <= h && h <= '9':
				v = v<<4 | uint64(h-'0')
			case 'a' <= h && h <= 'f':
				v = v<<4 | uint64(h-'a'+10)
			case 'A' <= h && h <= 'F':
				v = v<<4 | uint64(h-'A'+10)
			default:
				return 0, 0, p.errAt(pos, ReasonSyntax, "expecting %d hex digits", n)
			}
		}
		if v > utf8.MaxRune {
			return 0, 0, p.errAt(pos, ReasonBadChar, "code point U+%X is beyond U+10FFFF; no token can produce it", v)
		}
		return rune(v), pos + 2 + n, nil
	}
	if pos >= len(p.src) {
		return 0, 0, p.errAt(pos, ReasonSyntax, "unexpected end of input")
	}
	r, n := utf8.DecodeRuneInString(p.src[pos:])
	return r, pos + n, nil
}

func (p *parser) parseInt(pos int) (int, int, error) {
	start := pos
	for isDigit(p.at(pos)) {
		pos++
	}
	if pos == start {
		return 0, 0, p.errAt(pos, ReasonSyntax, "expecting an integer")
	}
	if pos-start > 9 {
		return 0, 0, p.errAt(start, ReasonTooLarge, "integer %s is too large", p.src[start:pos])
	}
	v := 0
	for _, c := range []byte(p.src[start:pos]) {
		v = v*10 + int(c-'0')
	}
	return v, pos, nil
}

func (p *parser) parseSequence(pos int, rule *[]celem, alt *Alt, nested bool, depth int) (int, error) {
	lastSymStart := len(*rule)
	// repeat mirrors handle_repetitions.
	repeat := func(at, lo, hi int) error {
		if lastSymStart == len(*rule) {
			return p.errAt(at, ReasonSyntax, "expecting an item before */+/?/{")
		}
		prev := append([]celem(nil), (*rule)[lastSymStart:]...)
		if lo == 0 {
			p.nelems -= len(prev)
			*rule = (*rule)[:lastSymStart]
		} else {
			if err := p.grow(at, (lo-1)*len(prev)); err != nil {
				return err
			}
			for i := 1; i < lo; i++ {
				*rule = append(*rule, prev...)
			}
		}
		noMax := hi < 0
		nOpt := 1
		if !noMax {
			nOpt = hi - lo
		}
		last := 0
		for i := 0; i < nOpt; i++ {
			id, err := p.generated()
			if err != nil {
				return p.errAt(at, ReasonTooLarge, "the grammar expands to more than %d rules", p.lim.MaxRules)
			}
			rec := append([]celem(nil), prev...)
			if i > 0 || noMax {
				ref := last
				if noMax {
					ref = id
				}
				rec = append(rec, celem{cRef, uint32(ref)})
			}
			rec = append(rec, celem{cAlt, 0}, celem{cEnd, 0})
			if err := p.grow(at, len(rec)); err != nil {
				return err
			}
			p.addRule(id, rec)
			last = id
		}
		if nOpt > 0 {
			*rule = append(*rule, celem{cRef, uint32(last)})
			if err := p.grow(at, 1); err != nil {
				return err
			}
		}
		n := len(alt.Items) - 1
		sub := alt.Items[n]
		alt.Items[n] = Item{Kind: KindRepeat, Offset: at, Sub: &sub, Min: lo, Max: hi}
		return nil
	}
	emit := func(at int, e ...celem) error {
		*rule = append(*rule, e...)
		return p.grow(at, len(e))
	}
	for pos < len(p.src) {
		c := p.src[pos]
		start := pos
		switch {
		case c == '"':
			pos++
			lastSymStart = len(*rule)
			it := Item{Kind: KindLiteral, Offset: start}
			for p.at(pos) != '"' {
				if pos >= len(p.src) {
					return 0, p.errAt(start, ReasonSyntax, "unterminated string literal")
				}
				r, np, err := p.parseChar(pos)
				if err != nil {
					return 0, err
				}
				if r == 0 {
					return 0, p.errAt(pos, ReasonBadChar, "a literal NUL can never be matched (token pieces are NUL-terminated)")
				}
				if err := emit(pos, celem{cChar, uint32(r)}); err != nil {
					return 0, err
				}
				it.Runes = append(it.Runes, r)
				pos = np
			}
			alt.Items = append(alt.Items, it)
			pos = p.space(pos+1, nested)
		case c == '[':
			pos++
			typ := cChar
			it := Item{Kind: KindClass, Offset: start}
			if p.at(pos) == '^' {
				pos++
				typ = cCharNot
				it.Negated = true
			}
			lastSymStart = len(*rule)
			for p.at(pos) != ']' {
				if pos >= len(p.src) {
					return 0, p.errAt(start, ReasonSyntax, "unterminated character class")
				}
				lo, np, err := p.parseChar(pos)
				if err != nil {
					return 0, err
				}
				t := typ
				if lastSymStart < len(*rule) {
					t = cCharAlt
				}
				if err := emit(pos, celem{t, uint32(lo)}); err != nil {
					return 0, err
				}
				hi, span := lo, false
				pos = np
				if p.at(pos) == '-' && p.at(pos+1) != ']' {
					span = true
					if pos+1 >= len(p.src) {
						return 0, p.errAt(start, ReasonSyntax, "unterminated character class")
					}
					hi, np, err = p.parseChar(pos + 1)
					if err != nil {
						return 0, err
					}
					if hi < lo {
						return 0, p.errAt(pos, ReasonBadRange, "range %q-%q is empty", lo, hi)
					}
					if err := emit(pos, celem{cRngUpper, uint32(hi)}); err != nil {
						return 0, err
					}
					pos = np
				}
				it.Ranges = append(it.Ranges, Range{Lo: lo, Hi: hi, span: span})
			}
			if len(it.Ranges) > 0 && !classMatches(it) {
				return 0, p.errAt(start, ReasonBadChar, "the character class matches no character a token can produce")
			}
			alt.Items = append(alt.Items, it)
			pos = p.space(pos+1, nested)
		case c == '<' || c == '!':
			it := Item{Kind: KindToken, Offset: start}
			typ := cToken
			if c == '!' {
				it.Negated = true
				typ = cTokenNot
				pos++
			}
			if p.at(pos) != '<' {
				return 0, p.errAt(pos, ReasonSyntax, "expecting '<'")
			}
			if p.at(pos+1) != '[' {
				return 0, p.errAt(pos, ReasonBadToken, "only numeric token references <[id]> are accepted; <text> needs the model's vocabulary")
			}
			id, np, err := p.parseInt(pos + 2)
			if err != nil {
				return 0, err
			}
			if p.at(np) != ']' || p.at(np+1) != '>' {
				return 0, p.errAt(np, ReasonSyntax, "expecting ]>")
			}
			if id > math.MaxInt32 {
				return 0, p.errAt(pos, ReasonBadToken, "token id %d is out of range", id)
			}
			it.TokenID = uint32(id)
			lastSymStart = len(*rule)
			if err := emit(pos, celem{typ, uint32(id)}); err != nil {
				return 0, err
			}
			alt.Items = append(alt.Items, it)
			pos = p.space(np+2, nested)
		case isWordChar(c):
			for isWordChar(p.at(pos)) {
				pos++
			}
			name := p.src[start:pos]
			id := p.symbol(name)
			if p.nsyms > p.lim.MaxRules {
				return 0, p.errAt(start, ReasonTooLarge, "the grammar has more than %d rules", p.lim.MaxRules)
			}
			if _, ok := p.firstRf[name]; !ok {
				p.firstRf[name] = start
			}
			pos = p.space(pos, nested)
			lastSymStart = len(*rule)
			if err := emit(start, celem{cRef, uint32(id)}); err != nil {
				return 0, err
			}
			alt.Items = append(alt.Items, Item{Kind: KindRef, Offset: start, Name: name})
		case c == '(':
			if depth+1 > p.lim.MaxDepth {
				return 0, p.errAt(start, ReasonTooDeep, "groups are nested more than %d deep", p.lim.MaxDepth)
			}
			pos = p.space(pos+1, true)
			id, err := p.generated()
			if err != nil {
				return 0, p.errAt(start, ReasonTooLarge, "the grammar expands to more than %d rules", p.lim.MaxRules)
			}
			np, alts, err := p.parseAlternates(pos, id, true, depth+1)
			if err != nil {
				return 0, err
			}
			pos = np
			lastSymStart = len(*rule)
			if err := emit(start, celem{cRef, uint32(id)}); err != nil {
				return 0, err
			}
			if p.at(pos) != ')' {
				return 0, p.errAt(pos, ReasonSyntax, "expecting ')'")
			}
			alt.Items = append(alt.Items, Item{Kind: KindGroup, Offset: start, Alts: alts})
			pos = p.space(pos+1, nested)
		case c == '.':
			lastSymStart = len(*rule)
			if err := emit(start, celem{cCharAny, 0}); err != nil {
				return 0, err
			}
			alt.Items = append(alt.Items, Item{Kind: KindAny, Offset: start})
			pos = p.space(pos+1, nested)
		case c == '*' || c == '+' || c == '?':
			pos = p.space(pos+1, nested)
			lo, hi := 0, -1
			if c == '+' {
				lo = 1
			} else if c == '?' {
				hi = 1
			}
			if err := repeat(start, lo, hi); err != nil {
				return 0, err
			}
		case c == '{':
			pos = p.space(pos+1, nested)
			lo, np, err := p.parseInt(pos)
			if err != nil {
				return 0, err
			}
			pos = p.space(np, nested)
			hi := -1
			switch p.at(pos) {
			case '}':
				hi = lo
				pos = p.space(pos+1, nested)
			case ',':
				pos = p.space(pos+1, nested)
				if isDigit(p.at(pos)) {
					hi, np, err = p.parseInt(pos)
					if err != nil {
						return 0, err
					}
					pos = p.space(np, nested)
				}
				if p.at(pos) != '}' {
					return 0, p.errAt(pos, ReasonSyntax, "expecting '}'")
				}
				pos = p.space(pos+1, nested)
			default:
				return 0, p.errAt(pos, ReasonSyntax, "expecting ',' or '}'")
			}
			if lo > p.lim.MaxRepetition || hi > p.lim.MaxRepetition {
				return 0, p.errAt(start, ReasonTooLarge, "repetition bound exceeds %d", p.lim.MaxRepetition)
			}
			if hi >= 0 && hi < lo {
				return 0, p.errAt(start, ReasonBadRepetition, "repetition {%d,%d} has max below min (llama.cpp would loop until memory runs out)", lo, hi)
			}
			if err := repeat(start, lo, hi); err != nil {
				return 0, err
			}
		default:
			return pos, nil
		}
	}
	return pos, nil
}

// classMatches reports whether a class matches some code point in
// U+0001..U+10FFFF (NUL never occurs in a token piece).
func classMatches(it Item) bool {
	if !it.Negated {
		for _, r := range it.Ranges {
			if r.Hi >= 1 {
				return true
			}
		}
		return false
	}
	rs := append([]Range(nil), it.Ranges...)
	sort.Slice(rs, func(i, j int) bool { return rs[i].Lo < rs[j].Lo })
	next := rune(1) // the lowest code point not yet known to be excluded
	for _, r := range rs {
		if r.Lo > next {
			return true
		}
		next = max(next, r.Hi+1)
	}
	return next <= utf8.MaxRune
}

// checkInit runs the analyses llama_grammar_init_impl needs to be safe on
// the expanded rules: a true left-recursion check (llama.cpp's own detector
// misses left recursion through rules that are only transitively nullable,
// and then advance_stack recurses until the C stack overflows), and a bound
// on the work of llama.cpp's non-memoising detector.
func (p *parser) checkInit() error {
	rules := p.crules
	n := len(rules)
	names := make([]string, n)
	for name, id := range p.ids {
		names[id] = name
	}
	nullable := derivable(rules, false)
	// Left edges: refs reachable at the start of an alternative.
	left := make([][]int, n)
	cleft := make([][]int, n) // the subset llama.cpp's detector follows
	cEmpty := make([]bool, n)
	for i, r := range rules {
		at := true
		for _, e := range r {
			if e.typ == cEnd || e.typ == cAlt {
				if at {
					cEmpty[i] = true
				}
				at = true
			} else {
				at = false
			}
		}
	}
	for i, r := range rules {
		trueOK, cOK := true, true
		for _, e := range r {
			switch {
			case e.typ == cEnd || e.typ == cAlt:
				trueOK, cOK = true, true
			case e.typ == cRef:
				if trueOK {
					left[i] = append(left[i], int(e.val))
				}
				if cOK {
					cleft[i] = append(cleft[i], int(e.val))
				}
				trueOK = trueOK && nullable[e.val]
				cOK = cOK && cEmpty[e.val]
			default:
				trueOK, cOK = false, false
			}
		}
	}
	// Iterative DFS for cycles in left.
	state := make([]byte, n) // 0 new, 1 on stack, 2 done
	type frame struct{ node, next int }
	for s := 0; s < n; s++ {
		if state[s] != 0 {
			continue
		}
		stack := []frame{{s, 0}}
		state[s] = 1
		for len(stack) > 0 {
			f := &stack[len(stack)-1]
			if f.next < len(left[f.node]) {
				m := left[f.node][f.next]
				f.next++
				if state[m] == 1 {
					p.rule = userName(names, m)
					return p.leftErr(m)
				}
				if state[m] == 0 {
					state[m] = 1
					stack = append(stack, frame{m, 0})
				}
				continue
			}
			state[f.node] = 2
			stack = stack[:len(stack)-1]
		}
	}
	// Work of llama_grammar_detect_left_recursion: calls(r) = 1 + sum of
	// calls over cleft[r], in topological order (cleft is acyclic now).
	calls := make([]int, n)
	done := make([]bool, n)
	var total int
	for s := 0; s < n; s++ {
		stack := []frame{{s, 0}}
		for len(stack) > 0 {
			f := &stack[len(stack)-1]
			if done[f.node] {
				stack = stack[:len(stack)-1]
				continue
			}
			if f.next < len(cleft[f.node]) {
				m := cleft[f.node][f.next]
				f.next++
				if !done[m] {
					stack = append(stack, frame{m, 0})
				}
				continue
			}
			c := 1
			for _, m := range cleft[f.node] {
				c += calls[m]
				if c > p.lim.MaxInitWork {
					c = p.lim.MaxInitWork + 1
				}
			}
			calls[f.node] = c
			done[f.node] = true
			stack = stack[:len(stack)-1]
		}
		total += calls[s]
		if total > p.lim.MaxInitWork {
			p.rule = userName(names, s)
			return p.errAt(0, ReasonTooComplex, "llama.cpp's left-recursion check would take more than %d steps on this grammar", p.lim.MaxInitWork)
		}
	}
	if productive := derivable(rules, true); !productive[p.ids["root"]] {
		p.rule = "root"
		return p.errAt(p.g.byName["root"].Offset, ReasonUnproductive, "rule root derives no finite string, so generation could never end")
	}
	return nil
}

func (p *parser) leftErr(id int) error {
	off := 0
	if r := p.g.byName[p.rule]; r != nil {
		off = r.Offset
	}
	return p.errAt(off, ReasonLeftRecursion, "the grammar is left-recursive (a rule can reach itself without consuming input), which llama.cpp refuses or overflows its stack on")
}

// derivable returns, per rule, whether it derives a finite string: with
// terminalsOK false, whether it derives the empty string (is nullable), and
// with terminalsOK true, whether it derives any terminal string at all (is
// productive). It runs a worklist in time linear in the elements: an
// alternative qualifies when each of its references is to a qualifying rule
// (and, for nullability, it holds no terminal).
func derivable(rules [][]celem, terminalsOK bool) []bool {
	n := len(rules)
	nullable := make([]bool, n)
	var pending []int         // per alternative: elements not yet known nullable
	var altRule []int         // per alternative: its rule
	users := make([][]int, n) // rule -> alternatives referencing it (per occurrence)
	var work []int
	for i, r := range rules {
		a, cnt, dead := len(pending), 0, false
		pending, altRule = append(pending, 0), append(altRule, i)
		for _, e := range r {
			switch {
			case e.typ == cEnd || e.typ == cAlt:
				if !dead {
					pending[a] = cnt
					if cnt == 0 && !nullable[i] {
						nullable[i] = true
						work = append(work, i)
					}
				} else {
					pending[a] = -1
				}
				if e.typ == cAlt {
					a, cnt, dead = len(pending), 0, false
					pending, altRule = append(pending, 0), append(altRule, i)
				}
			case e.typ == cRef:
				cnt++
				users[e.val] = append(users[e.val], a)
			default:
				dead = dead || !terminalsOK
			}
		}
	}
	for len(work) > 0 {
		r := work[len(work)-1]
		work = work[:len(work)-1]
		for _, a := range users[r] {
			if pending[a] <= 0 {
				continue
			}
			pending[a]--
			if pending[a] == 0 && !nullable[altRule[a]] {
				nullable[altRule[a]] = true
				work = append(work, altRule[a])
			}
		}
	}
	return nullable
}

// userName maps a rule id to a user-visible name; synthesised rules have no
// name in the map, so the nearest user name is not known and "" is returned.
func userName(names []string, id int) string {
	if id < len(names) {
		return names[id]
	}
	return ""
}

// TokenRef is a token reference (<[id]> or !<[id]>) of a grammar, at its
// byte offset.
type TokenRef struct {
	ID     uint32
	Offset int
}

// TokenRefs returns the grammar's token references in text order. A
// grammar's token ids are the vocabulary's, which Check does not know: the
// caller checks them.
func (g *Grammar) TokenRefs() []TokenRef {
	var refs []TokenRef
	var walk func(items []Item)
	walk = func(items []Item) {
		for _, it := range items {
			switch it.Kind {
			case KindToken:
				refs = append(refs, TokenRef{ID: it.TokenID, Offset: it.Offset})
			case KindGroup:
				for _, a := range it.Alts {
					walk(a.Items)
				}
			case KindRepeat:
				if it.Sub != nil {
					walk([]Item{*it.Sub})
				}
			}
		}
	}
	for _, r := range g.Rules {
		for _, a := range r.Alts {
			walk(a.Items)
		}
	}
	slices.SortFunc(refs, func(a, b TokenRef) int { return a.Offset - b.Offset })
	return refs
}
