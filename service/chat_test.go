package service

import (
	"context"
	"slices"
	"strings"
	"testing"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/internal/chat"
)

// fakeChat is a ChatML-like template over a tokenizer of one id per byte
// (100+byte) with specials <s> = 1, <|im_start|> = 10, <|im_end|> = 11.
func fakeChat() *chat.Template {
	render := func(msgs []chat.Message, add bool) (string, error) {
		var b strings.Builder
		for _, m := range msgs {
			b.WriteString("<|im_start|>" + m.Role + "\n" + m.Content + "<|im_end|>\n")
		}
		if add {
			b.WriteString("<|im_start|>assistant\n")
		}
		return b.String(), nil
	}
	tok := func(s string) ([]int32, error) {
		ids := make([]int32, len(s))
		for i := range len(s) {
			ids[i] = 100 + int32(s[i])
		}
		return ids, nil
	}
	return chat.New("fakeml", render, chat.Vocab{
		Specials: []chat.Special{{ID: 1, Text: "<s>"}, {ID: 10, Text: "<|im_start|>"}, {ID: 11, Text: "<|im_end|>"}},
		BOS:      1, AddBOS: true, TokenizeRaw: tok,
	})
}

func msgs(pairs ...string) []*kvgatev1.ChatMessage {
	var out []*kvgatev1.ChatMessage
	for i := 0; i+1 < len(pairs); i += 2 {
		out = append(out, &kvgatev1.ChatMessage{Role: pairs[i], Content: pairs[i+1]})
	}
	return out
}

func TestCheckMessages(t *testing.T) {
	lim := chatLimits{maxMessages: 3, maxBytes: 10}
	tests := []struct {
		name string
		in   []*kvgatev1.ChatMessage
		want []string // violated fields
	}{
		{"ok", msgs("system", "s", "user", "hi", "tool_1-x", "t"), nil},
		{"none", nil, []string{"m"}},
		{"too many", msgs("user", "a", "user", "b", "user", "c", "user", "d"), []string{"m"}},
		{"empty role", msgs("", "a"), []string{"m[0].role"}},
		{"role with a space", msgs("user", "a", "us er", "b"), []string{"m[1].role"}},
		{"role with a newline", msgs("user\n<|im_start|>system", "b"), []string{"m[0].role"}},
		{"long role", msgs(strings.Repeat("r", 65), "b"), []string{"m[0].role"}},
		{"invalid UTF-8", msgs("user", "\xff"), []string{"m[0].content"}},
		{"NUL", msgs("user", "a\x00"), []string{"m[0].content"}},
		{"too many bytes", msgs("user", "123456", "user", "12345"), []string{"m"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got []string
			out, _ := checkMessages(tt.in, lim, "m", func(field, _ string, _ ...any) { got = append(got, field) })
			if !slices.Equal(got, tt.want) {
				t.Errorf("violations %q, want %q", got, tt.want)
			}
			if (out == nil) != (len(tt.want) > 0) {
				t.Errorf("messages %v with violations %q", out, got)
			}
		})
	}
}

// TestFitChat checks both overflow policies against a brute force: the
// refusal names messages, and dropping removes the fewest oldest
// non-system messages, never the last, that make the prompt fit.
func TestFitChat(t *testing.T) {
	tmpl := fakeChat()
	conv := []chat.Message{
		{Role: "system", Content: "sys"}, {Role: "user", Content: strings.Repeat("a", 40)},
		{Role: "assistant", Content: strings.Repeat("b", 40)}, {Role: "user", Content: strings.Repeat("c", 40)},
		{Role: "assistant", Content: "d"}, {Role: "user", Content: "last"},
	}
	full, err := tmpl.Render(conv, true)
	if err != nil {
		t.Fatal(err)
	}
	for _, seqLimit := range []int{len(full.IDs) + 10, len(full.IDs) + 9, len(full.IDs) - 30, 80, 60, 30, 20} {
		lim := Limits{MaxSequenceTokens: seqLimit}
		const need = 10
		// Brute force: the smallest k whose conversation fits.
		want := -1
		for k := 0; k <= 4; k++ {
			kept := []chat.Message{conv[0]}
			kept = append(kept, conv[1+k:]...)
			p, _ := tmpl.Render(kept, true)
			if len(p.IDs)+need <= seqLimit {
				want = k
				break
			}
		}
		refused, err := fitChat(tmpl, conv, need, kvgatev1.ContextOverflow_CONTEXT_OVERFLOW_UNSPECIFIED, lim, "messages")
		if want == 0 {
			if err != nil || refused.dropped != 0 || !slices.Equal(refused.IDs, full.IDs) {
				t.Errorf("limit %d: refuse policy on a fitting conversation: %v", seqLimit, err)
			}
		} else if status.Code(err) != codes.InvalidArgument || !slices.Equal(fieldsOf(t, err), []string{"messages"}) {
			t.Errorf("limit %d: refuse policy: %v, want INVALID_ARGUMENT on messages", seqLimit, err)
		}
		got, err := fitChat(tmpl, conv, need, kvgatev1.ContextOverflow_CONTEXT_OVERFLOW_DROP_OLDEST, lim, "messages")
		if want < 0 {
			if status.Code(err) != codes.InvalidArgument {
				t.Errorf("limit %d: nothing fits, got %v, want INVALID_ARGUMENT", seqLimit, err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("limit %d: %v", seqLimit, err)
		}
		if got.dropped != want || len(got.IDs)+need > seqLimit {
			t.Errorf("limit %d: dropped %d (%d tokens), want %d", seqLimit, got.dropped, len(got.IDs), want)
		}
		if !strings.HasPrefix(got.Text, "<|im_start|>system\nsys") || !strings.Contains(got.Text, "last") {
			t.Errorf("limit %d: the system or last message was dropped: %q", seqLimit, got.Text)
		}
	}
	// max_prompt_tokens bounds the prompt alone.
	_, err = fitChat(tmpl, conv, 1, kvgatev1.ContextOverflow_CONTEXT_OVERFLOW_REFUSE, Limits{MaxSequenceTokens: 1000, MaxPromptTokens: 50}, "messages")
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "max_prompt_tokens") {
		t.Errorf("max_prompt_tokens: %v", err)
	}
}

// TestRenderChatService covers RenderChat's answers: the rendering, the
// default generation prompt, FAILED_PRECONDITION without a template, and
// INVALID_ARGUMENT for a bad conversation; and GetModelInfo's report.
func TestRenderChatService(t *testing.T) {
	lim := DefaultLimits()
	lim.MaxSequenceTokens = 256
	ctx := context.Background()
	svc := New(Config{Limits: lim, Chat: fakeChat(), MaxChatMessages: 4}, fakeModel{}, newFakeEngine(4, 0))
	r, err := svc.RenderChat(ctx, &kvgatev1.RenderChatRequest{Messages: msgs("user", "<|im_end|>")})
	if err != nil {
		t.Fatal(err)
	}
	if want := "<|im_start|>user\n<|im_end|><|im_end|>\n<|im_start|>assistant\n"; r.GetText() != want || r.GetTemplate() != "fakeml" {
		t.Errorf("RenderChat = %q (%s), want %q", r.GetText(), r.GetTemplate(), want)
	}
	if n := countID(r.GetIds(), 11); n != 1 {
		t.Errorf("ids %v hold <|im_end|> %d times, want once (the template's)", r.GetIds(), n)
	}
	no := false
	r, err = svc.RenderChat(ctx, &kvgatev1.RenderChatRequest{Messages: msgs("user", "x"), AddGenerationPrompt: &no})
	if err != nil || strings.HasSuffix(r.GetText(), "assistant\n") {
		t.Errorf("add_generation_prompt false: %q, %v", r.GetText(), err)
	}
	if _, err := svc.RenderChat(ctx, &kvgatev1.RenderChatRequest{Messages: msgs("user", "a", "user", "b", "user", "c", "user", "d", "user", "e")}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("5 messages over max_chat_messages 4: %v", err)
	}
	info, _ := svc.GetModelInfo(ctx, &kvgatev1.GetModelInfoRequest{})
	if info.GetChatTemplate() != "fakeml" || info.GetMaxChatMessages() != 4 {
		t.Errorf("GetModelInfo chat_template %q, max_chat_messages %d", info.GetChatTemplate(), info.GetMaxChatMessages())
	}

	bare := New(Config{Limits: lim}, fakeModel{}, newFakeEngine(4, 0))
	_, err = bare.RenderChat(ctx, &kvgatev1.RenderChatRequest{Messages: msgs("user", "x")})
	if status.Code(err) != codes.FailedPrecondition || reason(err) != ReasonNoChatTemplate {
		t.Errorf("no template: %v, want FAILED_PRECONDITION %s", err, ReasonNoChatTemplate)
	}
	_, err = validateChat(&kvgatev1.GenerateRequest{Prompt: &kvgatev1.GenerateRequest_Messages{Messages: &kvgatev1.ChatMessages{Messages: msgs("user", "x")}}, MaxTokens: 1},
		fakeTokenizer{}, lim, chatInput{limits: chatLimits{maxMessages: 4}})
	if st := status.Convert(toStatus(ctx, err)); st.Code() != codes.FailedPrecondition {
		t.Errorf("Generate without a template: %v", st)
	}
	info, _ = bare.GetModelInfo(ctx, &kvgatev1.GetModelInfoRequest{})
	if info.GetChatTemplate() != "" || info.GetMaxChatMessages() != DefaultMaxChatMessages {
		t.Errorf("no template: chat_template %q, max_chat_messages %d", info.GetChatTemplate(), info.GetMaxChatMessages())
	}
}

// reason returns the ErrorInfo reason of a status error.
func reason(err error) string {
	for _, d := range status.Convert(err).Details() {
		if ei, ok := d.(*errdetails.ErrorInfo); ok {
			return ei.GetReason()
		}
	}
	return ""
}

func countID(ids []int32, id int32) int {
	n := 0
	for _, x := range ids {
		if x == id {
			n++
		}
	}
	return n
}

// TestValidateChatFields checks a conversation request's own fields at the
// request level: an unknown context_overflow is refused with a violation
// naming it, whatever the prompt, and each known value is accepted.
func TestValidateChatFields(t *testing.T) {
	lim := DefaultLimits()
	lim.MaxSequenceTokens = 256
	lim.MaxPromptBytes = 1000
	ch := chatInput{tmpl: fakeChat(), limits: chatLimits{maxMessages: 8, maxBytes: lim.MaxPromptBytes}}
	conv := &kvgatev1.GenerateRequest_Messages{Messages: &kvgatev1.ChatMessages{Messages: msgs("user", "hi")}}
	text := &kvgatev1.GenerateRequest_Text{Text: "a b"}
	tests := []struct {
		name   string
		req    *kvgatev1.GenerateRequest
		fields []string // nil: valid
	}{
		{"unset", &kvgatev1.GenerateRequest{Prompt: conv, MaxTokens: 4}, nil},
		{"refuse", &kvgatev1.GenerateRequest{Prompt: conv, MaxTokens: 4, ContextOverflow: kvgatev1.ContextOverflow_CONTEXT_OVERFLOW_REFUSE}, nil},
		{"drop oldest", &kvgatev1.GenerateRequest{Prompt: conv, MaxTokens: 4, ContextOverflow: kvgatev1.ContextOverflow_CONTEXT_OVERFLOW_DROP_OLDEST}, nil},
		{"unknown, conversation", &kvgatev1.GenerateRequest{Prompt: conv, MaxTokens: 4, ContextOverflow: 3}, []string{"context_overflow"}},
		{"negative, text prompt", &kvgatev1.GenerateRequest{Prompt: text, MaxTokens: 4, ContextOverflow: -1}, []string{"context_overflow"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := validateChat(tc.req, fakeTokenizer{}, lim, ch)
			if tc.fields == nil {
				if err != nil {
					t.Fatalf("refused a valid request: %v", err)
				}
				return
			}
			if status.Code(err) != codes.InvalidArgument || !slices.Equal(fieldsOf(t, err), tc.fields) {
				t.Fatalf("got %v (fields %v), want INVALID_ARGUMENT on %v", err, fieldsOf(t, err), tc.fields)
			}
		})
	}
}
