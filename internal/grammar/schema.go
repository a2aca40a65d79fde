package grammar

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/santhosh-tekuri/jsonschema/v6"
)

// Schema input bounds.
const (
	// MaxSchemaBytes bounds the size of a JSON Schema.
	MaxSchemaBytes = 64 << 10
	// MaxSchemaDepth bounds the nesting of subschemas (and of $ref chains,
	// which count as nesting).
	MaxSchemaDepth = 32
	// MaxProperties bounds the number of properties of one object.
	MaxProperties = 128
	// MaxEnum bounds the number of enum values (and anyOf/oneOf branches).
	MaxEnum = 256
	// MaxIntegerDigits bounds the digits of a generated integer part.
	MaxIntegerDigits = 15
	// MaxFractionDigits bounds the digits of a generated fraction.
	MaxFractionDigits = 6
	// MaxAnyDepth bounds the nesting of values generated for schemas that
	// allow any JSON value.
	MaxAnyDepth = 8
)

// ErrInvalidSchema is wrapped by the error FromJSONSchema returns when its
// input is not valid JSON or not a valid JSON Schema.
var ErrInvalidSchema = errors.New("grammar: invalid JSON schema")

// UnsupportedError reports a schema keyword (or keyword use) outside the
// supported subset.
type UnsupportedError struct {
	// Keyword is the keyword refused, e.g. "pattern".
	Keyword string
	// Path is the JSON pointer of the schema that holds the keyword.
	Path string
	// Detail optionally says why a supported keyword is refused here.
	Detail string
}

// Error returns a sentence naming the keyword and where it is.
func (e *UnsupportedError) Error() string {
	p := e.Path
	if p == "" {
		p = "the root"
	}
	if e.Detail != "" {
		return fmt.Sprintf("JSON schema keyword %q at %s is not supported: %s", e.Keyword, p, e.Detail)
	}
	return fmt.Sprintf("JSON schema keyword %q at %s is not supported", e.Keyword, p)
}

var annotations = map[string]bool{
	"title": true, "description": true, "$schema": true, "$id": true, "$comment": true,
	"examples": true, "default": true, "deprecated": true, "readOnly": true, "writeOnly": true,
}

// supported lists the keywords the converter understands.
var supported = map[string]bool{
	"type": true, "properties": true, "required": true, "additionalProperties": true,
	"items": true, "minItems": true, "maxItems": true, "enum": true, "const": true,
	"minLength": true, "maxLength": true, "anyOf": true, "oneOf": true, "$ref": true,
	"$defs": true, "definitions": true,
}

// primitives holds the shared primitive rules. ws admits at most one space
// or newline, so a sampling model cannot spin on whitespace; integers have
// at most MaxIntegerDigits digits, fractions at most MaxFractionDigits and
// exponents at most two, so every number is finite as a float64.
var primitives = fmt.Sprintf(`ws ::= [ \n]?
char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" hex-nonsurrogate)
hex ::= [0-9a-fA-F]
hex-nonsurrogate ::= [0-9a-cA-Ce-fE-F] hex hex hex | [dD] [0-7] hex hex
int-part ::= "-"? ("0" | [1-9] [0-9]{0,%d})
integer ::= int-part ws
number ::= int-part ("." [0-9]{1,%d})? ([eE] [-+]? [0-9]{1,2})? ws
boolean ::= ("true" | "false") ws
null ::= "null" ws
string ::= "\"" char* "\"" ws
`, MaxIntegerDigits-1, MaxFractionDigits)

type conv struct {
	root    map[string]any
	rules   []string
	defined map[string]string // ref pointer -> rule name
	names   map[string]bool
	bodies  map[string]string // base and body -> rule name
	anyUsed bool
}

// FromJSONSchema converts a JSON Schema in the documented subset to a GBNF
// grammar whose root rule admits only JSON texts valid against the schema.
func FromJSONSchema(schema []byte) (string, error) {
	if len(schema) > MaxSchemaBytes {
		return "", fmt.Errorf("schema is %d bytes, more than %d: %w", len(schema), MaxSchemaBytes, ErrTooLarge)
	}
	doc, err := jsonschema.UnmarshalJSON(bytes.NewReader(schema))
	if err != nil {
		return "", fmt.Errorf("%w: %w", ErrInvalidSchema, err)
	}
	if d := jsonDepth(doc); d > 2*MaxSchemaDepth+8 {
		return "", fmt.Errorf("schema nests %d deep: %w", d, ErrTooLarge)
	}
	var generic any
	dec := json.NewDecoder(bytes.NewReader(schema))
	dec.UseNumber()
	if err := dec.Decode(&generic); err != nil {
		return "", fmt.Errorf("%w: %w", ErrInvalidSchema, err)
	}
	c := &conv{defined: map[string]string{}, names: map[string]bool{}, bodies: map[string]string{}}
	if m, ok := generic.(map[string]any); ok {
		c.root = m
	}
	if err := refScan(generic, "", ""); err != nil {
		return "", err
	}
	// The compiler loads nothing: noLoader refuses every remote reference.
	comp := jsonschema.NewCompiler()
	comp.UseLoader(noLoader{})
	if err := comp.AddResource(resourceURL, doc); err != nil {
		return "", fmt.Errorf("%w: %w", ErrInvalidSchema, err)
	}
	if _, err := comp.Compile(resourceURL); err != nil {
		return "", fmt.Errorf("%w: %w", ErrInvalidSchema, err)
	}
	body, err := c.schema(generic, "", 0)
	if err != nil {
		return "", err
	}
	var b strings.Builder
	b.WriteString("root ::= ws " + body + "\n")
	for _, r := range c.rules {
		b.WriteString(r + "\n")
	}
	if c.anyUsed {
		b.WriteString(anyRules())
	}
	b.WriteString(primitives)
	g := b.String()
	if err := Check(g, DefaultLimits()); err != nil {
		return "", fmt.Errorf("the grammar built from the schema is not acceptable: %w", err)
	}
	return g, nil
}

// resourceURL names the schema for the compiler; it resolves nowhere.
const resourceURL = "https://kvgate.invalid/schema.json"

// refScan refuses, before the compiler sees them, $ref values that are not
// local definition references, so that a remote reference is reported as
// unsupported rather than as a load failure.
func refScan(v any, path, parentKey string) error {
	switch t := v.(type) {
	case map[string]any:
		for k, x := range t {
			if k == "$ref" && parentKey != "properties" && parentKey != "$defs" && parentKey != "definitions" {
				if r, ok := x.(string); ok && !strings.HasPrefix(r, "#/$defs/") && !strings.HasPrefix(r, "#/definitions/") {
					return &UnsupportedError{Keyword: "$ref", Path: path, Detail: fmt.Sprintf("only local references to #/$defs/... or #/definitions/... are supported, not %q", r)}
				}
			}
			if err := refScan(x, ptr(path, k), k); err != nil {
				return err
			}
		}
	case []any:
		for i, x := range t {
			if err := refScan(x, ptr(path, strconv.Itoa(i)), ""); err != nil {
				return err
			}
		}
	}
	return nil
}

type noLoader struct{}

func (noLoader) Load(url string) (any, error) {
	return nil, fmt.Errorf("loading %s: only local references are supported", url)
}

func jsonDepth(v any) int {
	switch t := v.(type) {
	case map[string]any:
		d := 0
		for _, x := range t {
			d = max(d, jsonDepth(x))
		}
		return d + 1
	case []any:
		d := 0
		for _, x := range t {
			d = max(d, jsonDepth(x))
		}
		return d + 1
	}
	return 0
}

func ptr(path string, tokens ...string) string {
	for _, t := range tokens {
		t = strings.ReplaceAll(t, "~", "~0")
		t = strings.ReplaceAll(t, "/", "~1")
		path += "/" + t
	}
	return path
}

// addRule defines a rule with the given body and returns its name; a body
// already defined under the same base name is reused, so that repeated
// subschemas (say, many strings with the same maxLength) share one rule and
// its repetition expansion.
func (c *conv) addRule(base, body string) string {
	key := base + "\x00" + body
	if name, ok := c.bodies[key]; ok {
		return name
	}
	name := base
	for i := 1; c.names[name]; i++ {
		name = base + "-" + strconv.Itoa(i)
	}
	c.names[name] = true
	c.bodies[key] = name
	c.rules = append(c.rules, name+" ::= "+body)
	return name
}

// literal returns a GBNF string literal matching s exactly.
func literal(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		switch {
		case r == '"':
			b.WriteString(`\"`)
		case r == '\\':
			b.WriteString(`\\`)
		case r == '\n':
			b.WriteString(`\n`)
		case r == '\r':
			b.WriteString(`\r`)
		case r == '\t':
			b.WriteString(`\t`)
		case r < 0x20 || r == 0x7f:
			fmt.Fprintf(&b, `\x%02X`, r)
		default:
			b.WriteRune(r)
		}
	}
	b.WriteByte('"')
	return b.String()
}

// jsonLiteral returns a GBNF literal for the compact JSON encoding of v.
func jsonLiteral(v any) (string, error) {
	raw, err := json.Marshal(v)
	if err != nil {
		return "", fmt.Errorf("encoding a constant: %w", err)
	}
	return literal(string(raw)), nil
}

func typeOf(v any) string {
	switch t := v.(type) {
	case nil:
		return "null"
	case bool:
		return "boolean"
	case string:
		return "string"
	case json.Number:
		if _, err := strconv.ParseInt(t.String(), 10, 64); err == nil {
			return "integer"
		}
		if f, err := t.Float64(); err == nil && f == float64(int64(f)) {
			return "integer"
		}
		return "number"
	case []any:
		return "array"
	case map[string]any:
		return "object"
	}
	return ""
}

func nonNegInt(v any, kw, path string) (int, error) {
	n, ok := v.(json.Number)
	if !ok {
		return 0, fmt.Errorf("%w: %s at %s is not a number", ErrInvalidSchema, kw, path)
	}
	i, err := strconv.Atoi(n.String())
	if err != nil || i < 0 {
		return 0, fmt.Errorf("%w: %s at %s is not a non-negative integer", ErrInvalidSchema, kw, path)
	}
	return i, nil
}

// schema returns a GBNF sequence (usually a rule reference) for s.
func (c *conv) schema(s any, path string, depth int) (string, error) {
	if depth > MaxSchemaDepth {
		return "", fmt.Errorf("schema at %s nests more than %d deep: %w", path, MaxSchemaDepth, ErrTooLarge)
	}
	switch t := s.(type) {
	case bool:
		if !t {
			return "", &UnsupportedError{Keyword: "false", Path: path, Detail: "the false schema admits no value"}
		}
		c.anyUsed = true
		return "any-value", nil
	case map[string]any:
		return c.object(t, path, depth)
	}
	return "", fmt.Errorf("%w: schema at %s is neither an object nor a boolean", ErrInvalidSchema, path)
}

func (c *conv) object(m map[string]any, path string, depth int) (string, error) {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	has := map[string]bool{}
	for _, k := range keys {
		if annotations[k] {
			if k == "$id" && path != "" {
				return "", &UnsupportedError{Keyword: k, Path: path, Detail: "$id changes the base URI of references; it is accepted only at the root"}
			}
			continue
		}
		if !supported[k] {
			return "", &UnsupportedError{Keyword: k, Path: path}
		}
		has[k] = true
	}
	for _, k := range []string{"$defs", "definitions"} {
		if d, ok := m[k]; ok {
			if path != "" {
				return "", &UnsupportedError{Keyword: k, Path: path, Detail: "definitions are accepted only at the root"}
			}
			if dm, ok := d.(map[string]any); ok && len(dm) > MaxEnum {
				return "", fmt.Errorf("%s has %d entries, more than %d: %w", k, len(dm), MaxEnum, ErrTooLarge)
			}
			delete(has, k)
		}
	}
	onlyWith := func(kw string, allowed ...string) error {
		// In sorted order, so that the keyword named is always the same.
		for _, k := range slices.Sorted(maps.Keys(has)) {
			if k != kw && !contains(allowed, k) {
				return &UnsupportedError{Keyword: k, Path: path, Detail: "it cannot be combined with " + kw}
			}
		}
		return nil
	}
	switch {
	case has["$ref"]:
		if err := onlyWith("$ref"); err != nil {
			return "", err
		}
		return c.ref(m["$ref"], path, depth)
	case has["anyOf"] || has["oneOf"]:
		kw := "anyOf"
		if has["oneOf"] {
			kw = "oneOf"
		}
		if err := onlyWith(kw); err != nil {
			return "", err
		}
		return c.union(kw, m[kw], path, depth)
	case has["enum"] || has["const"]:
		kw := "enum"
		if has["const"] {
			kw = "const"
		}
		if err := onlyWith(kw, "type"); err != nil {
			return "", err
		}
		return c.enum(kw, m, path)
	}
	types, err := schemaTypes(m, path)
	if err != nil {
		return "", err
	}
	if types == nil {
		if len(has) > 0 {
			var ks []string
			for k := range has {
				ks = append(ks, k)
			}
			sort.Strings(ks)
			return "", &UnsupportedError{Keyword: ks[0], Path: path, Detail: "it needs an explicit \"type\""}
		}
		c.anyUsed = true
		return "any-value", nil
	}
	var alts []string
	for _, ty := range types {
		var body string
		var err error
		switch ty {
		case "string":
			body, err = c.str(m, path)
		case "integer", "number", "boolean", "null":
			body = ty
		case "object":
			body, err = c.obj(m, path, depth)
		case "array":
			body, err = c.arr(m, path, depth)
		}
		if err != nil {
			return "", err
		}
		alts = append(alts, body)
	}
	for _, k := range slices.Sorted(maps.Keys(has)) {
		if !keywordApplies(k, types) {
			return "", &UnsupportedError{Keyword: k, Path: path, Detail: "it does not apply to the schema's type"}
		}
	}
	if len(alts) == 1 {
		return alts[0], nil
	}
	return "(" + strings.Join(alts, " | ") + ")", nil
}

func keywordApplies(k string, types []string) bool {
	want := map[string]string{
		"properties": "object", "required": "object", "additionalProperties": "object",
		"items": "array", "minItems": "array", "maxItems": "array",
		"minLength": "string", "maxLength": "string",
	}[k]
	return k == "type" || contains(types, want)
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func schemaTypes(m map[string]any, path string) ([]string, error) {
	t, ok := m["type"]
	if !ok {
		return nil, nil
	}
	var out []string
	add := func(v any) error {
		s, ok := v.(string)
		switch s {
		case "string", "number", "integer", "boolean", "null", "object", "array":
		default:
			ok = false
		}
		if !ok {
			return fmt.Errorf("%w: type at %s is not a JSON Schema type", ErrInvalidSchema, path)
		}
		if !contains(out, s) {
			out = append(out, s)
		}
		return nil
	}
	switch tv := t.(type) {
	case []any:
		if len(tv) == 0 {
			return nil, fmt.Errorf("%w: empty type array at %s", ErrInvalidSchema, path)
		}
		for _, v := range tv {
			if err := add(v); err != nil {
				return nil, err
			}
		}
	default:
		if err := add(tv); err != nil {
			return nil, err
		}
	}
	// integer is a subset of number: listing both makes a JSON integer
	// match both alternatives, harmless for "type" but wasteful.
	if contains(out, "integer") && contains(out, "number") {
		var keep []string
		for _, s := range out {
			if s != "integer" {
				keep = append(keep, s)
			}
		}
		out = keep
	}
	return out, nil
}

func (c *conv) str(m map[string]any, path string) (string, error) {
	lo, hi := 0, -1
	var err error
	if v, ok := m["minLength"]; ok {
		if lo, err = nonNegInt(v, "minLength", path); err != nil {
			return "", err
		}
	}
	if v, ok := m["maxLength"]; ok {
		if hi, err = nonNegInt(v, "maxLength", path); err != nil {
			return "", err
		}
	}
	lim := DefaultLimits().MaxRepetition
	if lo > lim || hi > lim {
		return "", fmt.Errorf("string length bounds at %s exceed %d: %w", path, lim, ErrTooLarge)
	}
	if hi >= 0 && hi < lo {
		return "", &UnsupportedError{Keyword: "maxLength", Path: path, Detail: "maxLength below minLength admits no string"}
	}
	if lo == 0 && hi < 0 {
		return "string", nil
	}
	rep := fmt.Sprintf("{%d,%d}", lo, hi)
	if hi < 0 {
		rep = fmt.Sprintf("{%d,}", lo)
	}
	return c.addRule("string-"+strconv.Itoa(lo), `"\"" char`+rep+` "\"" ws`), nil
}

func (c *conv) obj(m map[string]any, path string, depth int) (string, error) {
	props := map[string]any{}
	if v, ok := m["properties"]; ok {
		pm, ok := v.(map[string]any)
		if !ok {
			return "", fmt.Errorf("%w: properties at %s is not an object", ErrInvalidSchema, path)
		}
		props = pm
	}
	if len(props) > MaxProperties {
		return "", fmt.Errorf("object at %s has %d properties, more than %d: %w", path, len(props), MaxProperties, ErrTooLarge)
	}
	if ap, ok := m["additionalProperties"]; ok {
		switch t := ap.(type) {
		case bool:
		case map[string]any:
			if len(t) > 0 {
				return "", &UnsupportedError{Keyword: "additionalProperties", Path: path, Detail: "only true, false or {} are accepted (the output never contains additional properties)"}
			}
		default:
			return "", fmt.Errorf("%w: additionalProperties at %s", ErrInvalidSchema, path)
		}
	}
	required := map[string]bool{}
	var reqOrder []string
	if v, ok := m["required"]; ok {
		list, ok := v.([]any)
		if !ok {
			return "", fmt.Errorf("%w: required at %s is not an array", ErrInvalidSchema, path)
		}
		for _, x := range list {
			s, ok := x.(string)
			if !ok {
				return "", fmt.Errorf("%w: required at %s lists a non-string", ErrInvalidSchema, path)
			}
			if _, ok := props[s]; !ok {
				return "", &UnsupportedError{Keyword: "required", Path: path, Detail: fmt.Sprintf("required property %q has no schema in properties", s)}
			}
			if !required[s] {
				required[s] = true
				reqOrder = append(reqOrder, s)
			}
		}
	}
	// Schema order: the decoder lost it, so recover it from the raw text is
	// not possible here; use required order then sorted optional names,
	// which is deterministic.
	var optional []string
	for k := range props {
		if !required[k] {
			optional = append(optional, k)
		}
	}
	sort.Strings(optional)
	kv := func(name string) (string, error) {
		v, err := c.schema(props[name], ptr(path, "properties", name), depth+1)
		if err != nil {
			return "", err
		}
		key, _ := json.Marshal(name)
		return c.addRule("kv", literal(string(key))+` ws ":" ws `+v), nil
	}
	var seq []string
	for i, name := range reqOrder {
		r, err := kv(name)
		if err != nil {
			return "", err
		}
		if i > 0 {
			seq = append(seq, `"," ws`)
		}
		seq = append(seq, r)
	}
	var optRules []string
	for _, name := range optional {
		r, err := kv(name)
		if err != nil {
			return "", err
		}
		optRules = append(optRules, r)
	}
	if len(optRules) > 0 {
		if len(reqOrder) > 0 {
			for _, r := range optRules {
				seq = append(seq, `("," ws `+r+`)?`)
			}
		} else {
			// tail[i] ::= ("," ws kv_i)? tail[i+1]; first ::= kv_i tail[i+1] | ... | (empty)
			tails := make([]string, len(optRules)+1)
			tails[len(optRules)] = ""
			for i := len(optRules) - 1; i >= 0; i-- {
				body := `("," ws ` + optRules[i] + `)?`
				if tails[i+1] != "" {
					body += " " + tails[i+1]
				}
				tails[i] = c.addRule("tail", body)
			}
			var alts []string
			for i, r := range optRules {
				a := r
				if tails[i+1] != "" {
					a += " " + tails[i+1]
				}
				alts = append(alts, a)
			}
			seq = append(seq, "("+strings.Join(alts, " | ")+")?")
		}
	}
	body := `"{" ws`
	if len(seq) > 0 {
		body += " " + strings.Join(seq, " ")
	}
	body += ` "}" ws`
	return c.addRule("object", body), nil
}

func (c *conv) arr(m map[string]any, path string, depth int) (string, error) {
	item := "any-value"
	if v, ok := m["items"]; ok {
		if _, tuple := v.([]any); tuple {
			return "", &UnsupportedError{Keyword: "items", Path: path, Detail: "the array (tuple) form of items is not supported"}
		}
		var err error
		if item, err = c.schema(v, ptr(path, "items"), depth+1); err != nil {
			return "", err
		}
	} else {
		c.anyUsed = true
	}
	lo, hi := 0, -1
	var err error
	if v, ok := m["minItems"]; ok {
		if lo, err = nonNegInt(v, "minItems", path); err != nil {
			return "", err
		}
	}
	if v, ok := m["maxItems"]; ok {
		if hi, err = nonNegInt(v, "maxItems", path); err != nil {
			return "", err
		}
	}
	lim := DefaultLimits().MaxRepetition
	if lo > lim || hi > lim {
		return "", fmt.Errorf("array length bounds at %s exceed %d: %w", path, lim, ErrTooLarge)
	}
	if hi >= 0 && hi < lo {
		return "", &UnsupportedError{Keyword: "maxItems", Path: path, Detail: "maxItems below minItems admits no array"}
	}
	var inner string
	switch {
	case hi == 0:
		inner = ""
	default:
		restLo := max(lo-1, 0)
		rep := fmt.Sprintf("{%d,%d}", restLo, hi-1)
		if hi < 0 {
			rep = fmt.Sprintf("{%d,}", restLo)
		}
		inner = item + ` ("," ws ` + item + `)` + rep
		if lo == 0 {
			inner = "(" + inner + ")?"
		}
	}
	body := `"[" ws `
	if inner != "" {
		body += inner + " "
	}
	body += `"]" ws`
	return c.addRule("array", body), nil
}

func (c *conv) enum(kw string, m map[string]any, path string) (string, error) {
	var vals []any
	if kw == "const" {
		vals = []any{m["const"]}
	} else {
		list, ok := m["enum"].([]any)
		if !ok {
			return "", fmt.Errorf("%w: enum at %s is not an array", ErrInvalidSchema, path)
		}
		vals = list
	}
	if len(vals) > MaxEnum {
		return "", fmt.Errorf("enum at %s has %d values, more than %d: %w", path, len(vals), MaxEnum, ErrTooLarge)
	}
	types, err := schemaTypes(m, path)
	if err != nil {
		return "", err
	}
	var alts []string
	for _, v := range vals {
		if types != nil {
			t := typeOf(v)
			if !contains(types, t) && !(t == "integer" && contains(types, "number")) {
				continue
			}
		}
		lit, err := jsonLiteral(v)
		if err != nil {
			return "", err
		}
		if !contains(alts, lit) {
			alts = append(alts, lit)
		}
	}
	if len(alts) == 0 {
		return "", &UnsupportedError{Keyword: kw, Path: path, Detail: "no value is admitted by the schema's type"}
	}
	return c.addRule("enum", "("+strings.Join(alts, " | ")+") ws"), nil
}

func (c *conv) union(kw string, v any, path string, depth int) (string, error) {
	list, ok := v.([]any)
	if !ok || len(list) == 0 {
		return "", fmt.Errorf("%w: %s at %s is not a non-empty array", ErrInvalidSchema, kw, path)
	}
	if len(list) > MaxEnum {
		return "", fmt.Errorf("%s at %s has %d branches: %w", kw, path, len(list), ErrTooLarge)
	}
	if kw == "oneOf" {
		if err := c.disjoint(list, path); err != nil {
			return "", err
		}
	}
	var alts []string
	for i, s := range list {
		a, err := c.schema(s, ptr(path, kw, strconv.Itoa(i)), depth+1)
		if err != nil {
			return "", err
		}
		alts = append(alts, a)
	}
	return c.addRule("union", strings.Join(alts, " | ")), nil
}

// disjoint refuses a oneOf whose branches might both match one value: the
// grammar admits the union of the branches, so exclusivity holds only when
// no value can match two. Branches are compared by the set of JSON types
// they admit (integer counting as number), and const/enum branches by
// their values.
func (c *conv) disjoint(list []any, path string) error {
	type sig struct {
		types map[string]bool
		vals  map[string]bool // nil: any value of the types
	}
	var sigs []sig
	for i, s := range list {
		p := ptr(path, "oneOf", strconv.Itoa(i))
		sg, err := c.signature(s, p, 0)
		if err != nil {
			return err
		}
		sigs = append(sigs, sig{sg.types, sg.vals})
	}
	for i := range sigs {
		for j := i + 1; j < len(sigs); j++ {
			a, b := sigs[i], sigs[j]
			for t := range a.types {
				if !b.types[t] {
					continue
				}
				if a.vals != nil && b.vals != nil {
					overlap := false
					for v := range a.vals {
						if b.vals[v] {
							overlap = true
						}
					}
					if !overlap {
						continue
					}
				}
				return &UnsupportedError{Keyword: "oneOf", Path: path, Detail: fmt.Sprintf("branches %d and %d may both match a value of type %s; exclusivity cannot be enforced by a grammar, use anyOf", i, j, t)}
			}
		}
	}
	return nil
}

type signature struct {
	types map[string]bool
	vals  map[string]bool
}

func (c *conv) signature(s any, path string, depth int) (signature, error) {
	all := signature{types: map[string]bool{"string": true, "number": true, "boolean": true, "null": true, "object": true, "array": true}}
	if depth > MaxSchemaDepth {
		return all, nil
	}
	m, ok := s.(map[string]any)
	if !ok {
		return all, nil
	}
	if r, ok := m["$ref"].(string); ok {
		if target, _, err := c.resolve(r, path); err == nil {
			return c.signature(target, path, depth+1)
		}
		return all, nil
	}
	for _, kw := range []string{"anyOf", "oneOf"} {
		if list, ok := m[kw].([]any); ok {
			out := signature{types: map[string]bool{}, vals: map[string]bool{}}
			for _, b := range list {
				sg, _ := c.signature(b, path, depth+1)
				for t := range sg.types {
					out.types[t] = true
				}
				if sg.vals == nil {
					out.vals = nil
				} else if out.vals != nil {
					for v := range sg.vals {
						out.vals[v] = true
					}
				}
			}
			return out, nil
		}
	}
	var vals []any
	if v, ok := m["const"]; ok {
		vals = []any{v}
	} else if v, ok := m["enum"].([]any); ok {
		vals = v
	}
	if vals != nil {
		out := signature{types: map[string]bool{}, vals: map[string]bool{}}
		for _, v := range vals {
			t := typeOf(v)
			if t == "integer" {
				t = "number"
			}
			out.types[t] = true
			raw, _ := json.Marshal(v)
			out.vals[string(raw)] = true
		}
		return out, nil
	}
	types, err := schemaTypes(m, path)
	if err != nil || types == nil {
		return all, nil
	}
	out := signature{types: map[string]bool{}}
	for _, t := range types {
		if t == "integer" {
			t = "number"
		}
		out.types[t] = true
	}
	return out, nil
}

func (c *conv) resolve(ref, path string) (any, string, error) {
	var section string
	switch {
	case strings.HasPrefix(ref, "#/$defs/"):
		section = "$defs"
	case strings.HasPrefix(ref, "#/definitions/"):
		section = "definitions"
	default:
		return nil, "", &UnsupportedError{Keyword: "$ref", Path: path, Detail: fmt.Sprintf("only local references to #/$defs/... or #/definitions/... are supported, not %q", ref)}
	}
	name := strings.TrimPrefix(ref, "#/"+section+"/")
	if strings.ContainsAny(name, "/%") {
		return nil, "", &UnsupportedError{Keyword: "$ref", Path: path, Detail: fmt.Sprintf("reference %q is not a plain definition name", ref)}
	}
	name = strings.ReplaceAll(strings.ReplaceAll(name, "~1", "/"), "~0", "~")
	defs, _ := c.root[section].(map[string]any)
	target, ok := defs[name]
	if !ok {
		return nil, "", fmt.Errorf("%w: $ref %q at %s does not resolve", ErrInvalidSchema, ref, path)
	}
	return target, ptr("", section, name), nil
}

func (c *conv) ref(v any, path string, depth int) (string, error) {
	r, ok := v.(string)
	if !ok {
		return "", fmt.Errorf("%w: $ref at %s is not a string", ErrInvalidSchema, path)
	}
	target, tpath, err := c.resolve(r, path)
	if err != nil {
		return "", err
	}
	if name, ok := c.defined[tpath]; ok {
		return name, nil
	}
	// Reserve the rule name before converting, so recursive references
	// terminate; the rule body is appended once known.
	name := "def"
	for i := len(c.defined); ; i++ {
		cand := fmt.Sprintf("def-%d", i)
		if !c.names[cand] {
			name = cand
			break
		}
	}
	c.names[name] = true
	c.defined[tpath] = name
	body, err := c.schema(target, tpath, depth+1)
	if err != nil {
		return "", err
	}
	c.rules = append(c.rules, name+" ::= "+body)
	return name, nil
}

// anyRules returns rules any-value (nesting up to MaxAnyDepth levels) and
// any-object, with the shared primitive rules expected alongside.
func anyRules() string {
	var b strings.Builder
	for d := MaxAnyDepth; d >= 1; d-- {
		suffix := strconv.Itoa(d)
		if d == MaxAnyDepth {
			suffix = ""
		}
		next := "any-value-" + strconv.Itoa(d-1)
		nextObj := "any-object-" + strconv.Itoa(d-1)
		nextArr := "any-array-" + strconv.Itoa(d-1)
		if d == 1 {
			fmt.Fprintf(&b, "any-value%s ::= string | number | boolean | null\n", dash(suffix))
			continue
		}
		fmt.Fprintf(&b, "any-value%s ::= string | number | boolean | null | %s | %s\n", dash(suffix), nextObj, nextArr)
		fmt.Fprintf(&b, "any-object-%d ::= \"{\" ws (string \":\" ws %s (\",\" ws string \":\" ws %s)*)? \"}\" ws\n", d-1, next, next)
		fmt.Fprintf(&b, "any-array-%d ::= \"[\" ws (%s (\",\" ws %s)*)? \"]\" ws\n", d-1, next, next)
	}
	return b.String()
}

func dash(s string) string {
	if s == "" {
		return ""
	}
	return "-" + s
}

// AnyJSON returns a GBNF grammar admitting any JSON value (or, with
// objectOnly, any JSON object) with at most one whitespace character
// between tokens and values nested at most MaxAnyDepth deep.
func AnyJSON(objectOnly bool) string {
	root := "root ::= ws any-value\n"
	if objectOnly {
		root = fmt.Sprintf("root ::= ws any-object-%d\n", MaxAnyDepth-1)
	}
	return root + anyRules() + primitives
}
