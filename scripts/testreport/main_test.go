package main

import (
	"regexp"
	"strings"
	"testing"
)

// TestReport feeds recorded go test -json streams to the report and checks
// what it prints and how many skips -fail-skips catches.
func TestReport(t *testing.T) {
	const stream = `{"Action":"start","Package":"p/a"}
{"Action":"run","Package":"p/a","Test":"TestOK"}
{"Action":"output","Package":"p/a","Test":"TestOK","Output":"=== RUN   TestOK\n"}
{"Action":"pass","Package":"p/a","Test":"TestOK","Elapsed":0}
{"Action":"run","Package":"p/a","Test":"TestModel"}
{"Action":"output","Package":"p/a","Test":"TestModel","Output":"=== RUN   TestModel\n"}
{"Action":"output","Package":"p/a","Test":"TestModel","Output":"    a_test.go:9: test model x.gguf not found\n"}
{"Action":"output","Package":"p/a","Test":"TestModel","Output":"--- SKIP: TestModel (0.00s)\n"}
{"Action":"skip","Package":"p/a","Test":"TestModel","Elapsed":0}
{"Action":"run","Package":"p/a","Test":"TestShort"}
{"Action":"output","Package":"p/a","Test":"TestShort","Output":"    a_test.go:20: skipped under -short\n"}
{"Action":"skip","Package":"p/a","Test":"TestShort","Elapsed":0}
{"Action":"run","Package":"p/a","Test":"TestBad"}
{"Action":"output","Package":"p/a","Test":"TestBad","Output":"    a_test.go:30: got 1, want 2\n"}
{"Action":"output","Package":"p/a","Test":"TestBad","Output":"--- FAIL: TestBad (0.00s)\n"}
{"Action":"fail","Package":"p/a","Test":"TestBad","Elapsed":0}
{"Action":"output","Package":"p/a","Output":"FAIL\n"}
{"Action":"output","Package":"p/a","Output":"FAIL\tp/a\t0.01s\n"}
{"Action":"fail","Package":"p/a","Elapsed":0.01}
{"Action":"output","Package":"p/b","Output":"ok  \tp/b\t0.02s\n"}
{"Action":"pass","Package":"p/b","Elapsed":0.02}
{"Action":"output","Package":"p/c","Output":"?   \tp/c\t[no test files]\n"}
{"Action":"skip","Package":"p/c","Elapsed":0}
not json: a build error line
`
	tests := []struct {
		name      string
		failSkips string
		matched   int
		want      []string
		wantNot   []string
	}{
		{
			name: "no filter",
			want: []string{
				"got 1, want 2", "--- FAIL: TestBad", "FAIL\tp/a", "ok  \tp/b", "[no test files]", "not json: a build error line",
				"skipped tests: 2", "SKIP p/a TestModel: a_test.go:9: test model x.gguf not found", "SKIP p/a TestShort: a_test.go:20: skipped under -short",
			},
			wantNot: []string{"=== RUN", "not allowed"},
		},
		{name: "missing files fail", failSkips: "not found", matched: 1, want: []string{"x.gguf not found  <- not allowed"}},
		{name: "nothing matches", failSkips: "network", matched: 0, wantNot: []string{"not allowed"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var b strings.Builder
			r := newReport(&b)
			if err := r.read(strings.NewReader(stream)); err != nil {
				t.Fatal(err)
			}
			var re *regexp.Regexp
			if tt.failSkips != "" {
				re = regexp.MustCompile(tt.failSkips)
			}
			if n := r.summary(re); n != tt.matched {
				t.Errorf("summary matched %d skips, want %d", n, tt.matched)
			}
			out := b.String()
			for _, w := range tt.want {
				if !strings.Contains(out, w) {
					t.Errorf("output lacks %q:\n%s", w, out)
				}
			}
			for _, w := range tt.wantNot {
				if strings.Contains(out, w) {
					t.Errorf("output has %q:\n%s", w, out)
				}
			}
			if r.failed != 1 {
				t.Errorf("failed = %d, want 1", r.failed)
			}
		})
	}
}
