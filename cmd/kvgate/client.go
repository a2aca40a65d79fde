package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/internal/obs"
)

// stringList is a repeatable string flag.
type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

// connFlags are the client commands' connection flags.
type connFlags struct {
	addr                            string
	tls                             bool
	tlsCA, tlsCert, tlsKey, tlsName string
	token                           string
}

func addConnFlags(fs *flag.FlagSet) *connFlags {
	c := &connFlags{}
	fs.StringVar(&c.addr, "addr", "localhost:50051", "server address")
	fs.BoolVar(&c.tls, "tls", false, "use TLS with the system's root CAs (implied by the other --tls flags)")
	fs.StringVar(&c.tlsCA, "tls-ca", "", "PEM CA certificates that sign the server's certificate (enables TLS)")
	fs.StringVar(&c.tlsCert, "tls-cert", "", "PEM client certificate, for a server that requires mutual TLS")
	fs.StringVar(&c.tlsKey, "tls-key", "", "PEM private key of --tls-cert")
	fs.StringVar(&c.tlsName, "tls-server-name", "", "name to verify in the server's certificate (default: the host of --addr)")
	fs.StringVar(&c.token, "token", "", "bearer token to send (for a server with --auth-tokens)")
	return c
}

// dial connects to addr in plaintext, without a token.
func dial(addr string) (*grpc.ClientConn, error) {
	return dialConn(&connFlags{addr: addr})
}

// dialConn connects to the server: over TLS when any --tls flag is given,
// and with the bearer token on every call when --token is.
func dialConn(c *connFlags) (*grpc.ClientConn, error) {
	secure := c.tls || c.tlsCA != "" || c.tlsCert != "" || c.tlsKey != "" || c.tlsName != ""
	creds := insecure.NewCredentials()
	if secure {
		cfg, err := obs.ClientTLSConfig(c.tlsCA, c.tlsCert, c.tlsKey, c.tlsName)
		if err != nil {
			return nil, err
		}
		creds = credentials.NewTLS(cfg)
	}
	opts := []grpc.DialOption{grpc.WithTransportCredentials(creds)}
	if c.token != "" {
		// Without TLS the token travels in the clear: fine on loopback,
		// not across a network.
		tok, err := obs.BearerToken(c.token, false)
		if err != nil {
			return nil, fmt.Errorf("--token: %w", err)
		}
		opts = append(opts, grpc.WithPerRPCCredentials(tok))
	}
	conn, err := grpc.NewClient(c.addr, opts...)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", c.addr, err)
	}
	return conn, nil
}

// promptText joins the arguments, or reads stdin when the prompt is "-".
func promptText(args []string) (string, error) {
	if len(args) == 1 && args[0] == "-" {
		b, err := io.ReadAll(os.Stdin)
		return string(b), err
	}
	if len(args) == 0 {
		return "", errors.New("no prompt: give it as arguments, or - to read stdin")
	}
	return strings.Join(args, " "), nil
}

// describe renders a status with its details for a terminal.
func describe(err error) error {
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s: %s", st.Code(), st.Message())
	for _, d := range st.Details() {
		if pm, ok := d.(proto.Message); ok {
			fmt.Fprintf(&b, "\n  %s", protojson.Format(pm))
		}
	}
	return errors.New(b.String())
}

func generate(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("kvgate generate", flag.ContinueOnError)
	cf := addConnFlags(fs)
	maxTokens := fs.Uint("max-tokens", 128, "most tokens to generate")
	temp := fs.Float64("temperature", 0, "sampling temperature (0: greedy)")
	topK := fs.Int("top-k", 0, "top-k (0: off)")
	topP := fs.Float64("top-p", 0, "top-p in (0, 1] (0: off)")
	minP := fs.Float64("min-p", 0, "min-p (0: off)")
	seed := fs.Int64("seed", -1, "random seed (-1: random)")
	priority := fs.Int("priority", 0, "admission priority (higher first)")
	ignoreEOS := fs.Bool("ignore-eos", false, "generate exactly max-tokens tokens")
	timeout := fs.Duration("timeout", 5*time.Minute, "deadline of the call")
	verbose := fs.Bool("v", false, "print usage and timings at the end")
	var stops stringList
	fs.Var(&stops, "stop", "stop string (repeatable)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	text, err := promptText(fs.Args())
	if err != nil {
		return err
	}
	conn, err := dialConn(cf)
	if err != nil {
		return err
	}
	defer conn.Close()
	sampling := &kvgatev1.SamplingParams{Temperature: float32(*temp), TopK: int32(*topK), MinP: float32(*minP)}
	if *topP > 0 {
		p := float32(*topP)
		sampling.TopP = &p
	}
	if *seed >= 0 {
		s := uint32(*seed)
		sampling.Seed = &s
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	stream, err := kvgatev1.NewGenerateServiceClient(conn).Generate(ctx, &kvgatev1.GenerateRequest{
		Prompt:    &kvgatev1.GenerateRequest_Text{Text: text},
		MaxTokens: uint32(*maxTokens),
		Sampling:  sampling,
		Stop:      stops,
		Priority:  int32(*priority),
		IgnoreEos: *ignoreEOS,
	})
	if err != nil {
		return describe(err)
	}
	for {
		resp, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			fmt.Println()
			return describe(err)
		}
		switch ev := resp.GetEvent().(type) {
		case *kvgatev1.GenerateResponse_Chunk:
			fmt.Print(ev.Chunk.GetText())
		case *kvgatev1.GenerateResponse_Finished:
			fmt.Println()
			if *verbose {
				f := ev.Finished
				u, t := f.GetUsage(), f.GetTimings()
				fmt.Fprintf(os.Stderr, "finish: %s  prompt: %d  cached: %d  completion: %d  queue: %s  prefill: %s  decode: %s\n",
					strings.TrimPrefix(f.GetReason().String(), "FINISH_REASON_"), u.GetPromptTokens(), u.GetCachedTokens(),
					u.GetCompletionTokens(), durationMS(t.GetQueueMs()), durationMS(t.GetPrefillMs()), durationMS(t.GetDecodeMs()))
			}
		}
	}
}

func tokenize(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("kvgate tokenize", flag.ContinueOnError)
	cf := addConnFlags(fs)
	addSpecial := fs.Bool("add-special", true, "add the beginning-of-sequence token if the model uses one")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	text, err := promptText(fs.Args())
	if err != nil {
		return err
	}
	conn, err := dialConn(cf)
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	resp, err := kvgatev1.NewGenerateServiceClient(conn).Tokenize(ctx, &kvgatev1.TokenizeRequest{Text: text, AddSpecial: *addSpecial})
	if err != nil {
		return describe(err)
	}
	for i, id := range resp.GetIds() {
		fmt.Printf("%6d  %q\n", id, resp.GetPieces()[i])
	}
	fmt.Fprintf(os.Stderr, "%d tokens\n", len(resp.GetIds()))
	return nil
}
