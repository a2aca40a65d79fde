package grammar

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/santhosh-tekuri/jsonschema/v6"
)

func compileSchema(t *testing.T, raw []byte) *jsonschema.Schema {
	t.Helper()
	doc, err := jsonschema.UnmarshalJSON(strings.NewReader(string(raw)))
	if err != nil {
		t.Fatal(err)
	}
	c := jsonschema.NewCompiler()
	if err := c.AddResource(resourceURL, doc); err != nil {
		t.Fatal(err)
	}
	sch, err := c.Compile(resourceURL)
	if err != nil {
		t.Fatal(err)
	}
	return sch
}

// sampleInvalid generates n strings from gbnf (seeds 1..n) and returns the
// first that is not JSON, not an object when objectOnly, or not valid
// against sch (nil: JSON validity only), with the reason.
func sampleInvalid(gbnf string, sch *jsonschema.Schema, n int, objectOnly bool) (string, error) {
	g, err := Parse(gbnf, DefaultLimits())
	if err != nil {
		return "", err
	}
	for seed := int64(1); seed <= int64(n); seed++ {
		out := newSampler(g, seed).Generate()
		if !json.Valid([]byte(out)) {
			return out, errors.New("not JSON")
		}
		if objectOnly && !strings.HasPrefix(strings.TrimSpace(out), "{") {
			return out, errors.New("not an object")
		}
		if sch == nil {
			continue
		}
		inst, err := jsonschema.UnmarshalJSON(strings.NewReader(out))
		if err != nil {
			return out, err
		}
		if err := sch.Validate(inst); err != nil {
			return out, err
		}
	}
	return "", nil
}

func checkSamples(t *testing.T, gbnf string, sch *jsonschema.Schema, n int, objectOnly bool) {
	t.Helper()
	if out, err := sampleInvalid(gbnf, sch, n, objectOnly); err != nil {
		t.Fatalf("sample %q: %v\n%s", out, err, gbnf)
	}
}

// TestSamplerDetectsInvalid shows the sampling check can fail: grammars
// that admit wrong outputs are caught.
func TestSamplerDetectsInvalid(t *testing.T) {
	tests := []struct {
		name, gbnf, schema string
	}{
		{"wrong type", `root ::= "1"`, `{"type":"string"}`},
		{"too long", `root ::= "\"" [a-z]{3,6} "\""`, `{"type":"string","maxLength":2}`},
		{"missing required", `root ::= "{}"`, `{"type":"object","properties":{"a":{}},"required":["a"]}`},
		{"not JSON", `root ::= "{" | "[]"`, `{}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := sampleInvalid(tt.gbnf, compileSchema(t, []byte(tt.schema)), 50, false); err == nil {
				t.Fatal("no invalid sample found")
			}
		})
	}
}

func TestSchemasSampleValid(t *testing.T) {
	files, err := filepath.Glob("testdata/schemas/*.json")
	if err != nil || len(files) < 30 {
		t.Fatalf("testdata schemas: %v (%d files)", err, len(files))
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			raw, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			gbnf, err := FromJSONSchema(raw)
			if err != nil {
				t.Fatalf("FromJSONSchema: %v", err)
			}
			if err := Check(gbnf, DefaultLimits()); err != nil {
				t.Fatalf("Check: %v", err)
			}
			checkSamples(t, gbnf, compileSchema(t, raw), 50, false)
		})
	}
}

func TestAnyJSONSamples(t *testing.T) {
	for _, objectOnly := range []bool{false, true} {
		g := AnyJSON(objectOnly)
		if err := Check(g, DefaultLimits()); err != nil {
			t.Fatalf("AnyJSON(%v): %v", objectOnly, err)
		}
		checkSamples(t, g, nil, 50, objectOnly)
	}
}

// TestGeneratedStructure checks structural facts of generated grammars:
// the bounds and literals the schema implies appear in them.
func TestGeneratedStructure(t *testing.T) {
	tests := []struct {
		schema  string
		want    []string // substrings the grammar must contain
		notWant []string
	}{
		{`{"type":"string","maxLength":3}`, []string{`char{0,3}`}, nil},
		{`{"type":"string","minLength":2}`, []string{`char{2,}`}, nil},
		{`{"type":"array","items":{"type":"integer"},"minItems":2,"maxItems":4}`, []string{`{1,3}`}, nil},
		{`{"type":"array","items":{"type":"integer"},"maxItems":0}`, []string{`"[" ws "]"`}, []string{"integer ("}},
		{`{"enum":["a",1,null]}`, []string{`"\"a\""`, `"1"`, `"null"`}, nil},
		{`{"type":"object","properties":{"a":{"type":"null"}},"required":["a"]}`, []string{`"\"a\"" ws ":" ws null`}, []string{`)?`}},
	}
	for _, tt := range tests {
		t.Run(tt.schema, func(t *testing.T) {
			g, err := FromJSONSchema([]byte(tt.schema))
			if err != nil {
				t.Fatal(err)
			}
			for _, w := range tt.want {
				if !strings.Contains(g, w) {
					t.Errorf("grammar lacks %q:\n%s", w, g)
				}
			}
			for _, w := range tt.notWant {
				if strings.Contains(strings.SplitN(g, "ws ::=", 2)[0], w) {
					t.Errorf("grammar has %q:\n%s", w, g)
				}
			}
		})
	}
}

func TestSharedRules(t *testing.T) {
	// 100 properties with the same string schema share one string rule;
	// without sharing they would expand to 100 x 300 rules, over MaxRules.
	var b strings.Builder
	b.WriteString(`{"type":"object","properties":{`)
	for i := 0; i < 100; i++ {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(`"p` + strconv.Itoa(i) + `":{"type":"string","maxLength":300}`)
	}
	b.WriteString(`}}`)
	g, err := FromJSONSchema([]byte(b.String()))
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(g, "char{0,300}"); n != 1 {
		t.Fatalf("%d string rules, want 1", n)
	}
}

func TestUnsupportedKeywords(t *testing.T) {
	tests := []struct {
		schema, keyword, path string
	}{
		{`{"type":"string","pattern":"^a"}`, "pattern", ""},
		{`{"type":"string","format":"date"}`, "format", ""},
		{`{"type":"integer","minimum":1}`, "minimum", ""},
		{`{"type":"integer","maximum":1}`, "maximum", ""},
		{`{"type":"number","multipleOf":2}`, "multipleOf", ""},
		{`{"type":"number","exclusiveMinimum":2}`, "exclusiveMinimum", ""},
		{`{"allOf":[{"type":"string"}]}`, "allOf", ""},
		{`{"not":{"type":"string"}}`, "not", ""},
		{`{"if":{"type":"string"},"then":{"type":"string"}}`, "if", ""},
		{`{"type":"object","patternProperties":{"a":{}}}`, "patternProperties", ""},
		{`{"type":"object","propertyNames":{"maxLength":3}}`, "propertyNames", ""},
		{`{"type":"array","uniqueItems":true}`, "uniqueItems", ""},
		{`{"type":"array","contains":{"type":"integer"}}`, "contains", ""},
		{`{"type":"array","prefixItems":[{"type":"integer"}]}`, "prefixItems", ""},
		{`{"type":"object","dependentRequired":{"a":["b"]}}`, "dependentRequired", ""},
		{`{"type":"object","minProperties":1}`, "minProperties", ""},
		{`{"$ref":"https://example.com/s.json"}`, "$ref", ""},
		{`{"type":"object","properties":{"a":{"$ref":"other.json#/x"}}}`, "$ref", "/properties/a"},
		{`{"type":"object","properties":{"a/b":{"type":"string","pattern":"x"}}}`, "pattern", "/properties/a~1b"},
		{`{"type":"array","items":{"type":"string","format":"email"}}`, "format", "/items"},
		{`{"anyOf":[{"type":"string"},{"type":"integer","minimum":0}]}`, "minimum", "/anyOf/1"},
		{`{"$defs":{"d":{"type":"string","pattern":"x"}},"$ref":"#/$defs/d"}`, "pattern", "/$defs/d"},
		{`{"oneOf":[{"type":"number"},{"type":"integer"}]}`, "oneOf", ""},
		{`{"type":"object","additionalProperties":{"type":"string"}}`, "additionalProperties", ""},
		{`{"type":"object","properties":{},"required":["x"]}`, "required", ""},
		{`{"type":"string","minLength":1,"anyOf":[{"maxLength":3}]}`, "minLength", ""},
		{`{"type":"object","properties":{"a":{"$id":"https://x/y","type":"string"}}}`, "$id", "/properties/a"},
		{`{"type":"string","$anchor":"a"}`, "$anchor", ""},
		{`false`, "false", ""},
		{`{"$schema":"http://json-schema.org/draft-07/schema#","type":"array","items":[{"type":"string"}]}`, "items", ""},
		{`{"type":"string","items":{"type":"string"}}`, "items", ""},
	}
	for _, tt := range tests {
		t.Run(tt.schema, func(t *testing.T) {
			g, err := FromJSONSchema([]byte(tt.schema))
			var ue *UnsupportedError
			if !errors.As(err, &ue) {
				t.Fatalf("FromJSONSchema = %q, %v; want *UnsupportedError", g, err)
			}
			if ue.Keyword != tt.keyword || ue.Path != tt.path {
				t.Fatalf("keyword %q path %q, want %q %q", ue.Keyword, ue.Path, tt.keyword, tt.path)
			}
			if !strings.Contains(err.Error(), `"`+tt.keyword+`"`) {
				t.Fatalf("message %q does not name the keyword", err)
			}
		})
	}
}

func TestInvalidSchemas(t *testing.T) {
	tests := []struct {
		name, schema string
		target       error
	}{
		{"not json", `{"type":`, ErrInvalidSchema},
		{"bad type", `{"type":"text"}`, ErrInvalidSchema},
		{"bad minLength", `{"type":"string","minLength":-1}`, ErrInvalidSchema},
		{"dangling ref", `{"$ref":"#/$defs/none"}`, ErrInvalidSchema},
		{"bad required", `{"type":"object","required":"a"}`, ErrInvalidSchema},
		{"too big", `{"description":"` + strings.Repeat("x", MaxSchemaBytes) + `"}`, ErrTooLarge},
		{"too deep", strings.Repeat(`{"type":"array","items":`, 40) + `{}` + strings.Repeat("}", 40), ErrTooLarge},
		{"long string", `{"type":"string","maxLength":5000}`, ErrTooLarge},
		{"many enum", `{"enum":[` + strings.TrimSuffix(strings.Repeat(`1,`, 300), ",") + `]}`, ErrTooLarge},
		{"left-recursive ref", `{"$defs":{"a":{"$ref":"#/$defs/a"}},"$ref":"#/$defs/a"}`, ErrTooLarge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := FromJSONSchema([]byte(tt.schema))
			if tt.name == "left-recursive ref" {
				var ge *Error
				if !errors.As(err, &ge) || ge.Reason != ReasonLeftRecursion {
					t.Fatalf("err = %v, want a left_recursion *Error", err)
				}
				return
			}
			if !errors.Is(err, tt.target) {
				t.Fatalf("err = %v, want %v", err, tt.target)
			}
		})
	}
}
