package native

import (
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// sharedModel returns the path of a model in ../shared/models, skipping the
// test when the workplace's model folder is not there.
func sharedModel(t testing.TB, name string) string {
	t.Helper()
	p := findSharedModel(name)
	if p == "" {
		t.Skipf("test model %s not found (set KVGATE_TEST_MODELS)", name)
	}
	return p
}

// findSharedModel returns the absolute path of a model in ../shared/models,
// or "" when it is not there.
func findSharedModel(name string) string {
	for _, dir := range []string{os.Getenv("KVGATE_TEST_MODELS"), "../../shared/models", "../shared/models"} {
		if dir == "" {
			continue
		}
		p := filepath.Join(dir, name)
		if _, err := os.Stat(p); err == nil {
			abs, _ := filepath.Abs(p)
			return abs
		}
	}
	return ""
}

var (
	storiesOnce  sync.Once
	storiesModel *Model
	storiesErr   error
)

// stories loads stories260K once for the package's tests.
func stories(t testing.TB) *Model {
	t.Helper()
	path := sharedModel(t, "stories260K.gguf")
	storiesOnce.Do(func() { storiesModel, storiesErr = LoadModel(path, LoadOptions{}) })
	if storiesErr != nil {
		t.Fatalf("load stories260K: %v", storiesErr)
	}
	return storiesModel
}
