package service

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/kvgate/kvgate/allocator"
	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/native"
)

// The tests in this file drive Service.Generate through a real in-process
// gRPC server (bufconn) against a fake Engine whose streams the test
// steps by hand: every event, every end and every held send is an explicit
// step of the test, so what the client sees depends on counts and order,
// never on timing. The only clock a test waits on is a context deadline,
// in TestGenerateDeadline, and there it asserts codes, not durations.

// watchdog bounds every wait of these tests on the server, so that a broken
// service fails the test with a message instead of hanging it. It is never
// what a passing test waits for.
const watchdog = 30 * time.Second

// defaultBuffer is the fake engine's stream buffer when a test does not
// choose one. It is small, so that tests can fill it.
const defaultBuffer = 16

// fakeModel is fakeTokenizer with the text side of a model: token id n
// reads "<n>".
type fakeModel struct{ fakeTokenizer }

// Detokenize returns the concatenated pieces of ids.
func (m fakeModel) Detokenize(ids []int32, _ native.DetokenizeOptions) (string, error) {
	var b []byte
	for _, id := range ids {
		b = m.AppendPiece(b, id, false, false)
	}
	return string(b), nil
}

// AppendPiece appends "<tok>" to dst.
func (fakeModel) AppendPiece(dst []byte, tok int32, _, _ bool) []byte {
	return fmt.Appendf(dst, "<%d>", tok)
}

// fakeStream is a Stream that keeps native.Stream's contract: its events
// wait on a buffered channel that is closed after the last one, its Result
// is set before that close (so it is valid once Events is closed), and
// Failed is true from the moment the sequence ends with an error. Like the
// engine's worker it never blocks: emitting into a full buffer ends the
// sequence with native.ErrSlowConsumer. The test steps it with emit and
// end.
type fakeStream struct {
	req    native.Request
	ctx    context.Context // Submit's ctx: the sequence's context
	events chan native.Event
	cached int
	failed atomic.Bool
	result native.Result

	mu        sync.Mutex
	ended     bool
	generated int // tokens emitted, for the slow-consumer Result
}

// Events returns the stream's events, closed after the last.
func (s *fakeStream) Events() <-chan native.Event { return s.events }

// Result returns how the sequence ended; it is valid once Events is closed.
func (s *fakeStream) Result() native.Result { return s.result }

// Results returns the one sample's result.
func (s *fakeStream) Results() []native.Result { return []native.Result{s.result} }

// Failed reports whether the sequence has ended with an error.
func (s *fakeStream) Failed() bool { return s.failed.Load() }

// CachedTokens returns the prompt tokens the fake pretends to have shared
// from the prefix cache.
func (s *fakeStream) CachedTokens() int { return s.cached }

// emit queues ev without blocking, as the engine's emit does: when the
// buffer is full it ends the sequence with native.ErrSlowConsumer and
// returns false. Emitting after the end is a bug of the test.
func (s *fakeStream) emit(t *testing.T, ev native.Event) bool {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ended {
		t.Fatalf("emit %q after the stream ended", ev.Text)
	}
	select {
	case s.events <- ev:
		s.generated += len(ev.Tokens)
		return true
	default:
		s.endLocked(native.Result{Err: native.ErrSlowConsumer, CompletionTokens: s.generated})
		return false
	}
}

// end ends the sequence with res, unless it has already ended, and reports
// whether it did.
func (s *fakeStream) end(res native.Result) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ended {
		return false
	}
	s.endLocked(res)
	return true
}

// endLocked sets the result, marks a failure, and closes the events, in
// the engine's order: Failed and Result are set before the close that
// makes them valid to the reader.
func (s *fakeStream) endLocked(res native.Result) {
	if res.Ended.IsZero() {
		res.Ended = time.Now()
	}
	if res.Err != nil {
		s.failed.Store(true)
	}
	s.result = res
	s.ended = true
	close(s.events)
}

// fakeEngine is an Engine whose Submit either refuses with a fixed error
// or starts a fakeStream and hands it to the test through submitted.
type fakeEngine struct {
	buffer int   // stream buffer capacity
	cached int   // CachedTokens of every stream
	refuse error // when set, Submit returns it

	submitted chan *fakeStream // every Submit call, in order

	mu      sync.Mutex
	streams []*fakeStream
}

// newFakeEngine returns a fake engine whose streams buffer buffer events
// and report cached prompt tokens shared from the cache.
func newFakeEngine(buffer, cached int) *fakeEngine {
	return &fakeEngine{buffer: buffer, cached: cached, submitted: make(chan *fakeStream, 16)}
}

// Submit records the request and returns a new stream, or the refusal.
// A refused call's stream is handed over already ended, for its request.
func (e *fakeEngine) Submit(ctx context.Context, req native.Request) (Stream, error) {
	s := &fakeStream{req: req, ctx: ctx, events: make(chan native.Event, e.buffer), cached: e.cached}
	if e.refuse != nil {
		s.ended = true
		e.submitted <- s
		return nil, e.refuse
	}
	e.mu.Lock()
	e.streams = append(e.streams, s)
	e.mu.Unlock()
	e.submitted <- s
	return s, nil
}

// Stats returns an empty snapshot.
func (e *fakeEngine) Stats() Stats { return Stats{} }

// endAll ends every stream still running with native.ErrEngineClosed, as
// closing the engine does, so that no handler is left waiting on one.
func (e *fakeEngine) endAll() {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, s := range e.streams {
		s.end(native.Result{Err: native.ErrEngineClosed})
	}
}

// next returns the stream of the next Submit call.
func (e *fakeEngine) next(t *testing.T) *fakeStream {
	t.Helper()
	return waitFor(t, e.submitted, "Submit")
}

// finishedCall is one Observer.Finished call.
type finishedCall struct {
	code                     string
	promptTokens, completion int
}

// recordingObserver counts the latencies it is given and hands every
// Finished call to the test.
type recordingObserver struct {
	mu                                   sync.Mutex
	queueWaits, firstTokens, interTokens int
	finished                             chan finishedCall
}

// QueueWait counts an admission.
func (o *recordingObserver) QueueWait(time.Duration) {
	o.mu.Lock()
	o.queueWaits++
	o.mu.Unlock()
}

// TimeToFirstToken counts a first chunk.
func (o *recordingObserver) TimeToFirstToken(time.Duration) {
	o.mu.Lock()
	o.firstTokens++
	o.mu.Unlock()
}

// InterToken counts a chunk after the first.
func (o *recordingObserver) InterToken(time.Duration) {
	o.mu.Lock()
	o.interTokens++
	o.mu.Unlock()
}

// Finished hands the call's end to the test.
func (o *recordingObserver) Finished(code string, promptTokens, completionTokens int) {
	o.finished <- finishedCall{code, promptTokens, completionTokens}
}

// counts returns the QueueWait, TimeToFirstToken and InterToken counts.
func (o *recordingObserver) counts() (queueWaits, firstTokens, interTokens int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.queueWaits, o.firstTokens, o.interTokens
}

// heldSend is one server-side SendMsg held back by the test: entered is
// closed once the handler is inside it (its message taken from the stream,
// not yet handed to the transport), and release lets it go on.
type heldSend struct {
	entered chan struct{}
	release chan struct{}
	once    sync.Once
}

// let releases the held send; it may be called more than once.
func (h *heldSend) let() { h.once.Do(func() { close(h.release) }) }

// sendHook holds back the next server-side SendMsg when the test asks. It
// stands in for a client that does not read: a transport whose flow-control
// window is full blocks the handler in Send exactly so, but only after an
// amount of data that depends on gRPC's windows, where the hook blocks it
// at a chosen message.
type sendHook struct {
	mu   sync.Mutex
	next *heldSend
}

// holdNext makes the next SendMsg of any call wait until the returned
// heldSend is released; the test's cleanup releases it in any case.
func (h *sendHook) holdNext(t *testing.T) *heldSend {
	hs := &heldSend{entered: make(chan struct{}), release: make(chan struct{})}
	h.mu.Lock()
	h.next = hs
	h.mu.Unlock()
	t.Cleanup(hs.let)
	return hs
}

// take returns the armed heldSend, if any, disarming it.
func (h *sendHook) take() *heldSend {
	h.mu.Lock()
	defer h.mu.Unlock()
	hs := h.next
	h.next = nil
	return hs
}

// hookedStream is a server stream whose context carries a CallInfo and
// whose SendMsg obeys the sendHook.
type hookedStream struct {
	grpc.ServerStream
	ctx  context.Context
	hook *sendHook
}

// Context returns the call's context, with its CallInfo.
func (s *hookedStream) Context() context.Context { return s.ctx }

// SendMsg waits while the test holds it, then sends m.
func (s *hookedStream) SendMsg(m any) error {
	if hs := s.hook.take(); hs != nil {
		close(hs.entered)
		select {
		case <-hs.release:
		case <-s.ctx.Done():
		}
	}
	return s.ServerStream.SendMsg(m)
}

// harness is a Service served over bufconn with a fake engine, and a
// client of it.
type harness struct {
	client kvgatev1.GenerateServiceClient
	engine *fakeEngine
	obs    *recordingObserver
	hook   *sendHook
	calls  chan *CallInfo // the CallInfo of every call, as it starts
}

// newHarness serves a Service over e and returns a connected client. Its
// cleanup ends the fake's streams, stops the server, waiting for every
// handler to return (grpc.WaitForHandlers), and waits for Serve to return.
func newHarness(t *testing.T, e *fakeEngine) *harness {
	t.Helper()
	h := &harness{
		engine: e,
		obs:    &recordingObserver{finished: make(chan finishedCall, 16)},
		hook:   &sendHook{},
		calls:  make(chan *CallInfo, 16),
	}
	lim := DefaultLimits()
	lim.MaxSequenceTokens = 256
	svc := New(Config{Limits: lim, Observer: h.obs, Cells: 256, MaxSequences: 4, MaxQueue: 4}, fakeModel{}, e)
	intercept := func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		ctx, ci := WithCallInfo(ss.Context())
		h.calls <- ci
		return handler(srv, &hookedStream{ServerStream: ss, ctx: ctx, hook: h.hook})
	}
	srv := grpc.NewServer(grpc.StreamInterceptor(intercept), grpc.WaitForHandlers(true))
	svc.Register(srv)
	lis := bufconn.Listen(1 << 20)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		e.endAll()
		_ = conn.Close()
		srv.Stop()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	h.client = kvgatev1.NewGenerateServiceClient(conn)
	return h
}

// generate starts a Generate call on ctx and returns its stream.
func (h *harness) generate(t *testing.T, ctx context.Context, req *kvgatev1.GenerateRequest) grpc.ServerStreamingClient[kvgatev1.GenerateResponse] {
	t.Helper()
	st, err := h.client.Generate(ctx, req)
	if err != nil {
		t.Fatalf("Generate: %v", err)
	}
	return st
}

// finished returns the Observer's Finished call of the next call to end:
// it comes once the handler has returned.
func (h *harness) finished(t *testing.T) finishedCall {
	t.Helper()
	return waitFor(t, h.obs.finished, "Observer.Finished")
}

// waitFor receives from ch, failing the test if nothing comes within the
// watchdog.
func waitFor[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(watchdog):
		t.Fatalf("no %s within %v", what, watchdog)
		var zero T
		return zero
	}
}

// waitDone waits for ctx to be done, failing the test if it is not within
// the watchdog.
func waitDone(t *testing.T, ctx context.Context, what string) {
	t.Helper()
	select {
	case <-ctx.Done():
	case <-time.After(watchdog):
		t.Fatalf("%s not done within %v", what, watchdog)
	}
}

// tokens returns a request whose prompt is ids.
func tokens(maxTokens uint32, ids ...int32) *kvgatev1.GenerateRequest {
	return &kvgatev1.GenerateRequest{Prompt: &kvgatev1.GenerateRequest_Tokens{Tokens: &kvgatev1.TokenList{Ids: ids}}, MaxTokens: maxTokens}
}

// recv receives the next message, failing the test on an error.
func recv(t *testing.T, st grpc.ServerStreamingClient[kvgatev1.GenerateResponse], want string) *kvgatev1.GenerateResponse {
	t.Helper()
	m, err := st.Recv()
	if err != nil {
		t.Fatalf("Recv (want %s): %v", want, err)
	}
	return m
}

// recvStarted receives the next message, which must be Started.
func recvStarted(t *testing.T, st grpc.ServerStreamingClient[kvgatev1.GenerateResponse]) *kvgatev1.Started {
	t.Helper()
	m := recv(t, st, "Started")
	if m.GetStarted() == nil {
		t.Fatalf("got %v, want Started", m)
	}
	return m.GetStarted()
}

// recvChunk receives the next message, which must be a Chunk.
func recvChunk(t *testing.T, st grpc.ServerStreamingClient[kvgatev1.GenerateResponse]) *kvgatev1.Chunk {
	t.Helper()
	m := recv(t, st, "Chunk")
	if m.GetChunk() == nil {
		t.Fatalf("got %v, want a Chunk", m)
	}
	return m.GetChunk()
}

// recvStatus receives the next message, which must be the call's error,
// and returns its status.
func recvStatus(t *testing.T, st grpc.ServerStreamingClient[kvgatev1.GenerateResponse]) *status.Status {
	t.Helper()
	m, err := st.Recv()
	if err == nil {
		t.Fatalf("got %v, want the call's error", m)
	}
	if err == io.EOF {
		t.Fatal("the call ended OK, want an error")
	}
	s, ok := status.FromError(err)
	if !ok {
		t.Fatalf("error %v has no status", err)
	}
	return s
}

// sameEvent reports whether chunk carries exactly ev's text and ids.
func sameEvent(chunk *kvgatev1.Chunk, ev native.Event) bool {
	return chunk.GetText() == ev.Text && slices.Equal(chunk.GetTokenIds(), ev.Tokens)
}

// concat returns the events' texts and ids, concatenated in order.
func concat(evs []native.Event) (string, []int32) {
	var b strings.Builder
	var ids []int32
	for _, ev := range evs {
		b.WriteString(ev.Text)
		ids = append(ids, ev.Tokens...)
	}
	return b.String(), ids
}

// numbered returns n events, "e<from>" on, each of one or two token ids
// derived from its number, so that any loss, duplication or reordering
// changes both the text and the ids.
func numbered(from, n int) []native.Event {
	evs := make([]native.Event, n)
	for i := range evs {
		k := from + i
		toks := []int32{int32(1000 + 2*k)}
		if k%2 == 1 {
			toks = append(toks, int32(1001+2*k))
		}
		evs[i] = native.Event{Text: fmt.Sprintf("e%d ", k), Tokens: toks, Step: uint64(k + 1)}
	}
	return evs
}

// statusDetails returns st's ErrorInfo and RetryInfo, nil where absent, and
// the fields of its BadRequest violations.
func statusDetails(t *testing.T, st *status.Status) (*errdetails.ErrorInfo, *errdetails.RetryInfo, []string) {
	t.Helper()
	var (
		info   *errdetails.ErrorInfo
		retry  *errdetails.RetryInfo
		fields []string
	)
	for _, d := range st.Details() {
		switch d := d.(type) {
		case *errdetails.ErrorInfo:
			info = d
		case *errdetails.RetryInfo:
			retry = d
		case *errdetails.BadRequest:
			for _, v := range d.GetFieldViolations() {
				fields = append(fields, v.GetField())
			}
		case error:
			t.Errorf("undecodable status detail: %v", d)
		}
	}
	return info, retry, fields
}

// checkReason checks that st carries an ErrorInfo of kvgate's domain with
// the given reason, or none when reason is empty.
func checkReason(t *testing.T, st *status.Status, reason string) {
	t.Helper()
	info, _, _ := statusDetails(t, st)
	switch {
	case reason == "" && info != nil:
		t.Errorf("ErrorInfo %v, want none", info)
	case reason != "" && info == nil:
		t.Errorf("no ErrorInfo, want reason %s", reason)
	case reason != "" && (info.GetReason() != reason || info.GetDomain() != ErrorDomain):
		t.Errorf("ErrorInfo %s/%s, want %s/%s", info.GetDomain(), info.GetReason(), ErrorDomain, reason)
	}
}

// TestGenerateEventOrder checks what a client reading in step with the
// engine sees: Started with the prompt and cached counts and the request
// id, sent once the engine has admitted the call and before any event;
// then one Chunk per event, in order, with exactly its text and ids; then
// Finished with the Result's reason, stop string and usage; then the end
// of the stream. It also checks the request handed to Submit, the
// CallInfo, and the Observer's counts.
func TestGenerateEventOrder(t *testing.T) {
	tests := []struct {
		name       string
		req        *kvgatev1.GenerateRequest
		prompt     []int32 // the prompt Submit must get
		cached     int
		events     []native.Event
		result     native.Result
		wantReason kvgatev1.FinishReason
	}{
		{
			name:   "token prompt, EOS",
			req:    &kvgatev1.GenerateRequest{Prompt: &kvgatev1.GenerateRequest_Tokens{Tokens: &kvgatev1.TokenList{Ids: []int32{5, 6, 7, 8}}}, MaxTokens: 9, RequestId: "req-1", Priority: 3, SkipPrefixCache: true, CacheSalt: "salt", QueueTimeoutMs: 1500},
			prompt: []int32{5, 6, 7, 8},
			cached: 2,
			events: []native.Event{
				{Text: "Hello", Tokens: []int32{10}, Step: 1},
				{Text: ", wor", Tokens: []int32{11, 12}, Step: 2},
				{Text: "ld", Tokens: []int32{13}, Step: 3},
			},
			result:     native.Result{Reason: native.FinishEOS, PromptTokens: 4, CachedTokens: 2, CompletionTokens: 5},
			wantReason: kvgatev1.FinishReason_FINISH_REASON_EOS,
		},
		{
			name:   "text prompt, stop string",
			req:    &kvgatev1.GenerateRequest{Prompt: &kvgatev1.GenerateRequest_Text{Text: "a b c d"}, MaxTokens: 32, Stop: []string{"</s>", "\n\n"}, RequestId: "stop-call"},
			prompt: []int32{1, 2, 3, 4, 5}, // fakeTokenizer: BOS and one id per word
			events: []native.Event{
				{Text: "héllo ", Tokens: []int32{20, 21}, Step: 1},
				{Text: "世界", Tokens: []int32{22, 23, 24}, Step: 2},
			},
			result:     native.Result{Reason: native.FinishStop, StopString: "</s>", PromptTokens: 5, CompletionTokens: 7},
			wantReason: kvgatev1.FinishReason_FINISH_REASON_STOP,
		},
		{
			// Started reports the cells the admission found cached
			// (Stream.CachedTokens), Usage what the engine shared
			// (Result.CachedTokens); they may differ. No request id:
			// Started echoes the empty one.
			name:       "length, fewer shared than found",
			req:        tokens(4, 9, 9, 9),
			prompt:     []int32{9, 9, 9},
			cached:     3,
			events:     numbered(0, 4),
			result:     native.Result{Reason: native.FinishLength, PromptTokens: 3, CachedTokens: 2, CompletionTokens: 4},
			wantReason: kvgatev1.FinishReason_FINISH_REASON_LENGTH,
		},
		{
			name:       "EOS at once, no chunk",
			req:        tokens(4, 1),
			prompt:     []int32{1},
			result:     native.Result{Reason: native.FinishEOS, PromptTokens: 1, CompletionTokens: 1},
			wantReason: kvgatev1.FinishReason_FINISH_REASON_EOS,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, newFakeEngine(defaultBuffer, tt.cached))
			st := h.generate(t, t.Context(), tt.req)
			s := h.engine.next(t)

			r := s.req
			if !slices.Equal(r.Prompt, tt.prompt) || r.MaxTokens != int(tt.req.GetMaxTokens()) || !slices.Equal(r.Stop, tt.req.GetStop()) ||
				r.Priority != tt.req.GetPriority() || r.Tenant != DefaultTenant.Name || r.NoCache != tt.req.GetSkipPrefixCache() ||
				r.CacheSalt != tt.req.GetCacheSalt() || r.QueueTimeout != time.Duration(tt.req.GetQueueTimeoutMs())*time.Millisecond {
				t.Errorf("Submit got prompt %v max_tokens %d stop %q priority %d tenant %q no_cache %v salt %q queue_timeout %v; want them from %v with prompt %v",
					r.Prompt, r.MaxTokens, r.Stop, r.Priority, r.Tenant, r.NoCache, r.CacheSalt, r.QueueTimeout, tt.req, tt.prompt)
			}
			if s.ctx == nil {
				t.Fatal("Submit got no ctx")
			}

			// Nothing has been emitted yet, so the first message can
			// only be Started.
			started := recvStarted(t, st)
			if started.GetRequestId() != tt.req.GetRequestId() || started.GetPromptTokens() != uint32(len(tt.prompt)) ||
				started.GetCachedPromptTokens() != uint32(tt.cached) {
				t.Errorf("Started %v, want request_id %q, prompt_tokens %d, cached_prompt_tokens %d",
					started, tt.req.GetRequestId(), len(tt.prompt), tt.cached)
			}
			// In step: each event is emitted once the previous chunk has
			// arrived, so no two are ever queued together.
			for i, ev := range tt.events {
				if !s.emit(t, ev) {
					t.Fatalf("event %d: the buffer is full", i)
				}
				if c := recvChunk(t, st); !sameEvent(c, ev) {
					t.Errorf("chunk %d: %q %v, want %q %v", i, c.GetText(), c.GetTokenIds(), ev.Text, ev.Tokens)
				}
			}
			s.end(tt.result)
			m := recv(t, st, "Finished")
			f := m.GetFinished()
			if f == nil {
				t.Fatalf("got %v, want Finished", m)
			}
			u := f.GetUsage()
			if f.GetReason() != tt.wantReason || f.GetStop() != tt.result.StopString ||
				u.GetPromptTokens() != uint32(tt.result.PromptTokens) || u.GetCachedTokens() != uint32(tt.result.CachedTokens) ||
				u.GetCompletionTokens() != uint32(tt.result.CompletionTokens) {
				t.Errorf("Finished %v, want reason %v stop %q usage %d/%d/%d", f, tt.wantReason, tt.result.StopString,
					tt.result.PromptTokens, tt.result.CachedTokens, tt.result.CompletionTokens)
			}
			if m, err := st.Recv(); err != io.EOF {
				t.Errorf("after Finished: %v, %v; want io.EOF", m, err)
			}

			fin := h.finished(t)
			if want := (finishedCall{"OK", len(tt.prompt), tt.result.CompletionTokens}); fin != want {
				t.Errorf("Observer.Finished %+v, want %+v", fin, want)
			}
			waits, firsts, inters := h.obs.counts()
			wantFirst := min(len(tt.events), 1)
			if waits != 1 || firsts != wantFirst || inters != len(tt.events)-wantFirst {
				t.Errorf("Observer: %d queue waits, %d first tokens, %d inter-token; want 1, %d, %d",
					waits, firsts, inters, wantFirst, len(tt.events)-wantFirst)
			}
			ci := waitFor(t, h.calls, "CallInfo")
			if ci.RequestID != tt.req.GetRequestId() || ci.Tenant != DefaultTenant.Name || ci.PromptTokens != len(tt.prompt) ||
				ci.CachedTokens != tt.cached || ci.CompletionTokens != tt.result.CompletionTokens {
				t.Errorf("CallInfo %+v", ci)
			}
		})
	}
}

// TestGenerateMergesWhenBehind checks that events queued while the sender
// is behind are merged into fewer chunks once a quarter of the buffer is
// waiting, and that whatever the merging, the chunks' concatenated text
// and ids are exactly the events', in order. The client does not read
// while the fake queues the events; the handler is held inside the Send of
// the chunk before them (see sendHook), so the number waiting when it
// comes back is exactly the number queued.
func TestGenerateMergesWhenBehind(t *testing.T) {
	tests := []struct {
		name   string
		buffer int
		queued int // events queued while the sender is held
		chunks int // chunks they must arrive in
	}{
		// mergeAt is cap/4 = 4: taking the first of 4 leaves 3 waiting,
		// too few to merge.
		{"a quarter of the buffer, not merged", 16, 4, 4},
		{"one more than a quarter, merged", 16, 5, 1},
		{"a full buffer, merged", 16, 16, 1},
		{"a large buffer, below the mark", 64, 16, 16},
		{"a large buffer, at the mark", 64, 17, 1},
		// mergeAt is at least 1: two waiting in a buffer of 2 merge.
		{"a buffer of two", 2, 2, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, newFakeEngine(tt.buffer, 0))
			st := h.generate(t, t.Context(), tokens(200, 1, 2, 3))
			s := h.engine.next(t)
			recvStarted(t, st)

			all := numbered(0, 1+tt.queued+1)
			first, queued, last := all[0], all[1:1+tt.queued], all[1+tt.queued]

			hold := h.hook.holdNext(t)
			if !s.emit(t, first) {
				t.Fatal("first event: the buffer is full")
			}
			// The handler has taken the first event and is sending it.
			waitFor(t, hold.entered, "the first chunk's Send")
			for i, ev := range queued {
				if !s.emit(t, ev) {
					t.Fatalf("queued event %d: the buffer is full", i)
				}
			}
			hold.let()

			if c := recvChunk(t, st); !sameEvent(c, first) {
				t.Fatalf("first chunk %q %v, want %q %v", c.GetText(), c.GetTokenIds(), first.Text, first.Tokens)
			}
			var text strings.Builder
			var ids []int32
			for range tt.chunks {
				c := recvChunk(t, st)
				text.WriteString(c.GetText())
				ids = append(ids, c.GetTokenIds()...)
			}
			wantText, wantIDs := concat(queued)
			if text.String() != wantText || !slices.Equal(ids, wantIDs) {
				t.Fatalf("%d chunks of the queued events: %q %v, want %q %v", tt.chunks, text.String(), ids, wantText, wantIDs)
			}
			// Back in step: the next event is alone, and the stream ends
			// with it, so the queued events came in exactly tt.chunks.
			if !s.emit(t, last) {
				t.Fatal("last event: the buffer is full")
			}
			if c := recvChunk(t, st); !sameEvent(c, last) {
				t.Fatalf("chunk after the queued events: %q %v, want %q %v (the queued events came in more than %d chunks)",
					c.GetText(), c.GetTokenIds(), last.Text, last.Tokens, tt.chunks)
			}
			_, allIDs := concat(all)
			s.end(native.Result{Reason: native.FinishLength, PromptTokens: 3, CompletionTokens: len(allIDs)})
			if m := recv(t, st, "Finished"); m.GetFinished() == nil {
				t.Fatalf("got %v, want Finished", m)
			}
			if m, err := st.Recv(); err != io.EOF {
				t.Errorf("after Finished: %v, %v; want io.EOF", m, err)
			}
			if fin := h.finished(t); fin.code != "OK" || fin.completion != len(allIDs) {
				t.Errorf("Observer.Finished %+v", fin)
			}
			if _, firsts, inters := h.obs.counts(); firsts != 1 || inters != tt.chunks+1 {
				t.Errorf("Observer: %d first tokens, %d inter-token; want 1, %d (one per chunk sent)", firsts, inters, tt.chunks+1)
			}
		})
	}
}

// TestGenerateSlowConsumer checks the cut of a client that reads too
// slowly: the fake fills the buffer while the handler is held in a Send,
// the next event finds it full and ends the sequence with
// native.ErrSlowConsumer, as the engine does. The client then gets
// RESOURCE_EXHAUSTED with reason SLOW_CONSUMER and no retry advice, and
// none of the queued events: the handler drains them unsent once the
// stream has failed, and returns.
func TestGenerateSlowConsumer(t *testing.T) {
	tests := []struct {
		name        string
		chunksFirst int // chunks sent before the handler is held
	}{
		{"before any chunk", 0},
		{"after a chunk", 1},
		{"after several chunks", 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, newFakeEngine(defaultBuffer, 0))
			var hold *heldSend
			if tt.chunksFirst == 0 {
				hold = h.hook.holdNext(t) // Started's Send
			}
			st := h.generate(t, t.Context(), tokens(200, 4, 5))
			s := h.engine.next(t)
			evs := numbered(0, tt.chunksFirst+defaultBuffer+1)
			if tt.chunksFirst == 0 {
				waitFor(t, hold.entered, "Started's Send")
			} else {
				recvStarted(t, st)
				for i, ev := range evs[:tt.chunksFirst-1] {
					s.emit(t, ev)
					if c := recvChunk(t, st); !sameEvent(c, ev) {
						t.Fatalf("chunk %d: %q %v", i, c.GetText(), c.GetTokenIds())
					}
				}
				hold = h.hook.holdNext(t)
				s.emit(t, evs[tt.chunksFirst-1])
				waitFor(t, hold.entered, "a chunk's Send")
			}
			queued := evs[tt.chunksFirst:]
			for i, ev := range queued[:defaultBuffer] {
				if !s.emit(t, ev) {
					t.Fatalf("queued event %d: the buffer is full before it holds %d", i, defaultBuffer)
				}
			}
			if s.emit(t, queued[defaultBuffer]) {
				t.Fatal("an event beyond the buffer was queued")
			}
			if !s.Failed() || !errors.Is(s.Result().Err, native.ErrSlowConsumer) {
				t.Fatalf("the fake did not end the sequence as a slow consumer: failed %v, %v", s.Failed(), s.Result().Err)
			}
			hold.let()

			if tt.chunksFirst == 0 {
				recvStarted(t, st)
			} else if c := recvChunk(t, st); !sameEvent(c, evs[tt.chunksFirst-1]) {
				t.Fatalf("held chunk %q %v", c.GetText(), c.GetTokenIds())
			}
			// The next message is the error: none of the queued events
			// is sent.
			got := recvStatus(t, st)
			if got.Code() != codes.ResourceExhausted {
				t.Fatalf("code %v (%v), want RESOURCE_EXHAUSTED", got.Code(), got.Message())
			}
			checkReason(t, got, ReasonSlowConsumer)
			if _, retry, _ := statusDetails(t, got); retry != nil {
				t.Errorf("RetryInfo %v on a slow-consumer cut", retry)
			}
			if p := st.Trailer().Get(PushbackTrailer); len(p) != 0 {
				t.Errorf("pushback %v on a slow-consumer cut", p)
			}
			var generated int
			for _, ev := range evs[:tt.chunksFirst+defaultBuffer] {
				generated += len(ev.Tokens)
			}
			fin := h.finished(t)
			if want := (finishedCall{"ResourceExhausted", 2, generated}); fin != want {
				t.Errorf("Observer.Finished %+v, want %+v", fin, want)
			}
			if _, firsts, inters := h.obs.counts(); firsts+inters != tt.chunksFirst {
				t.Errorf("Observer counted %d chunks sent, want %d", firsts+inters, tt.chunksFirst)
			}
		})
	}
}

// TestGenerateClientCancel checks a client that cancels mid-stream: the
// context the engine was given ends, with context.Canceled as its cause;
// the fake then ends the sequence with that cause, as the engine's reaper
// does; the client sees CANCELLED and the handler returns, reporting
// Canceled to the Observer.
func TestGenerateClientCancel(t *testing.T) {
	h := newHarness(t, newFakeEngine(defaultBuffer, 0))
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	st := h.generate(t, ctx, tokens(200, 1, 2, 3))
	s := h.engine.next(t)
	if _, ok := s.ctx.Deadline(); ok {
		t.Error("a call without a deadline handed the engine one")
	}
	recvStarted(t, st)
	evs := numbered(0, 2)
	for _, ev := range evs {
		s.emit(t, ev)
		if c := recvChunk(t, st); !sameEvent(c, ev) {
			t.Fatalf("chunk %q %v, want %q %v", c.GetText(), c.GetTokenIds(), ev.Text, ev.Tokens)
		}
	}
	if err := s.ctx.Err(); err != nil {
		t.Fatalf("the engine's context ended before the client cancelled: %v", err)
	}

	cancel()
	waitDone(t, s.ctx, "the context handed to Submit")
	cause := context.Cause(s.ctx)
	if !errors.Is(cause, context.Canceled) {
		t.Errorf("the engine's context ended with %v, want context.Canceled", cause)
	}
	s.end(native.Result{Err: cause, PromptTokens: 3, CompletionTokens: 3})

	if got := recvStatus(t, st); got.Code() != codes.Canceled {
		t.Errorf("client: code %v (%v), want CANCELLED", got.Code(), got.Message())
	}
	if fin := h.finished(t); fin != (finishedCall{"Canceled", 3, 3}) {
		t.Errorf("Observer.Finished %+v, want Canceled with 3 prompt and 3 completion tokens", fin)
	}
}

// TestGenerateDeadline checks a call with a deadline: the context handed
// to the engine ends before the client's deadline (see
// endBeforeDeadline), with context.DeadlineExceeded as its cause; when it
// ends mid-stream and the fake ends the sequence with that cause, client
// and Observer both see DEADLINE_EXCEEDED, not CANCELLED.
func TestGenerateDeadline(t *testing.T) {
	h := newHarness(t, newFakeEngine(defaultBuffer, 0))
	// The deadline must leave time to set the call up and send a chunk;
	// the test then waits for it to pass.
	ctx, cancel := context.WithTimeout(t.Context(), time.Second)
	defer cancel()
	clientDeadline, _ := ctx.Deadline()
	st := h.generate(t, ctx, tokens(200, 1, 2))
	s := h.engine.next(t)
	engineDeadline, ok := s.ctx.Deadline()
	if !ok {
		t.Fatal("the context handed to Submit has no deadline")
	}
	if !engineDeadline.Before(clientDeadline) {
		t.Errorf("the engine's deadline %v is not before the client's %v", engineDeadline, clientDeadline)
	}
	recvStarted(t, st)
	ev := numbered(0, 1)[0]
	s.emit(t, ev)
	if c := recvChunk(t, st); !sameEvent(c, ev) {
		t.Fatalf("chunk %q %v, want %q %v", c.GetText(), c.GetTokenIds(), ev.Text, ev.Tokens)
	}

	waitDone(t, s.ctx, "the context handed to Submit")
	cause := context.Cause(s.ctx)
	if !errors.Is(cause, context.DeadlineExceeded) {
		t.Errorf("the engine's context ended with %v, want context.DeadlineExceeded", cause)
	}
	s.end(native.Result{Err: cause, PromptTokens: 2, CompletionTokens: 1})

	if got := recvStatus(t, st); got.Code() != codes.DeadlineExceeded {
		t.Errorf("client: code %v (%v), want DEADLINE_EXCEEDED", got.Code(), got.Message())
	}
	if fin := h.finished(t); fin != (finishedCall{"DeadlineExceeded", 2, 1}) {
		t.Errorf("Observer.Finished %+v, want DeadlineExceeded with 2 prompt and 1 completion tokens", fin)
	}
}

// TestGenerateRefusedBeforeAnyMessage checks that a refusal by Submit ends
// the call before any message: the first Recv returns the mapped status,
// no header was sent (Trailers-Only), and the trailer and details carry
// the retry advice toStatus gives each refusal.
func TestGenerateRefusedBeforeAnyMessage(t *testing.T) {
	tests := []struct {
		name     string
		refuse   error
		code     codes.Code
		reason   string        // ErrorInfo reason; "" for none
		retry    time.Duration // RetryInfo delay; 0 for none
		pushback string        // grpc-retry-pushback-ms; "" for none
		fields   []string      // BadRequest violations
	}{
		{
			name:     "queue full",
			refuse:   &allocator.RejectError{Reason: allocator.ReasonQueueFull, CellsNeeded: 12, CellsFree: 0, CellsTotal: 256, QueueDepth: 4, RetryAfter: 250 * time.Millisecond},
			code:     codes.ResourceExhausted,
			reason:   allocator.ReasonQueueFull,
			retry:    250 * time.Millisecond,
			pushback: "250",
		},
		{
			name:     "cells exhausted without an estimate, wrapped",
			refuse:   fmt.Errorf("admit: %w", &allocator.RejectError{Reason: allocator.ReasonKVCellsExhausted, CellsNeeded: 12, CellsTotal: 256}),
			code:     codes.ResourceExhausted,
			reason:   allocator.ReasonKVCellsExhausted,
			retry:    time.Second,
			pushback: "1000",
		},
		{
			name:     "never fits",
			refuse:   &allocator.RejectError{Reason: allocator.ReasonNeverFits, CellsNeeded: 202, CellsTotal: 256, Limit: 128},
			code:     codes.InvalidArgument,
			reason:   allocator.ReasonNeverFits,
			pushback: "-1",
			fields:   []string{"tokens.ids", "max_tokens"},
		},
		{
			name:   "draining",
			refuse: &allocator.RejectError{Reason: allocator.ReasonDraining, CellsNeeded: 12, CellsTotal: 256},
			code:   codes.Unavailable,
			reason: allocator.ReasonDraining,
		},
		{
			name:     "engine closed",
			refuse:   fmt.Errorf("submit: %w", native.ErrEngineClosed),
			code:     codes.Unavailable,
			pushback: "-1",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newFakeEngine(defaultBuffer, 0)
			e.refuse = tt.refuse
			h := newHarness(t, e)
			st := h.generate(t, t.Context(), tokens(200, 1, 2))
			if s := h.engine.next(t); !slices.Equal(s.req.Prompt, []int32{1, 2}) || s.req.MaxTokens != 200 {
				t.Errorf("Submit got prompt %v max_tokens %d", s.req.Prompt, s.req.MaxTokens)
			}
			got := recvStatus(t, st)
			if got.Code() != tt.code {
				t.Fatalf("code %v (%v), want %v", got.Code(), got.Message(), tt.code)
			}
			checkReason(t, got, tt.reason)
			_, retry, fields := statusDetails(t, got)
			switch {
			case tt.retry == 0 && retry != nil:
				t.Errorf("RetryInfo %v, want none", retry)
			case tt.retry != 0 && retry.GetRetryDelay().AsDuration() != tt.retry:
				t.Errorf("RetryInfo %v, want a delay of %v", retry, tt.retry)
			}
			if !slices.Equal(fields, tt.fields) {
				t.Errorf("violations %v, want %v", fields, tt.fields)
			}
			var want []string
			if tt.pushback != "" {
				want = []string{tt.pushback}
			}
			if p := st.Trailer().Get(PushbackTrailer); !slices.Equal(p, want) {
				t.Errorf("pushback trailer %v, want %v", p, want)
			}
			// Trailers-Only: the server sent no header block, so the
			// client has no header metadata at all.
			if md, err := st.Header(); err != nil || len(md) != 0 {
				t.Errorf("Header() = %v, %v; want no metadata (Trailers-Only)", md, err)
			}
			if fin := h.finished(t); fin != (finishedCall{tt.code.String(), 2, 0}) {
				t.Errorf("Observer.Finished %+v, want %s with 2 prompt tokens", fin, tt.code)
			}
			if waits, firsts, inters := h.obs.counts(); waits+firsts+inters != 0 {
				t.Errorf("Observer got %d queue waits and %d chunks for a refused call", waits, firsts+inters)
			}
		})
	}
}

// TestGenerateHeaderOnStart is the counterpart of the Trailers-Only check
// in TestGenerateRefusedBeforeAnyMessage: an admitted call does send a
// header block, so an empty Header there means no header was sent.
func TestGenerateHeaderOnStart(t *testing.T) {
	h := newHarness(t, newFakeEngine(defaultBuffer, 0))
	st := h.generate(t, t.Context(), tokens(8, 1))
	s := h.engine.next(t)
	recvStarted(t, st)
	md, err := st.Header()
	if err != nil || len(md) == 0 {
		t.Errorf("Header() = %v, %v; want the header of a started stream", md, err)
	}
	s.end(native.Result{Reason: native.FinishEOS, PromptTokens: 1, CompletionTokens: 1})
	if m := recv(t, st, "Finished"); m.GetFinished() == nil {
		t.Fatalf("got %v, want Finished", m)
	}
	h.finished(t)
}

// TestGenerateEngineFailure checks a sequence the engine ends with an
// error mid-stream: the chunks sent before it arrive intact, then the
// call ends with the status toStatus maps the error to, with no Finished.
func TestGenerateEngineFailure(t *testing.T) {
	tests := []struct {
		name     string
		err      error
		code     codes.Code
		reason   string
		pushback []string
	}{
		{"aborted, no KV slot", fmt.Errorf("step 7: %w", native.ErrSequenceAborted), codes.Aborted, "NO_KV_SLOT", nil},
		{"engine closed", fmt.Errorf("worker: %w", native.ErrEngineClosed), codes.Unavailable, "", []string{"-1"}},
		{"no valid token", fmt.Errorf("sample: %w", native.ErrNoValidToken), codes.InvalidArgument, ReasonNoValidToken, nil},
		{"unknown", errors.New("llama_decode: computation failed"), codes.Internal, "", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, newFakeEngine(defaultBuffer, 1))
			st := h.generate(t, t.Context(), tokens(200, 1, 2, 3))
			s := h.engine.next(t)
			recvStarted(t, st)
			evs := numbered(0, 3)
			for i, ev := range evs {
				s.emit(t, ev)
				if c := recvChunk(t, st); !sameEvent(c, ev) {
					t.Fatalf("chunk %d: %q %v, want %q %v", i, c.GetText(), c.GetTokenIds(), ev.Text, ev.Tokens)
				}
			}
			_, ids := concat(evs)
			s.end(native.Result{Err: tt.err, PromptTokens: 3, CachedTokens: 1, CompletionTokens: len(ids)})

			got := recvStatus(t, st)
			if got.Code() != tt.code {
				t.Fatalf("code %v (%v), want %v", got.Code(), got.Message(), tt.code)
			}
			checkReason(t, got, tt.reason)
			if p := st.Trailer().Get(PushbackTrailer); !slices.Equal(p, tt.pushback) {
				t.Errorf("pushback trailer %v, want %v", p, tt.pushback)
			}
			if fin := h.finished(t); fin != (finishedCall{tt.code.String(), 3, len(ids)}) {
				t.Errorf("Observer.Finished %+v, want %s with 3 prompt and %d completion tokens", fin, tt.code, len(ids))
			}
		})
	}
}

// TestGenerateStreamsEndWithServer checks the harness itself: a stream
// left running when the test ends is ended by the fake engine, so that
// its handler returns and the server stops. Without that, cleanup would
// hang in Stop, which waits for handlers.
func TestGenerateStreamsEndWithServer(t *testing.T) {
	var h *harness
	t.Run("left running", func(t *testing.T) {
		h = newHarness(t, newFakeEngine(defaultBuffer, 0))
		st := h.generate(t, t.Context(), tokens(8, 1))
		h.engine.next(t)
		recvStarted(t, st)
	})
	// The subtest's cleanup has run: the handler has returned.
	select {
	case fin := <-h.obs.finished:
		if fin.code != "Unavailable" {
			t.Errorf("the abandoned call ended %s, want Unavailable (engine closed)", fin.code)
		}
	default:
		t.Error("the abandoned call's handler had not returned when the server stopped")
	}
}
