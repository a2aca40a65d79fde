package obs

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc/metadata"
)

// TestTokenFile checks the token file format: the old one-token-per-line
// files still load, tokens name tenants and their limits, and mistakes are
// refused with the line they are on.
func TestTokenFile(t *testing.T) {
	p := func(v int32) *int32 { return &v }
	for _, tc := range []struct {
		name    string
		file    string
		wantErr string            // substring of the error; "" for success
		owners  map[string]string // token -> tenant
		tenants map[string]Tenant
	}{
		{
			name:    "old format",
			file:    "# operators\n  tok-1  \n\ntok-2\n",
			owners:  map[string]string{"tok-1": DefaultTenant, "tok-2": DefaultTenant},
			tenants: map[string]Tenant{DefaultTenant: {Name: DefaultTenant}},
		},
		{
			name: "tenants and limits",
			file: "a1 team-a weight=2 max-share=0.5\na2 team-a max-queued=64 weight=2\nb1 team-b max-priority=-3\nc1 max-priority=7\n",
			owners: map[string]string{
				"a1": "team-a", "a2": "team-a", "b1": "team-b", "c1": DefaultTenant,
			},
			tenants: map[string]Tenant{
				"team-a":      {Name: "team-a", Weight: 2, MaxShare: 0.5, MaxQueued: 64},
				"team-b":      {Name: "team-b", MaxPriority: p(-3)},
				DefaultTenant: {Name: DefaultTenant, MaxPriority: p(7)},
			},
		},
		{name: "contradiction", file: "a1 t weight=2\na2 t weight=3\n", wantErr: ":2: weight=3 contradicts weight=2"},
		{name: "duplicate token", file: "a1 t\na1 u\n", wantErr: ":2: the token appears twice"},
		{name: "bad name", file: "a1 t/x\n", wantErr: `tenant name "t/x"`},
		{name: "unknown key", file: "a1 t colour=red\n", wantErr: `unknown key "colour"`},
		{name: "bare word after tenant", file: "a1 t extra\n", wantErr: `"extra": want key=value`},
		{name: "bad weight", file: "a1 t weight=0\n", wantErr: "weight=0"},
		{name: "NaN weight", file: "a1 t weight=NaN\n", wantErr: "weight=NaN"},
		{name: "bad share", file: "a1 t max-share=1.5\n", wantErr: "max-share=1.5"},
		{name: "bad queued", file: "a1 t max-queued=0\n", wantErr: "max-queued=0"},
		{name: "bad priority", file: "a1 t max-priority=99999999999\n", wantErr: "max-priority=99999999999"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "tokens")
			if err := os.WriteFile(path, []byte(tc.file), 0o600); err != nil {
				t.Fatal(err)
			}
			toks, err := LoadTokens(path)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %v, want an error containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			for tok, want := range tc.owners {
				ctx, err := toks.Authenticate(bearerContext(tok))
				if err != nil {
					t.Fatalf("token %s: %v", tok, err)
				}
				if got := TenantFromContext(ctx); got != want {
					t.Errorf("token %s: tenant %q, want %q", tok, got, want)
				}
			}
			if _, err := toks.Authenticate(bearerContext("nope")); err == nil {
				t.Error("an unknown token was accepted")
			}
			if got := len(toks.TenantNames()); got != len(tc.tenants) {
				t.Errorf("%d tenants %v, want %d", got, toks.TenantNames(), len(tc.tenants))
			}
			for name, want := range tc.tenants {
				got, ok := toks.Tenant(name)
				if !ok {
					t.Fatalf("tenant %s missing", name)
				}
				if got.Name != want.Name || got.Weight != want.Weight || got.MaxShare != want.MaxShare ||
					got.MaxQueued != want.MaxQueued || (got.MaxPriority == nil) != (want.MaxPriority == nil) ||
					(got.MaxPriority != nil && *got.MaxPriority != *want.MaxPriority) {
					t.Errorf("tenant %s = %+v, want %+v", name, got, want)
				}
			}
		})
	}
	if got := TenantFromContext(context.Background()); got != DefaultTenant {
		t.Errorf("no tenant in context: %q, want %q", got, DefaultTenant)
	}
}

// bearerContext returns an incoming call's context carrying tok as its
// bearer token.
func bearerContext(tok string) context.Context {
	return metadata.NewIncomingContext(context.Background(), metadata.Pairs("authorization", "Bearer "+tok))
}
