package main

import (
	"context"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

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
func TestSlowConsumer(t *testing.T) {
	s := startServer(t, "--model", tinyModel(t), "--ctx", "65536", "--stream-buffer", "64", "--max-seqs", "4")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	// Fixed 64 KiB windows (no BDP growth): a client that stops reading
	// holds at most 64 KiB in flight on its side.
	conn, err := grpc.NewClient(s.addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithInitialWindowSize(64*1024), grpc.WithInitialConnWindowSize(64*1024))
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
	if _, err := slow.Recv(); err != nil { // started
		t.Fatal(err)
	}
	// Other streams on their own connection complete meanwhile.
	var wg sync.WaitGroup
	others := make([]streamResult, 3)
	for i := range others {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req := textPrompt("The little dog", 64)
			req.IgnoreEos = true
			others[i] = generateAll(ctx, s.Generate(), req)
		}()
	}
	waitFor(t, 2*time.Minute, "the slow stream to be cut", func() bool { return cacheStats(t, s).GetSlowConsumerTotal() > 0 })
	wg.Wait()
	for i, r := range others {
		if r.err != nil || r.finished == nil || len(r.ids()) != 64 {
			t.Errorf("stream %d beside the slow one: err %v, %d tokens", i, r.err, len(r.ids()))
		}
	}
	// Reading again drains what was in flight, then the status.
	chunks, tokens := 0, 0
	for {
		resp, err := slow.Recv()
		if err == nil {
			chunks++
			tokens += len(resp.GetChunk().GetTokenIds())
			continue
		}
		st, _ := status.FromError(err)
		if st.Code() != codes.ResourceExhausted || errorInfoReason(err) != "SLOW_CONSUMER" {
			t.Fatalf("slow stream ended with %v, want RESOURCE_EXHAUSTED / SLOW_CONSUMER", err)
		}
		break
	}
	t.Logf("the slow stream delivered %d buffered chunks (%d tokens) before SLOW_CONSUMER", chunks, tokens)
	if tokens < 1000 {
		t.Fatalf("cut after %d tokens: less than the transport holds, so not for the client's sake", tokens)
	}
	st := waitQuiet(t, s)
	if st.GetSlowConsumerTotal() != 1 || st.GetNokvslotTotal() != 0 {
		t.Fatalf("stats after: %v", st)
	}
}
