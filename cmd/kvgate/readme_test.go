package main

// The README's shell examples are part of the product: a user copies them.
// This file parses every fenced code block of README.md and checks each
// shell command in it against the real kvgate binary, the Makefile and
// scripts/tools.sh, then runs the cheap ones for real against a server.
//
// Block kinds:
//
//   - sh, bash, shell, zsh: a script a user pastes; every line is shell.
//     A line starting with "$ " is refused: a prompt belongs in a console
//     block.
//   - console: a session; lines starting with "$ " (with their "\"
//     continuations) are commands, the lines after one are its output.
//   - json: must be valid JSON.
//   - anything else (go, text, ...): not shell, not checked here.
//   - a block without a language is refused, so that no shell example can
//     escape the checks.
//
// Each command is checked statically (checkCommand, checkBlock); then
// TestREADME runs, against one real server process:
//
//   - .bin/kvgate version (and top-level flags such as --version), any
//     kvgate COMMAND -h, and kvgate mkmodel (in a temporary directory);
//   - kvgate client commands (those whose help has -addr), with their
//     address pointed at the test server, unless they name another host, use
//     TLS or a token, drive load (bench) or never end (--watch);
//   - .bin/grpcurl -plaintext localhost:50051 ... with the address
//     rewritten, comparing the output a console block shows with the real
//     one (exactly for list; keys, strings and generated text for calls);
//   - every service, method or message a grpcurl command names is looked up
//     through the server's own reflection service, grpcurl or not.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
)

// quickStartPort is the port of the quick-start server (make serve), which
// a reader following the README already has running.
const quickStartPort = "50051"

// defaultAddr is the address the README's client examples use; the tests
// point it at their own server.
const defaultAddr = "localhost:" + quickStartPort

// problem is one thing wrong with the README, at a line of it.
type problem struct {
	line int
	msg  string
}

func (p problem) String() string { return fmt.Sprintf("README.md:%d: %s", p.line, p.msg) }

// mdBlock is one fenced code block of a Markdown file.
type mdBlock struct {
	lang  string   // the first word of the info string: sh, console, go, ...
	line  int      // the line number of the block's first content line
	lines []string // the content, without the fences
}

var fenceRE = regexp.MustCompile("^ {0,3}(`{3,}|~{3,})\\s*([^`\\s]*)")

// markdownBlocks returns the fenced code blocks of a Markdown text.
func markdownBlocks(src string) ([]mdBlock, error) {
	var blocks []mdBlock
	var cur *mdBlock
	var fence string
	indent := 0
	for i, line := range strings.Split(src, "\n") {
		if cur == nil {
			m := fenceRE.FindStringSubmatch(line)
			if m == nil {
				continue
			}
			fence = m[1]
			indent = len(line) - len(strings.TrimLeft(line, " "))
			cur = &mdBlock{lang: strings.ToLower(m[2]), line: i + 2}
			continue
		}
		t := strings.TrimLeft(line, " ")
		if strings.HasPrefix(t, fence) && strings.Trim(t, fence[:1]+" \t") == "" {
			blocks = append(blocks, *cur)
			cur = nil
			continue
		}
		// Content lines lose the fence's indentation, as CommonMark says.
		for n := 0; n < indent && strings.HasPrefix(line, " "); n++ {
			line = line[1:]
		}
		cur.lines = append(cur.lines, line)
	}
	if cur != nil {
		return blocks, fmt.Errorf("line %d: code block never closed", cur.line-1)
	}
	return blocks, nil
}

// shellCmd is one simple command of a shell example.
type shellCmd struct {
	line int      // the README line it starts on
	env  []string // NAME=value assignments before the command
	args []string // the command and its arguments, quotes and escapes removed
	// output is what a console block shows after the command, if anything.
	output []string
	// console is set for a command of a console block.
	console bool
	// background is set for a command ended by &, which runs beside the
	// commands after it.
	background bool
}

// String returns the command as a shell line, for messages.
func (c shellCmd) String() string {
	words := append(append([]string{}, c.env...), c.args...)
	for i, w := range words {
		if w == "" || strings.ContainsAny(w, " \t\"'$|&;<>()") {
			words[i] = "'" + w + "'"
		}
	}
	return strings.Join(words, " ")
}

type tokKind int

const (
	tokWord tokKind = iota
	tokOp           // ; & && | || ( ) or a newline
)

type token struct {
	kind tokKind
	text string
	line int
}

// shellLexer splits POSIX shell text into words and operators. It knows
// quotes, backslashes, line continuations, comments, redirections (which it
// drops with their targets) and $(...) command substitution, whose commands
// it parses on their own; it refuses backquotes and here-documents.
type shellLexer struct {
	src  string
	i    int
	line int
	toks []token
	subs []shellCmd // commands inside $(...)

	word       strings.Builder
	inWord     bool // a word is being built (it may be empty: "")
	digitsOnly bool // the word so far is unquoted digits: a redirection's fd
	wordLine   int
	redirect   bool // the next word is a redirection's target: drop it
}

func (l *shellLexer) errorf(format string, args ...any) error {
	return fmt.Errorf("line %d: %s", l.line, fmt.Sprintf(format, args...))
}

func (l *shellLexer) start() {
	if !l.inWord {
		l.inWord, l.digitsOnly, l.wordLine = true, true, l.line
	}
}

func (l *shellLexer) flush() {
	if !l.inWord {
		return
	}
	if l.redirect {
		l.redirect = false
	} else {
		l.toks = append(l.toks, token{kind: tokWord, text: l.word.String(), line: l.wordLine})
	}
	l.word.Reset()
	l.inWord = false
}

func (l *shellLexer) op(s string) error {
	l.flush()
	if l.redirect {
		return l.errorf("redirection without a target before %q", s)
	}
	l.toks = append(l.toks, token{kind: tokOp, text: s, line: l.line})
	return nil
}

func (l *shellLexer) peek(n int) byte {
	if l.i+n < len(l.src) {
		return l.src[l.i+n]
	}
	return 0
}

// substitution reads the $(...) at l.i, parses its commands into l.subs and
// copies its text into the current word.
func (l *shellLexer) substitution() error {
	depth, j := 0, l.i+1
	for ; j < len(l.src); j++ {
		switch l.src[j] {
		case '(':
			depth++
		case ')':
			depth--
		case '\'':
			k := strings.IndexByte(l.src[j+1:], '\'')
			if k < 0 {
				return l.errorf("unterminated ' inside $(...)")
			}
			j += k + 1
		}
		if depth == 0 {
			break
		}
	}
	if depth != 0 {
		return l.errorf("unterminated $(")
	}
	inner := l.src[l.i+2 : j]
	cmds, err := parseShell(inner, l.line)
	if err != nil {
		return err
	}
	l.subs = append(l.subs, cmds...)
	l.word.WriteString(l.src[l.i : j+1])
	l.line += strings.Count(inner, "\n")
	l.i = j
	return nil
}

func (l *shellLexer) run() error {
	for ; l.i < len(l.src); l.i++ {
		c := l.src[l.i]
		switch {
		case c == '\\':
			if l.peek(1) == '\n' { // a line continuation
				l.i++
				l.line++
				continue
			}
			l.start()
			l.digitsOnly = false
			if l.peek(1) != 0 {
				l.i++
			}
			l.word.WriteByte(l.src[l.i])
		case c == '\'':
			l.start()
			l.digitsOnly = false
			k := strings.IndexByte(l.src[l.i+1:], '\'')
			if k < 0 {
				return l.errorf("unterminated '")
			}
			s := l.src[l.i+1 : l.i+1+k]
			l.word.WriteString(s)
			l.line += strings.Count(s, "\n")
			l.i += k + 1
		case c == '"':
			l.start()
			l.digitsOnly = false
			for l.i++; ; l.i++ {
				if l.i >= len(l.src) {
					return l.errorf("unterminated \"")
				}
				d := l.src[l.i]
				if d == '"' {
					break
				}
				switch {
				case d == '\\' && strings.IndexByte("$`\"\\\n", l.peek(1)) >= 0:
					l.i++
					if l.src[l.i] == '\n' {
						l.line++
						continue
					}
					l.word.WriteByte(l.src[l.i])
				case d == '$' && l.peek(1) == '(':
					if err := l.substitution(); err != nil {
						return err
					}
				case d == '`':
					return l.errorf("backquotes: use $(...)")
				default:
					if d == '\n' {
						l.line++
					}
					l.word.WriteByte(d)
				}
			}
		case c == '$' && l.peek(1) == '(':
			l.start()
			l.digitsOnly = false
			if err := l.substitution(); err != nil {
				return err
			}
		case c == '`':
			return l.errorf("backquotes: use $(...)")
		case c == '#' && !l.inWord:
			for l.i+1 < len(l.src) && l.src[l.i+1] != '\n' {
				l.i++
			}
		case c == ' ' || c == '\t' || c == '\r':
			l.flush()
		case c == '\n':
			if err := l.op("\n"); err != nil {
				return err
			}
			l.line++
		case c == ';' || c == '(' || c == ')':
			if err := l.op(string(c)); err != nil {
				return err
			}
		case c == '&' || c == '|':
			if c == '&' && l.peek(1) == '>' { // &> file
				l.flush()
				l.i++
				l.redirect = true
				continue
			}
			s := string(c)
			if l.peek(1) == c {
				s += s
				l.i++
			}
			if err := l.op(s); err != nil {
				return err
			}
		case c == '<' || c == '>':
			if l.inWord && l.digitsOnly && l.word.Len() > 0 { // 2>file: drop the fd
				l.word.Reset()
				l.inWord = false
			} else {
				l.flush()
			}
			if c == '<' && l.peek(1) == '<' {
				return l.errorf("here-documents are not supported")
			}
			if l.peek(1) == '>' || l.peek(1) == '&' {
				l.i++
			}
			l.redirect = true
		default:
			l.start()
			if c < '0' || c > '9' {
				l.digitsOnly = false
			}
			l.word.WriteByte(c)
		}
	}
	l.flush()
	if l.redirect {
		return l.errorf("redirection without a target")
	}
	return nil
}

var assignRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*=`)

// parseShell returns the simple commands of a shell text that starts at
// README line line. A for loop's body is expanded once per value, with the
// loop variable substituted; other compound commands (while, if, braces,
// subshells) are flattened to the commands inside them.
func parseShell(src string, line int) ([]shellCmd, error) {
	l := &shellLexer{src: src, line: line}
	if err := l.run(); err != nil {
		return nil, err
	}
	toks := l.toks
	type frame struct {
		isFor  bool
		name   string
		values []string
		start  int // index in cmds of the body's first command
	}
	var (
		cmds  []shellCmd
		cur   *shellCmd
		stack []frame
	)
	end := func(op string) {
		if cur != nil {
			cur.background = op == "&"
			cmds = append(cmds, *cur)
			cur = nil
		}
	}
	for i := 0; i < len(toks); i++ {
		t := toks[i]
		if t.kind == tokOp {
			end(t.text)
			continue
		}
		if cur == nil {
			switch t.text {
			case "for":
				if i+2 >= len(toks) || toks[i+1].kind != tokWord || toks[i+2].text != "in" {
					return nil, fmt.Errorf("line %d: only for NAME in WORDS; do ...; done is supported", t.line)
				}
				f := frame{isFor: true, name: toks[i+1].text}
				for i += 3; i < len(toks) && toks[i].kind == tokWord; i++ {
					f.values = append(f.values, toks[i].text)
				}
				for i < len(toks) && toks[i].kind == tokOp && (toks[i].text == ";" || toks[i].text == "\n") {
					i++
				}
				if i >= len(toks) || toks[i].text != "do" {
					return nil, fmt.Errorf("line %d: for without do", t.line)
				}
				f.start = len(cmds)
				stack = append(stack, f)
				continue
			case "while", "until":
				stack = append(stack, frame{start: len(cmds)})
				continue
			case "done":
				if len(stack) == 0 {
					return nil, fmt.Errorf("line %d: done without a loop", t.line)
				}
				f := stack[len(stack)-1]
				stack = stack[:len(stack)-1]
				if f.isFor {
					body := append([]shellCmd(nil), cmds[f.start:]...)
					cmds = cmds[:f.start]
					for _, v := range f.values {
						for _, c := range body {
							cmds = append(cmds, c.substitute(f.name, v))
						}
					}
				}
				continue
			case "do", "if", "then", "elif", "else", "fi", "{", "}", "!":
				continue
			}
			cur = &shellCmd{line: t.line}
		}
		if len(cur.args) == 0 && assignRE.MatchString(t.text) {
			cur.env = append(cur.env, t.text)
			continue
		}
		cur.args = append(cur.args, t.text)
	}
	end("")
	if len(stack) > 0 {
		return nil, fmt.Errorf("line %d: loop without done", line)
	}
	return append(cmds, l.subs...), nil
}

// substitute returns c with $name and ${name} replaced by value.
func (c shellCmd) substitute(name, value string) shellCmd {
	re := regexp.MustCompile(`\$(\{` + regexp.QuoteMeta(name) + `\}|` + regexp.QuoteMeta(name) + `\b)`)
	out := c
	out.env = make([]string, len(c.env))
	out.args = make([]string, len(c.args))
	for i, w := range c.env {
		out.env[i] = re.ReplaceAllLiteralString(w, value)
	}
	for i, w := range c.args {
		out.args[i] = re.ReplaceAllLiteralString(w, value)
	}
	return out
}

// consoleCommands splits a console block into its "$ " commands and the
// output lines after each.
func consoleCommands(b mdBlock) ([]shellCmd, error) {
	var cmds []shellCmd
	for i := 0; i < len(b.lines); i++ {
		line := b.lines[i]
		if !strings.HasPrefix(line, "$ ") {
			if len(cmds) == 0 {
				if strings.TrimSpace(line) == "" {
					continue
				}
				return nil, fmt.Errorf("line %d: a console block must start with a \"$ \" command", b.line+i)
			}
			cmds[len(cmds)-1].output = append(cmds[len(cmds)-1].output, line)
			continue
		}
		start := i
		text := line[2:]
		for strings.HasSuffix(line, "\\") && i+1 < len(b.lines) {
			i++
			line = b.lines[i]
			text += "\n" + line
		}
		parsed, err := parseShell(text, b.line+start)
		if err != nil {
			return nil, err
		}
		for j := range parsed {
			parsed[j].console = true
		}
		cmds = append(cmds, parsed...)
	}
	// Trailing blank lines of an output are separators, not output.
	for i := range cmds {
		o := cmds[i].output
		for len(o) > 0 && strings.TrimSpace(o[len(o)-1]) == "" {
			o = o[:len(o)-1]
		}
		cmds[i].output = o
	}
	return cmds, nil
}

// cliInfo is what the real kvgate binary says about its commands.
type cliInfo struct {
	// commands maps each subcommand to its flags, each to whether it takes
	// a value (false: a boolean flag).
	commands map[string]map[string]bool
	// help is each subcommand's -h output.
	help map[string]string
	// topLevel holds the arguments kvgate accepts in a subcommand's place,
	// such as --version.
	topLevel map[string]bool
}

var (
	usageCmdRE = regexp.MustCompile(`(?m)^\s+kvgate\s+([a-z][a-z0-9-]*)\b`)
	// A line of flag.PrintDefaults: "  -name type" or "  -name" (boolean),
	// with a one-letter boolean's usage on the same line after a tab.
	flagLineRE = regexp.MustCompile(`(?m)^  -([A-Za-z0-9][A-Za-z0-9_.-]*)(?: (\S+))?(?:\t.*)?$`)
)

// parseFlagHelp returns the flags listed in a command's -h output.
func parseFlagHelp(help string) map[string]bool {
	flags := map[string]bool{"h": false, "help": false} // every FlagSet has them
	for _, m := range flagLineRE.FindAllStringSubmatch(help, -1) {
		flags[m[1]] = m[2] != ""
	}
	return flags
}

// loadCLI asks the kvgate binary at bin for its commands and their flags.
func loadCLI(bin string) (*cliInfo, error) {
	out, _ := exec.Command(bin).CombinedOutput() // usage, exit status 2
	cli := &cliInfo{commands: map[string]map[string]bool{}, help: map[string]string{}, topLevel: map[string]bool{}}
	for _, m := range usageCmdRE.FindAllStringSubmatch(string(out), -1) {
		name := m[1]
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		help, _ := exec.CommandContext(ctx, bin, name, "-h").CombinedOutput()
		cancel()
		if strings.Contains(string(help), "unknown command") {
			return nil, fmt.Errorf("kvgate's usage lists %q, but kvgate %s -h says: %s", name, name, help)
		}
		cli.commands[name] = parseFlagHelp(string(help))
		cli.help[name] = string(help)
	}
	if len(cli.commands) == 0 {
		return nil, fmt.Errorf("no commands in kvgate's usage:\n%s", out)
	}
	for _, arg := range []string{"-h", "--help", "-version", "--version"} {
		if exec.Command(bin, arg).Run() == nil {
			cli.topLevel[arg] = true
		}
	}
	return cli, nil
}

// makeInfo is what the Makefile defines.
type makeInfo struct {
	targets map[string]bool
	vars    map[string]bool // assigned or referenced variables
}

var (
	makeRuleRE   = regexp.MustCompile(`(?m)^([A-Za-z0-9_./%-]+(?:[ \t]+[A-Za-z0-9_./%-]+)*)[ \t]*:([^=]|$)`)
	makeAssignRE = regexp.MustCompile(`(?m)^(?:export[ \t]+)?([A-Za-z_][A-Za-z0-9_]*)[ \t]*(?:\?|:|::|\+|!)?=`)
	makeRefRE    = regexp.MustCompile(`\$[({]([A-Za-z_][A-Za-z0-9_]*)[)}]`)
)

// parseMakefile returns the targets and variables of a Makefile.
func parseMakefile(src string) *makeInfo {
	mi := &makeInfo{targets: map[string]bool{}, vars: map[string]bool{}}
	for _, m := range makeRuleRE.FindAllStringSubmatch(src, -1) {
		for _, t := range strings.Fields(m[1]) {
			if !strings.HasPrefix(t, ".") {
				mi.targets[t] = true
			}
		}
	}
	for _, m := range makeAssignRE.FindAllStringSubmatch(src, -1) {
		mi.vars[m[1]] = true
	}
	for _, m := range makeRefRE.FindAllStringSubmatch(src, -1) {
		mi.vars[m[1]] = true
	}
	return mi
}

var toolsRE = regexp.MustCompile(`(?m)^\s+"([a-z0-9-]+)\s+\S+\s+\$\{[A-Z_]+\}"`)

// parseTools returns the names of the tools scripts/tools.sh installs.
func parseTools(src string) map[string]bool {
	tools := map[string]bool{}
	for _, m := range toolsRE.FindAllStringSubmatch(src, -1) {
		tools[m[1]] = true
	}
	return tools
}

// checker checks README commands against what the repository really has.
type checker struct {
	cli   *cliInfo
	make  *makeInfo
	tools map[string]bool // what scripts/tools.sh installs into .bin/
	// fileExists reports whether a path relative to the repository root
	// exists.
	fileExists func(string) bool
}

// otherCommands are the programs besides kvgate, make, grpcurl and the
// repository's scripts that an example may call: ones every user has.
var otherCommands = map[string]bool{
	"cat": true, "cd": true, "cp": true, "curl": true, "echo": true, "export": true,
	"git": true, "go": true, "grep": true, "head": true, "jq": true, "kill": true,
	"ls": true, "mkdir": true, "openssl": true, "pidof": true, "printf": true,
	"sleep": true, "tail": true, "wait": true,
}

// grpcurlValueFlags are grpcurl's flags that take a value (grpcurl -help).
var grpcurlValueFlags = map[string]bool{
	"H": true, "alts-handshaker-service": true, "alts-target-service-account": true,
	"authority": true, "cacert": true, "cert": true, "connect-timeout": true, "d": true,
	"format": true, "import-path": true, "keepalive-time": true, "key": true,
	"max-msg-sz": true, "max-time": true, "proto": true, "proto-out-dir": true,
	"protoset": true, "protoset-out": true, "reflect-header": true, "rpc-header": true,
	"servername": true, "user-agent": true,
}

// grpcurlBoolFlags are grpcurl's boolean flags (grpcurl -help).
var grpcurlBoolFlags = []string{"allow-unknown-fields", "alts", "emit-defaults", "expand-headers",
	"format-error", "help", "insecure", "msg-template", "plaintext", "unix", "use-reflection", "v", "version", "vv"}

// flagUse is one flag on a command line.
type flagUse struct {
	name, value string
	hasValue    bool
}

// parseGoFlags splits args the way Go's flag package does: flags (-x or
// --x, with =value or, for a flag that takes one, the next argument) up to
// the first other argument or "--". flags maps each known flag to whether it
// takes a value; unknown flags are reported.
func parseGoFlags(args []string, flags map[string]bool) (uses []flagUse, positional []string, problems []string) {
	i := 0
	for ; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			i++
			break
		}
		if len(a) < 2 || a[0] != '-' {
			break
		}
		name := strings.TrimPrefix(strings.TrimPrefix(a, "-"), "-")
		u := flagUse{name: name}
		if k := strings.IndexByte(name, '='); k >= 0 {
			u.name, u.value, u.hasValue = name[:k], name[k+1:], true
		}
		takes, ok := flags[u.name]
		if !ok {
			problems = append(problems, fmt.Sprintf("unknown flag %s", a))
			if !u.hasValue && i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") {
				i++ // most likely its value, not the first argument
			}
			continue
		}
		if takes && !u.hasValue {
			if i+1 >= len(args) {
				problems = append(problems, fmt.Sprintf("flag %s needs a value", a))
				continue
			}
			i++
			u.value, u.hasValue = args[i], true
		}
		uses = append(uses, u)
	}
	positional = args[i:]
	for _, a := range positional {
		if len(a) > 1 && a[0] == '-' && !strings.Contains(a, " ") {
			problems = append(problems, fmt.Sprintf("%s comes after the argument %q: Go's flag package stops at the first argument, so it would not be read as a flag", a, positional[0]))
		}
	}
	return uses, positional, problems
}

// isKvgate reports whether a command word runs the repository's kvgate.
func isKvgate(w string) bool { return w == ".bin/kvgate" || w == "./.bin/kvgate" }

// isGrpcurl reports whether a command word runs the pinned grpcurl.
func isGrpcurl(w string) bool { return w == ".bin/grpcurl" || w == "./.bin/grpcurl" }

// checkCommand returns what is wrong with one command of an example.
func (ck *checker) checkCommand(c shellCmd) []string {
	var probs []string
	for _, w := range append(append([]string{}, c.env...), c.args...) {
		if strings.Contains(w, "../shared") {
			probs = append(probs, fmt.Sprintf("%q: ../shared is this workplace's folder, not a user's", w))
		}
	}
	if len(c.args) == 0 {
		return probs
	}
	name := c.args[0]
	switch {
	case name == "kvgate":
		probs = append(probs, "bare kvgate is not on PATH: use .bin/kvgate (make build puts it there)")
	case isKvgate(name):
		probs = append(probs, ck.checkKvgate(c.env, c.args[1:])...)
	case isGrpcurl(name):
		_, p := ck.parseGrpcurl(c.args[1:])
		probs = append(probs, p...)
	case ck.tools[name]:
		probs = append(probs, fmt.Sprintf("bare %s is not on PATH: use .bin/%s (scripts/tools.sh installs it there)", name, name))
	case strings.HasPrefix(name, ".bin/") || strings.HasPrefix(name, "./.bin/"):
		if t := filepath.Base(name); !ck.tools[t] {
			probs = append(probs, fmt.Sprintf("%s: scripts/tools.sh installs no %s", name, t))
		}
	case name == "make":
		probs = append(probs, ck.checkMake(c.args[1:])...)
	case strings.Contains(name, "/"):
		if !ck.fileExists(strings.TrimPrefix(name, "./")) {
			probs = append(probs, fmt.Sprintf("%s: no such file in the repository", name))
		}
	case !otherCommands[name]:
		probs = append(probs, fmt.Sprintf("unknown command %q (if every user has it, add it to otherCommands in readme_test.go)", name))
	}
	return probs
}

// checkKvgate checks the arguments of .bin/kvgate and the environment
// variables set for it.
func (ck *checker) checkKvgate(env, args []string) []string {
	if len(args) == 0 {
		return []string{"kvgate without a command"}
	}
	sub := args[0]
	if strings.HasPrefix(sub, "-") {
		if !ck.cli.topLevel[sub] {
			return []string{fmt.Sprintf("kvgate %s: not accepted in a command's place", sub)}
		}
		return nil
	}
	flags, ok := ck.cli.commands[sub]
	if !ok {
		return []string{fmt.Sprintf("kvgate has no command %q", sub)}
	}
	var probs []string
	for _, e := range env {
		k := e[:strings.IndexByte(e, '=')]
		if !strings.HasPrefix(k, "KVGATE_") {
			continue
		}
		flag := strings.ReplaceAll(strings.ToLower(strings.TrimPrefix(k, "KVGATE_")), "_", "-")
		if _, isFlag := flags[flag]; sub == "serve" && isFlag {
			continue // serve reads every flag from KVGATE_FLAG_NAME
		}
		if strings.Contains(ck.cli.help[sub], k) {
			continue
		}
		probs = append(probs, fmt.Sprintf("%s: kvgate %s reads no such variable (neither a serve flag nor named in its -h)", k, sub))
	}
	uses, _, p := parseGoFlags(args[1:], flags)
	probs = append(probs, p...)
	for _, u := range uses {
		if strings.HasSuffix(u.name, "listen") && u.hasValue {
			if host, _, err := net.SplitHostPort(u.value); err == nil && (host == "" || host == "0.0.0.0" || host == "::") {
				probs = append(probs, fmt.Sprintf("--%s %s binds all interfaces: bind 127.0.0.1 (or localhost) in an example", u.name, u.value))
			}
		}
	}
	return probs
}

// checkMake checks the arguments of make: targets and VAR=value overrides;
// ARGS of make serve is checked as kvgate serve's flags.
func (ck *checker) checkMake(args []string) []string {
	var probs []string
	var targets []string
	vars := map[string]string{}
	for _, a := range args {
		switch {
		case strings.HasPrefix(a, "-"):
		case assignRE.MatchString(a):
			k := a[:strings.IndexByte(a, '=')]
			vars[k] = a[len(k)+1:]
			if !ck.make.vars[k] {
				probs = append(probs, fmt.Sprintf("make %s: the Makefile uses no variable %s", a, k))
			}
		default:
			targets = append(targets, a)
			if !ck.make.targets[a] {
				probs = append(probs, fmt.Sprintf("the Makefile has no target %q", a))
			}
		}
	}
	if v, ok := vars["ARGS"]; ok {
		words, err := parseShell(v, 0)
		switch {
		case err != nil:
			probs = append(probs, fmt.Sprintf("ARGS=%q: %v", v, err))
		case len(words) != 1:
			probs = append(probs, fmt.Sprintf("ARGS=%q is not one list of flags", v))
		default:
			for _, t := range targets {
				if t == "serve" {
					probs = append(probs, ck.checkKvgate(nil, append([]string{"serve"}, words[0].args...))...)
				}
			}
		}
	}
	return probs
}

// grpcurlCall is a parsed grpcurl command line.
type grpcurlCall struct {
	plaintext bool
	headers   bool   // sends -H / -rpc-header metadata
	addr      string // the server address
	verb      string // list, describe, or "" for a call
	symbol    string // what list/describe name, or the method called (pkg.Service/Method)
}

// parseGrpcurl parses grpcurl's arguments.
func (ck *checker) parseGrpcurl(args []string) (grpcurlCall, []string) {
	var call grpcurlCall
	flags := map[string]bool{}
	for _, f := range grpcurlBoolFlags {
		flags[f] = false
	}
	for k := range grpcurlValueFlags {
		flags[k] = true
	}
	uses, pos, probs := parseGoFlags(args, flags)
	for _, u := range uses {
		switch u.name {
		case "plaintext":
			call.plaintext = u.value != "false"
		case "H", "rpc-header", "reflect-header":
			call.headers = true
		}
	}
	if len(pos) == 0 {
		return call, append(probs, "grpcurl without a server address")
	}
	call.addr = pos[0]
	switch {
	case len(pos) == 1:
		probs = append(probs, "grpcurl with an address but no verb or method")
	case pos[1] == "list" || pos[1] == "describe":
		call.verb = pos[1]
		if len(pos) > 2 {
			call.symbol = pos[2]
		}
	case strings.Contains(pos[1], "/") || strings.Count(pos[1], ".") >= 2:
		call.symbol = pos[1]
	default:
		probs = append(probs, fmt.Sprintf("grpcurl %s: neither list, describe nor a Service/Method", pos[1]))
	}
	return call, probs
}

// serverPorts returns the gRPC and metrics ports a kvgate serve or make
// serve command listens on, or ok false for another command.
func (ck *checker) serverPorts(c shellCmd) (ports []string, ok bool) {
	var args []string
	switch {
	case len(c.args) >= 2 && isKvgate(c.args[0]) && c.args[1] == "serve":
		args = c.args[2:]
	case len(c.args) >= 2 && c.args[0] == "make":
		serve := false
		for _, a := range c.args[1:] {
			if a == "serve" {
				serve = true
			}
			if strings.HasPrefix(a, "ARGS=") {
				if w, err := parseShell(a[len("ARGS="):], 0); err == nil && len(w) == 1 {
					args = w[0].args
				}
			}
		}
		if !serve {
			return nil, false
		}
	default:
		return nil, false
	}
	grpcPort := quickStartPort
	uses, _, _ := parseGoFlags(args, ck.cli.commands["serve"])
	for _, u := range uses {
		if !strings.HasSuffix(u.name, "listen") || !u.hasValue {
			continue
		}
		_, port, err := net.SplitHostPort(u.value)
		if err != nil {
			continue
		}
		if u.name == "listen" {
			grpcPort = port
		} else {
			ports = append(ports, port)
		}
	}
	return append(ports, grpcPort), true
}

// checkBlock checks what concerns the commands of one block together:
// servers started side by side (two or more in the background, with &) must
// not share a port, nor take the quick-start server's. Servers run in the
// foreground are alternatives, one at a time.
func (ck *checker) checkBlock(cmds []shellCmd) []problem {
	type srv struct {
		c     shellCmd
		ports []string
	}
	var servers []srv
	for _, c := range cmds {
		if ports, ok := ck.serverPorts(c); ok && c.background {
			servers = append(servers, srv{c, ports})
		}
	}
	if len(servers) < 2 {
		return nil
	}
	var probs []problem
	seen := map[string]bool{}
	for _, s := range servers {
		for _, p := range s.ports {
			switch {
			case p == "0": // a free port: never a clash
			case p == quickStartPort:
				probs = append(probs, problem{s.c.line, fmt.Sprintf("%s: port %s is the quick-start server's; servers started side by side need other ports", s.c, p)})
			case seen[p]:
				probs = append(probs, problem{s.c.line, fmt.Sprintf("%s: port %s is taken by another server of the same example", s.c, p)})
			}
			seen[p] = true
		}
	}
	return probs
}

// checkMarkdown parses every code block of a README and checks it. It
// returns the problems and the shell commands, for the tests that run them.
func (ck *checker) checkMarkdown(src string) ([]shellCmd, []problem) {
	var probs []problem
	for i, line := range strings.Split(src, "\n") {
		if strings.Contains(line, "../shared") {
			probs = append(probs, problem{i + 1, "../shared is this workplace's folder: a user has no such path"})
		}
	}
	blocks, err := markdownBlocks(src)
	if err != nil {
		return nil, append(probs, problem{0, err.Error()})
	}
	var all []shellCmd
	for _, b := range blocks {
		var cmds []shellCmd
		var err error
		switch b.lang {
		case "sh", "bash", "shell", "zsh":
			for j, line := range b.lines {
				if strings.HasPrefix(line, "$ ") {
					probs = append(probs, problem{b.line + j, "a \"$ \" prompt in a " + b.lang + " block: use a console block for commands with their output"})
				}
			}
			cmds, err = parseShell(strings.Join(b.lines, "\n"), b.line)
		case "console":
			cmds, err = consoleCommands(b)
		case "json":
			if !json.Valid([]byte(strings.Join(b.lines, "\n"))) {
				probs = append(probs, problem{b.line, "the json block is not valid JSON"})
			}
			continue
		case "":
			probs = append(probs, problem{b.line - 1, "a code block without a language: tag it (sh, console, go, text, ...) so its kind is checked"})
			continue
		default:
			continue
		}
		if err != nil {
			probs = append(probs, problem{b.line, fmt.Sprintf("cannot parse the %s block: %v", b.lang, err)})
			continue
		}
		for _, c := range cmds {
			for _, p := range ck.checkCommand(c) {
				probs = append(probs, problem{c.line, fmt.Sprintf("%s: %s", c, p)})
			}
		}
		probs = append(probs, ck.checkBlock(cmds)...)
		all = append(all, cmds...)
	}
	return all, probs
}

// repoChecker returns a checker of the real repository and kvgate binary.
func repoChecker(t *testing.T) *checker {
	t.Helper()
	cli, err := loadCLI(kvgateBin)
	if err != nil {
		t.Fatal(err)
	}
	mk, err := os.ReadFile("../../Makefile")
	if err != nil {
		t.Fatal(err)
	}
	tools, err := os.ReadFile("../../scripts/tools.sh")
	if err != nil {
		t.Fatal(err)
	}
	ck := &checker{
		cli:   cli,
		make:  parseMakefile(string(mk)),
		tools: parseTools(string(tools)),
		fileExists: func(p string) bool {
			_, err := os.Stat(filepath.Join("../..", p))
			return err == nil
		},
	}
	if !ck.make.targets["serve"] || !ck.tools["grpcurl"] {
		t.Fatalf("the Makefile or scripts/tools.sh did not parse: targets %v, tools %v", ck.make.targets, ck.tools)
	}
	return ck
}

// TestREADME checks every shell example in README.md and runs the cheap
// ones against a real server (see the comment at the top of this file).
func TestREADME(t *testing.T) {
	src, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	ck := repoChecker(t)
	cmds, probs := ck.checkMarkdown(string(src))
	for _, p := range probs {
		t.Error(p)
	}
	if len(cmds) == 0 {
		t.Fatal("no shell commands found in README.md")
	}

	// Everything below runs commands; one server answers them all, with
	// both a generation and an embedding model (issue 14). --chat-template
	// chatml: the README's conversation examples assume it, since the
	// default model has no template of its own.
	s := startServer(t, "--model", testModel(t, "stories260K.gguf"), "--chat-template", "chatml", "--embedding-model", testModel(t, "all-MiniLM-L6-v2-Q4_K_M.gguf"))
	services := reflectionServices(t, s)
	for _, c := range cmds {
		c := c
		if len(c.args) == 0 {
			continue
		}
		switch {
		case isKvgate(c.args[0]):
			if args, why := runnableKvgate(ck, c, s.addr); why == "" {
				t.Run(fmt.Sprintf("line%d", c.line), func(t *testing.T) { runKvgate(t, c, args) })
			} else {
				t.Logf("README.md:%d: not run (%s): %s", c.line, why, c)
			}
		case isGrpcurl(c.args[0]):
			t.Run(fmt.Sprintf("line%d", c.line), func(t *testing.T) { checkGrpcurl(t, ck, s, services, c) })
		}
	}
}

// runnableKvgate returns the arguments to run a kvgate command of the
// README with against the test server at addr, or why it is not run.
func runnableKvgate(ck *checker, c shellCmd, addr string) ([]string, string) {
	args := append([]string{}, c.args[1:]...)
	if len(args) == 0 || len(c.env) > 0 {
		return nil, "it sets environment variables"
	}
	for _, a := range args {
		if strings.Contains(a, "$") {
			return nil, "it uses shell variables"
		}
	}
	sub := args[0]
	if ck.cli.topLevel[sub] || sub == "version" {
		return args, ""
	}
	flags := ck.cli.commands[sub]
	uses, _, _ := parseGoFlags(args[1:], flags)
	for _, u := range uses {
		if u.name == "h" || u.name == "help" {
			return args, ""
		}
	}
	if sub == "mkmodel" {
		return args, ""
	}
	if _, client := flags["addr"]; !client {
		return nil, "it is not a client command: flags checked only"
	}
	if sub == "bench" {
		return nil, "it drives load: flags checked only"
	}
	hasAddr := false
	for _, u := range uses {
		switch {
		case u.name == "watch":
			return nil, "it watches until interrupted"
		case strings.HasPrefix(u.name, "tls") || u.name == "token" || u.name == "service-config":
			return nil, "it needs TLS, a token or a service config"
		case u.name == "addr":
			if u.value != defaultAddr {
				return nil, "it names another server"
			}
			hasAddr = true
		}
	}
	for i, a := range args {
		if a == defaultAddr {
			args[i] = addr
		}
		if a == "--addr="+defaultAddr || a == "-addr="+defaultAddr {
			args[i] = "--addr=" + addr
		}
	}
	if !hasAddr {
		args = append([]string{sub, "--addr", addr}, args[1:]...)
	}
	return args, ""
}

// runKvgate runs a kvgate command of the README in a temporary directory
// and demands exit status 0, and that a file it writes with -o exists.
func runKvgate(t *testing.T, c shellCmd, args []string) {
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, kvgateBin, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "KVGATE_CACHE_DIR="+t.TempDir())
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("README.md:%d: %s: %v\n%s", c.line, c, err, out)
	}
	if len(strings.TrimSpace(string(out))) == 0 && args[0] != "mkmodel" {
		t.Errorf("README.md:%d: %s printed nothing", c.line, c)
	}
	for i, a := range args {
		if (a == "-o" || a == "--o") && i+1 < len(args) {
			if _, err := os.Stat(filepath.Join(dir, args[i+1])); err != nil {
				t.Errorf("README.md:%d: %s did not write %s: %v", c.line, c, args[i+1], err)
			}
		}
	}
}

// reflectionServices lists the services of the server through its
// reflection service.
func reflectionServices(t *testing.T, s *server) map[string]bool {
	t.Helper()
	resps := reflectCall(t, s, &reflectionpb.ServerReflectionRequest{
		MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{ListServices: ""},
	})
	services := map[string]bool{}
	for _, svc := range resps.GetListServicesResponse().GetService() {
		services[svc.GetName()] = true
	}
	if len(services) == 0 {
		t.Fatalf("reflection listed no services: %v", resps)
	}
	return services
}

// reflectCall sends one request to the server's reflection service.
func reflectCall(t *testing.T, s *server, req *reflectionpb.ServerReflectionRequest) *reflectionpb.ServerReflectionResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stream, err := reflectionpb.NewServerReflectionClient(s.conn).ServerReflectionInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(req); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	_ = stream.CloseSend()
	return resp
}

// checkGrpcurl checks that what a grpcurl command of the README names
// exists on the server, then runs it with grpcurl, when it is installed and
// the command is a plaintext one to the default address, and compares the
// output shown in a console block with the real one.
func checkGrpcurl(t *testing.T, ck *checker, s *server, services map[string]bool, c shellCmd) {
	call, probs := ck.parseGrpcurl(c.args[1:])
	if len(probs) > 0 {
		t.Fatalf("README.md:%d: %v", c.line, probs) // reported by the static check too
	}
	if call.symbol != "" {
		symbol := strings.ReplaceAll(call.symbol, "/", ".")
		if call.verb == "list" && !services[symbol] {
			t.Errorf("README.md:%d: %s: the server has no service %s (it has %v)", c.line, c, symbol, services)
		}
		resp := reflectCall(t, s, &reflectionpb.ServerReflectionRequest{
			MessageRequest: &reflectionpb.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: symbol},
		})
		if e := resp.GetErrorResponse(); e != nil {
			t.Errorf("README.md:%d: %s: the server's reflection does not know %s: %s", c.line, c, symbol, e.GetErrorMessage())
		}
	}
	if !call.plaintext || call.headers || call.addr != defaultAddr {
		t.Logf("README.md:%d: not run (not a plaintext call to %s without headers): %s", c.line, defaultAddr, c)
		return
	}
	grpcurl := grpcurlPath(t)
	args := append([]string{}, c.args[1:]...)
	for i, a := range args {
		if a == defaultAddr {
			args[i] = s.addr
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, grpcurl, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("README.md:%d: %s: %v\n%s", c.line, c, err, out)
	}
	if len(c.output) == 0 {
		return
	}
	if call.verb == "list" {
		if got, want := sortedLines(string(out)), sortedLines(strings.Join(c.output, "\n")); !equalStrings(got, want) {
			t.Errorf("README.md:%d: %s shows\n%s\nbut the server lists\n%s", c.line, c, strings.Join(want, "\n"), strings.Join(got, "\n"))
		}
		return
	}
	if err := compareJSONOutput(c.output, string(out)); err != nil {
		t.Errorf("README.md:%d: %s: the output shown does not match the real one: %v\nreal output:\n%s", c.line, c, err, out)
	}
}

func sortedLines(s string) []string {
	var lines []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			lines = append(lines, l)
		}
	}
	sort.Strings(lines)
	return lines
}

func equalStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

var ellipsisObjRE = regexp.MustCompile(`\{\s*\.\.\.\s*\}`)

// compareJSONOutput compares the messages a README shows, one JSON object a
// line ("..." lines and "{ ... }" values elided), with grpcurl's real
// stream of messages: every key shown must exist at the same place in a
// real message of the same kind (its top-level key), every string shown
// outside chunks must equal the real one, and the chunk texts shown must
// begin the real generated text.
func compareJSONOutput(shown []string, real string) error {
	var realMsgs []map[string]any
	dec := json.NewDecoder(strings.NewReader(real))
	for dec.More() {
		var m map[string]any
		if err := dec.Decode(&m); err != nil {
			return fmt.Errorf("decode the real output: %w", err)
		}
		realMsgs = append(realMsgs, m)
	}
	realText := chunkText(realMsgs)
	var shownMsgs []map[string]any
	for _, line := range shown {
		line = strings.TrimSpace(line)
		if line == "" || line == "..." {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(ellipsisObjRE.ReplaceAllString(line, "{}")), &m); err != nil {
			return fmt.Errorf("shown line %q is not a JSON object: %v", line, err)
		}
		shownMsgs = append(shownMsgs, m)
	}
	for _, sm := range shownMsgs {
		for kind, v := range sm {
			var errs []error
			found := false
			for _, rm := range realMsgs {
				if rv, ok := rm[kind]; ok {
					err := matchJSON(kind, v, rv, kind != "chunk")
					if err == nil {
						found = true
						break
					}
					errs = append(errs, err)
				}
			}
			if !found {
				return fmt.Errorf("no real %q message matches the one shown: %v", kind, errors.Join(errs...))
			}
		}
	}
	if shownText := chunkText(shownMsgs); !strings.HasPrefix(realText, shownText) {
		return fmt.Errorf("the text shown %q does not begin the real text %q", shownText, realText)
	}
	return nil
}

// matchJSON checks that every key of shown exists in real at the same
// path, and with strings set, that shown strings equal real ones.
func matchJSON(path string, shown, real any, strs bool) error {
	switch sv := shown.(type) {
	case map[string]any:
		rv, ok := real.(map[string]any)
		if !ok {
			return fmt.Errorf("%s: shown an object, real %T", path, real)
		}
		for k, v := range sv {
			r, ok := rv[k]
			if !ok {
				return fmt.Errorf("%s.%s: shown but not in the real message", path, k)
			}
			if err := matchJSON(path+"."+k, v, r, strs); err != nil {
				return err
			}
		}
	case string:
		if strs && real != sv {
			return fmt.Errorf("%s: shown %q, real %v", path, sv, real)
		}
	}
	return nil
}

// chunkText concatenates the chunk texts of Generate messages.
func chunkText(msgs []map[string]any) string {
	var b strings.Builder
	for _, m := range msgs {
		if c, ok := m["chunk"].(map[string]any); ok {
			s, _ := c["text"].(string)
			b.WriteString(s)
		}
	}
	return b.String()
}

// fakeChecker is a checker over a made-up CLI and Makefile, for the tests
// of the checker itself.
func fakeChecker() *checker {
	return &checker{
		cli: &cliInfo{
			commands: map[string]map[string]bool{
				"serve":    parseFlagHelp("  -listen string\n    \taddr\n  -metrics-listen string\n  -ctx int\n  -prefix-cache\n    \tbool\n  -model string\n"),
				"generate": parseFlagHelp("  -addr string\n  -max-tokens uint\n  -v\tverbose\n"),
				"mkmodel":  parseFlagHelp("  -o string\n  -vocab string\n  -preset string\n"),
				"version":  parseFlagHelp("kvgate (devel)\n"),
			},
			help:     map[string]string{"generate": "reads KVGATE_TOKEN"},
			topLevel: map[string]bool{"--version": true},
		},
		make:       parseMakefile("ARGS ?=\nbuild:\n\tgo build\nserve: build\n\tkvgate serve $(ARGS)\ntest: build\n"),
		tools:      map[string]bool{"grpcurl": true, "buf": true},
		fileExists: func(p string) bool { return p == "scripts/soak.sh" },
	}
}

// TestREADMEChecker shows that the checker fails bad examples and passes
// good ones.
func TestREADMEChecker(t *testing.T) {
	ck := fakeChecker()
	for _, tc := range []struct {
		src  string
		want string // a substring of the problems; "" for none
	}{
		{"```sh\nkvgate serve\n```", "bare kvgate"},
		{"```sh\n.bin/kvgate serve --nosuch 1\n```", "unknown flag --nosuch"},
		{"```sh\n.bin/kvgate serve --ctx\n```", "needs a value"},
		{"```sh\n.bin/kvgate frobnicate\n```", `no command "frobnicate"`},
		{"```sh\n.bin/kvgate mkmodel --vocab ../shared/models/v.gguf -o m.gguf\n```", "../shared"},
		{"```sh\n.bin/kvgate serve --listen :50052\n```", "binds all interfaces"},
		{"```sh\n.bin/kvgate serve --listen=0.0.0.0:50052\n```", "binds all interfaces"},
		{"```sh\n.bin/kvgate generate \"hi\" --max-tokens 5\n```", "after the argument"},
		{"```sh\nKVGATE_NOSUCH=1 .bin/kvgate serve\n```", "KVGATE_NOSUCH"},
		{"```sh\nKVGATE_NOSUCH=1 .bin/kvgate generate hi\n```", "KVGATE_NOSUCH"},
		{"```sh\n.bin/kvgate version --json\n```", "unknown flag --json"},
		{"```sh\nmake nosuch\n```", `no target "nosuch"`},
		{"```sh\nmake serve ARGS=\"--bogus\"\n```", "unknown flag --bogus"},
		{"```sh\nmake serve NOSUCHVAR=1\n```", "no variable NOSUCHVAR"},
		{"```sh\nfrob --x\n```", `unknown command "frob"`},
		{"```sh\ngrpcurl -plaintext localhost:50051 list\n```", "bare grpcurl"},
		{"```sh\n.bin/grpcurl -plaintext localhost:50051\n```", "no verb or method"},
		{"```sh\nscripts/nosuch.sh\n```", "no such file"},
		{"```sh\nfor i in 0 1 2; do .bin/kvgate serve --listen 127.0.0.1:5005$i & done\n```", "quick-start server's"},
		{"```sh\n.bin/kvgate serve --listen 127.0.0.1:6000 --metrics-listen 127.0.0.1:9090 &\n.bin/kvgate serve --listen 127.0.0.1:6001 --metrics-listen 127.0.0.1:9090 &\n```", "port 9090 is taken"},
		{"```sh\n$ .bin/kvgate version\n```", "prompt in a sh block"},
		{"```\n.bin/kvgate version\n```", "without a language"},
		{"```json\n{\"a\": 1,}\n```", "not valid JSON"},
		{"```sh\n.bin/kvgate serve \\\n    --nosuch 1\n```", "unknown flag --nosuch"},
		{"```sh\necho $(kvgate version)\n```", "bare kvgate"},
		{"```sh\n.bin/kvgate serve 'unclosed\n```", "cannot parse"},
		{"```sh\n.bin/kvgate serve --ctx 8192 --prefix-cache=false --model ./m.gguf   # a comment --nosuch\n```", ""},
		{"```sh\nKVGATE_CTX=64 .bin/kvgate serve 2>/dev/null\nKVGATE_TOKEN=x .bin/kvgate generate -v \"a b\"\n```", ""},
		{"```sh\nmake serve ARGS=\"--ctx 8192\"\nmake test\nkill -HUP $(pidof kvgate)\nscripts/soak.sh\n.bin/kvgate --version\n```", ""},
		{"```sh\nfor i in 0 1; do .bin/kvgate serve --listen 127.0.0.1:5006$i --metrics-listen 127.0.0.1:909$i & done\n```", ""},
		{"```sh\n.bin/kvgate serve --ctx 8192\n.bin/kvgate serve --model m.gguf\n```", ""},
		{"```console\n$ .bin/grpcurl -plaintext -d '{\"a\": 1}' \\\n    localhost:50051 kvgate.v1.GenerateService/Generate\n{ \"started\": {} }\n```", ""},
	} {
		_, probs := ck.checkMarkdown(tc.src)
		var msgs []string
		for _, p := range probs {
			msgs = append(msgs, p.String())
		}
		all := strings.Join(msgs, "\n")
		switch {
		case tc.want == "" && len(probs) > 0:
			t.Errorf("%q: want no problems, got:\n%s", tc.src, all)
		case tc.want != "" && !strings.Contains(all, tc.want):
			t.Errorf("%q: want a problem with %q, got:\n%s", tc.src, tc.want, all)
		}
	}
}

// TestParseShell checks the shell parser on the constructs the README uses.
func TestParseShell(t *testing.T) {
	src := "KVGATE_X=1 .bin/kvgate serve --a \"b c\" \\\n    --d 'e f' # comment\n" +
		"for i in 0 1; do .bin/kvgate serve --listen 127.0.0.1:5006$i & done\n" +
		"kill -HUP $(pidof kvgate) 2>&1 | tee log\n"
	cmds, err := parseShell(src, 10)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, c := range cmds {
		got = append(got, fmt.Sprintf("%d:%q%q", c.line, c.env, c.args))
	}
	want := []string{
		`10:["KVGATE_X=1"][".bin/kvgate" "serve" "--a" "b c" "--d" "e f"]`,
		`12:[][".bin/kvgate" "serve" "--listen" "127.0.0.1:50060"]`,
		`12:[][".bin/kvgate" "serve" "--listen" "127.0.0.1:50061"]`,
		`13:[]["kill" "-HUP" "$(pidof kvgate)"]`,
		`13:[]["tee" "log"]`,
		`13:[]["pidof" "kvgate"]`,
	}
	if !equalStrings(got, want) {
		t.Errorf("parseShell:\ngot  %s\nwant %s", strings.Join(got, "\n     "), strings.Join(want, "\n     "))
	}
}

// TestCompareJSONOutput checks the comparison of shown and real grpcurl
// output, which must fail on a wrong key, string or text.
func TestCompareJSONOutput(t *testing.T) {
	real := `{"started": {"promptTokens": 5}}
{"chunk": {"text": ",", "tokenIds": [432]}}
{"chunk": {"text": " there"}}
{"finished": {"reason": "FINISH_REASON_LENGTH", "timings": {"decodeMs": 1}}}`
	for _, tc := range []struct {
		shown []string
		ok    bool
	}{
		{[]string{`{ "started": { "promptTokens": 7 } }`, `{ "chunk": { "text": "," } }`, "...", `{ "finished": { "reason": "FINISH_REASON_LENGTH", "timings": { ... } } }`}, true},
		{[]string{`{ "started": { "promptTokenz": 5 } }`}, false},
		{[]string{`{ "finished": { "reason": "FINISH_REASON_STOP" } }`}, false},
		{[]string{`{ "chunk": { "text": " there" } }`}, false},
		{[]string{`not json`}, false},
	} {
		err := compareJSONOutput(tc.shown, real)
		if (err == nil) != tc.ok {
			t.Errorf("%q: err %v, want ok %v", tc.shown, err, tc.ok)
		}
	}
}
