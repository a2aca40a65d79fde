package obs

import (
	"context"
	"fmt"
	"log/slog"
	"runtime/debug"
	"strings"
	"time"

	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/auth"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/logging"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/recovery"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/selector"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/orca"
	"google.golang.org/grpc/status"
)

// kvgateServicePrefix starts the full method name of every call to
// kvgate's own services.
const kvgateServicePrefix = "/kvgate.v1."

// openServices are the services that answer without a bearer token: load
// balancers and grpcurl must be able to probe a server they hold no token
// for.
var openServices = map[string]bool{
	"grpc.health.v1.Health":                    true,
	"grpc.reflection.v1.ServerReflection":      true,
	"grpc.reflection.v1alpha.ServerReflection": true,
}

// CallStats is what one call did, as far as the service reports it. Only
// Generate calls fill it in.
type CallStats struct {
	// PromptTokens is the number of prompt tokens.
	PromptTokens int
	// CachedTokens is the number of prompt tokens served from the prefix
	// cache.
	CachedTokens int
	// CompletionTokens is the number of tokens generated.
	CompletionTokens int
	// QueueWait is the time the call waited for admission.
	QueueWait time.Duration
	// RequestID is the request_id the client sent, if any.
	RequestID string
	// Tenant is the caller's tenant.
	Tenant string
}

// Annotator installs per-call state in a call's context before the rest of
// the chain runs. It returns the context the call should run with and, for
// calls it annotates, a function that reads the call's CallStats once the
// handler has returned; that function is nil for calls it leaves alone.
type Annotator func(ctx context.Context, fullMethod string) (context.Context, func() CallStats)

// ChainOptions configures the server's interceptor chain. Every field is
// optional.
type ChainOptions struct {
	// Logger receives one line per finished call, with its code, duration
	// and, for Generate, its token counts and queue wait. Payloads are never
	// logged. Nil disables call logging.
	Logger *slog.Logger
	// Metrics counts calls with go-grpc-middleware's Prometheus provider
	// and counts recovered panics.
	Metrics *Metrics
	// Tokens, when set, requires a valid bearer token on every call except
	// those to the health and reflection services.
	Tokens *Tokens
	// Annotate runs first on every call; see Annotator.
	Annotate Annotator
	// Load, when set, attaches an ORCA load report to the trailer of every
	// call to kvgate's services.
	Load *LoadReporter
	// Shutdown, once done, cancels the long-lived streams of the auxiliary
	// services (health Watch, ORCA, reflection), so that a graceful stop
	// does not wait for clients that never hang up.
	Shutdown context.Context
}

// ServerOptions returns the grpc.ServerOptions that install the
// interceptor chain and the codec that reports unparsable requests as
// INVALID_ARGUMENT. From the outside in: ORCA per-call reporting,
// annotation, Prometheus, logging, auxiliary-stream shutdown, the check
// for unparsable requests, auth, the per-call load recorder, and recovery, which sits next to the handler so
// that every other interceptor sees a panic as an INTERNAL status.
func ServerOptions(o ChainOptions) []grpc.ServerOption {
	var (
		unary  []grpc.UnaryServerInterceptor
		stream []grpc.StreamServerInterceptor
		opts   []grpc.ServerOption
	)
	if o.Load != nil {
		opts = append(opts, orca.CallMetricsServerOption(o.Load))
	}
	if o.Annotate != nil {
		unary = append(unary, annotateUnary(o.Annotate))
		stream = append(stream, annotateStream(o.Annotate))
	}
	if o.Metrics != nil {
		unary = append(unary, o.Metrics.grpc.UnaryServerInterceptor())
		stream = append(stream, o.Metrics.grpc.StreamServerInterceptor())
	}
	if o.Logger != nil {
		lopts := []logging.Option{
			logging.WithLogOnEvents(logging.FinishCall),
			logging.WithLevels(codeToLevel),
			logging.WithFieldsFromContext(callFields),
			logging.WithDisableLoggingFields(logging.SystemTag[0], logging.ComponentFieldKey, logging.MethodTypeFieldKey),
		}
		unary = append(unary, logging.UnaryServerInterceptor(slogAdapter(o.Logger), lopts...))
		stream = append(stream, logging.StreamServerInterceptor(slogAdapter(o.Logger), lopts...))
	}
	if o.Shutdown != nil {
		stream = append(stream, shutdownAux(o.Shutdown))
	}
	// Before auth: a unary request is decoded before any interceptor runs,
	// so its parse error must be collected even if auth refuses the call.
	unary = append(unary, checkParsedUnary)
	stream = append(stream, checkParsedStream)
	if o.Tokens != nil {
		protected := selector.MatchFunc(func(_ context.Context, c interceptors.CallMeta) bool { return !openServices[c.Service] })
		unary = append(unary, selector.UnaryServerInterceptor(auth.UnaryServerInterceptor(o.Tokens.Authenticate), protected))
		stream = append(stream, selector.StreamServerInterceptor(auth.StreamServerInterceptor(o.Tokens.Authenticate), protected))
	}
	if o.Load != nil {
		unary = append(unary, recordLoadUnary)
		stream = append(stream, recordLoadStream)
	}
	ropt := recovery.WithRecoveryHandlerContext(recoverer(o.Logger, o.Metrics))
	unary = append(unary, recovery.UnaryServerInterceptor(ropt))
	stream = append(stream, recovery.StreamServerInterceptor(ropt))
	opts = append(opts, grpc.ForceServerCodecV2(newClientCodec()))
	return append(opts, grpc.ChainUnaryInterceptor(unary...), grpc.ChainStreamInterceptor(stream...))
}

// recoverer turns a panic in a handler into an INTERNAL status, logging the
// stack; the server goes on serving.
func recoverer(log *slog.Logger, m *Metrics) recovery.RecoveryHandlerFuncContext {
	return func(ctx context.Context, p any) error {
		if log != nil {
			log.ErrorContext(ctx, "panic in handler", "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
		}
		if m != nil {
			m.panics.Inc()
		}
		return status.Error(codes.Internal, "internal error")
	}
}

// codeToLevel logs overload and shutdown refusals at Info: they are how
// kvgate answers load by design and are counted in the metrics. Auth and
// precondition failures are warnings, server faults errors.
func codeToLevel(c codes.Code) logging.Level {
	switch c {
	case codes.OK, codes.Canceled, codes.InvalidArgument, codes.NotFound, codes.AlreadyExists,
		codes.ResourceExhausted, codes.Unavailable, codes.DeadlineExceeded:
		return logging.LevelInfo
	case codes.Unauthenticated, codes.PermissionDenied, codes.FailedPrecondition, codes.Aborted, codes.OutOfRange:
		return logging.LevelWarn
	}
	return logging.LevelError
}

// slogAdapter makes a go-grpc-middleware logger of a slog.Logger.
func slogAdapter(l *slog.Logger) logging.Logger {
	return logging.LoggerFunc(func(ctx context.Context, lvl logging.Level, msg string, fields ...any) {
		l.Log(ctx, slog.Level(lvl), msg, fields...)
	})
}

type callStatsKey struct{}

// callStats returns the CallStats reader that the annotation interceptor
// put in ctx, or nil.
func callStats(ctx context.Context) func() CallStats {
	f, _ := ctx.Value(callStatsKey{}).(func() CallStats)
	return f
}

// callFields gives the log line of an annotated call its request id,
// tenant, token counts and queue wait. The logging interceptor calls it again when the call ends,
// and those values win.
func callFields(ctx context.Context) logging.Fields {
	f := callStats(ctx)
	if f == nil {
		return nil
	}
	s := f()
	fields := logging.Fields{}
	if s.RequestID != "" {
		fields = append(fields, "request_id", s.RequestID)
	}
	if s.Tenant != "" {
		fields = append(fields, "tenant", s.Tenant)
	}
	return append(fields,
		"prompt_tokens", s.PromptTokens,
		"cached_tokens", s.CachedTokens,
		"completion_tokens", s.CompletionTokens,
		"queue_wait_ms", float64(s.QueueWait.Microseconds())/1000,
	)
}

func annotateUnary(a Annotator) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		ctx, f := a(ctx, info.FullMethod)
		if f != nil {
			ctx = context.WithValue(ctx, callStatsKey{}, f)
		}
		return handler(ctx, req)
	}
}

func annotateStream(a Annotator) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		ctx, f := a(ss.Context(), info.FullMethod)
		if f != nil {
			ctx = context.WithValue(ctx, callStatsKey{}, f)
		}
		return handler(srv, &ctxStream{ServerStream: ss, ctx: ctx})
	}
}

// ctxStream is a ServerStream with its context replaced.
type ctxStream struct {
	grpc.ServerStream
	ctx context.Context
}

// Context returns the replaced context.
func (s *ctxStream) Context() context.Context { return s.ctx }

// shutdownAux cancels the streams of every service but kvgate's own once
// shutdown is done. kvgate's streams end through the engine instead, with
// UNAVAILABLE.
func shutdownAux(shutdown context.Context) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if strings.HasPrefix(info.FullMethod, kvgateServicePrefix) {
			return handler(srv, ss)
		}
		ctx, cancel := context.WithCancel(ss.Context())
		defer cancel()
		stop := context.AfterFunc(shutdown, cancel)
		defer stop()
		return handler(srv, &ctxStream{ServerStream: ss, ctx: ctx})
	}
}

// recordLoad makes sure a call to kvgate's services carries an ORCA load
// report in its trailer (orca.CallMetricsServerOption sends one only for
// calls that asked for a recorder) and adds the call's own cost in KV
// cells.
func recordLoad(ctx context.Context, fullMethod string) func() {
	if !strings.HasPrefix(fullMethod, kvgateServicePrefix) {
		return func() {}
	}
	rec := orca.CallMetricsRecorderFromContext(ctx)
	if rec == nil {
		return func() {}
	}
	return func() {
		if f := callStats(ctx); f != nil {
			s := f()
			rec.SetRequestCost("kv_cells", float64(s.PromptTokens+s.CompletionTokens))
		}
	}
}

func recordLoadUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	done := recordLoad(ctx, info.FullMethod)
	defer done()
	return handler(ctx, req)
}

func recordLoadStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	done := recordLoad(ss.Context(), info.FullMethod)
	defer done()
	return handler(srv, ss)
}
