package service

import (
	"errors"
	"unicode/utf8"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/internal/grammar"
)

// grammarChecker is implemented by a model that can parse a grammar with
// llama.cpp's own parser (*llama.Model): the last check before a grammar
// reaches a sampler.
type grammarChecker interface {
	CheckGrammar(gbnf string) error
}

// constraintGrammar compiles the request's output constraint to a GBNF
// grammar, "" for none, reporting a constraint the server cannot compile
// through bad, on the constraint's field. A grammar or schema is checked in
// Go (internal/grammar, which refuses what would make llama.cpp abort or
// take unbounded memory) and then, when the model can, by llama.cpp's own
// parser.
func constraintGrammar(req *kvgatev1.GenerateRequest, m tokenizer, lim Limits, bad func(field, format string, args ...any)) string {
	var gbnf, field string
	switch c := req.GetConstraint().(type) {
	case nil:
		return ""
	case *kvgatev1.GenerateRequest_Grammar:
		field = "grammar"
		if !checkConstraintText(field, c.Grammar, lim, bad) {
			return ""
		}
		g, err := grammar.Parse(c.Grammar, grammarLimits(lim))
		if err != nil {
			bad(field, "%v", err)
			return ""
		}
		for _, ref := range g.TokenRefs() {
			if vocab := m.Info().VocabSize; int64(ref.ID) >= int64(vocab) {
				bad(field, "token reference <[%d]> at byte %d is outside the vocabulary [0, %d)", ref.ID, ref.Offset, vocab)
				return ""
			}
		}
		gbnf = c.Grammar
	case *kvgatev1.GenerateRequest_Json:
		field = "json"
		gbnf = grammar.AnyJSON(c.Json.GetObjectOnly())
	case *kvgatev1.GenerateRequest_JsonSchema:
		field = "json_schema"
		if !checkConstraintText(field, c.JsonSchema, lim, bad) {
			return ""
		}
		g, err := grammar.FromJSONSchema([]byte(c.JsonSchema))
		var unsupported *grammar.UnsupportedError
		switch {
		case errors.As(err, &unsupported):
			bad(field, "%v (the supported subset is in the README, \"Structured output\")", err)
			return ""
		case err != nil:
			bad(field, "%v", err)
			return ""
		}
		gbnf = g
	default:
		bad("constraint", "unknown constraint")
		return ""
	}
	if gc, ok := m.(grammarChecker); ok {
		if err := gc.CheckGrammar(gbnf); err != nil {
			bad(field, "%v", err)
			return ""
		}
	}
	return gbnf
}

// checkConstraintText checks a grammar's or schema's size and encoding.
func checkConstraintText(field, text string, lim Limits, bad func(field, format string, args ...any)) bool {
	switch {
	case text == "":
		bad(field, "must not be empty")
	case len(text) > lim.grammarBytes():
		bad(field, "%d bytes exceed the server's max_grammar_bytes limit of %d", len(text), lim.grammarBytes())
	case !utf8.ValidString(text):
		bad(field, "is not valid UTF-8")
	default:
		return true
	}
	return false
}

// grammarLimits returns internal/grammar's limits with the server's size
// bound.
func grammarLimits(lim Limits) grammar.Limits {
	gl := grammar.DefaultLimits()
	gl.MaxBytes = lim.grammarBytes()
	return gl
}
