package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"time"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/internal/bench"
)

// warmupFlag is --warmup: a duration ("10s") or a request count ("20").
type warmupFlag struct {
	d time.Duration
	n int
}

func (w *warmupFlag) String() string {
	if w.n > 0 {
		return strconv.Itoa(w.n)
	}
	return w.d.String()
}

func (w *warmupFlag) Set(v string) error {
	if n, err := strconv.Atoi(v); err == nil {
		if n < 0 {
			return errors.New("must not be negative")
		}
		*w = warmupFlag{n: n}
		return nil
	}
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 {
		return fmt.Errorf("%q is neither a request count nor a duration", v)
	}
	*w = warmupFlag{d: d}
	return nil
}

const benchUsage = `Usage: kvgate bench [flags]

Drives a running kvgate server with generated load over gRPC and reports
throughput, TTFT / inter-token / end-to-end latency percentiles, goodput,
every status code and the prefill work the server did. Prompts are random
token ids (so input lengths are exact) and every request sets ignore_eos (so
output lengths are exact).

With --llama-server URL it drives llama.cpp's llama-server instead, over
HTTP (POST /completion, streamed, greedy), with the same load, prompts and
report, so that the two servers can be compared. llama-server reports no
admission wait and no counters: the report's queue latencies are empty and
its server counters null. --addr and the other connection flags do not apply
to it (and their environment variables are not read).

Load: --concurrency N closed-loop clients, or --rate R Poisson arrivals per
second (open loop). Sending stops after --duration or --requests, whichever
comes first; outstanding requests are then awaited.

Workloads:
  fixed          --input-tokens in, --output-tokens out
  mixed          lengths drawn from --dist (lognormal: median at the geometric
                 mean of the bounds, bounds two standard deviations out;
                 uniform) in --input-min..--input-max, --output-min..--output-max
  shared-prefix  --input-tokens in, of which the first --prefix-tokens are one
                 of --prefixes common prefixes; --output-tokens out

Flags:
`

func benchCmd(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("kvgate bench", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), benchUsage)
		fs.PrintDefaults()
		fmt.Fprint(fs.Output(), clientEnvHelp)
	}
	cf := addConnFlags(fs)
	llamaServer := fs.String("llama-server", "", "benchmark llama.cpp's llama-server at this base URL (http://host:port) over HTTP instead of kvgate; not with --addr")
	concurrency := fs.Int("concurrency", 1, "closed-loop clients (ignored with --rate)")
	rate := fs.Float64("rate", 0, "open loop: Poisson arrivals per second (0: closed loop)")
	maxInFlight := fs.Int("max-in-flight", 1024, "open loop: most outstanding requests; arrivals beyond are dropped and counted")
	duration := fs.Duration("duration", 0, "send measured requests for this long (default 30s unless --requests is set)")
	requests := fs.Int("requests", 0, "send at most this many measured requests (0: no limit)")
	var warmup warmupFlag
	fs.Var(&warmup, "warmup", "warm-up before the measured window, excluded from the report: a duration (10s) or a request count (20)")
	workload := fs.String("workload", "fixed", "fixed, mixed or shared-prefix")
	inputTokens := fs.Int("input-tokens", 128, "prompt tokens (fixed, shared-prefix)")
	outputTokens := fs.Int("output-tokens", 128, "output tokens (fixed, shared-prefix)")
	dist := fs.String("dist", "lognormal", "mixed: length distribution, lognormal or uniform")
	inputMin := fs.Int("input-min", 32, "mixed: shortest prompt")
	inputMax := fs.Int("input-max", 512, "mixed: longest prompt")
	outputMin := fs.Int("output-min", 16, "mixed: shortest output")
	outputMax := fs.Int("output-max", 256, "mixed: longest output")
	prefixTokens := fs.Int("prefix-tokens", 0, "shared-prefix: tokens of the common prefix (< --input-tokens)")
	prefixes := fs.Int("prefixes", 1, "shared-prefix: distinct common prefixes, used in turn")
	noPrefixCache := fs.Bool("no-prefix-cache", false, "set skip_prefix_cache on every request (to llama-server: cache_prompt false)")
	sloTTFT := fs.Duration("slo-ttft", 0, "goodput: time-to-first-token objective (0: not checked)")
	sloITL := fs.Duration("slo-itl", 0, "goodput: mean inter-token latency objective (0: not checked)")
	timeout := fs.Duration("timeout", 5*time.Minute, "deadline of each request")
	seed := fs.Uint64("seed", 0, "seed of prompts and arrivals (0: random, recorded in the report)")
	jsonOut := fs.Bool("json", false, "print the report as JSON (schema "+bench.Schema+")")
	progress := fs.Bool("progress", false, "print progress to stderr every second (default: when stderr is a terminal)")
	embedFlags := addEmbedBenchFlags(fs) // issue 14
	if err := parseClientFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if *llamaServer != "" {
		given := commandLineFlags(fs, args)
		for _, name := range connFlagNames {
			if given[name] {
				return fmt.Errorf("--llama-server and --%s cannot be used together: --llama-server benchmarks llama-server over HTTP, --%s is for a kvgate server over gRPC", name, name)
			}
		}
	}
	if *duration == 0 && *requests == 0 {
		*duration = 30 * time.Second
	}
	if *embedFlags.on { // issue 14
		return runEmbedBench(ctx, embedFlags, cf, *llamaServer, *concurrency, *duration, warmup, *timeout, *seed, *jsonOut)
	}
	cfg := bench.Config{
		Target:         cf.addr,
		Concurrency:    *concurrency,
		Rate:           *rate,
		MaxInFlight:    *maxInFlight,
		Duration:       *duration,
		Requests:       *requests,
		WarmupDuration: warmup.d,
		WarmupRequests: warmup.n,
		Workload: bench.Workload{
			Kind:         bench.WorkloadKind(*workload),
			InputTokens:  *inputTokens,
			OutputTokens: *outputTokens,
		},
		NoPrefixCache: *noPrefixCache,
		SLOTTFT:       *sloTTFT,
		SLOITL:        *sloITL,
		Timeout:       *timeout,
		Seed:          *seed,
	}
	switch cfg.Workload.Kind {
	case bench.Mixed:
		cfg.Workload = bench.Workload{
			Kind: bench.Mixed, Distribution: bench.Distribution(*dist),
			InputMin: *inputMin, InputMax: *inputMax, OutputMin: *outputMin, OutputMax: *outputMax,
		}
	case bench.SharedPrefix:
		cfg.Workload.PrefixTokens, cfg.Workload.Prefixes = *prefixTokens, *prefixes
	}
	if *progress || isTerminal(os.Stderr) {
		cfg.Progress = os.Stderr
	}
	if err := cfg.Validate(); err != nil {
		return err
	}
	if *llamaServer != "" {
		target, err := bench.NewLlamaServer(*llamaServer, nil)
		if err != nil {
			return err
		}
		cfg.Target = target.String()
		rep, err := bench.RunTarget(ctx, target, cfg)
		if err != nil {
			return err
		}
		return writeReport(rep, *jsonOut)
	}
	list, err := addrList(cf.addr)
	if err != nil {
		return err
	}
	conn, err := dialConn(cf)
	if err != nil {
		return err
	}
	defer conn.Close()
	// The server counters are differences of one server's GetCacheStats:
	// across a list of replicas the two snapshots could come from two of
	// them, so the report then has none.
	cache := kvgatev1.NewCacheServiceClient(conn)
	if len(list) > 1 {
		cache = nil
		fmt.Fprintln(os.Stderr, "kvgate bench: several replicas behind --addr: the report has no server counters")
	}
	rep, err := bench.Run(ctx, kvgatev1.NewGenerateServiceClient(conn), cache, cfg)
	if err != nil {
		return describe(err)
	}
	return writeReport(rep, *jsonOut)
}

// writeReport prints rep to stdout, as JSON or as text, and returns an
// error when the run was interrupted.
func writeReport(rep *bench.Report, jsonOut bool) error {
	var out io.Writer = os.Stdout
	var err error
	if jsonOut {
		err = rep.WriteJSON(out)
	} else {
		err = rep.WriteText(out)
	}
	if err != nil {
		return err
	}
	if rep.Interrupted {
		return errors.New("interrupted: the report is partial")
	}
	return nil
}

// connFlagNames are the flags of addConnFlags, in order: they configure
// the gRPC connection to a kvgate server, so they do not go with
// --llama-server.
var connFlagNames = func() []string {
	fs := flag.NewFlagSet("", flag.ContinueOnError)
	addConnFlags(fs)
	var names []string
	fs.VisitAll(func(f *flag.Flag) { names = append(names, f.Name) })
	return names
}()

// probeValue accepts any value: commandLineFlags parses with it.
type probeValue struct{ isBool bool }

func (probeValue) String() string     { return "" }
func (probeValue) Set(string) error   { return nil }
func (v probeValue) IsBoolFlag() bool { return v.isBool }

// commandLineFlags returns the names of the flags of fs that args give on
// the command line, as fs parses them, without touching fs's values. (Once
// parseClientFlags has run, fs cannot tell them from the flags it set from
// the environment.)
func commandLineFlags(fs *flag.FlagSet, args []string) map[string]bool {
	probe := flag.NewFlagSet(fs.Name(), flag.ContinueOnError)
	probe.SetOutput(io.Discard)
	fs.VisitAll(func(f *flag.Flag) {
		b, ok := f.Value.(interface{ IsBoolFlag() bool })
		probe.Var(probeValue{isBool: ok && b.IsBoolFlag()}, f.Name, "")
	})
	_ = probe.Parse(args) // fs has parsed args already, and reported errors
	given := map[string]bool{}
	probe.Visit(func(f *flag.Flag) { given[f.Name] = true })
	return given
}

// isTerminal reports whether f is a character device, such as a terminal.
func isTerminal(f *os.File) bool {
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}
