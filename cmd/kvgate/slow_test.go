package main

import (
	"context"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
)

// tinyModel writes a one-layer random model with a 65536-token training
// context, for tests that need long streams quickly.
func tinyModel(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "tiny.gguf")
	out, err := exec.Command(kvgateBin, "mkmodel", "--preset", "tiny", "--embd", "64", "--layers", "1",
		"--heads", "2", "--ffn", "128", "--ctx-train", "65536", "--type", "f32", "-o", path).CombinedOutput()
	if err != nil {
		t.Fatalf("mkmodel: %v\n%s", err, out)
	}
	return path
}

// TestSlowConsumer opens a long stream and stops reading it. Once the
// transport's flow-control windows and the stream's buffer are full, the
// server ends that stream with RESOURCE_EXHAUSTED / SLOW_CONSUMER and frees
// its cells, while other streams complete.
//
// Everything it checks is a count, not a time:
//   - the stalled stream is cut (a generous wait only bounds a hang);
//   - the streams beside it, each shorter than the buffer, are never cut,
//     however their reader is scheduled;
//   - when the server cut the stream it was a whole buffer ahead of the
//     client: the tokens the worker generated for it (generated_tokens_total
//     less the other streams') exceed the tokens the client got by at least
//     --stream-buffer + 1 (a full buffer of events, one token or more each,
//     and the token that did not fit);
//   - the server had filled the client's flow-control window first: the
//     bytes the client drains after the cut (gRPC framing included, which
//     is what HTTP/2 flow control counts) are at least the 64 KiB window.
//
// The last holds when the server's sender keeps up with the transport
// until the window is full, which is what the buffer is for: with
// --stream-buffer 1024 (the default) the sender would have to stall for
// 1024 tokens of generation (0.4 s at this model's fastest) to cut early,
// where the 64 events the test used to run with were 25 ms, a scheduling
// hiccup on a busy machine.
func TestSlowConsumer(t *testing.T) {
	const buffer = 1024
	s := startServer(t, "--model", tinyModel(t), "--ctx", "65536", "--stream-buffer", strconv.Itoa(buffer), "--max-seqs", "4")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	// Fixed 64 KiB windows (no BDP growth): a client that stops reading
	// holds at most 64 KiB in flight on its side.
	const window = 64 * 1024
	conn, err := grpc.NewClient(s.addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithInitialWindowSize(window), grpc.WithInitialConnWindowSize(window))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	slow, err := kvgatev1.NewGenerateServiceClient(conn).Generate(ctx, &kvgatev1.GenerateRequest{
		Prompt: &kvgatev1.GenerateRequest_Text{Text: "Once upon a time"}, MaxTokens: 65000, IgnoreEos: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	started, err := slow.Recv()
	if err != nil {
		t.Fatal(err)
	}
	// Other streams on their own connection complete meanwhile: with fewer
	// tokens than the buffer holds events, nothing their reader does can
	// make them slow consumers.
	const otherTokens = 64
	var wg sync.WaitGroup
	others := make([]streamResult, 3)
	for i := range others {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req := textPrompt("The little dog", otherTokens)
			req.IgnoreEos = true
			others[i] = generateAll(ctx, s.Generate(), req)
		}()
	}
	waitFor(t, 5*time.Minute, "the slow stream to be cut", func() bool { return cacheStats(t, s).GetSlowConsumerTotal() > 0 })
	wg.Wait()
	for i, r := range others {
		if r.err != nil || r.finished == nil || len(r.ids()) != otherTokens {
			t.Errorf("stream %d beside the slow one: err %v, %d tokens", i, r.err, len(r.ids()))
		}
	}
	// Once the cut sequence's cells are back, the worker has marked the
	// stream failed: the sender forwards nothing it takes after that, so
	// what the client drains below is exactly what was sent before the cut.
	st := waitQuiet(t, s)
	if st.GetSlowConsumerTotal() != 1 || st.GetNokvslotTotal() != 0 {
		t.Fatalf("stats after the cut: %v", st)
	}
	generated := int(st.GetGeneratedTokensTotal()) - len(others)*otherTokens

	// Reading again drains what was in flight, then the status.
	drained := 5 + proto.Size(started) // each gRPC message has a 5-byte prefix
	chunks, tokens := 0, 0
	for {
		resp, err := slow.Recv()
		if err == nil {
			drained += 5 + proto.Size(resp)
			chunks++
			tokens += len(resp.GetChunk().GetTokenIds())
			continue
		}
		if status.Code(err) != codes.ResourceExhausted || errorInfoReason(err) != "SLOW_CONSUMER" {
			t.Fatalf("slow stream ended with %v, want RESOURCE_EXHAUSTED / SLOW_CONSUMER", err)
		}
		break
	}
	t.Logf("the slow stream delivered %d chunks (%d tokens, %d bytes) before SLOW_CONSUMER; the worker generated %d tokens for it",
		chunks, tokens, drained, generated)
	if generated-tokens < buffer+1 {
		t.Errorf("cut %d tokens ahead of the client: less than a full buffer of %d events and the token that did not fit, so the stream was not behind", generated-tokens, buffer)
	}
	if drained < window {
		t.Errorf("cut after the client got %d bytes: less than its %d-byte flow-control window, so the transport was not full", drained, window)
	}
}
