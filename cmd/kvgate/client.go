package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc"
	_ "google.golang.org/grpc/balancer/weightedroundrobin" // registers weighted_round_robin, the README's policy
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	_ "google.golang.org/grpc/health" // client-side health checking (healthCheckConfig)
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

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
	serviceConfig                   string
}

func addConnFlags(fs *flag.FlagSet) *connFlags {
	c := &connFlags{}
	fs.StringVar(&c.addr, "addr", "localhost:50051", "server address: host:port, a comma-separated list of host:port replicas (round_robin unless --service-config says otherwise), or a gRPC target such as dns:///kvgate.internal:50051")
	fs.BoolVar(&c.tls, "tls", false, "use TLS with the system's root CAs (implied by the other --tls flags)")
	fs.StringVar(&c.tlsCA, "tls-ca", "", "PEM CA certificates that sign the server's certificate (enables TLS)")
	fs.StringVar(&c.tlsCert, "tls-cert", "", "PEM client certificate, for a server that requires mutual TLS")
	fs.StringVar(&c.tlsKey, "tls-key", "", "PEM private key of --tls-cert")
	fs.StringVar(&c.tlsName, "tls-server-name", "", "name to verify in the server's certificate (default: the host of --addr)")
	fs.StringVar(&c.token, "token", "", "bearer token to send (for a server with --auth-tokens)")
	fs.StringVar(&c.serviceConfig, "service-config", "", "file of a gRPC service config (JSON) for the channel: load balancing, health checking, retries")
	return c
}

// clientVar is an environment variable that a client command reads into
// one of its flags.
type clientVar struct {
	name, flag string
}

// clientEnv lists the only environment variables the client commands read.
// None of them is a serve variable (KVGATE_ plus a serve flag's name), so a
// server's environment, such as its KVGATE_TLS_CERT, does not leak into a
// client started from the same shell; the client's certificate therefore
// comes from KVGATE_CLIENT_CERT and KVGATE_CLIENT_KEY.
var clientEnv = []clientVar{
	{"KVGATE_ADDR", "addr"},
	{"KVGATE_TOKEN", "token"},
	{"KVGATE_TLS_CA", "tls-ca"},
	{"KVGATE_TLS_SERVER_NAME", "tls-server-name"},
	{"KVGATE_CLIENT_CERT", "tls-cert"},
	{"KVGATE_CLIENT_KEY", "tls-key"},
	{"KVGATE_SERVICE_CONFIG", "service-config"},
}

// clientEnvHelp is the "Environment:" section of every client command's
// help.
var clientEnvHelp = func() string {
	var b strings.Builder
	b.WriteString("\nEnvironment (a flag given on the command line wins; an empty variable counts as unset):\n")
	for _, v := range clientEnv {
		fmt.Fprintf(&b, "  %-24s --%s\n", v.name, v.flag)
	}
	b.WriteString("No other KVGATE_ variable is read: serve's variables (such as KVGATE_TLS_CERT) do not apply.\n")
	return b.String()
}()

// setClientUsage makes fs print a client command's synopsis, its
// description, its flags and the environment variables it reads.
func setClientUsage(fs *flag.FlagSet, synopsis, about string) {
	fs.Usage = func() {
		w := fs.Output()
		fmt.Fprintf(w, "Usage: %s\n\n%s\nFlags:\n", synopsis, about)
		fs.PrintDefaults()
		fmt.Fprint(w, clientEnvHelp)
	}
}

// addrList splits a comma-separated --addr into its host:port addresses.
// It returns nil for an address without a comma, which is given to gRPC as
// a target as it stands.
func addrList(addr string) ([]string, error) {
	if !strings.Contains(addr, ",") {
		return nil, nil
	}
	list := strings.Split(addr, ",")
	for i, a := range list {
		a = strings.TrimSpace(a)
		if a == "" {
			return nil, fmt.Errorf("--addr %q: address %d of the list is empty", addr, i+1)
		}
		if _, port, err := net.SplitHostPort(a); err != nil || port == "" {
			return nil, fmt.Errorf("--addr %q: %q is not host:port (a list holds host:port addresses, not gRPC targets)", addr, a)
		}
		list[i] = a
	}
	return list, nil
}

// roundRobinConfig is the service config of an address list without
// --service-config.
const roundRobinConfig = `{"loadBalancingConfig": [{"round_robin": {}}]}`

// loadServiceConfig reads and checks a service config file. gRPC parses
// the config only when a channel is made, so the config is tried on a
// channel that never connects: its errors are then the config's alone.
func loadServiceConfig(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("--service-config: %w", err)
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(b, &obj); err != nil {
		var syn *json.SyntaxError
		if errors.As(err, &syn) {
			line, col := lineCol(b, syn.Offset)
			return "", fmt.Errorf("--service-config %s: line %d, column %d: %w", path, line, col, err)
		}
		return "", fmt.Errorf("--service-config %s: not a JSON object: %w", path, err)
	}
	probe, err := grpc.NewClient("passthrough:///service-config-check",
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultServiceConfig(string(b)))
	if err != nil {
		return "", fmt.Errorf("--service-config %s: %w", path, err)
	}
	_ = probe.Close()
	return string(b), nil
}

// lineCol returns the line and column, both from 1, of byte offset off in
// b; a json.SyntaxError's offset counts the bytes read, so it points just
// past the offending character.
func lineCol(b []byte, off int64) (line, col int) {
	off = min(max(off-1, 0), int64(len(b)))
	line = 1 + bytes.Count(b[:off], []byte("\n"))
	col = int(off) - bytes.LastIndexByte(b[:off], '\n')
	return line, col
}

// dialConn connects to the server: over TLS when any --tls flag is given,
// with the bearer token on every call when --token is, and with
// --service-config as the channel's default service config. A list of
// addresses goes through a manual resolver with one endpoint per address,
// balanced round_robin unless the service config names a policy.
func dialConn(c *connFlags) (*grpc.ClientConn, error) {
	list, err := addrList(c.addr)
	if err != nil {
		return nil, err
	}
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
	serviceConfig := ""
	if c.serviceConfig != "" {
		if serviceConfig, err = loadServiceConfig(c.serviceConfig); err != nil {
			return nil, err
		}
	} else if list != nil {
		serviceConfig = roundRobinConfig
	}
	if serviceConfig != "" {
		opts = append(opts, grpc.WithDefaultServiceConfig(serviceConfig))
	}
	target := c.addr
	if list != nil {
		res := manual.NewBuilderWithScheme("kvgate-addrs")
		eps := make([]resolver.Endpoint, len(list))
		for i, a := range list {
			// The address is the TLS server name too, as it would be
			// as a target of its own.
			eps[i] = resolver.Endpoint{Addresses: []resolver.Address{{Addr: a, ServerName: a}}}
		}
		res.InitialState(resolver.State{Endpoints: eps})
		opts = append(opts, grpc.WithResolvers(res))
		target = res.Scheme() + ":///replicas"
	}
	conn, err := grpc.NewClient(target, opts...)
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

// indentJSON reformats protojson's output, whose spacing protojson varies
// on purpose, indented by two spaces with every line after the first
// prefixed by prefix.
func indentJSON(b []byte, prefix string) []byte {
	var out bytes.Buffer
	if err := json.Indent(&out, b, prefix, "  "); err != nil {
		return b
	}
	return out.Bytes()
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
			js, err := protojson.Marshal(pm)
			if err != nil {
				continue
			}
			fmt.Fprintf(&b, "\n  %s %s", pm.ProtoReflect().Descriptor().FullName(), indentJSON(js, "  "))
		}
	}
	return errors.New(b.String())
}

// generate is kvgate generate: it streams one completion to stdout.
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
	setClientUsage(fs, "kvgate generate [flags] PROMPT", "Streams the completion of PROMPT (the arguments, or stdin for -) to stdout.\n")
	if err := parseClientFlags(fs, args); err != nil {
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

// tokenize is kvgate tokenize: it prints a text's token ids and pieces.
func tokenize(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("kvgate tokenize", flag.ContinueOnError)
	cf := addConnFlags(fs)
	addSpecial := fs.Bool("add-special", true, "add the beginning-of-sequence token if the model uses one")
	setClientUsage(fs, "kvgate tokenize [flags] TEXT", "Prints the token ids of TEXT (the arguments, or stdin for -), one per line with its piece.\n")
	if err := parseClientFlags(fs, args); err != nil {
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

// noArgs refuses positional arguments, for the commands that take none.
func noArgs(fs *flag.FlagSet) error {
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	return nil
}

// printMessage writes m as protojson (proto field names, zero values
// included) or as a table of its fields.
func printMessage(w io.Writer, m proto.Message, asJSON bool) error {
	if asJSON {
		b, err := protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true}.Marshal(m)
		if err != nil {
			return fmt.Errorf("encode %s: %w", m.ProtoReflect().Descriptor().FullName(), err)
		}
		_, err = fmt.Fprintf(w, "%s\n", indentJSON(b, ""))
		return err
	}
	return writeFields(w, m)
}

// writeFields writes every field of m, set or not, in declaration order:
// one line each, the field's proto name and its value.
func writeFields(w io.Writer, m proto.Message) error {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	r := m.ProtoReflect()
	fields := r.Descriptor().Fields()
	for i := range fields.Len() {
		fd := fields.Get(i)
		fmt.Fprintf(tw, "%s\t%s\n", fd.Name(), formatField(fd, r.Get(fd)))
	}
	return tw.Flush()
}

// formatField renders one field's value for a terminal: an empty string
// as "-", a map as its sorted key=value pairs, and a size in bytes of a
// KiB or more with its size in binary units beside it.
func formatField(fd protoreflect.FieldDescriptor, v protoreflect.Value) string {
	switch {
	case fd.IsMap():
		var pairs []string
		v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
			pairs = append(pairs, fmt.Sprintf("%s=%s", k.String(), formatScalar(fd.MapValue(), mv)))
			return true
		})
		if len(pairs) == 0 {
			return "-"
		}
		slices.Sort(pairs)
		return strings.Join(pairs, " ")
	case fd.IsList():
		l := v.List()
		items := make([]string, l.Len())
		for i := range items {
			items[i] = formatScalar(fd, l.Get(i))
		}
		if len(items) == 0 {
			return "-"
		}
		return strings.Join(items, " ")
	}
	s := formatScalar(fd, v)
	if fd.Kind() == protoreflect.Uint64Kind && strings.HasSuffix(string(fd.Name()), "_bytes") && v.Uint() >= 1024 {
		s += " (" + humanBytes(v.Uint()) + ")"
	}
	return s
}

// formatScalar renders a single value of field fd.
func formatScalar(fd protoreflect.FieldDescriptor, v protoreflect.Value) string {
	switch fd.Kind() {
	case protoreflect.StringKind:
		if v.String() == "" {
			return "-"
		}
		return v.String()
	case protoreflect.DoubleKind, protoreflect.FloatKind:
		return strconv.FormatFloat(v.Float(), 'g', 6, 64)
	case protoreflect.EnumKind:
		if ev := fd.Enum().Values().ByNumber(v.Enum()); ev != nil {
			return string(ev.Name())
		}
		return strconv.Itoa(int(v.Enum()))
	case protoreflect.MessageKind, protoreflect.GroupKind:
		b, err := protojson.Marshal(v.Message().Interface())
		if err != nil {
			return "?"
		}
		return string(b)
	}
	return v.String()
}

// humanBytes renders n bytes in binary units, such as "1.5 MiB".
func humanBytes(n uint64) string {
	const units = "KMGTPE"
	f := float64(n)
	i := -1
	for f >= 1024 && i < len(units)-1 {
		f /= 1024
		i++
	}
	if i < 0 {
		return strconv.FormatUint(n, 10) + " B"
	}
	return strconv.FormatFloat(f, 'f', 1, 64) + " " + units[i:i+1] + "iB"
}

// infoCmd is kvgate info: it prints the server's GetModelInfo.
func infoCmd(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("kvgate info", flag.ContinueOnError)
	cf := addConnFlags(fs)
	asJSON := fs.Bool("json", false, "print the response as protojson, with the proto field names")
	timeout := fs.Duration("timeout", 30*time.Second, "deadline of the call")
	setClientUsage(fs, "kvgate info [flags]", "Prints the server's GetModelInfo: the model and the server's limits.\n")
	if err := parseClientFlags(fs, args); err != nil {
		return err
	}
	if err := noArgs(fs); err != nil {
		return err
	}
	conn, err := dialConn(cf)
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	resp, err := kvgatev1.NewGenerateServiceClient(conn).GetModelInfo(ctx, &kvgatev1.GetModelInfoRequest{})
	if err != nil {
		return describe(err)
	}
	return printMessage(os.Stdout, resp, *asJSON)
}

// statsCmd is kvgate stats: it prints the server's GetCacheStats.
func statsCmd(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("kvgate stats", flag.ContinueOnError)
	cf := addConnFlags(fs)
	asJSON := fs.Bool("json", false, "print the response as protojson, with the proto field names")
	timeout := fs.Duration("timeout", 30*time.Second, "deadline of the call")
	setClientUsage(fs, "kvgate stats [flags]", "Prints the server's GetCacheStats: a snapshot of the KV-cell allocator and its counters.\nWith several replicas behind --addr, one of them answers.\n")
	if err := parseClientFlags(fs, args); err != nil {
		return err
	}
	if err := noArgs(fs); err != nil {
		return err
	}
	conn, err := dialConn(cf)
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	resp, err := kvgatev1.NewCacheServiceClient(conn).GetCacheStats(ctx, &kvgatev1.GetCacheStatsRequest{})
	if err != nil {
		return describe(err)
	}
	return printMessage(os.Stdout, resp, *asJSON)
}

// servingErr returns nil for SERVING, and otherwise the error that makes
// kvgate health exit with status 1.
func servingErr(service string, st healthpb.HealthCheckResponse_ServingStatus) error {
	if st == healthpb.HealthCheckResponse_SERVING {
		return nil
	}
	return fmt.Errorf("service %q is %s", service, st)
}

// healthCmd is kvgate health: it prints a service's grpc.health.v1 status
// and fails unless it is SERVING.
func healthCmd(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("kvgate health", flag.ContinueOnError)
	cf := addConnFlags(fs)
	service := fs.String("service", "", `service to check: "" is the server as a whole; kvgate.v1.GenerateService is the one load-balancing clients watch`)
	watch := fs.Bool("watch", false, "stream every status change (Watch) until interrupted; the exit status is then that of the last one")
	timeout := fs.Duration("timeout", 10*time.Second, "deadline of the check (not of --watch)")
	setClientUsage(fs, "kvgate health [flags]",
		"Asks the server's grpc.health.v1 service for a service's status and prints it (SERVING,\n"+
			"NOT_SERVING, ...). Exits 0 only when the status is SERVING. A server turns NOT_SERVING\n"+
			"as it starts draining. With several replicas behind --addr, one of them answers.\n")
	if err := parseClientFlags(fs, args); err != nil {
		return err
	}
	if err := noArgs(fs); err != nil {
		return err
	}
	conn, err := dialConn(cf)
	if err != nil {
		return err
	}
	defer conn.Close()
	client := healthpb.NewHealthClient(conn)
	req := &healthpb.HealthCheckRequest{Service: *service}
	if *watch {
		return watchHealth(ctx, client, req)
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	resp, err := client.Check(ctx, req)
	if err != nil {
		return describe(err)
	}
	fmt.Println(resp.GetStatus())
	return servingErr(*service, resp.GetStatus())
}

// watchHealth prints every status of a Watch stream until ctx is
// cancelled (an interrupt), and returns servingErr of the last one; a
// stream the server ends is an error.
func watchHealth(ctx context.Context, client healthpb.HealthClient, req *healthpb.HealthCheckRequest) error {
	stream, err := client.Watch(ctx, req)
	if err != nil {
		return describe(err)
	}
	last := healthpb.HealthCheckResponse_UNKNOWN
	for {
		resp, err := stream.Recv()
		switch {
		case err == nil:
			last = resp.GetStatus()
			fmt.Println(last)
		case ctx.Err() != nil:
			return servingErr(req.GetService(), last)
		case errors.Is(err, io.EOF):
			return fmt.Errorf("the server ended the watch; the last status was %s", last)
		default:
			return fmt.Errorf("the watch ended (the last status was %s): %w", last, describe(err))
		}
	}
}

// tokenIDs parses token ids given as arguments, or read whitespace-separated
// from stdin when the only argument is "-".
func tokenIDs(args []string, stdin io.Reader) ([]int32, error) {
	fields := args
	if len(args) == 1 && args[0] == "-" {
		b, err := io.ReadAll(stdin)
		if err != nil {
			return nil, fmt.Errorf("read stdin: %w", err)
		}
		fields = strings.Fields(string(b))
	}
	if len(fields) == 0 {
		return nil, errors.New("no token ids: give them as arguments, or - to read them from stdin")
	}
	ids := make([]int32, len(fields))
	for i, f := range fields {
		n, err := strconv.ParseInt(f, 10, 32)
		if err != nil {
			var ne *strconv.NumError
			if errors.As(err, &ne) {
				err = ne.Err
			}
			return nil, fmt.Errorf("token id %d, %q: %w", i+1, f, err)
		}
		ids[i] = int32(n)
	}
	return ids, nil
}

// detokenize is kvgate detokenize: it prints the text of token ids.
func detokenize(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("kvgate detokenize", flag.ContinueOnError)
	cf := addConnFlags(fs)
	renderSpecial := fs.Bool("render-special", false, "render special tokens (such as end-of-sequence) as text")
	stripSpace := fs.Bool("strip-leading-space", false, "drop the space a SentencePiece vocabulary puts before the first word")
	timeout := fs.Duration("timeout", 30*time.Second, "deadline of the call")
	setClientUsage(fs, "kvgate detokenize [flags] ID...",
		"Prints the text of token ids, given as arguments or, for -, read whitespace-separated\n"+
			"from stdin. Put -- before a negative id, which would otherwise read as a flag.\n")
	if err := parseClientFlags(fs, args); err != nil {
		return err
	}
	ids, err := tokenIDs(fs.Args(), os.Stdin)
	if err != nil {
		return err
	}
	conn, err := dialConn(cf)
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	resp, err := kvgatev1.NewGenerateServiceClient(conn).Detokenize(ctx, &kvgatev1.DetokenizeRequest{
		Ids: ids, RenderSpecial: *renderSpecial, StripLeadingSpace: *stripSpace,
	})
	if err != nil {
		return describe(err)
	}
	fmt.Println(resp.GetText())
	return nil
}
