package native

import (
	"math/rand/v2"
	"slices"
	"testing"
)

// TestWorkerStopTokens checks stop token ids: generation ends at the first
// sampled token that is one, with FinishStop and Result.StopToken naming
// it, and the token is not streamed; a stop token that never comes changes
// nothing.
func TestWorkerStopTokens(t *testing.T) {
	r := rand.New(rand.NewPCG(11, 12))
	p := prompt(r, 9)
	solo, _ := soloRun(p, 40, true)
	stopAt := 17
	tests := []struct {
		name  string
		stops []int32
		want  []int32 // what is streamed
		stop  bool
	}{
		{"the 18th token", []int32{solo[stopAt]}, solo[:slices.Index(solo, solo[stopAt])], true},
		{"two, the earlier wins", []int32{solo[30], solo[5]}, solo[:min(slices.Index(solo, solo[5]), slices.Index(solo, solo[30]))], true},
		{"never sampled", []int32{absentToken(solo)}, solo, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := startEngine(t, newFakeBackend(256, 64), EngineConfig{Admission: admission(4)})
			req := request(p, 40)
			req.StopTokens = tc.stops
			d := submitAndRead(t, e, req)
			if !slices.Equal(d.toks, tc.want) {
				t.Fatalf("streamed %v\nwant %v", d.toks, tc.want)
			}
			if d.text != fakeText(tc.want) {
				t.Errorf("text %q, want %q", d.text, fakeText(tc.want))
			}
			switch {
			case tc.stop && (d.res.Reason != FinishStop || !d.res.HasStopToken || d.res.StopToken != solo[len(tc.want)]):
				t.Errorf("result %+v, want FinishStop on token %d", d.res, solo[len(tc.want)])
			case !tc.stop && (d.res.Reason != FinishLength || d.res.HasStopToken):
				t.Errorf("result %+v, want FinishLength", d.res)
			}
			if d.res.CompletionTokens != len(tc.want)+btoi(tc.stop) {
				t.Errorf("%d completion tokens, want %d", d.res.CompletionTokens, len(tc.want)+btoi(tc.stop))
			}
			checkSettled(t, e)
		})
	}
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// absentToken returns a token id that toks does not hold.
func absentToken(toks []int32) int32 {
	for id := int32(0); ; id++ {
		if !slices.Contains(toks, id) && id != fakeEOG {
			return id
		}
	}
}

// TestWorkerLogprobs checks that a request with logprobs gets one entry per
// streamed token, in order and for that token, with the asked number of
// alternatives, also when stop strings hold text back and merge tokens into
// one event; and that a request without gets none.
func TestWorkerLogprobs(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	p := prompt(r, 7)
	solo, _ := soloRun(p, 30, true)
	tests := []struct {
		name     string
		logprobs bool
		top      int
		stop     []string
	}{
		{"off", false, 0, nil},
		{"chosen only", true, 0, nil},
		{"top 5", true, 5, nil},
		{"top 20 with a stop string holding text back", true, MaxTopLogprobs, []string{fakePiece(solo[20]) + "zz"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := startEngine(t, newFakeBackend(256, 64), EngineConfig{Admission: admission(4)})
			req := request(p, 30)
			req.Logprobs, req.TopLogprobs, req.Stop = tc.logprobs, tc.top, tc.stop
			s := mustSubmit(t, e, t.Context(), req)
			var toks []int32
			var lps []TokenLogprob
			for ev := range s.Events() {
				if tc.logprobs && len(ev.Logprobs) != len(ev.Tokens) {
					t.Fatalf("event with %d tokens and %d logprobs", len(ev.Tokens), len(ev.Logprobs))
				}
				if !tc.logprobs && ev.Logprobs != nil {
					t.Fatalf("logprobs %v without asking", ev.Logprobs)
				}
				toks = append(toks, ev.Tokens...)
				lps = append(lps, ev.Logprobs...)
			}
			if !slices.Equal(toks, solo) {
				t.Fatalf("streamed %v, want %v", toks, solo)
			}
			if !tc.logprobs {
				return
			}
			for i, lp := range lps {
				if lp.Token != toks[i] || lp.Logprob != -0.5 || len(lp.Top) != tc.top {
					t.Fatalf("token %d (%d): %+v", i, toks[i], lp)
				}
				if tc.top > 0 && lp.Top[0].Token != toks[i] {
					t.Fatalf("token %d: top-1 %d", i, lp.Top[0].Token)
				}
			}
			checkSettled(t, e)
		})
	}
}
