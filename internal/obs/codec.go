package obs

import (
	"context"
	"strings"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	encproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// A request that does not parse (malformed protobuf, or a string field
// that is not valid UTF-8) is the client's fault. grpc-go reports a failed
// unmarshal as INTERNAL, a server fault, and for unary calls before any
// interceptor runs, so it would reach neither the call log nor the
// metrics, and clients would be told the server broke. clientCodec and the
// checkParsed interceptors turn it into INVALID_ARGUMENT, logged and
// counted as the client error it is.

// unparsed maps a kvgate request message that failed to unmarshal to the
// error. The codec stores it; the interceptor, which every kvgate call
// passes (ServerOptions), takes it out again.
var unparsed sync.Map // proto.Message -> error

// clientCodec is grpc's proto codec, except that a kvgate.v1 message that
// fails to unmarshal is left empty, its error recorded in unparsed, and
// success reported, so that the call reaches the interceptors.
type clientCodec struct{ encoding.CodecV2 }

func newClientCodec() clientCodec { return clientCodec{encoding.GetCodecV2(encproto.Name)} }

// Unmarshal decodes data into v; see clientCodec.
func (c clientCodec) Unmarshal(data mem.BufferSlice, v any) error {
	err := c.CodecV2.Unmarshal(data, v)
	if err == nil {
		return nil
	}
	m, ok := v.(proto.Message)
	if !ok || !strings.HasPrefix(string(m.ProtoReflect().Descriptor().FullName()), "kvgate.v1.") {
		return err
	}
	proto.Reset(m)
	unparsed.Store(m, err)
	return nil
}

// parseError returns the unmarshal error recorded for m, forgetting it.
func parseError(m any) error {
	if m == nil {
		return nil
	}
	err, ok := unparsed.LoadAndDelete(m)
	if !ok {
		return nil
	}
	return status.Errorf(codes.InvalidArgument, "the request message does not parse: %v", err)
}

func checkParsedUnary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err := parseError(req); err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

func checkParsedStream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	return handler(srv, parsedStream{ss})
}

// parsedStream reports a received message that did not parse as
// INVALID_ARGUMENT.
type parsedStream struct{ grpc.ServerStream }

// RecvMsg receives m; see parsedStream.
func (s parsedStream) RecvMsg(m any) error {
	if err := s.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	return parseError(m)
}
