package main

import (
	"context"
	"flag"
	"os"
	"time"

	"github.com/kvgate/kvgate/internal/bench"
)

// embedBenchFlags are kvgate bench's flags for --embed (issue 14).
type embedBenchFlags struct {
	on                 *bool
	inputs             *int
	minWords, maxWords *int
}

func addEmbedBenchFlags(fs *flag.FlagSet) embedBenchFlags {
	return embedBenchFlags{
		on:       fs.Bool("embed", false, "benchmark embeddings instead of generation: Embed calls to kvgate's EmbeddingService (or POST /v1/embeddings to --llama-server), reporting inputs/s; uses --concurrency, --duration, --warmup (a duration), --timeout, --seed, --json"),
		inputs:   fs.Int("embed-inputs", 1, "--embed: texts per call"),
		minWords: fs.Int("embed-min-words", 6, "--embed: shortest text, in words"),
		maxWords: fs.Int("embed-max-words", 24, "--embed: longest text, in words"),
	}
}

// runEmbedBench is kvgate bench --embed.
func runEmbedBench(ctx context.Context, f embedBenchFlags, cf *connFlags, llamaServer string, clients int,
	duration time.Duration, warmup warmupFlag, timeout time.Duration, seed uint64, jsonOut bool) error {
	cfg := bench.EmbedConfig{
		Clients: clients, Duration: duration, Warmup: warmup.d, Inputs: *f.inputs,
		MinWords: *f.minWords, MaxWords: *f.maxWords, Timeout: timeout, Seed: seed,
	}
	var (
		target bench.EmbedTarget
		name   string
	)
	if llamaServer != "" {
		ls, err := bench.NewLlamaServer(llamaServer, nil)
		if err != nil {
			return err
		}
		target, name = ls, "llama-server "+ls.String()
	} else {
		conn, err := dialConn(cf)
		if err != nil {
			return err
		}
		defer conn.Close()
		target, name = bench.NewGRPCEmbedTarget(conn), "kvgate "+cf.addr
	}
	rep, err := bench.RunEmbed(ctx, target, name, cfg)
	if rep != nil {
		if jsonOut {
			_ = rep.WriteJSON(os.Stdout)
		} else {
			_ = rep.WriteText(os.Stdout)
		}
	}
	return err
}
