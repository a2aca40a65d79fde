package main

import (
	"context"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	v3orcapb "github.com/cncf/xds/go/xds/data/orca/v3"
	v3orcaservicepb "github.com/cncf/xds/go/xds/service/orca/v3"
	"google.golang.org/grpc"
	_ "google.golang.org/grpc/balancer/weightedroundrobin" // registers weighted_round_robin
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	_ "google.golang.org/grpc/health" // client-side health checking
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
)

// scaleOutServiceConfig is the client service config the README's
// "Operations" section documents: weighted_round_robin fed by the
// replicas' per-call ORCA load reports, client-side health checking that
// stops picking a draining replica, and gRPC's built-in retry of
// RESOURCE_EXHAUSTED and UNAVAILABLE, which honours the server's
// grpc-retry-pushback-ms.
const scaleOutServiceConfig = `{
  "healthCheckConfig": {"serviceName": "kvgate.v1.GenerateService"},
  "loadBalancingConfig": [{"weighted_round_robin": {
    "blackoutPeriod": "0s",
    "weightUpdatePeriod": "0.1s",
    "weightExpirationPeriod": "10s"
  }}],
  "methodConfig": [{
    "name": [{"service": "kvgate.v1.GenerateService", "method": "Generate"}],
    "retryPolicy": {
      "maxAttempts": 5,
      "initialBackoff": "0.05s",
      "maxBackoff": "2s",
      "backoffMultiplier": 2,
      "retryableStatusCodes": ["RESOURCE_EXHAUSTED", "UNAVAILABLE"]
    }
  }]
}`

// attemptCounter is a client stats.Handler that counts call attempts,
// gRPC retries included.
type attemptCounter struct{ n atomic.Int64 }

func (a *attemptCounter) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }
func (a *attemptCounter) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	return ctx
}
func (a *attemptCounter) HandleConn(context.Context, stats.ConnStats) {}
func (a *attemptCounter) HandleRPC(_ context.Context, s stats.RPCStats) {
	if b, ok := s.(*stats.Begin); ok && !b.IsTransparentRetryAttempt {
		a.n.Add(1)
	}
}

// generateAttempts is a client stats.Handler that records the replica each
// Generate attempt was sent to, gRPC retries included.
type generateAttempts struct {
	mu    sync.Mutex
	addrs []string
}

func (a *generateAttempts) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context {
	return ctx
}
func (a *generateAttempts) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	return ctx
}
func (a *generateAttempts) HandleConn(context.Context, stats.ConnStats) {}
func (a *generateAttempts) HandleRPC(_ context.Context, s stats.RPCStats) {
	if h, ok := s.(*stats.OutHeader); ok && h.Client && h.FullMethod == kvgatev1.GenerateService_Generate_FullMethodName {
		a.mu.Lock()
		a.addrs = append(a.addrs, h.RemoteAddr.String())
		a.mu.Unlock()
	}
}

// since returns the replicas of the attempts after the first n.
func (a *generateAttempts) since(n int) []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.addrs[n:]...)
}

func (a *generateAttempts) count() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.addrs)
}

// keepFull keeps the pool of s nearly full with back-to-back blocker
// streams until ctx is done. It returns once the first blocker is
// admitted, and a function that waits for the blockers to stop and
// returns how many there were.
func keepFull(ctx context.Context, t *testing.T, s *server, maxTokens uint32) func() int {
	t.Helper()
	req := textPrompt("Once", maxTokens)
	req.IgnoreEos = true
	first := make(chan error, 1)
	var blockers int
	var wg sync.WaitGroup
	wg.Go(func() {
		for ctx.Err() == nil {
			stream, err := s.Generate().Generate(ctx, req)
			if err == nil {
				_, err = stream.Recv() // started
			}
			if first != nil {
				first <- err
				first = nil
			}
			if err != nil {
				return
			}
			blockers++
			for {
				if _, err := stream.Recv(); err != nil {
					break
				}
			}
		}
	})
	if err := <-first; err != nil {
		t.Fatalf("blocker: %v", err)
	}
	return func() int { wg.Wait(); return blockers }
}

// TestScaleOutWeightedRoundRobin runs three replicas on loopback, one of
// them kept nearly full by a long blocker stream, and sends Generate calls
// through a client with the documented service config over a manual
// resolver. The replicas' ORCA load reports make weighted_round_robin send
// the calls to the two others, and the calls the full replica refuses with
// RESOURCE_EXHAUSTED succeed when retried there.
func TestScaleOutWeightedRoundRobin(t *testing.T) {
	model := testModel(t, "stories260K.gguf")
	// The full replica's pool is one sequence's worth: 2048 cells, nearly
	// all held by a blocker; it queues nothing, so it refuses at once.
	full := startServer(t, "--model", model, "--ctx", "2048", "--max-queue", "0")
	b := startServer(t, "--model", model, "--ctx", "1024")
	c := startServer(t, "--model", model, "--ctx", "1024")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	blockCtx, unblock := context.WithCancel(ctx)
	defer unblock()
	stopBlockers := keepFull(blockCtx, t, full, 2040)

	// The out-of-band report of the full replica shows it: its first
	// report comes as soon as the stream opens.
	oob, err := v3orcaservicepb.NewOpenRcaServiceClient(full.conn).StreamCoreMetrics(ctx, &v3orcaservicepb.OrcaLoadReportRequest{})
	if err != nil {
		t.Fatal(err)
	}
	rep, err := oob.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if rep.GetApplicationUtilization() < 0.9 || rep.GetUtilization()["kv_cells"] < 0.9 || rep.GetRpsFractional() <= 0 {
		t.Errorf("out-of-band report of the full replica: %v", rep)
	}
	if _, ok := rep.GetNamedMetrics()["queue_depth"]; !ok {
		t.Errorf("out-of-band report without queue_depth: %v", rep)
	}
	// A refusal carries the per-call report in its trailer, next to the
	// pushback.
	var trailer metadata.MD
	r := generateAll(ctx, full.Generate(), textPrompt("Once upon a time", 8), grpc.Trailer(&trailer))
	if status.Code(r.err) != codes.ResourceExhausted {
		t.Fatalf("a call to the full replica: %v", r.err)
	}
	if lr := loadReport(t, trailer); lr == nil || lr.GetApplicationUtilization() < 0.9 || lr.GetEps() < 0 {
		t.Errorf("per-call report of a refusal: %v (trailer %v)", lr, trailer)
	}

	attempts := &attemptCounter{}
	conn := replicaConn(t, attempts, full, b, c)
	client := kvgatev1.NewGenerateServiceClient(conn)
	// The client picks a replica only once its connection is up and its
	// health watch has said SERVING, which on a busy machine may come
	// several calls after another's: call until both replicas with room
	// have served, so that the counted calls below meet all three known
	// to the balancer (the wait only bounds a hang).
	warm := map[string]int{}
	waitFor(t, time.Minute, "calls to reach both replicas with room", func() bool {
		var p peer.Peer
		if r := generateAll(ctx, client, textPrompt("Once upon a time", 8), grpc.Peer(&p)); r.err != nil {
			t.Fatalf("a warm-up call: %v", r.err)
		}
		warm[p.Addr.String()]++
		return warm[b.addr] > 0 && warm[c.addr] > 0
	})
	t.Logf("warm-up calls served: %v", warm)

	before := map[*server]*kvgatev1.GetCacheStatsResponse{}
	for _, s := range []*server{full, b, c} {
		before[s] = cacheStats(t, s)
	}
	attemptsBefore := attempts.n.Load()

	const calls = 30
	servedBy := map[string]int{}
	for i := range calls {
		var p peer.Peer
		r := generateAll(ctx, client, textPrompt("Once upon a time", 8), grpc.Peer(&p))
		if r.err != nil || r.finished == nil {
			t.Fatalf("call %d: %v", i, r.err)
		}
		servedBy[p.Addr.String()]++
	}
	unblock()
	blockers := stopBlockers()

	after := map[*server]*kvgatev1.GetCacheStatsResponse{}
	for _, s := range []*server{full, b, c} {
		after[s] = cacheStats(t, s)
	}
	admitted := func(s *server) int { return int(after[s].GetAdmittedTotal() - before[s].GetAdmittedTotal()) }
	refusedFull := int(after[full].GetRejectedTotal()["QUEUE_FULL"] - before[full].GetRejectedTotal()["QUEUE_FULL"])
	// The full replica admitted the blockers that started during the calls
	// (all but the first) and nothing else unless a call slipped in between
	// two blockers.
	fullServed := servedBy[full.addr]
	t.Logf("calls served: full %d, b %d, c %d; the full replica refused %d attempts and ran %d blockers; %d attempts in all",
		fullServed, servedBy[b.addr], servedBy[c.addr], refusedFull, blockers, attempts.n.Load()-attemptsBefore)
	if got := admitted(b) + admitted(c); got != servedBy[b.addr]+servedBy[c.addr] {
		t.Errorf("the other replicas admitted %d calls but served %d", got, servedBy[b.addr]+servedBy[c.addr])
	}
	if servedBy[b.addr]+servedBy[c.addr] < calls-2 {
		t.Errorf("only %d of %d calls went to the replicas with room", servedBy[b.addr]+servedBy[c.addr], calls)
	}
	// Round robin would send a third of the first attempts to the full
	// replica; the weights must keep it well below that.
	if toFull := refusedFull + fullServed; toFull > calls/4 {
		t.Errorf("%d attempts of %d calls went to the full replica", toFull, calls)
	}
	if refusedFull == 0 {
		t.Log("no attempt reached the full replica, so no retry was exercised")
	} else if got := int(attempts.n.Load() - attemptsBefore); got < calls+refusedFull {
		t.Errorf("%d attempts for %d calls and %d refusals: refused calls were not retried", got, calls, refusedFull)
	}
}

// replicaConn returns a client of the replicas with the documented service
// config, over a manual resolver with one endpoint per replica.
func replicaConn(t *testing.T, h stats.Handler, replicas ...*server) *grpc.ClientConn {
	t.Helper()
	res := manual.NewBuilderWithScheme("kvgate-test")
	var eps []resolver.Endpoint
	for _, s := range replicas {
		eps = append(eps, resolver.Endpoint{Addresses: []resolver.Address{{Addr: s.addr}}})
	}
	res.InitialState(resolver.State{Endpoints: eps})
	conn, err := grpc.NewClient(res.Scheme()+":///kvgate",
		grpc.WithResolvers(res),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultServiceConfig(scaleOutServiceConfig),
		grpc.WithStatsHandler(h))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// TestScaleOutDrain drains one of two replicas behind a client with the
// documented service config: once the replica's health turns
// NOT_SERVING, the client sends every new call to the other one, while the
// stream already on the draining replica finishes.
//
// The client learns that each replica serves, and later of the drain, on
// its own health-watch streams, a moment after the test's own health check
// would. Rather than sleep for that moment, the test calls until both
// replicas have served before the drain, and after it sends probe calls
// until three in a row had every attempt sent to the other replica, which
// is what the client does once it knows.
func TestScaleOutDrain(t *testing.T) {
	model := testModel(t, "stories260K.gguf")
	draining := startServer(t, "--model", model, "--ctx", "2048", "--drain-timeout", "60s")
	other := startServer(t, "--model", model, "--ctx", "1024")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	attempts := &generateAttempts{}
	conn := replicaConn(t, attempts, draining, other)
	client := kvgatev1.NewGenerateServiceClient(conn)
	// Both replicas serve before the drain. The client picks a replica
	// only once its connection is up and its health watch has said
	// SERVING, which on a busy machine may come several calls after the
	// other's: call until both have served (the wait only bounds a hang).
	served := map[string]int{}
	waitFor(t, time.Minute, "calls to reach both replicas before the drain", func() bool {
		var p peer.Peer
		if r := generateAll(ctx, client, textPrompt("Once", 4), grpc.Peer(&p)); r.err != nil {
			t.Fatal(r.err)
		}
		served[p.Addr.String()]++
		return served[draining.addr] > 0 && served[other.addr] > 0
	})
	if len(served) != 2 {
		t.Fatalf("before the drain the calls went to %v", served)
	}

	// A long stream keeps the draining replica busy.
	req := textPrompt("Once upon a time", 1500)
	req.IgnoreEos = true
	long, err := draining.Generate().Generate(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := long.Recv(); err != nil {
		t.Fatal(err)
	}
	draining.signal(t, syscall.SIGTERM)
	waitFor(t, time.Minute, "health NOT_SERVING", func() bool {
		hc, err := healthpb.NewHealthClient(draining.conn).Check(ctx, &healthpb.HealthCheckRequest{Service: "kvgate.v1.GenerateService"})
		return err == nil && hc.GetStatus() == healthpb.HealthCheckResponse_NOT_SERVING
	})
	clean := 0
	waitFor(t, time.Minute, "the client to stop picking the draining replica", func() bool {
		n := attempts.count()
		if r := generateAll(ctx, client, textPrompt("Once", 4)); r.err != nil {
			t.Fatalf("a probe call during the drain: %v", r.err)
		}
		clean++
		for _, addr := range attempts.since(n) {
			if addr != other.addr {
				clean = 0
			}
		}
		return clean >= 3
	})
	served = map[string]int{}
	for i := range 10 {
		var p peer.Peer
		if r := generateAll(ctx, client, textPrompt("Once", 4), grpc.Peer(&p)); r.err != nil {
			t.Fatalf("call %d during the drain: %v", i, r.err)
		}
		served[p.Addr.String()]++
	}
	if served[other.addr] != 10 {
		t.Errorf("during the drain the calls went to %v", served)
	}
	n := 0
	for {
		resp, err := long.Recv()
		if err != nil {
			if !errors.Is(err, io.EOF) {
				t.Fatalf("the stream on the draining replica: %v", err)
			}
			break
		}
		n += len(resp.GetChunk().GetTokenIds())
	}
	if err := draining.waitExit(t, 2*time.Minute); err != nil {
		t.Fatalf("exit: %v", err)
	}
	if n == 0 {
		t.Error("the stream on the draining replica streamed nothing after SIGTERM")
	}
}

// loadReport decodes the ORCA load report in a trailer.
func loadReport(t *testing.T, md metadata.MD) *v3orcapb.OrcaLoadReport {
	t.Helper()
	v := md.Get("endpoint-load-metrics-bin")
	if len(v) == 0 {
		return nil
	}
	var r v3orcapb.OrcaLoadReport
	if err := proto.Unmarshal([]byte(v[0]), &r); err != nil {
		t.Fatal(err)
	}
	return &r
}
