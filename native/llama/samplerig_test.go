package llama

import (
	"fmt"
	"github.com/kvgate/kvgate/native"
	"runtime"
	"sync"
	"testing"
)

// samplingRig holds a context that has decoded a few real prompts, so that
// tests can sample from several real rows of logits. Everything touching
// the context runs on one goroutine locked to its OS thread, as the engine's
// worker does.
type samplingRig struct {
	model   *Model
	ctx     *Context
	prompts [][]int32 // the prompts, one sequence each
	rows    []int     // output indices with logits
	rowSeq  []int     // rows[i] is a token of prompts[rowSeq[i]]
	calls   chan func()
}

var (
	rigMu sync.Mutex
	rigs  = map[string]*samplingRig{}
)

// rigPrompts are decoded once, as sequences 0, 1, 2, with logits for their
// last three tokens: nine rows of real logits, the last of each prompt what
// a generation would sample first.
var rigPrompts = []string{"Once upon a time", "The little dog was sad because", "Lily and Tom went to the park. They"}

// newSamplingRig returns the package's shared rig on stories260K, built
// on first use.
func newSamplingRig(t testing.TB) *samplingRig {
	t.Helper()
	return rigFor(t, stories(t))
}

var (
	bigVocabOnce  sync.Once
	bigVocabModel *Model
	bigVocabErr   error
)

// newBigVocabRig returns a rig on a random-weight llama with a 32000-token
// vocabulary (bigVocabModelPath), whose candidate arrays are large enough
// for the samplers' bucket sorts and top-p's adaptive partial sort (over
// 1024 candidates), which stories260K's 512 tokens never reach.
func newBigVocabRig(t testing.TB) *samplingRig {
	t.Helper()
	path := bigVocabModelPath(t)
	bigVocabOnce.Do(func() { bigVocabModel, bigVocabErr = LoadModel(path, LoadOptions{}) })
	if bigVocabErr != nil {
		t.Fatalf("load the 32000-token random model: %v", bigVocabErr)
	}
	return rigFor(t, bigVocabModel)
}

func rigFor(t testing.TB, m *Model) *samplingRig {
	t.Helper()
	rigMu.Lock()
	defer rigMu.Unlock()
	if r := rigs[m.path]; r != nil {
		return r
	}
	r, err := buildRig(m)
	if err != nil {
		t.Fatalf("sampling rig on %s: %v", m.path, err)
	}
	rigs[m.path] = r
	return r
}

func buildRig(m *Model) (*samplingRig, error) {
	r := &samplingRig{model: m, calls: make(chan func())}
	n := 0
	for _, p := range rigPrompts {
		ids, err := m.Tokenize(p, true, false)
		if err != nil {
			return nil, err
		}
		r.prompts = append(r.prompts, ids)
		n += len(ids)
	}
	ready := make(chan error)
	go func() {
		runtime.LockOSThread() // for the life of the test binary
		c, err := NewContext(m, ContextParams{Cells: 256, Batch: n, MaxSequences: len(r.prompts), Threads: 1, KVType: "f32"})
		if err != nil {
			ready <- err
			return
		}
		r.ctx = c
		b := native.NewBatch(n)
		for seq, ids := range r.prompts {
			for i, tok := range ids {
				out := i >= len(ids)-3
				idx := b.Add(tok, i, seq, out)
				if out {
					r.rows = append(r.rows, idx)
					r.rowSeq = append(r.rowSeq, seq)
				}
			}
		}
		if err := c.Decode(b); err != nil {
			ready <- fmt.Errorf("decode: %w", err)
			return
		}
		ready <- nil
		for f := range r.calls {
			f()
		}
	}()
	if err := <-ready; err != nil {
		return nil, err
	}
	return r, nil
}

// do runs f on the rig's thread and waits for it. f must not call
// t.Fatal (it is not on the test's goroutine); t.Error is fine.
func (r *samplingRig) do(f func()) {
	done := make(chan struct{})
	r.calls <- func() { defer close(done); f() }
	<-done
}

// row returns the output index of row i (mod the row count) and the
// prompt it belongs to.
func (r *samplingRig) row(i int) (int, []int32) {
	i %= len(r.rows)
	return r.rows[i], r.prompts[r.rowSeq[i]]
}
