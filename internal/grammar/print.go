package grammar

import (
	"fmt"
	"strings"
)

// String returns g in a canonical GBNF form (one rule per line, every
// non-alphanumeric character escaped) that Parse turns back into the same
// AST.
func (g *Grammar) String() string {
	var b strings.Builder
	for _, r := range g.Rules {
		b.WriteString(r.Name)
		b.WriteString(" ::= ")
		writeAlts(&b, r.Alts)
		b.WriteByte('\n')
	}
	return b.String()
}

func writeAlts(b *strings.Builder, alts []Alt) {
	for i, a := range alts {
		if i > 0 {
			b.WriteString(" | ")
		}
		for j := range a.Items {
			if j > 0 {
				b.WriteByte(' ')
			}
			writeItem(b, &a.Items[j])
		}
	}
}

func writeChar(b *strings.Builder, r rune) {
	switch {
	case ('a' <= r && r <= 'z') || ('A' <= r && r <= 'Z') || ('0' <= r && r <= '9') || r == ' ':
		b.WriteRune(r)
	case r <= 0xFF:
		fmt.Fprintf(b, `\x%02X`, r)
	case r <= 0xFFFF:
		fmt.Fprintf(b, `\u%04X`, r)
	default:
		fmt.Fprintf(b, `\U%08X`, r)
	}
}

func writeItem(b *strings.Builder, it *Item) {
	switch it.Kind {
	case KindLiteral:
		b.WriteByte('"')
		for _, r := range it.Runes {
			writeChar(b, r)
		}
		b.WriteByte('"')
	case KindClass:
		b.WriteByte('[')
		if it.Negated {
			b.WriteByte('^')
		}
		for _, r := range it.Ranges {
			writeChar(b, r.Lo)
			if r.Hi != r.Lo || r.span {
				b.WriteByte('-')
				writeChar(b, r.Hi)
			}
		}
		b.WriteByte(']')
	case KindAny:
		b.WriteByte('.')
	case KindRef:
		b.WriteString(it.Name)
	case KindGroup:
		b.WriteByte('(')
		writeAlts(b, it.Alts)
		b.WriteByte(')')
	case KindRepeat:
		writeItem(b, it.Sub)
		if it.Max < 0 {
			fmt.Fprintf(b, "{%d,}", it.Min)
		} else {
			fmt.Fprintf(b, "{%d,%d}", it.Min, it.Max)
		}
	case KindToken:
		if it.Negated {
			b.WriteByte('!')
		}
		fmt.Fprintf(b, "<[%d]>", it.TokenID)
	}
}
