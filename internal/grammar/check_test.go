package grammar

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

func TestCheckAccepts(t *testing.T) {
	tests := []struct {
		name, gbnf string
		rules      int // user rules expected
	}{
		{"yes-no", `root ::= "yes" | "no"`, 1},
		{"crlf and comments", "# c\r\nroot ::= a # trailing\r\na ::= [a-z]+\r\n", 2},
		{"escapes", `root ::= "\x41\u00e9\U0001F600\t\n\r\\\"\[\]"`, 1},
		{"classes", `root ::= [^"\\] [a-zA-Z0-9_-] [\x00-\x1F] .`, 1},
		{"repetitions", `root ::= "a"{3} "b"{0,2} "c"{1,} "d"* "e"+ "f"?`, 1},
		{"empty alternative", `root ::= "a" | `, 1},
		{"empty rule", "root ::= a\na ::=\n", 2},
		{"nested groups", `root ::= (("a" | ("b" "c")*) "d")?`, 1},
		{"multiline nested", "root ::= (\n  \"a\"\n  | \"b\"\n)", 1},
		{"tokens", `root ::= <[12]> !<[3]> "x"`, 1},
		{"right recursion", "root ::= \"a\" root | \"b\"", 1},
		{"repeat of repeat", `root ::= ("a"{2}){2,3}`, 1},
		{"empty group", `root ::= () "x"`, 1},
		{"productive through one alternative", "root ::= \"a\" root | x\nx ::= \"b\" x | \"c\"", 2},
		{"negated class leaving one char", `root ::= [^\x00-\x40\x42-\U0010FFFF]`, 1},
		{"negated class leaving the top", `root ::= [^\x01-\U0010FFFE]`, 1},
		{"max repetition", `root ::= "a"{0,1000}`, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g, err := Parse(tt.gbnf, DefaultLimits())
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if len(g.Rules) != tt.rules || g.Rule("root") == nil {
				t.Fatalf("got %d rules (root %v), want %d", len(g.Rules), g.Rule("root") != nil, tt.rules)
			}
		})
	}
}

func TestCheckExampleGrammars(t *testing.T) {
	files, err := filepath.Glob("testdata/gbnf/*.gbnf")
	if err != nil || len(files) < 4 {
		t.Fatalf("testdata grammars: %v (%d files)", err, len(files))
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			if err := Check(string(b), DefaultLimits()); err != nil {
				t.Fatalf("Check: %v", err)
			}
		})
	}
}

func TestCheckRefuses(t *testing.T) {
	deep := "root ::= " + strings.Repeat("(", 65) + `"a"` + strings.Repeat(")", 65)
	manyRules := func(n int) string {
		var b strings.Builder
		b.WriteString("root ::= r0\n")
		for i := 0; i < n; i++ {
			b.WriteString("r" + strconv.Itoa(i) + ` ::= "x"` + "\n")
		}
		return b.String()
	}
	// Each rule starts with two nullable references to the next: llama.cpp's
	// detector visits 2^n paths.
	var expo strings.Builder
	expo.WriteString("root ::= r0\n")
	for i := 0; i < 30; i++ {
		expo.WriteString("r" + strconv.Itoa(i) + " ::= \"\" | r" + strconv.Itoa(i+1) + " r" + strconv.Itoa(i+1) + " \"x\"\n")
	}
	expo.WriteString("r30 ::= \"y\" |\n")
	tests := []struct {
		name, gbnf, reason, rule string
		tooLarge                 bool
	}{
		{"empty", "", ReasonMissingRoot, "", false},
		{"only comments", "# nothing\n", ReasonMissingRoot, "", false},
		{"no root", `start ::= "a"`, ReasonMissingRoot, "", false},
		{"undefined", `root ::= foo`, ReasonUndefinedRule, "foo", false},
		{"root only referenced", "a ::= root", ReasonUndefinedRule, "root", false},
		{"duplicate", "root ::= \"a\"\nroot ::= \"b\"", ReasonDuplicateRule, "root", false},
		{"direct left recursion", `root ::= root "a" | "b"`, ReasonLeftRecursion, "root", false},
		{"indirect left recursion", "root ::= a\na ::= b \"x\"\nb ::= root | \"y\"", ReasonLeftRecursion, "", false},
		{"left recursion via nullable", "root ::= b root \"x\" | \"y\"\nb ::= c\nc ::= \"z\" |", ReasonLeftRecursion, "root", false},
		{"left recursion via star", "root ::= \"a\"* root | \"b\"", ReasonLeftRecursion, "root", false},
		{"missing ::=", `root = "a"`, ReasonSyntax, "root", false},
		{"unterminated literal", `root ::= "abc`, ReasonSyntax, "root", false},
		{"unterminated class", `root ::= [abc`, ReasonSyntax, "root", false},
		{"bad escape", `root ::= "\q"`, ReasonSyntax, "root", false},
		{"short hex", `root ::= "\x4"`, ReasonSyntax, "root", false},
		{"star first", `root ::= * "a"`, ReasonSyntax, "root", false},
		{"star after empty literal", `root ::= "" *`, ReasonSyntax, "root", false},
		{"star after zero repetition", `root ::= "a"{0} *`, ReasonSyntax, "root", false},
		{"unclosed group", `root ::= ("a"`, ReasonSyntax, "root", false},
		{"junk after rule", `root ::= "a" )`, ReasonSyntax, "root", false},
		{"continuation line", "root ::= \"a\"\n | \"b\"", ReasonSyntax, "root", false},
		{"bad brace", `root ::= "a"{x}`, ReasonSyntax, "root", false},
		{"underscore name", `root_1 ::= "a"`, ReasonSyntax, "", false},
		{"text token", `root ::= <think>`, ReasonBadToken, "root", false},
		{"max below min", `root ::= "a"{5,2}`, ReasonBadRepetition, "root", false},
		{"repetition too large", `root ::= "a"{0,1001}`, ReasonTooLarge, "root", true},
		{"repetition beyond C threshold", `root ::= "a"{2001}`, ReasonTooLarge, "root", true},
		{"huge integer", `root ::= "a"{99999999999999999999}`, ReasonTooLarge, "root", true},
		{"nested repetition stays small", `root ::= (("a"{1000}){1000}){1000}`, "", "", false},
		{"literal repetition blow-up", `root ::= "` + strings.Repeat("a", 200) + `"{1000}`, ReasonTooLarge, "root", true},
		{"too deep", deep, ReasonTooDeep, "root", true},
		{"too many rules", manyRules(5000), ReasonTooLarge, "", true},
		{"exponential init", expo.String(), ReasonTooComplex, "", true},
		{"unproductive root", `root ::= "a" root`, ReasonUnproductive, "root", false},
		{"unproductive via helper", "root ::= x | y\nx ::= \"a\" x\ny ::= x \"b\"", ReasonUnproductive, "root", false},
		{"nul literal", `root ::= "\x00"`, ReasonBadChar, "root", false},
		{"beyond unicode", `root ::= "\U00110000"`, ReasonBadChar, "root", false},
		{"negated class of everything", `root ::= [^\x00-\U0010FFFF]`, ReasonBadChar, "root", false},
		{"negated class of everything in pieces", `root ::= [^\x01-\x7F\x80-\U0010FFFF]`, ReasonBadChar, "root", false},
		{"class of only NUL", `root ::= [\x00]`, ReasonBadChar, "root", false},
		{"reversed range", `root ::= [z-a]`, ReasonBadRange, "root", false},
		{"nul byte", "root ::= \"a\"\x00", ReasonInvalidEncoded, "", false},
		{"invalid utf8", "root ::= \"\xff\"", ReasonInvalidEncoded, "", false},
		{"too long", "root ::= \"" + strings.Repeat("a", 70000) + "\"", ReasonTooLarge, "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := Check(tt.gbnf, DefaultLimits())
			if tt.reason == "" {
				if err != nil {
					t.Fatalf("Check: %v", err)
				}
				return
			}
			var ge *Error
			if !errors.As(err, &ge) {
				t.Fatalf("Check = %v, want *Error", err)
			}
			if ge.Reason != tt.reason {
				t.Fatalf("reason %q, want %q (%v)", ge.Reason, tt.reason, err)
			}
			if tt.rule != "" && ge.Rule != tt.rule {
				t.Errorf("rule %q, want %q (%v)", ge.Rule, tt.rule, err)
			}
			if errors.Is(err, ErrTooLarge) != tt.tooLarge {
				t.Errorf("errors.Is(err, ErrTooLarge) = %v, want %v", !tt.tooLarge, tt.tooLarge)
			}
			if ge.Line < 1 || ge.Col < 1 || ge.Offset < 0 || ge.Offset > len(tt.gbnf) {
				t.Errorf("bad position %d:%d@%d", ge.Line, ge.Col, ge.Offset)
			}
			if !strings.Contains(err.Error(), tt.reason) || !strings.HasPrefix(err.Error(), "invalid grammar") {
				t.Errorf("message %q", err.Error())
			}
		})
	}
}

func TestErrorPosition(t *testing.T) {
	err := Check("root ::= a\na ::= \"x\" | foo\n", DefaultLimits())
	var ge *Error
	if !errors.As(err, &ge) {
		t.Fatalf("Check = %v", err)
	}
	if ge.Line != 2 || ge.Col != 13 || ge.Offset != 23 || ge.Rule != "foo" {
		t.Fatalf("got line %d col %d offset %d rule %q", ge.Line, ge.Col, ge.Offset, ge.Rule)
	}
}

func TestLimitsOverride(t *testing.T) {
	g := `root ::= "a"{0,50}`
	if err := Check(g, Limits{MaxRepetition: 10}); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("MaxRepetition 10: %v", err)
	}
	if err := Check(g, Limits{MaxElements: 100}); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("MaxElements 100: %v", err)
	}
	if err := Check(g, Limits{}); err != nil {
		t.Fatalf("zero Limits: %v", err)
	}
}

func TestExpansionCount(t *testing.T) {
	// "a"{2,4}: root holds a a ref END (4); two optional rules: [a ALT END]
	// and [a ref ALT END].
	g, err := Parse(`root ::= "a"{2,4}`, DefaultLimits())
	if err != nil {
		t.Fatal(err)
	}
	if g.Elements != 4+3+4 || g.CRules != 3 {
		t.Fatalf("elements %d rules %d", g.Elements, g.CRules)
	}
}
