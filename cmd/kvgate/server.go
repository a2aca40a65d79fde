package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
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

// security is what --auth-tokens and --tls-* configure. Both parts are
// optional and reloaded on SIGHUP.
type security struct {
	tokens *obs.Tokens       // nil without --auth-tokens
	certs  *obs.CertReloader // nil without --tls-cert
}

// loadSecurity reads the token file and the server's key pair.
func loadSecurity(c *serveConfig) (*security, error) {
	var sec security
	var err error
	if c.authTokens != "" {
		if sec.tokens, err = obs.LoadTokens(c.authTokens); err != nil {
			return nil, fmt.Errorf("--auth-tokens: %w", err)
		}
	}
	if c.tlsCert != "" {
		if sec.certs, err = obs.NewCertReloader(c.tlsCert, c.tlsKey); err != nil {
			return nil, fmt.Errorf("--tls-cert: %w", err)
		}
	}
	return &sec, nil
}

// reload rereads the token file and the key pair, keeping the old ones
// where a file cannot be read.
func (s *security) reload(log *slog.Logger) {
	if s.tokens != nil {
		if n, err := s.tokens.Reload(); err != nil {
			log.Error("auth tokens not reloaded; the previous ones stay in force", "err", err)
		} else {
			log.Info("auth tokens reloaded", "tokens", n)
			if n == 0 {
				log.Warn("the auth token file holds no token: every authenticated call will be refused")
			}
		}
	}
	if s.certs != nil {
		if err := s.certs.Reload(); err != nil {
			log.Error("TLS certificate not reloaded; the previous one stays in use", "err", err)
		} else {
			log.Info("TLS certificate reloaded")
		}
	}
}

// reloadOnHangup reloads the credentials on every SIGHUP received on hup
// until ctx is done. Without credentials a SIGHUP is logged and otherwise
// ignored.
func reloadOnHangup(ctx context.Context, log *slog.Logger, sec *security, hup <-chan os.Signal) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			if sec.tokens == nil && sec.certs == nil {
				log.Info("SIGHUP: nothing to reload")
				continue
			}
			sec.reload(log)
		}
	}
}

// serverDeps are what newGRPCServer wires together.
type serverDeps struct {
	log      *slog.Logger
	metrics  *obs.Metrics // nil without --metrics-listen
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
// and the kvgate services until serve sets them SERVING, once the model is
// ready.
func newGRPCServer(c *serveConfig, d serverDeps) (*grpc.Server, *health.Server, error) {
	opts := []grpc.ServerOption{
		grpc.MaxRecvMsgSize(c.maxRecvMsgSize),
		// Bounds on what one client holds: calls per connection (a
		// grpc-go client queues beyond it, a raw HTTP/2 client is
		// refused), and the time to finish the handshake.
		grpc.MaxConcurrentStreams(uint32(c.maxStreamsPerConn)),
		grpc.ConnectionTimeout(c.handshakeTimeout),
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
			MaxConnectionAge:      c.maxConnAge,
			MaxConnectionAgeGrace: c.connectionGrace(),
			// A connection with no call for this long is closed.
			MaxConnectionIdle: c.maxConnIdle,
		}),
	}
	if d.security.certs != nil {
		tcfg, err := obs.ServerTLSConfig(d.security.certs, c.clientCA)
		if err != nil {
			return nil, nil, err
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
