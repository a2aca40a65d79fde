package llama

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/kvgate/kvgate/internal/grammar"
	"github.com/kvgate/kvgate/native"
)

// sampleUnderGrammar draws up to n tokens with gbnf from the rig's rows of
// real logits (greedy when temperature is 0), feeding every token to the
// grammar as the engine does; it returns the error that ended it, nil when
// it ended at an end-of-generation token or after n tokens. An abort in
// llama.cpp's grammar code kills the process, which fails the run.
func sampleUnderGrammar(r *samplingRig, gbnf string, temperature float32, seed uint32, n int) error {
	var err error
	r.do(func() {
		s := r.model.NewSampler(native.SamplingParams{Temperature: temperature, Seed: seed, HasSeed: true, Grammar: gbnf})
		defer s.Free()
		for i := range n {
			out, _ := r.row(i)
			var tok int32
			if tok, err = s.Sample(r.ctx, out); err != nil || r.model.IsEOG(tok) {
				return
			}
		}
	})
	return err
}

// FuzzSchemaGrammar converts arbitrary bytes as a JSON Schema with
// internal/grammar and, for every schema it converts, checks that
// llama.cpp's own parser accepts the grammar (CheckGrammar) and that
// sampling real logits of stories260K under it neither aborts nor fails but
// with native.ErrNoValidToken (a grammar whose every continuation the
// vocabulary cannot spell). The seeds are the end-to-end test's schemas.
func FuzzSchemaGrammar(f *testing.F) {
	files, _ := filepath.Glob("../../internal/grammar/testdata/schemas/*.json")
	if len(files) < 30 {
		f.Fatalf("%d seed schemas", len(files))
	}
	for _, file := range files {
		b, err := os.ReadFile(file)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, uint32(1))
	}
	f.Add([]byte(`{"type":"string","minLength":1000,"maxLength":1000}`), uint32(2))
	f.Add([]byte(`{"anyOf":[{"type":"null"},{"$ref":"#"}]}`), uint32(3))
	r := newSamplingRig(f)
	f.Fuzz(func(t *testing.T, schema []byte, seed uint32) {
		gbnf, err := grammar.FromJSONSchema(schema)
		if err != nil {
			return
		}
		if err := r.model.CheckGrammar(gbnf); err != nil {
			t.Fatalf("llama.cpp refuses the grammar of %q: %v\n%s", schema, err, gbnf)
		}
		if err := sampleUnderGrammar(r, gbnf, 1, seed, 24); err != nil && !errors.Is(err, native.ErrNoValidToken) {
			t.Fatalf("sampling under the grammar of %q: %v", schema, err)
		}
	})
}

// FuzzGBNF parses arbitrary text with internal/grammar's Check and, for
// every grammar it accepts, checks that llama.cpp's parser accepts it too
// (Check mirrors it: a grammar Check accepts and llama.cpp refuses would be
// refused with a worse message, one it refuses and llama.cpp accepts does
// not matter) and that sampling under it does not abort.
func FuzzGBNF(f *testing.F) {
	for _, g := range []string{
		`root ::= "yes" | "no"`,
		`root ::= [0-9]{2,4} "!"`,
		"root ::= item+\nitem ::= \"a\" | \"b\" item?",
		`root ::= ("x" | [^a-z]){0,3} "."`,
		grammar.AnyJSON(true),
		`root ::= <[2]> | "a"`,
		`root ::= [\x00-\x7f]*`,
	} {
		f.Add(g, uint32(1))
	}
	r := newSamplingRig(f)
	f.Fuzz(func(t *testing.T, gbnf string, seed uint32) {
		if grammar.Check(gbnf, grammar.DefaultLimits()) != nil {
			return
		}
		if err := r.model.CheckGrammar(gbnf); err != nil {
			t.Fatalf("Check accepts %q, llama.cpp refuses it: %v", gbnf, err)
		}
		if err := sampleUnderGrammar(r, gbnf, float32(seed%3)/2, seed, 16); err != nil && !errors.Is(err, native.ErrNoValidToken) {
			t.Fatalf("sampling under %q: %v", gbnf, err)
		}
	})
}
