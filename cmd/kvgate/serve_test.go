package main

import (
	"strings"
	"testing"
)

// TestServeCheck covers the flag combinations serve refuses before it loads
// a model: the flags parse into a server.Config that Config.Validate
// refuses, with a message naming the flags.
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
		{[]string{"--threads", "-1"}, "--threads -1"},
		{[]string{"--stream-buffer", "65536"}, ""},
		{[]string{"--stream-buffer", "65537"}, "--stream-buffer 65537: must be in [1, 65536]"},
		{[]string{"--stream-buffer", "0"}, "--stream-buffer 0"},
		{[]string{"--max-streams-per-conn", "0"}, "--max-streams-per-conn 0"},
		{[]string{"--max-connections", "0"}, "--max-connections 0"},
		{[]string{"--handshake-timeout", "0s"}, "--handshake-timeout 0s"},
		{[]string{"--max-connection-idle", "-1s"}, "--max-connection-idle -1s"},
		{[]string{"--max-prompt-bytes", "-1"}, "--max-prompt-bytes -1"},
		{[]string{"--default-max-tokens", "-1"}, "--default-max-tokens -1"},
		{[]string{"--max-tokenize-bytes", "0"}, "--max-tokenize-bytes 0"},
		{[]string{"--tokenizer-budget", "1000"}, "must be at least --max-tokenize-bytes"},
		{[]string{"--max-priority", "3000000000"}, "--max-priority 3000000000"},
		{[]string{"--max-priority", "-5"}, ""},
		{[]string{"--tenant-max-share", "0"}, "--tenant-max-share 0"},
		{[]string{"--tenant-max-share", "NaN"}, "--tenant-max-share NaN"},
		{[]string{"--tenant-max-share", "0.25"}, ""},
		{[]string{"--tenant-max-queued", "-1"}, "--tenant-max-queued -1"},
	}
	for _, tc := range tests {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			var o serveOptions
			if err := serveFlags(&o).Parse(tc.args); err != nil {
				t.Fatal(err)
			}
			err := o.Validate()
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("Validate: %v, want accepted", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Errorf("Validate: %v, want an error containing %q", err, tc.want)
			}
		})
	}
}
