package grammar

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

// stripOffsets zeroes every Offset so ASTs from different texts compare.
func stripOffsets(alts []Alt) []Alt {
	out := make([]Alt, len(alts))
	for i, a := range alts {
		out[i].Items = make([]Item, len(a.Items))
		for j, it := range a.Items {
			out[i].Items[j] = stripItem(it)
		}
	}
	return out
}

func stripItem(it Item) Item {
	it.Offset = 0
	if it.Alts != nil {
		it.Alts = stripOffsets(it.Alts)
	}
	if it.Sub != nil {
		s := stripItem(*it.Sub)
		it.Sub = &s
	}
	return it
}

func seedGrammars(f *testing.F) {
	files, _ := filepath.Glob("testdata/gbnf/*.gbnf")
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(string(b))
	}
	for _, s := range []string{
		`root ::= "yes" | "no"`, `root ::= root "a"`, `root ::= ("a"{2,3})* [^a-z\x00] . <[5]> !<[6]>`,
		"root ::= a\na ::= (\n\"x\" | )", `root ::= "\U0001F600"{0,5}`, AnyJSON(false),
	} {
		f.Add(s)
	}
}

func FuzzCheck(f *testing.F) {
	seedGrammars(f)
	f.Fuzz(func(t *testing.T, src string) {
		g, err := Parse(src, DefaultLimits())
		if err != nil {
			if _, ok := err.(*Error); !ok {
				t.Fatalf("error of type %T: %v", err, err)
			}
			return
		}
		if g.Rule("root") == nil {
			t.Fatal("accepted grammar has no root")
		}
		printed := g.String()
		g2, err := Parse(printed, DefaultLimits())
		if err != nil {
			t.Fatalf("canonical form %q of %q does not re-parse: %v", printed, src, err)
		}
		if len(g2.Rules) != len(g.Rules) || g2.Elements != g.Elements || g2.CRules != g.CRules {
			t.Fatalf("re-parse differs: %d/%d rules, %d/%d elements", len(g.Rules), len(g2.Rules), g.Elements, g2.Elements)
		}
		for i, r := range g.Rules {
			if r.Name != g2.Rules[i].Name || !reflect.DeepEqual(stripOffsets(r.Alts), stripOffsets(g2.Rules[i].Alts)) {
				t.Fatalf("rule %q differs after re-parse of %q", r.Name, printed)
			}
		}
	})
}

func FuzzFromJSONSchema(f *testing.F) {
	files, _ := filepath.Glob("testdata/schemas/*.json")
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, schema []byte) {
		g, err := FromJSONSchema(schema)
		if err != nil {
			if g != "" {
				t.Fatal("grammar returned with an error")
			}
			return
		}
		if err := Check(g, DefaultLimits()); err != nil {
			t.Fatalf("returned grammar fails Check: %v", err)
		}
	})
}
