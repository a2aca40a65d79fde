// Command testreport runs go test with -json and prints what a developer
// needs from the run: one line per package as go test prints it, the whole
// output of every failed test, and at the end every skipped test with the
// reason it gave. A plain go test run hides skips, so a suite whose tests
// skip for a missing file looks like a pass; this command makes each skip
// visible in the normal output, and -fail-skips turns chosen skips into a
// failure.
//
// Usage:
//
//	go run ./scripts/testreport [-fail-skips REGEXP] -- [go test flags and packages]
//
// The exit status is go test's, or 1 when a skip reason matches -fail-skips.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"sort"
	"strings"
)

func main() {
	failSkips := flag.String("fail-skips", "", "fail the run when a skipped test's reason matches this regular expression")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "Usage: testreport [-fail-skips REGEXP] -- [go test flags and packages]\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	var re *regexp.Regexp
	if *failSkips != "" {
		var err error
		if re, err = regexp.Compile(*failSkips); err != nil {
			fmt.Fprintf(os.Stderr, "testreport: -fail-skips: %v\n", err)
			os.Exit(2)
		}
	}
	cmd := exec.Command("go", append([]string{"test", "-json"}, flag.Args()...)...)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		fmt.Fprintln(os.Stderr, "testreport:", err)
		os.Exit(2)
	}
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "testreport:", err)
		os.Exit(2)
	}
	r := newReport(os.Stdout)
	if err := r.read(out); err != nil {
		fmt.Fprintln(os.Stderr, "testreport:", err)
	}
	runErr := cmd.Wait()
	code := 0
	var exit *exec.ExitError
	switch {
	case errors.As(runErr, &exit):
		code = exit.ExitCode()
	case runErr != nil:
		fmt.Fprintln(os.Stderr, "testreport:", runErr)
		code = 2
	}
	if n := r.summary(re); n > 0 && code == 0 {
		fmt.Fprintf(os.Stdout, "FAIL: %d test(s) skipped for a reason matching -fail-skips %q\n", n, *failSkips)
		code = 1
	}
	os.Exit(code)
}

// event is one line of go test -json (cmd/test2json's TestEvent).
type event struct {
	Action  string
	Package string
	Test    string
	Output  string
	Elapsed float64
}

// skip is a skipped test and the reason it logged.
type skip struct {
	pkg, test, reason string
}

// report accumulates the events of one run.
type report struct {
	w      io.Writer
	output map[string][]string // package + "\x00" + test: its output lines
	skips  []skip
	failed int
}

func newReport(w io.Writer) *report {
	return &report{w: w, output: map[string][]string{}}
}

// read consumes go test -json output until EOF. Lines that are not JSON
// (build errors on some Go versions) are copied through.
func (r *report) read(in io.Reader) error {
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var ev event
		if len(line) == 0 || line[0] != '{' || json.Unmarshal(line, &ev) != nil {
			fmt.Fprintln(r.w, string(line))
			continue
		}
		r.handle(ev)
	}
	return sc.Err()
}

func (r *report) handle(ev event) {
	key := ev.Package + "\x00" + ev.Test
	switch ev.Action {
	case "output", "build-output":
		if ev.Test == "" && ev.Action == "build-output" {
			fmt.Fprint(r.w, ev.Output)
			return
		}
		r.output[key] = append(r.output[key], ev.Output)
	case "skip":
		if ev.Test != "" {
			r.skips = append(r.skips, skip{pkg: ev.Package, test: ev.Test, reason: skipReason(r.output[key])})
		} else if out := r.output[key]; len(out) > 0 {
			fmt.Fprint(r.w, strings.Join(out, "")) // "?   pkg [no test files]"
		}
		delete(r.output, key)
	case "pass":
		if ev.Test == "" {
			fmt.Fprint(r.w, lastLine(r.output[key]))
		}
		delete(r.output, key)
	case "fail":
		if ev.Test != "" {
			r.failed++
			fmt.Fprint(r.w, strings.Join(r.output[key], ""))
		} else {
			// The package's own output: panics, TestMain failures, and
			// the FAIL line.
			fmt.Fprint(r.w, strings.Join(r.output[key], ""))
		}
		delete(r.output, key)
	}
}

// skipReason returns what a skipped test logged, without the framework's
// own lines.
func skipReason(lines []string) string {
	var b []string
	for _, l := range lines {
		t := strings.TrimSpace(l)
		if t == "" || strings.HasPrefix(t, "=== ") || strings.HasPrefix(t, "--- SKIP") {
			continue
		}
		b = append(b, t)
	}
	if len(b) == 0 {
		return "(no reason given)"
	}
	return strings.Join(b, " | ")
}

// lastLine returns the last non-empty output line, which for a package is
// go test's "ok  pkg  1.2s" line.
func lastLine(lines []string) string {
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.TrimSpace(lines[i]) != "" {
			return lines[i]
		}
	}
	return ""
}

// summary prints every skipped test with its reason and returns how many
// reasons match re (none when re is nil).
func (r *report) summary(re *regexp.Regexp) int {
	if len(r.skips) == 0 {
		fmt.Fprintln(r.w, "skipped tests: none")
		return 0
	}
	sort.Slice(r.skips, func(i, j int) bool {
		if r.skips[i].pkg != r.skips[j].pkg {
			return r.skips[i].pkg < r.skips[j].pkg
		}
		return r.skips[i].test < r.skips[j].test
	})
	fmt.Fprintf(r.w, "skipped tests: %d\n", len(r.skips))
	matched := 0
	for _, s := range r.skips {
		mark := ""
		if re != nil && re.MatchString(s.reason) {
			matched++
			mark = "  <- not allowed (-fail-skips)"
		}
		fmt.Fprintf(r.w, "  SKIP %s %s: %s%s\n", s.pkg, s.test, s.reason, mark)
	}
	return matched
}
