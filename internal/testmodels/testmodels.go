// Package testmodels gives kvgate's tests the real GGUF models they run on,
// with nothing but the repository and the package registries.
//
// Two kinds of model exist:
//
//   - Real models (stories260K, all-MiniLM-L6-v2) come from where a user gets
//     them: the Go module github.com/mutablelogic/go-llama@v0.0.11, fetched
//     from the Go module proxy by package models, verified by sha256 and
//     cached in the same directory as the server's default model
//     ($KVGATE_CACHE_DIR, or the user cache directory's kvgate/models).
//   - Random-weight models of any shape, with a built-in tokenizer, are
//     written by package mkmodel, as "kvgate mkmodel" does.
//
// A folder named by $KVGATE_TEST_MODELS, or a "shared/models" folder beside
// the repository, is used first when it holds a file with the right sha256:
// a fast path for machines that keep the models elsewhere, never a
// requirement.
//
// A model that cannot be had fails the test (it never skips it), with a
// message that says what was tried and what to do.
package testmodels

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/kvgate/kvgate/internal/mkmodel"
	"github.com/kvgate/kvgate/internal/models"
)

// Names of the real test models.
const (
	Stories260K = "stories260K.gguf"
	MiniLM      = "all-MiniLM-L6-v2-Q4_K_M.gguf"
)

// fetchTimeout bounds the download of one model.
const fetchTimeout = 10 * time.Minute

type result struct {
	path string
	err  error
}

var (
	mu      sync.Mutex
	fetched = map[string]*result{}
)

// Path returns the absolute path of the real test model named name (one of
// the constants above), fetching and verifying it on first use. The result,
// success or failure, is kept for the rest of the process, so a missing
// network costs one attempt, not one per test.
func Path(t testing.TB, name string) string {
	t.Helper()
	p, err := Get(name)
	if err != nil {
		t.Fatalf("test model %s: %v", name, err)
	}
	return p
}

// Get is Path for callers without a testing.TB, such as TestMain and
// benchmarks' set-up.
func Get(name string) (string, error) {
	mu.Lock()
	defer mu.Unlock()
	if r, ok := fetched[name]; ok {
		return r.path, r.err
	}
	r := &result{}
	r.path, r.err = get(name)
	fetched[name] = r
	return r.path, r.err
}

func get(name string) (string, error) {
	src, ok := models.Lookup(name)
	if !ok {
		return "", fmt.Errorf("not a known test model")
	}
	for _, dir := range fastPaths() {
		p := filepath.Join(dir, name)
		if sum, err := models.FileSHA256(p); err == nil && sum == src.SHA256 {
			return filepath.Abs(p)
		}
	}
	dir, err := models.CacheDir()
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(context.Background(), fetchTimeout)
	defer cancel()
	p, err := models.Ensure(ctx, src, dir, func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "testmodels: "+format+"\n", args...)
	})
	if err != nil {
		return "", fmt.Errorf("%w\n(the tests fetch it once from the Go module proxy, $GOPROXY, into %s; "+
			"offline, put a copy there or in a folder named by $KVGATE_TEST_MODELS)", err, dir)
	}
	return filepath.Abs(p)
}

// fastPaths returns $KVGATE_TEST_MODELS and the shared/models folder beside
// the repository, when they exist.
func fastPaths() []string {
	var dirs []string
	if d := os.Getenv("KVGATE_TEST_MODELS"); d != "" {
		dirs = append(dirs, d)
	}
	if root, err := moduleRoot(); err == nil {
		dirs = append(dirs, filepath.Join(filepath.Dir(root), "shared", "models"))
	}
	return dirs
}

// moduleRoot returns the directory holding go.mod, walking up from the
// working directory (a package directory, under go test).
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", os.ErrNotExist
		}
		dir = parent
	}
}

var (
	randomMu  sync.Mutex
	randomDir string
)

// Random returns the path of a random-weight llama model written by
// mkmodel from spec, named name (which must be unique among the calls of
// one test binary, with a spec of its own). The file is written once per
// test process into a temporary folder, which Cleanup removes; it is small
// (a few MB) and written afresh by every process, so it is never stale.
func Random(t testing.TB, name string, spec mkmodel.Spec) string {
	t.Helper()
	randomMu.Lock()
	defer randomMu.Unlock()
	if randomDir == "" {
		d, err := os.MkdirTemp("", "kvgate-testmodels-")
		if err != nil {
			t.Fatalf("random model %s: %v", name, err)
		}
		randomDir = d
	}
	p := filepath.Join(randomDir, name+".gguf")
	if _, err := os.Stat(p); err == nil {
		return p
	}
	if _, err := mkmodel.WriteFile(context.Background(), p, spec); err != nil {
		t.Fatalf("random model %s: %v", name, err)
	}
	return p
}

// Cleanup removes the random models written by this process. A TestMain
// calls it after m.Run.
func Cleanup() {
	randomMu.Lock()
	defer randomMu.Unlock()
	if randomDir != "" {
		os.RemoveAll(randomDir)
		randomDir = ""
	}
}
