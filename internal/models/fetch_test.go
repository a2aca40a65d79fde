package models

import (
	"archive/zip"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// fakeModelContent is the content of the tiny model file the unit tests use
// in place of the real default model.
var fakeModelContent = []byte("GGUF fake model used by kvgate tests\n")

// sha256Hex returns the lowercase hex sha256 digest of b.
func sha256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// fakeSource returns a Source for fakeModelContent in module mod.
func fakeSource(mod string) Source {
	return Source{
		Name:    "tiny.gguf",
		Module:  mod,
		Version: "v1.2.3",
		File:    "testdata/tiny.gguf",
		SHA256:  sha256Hex(fakeModelContent),
	}
}

// moduleZip builds a module zip for src's module and version that holds
// files, keyed by their path inside the module.
func moduleZip(t *testing.T, src Source, files map[string][]byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for name, content := range files {
		w, err := zw.Create(src.Module + "@" + src.Version + "/" + name)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write(content); err != nil {
			t.Fatal(err)
		}
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// fakeProxy is a test module proxy that serves fixed bodies by URL path and
// counts the requests it receives.
type fakeProxy struct {
	*httptest.Server
	requests atomic.Int64
}

// newFakeProxy starts a fakeProxy that answers requests for the paths in
// bodies with those bodies, and every other request with 404. A status other
// than 200 makes it answer every request with that status instead.
func newFakeProxy(t *testing.T, status int, bodies map[string][]byte) *fakeProxy {
	t.Helper()
	p := &fakeProxy{}
	p.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.requests.Add(1)
		if status != http.StatusOK {
			http.Error(w, "proxy failure", status)
			return
		}
		body, ok := bodies[r.URL.Path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Write(body)
	}))
	t.Cleanup(p.Close)
	return p
}

// zipURLPath returns the URL path a proxy serves src's module zip at.
func zipURLPath(t *testing.T, src Source) string {
	t.Helper()
	mod, err := escapeModulePath(src.Module)
	if err != nil {
		t.Fatal(err)
	}
	return "/" + mod + "/@v/" + src.Version + ".zip"
}

// isolate points the Go module cache at an empty directory so that tests
// never read the machine's real module cache.
func isolate(t *testing.T) {
	t.Helper()
	t.Setenv("GOMODCACHE", t.TempDir())
}

// dirNames returns the sorted names of the entries in dir.
func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

// TestEnsureModel covers downloads, cache hits, corrupt caches, proxy
// fallback and the failure modes of Ensure against fake proxies.
func TestEnsureModel(t *testing.T) {
	src := fakeSource("example.com/fake/models")
	goodZip := moduleZip(t, src, map[string][]byte{src.File: fakeModelContent, "go.mod": []byte("module " + src.Module + "\n")})
	badZip := moduleZip(t, src, map[string][]byte{src.File: []byte("tampered content")})
	noEntryZip := moduleZip(t, src, map[string][]byte{"README.md": []byte("no model here")})

	tests := []struct {
		name string
		// cached is written to the cache path before the call unless nil.
		cached []byte
		// served is the module zip the working proxy serves.
		served []byte
		// goproxy builds $GOPROXY from the working and the failing proxy URLs.
		goproxy func(good, failing string) string
		// wantErr is the error the call must match with errors.Is, if any.
		wantErr error
		// wantErrText is text the error message must contain, if any.
		wantErrText string
		// wantGood and wantFailing are the request counts each proxy must see.
		wantGood, wantFailing int64
	}{
		{
			name:     "fresh download",
			served:   goodZip,
			goproxy:  func(good, _ string) string { return good },
			wantGood: 1,
		},
		{
			name:     "cache hit makes no request",
			cached:   fakeModelContent,
			served:   goodZip,
			goproxy:  func(good, _ string) string { return good },
			wantGood: 0,
		},
		{
			name:     "corrupted cache is downloaded again",
			cached:   []byte("corrupt"),
			served:   goodZip,
			goproxy:  func(good, _ string) string { return good },
			wantGood: 1,
		},
		{
			name:        "hash mismatch from the proxy",
			served:      badZip,
			goproxy:     func(good, _ string) string { return good },
			wantErr:     ErrHashMismatch,
			wantErrText: "--model PATH",
			wantGood:    1,
		},
		{
			name:        "hash mismatch from the proxy with a corrupt cache",
			cached:      []byte("corrupt"),
			served:      badZip,
			goproxy:     func(good, _ string) string { return good },
			wantErr:     ErrHashMismatch,
			wantErrText: "--model PATH",
			wantGood:    1,
		},
		{
			name:        "failing first proxy falls back to the second",
			served:      goodZip,
			goproxy:     func(good, failing string) string { return failing + "," + good },
			wantGood:    1,
			wantFailing: 1,
		},
		{
			name:        "pipe separator and direct entries",
			served:      goodZip,
			goproxy:     func(good, failing string) string { return "direct|" + failing + "|" + good + "/" },
			wantGood:    1,
			wantFailing: 1,
		},
		{
			name:        "every proxy fails",
			served:      goodZip,
			goproxy:     func(_, failing string) string { return failing },
			wantErrText: "500 Internal Server Error",
			wantFailing: 1,
		},
		{
			name:        "GOPROXY=off",
			served:      goodZip,
			goproxy:     func(string, string) string { return "off" },
			wantErr:     ErrProxyOff,
			wantErrText: "--model PATH",
		},
		{
			name:        "GOPROXY=direct",
			served:      goodZip,
			goproxy:     func(string, string) string { return "direct" },
			wantErrText: "lists no module proxy",
		},
		{
			name:        "missing entry in zip",
			served:      noEntryZip,
			goproxy:     func(good, _ string) string { return good },
			wantErrText: "has no file " + src.Module + "@" + src.Version + "/" + src.File,
			wantGood:    1,
		},
		{
			name:        "module not on the proxy",
			served:      nil,
			goproxy:     func(good, _ string) string { return good },
			wantErrText: "404 Not Found",
			wantGood:    1,
		},
		{
			name:        "response is not a zip",
			served:      []byte("this is not a zip"),
			goproxy:     func(good, _ string) string { return good },
			wantErrText: "open module zip",
			wantGood:    1,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			isolate(t)
			bodies := map[string][]byte{}
			if tt.served != nil {
				bodies[zipURLPath(t, src)] = tt.served
			}
			good := newFakeProxy(t, http.StatusOK, bodies)
			failing := newFakeProxy(t, http.StatusInternalServerError, nil)
			t.Setenv("GOPROXY", tt.goproxy(good.URL, failing.URL))

			cacheDir := filepath.Join(t.TempDir(), "models")
			want := filepath.Join(cacheDir, src.Name)
			if tt.cached != nil {
				if err := os.MkdirAll(cacheDir, 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(want, tt.cached, 0o644); err != nil {
					t.Fatal(err)
				}
			}

			got, err := Ensure(context.Background(), src, cacheDir, t.Logf)

			if g, f := good.requests.Load(), failing.requests.Load(); g != tt.wantGood || f != tt.wantFailing {
				t.Errorf("requests: working proxy %d, failing proxy %d; want %d and %d", g, f, tt.wantGood, tt.wantFailing)
			}
			if tt.wantErr != nil || tt.wantErrText != "" {
				if err == nil {
					t.Fatalf("Ensure returned %q and no error", got)
				}
				if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
					t.Errorf("error %q does not match %v", err, tt.wantErr)
				}
				if !strings.Contains(err.Error(), tt.wantErrText) {
					t.Errorf("error %q does not contain %q", err, tt.wantErrText)
				}
				if strings.Contains(err.Error(), "\n") {
					t.Errorf("error %q spans several lines", err)
				}
				// A failed call leaves the cache as it found it: no temporary
				// files, and the cached file (if any) untouched.
				var wantNames []string
				if tt.cached != nil {
					wantNames = []string{src.Name}
				}
				if names := dirNames(t, cacheDir); !slices.Equal(names, wantNames) {
					t.Errorf("cache directory holds %q; want %q", names, wantNames)
				}
				if tt.cached != nil {
					if b, _ := os.ReadFile(want); !bytes.Equal(b, tt.cached) {
						t.Errorf("cached file changed to %q", b)
					}
				}
				return
			}
			if err != nil {
				t.Fatalf("Ensure: %v", err)
			}
			if got != want {
				t.Errorf("Ensure returned %q; want %q", got, want)
			}
			if b, err := os.ReadFile(got); err != nil || !bytes.Equal(b, fakeModelContent) {
				t.Errorf("model file holds %q (err %v); want %q", b, err, fakeModelContent)
			}
			if names := dirNames(t, cacheDir); !slices.Equal(names, []string{src.Name}) {
				t.Errorf("cache directory holds %q; want only %q", names, src.Name)
			}
		})
	}
}

// TestEnsureModelUppercaseModulePath checks that a module path with uppercase
// letters is requested at its escaped URL and found in the zip by its
// unescaped name.
func TestEnsureModelUppercaseModulePath(t *testing.T) {
	isolate(t)
	src := fakeSource("github.com/BurntSushi/Models")
	zipPath := "/github.com/!burnt!sushi/!models/@v/v1.2.3.zip"
	if got := zipURLPath(t, src); got != zipPath {
		t.Fatalf("zip URL path %q; want %q", got, zipPath)
	}
	proxy := newFakeProxy(t, http.StatusOK, map[string][]byte{
		zipPath: moduleZip(t, src, map[string][]byte{src.File: fakeModelContent}),
	})
	t.Setenv("GOPROXY", proxy.URL)

	got, err := Ensure(context.Background(), src, t.TempDir(), t.Logf)
	if err != nil {
		t.Fatalf("Ensure: %v", err)
	}
	if b, err := os.ReadFile(got); err != nil || !bytes.Equal(b, fakeModelContent) {
		t.Errorf("model file holds %q (err %v); want %q", b, err, fakeModelContent)
	}
}

// TestEnsureModelFromGoModCache checks that a module already extracted in the
// Go module cache is used without any request, and that a corrupt copy there
// is ignored in favour of the proxy.
func TestEnsureModelFromGoModCache(t *testing.T) {
	src := fakeSource("example.com/Fake/models")
	tests := []struct {
		name         string
		modCacheCopy []byte
		wantRequests int64
	}{
		{name: "valid copy", modCacheCopy: fakeModelContent, wantRequests: 0},
		{name: "corrupt copy", modCacheCopy: []byte("corrupt"), wantRequests: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			modCache := t.TempDir()
			t.Setenv("GOMODCACHE", modCache)
			file := filepath.Join(modCache, "example.com", "!fake", "models@v1.2.3", "testdata", "tiny.gguf")
			if err := os.MkdirAll(filepath.Dir(file), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(file, tt.modCacheCopy, 0o444); err != nil {
				t.Fatal(err)
			}
			proxy := newFakeProxy(t, http.StatusOK, map[string][]byte{
				zipURLPath(t, src): moduleZip(t, src, map[string][]byte{src.File: fakeModelContent}),
			})
			t.Setenv("GOPROXY", proxy.URL)

			cacheDir := t.TempDir()
			got, err := Ensure(context.Background(), src, cacheDir, t.Logf)
			if err != nil {
				t.Fatalf("Ensure: %v", err)
			}
			if n := proxy.requests.Load(); n != tt.wantRequests {
				t.Errorf("proxy saw %d requests; want %d", n, tt.wantRequests)
			}
			if b, err := os.ReadFile(got); err != nil || !bytes.Equal(b, fakeModelContent) {
				t.Errorf("model file holds %q (err %v); want %q", b, err, fakeModelContent)
			}
			if names := dirNames(t, cacheDir); !slices.Equal(names, []string{src.Name}) {
				t.Errorf("cache directory holds %q; want only %q", names, src.Name)
			}
		})
	}
}

// TestEnsureModelCanceled checks that a canceled context stops the download
// and leaves nothing behind.
func TestEnsureModelCanceled(t *testing.T) {
	isolate(t)
	src := fakeSource("example.com/fake/models")
	proxy := newFakeProxy(t, http.StatusOK, map[string][]byte{
		zipURLPath(t, src): moduleZip(t, src, map[string][]byte{src.File: fakeModelContent}),
	})
	t.Setenv("GOPROXY", proxy.URL)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()

	cacheDir := t.TempDir()
	if _, err := Ensure(ctx, src, cacheDir, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("Ensure error %v; want context.Canceled", err)
	}
	if names := dirNames(t, cacheDir); len(names) != 0 {
		t.Errorf("cache directory holds %q; want nothing", names)
	}
}

// TestEnsureModelInvalidSource checks that sources which could write outside
// the cache directory or never verify are rejected before any request.
func TestEnsureModelInvalidSource(t *testing.T) {
	isolate(t)
	proxy := newFakeProxy(t, http.StatusOK, nil)
	t.Setenv("GOPROXY", proxy.URL)
	good := fakeSource("example.com/fake/models")
	tests := []struct {
		name   string
		mutate func(*Source)
	}{
		{"name with a slash", func(s *Source) { s.Name = "../evil.gguf" }},
		{"empty name", func(s *Source) { s.Name = "" }},
		{"empty module", func(s *Source) { s.Module = "" }},
		{"module with an exclamation mark", func(s *Source) { s.Module = "example.com/!bad" }},
		{"short hash", func(s *Source) { s.SHA256 = "abc" }},
		{"uppercase hash", func(s *Source) { s.SHA256 = strings.ToUpper(s.SHA256) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src := good
			tt.mutate(&src)
			if _, err := Ensure(context.Background(), src, t.TempDir(), t.Logf); err == nil {
				t.Fatal("Ensure accepted an invalid source")
			}
		})
	}
	if n := proxy.requests.Load(); n != 0 {
		t.Errorf("proxy saw %d requests; want 0", n)
	}
}

// TestEscapeModulePath checks the module proxy escaping of module paths.
func TestEscapeModulePath(t *testing.T) {
	tests := []struct {
		in, want string
		wantErr  bool
	}{
		{in: "github.com/mutablelogic/go-llama", want: "github.com/mutablelogic/go-llama"},
		{in: "github.com/Azure/azure-sdk-for-go", want: "github.com/!azure/azure-sdk-for-go"},
		{in: "github.com/BurntSushi/toml", want: "github.com/!burnt!sushi/toml"},
		{in: "v1.0.0-RC1", want: "v1.0.0-!r!c1"},
		{in: "", want: ""},
		{in: "example.com/!azure", wantErr: true},
	}
	for _, tt := range tests {
		got, err := escapeModulePath(tt.in)
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("escapeModulePath(%q) = %q, %v; want %q, error %v", tt.in, got, err, tt.want, tt.wantErr)
		}
	}
}

// TestGoProxies checks how $GOPROXY is turned into a list of proxy URLs.
func TestGoProxies(t *testing.T) {
	tests := []struct {
		env     string
		want    []string
		wantErr error
	}{
		{env: "", want: []string{"https://proxy.golang.org"}},
		{env: "https://proxy.golang.org,direct", want: []string{"https://proxy.golang.org"}},
		{env: "https://a.example/,https://b.example", want: []string{"https://a.example", "https://b.example"}},
		{env: "https://a.example|direct|https://b.example", want: []string{"https://a.example", "https://b.example"}},
		{env: " https://a.example , ", want: []string{"https://a.example"}},
		{env: "https://a.example,off,https://b.example", want: []string{"https://a.example"}},
		{env: "off", wantErr: ErrProxyOff},
		{env: "off,https://a.example", wantErr: ErrProxyOff},
		{env: "direct"},
	}
	for _, tt := range tests {
		t.Setenv("GOPROXY", tt.env)
		got, err := goProxies()
		switch {
		case tt.wantErr != nil && !errors.Is(err, tt.wantErr):
			t.Errorf("GOPROXY=%q: error %v; want %v", tt.env, err, tt.wantErr)
		case tt.wantErr == nil && tt.want == nil && err == nil:
			t.Errorf("GOPROXY=%q: got %q and no error", tt.env, got)
		case tt.want != nil && (err != nil || !slices.Equal(got, tt.want)):
			t.Errorf("GOPROXY=%q: got %q, %v; want %q", tt.env, got, err, tt.want)
		}
	}
}

// TestGoModCacheDir checks the lookup order of the Go module cache directory.
func TestGoModCacheDir(t *testing.T) {
	home := t.TempDir()
	t.Setenv("HOME", home)
	t.Setenv("USERPROFILE", home)
	tests := []struct {
		gomodcache, gopath, want string
	}{
		{gomodcache: "/m", gopath: "/g", want: "/m"},
		{gopath: "/g1" + string(os.PathListSeparator) + "/g2", want: filepath.Join("/g1", "pkg", "mod")},
		{want: filepath.Join(home, "go", "pkg", "mod")},
	}
	for _, tt := range tests {
		t.Setenv("GOMODCACHE", tt.gomodcache)
		t.Setenv("GOPATH", tt.gopath)
		if got := goModCacheDir(); got != tt.want {
			t.Errorf("GOMODCACHE=%q GOPATH=%q: got %q; want %q", tt.gomodcache, tt.gopath, got, tt.want)
		}
	}
}

// TestModelCacheDir checks that $KVGATE_CACHE_DIR overrides the user cache
// directory.
func TestModelCacheDir(t *testing.T) {
	t.Setenv("KVGATE_CACHE_DIR", "/custom/cache")
	if got, err := CacheDir(); err != nil || got != "/custom/cache" {
		t.Errorf("CacheDir() = %q, %v; want /custom/cache", got, err)
	}

	t.Setenv("KVGATE_CACHE_DIR", "")
	base, err := os.UserCacheDir()
	if err != nil {
		t.Skipf("no user cache directory: %v", err)
	}
	want := filepath.Join(base, "kvgate", "models")
	if got, err := CacheDir(); err != nil || got != want {
		t.Errorf("CacheDir() = %q, %v; want %q", got, err, want)
	}
}

// TestKnownValid checks that every built-in source passes validation.
func TestKnownValid(t *testing.T) {
	for _, src := range Known {
		if err := src.validate(); err != nil {
			t.Errorf("%s: %v", src.Name, err)
		}
		if got, ok := Lookup(src.Name); !ok || got != src {
			t.Errorf("Lookup(%q) = %v, %v", src.Name, got, ok)
		}
	}
	if _, ok := Lookup("nope.gguf"); ok {
		t.Error("Lookup found an unknown name")
	}
}

// TestKnownFromProxy fetches every built-in model from the module proxy
// named by $GOPROXY, with an empty cache, and checks its hash. It needs the
// network, so it only runs when KVGATE_NETWORK_TESTS=1 (as CI sets).
func TestKnownFromProxy(t *testing.T) {
	if os.Getenv("KVGATE_NETWORK_TESTS") != "1" {
		t.Skip("set KVGATE_NETWORK_TESTS=1 to fetch the built-in models from the module proxy")
	}
	isolate(t)
	for _, src := range Known {
		t.Run(src.Name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			start := time.Now()
			got, err := Ensure(ctx, src, t.TempDir(), t.Logf)
			if err != nil {
				t.Fatalf("Ensure: %v", err)
			}
			sum, err := FileSHA256(got)
			if err != nil {
				t.Fatal(err)
			}
			if sum != src.SHA256 {
				t.Fatalf("%s has sha256 %s; want %s", got, sum, src.SHA256)
			}
			info, err := os.Stat(got)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("fetched %s (%d bytes, sha256 %s) in %s", got, info.Size(), sum, time.Since(start).Round(time.Millisecond))
		})
	}
}
