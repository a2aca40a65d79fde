package service

import kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"

// constraintGrammar compiles the request's output constraint to a GBNF
// grammar, "" for none, reporting a constraint the server cannot compile
// through bad.
func constraintGrammar(req *kvgatev1.GenerateRequest, m tokenizer, lim Limits, bad func(field, format string, args ...any)) string {
	return ""
}
