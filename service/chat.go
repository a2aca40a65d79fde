package service

import (
	"context"
	"fmt"
	"unicode/utf8"

	"google.golang.org/genproto/googleapis/rpc/errdetails"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/internal/chat"
)

// DefaultMaxChatMessages bounds the messages of one conversation when
// Config.MaxChatMessages is 0.
const DefaultMaxChatMessages = 256

// maxRoleBytes bounds a message's role.
const maxRoleBytes = 64

// chatLimits are the bounds checked on a conversation before it is
// rendered.
type chatLimits struct {
	maxMessages int
	maxBytes    int // all contents together; 0: no bound
}

// checkMessages validates a conversation against lim before anything is
// rendered or tokenized: at least one message and at most maxMessages,
// roles of 1 to 64 letters, digits, '_' or '-', contents valid UTF-8
// without NUL (llama.cpp takes C strings), and all contents together at
// most maxBytes. It reports each problem through bad, naming fields under
// prefix, and returns the messages and their total size.
func checkMessages(in []*kvgatev1.ChatMessage, lim chatLimits, prefix string, bad func(field, format string, args ...any)) ([]chat.Message, int) {
	switch {
	case len(in) == 0:
		bad(prefix, "the conversation has no messages")
		return nil, 0
	case len(in) > lim.maxMessages:
		bad(prefix, "%d messages exceed the server's max_chat_messages limit of %d", len(in), lim.maxMessages)
		return nil, 0
	}
	msgs := make([]chat.Message, len(in))
	total, ok := 0, true
	for i, m := range in {
		role, content := m.GetRole(), m.GetContent()
		if why := badRole(role); why != "" {
			bad(fmt.Sprintf("%s[%d].role", prefix, i), "%s", why)
			ok = false
		}
		switch {
		case !utf8.ValidString(content):
			bad(fmt.Sprintf("%s[%d].content", prefix, i), "not valid UTF-8")
			ok = false
		case hasNUL(content):
			bad(fmt.Sprintf("%s[%d].content", prefix, i), "holds a NUL character (U+0000), which chat templates cannot carry")
			ok = false
		}
		total += len(content)
		msgs[i] = chat.Message{Role: role, Content: content}
	}
	if lim.maxBytes > 0 && total > lim.maxBytes {
		bad(prefix, "%d bytes of contents exceed the server's max_prompt_bytes limit of %d: they cannot fit in max_prompt_tokens tokens", total, lim.maxBytes)
		ok = false
	}
	if !ok {
		return nil, total
	}
	return msgs, total
}

func hasNUL(s string) bool {
	for i := range len(s) {
		if s[i] == 0 {
			return true
		}
	}
	return false
}

// badRole returns why role is not acceptable, or "".
func badRole(role string) string {
	if role == "" {
		return "the role is empty"
	}
	if len(role) > maxRoleBytes {
		return fmt.Sprintf("the role is %d bytes, more than %d", len(role), maxRoleBytes)
	}
	for _, c := range []byte(role) {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			return fmt.Sprintf("the role %q holds %q: only letters, digits, '_' and '-' are allowed", role, c)
		}
	}
	return ""
}

// chatPrompt is a rendered conversation that fits.
type chatPrompt struct {
	chat.Prompt
	dropped int
}

// fitChat renders msgs with the generation prompt and makes it fit
// prompt + need tokens within lim: as it is, or, with
// CONTEXT_OVERFLOW_DROP_OLDEST, by dropping the fewest oldest messages that
// are not system messages (never the last message) that make it fit. The
// number to drop is found by bisection, since a conversation's tokens only
// shrink as its oldest messages go; the result is rendered and checked
// again. A conversation that does not fit is an INVALID_ARGUMENT with a
// BadRequest violation on field.
func fitChat(t *chat.Template, msgs []chat.Message, need int, policy kvgatev1.ContextOverflow, lim Limits, field string) (*chatPrompt, error) {
	fits := func(n int) bool {
		return (lim.MaxPromptTokens <= 0 || n <= lim.MaxPromptTokens) && n+need <= lim.MaxSequenceTokens
	}
	p, err := t.Render(msgs, true)
	if err != nil {
		return nil, err
	}
	if fits(len(p.IDs)) {
		return &chatPrompt{Prompt: p}, nil
	}
	tooLong := func(n int, dropped int) error {
		limit := fmt.Sprintf("max_sequence_tokens limit of %d", lim.MaxSequenceTokens)
		if lim.MaxPromptTokens > 0 && n > lim.MaxPromptTokens {
			limit = fmt.Sprintf("max_prompt_tokens limit of %d", lim.MaxPromptTokens)
		}
		desc := fmt.Sprintf("the conversation renders to %d prompt tokens, which with max_tokens %d exceed the server's %s", n, need, limit)
		if dropped > 0 {
			desc = fmt.Sprintf("even with the %d oldest droppable messages dropped, %s", dropped, desc)
		} else if policy != kvgatev1.ContextOverflow_CONTEXT_OVERFLOW_DROP_OLDEST {
			desc += "; context_overflow CONTEXT_OVERFLOW_DROP_OLDEST drops old messages to fit"
		}
		return errInvalid("conversation too long: "+desc, violation(field, desc))
	}
	if policy != kvgatev1.ContextOverflow_CONTEXT_OVERFLOW_DROP_OLDEST {
		return nil, tooLong(len(p.IDs), 0)
	}
	var droppable []int
	for i, m := range msgs[:len(msgs)-1] {
		if m.Role != "system" {
			droppable = append(droppable, i)
		}
	}
	without := func(k int) []chat.Message {
		gone := map[int]bool{}
		for _, i := range droppable[:k] {
			gone[i] = true
		}
		out := make([]chat.Message, 0, len(msgs)-k)
		for i, m := range msgs {
			if !gone[i] {
				out = append(out, m)
			}
		}
		return out
	}
	if len(droppable) == 0 {
		return nil, tooLong(len(p.IDs), 0)
	}
	last, err := t.Render(without(len(droppable)), true)
	if err != nil {
		return nil, err
	}
	if !fits(len(last.IDs)) {
		return nil, tooLong(len(last.IDs), len(droppable))
	}
	// The smallest k in [1, len(droppable)] that fits: k = hi fits.
	lo, hi, best := 1, len(droppable), last
	for lo < hi {
		mid := (lo + hi) / 2
		q, err := t.Render(without(mid), true)
		if err != nil {
			return nil, err
		}
		if fits(len(q.IDs)) {
			hi, best = mid, q
		} else {
			lo = mid + 1
		}
	}
	return &chatPrompt{Prompt: best, dropped: hi}, nil
}

// RenderChat renders a conversation without generating. Its work counts
// against the tokenizer budget, as Tokenize's does.
func (s *Service) RenderChat(ctx context.Context, req *kvgatev1.RenderChatRequest) (*kvgatev1.RenderChatResponse, error) {
	var vs []*errdetails.BadRequest_FieldViolation
	bad := func(field, format string, args ...any) {
		vs = append(vs, violation(field, fmt.Sprintf(format, args...)))
	}
	msgs, total := checkMessages(req.GetMessages(), s.chatLimits(), "messages", bad)
	if len(vs) > 0 {
		return nil, errInvalid(fmt.Sprintf("invalid RenderChatRequest: %s: %s", vs[0].Field, vs[0].Description), vs...)
	}
	if s.cfg.Chat == nil {
		return nil, toStatus(ctx, errNoTemplate)
	}
	w := int64(min(max(total, 1), s.cfg.WorkBudget))
	if !s.work.TryAcquire(w) {
		return nil, toStatus(ctx, errWorkBudget)
	}
	defer s.work.Release(w)
	add := true
	if req.AddGenerationPrompt != nil {
		add = req.GetAddGenerationPrompt()
	}
	p, err := s.cfg.Chat.Render(msgs, add)
	if err != nil {
		return nil, toStatus(ctx, err)
	}
	return &kvgatev1.RenderChatResponse{Text: p.Text, Ids: p.IDs, Template: s.cfg.Chat.Name()}, nil
}

// errNoTemplate is the refusal of a conversation on a server without a
// usable chat template.
var errNoTemplate = fmt.Errorf("%w: the model has no chat template that llama.cpp recognizes; start the server with --chat-template NAME", chat.ErrNoTemplate)

func (s *Service) chatLimits() chatLimits {
	return chatLimits{maxMessages: s.cfg.MaxChatMessages, maxBytes: s.cfg.Limits.MaxPromptBytes}
}
