// Command kvgate is a gRPC text-generation server for GGUF models, built on
// llama.cpp, whose KV-cell allocator answers overload with status codes
// instead of failed decodes. It also carries the client commands used to try
// and measure it.
//
// Usage:
//
//	kvgate serve     [flags]         run the server
//	kvgate generate  [flags] PROMPT  stream a completion from a server
//	kvgate tokenize  [flags] TEXT    show a text's token ids
//	kvgate detokenize [flags] ID...  show the text of token ids
//	kvgate info      [flags]         show the model and the server's limits
//	kvgate stats     [flags]         show the KV-cell allocator's state and counters
//	kvgate health    [flags]         show a service's grpc.health.v1 status
//	kvgate bench     [flags]         drive a server with load and report on it
//	kvgate mkmodel   [flags]         write a random-weight llama GGUF model
//	kvgate version                   show kvgate's, llama.cpp's and Go's versions
//
// Run "kvgate COMMAND -h" for a command's flags. Every serve flag can also be
// set through an environment variable named KVGATE_ plus the flag's name in
// upper case, with dashes as underscores (for example KVGATE_MAX_QUEUE). The
// client commands read only their own variables (KVGATE_ADDR, KVGATE_TOKEN,
// KVGATE_TLS_CA, KVGATE_TLS_SERVER_NAME, KVGATE_CLIENT_CERT,
// KVGATE_CLIENT_KEY and KVGATE_SERVICE_CONFIG), none of them a serve
// variable, so a server's environment does not change a client's flags.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	os.Exit(run(os.Args[1:]))
}

const usage = `kvgate serves text generation from GGUF models over gRPC.

Usage:
  kvgate serve     [flags]          run the server (default model: stories260K)
  kvgate generate  [flags] PROMPT   stream a completion from a running server
  kvgate tokenize  [flags] TEXT     show the token ids of a text
  kvgate detokenize [flags] ID...   show the text of token ids (- reads them from stdin)
  kvgate info      [flags]          show the model and the server's limits (GetModelInfo)
  kvgate stats     [flags]          show the KV-cell allocator's state and counters (GetCacheStats)
  kvgate health    [flags]          show a service's health status; exit 0 only when SERVING
  kvgate bench     [flags]          drive a running server with load and report throughput and latency
  kvgate mkmodel   [flags]          write a random-weight llama GGUF model of realistic shape
  kvgate version                    show the versions of kvgate, llama.cpp and Go, and the CPU features

Run "kvgate COMMAND -h" for the flags of a command. The client commands take
--addr as host:port, a comma-separated list of replicas, or a gRPC target
(dns:///name:port), and --service-config FILE; they read only the KVGATE_
variables their help lists.
`

func run(args []string) int {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, usage)
		return 2
	}
	ctx, stop := notifyInterrupts()
	defer stop()
	var err error
	switch args[0] {
	case "serve":
		err = serve(ctx, args[1:])
	case "generate":
		err = generate(ctx, args[1:])
	case "tokenize":
		err = tokenize(ctx, args[1:])
	case "detokenize":
		err = detokenize(ctx, args[1:])
	case "info":
		err = infoCmd(ctx, args[1:])
	case "stats":
		err = statsCmd(ctx, args[1:])
	case "health":
		err = healthCmd(ctx, args[1:])
	case "bench":
		err = benchCmd(ctx, args[1:])
	case "mkmodel":
		err = mkmodel(ctx, args[1:])
	case "version", "-version", "--version":
		printVersion(os.Stdout)
		return 0
	case "-h", "-help", "--help", "help":
		fmt.Fprint(os.Stdout, usage)
		return 0
	default:
		fmt.Fprintf(os.Stderr, "kvgate: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		return 2
	}
	fmt.Fprintf(os.Stderr, "kvgate %s: %v\n", args[0], err)
	return 1
}

// hardStopKey is the context key of the channel closed on a second
// interrupt.
type hardStopKey struct{}

// notifyInterrupts returns a context cancelled by the first SIGINT or
// SIGTERM, and a stop function that restores the default handling. A second
// signal closes the channel that hardStop returns: a command that would keep
// working after the first (serve, draining its streams) stops at once on it.
// The handlers are installed before any slow step, such as loading a model.
func notifyInterrupts() (context.Context, func()) {
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	second := make(chan struct{})
	ctx, cancel := context.WithCancel(context.WithValue(context.Background(), hardStopKey{}, (<-chan struct{})(second)))
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		select {
		case <-sigs:
			cancel()
		case <-done:
			return
		}
		select {
		case <-sigs:
			close(second)
		case <-done:
		}
	}()
	return ctx, func() {
		signal.Stop(sigs)
		close(done)
		<-finished
		cancel()
	}
}

// hardStop returns the channel closed by a second interrupt, or nil (which
// never fires) outside notifyInterrupts.
func hardStop(ctx context.Context) <-chan struct{} {
	ch, _ := ctx.Value(hardStopKey{}).(<-chan struct{})
	return ch
}

// errUsage marks an error already reported by the flag package.
var errUsage = errors.New("usage")

// envName returns the environment variable that sets a flag.
func envName(flagName string) string {
	return "KVGATE_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// applyEnv sets every flag of fs not given on the command line from its
// KVGATE_* variable. Command-line flags win.
func applyEnv(fs *flag.FlagSet) error {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if set[f.Name] || err != nil {
			return
		}
		if v, ok := os.LookupEnv(envName(f.Name)); ok {
			if e := fs.Set(f.Name, v); e != nil {
				err = fmt.Errorf("%s=%q: %w", envName(f.Name), v, e)
			}
		}
	})
	return err
}

// parseFlags parses args, then the environment.
func parseFlags(fs *flag.FlagSet, args []string) error {
	fs.SetOutput(os.Stderr)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	return applyEnv(fs)
}

// parseClientFlags parses the args of a client command, then sets each flag
// not given on the command line from its variable in clientEnv, if that is
// set and not empty. Unlike parseFlags it reads no other variable, so a
// server's KVGATE_TLS_CERT or KVGATE_TIMEOUT does not reach a client.
func parseClientFlags(fs *flag.FlagSet, args []string) error {
	fs.SetOutput(os.Stderr)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	for _, v := range clientEnv {
		val := os.Getenv(v.name)
		if set[v.flag] || val == "" || fs.Lookup(v.flag) == nil {
			continue
		}
		if err := fs.Set(v.flag, val); err != nil {
			return fmt.Errorf("%s=%q: %w", v.name, val, err)
		}
	}
	return nil
}

// durationMS formats milliseconds for humans.
func durationMS(ms float64) string {
	return (time.Duration(ms * float64(time.Millisecond))).Round(10 * time.Microsecond).String()
}

func itoa(n int) string { return strconv.Itoa(n) }
