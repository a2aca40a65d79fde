package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/internal/obs"
	"github.com/kvgate/kvgate/service"
)

// errClosed is the cause of the load's cancellation by Drain or Close.
var errClosed = errors.New("server closed")

// Server is a running kvgate server, made by Start. Its methods are safe
// for concurrent use.
type Server struct {
	cfg Config
	log *slog.Logger
	sec *security

	lis        net.Listener // the gRPC listener, limited to MaxConnections
	mlis       net.Listener // nil without MetricsListen
	grpc       *grpc.Server
	health     *health.Server
	metrics    *obs.Metrics // nil without MetricsListen
	metricsSrv *http.Server // nil without MetricsListen
	gate       *service.Gate

	// cancelLoad stops the load of the model (the goroutine running
	// s.load); endAux ends the health-watch, ORCA and reflection streams,
	// so that GracefulStop need not wait for those clients; stopBG stops
	// the load reporter.
	cancelLoad context.CancelCauseFunc
	endAux     context.CancelFunc
	stopBG     context.CancelFunc
	// wg counts every goroutine Start starts: the loader, the gRPC and
	// metrics servers and the load reporter. Close waits for them.
	wg sync.WaitGroup

	ready   chan struct{} // closed once the model serves
	done    chan struct{} // closed on the first failure
	closing chan struct{} // closed when Close begins: a drain stops waiting

	drainOnce sync.Once
	closeOnce sync.Once

	mu       sync.Mutex
	parts    *parts // set once ready
	draining bool   // Drain or Close has begun: the loader must not publish
	err      error  // the first failure, reported by Err
	serveErr error  // the first failure of a listener, reported by Close
}

// Start validates cfg, reads its credentials, binds the gRPC port (and the
// metrics one), and starts serving, with health NOT_SERVING and kvgate
// calls answered UNAVAILABLE (MODEL_LOADING) while the model loads. It
// returns once the ports are bound: a port in use fails Start before the
// model is fetched or loaded. The model then loads in the background:
// Ready is closed once it serves, with health SERVING, and Done if the load
// fails.
//
// ctx bounds the fetch and load of the model: cancelling it before Ready
// stops the load and closes Done, with an Err that wraps ctx.Err(). Once
// the server is ready, ctx is no longer used; stop the server with Drain
// and Close. The caller must Close every Server that Start returns.
func Start(ctx context.Context, cfg Config) (*Server, error) {
	s := &Server{
		cfg: cfg, log: cfg.Logger, gate: &service.Gate{},
		ready: make(chan struct{}), done: make(chan struct{}), closing: make(chan struct{}),
	}
	if s.log == nil {
		s.log = slog.Default()
	}
	log := s.log
	// On failure, close what was opened (the listener given in cfg too).
	tcp := cfg.Listener
	started := false
	defer func() {
		if started {
			return
		}
		if tcp != nil {
			tcp.Close()
		}
		if s.mlis != nil {
			s.mlis.Close()
		}
	}()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	// Read the credentials before the slow part, so a typo fails fast.
	var err error
	if s.sec, err = loadSecurity(&cfg); err != nil {
		return nil, err
	}
	initLlama(cfg.LlamaLog)
	checkCPU(log, cfg.llamaThreads())

	// Bind the ports before loading: a port in use fails at once, and
	// health checks get NOT_SERVING (not "connection refused") while the
	// model loads, so that startup probes can tell loading from dead.
	if cfg.MetricsListen != "" {
		s.metrics = obs.NewMetrics()
		s.metrics.SetLoading(true)
	}
	if tcp == nil {
		if tcp, err = net.Listen("tcp", cfg.Listen); err != nil {
			return nil, fmt.Errorf("listen: %w", err)
		}
	}
	if s.metrics != nil {
		if s.mlis, err = net.Listen("tcp", cfg.MetricsListen); err != nil {
			return nil, fmt.Errorf("metrics listen: %w", err)
		}
	}
	s.lis = newLimitListener(tcp, cfg.MaxConnections, s.metrics)

	load := obs.NewLoadReporter(s.snapshot)
	// auxDone ends the health-watch, ORCA and reflection streams at the
	// end of the drain, so that GracefulStop need not wait for those
	// clients.
	auxDone, endAux := context.WithCancel(context.Background())
	s.endAux = endAux
	s.grpc, s.health, err = newGRPCServer(&cfg, serverDeps{
		log: log, metrics: s.metrics, security: s.sec, load: load, shutdown: auxDone, service: s.gate,
	})
	if err != nil {
		endAux()
		return nil, err
	}

	// From here nothing fails: every goroutine below is stopped by Close.
	bg, stopBG := context.WithCancel(context.Background())
	s.stopBG = stopBG
	s.wg.Go(func() { load.Run(bg) })
	if s.metrics != nil {
		s.metrics.AddSnapshot(s.snapshot)
		s.metrics.InitializeGRPC(s.grpc)
		s.metricsSrv = &http.Server{Handler: s.metrics.Handler(obs.HandlerOptions{Pprof: cfg.Pprof}), ReadHeaderTimeout: 10 * time.Second}
		log.Info("metrics listening", "addr", s.mlis.Addr().String(), "pprof", cfg.Pprof)
		s.wg.Go(func() {
			if err := s.metricsSrv.Serve(s.mlis); !errors.Is(err, http.ErrServerClosed) {
				s.fail(fmt.Errorf("metrics: %w", err), true)
			}
		})
	}
	s.wg.Go(func() {
		if err := s.grpc.Serve(s.lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			s.fail(fmt.Errorf("serve: %w", err), true)
		}
	})
	log.Info("kvgate listening", "addr", s.lis.Addr().String(),
		"tls", s.sec.certs != nil, "mtls", cfg.ClientCA != "", "auth", s.sec.tokens != nil, "health", "NOT_SERVING until the model is ready")

	loadCtx, cancelLoad := context.WithCancelCause(ctx)
	s.cancelLoad = cancelLoad
	s.wg.Go(func() { s.load(loadCtx) })
	started = true
	return s, nil
}

// load fetches and loads the model and builds what serves it, then turns
// health SERVING, unless Drain or Close came first.
func (s *Server) load(ctx context.Context) {
	p, err := s.loadParts(ctx)
	if err != nil {
		if !errors.Is(context.Cause(ctx), errClosed) {
			s.fail(err, false)
		}
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.draining {
		p.close()
		return
	}
	s.parts = p
	p.publish(s.gate)
	if s.metrics != nil {
		s.metrics.SetLoading(false)
	}
	for _, name := range servedNames {
		if p.serves(name) {
			s.health.SetServingStatus(name, healthpb.HealthCheckResponse_SERVING)
		}
	}
	s.log.Info("kvgate ready", "addr", s.lis.Addr().String(), "model", filepath.Base(p.modelPath),
		"arch", p.arch, "kv_cells", p.cells, "max_seqs", s.cfg.MaxSeqs, "batch", p.batch,
		"kv_layout", s.cfg.KVLayout, "sequence_cells", p.sequenceCells(), "threads", p.threads(),
		"tune_threads", s.cfg.TuneThreads, "deterministic", s.cfg.Deterministic)
	close(s.ready)
}

// loadParts gets the model (fetching the default one if Config.Model is
// empty), checks that the KV cache fits the memory available, and builds
// the parts on it.
func (s *Server) loadParts(ctx context.Context) (*parts, error) {
	deps := buildDeps{security: s.sec, metrics: s.metrics}
	p := &parts{modelPath: ModelNone}
	if s.cfg.Model != ModelNone {
		path, err := modelPath(ctx, &s.cfg, s.log)
		if err != nil {
			return nil, err
		}
		if err := checkMemory(&s.cfg, path, s.log); err != nil {
			return nil, err
		}
		if p, err = build(ctx, &s.cfg, s.log, path, deps); err != nil {
			return nil, err
		}
	}
	// The embedding model (server/embed.go).
	e, err := buildEmbed(ctx, &s.cfg, s.log, deps)
	if err != nil {
		p.close()
		return nil, err
	}
	p.embed = e
	return p, nil
}

// fail records err as the reason the server stopped serving, if it is the
// first; serving marks a listener's failure, which Close also reports.
func (s *Server) fail(err error, serving bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if serving && s.serveErr == nil {
		s.serveErr = err
	}
	if s.err == nil {
		s.err = err
		close(s.done)
	}
}

// snapshot returns the cache statistics, or nil before the model is
// ready.
func (s *Server) snapshot() *kvgatev1.GetCacheStatsResponse {
	svc := s.gate.Service()
	if svc == nil {
		return nil
	}
	st, _ := svc.GetCacheStats(context.Background(), &kvgatev1.GetCacheStatsRequest{})
	return st
}

// Addr returns the address the gRPC server listens on.
func (s *Server) Addr() net.Addr { return s.lis.Addr() }

// MetricsAddr returns the address of /metrics and /healthz, or nil without
// Config.MetricsListen.
func (s *Server) MetricsAddr() net.Addr {
	if s.mlis == nil {
		return nil
	}
	return s.mlis.Addr()
}

// Ready returns a channel closed once the model is loaded and health is
// SERVING.
func (s *Server) Ready() <-chan struct{} { return s.ready }

// Done returns a channel closed when the server fails on its own: the load
// of the model failed or was cancelled by Start's ctx, or a listener
// failed. Drain and Close do not close it. Err says why.
func (s *Server) Done() <-chan struct{} { return s.done }

// Err returns why Done was closed, or nil while it is not.
func (s *Server) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Reload rereads the auth token file and the TLS key pair, keeping the old
// ones where a file cannot be read, and returns the errors of those. It
// logs what it did, and that there is nothing to reload without either.
func (s *Server) Reload() error {
	if s.sec.tokens == nil && s.sec.certs == nil {
		s.log.Info("nothing to reload: no auth token file, no TLS certificate")
		return nil
	}
	return s.sec.reload(s.log)
}

// Drain stops taking work and lets running streams finish: health turns
// NOT_SERVING, new Generate calls get UNAVAILABLE (DRAINING), and the
// streams still running after Config.DrainTimeout, or when ctx is done, are
// ended with UNAVAILABLE. When it returns no cell is in use: every lease is
// released and the prefix cache is dropped. The gRPC server still answers
// (health, statistics) until Close. Drain before Ready stops the load.
// Only the first call drains; a later one returns at once. Drain returns
// ctx.Err() when ctx cut the wait short.
func (s *Server) Drain(ctx context.Context) error {
	var err error
	s.drainOnce.Do(func() { err = s.drain(ctx, s.cfg.DrainTimeout) })
	return err
}

// drain is Drain with the wait bounded by timeout.
func (s *Server) drain(ctx context.Context, timeout time.Duration) error {
	s.mu.Lock()
	s.draining = true
	p := s.parts
	s.mu.Unlock()
	if p == nil {
		s.cancelLoad(errClosed)
		s.health.Shutdown()
		return nil
	}
	running, queued := p.requests()
	s.log.Info("draining", "timeout", timeout, "running", running, "queued", queued)
	if s.metrics != nil {
		s.metrics.SetDraining(true)
	}
	s.health.Shutdown()
	p.stopAdmitting()
	var err error
	select {
	case <-p.idle():
	default:
		err = s.waitIdle(ctx, p, timeout)
	}
	// Closing the engine ends whatever still runs with UNAVAILABLE; the
	// prefix cache goes with the context.
	if n := p.stop(); n > 0 {
		s.log.Info("prefix cache dropped", "cells", n)
	}
	return err
}

// waitIdle waits until p is idle, timeout passes, ctx is done or Close
// begins, and returns ctx.Err() when ctx ended the wait.
func (s *Server) waitIdle(ctx context.Context, p *parts, timeout time.Duration) error {
	if timeout > 0 {
		t := time.NewTimer(timeout)
		defer t.Stop()
		select {
		case <-p.idle():
			return nil
		case <-ctx.Done():
			running, _ := p.requests()
			s.log.Warn("drain cut short: cancelling running streams", "running", running)
			return ctx.Err()
		case <-s.closing:
			running, _ := p.requests()
			s.log.Warn("closed while draining: cancelling running streams", "running", running)
			return nil
		case <-t.C:
		}
	}
	running, _ := p.requests()
	s.log.Warn("drain timeout: cancelling running streams", "running", running)
	return nil
}

// Close stops the server: it stops the load if one runs, ends the streams
// still running (Drain first to let them finish; a Drain under way stops
// waiting for them), stops the gRPC and metrics servers, waits for every
// goroutine Start started, logs "stopped" with the cells still in use, and
// frees the model. It returns the failure of a listener, if one failed.
// Every call returns the same.
func (s *Server) Close() error {
	s.closeOnce.Do(s.close)
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.serveErr
}

// close is Close's first call.
func (s *Server) close() {
	close(s.closing)
	s.cancelLoad(errClosed)
	s.drainOnce.Do(func() { _ = s.drain(context.Background(), 0) })
	s.endAux()
	stopServer(s.grpc)
	if s.metricsSrv != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = s.metricsSrv.Shutdown(ctx)
		cancel()
	}
	s.stopBG()
	s.wg.Wait()

	s.mu.Lock()
	p := s.parts
	s.mu.Unlock()
	if p == nil {
		return
	}
	st := s.snapshot()
	inUse := int64(st.GetCellsUsed()) + int64(st.GetCellsReserved()) - int64(st.GetCellsCached())
	s.log.Info("stopped", "cells_in_use", inUse, "cells_used", st.GetCellsUsed(), "cells_reserved", st.GetCellsReserved(),
		"cells_cached", st.GetCellsCached(), "running", st.GetSequencesRunning())
	p.close()
}
