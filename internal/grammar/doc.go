// Package grammar guards llama.cpp's GBNF grammar sampler
// (llama_sampler_init_grammar) from hostile input and converts JSON Schemas
// to GBNF. It is pure Go: everything it refuses is refused before any C code
// runs.
//
// # Check and Parse
//
// Parse reads GBNF exactly as llama_grammar_parser::parse in the vendored
// llama.cpp (ollama v0.17.4, src/llama-grammar.cpp) does: rules
// "name ::= alternatives" with names of [a-zA-Z0-9-] (an underscore is not a
// name character there either), literals with the escapes \x.. \u....
// \U........ \t \n \r \\ \" \[ \], classes [...] with ranges and ^, '.',
// groups, * + ? {m} {m,} {m,n}, # comments, and numeric token references
// <[id]> and !<[id]>. Newlines end a rule except inside parentheses and
// right after '|', as in C. While parsing it builds the same flattened
// element arrays llama.cpp builds (including the rules synthesised for
// groups and repetitions) so that its size limits count what C would
// allocate. Check is Parse without the AST. Grammar.String prints a
// canonical form that re-parses to the same AST.
//
// Check is deliberately stricter than C in a few places, listed below; a
// grammar Check accepts is one llama.cpp parses and initialises.
//
// # ASSERTS: failure modes of llama-grammar.cpp and how Check prevents them
//
// Reachable from llama_grammar_init_impl (parse + init):
//
//   - Every std::runtime_error thrown by the parser (parse_hex "expecting N
//     hex chars", parse_name, parse_int, parse_char "unknown escape" and
//     "unexpected end of input", parse_token, "expecting preceding item to
//     */+/?/{", "expecting ')'", "expecting an int", "expecting '}'",
//     "expecting ','", "expecting ::=", "expecting newline or end",
//     "number of repetitions exceeds sane defaults", "Undefined rule",
//     "Undefined rule identifier", and std::stoul's out_of_range) is caught
//     inside parse, which logs and makes init return NULL. Check reports each
//     as Reason "syntax", "undefined_rule", "bad_token" or "too_large" with
//     the byte offset, so the C error path is never the one that speaks.
//   - Missing "root": init logs and returns NULL; an empty grammar (no rules)
//     likewise. Reason "missing_root". Callers must pass "root" as
//     grammar_root: symbol_ids.at(grammar_root) throws an uncaught
//     std::out_of_range for any other name that is absent.
//   - {m,n} with n < m: handle_repetitions computes n_opt = n - m in
//     uint64_t, which wraps, and then generates rules until memory runs
//     out. Reason "bad_repetition".
//   - Repetition expansion: S{m,n} copies S's elements m-1 times inline and
//     makes n-m rules holding a copy each; nested over literals this is
//     multiplicative. C only bounds m and n by 2000. Check bounds m and n by
//     Limits.MaxRepetition (default 1000, never above 2000) and counts the
//     expanded elements and rules exactly as C builds them (MaxElements,
//     MaxRules). Reason "too_large". (Groups are single references, so
//     nesting repetitions of groups stays small; repeating long literals is
//     what grows.)
//   - Deep nesting: parse_alternates and parse_sequence recurse on '(', so
//     deep nesting overflows the C stack. Limits.MaxDepth (default 64).
//     Reason "too_deep".
//   - Very long input: the C error messages copy the rest of the input, and
//     everything is linear in size; Limits.MaxBytes (default 64 KiB).
//     Reason "too_large".
//   - NUL bytes end the C string early, so C would parse a different
//     grammar from the one checked; invalid UTF-8 is decoded by decode_utf8
//     into arbitrary code points. Both are Reason "invalid_encoding".
//   - Left recursion: llama_grammar_detect_left_recursion logs and makes
//     init return NULL (it does not assert). But it only treats a rule as
//     nullable when it has a literally empty alternative, so it misses left
//     recursion through rules that are nullable only transitively (a ::= b a,
//     b ::= c, c ::= "x" |); llama_grammar_advance_stack then recurses
//     without bound and overflows the C stack at init. Check computes true
//     nullability and refuses any left recursion. Reason "left_recursion".
//   - llama_grammar_detect_left_recursion does not memoise visited rules
//     inside its recursion, so alternatives that start with several
//     references to rules with empty alternatives cost an exponential number
//     of calls. Check computes that count and bounds it by
//     Limits.MaxInitWork. Reason "too_complex".
//   - Recursion depth of advance_stack and of the detector is bounded by the
//     length of a left-reachable chain of rules, at most MaxRules once left
//     recursion is excluded.
//   - A rule defined twice is silently replaced by the later definition in
//     C; Check refuses it (Reason "duplicate_rule") as it is surely a
//     mistake. User names cannot collide with the names C generates
//     ("name_N") because '_' is not a name character.
//   - <text> token references need the model's vocabulary to tokenise (and
//     throw "invalid token" unless exactly one token results); Check refuses
//     them (Reason "bad_token") and accepts only <[id]> with at most nine
//     digits, so stoul never truncates.
//
// Reachable from apply/accept (llama_grammar_apply_impl,
// llama_grammar_accept_impl):
//
//   - GGML_ABORT("fatal error") in llama_grammar_advance_stack when a stack
//     top is END, ALT, CHAR_ALT or CHAR_RNG_UPPER, and the GGML_ASSERTs in
//     llama_grammar_match_char, llama_grammar_match_partial_char and
//     llama_grammar_match_token: unreachable for element arrays built by the
//     parser, which always put CHAR_ALT and CHAR_RNG_UPPER after a char and
//     only stop stacks at terminals. Only the text parser is ever used.
//   - GGML_ASSERT(!stacks.empty()) in llama_grammar_reject_candidates:
//     init always yields at least one stack, and accept throws before
//     leaving none.
//   - GGML_ABORT("end of grammar token received but grammar stack is not
//     empty") in accept, and the std::runtime_error "Unexpected empty
//     grammar stack after accepting piece" in llama_grammar_accept_token,
//     which escapes through the C API: both need a token the grammar had
//     masked to -inf to be sampled, i.e. every candidate rejected. Check
//     narrows this by refusing a literal NUL (token pieces are
//     NUL-terminated, so it can never match; Reason "bad_char"), code points
//     beyond U+10FFFF ("bad_char"), classes that match no code point in
//     U+0001..U+10FFFF such as [^\x00-\U0010FFFF] or [\x00] ("bad_char"),
//     empty ranges such as [z-a] ("bad_range")
//     and grammars whose root derives no finite string ("unproductive", so
//     end-of-generation is not masked forever). NOT prevented: a grammar
//     that needs a character or token id the model's vocabulary cannot
//     produce (Check has no vocabulary). The service must bound token ids by
//     the vocabulary size and treat an all -inf candidate set as an error.
//   - NOT prevented: the number of stacks can grow with each accepted
//     character in ambiguous grammars (s ::= "a" s "x" | "a" s "y" | "" has
//     2^k stacks after k characters), and apply costs time in proportion.
//     The service must bound each request's time.
//   - ollama_vocab::token_to_piece's throw and the trigger pattern asserts
//     and std::regex throws are reachable only from the lazy and ollama-vocab
//     entry points, which llama_sampler_init_grammar does not use.
//
// # JSON Schema subset
//
// FromJSONSchema first validates the schema itself against its metaschema
// with github.com/santhosh-tekuri/jsonschema/v6 (errors wrap
// ErrInvalidSchema; nothing is ever loaded from a URL or file), then
// converts this subset:
//
//   - type: string, number, integer, boolean, null, object, array, and type
//     arrays (an alternation).
//   - properties and required (every required name must have a schema in
//     properties). Required properties come first, in the order of the
//     required array; optional properties follow in lexicographic order,
//     each independently present or absent, with commas correct whichever
//     are present. additionalProperties may be absent, true, false or {}:
//     the output never contains additional properties, which validates in
//     every case; a non-empty schema there is refused.
//   - items (one schema; absent means any value), minItems and maxItems.
//   - enum and const with any JSON values, emitted in compact JSON; a
//     sibling "type" filters the values.
//   - minLength and maxLength, counted in code points as JSON Schema does:
//     the grammar's character unit is one unescaped code point or one escape
//     (\n, \uXXXX), and \u escapes of surrogate halves are excluded, so no
//     unit decodes to two or to half a code point.
//   - anyOf, and oneOf where the branches cannot overlap: oneOf is emitted as
//     an alternation, which cannot enforce exclusivity, so a oneOf whose
//     branches may both match a value (judged by JSON type, integer counting
//     as number, and by values for const/enum branches) is refused.
//   - $ref to #/$defs/name or #/definitions/name (definitions at the root),
//     recursive references included; a reference that would be left
//     recursive is refused by Check.
//   - Annotations (title, description, $schema, $id at the root, $comment,
//     examples, default, deprecated, readOnly, writeOnly) are ignored.
//
// Every other keyword (pattern, format, minimum, maximum, multipleOf,
// allOf, not, if/then/else, patternProperties, propertyNames, uniqueItems,
// contains, prefixItems, dependentRequired, remote $ref, $anchor, nested
// $id, ...) and keywords that do not apply to the declared type are refused
// with an *UnsupportedError naming the keyword and the JSON pointer of the
// schema holding it. Nothing is silently ignored.
//
// Bounds: schemas of at most MaxSchemaBytes, subschema nesting and $ref
// chains of at most MaxSchemaDepth, at most MaxProperties properties per
// object and MaxEnum enum values or anyOf/oneOf branches, length and item
// bounds of at most 1000. The grammar built must pass Check with
// DefaultLimits, or FromJSONSchema returns an error instead of it.
//
// Generated output: at most one space or newline between tokens (rule ws),
// integers of at most MaxIntegerDigits (15) digits without fraction or
// exponent (every such integer is exact as a float64), and numbers with at
// most 6 fraction digits and a two-digit exponent. Strings and arrays are
// as long as the schema allows: a string without maxLength or an array
// without maxItems is unbounded, as in llama.cpp's own converter, and it is
// max_tokens that bounds the output (a stream that reaches it ends with
// FINISH_REASON_LENGTH, its JSON incomplete). AnyJSON builds values nested at
// most MaxAnyDepth deep, which bounds the grammar's stacks.
package grammar
