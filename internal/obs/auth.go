package obs

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/auth"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
)

// DefaultTenant is the tenant of every call on a server without
// --auth-tokens, and of every token whose line names no tenant.
const DefaultTenant = "default"

// Tenant is a named client of the server: every bearer token belongs to one.
// Its zero-valued limits mean "the server-wide default".
type Tenant struct {
	// Name identifies the tenant in logs, metrics and the allocator.
	Name string
	// Weight is the tenant's weight in the fair admission queue; 0 means
	// the default (1).
	Weight float64
	// MaxShare caps the fraction of the KV cells its running requests may
	// hold; 0 means the default.
	MaxShare float64
	// MaxQueued bounds the tenant's requests waiting for admission; 0
	// means the default.
	MaxQueued int
	// MaxPriority is the highest request priority the tenant may use; nil
	// means the default.
	MaxPriority *int32
}

// Tokens is a set of bearer tokens read from a file, each belonging to a
// tenant. Each line holds one token, optionally followed by the name of
// its tenant and by the tenant's limits as key=value pairs:
//
//	# token            tenant   limits (all optional)
//	s3cret-of-team-a   team-a   weight=2 max-share=0.5 max-queued=64 max-priority=10
//	s3cret-of-team-b   team-b
//	an-old-style-token
//
// A line with a token alone, the format of earlier versions, puts the
// token in the tenant DefaultTenant. Several tokens may name one tenant;
// a limit given on more than one of its lines must have the same value on
// each. The keys are weight (> 0), max-share (in (0, 1]), max-queued
// (>= 1) and max-priority (an int32). Blank lines and lines starting with
// # are ignored, as is space around the fields. Reload rereads the file;
// calls in flight keep the set they were checked against. A Tokens is
// safe for concurrent use.
type Tokens struct {
	path string
	set  atomic.Pointer[tokenSet]
}

// tokenSet is one reading of the token file.
type tokenSet struct {
	digests [][sha256.Size]byte
	owners  []string // tenant of each digest
	tenants map[string]Tenant
}

// LoadTokens reads the token file at path.
func LoadTokens(path string) (*Tokens, error) {
	t := &Tokens{path: path}
	if _, err := t.Reload(); err != nil {
		return nil, err
	}
	return t, nil
}

// Reload rereads the token file and returns how many tokens it holds. On
// error the previous set stays in force.
func (t *Tokens) Reload() (int, error) {
	b, err := os.ReadFile(t.path)
	if err != nil {
		return 0, fmt.Errorf("read auth tokens: %w", err)
	}
	set, err := parseTokens(t.path, b)
	if err != nil {
		return 0, err
	}
	t.set.Store(set)
	return len(set.digests), nil
}

// validTenantName reports whether s may name a tenant: 1 to 64 letters,
// digits, '.', '_' or '-'.
func validTenantName(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-') {
			return false
		}
	}
	return true
}

func parseTokens(path string, b []byte) (*tokenSet, error) {
	set := &tokenSet{tenants: map[string]Tenant{}}
	seen := map[[sha256.Size]byte]bool{}
	// given records, per tenant, the limits already set and on which line.
	given := map[string]map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for line := 1; sc.Scan(); line++ {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 || strings.HasPrefix(fields[0], "#") {
			continue
		}
		where := fmt.Sprintf("auth tokens %s:%d", path, line)
		tok, rest := fields[0], fields[1:]
		name := DefaultTenant
		if len(rest) > 0 && !strings.Contains(rest[0], "=") {
			name, rest = rest[0], rest[1:]
			if !validTenantName(name) {
				return nil, fmt.Errorf("%s: tenant name %q: want 1 to 64 letters, digits, '.', '_' or '-'", where, name)
			}
		}
		d := sha256.Sum256([]byte(tok))
		if seen[d] {
			return nil, fmt.Errorf("%s: the token appears twice", where)
		}
		seen[d] = true
		ten, ok := set.tenants[name]
		if !ok {
			ten = Tenant{Name: name}
			given[name] = map[string]string{}
		}
		for _, kv := range rest {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				return nil, fmt.Errorf("%s: %q: want key=value after the tenant name", where, kv)
			}
			if prev, dup := given[name][k]; dup && prev != v {
				return nil, fmt.Errorf("%s: %s=%s contradicts %s=%s given earlier for tenant %s", where, k, v, k, prev, name)
			}
			if err := setLimit(&ten, k, v); err != nil {
				return nil, fmt.Errorf("%s: %w", where, err)
			}
			given[name][k] = v
		}
		set.tenants[name] = ten
		set.digests = append(set.digests, d)
		set.owners = append(set.owners, name)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read auth tokens %s: %w", path, err)
	}
	return set, nil
}

// setLimit sets one key=value limit of a tenant.
func setLimit(t *Tenant, k, v string) error {
	switch k {
	case "weight":
		f, err := strconv.ParseFloat(v, 64)
		if err != nil || !(f > 0) || math.IsInf(f, 0) {
			return fmt.Errorf("weight=%s: want a finite number > 0", v)
		}
		t.Weight = f
	case "max-share":
		f, err := strconv.ParseFloat(v, 64)
		if err != nil || !(f > 0 && f <= 1) {
			return fmt.Errorf("max-share=%s: want a number in (0, 1]", v)
		}
		t.MaxShare = f
	case "max-queued":
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return fmt.Errorf("max-queued=%s: want an integer >= 1", v)
		}
		t.MaxQueued = n
	case "max-priority":
		n, err := strconv.ParseInt(v, 10, 32)
		if err != nil {
			return fmt.Errorf("max-priority=%s: want a 32-bit integer", v)
		}
		p := int32(n)
		t.MaxPriority = &p
	default:
		return fmt.Errorf("unknown key %q: want weight, max-share, max-queued or max-priority", k)
	}
	return nil
}

// lookup returns the tenant tok belongs to. It compares digests in
// constant time and looks at every token, so its timing says nothing about
// which token, or which prefix, matched.
func (t *Tokens) lookup(tok string) (string, bool) {
	set := t.set.Load()
	d := sha256.Sum256([]byte(tok))
	found := -1
	for i, s := range set.digests {
		eq := subtle.ConstantTimeCompare(d[:], s[:])
		found = subtle.ConstantTimeSelect(eq, i, found)
	}
	if found < 0 {
		return "", false
	}
	return set.owners[found], true
}

// Valid reports whether tok is one of the tokens.
func (t *Tokens) Valid(tok string) bool {
	_, ok := t.lookup(tok)
	return ok
}

// Tenant returns the named tenant as the token file last read defines it;
// ok is false for a tenant no token belongs to.
func (t *Tokens) Tenant(name string) (Tenant, bool) {
	ten, ok := t.set.Load().tenants[name]
	return ten, ok
}

// TenantNames returns the names of the tenants, sorted.
func (t *Tokens) TenantNames() []string {
	set := t.set.Load()
	names := make([]string, 0, len(set.tenants))
	for n := range set.tenants {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

type tenantKey struct{}

// WithTenant returns ctx carrying the name of the caller's tenant.
func WithTenant(ctx context.Context, name string) context.Context {
	return context.WithValue(ctx, tenantKey{}, name)
}

// TenantFromContext returns the caller's tenant name that Authenticate
// put in ctx, or DefaultTenant.
func TenantFromContext(ctx context.Context) string {
	if n, ok := ctx.Value(tenantKey{}).(string); ok {
		return n
	}
	return DefaultTenant
}

// errBadToken is the status of a call whose bearer token is not in the set.
var errBadToken = status.Error(codes.Unauthenticated, "invalid bearer token")

// Authenticate is a go-grpc-middleware auth.AuthFunc: it accepts a call
// whose "authorization" metadata is "Bearer TOKEN" with a valid TOKEN,
// putting the token's tenant in the call's context (TenantFromContext),
// and refuses any other with UNAUTHENTICATED.
func (t *Tokens) Authenticate(ctx context.Context) (context.Context, error) {
	tok, err := auth.AuthFromMD(ctx, "bearer")
	if err != nil {
		return nil, err
	}
	name, ok := t.lookup(tok)
	if !ok {
		return nil, errBadToken
	}
	return WithTenant(ctx, name), nil
}

// BearerToken returns per-RPC credentials that send token as
// "authorization: Bearer TOKEN". With requireTLS, gRPC refuses to send it
// over a connection without transport security.
func BearerToken(token string, requireTLS bool) (credentials.PerRPCCredentials, error) {
	if token == "" || strings.ContainsAny(token, " \t\r\n") {
		return nil, errors.New("a bearer token must be non-empty and contain no spaces")
	}
	return bearer{token: token, requireTLS: requireTLS}, nil
}

type bearer struct {
	token      string
	requireTLS bool
}

// GetRequestMetadata returns the authorization header.
func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.token}, nil
}

// RequireTransportSecurity reports whether the token may only travel over
// a secure transport.
func (b bearer) RequireTransportSecurity() bool { return b.requireTLS }
