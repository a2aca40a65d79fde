package main

import (
	"strings"
	"testing"
)

// TestServeCheck covers the flag combinations serve refuses before it loads
// a model.
func TestServeCheck(t *testing.T) {
	tests := []struct {
		args []string
		want string // part of the error; empty: accepted
	}{
		{nil, ""},
		{[]string{"--deterministic", "--prefix-cache=false"}, ""},
		{[]string{"--deterministic"}, "--deterministic needs --prefix-cache=false"},
		{[]string{"--deterministic", "--prefix-cache=false", "--max-seqs", "254"}, "two sequence ids for itself"},
		{[]string{"--deterministic", "--prefix-cache=false", "--max-seqs", "253"}, ""},
		{[]string{"--pprof"}, "--pprof needs --metrics-listen"},
		{[]string{"--ctx", "0"}, "--ctx 0"},
	}
	for _, tc := range tests {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			var c serveConfig
			if err := serveFlags(&c).Parse(tc.args); err != nil {
				t.Fatal(err)
			}
			err := c.check()
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("check: %v, want accepted", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Errorf("check: %v, want an error containing %q", err, tc.want)
			}
		})
	}
}
