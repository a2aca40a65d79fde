package server

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/orca"
	"google.golang.org/grpc/reflection"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/internal/obs"
	"github.com/kvgate/kvgate/service"
)

// servedNames are the health service names kvgate reports: the server as a
// whole ("") and each kvgate service.
var servedNames = []string{"", kvgatev1.GenerateService_ServiceDesc.ServiceName, kvgatev1.CacheService_ServiceDesc.ServiceName,
	kvgatev1.EmbeddingService_ServiceDesc.ServiceName} // issue 14

// serverDeps are what newGRPCServer wires together.
type serverDeps struct {
	log      *slog.Logger
	metrics  *obs.Metrics // nil without MetricsListen
	security *security
	load     *obs.LoadReporter
	shutdown context.Context // done when auxiliary streams must end
	service  registrar
}

// registrar registers the kvgate services on a gRPC server.
type registrar interface {
	Register(grpc.ServiceRegistrar)
}

// newGRPCServer builds the gRPC server: transport security, keepalive and
// message limits, the interceptor chain, and the kvgate, health,
// reflection and ORCA services. Health reports NOT_SERVING for the server
// and the kvgate services until the loader sets them SERVING, once the
// model is ready.
func newGRPCServer(c *Config, d serverDeps) (*grpc.Server, *health.Server, error) {
	opts := []grpc.ServerOption{
		grpc.MaxRecvMsgSize(c.MaxRecvMsgSize),
		// Bounds on what one client holds: calls per connection (a
		// grpc-go client queues beyond it, a raw HTTP/2 client is
		// refused), and the time to finish the handshake.
		grpc.MaxConcurrentStreams(uint32(c.MaxStreamsPerConn)),
		grpc.ConnectionTimeout(c.HandshakeTimeout),
		// Clients may ping every 10 s, also between calls; a client that
		// pings more often is disconnected.
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			Time:    2 * time.Minute,
			Timeout: 20 * time.Second,
			// A connection past its age gets GOAWAY: new calls go to a new
			// connection (re-resolved, so new replicas are found), and the
			// streams already on it have the grace to finish. The grace
			// must outlast the longest generation, or streams get cut. An
			// age of 0 means connections never age.
			MaxConnectionAge:      c.MaxConnAge,
			MaxConnectionAgeGrace: c.connectionGrace(),
			// A connection with no call for this long is closed.
			MaxConnectionIdle: c.MaxConnIdle,
		}),
	}
	if d.security.certs != nil {
		tcfg, err := obs.ServerTLSConfig(d.security.certs, c.ClientCA)
		if err != nil {
			return nil, nil, err // names --client-ca where that is at fault
		}
		opts = append(opts, grpc.Creds(credentials.NewTLS(tcfg)))
	}
	opts = append(opts, obs.ServerOptions(obs.ChainOptions{
		Logger:   d.log,
		Metrics:  d.metrics,
		Tokens:   d.security.tokens,
		Annotate: annotateGenerate,
		Load:     d.load,
		Shutdown: d.shutdown,
	})...)
	srv := grpc.NewServer(opts...)
	d.service.Register(srv)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(srv, hs)
	for _, name := range servedNames {
		hs.SetServingStatus(name, healthpb.HealthCheckResponse_NOT_SERVING)
	}
	reflection.Register(srv)
	// Out-of-band load reports, for weighted_round_robin clients with
	// enableOobLoadReport. gRPC sends them at most every 30 s.
	if err := orca.Register(srv, orca.ServiceOptions{ServerMetricsProvider: d.load}); err != nil {
		return nil, nil, fmt.Errorf("register ORCA service: %w", err)
	}
	return srv, hs, nil
}

// annotateGenerate installs a service.CallInfo in every Generate call's
// context, so that the log line and the load report of the call carry its
// token counts and queue wait.
func annotateGenerate(ctx context.Context, fullMethod string) (context.Context, func() obs.CallStats) {
	if fullMethod != kvgatev1.GenerateService_Generate_FullMethodName {
		return ctx, nil
	}
	ctx, ci := service.WithCallInfo(ctx)
	return ctx, func() obs.CallStats {
		return obs.CallStats{
			RequestID:        ci.RequestID,
			Tenant:           ci.Tenant,
			PromptTokens:     ci.PromptTokens,
			CachedTokens:     ci.CachedTokens,
			CompletionTokens: ci.CompletionTokens,
			QueueWait:        ci.QueueWait,
		}
	}
}

// stopServer stops srv gracefully, waiting at most 5 s for calls to end
// (after the drain and the end of the auxiliary streams only unary calls
// can still be running) before it closes every connection.
func stopServer(srv *grpc.Server) {
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	t := time.NewTimer(5 * time.Second)
	defer t.Stop()
	select {
	case <-stopped:
	case <-t.C:
		srv.Stop()
		<-stopped
	}
}
