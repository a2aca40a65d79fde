package obs

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync/atomic"

	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/auth"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
)

// Tokens is a set of bearer tokens read from a file, one per line. Blank
// lines and lines starting with # are ignored, as is space around a token.
// Reload rereads the file; calls in flight keep the set they were checked
// against. A Tokens is safe for concurrent use.
type Tokens struct {
	path string
	set  atomic.Pointer[[][sha256.Size]byte]
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
	var set [][sha256.Size]byte
	sc := bufio.NewScanner(bytes.NewReader(b))
	for line := 1; sc.Scan(); line++ {
		tok := strings.TrimSpace(sc.Text())
		if tok == "" || strings.HasPrefix(tok, "#") {
			continue
		}
		if strings.ContainsAny(tok, " \t") {
			return 0, fmt.Errorf("auth tokens %s:%d: a token must not contain spaces", t.path, line)
		}
		set = append(set, sha256.Sum256([]byte(tok)))
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("read auth tokens %s: %w", t.path, err)
	}
	t.set.Store(&set)
	return len(set), nil
}

// Valid reports whether tok is one of the tokens. It compares digests in
// constant time and looks at every token, so its timing says nothing about
// which prefix matched.
func (t *Tokens) Valid(tok string) bool {
	d := sha256.Sum256([]byte(tok))
	ok := 0
	for _, s := range *t.set.Load() {
		ok |= subtle.ConstantTimeCompare(d[:], s[:])
	}
	return ok == 1
}

// errBadToken is the status of a call whose bearer token is not in the set.
var errBadToken = status.Error(codes.Unauthenticated, "invalid bearer token")

// Authenticate is a go-grpc-middleware auth.AuthFunc: it accepts a call
// whose "authorization" metadata is "Bearer TOKEN" with a valid TOKEN, and
// refuses any other with UNAUTHENTICATED.
func (t *Tokens) Authenticate(ctx context.Context) (context.Context, error) {
	tok, err := auth.AuthFromMD(ctx, "bearer")
	if err != nil {
		return nil, err
	}
	if !t.Valid(tok) {
		return nil, errBadToken
	}
	return ctx, nil
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
