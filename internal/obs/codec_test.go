package obs

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
)

// rawCodec sends pre-encoded bytes as a request and reads the raw
// response, so that a test can send messages no marshaller would write.
type rawCodec struct{}

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	return mem.BufferSlice{mem.SliceBuffer(v.([]byte))}, nil
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	*(v.(*[]byte)) = data.Materialize()
	return nil
}

func (rawCodec) Name() string { return "proto" }

// TestUnparsableRequest checks that a request that does not parse gets
// INVALID_ARGUMENT, is logged at INFO as a client error and counted with
// that code, on unary and streaming calls, also when auth refuses it
// first; and that nothing stays recorded afterwards.
func TestUnparsableRequest(t *testing.T) {
	var logs syncBuffer
	m := NewMetrics()
	conn := startChain(t, ChainOptions{Logger: slog.New(slog.NewTextHandler(&logs, nil)), Metrics: m})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, tc := range []struct {
		name string
		msg  []byte
	}{
		{"invalid UTF-8 in a string", []byte{0x0a, 0x02, 0xff, 0xfe}},
		{"truncated field", []byte{0x0a, 0x05, 0x41}},
		{"bad wire type", []byte{0x0f}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out []byte
			err := conn.Invoke(ctx, kvgatev1.GenerateService_Tokenize_FullMethodName, tc.msg, &out, grpc.ForceCodecV2(rawCodec{}))
			if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "does not parse") {
				t.Errorf("Tokenize: got %v, want INVALID_ARGUMENT", err)
			}
			desc := &kvgatev1.GenerateService_ServiceDesc.Streams[0]
			st, err := conn.NewStream(ctx, desc, kvgatev1.GenerateService_Generate_FullMethodName, grpc.ForceCodecV2(rawCodec{}))
			if err != nil {
				t.Fatal(err)
			}
			if err := st.SendMsg(tc.msg); err != nil {
				t.Fatal(err)
			}
			_ = st.CloseSend()
			err = st.RecvMsg(&out)
			if status.Code(err) != codes.InvalidArgument {
				t.Errorf("Generate: got %v, want INVALID_ARGUMENT", err)
			}
		})
	}
	out := logs.String()
	if strings.Contains(out, "level=ERROR") || strings.Contains(out, "grpc.code=Internal") {
		t.Errorf("an unparsable request was logged as a server fault:\n%s", out)
	}
	if n := strings.Count(out, "grpc.code=InvalidArgument"); n != 6 {
		t.Errorf("%d INVALID_ARGUMENT log lines, want 6:\n%s", n, out)
	}
	// A well-formed call still works, and nothing was left recorded.
	if _, err := kvgatev1.NewGenerateServiceClient(conn).Tokenize(ctx, &kvgatev1.TokenizeRequest{Text: "fine"}); err != nil {
		t.Fatal(err)
	}
	left := 0
	unparsed.Range(func(any, any) bool { left++; return true })
	if left != 0 {
		t.Errorf("%d parse errors left recorded", left)
	}
}
