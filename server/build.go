package server

// This file is the whole of the server's wiring of the model (the cgo
// binding, native/llama), the decode worker (native) with its allocator,
// and the service: build, and the parts it returns. Nothing else in the
// package knows the engine's or the allocator's types.

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/kvgate/kvgate/allocator"
	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/internal/chat"
	"github.com/kvgate/kvgate/internal/obs"
	"github.com/kvgate/kvgate/native"
	"github.com/kvgate/kvgate/native/llama"
	"github.com/kvgate/kvgate/service"
)

// Sequence-id bounds that Config.Validate checks MaxSeqs against.
const (
	// maxSequenceIDs is the most sequence ids a context has.
	maxSequenceIDs = native.MaxSequenceIDs
	// retiredSequence is the first of the ids Deterministic keeps for
	// itself.
	retiredSequence = native.RetiredSequence
)

// buildDeps are what build wires in beside the Config.
type buildDeps struct {
	security *security
	metrics  *obs.Metrics // nil without MetricsListen
}

// parts are what build makes: the service, and what Server needs of the
// model and the engine beneath it, through the methods below.
type parts struct {
	svc *service.Service

	// What the "kvgate ready" line says.
	modelPath string
	arch      string
	cells     int
	batch     int

	model  *llama.Model
	engine *native.Engine // nil with --model none
	alloc  *allocator.Allocator

	// embed is the embedding model's part (server/embed.go).
	embed *embedParts
}

// build loads the model at path and builds the engine (which creates the
// allocator) and the service on it: this is where the real llama.cpp
// binding is wired into the decode worker. The load stops early when ctx
// is done.
func build(ctx context.Context, c *Config, log *slog.Logger, path string, d buildDeps) (*parts, error) {
	var opts llama.LoadOptions
	if c.Progress != nil {
		opts.Progress = func(f float32) { c.Progress(path, f) }
	}
	start := time.Now()
	model, err := llama.LoadModelContext(ctx, path, opts)
	if err != nil {
		return nil, err
	}
	info := model.Info()
	log.Info("model loaded", "path", path, "arch", info.Architecture, "params", info.ParameterCount,
		"vocab", info.VocabSize, "ctx_train", info.TrainingContext, "took", time.Since(start).Round(time.Millisecond))

	policy, err := admissionPolicy(c.Admission)
	if err != nil {
		model.Close()
		return nil, err
	}
	tenants := tenantPolicy{tokens: d.security.tokens, maxPriority: int32(c.MaxPriority), maxShare: c.TenantMaxShare, maxQueued: c.TenantMaxQueued}
	seqIDs, contextSeqs := c.MaxSeqs, c.MaxSeqs
	switch {
	case c.KVLayout == LayoutStreams:
		// One stream per sequence id: the running ones, and with the
		// prefix cache the streams its entries keep.
		seqIDs = c.streams()
		contextSeqs = seqIDs
	case c.PrefixCache:
		seqIDs = native.MaxSequenceIDs // the ids beyond running ones hold cached prefixes
	}
	params := llama.ContextParams{Cells: c.Ctx, Batch: c.Batch, MaxSequences: contextSeqs, Threads: c.llamaThreads(), KVType: c.KVType,
		Streams: c.KVLayout == LayoutStreams}
	ecfg := native.EngineConfig{
		Open:  func() (native.Backend, error) { return llama.NewContext(model, params) },
		Vocab: model,
		Admission: allocator.Config{
			MaxSequences:      seqIDs,
			MaxRunning:        c.MaxSeqs,
			MaxQueue:          c.MaxQueue,
			MaxSequenceTokens: info.TrainingContext,
			PrefixCache:       c.PrefixCache,
			Policy:            policy,
			Watermark:         c.Watermark,
			Tenants:           tenants.limits,
		},
		StreamBuffer:  c.StreamBuffer,
		Deterministic: c.Deterministic,
		TuneThreads:   c.TuneThreads,
	}
	if d.metrics != nil {
		ecfg.OnStep = d.metrics.OnStep
	}
	engine, err := native.NewEngine(ecfg)
	if err != nil {
		model.Close()
		return nil, fmt.Errorf("create llama.cpp context: %w", err)
	}

	limits := service.DefaultLimits()
	limits.MaxStopStrings = c.MaxStop
	limits.MaxSequenceTokens = min(engine.SequenceCells(), info.TrainingContext)
	limits.MaxPromptTokens = c.MaxPromptTokens
	limits.MaxCompletionTokens = c.MaxCompletionTokens
	limits.MaxPromptBytes = c.MaxPromptBytes
	limits.DefaultMaxTokens = c.DefaultMaxTokens
	scfg := service.Config{
		Limits: limits, Cells: engine.Cells(), MaxSequences: c.MaxSeqs, MaxQueue: c.MaxQueue,
		AdmissionPolicy: policy.String(), PrefixCache: c.PrefixCache, Deterministic: c.Deterministic,
		Tenant: tenants.of, MaxTokenizeBytes: c.MaxTokenizeBytes, WorkBudget: c.TokenizerBudget,
		SystemInfo: llama.SystemInfo(),
	}
	if d.metrics != nil {
		scfg.Observer = d.metrics
	}
	scfg.Chat, scfg.MaxChatMessages = chatTemplate(c, model, log), c.MaxChatMessages
	svc := service.New(scfg, model, engineAdapter{engine})
	return &parts{
		svc:       svc,
		modelPath: info.Path,
		arch:      info.Architecture,
		cells:     engine.Cells(),
		batch:     engine.Batch(),
		model:     model,
		engine:    engine,
		alloc:     engine.Allocator(),
	}, nil
}

// requests returns the requests running and queued, embedding requests
// included.
func (p *parts) requests() (running, queued int) {
	running, queued = p.embed.requests()
	if p.alloc != nil {
		st := p.alloc.Stats()
		running, queued = running+st.Running, queued+st.Queued
	}
	return running, queued
}

// stopAdmitting refuses every later request with DRAINING.
func (p *parts) stopAdmitting() {
	if p.alloc != nil {
		p.alloc.Drain()
	}
	p.embed.stopAdmitting()
}

// idle returns a channel closed once no request runs or waits.
func (p *parts) idle() <-chan struct{} {
	gen := (<-chan struct{})(closedChan)
	if p.alloc != nil {
		gen = p.alloc.Idle()
	}
	return bothIdle(gen, p.embed.idle())
}

// stop ends whatever still runs with UNAVAILABLE and frees the cells of
// the prefix cache, which goes with the context; it returns how many
// cells the cache held.
func (p *parts) stop() int {
	p.embed.close()
	if p.engine == nil {
		return 0
	}
	p.engine.Close()
	return p.alloc.FlushCache()
}

// close frees the engines and the models. The services must no longer be
// called.
func (p *parts) close() {
	p.embed.close()
	if p.engine != nil {
		p.engine.Close()
		p.model.Close()
	}
}

// publish hands the services to the gate.
func (p *parts) publish(g *service.Gate) {
	if p.svc == nil {
		g.NoGeneration()
	} else {
		g.Ready(p.svc)
	}
	g.ReadyEmbed(p.embed.svc)
}

// serves reports whether the health service name (see servedNames) has
// its model: the generation services need the generation model, the
// embedding service the embedding model, and the server as a whole ("")
// serves when everything it was configured with does.
func (p *parts) serves(name string) bool {
	switch name {
	case kvgatev1.EmbeddingService_ServiceDesc.ServiceName:
		return p.embed.engine != nil
	case "":
		return true
	}
	return p.engine != nil
}

// sequenceCells and threads are the generation engine's, for the ready
// line; 0 without a generation model.
func (p *parts) sequenceCells() int {
	if p.engine == nil {
		return 0
	}
	return p.engine.SequenceCells()
}

func (p *parts) threads() int64 {
	if p.engine == nil {
		return 0
	}
	return p.engine.Stats().Threads
}

// admissionPolicy parses Config.Admission.
func admissionPolicy(s string) (allocator.Policy, error) {
	switch s {
	case "reserve":
		return allocator.PolicyReserve, nil
	case "optimistic":
		return allocator.PolicyOptimistic, nil
	}
	return 0, fmt.Errorf("--admission %q: want reserve or optimistic", s)
}

// limits returns the allocator's view of a tenant.
func (p tenantPolicy) limits(name string) allocator.TenantLimits {
	t := p.tenant(name)
	return allocator.TenantLimits{Weight: t.Weight, MaxShare: t.MaxShare, MaxQueued: t.MaxQueued}
}

// engineAdapter is the engine as the service sees it.
type engineAdapter struct{ e *native.Engine }

// Submit admits r (blocking while it is queued) and starts it.
func (a engineAdapter) Submit(ctx context.Context, r native.Request) (service.Stream, error) {
	s, err := a.e.Submit(ctx, r)
	if err != nil {
		return nil, err // not a nil *native.Stream in a non-nil interface
	}
	return s, nil
}

// Stats returns a snapshot of the allocator and the worker.
func (a engineAdapter) Stats() service.Stats {
	return service.Stats{Allocator: a.e.Allocator().Stats(), Engine: a.e.Stats()}
}

// chatTemplate returns the template that renders conversations: the
// built-in Config.ChatTemplate names (Validate checked the name), or the
// model's own; nil, logged, when the model has none llama.cpp recognizes,
// so that conversations get FAILED_PRECONDITION (NO_CHAT_TEMPLATE).
func chatTemplate(c *Config, model *llama.Model, log *slog.Logger) *chat.Template {
	t, err := model.ChatTemplate(c.ChatTemplate)
	if err != nil {
		log.Info("no chat template: conversations will be refused", "reason", err.Error())
		return nil
	}
	log.Info("chat template", "name", t.Name(), "from", map[bool]string{true: "--chat-template", false: "model"}[c.ChatTemplate != ""])
	return t
}
