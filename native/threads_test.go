package native

import (
	"math"
	"math/rand/v2"
	"testing"
	"time"
)

// The tuner's tests drive it with synthetic step times from a model of the
// machine, f(threads, tokens, step), and measure in steps and counts.

// stepModel is a machine: how long step i of tokens tokens takes at
// threads threads.
type stepModel func(threads, tokens, i int) time.Duration

// quiet is a machine where more threads are faster: a fixed cost plus
// work that scales as threads^0.8.
func quiet(threads, tokens, _ int) time.Duration {
	us := 1000 + 4000*float64(tokens)/math.Pow(float64(threads), 0.8)
	return time.Duration(us * float64(time.Microsecond))
}

// busy returns quiet where, from step from to step to (exclusive), other
// processes hold k of max cores: a step at more than max-k threads waits
// on descheduled threads and takes 100 times as long.
func busy(max, k, from, to int) stepModel {
	return func(threads, tokens, i int) time.Duration {
		d := quiet(threads, tokens, i)
		if i >= from && i < to && threads > max-k {
			d *= 100
		}
		return d
	}
}

// valley is a machine whose best count is best: each thread away from it
// makes a step 1.2 times slower.
func valley(best int) stepModel {
	return func(threads, tokens, i int) time.Duration {
		return time.Duration(float64(quiet(best, tokens, i)) * math.Pow(1.2, math.Abs(float64(threads-best))))
	}
}

// flat is a machine where the count makes no difference.
func flat(_, tokens, i int) time.Duration { return quiet(4, tokens, i) }

// noisy multiplies m's times by a deterministic pseudo-random factor in
// [1-amp, 1+amp], the same for every count at a step.
func noisy(m stepModel, amp float64, seed uint64) stepModel {
	return func(threads, tokens, i int) time.Duration {
		r := rand.New(rand.NewPCG(seed, uint64(i)))
		return time.Duration(float64(m(threads, tokens, i)) * (1 - amp + 2*amp*r.Float64()))
	}
}

// independentNoise is noisy with a different factor for each count too.
func independentNoise(m stepModel, amp float64, seed uint64) stepModel {
	return func(threads, tokens, i int) time.Duration {
		r := rand.New(rand.NewPCG(seed, uint64(i)<<8|uint64(threads)))
		return time.Duration(float64(m(threads, tokens, i)) * (1 - amp + 2*amp*r.Float64()))
	}
}

// spike makes step at times slower than m.
func spike(m stepModel, at int, times float64) stepModel {
	return func(threads, tokens, i int) time.Duration {
		d := m(threads, tokens, i)
		if i == at {
			d = time.Duration(float64(d) * times)
		}
		return d
	}
}

// Batch sizes of step i.
func one(int) int          { return 1 }
func eight(int) int        { return 8 }
func alternate(i int) int  { return []int{1, 16}[i%2] }
func mixedSizes(i int) int { return []int{1, 3, 1, 24, 1, 2, 512, 5}[i%8] }

// simRun is what a simulation did.
type simRun struct {
	// used is the count of each step, cur the tuner's count after it.
	used, cur []int
	// took is each step's duration.
	took []time.Duration
	tt   *threadTuner
}

// simulate runs steps steps of a tuner for max threads on machine m, with
// batch sizes tokens.
func simulate(max, steps int, tokens func(int) int, m stepModel) simRun {
	tt := newThreadTuner(max)
	r := simRun{used: make([]int, steps), cur: make([]int, steps), took: make([]time.Duration, steps), tt: tt}
	n := tt.threads()
	for i := range steps {
		tok := tokens(i)
		d := m(n, tok, i)
		r.used[i], r.took[i] = n, d
		n = tt.observe(tok, d)
		r.cur[i] = tt.cur
	}
	return r
}

// off counts the steps in [from, to) that ran at a count other than want.
func (r simRun) off(from, to, want int) int {
	n := 0
	for _, c := range r.used[from:to] {
		if c != want {
			n++
		}
	}
	return n
}

// above counts the steps in [from, to) that ran above count c.
func (r simRun) above(from, to, c int) int {
	n := 0
	for _, u := range r.used[from:to] {
		if u > c {
			n++
		}
	}
	return n
}

// settled returns the first step in [from, to) from which cur is want
// until to, or -1.
func (r simRun) settled(from, to, want int) int {
	at := -1
	for i := from; i < to; i++ {
		switch {
		case r.cur[i] != want:
			at = -1
		case at < 0:
			at = i
		}
	}
	return at
}

// switches counts the changes of cur in [from, to).
func (r simRun) switches(from, to int) int {
	n := 0
	for i := max(from, 1); i < to; i++ {
		if r.cur[i] != r.cur[i-1] {
			n++
		}
	}
	return n
}

// slowdown returns the total time of the run over that of the same steps
// all at count c.
func (r simRun) slowdown(m stepModel, tokens func(int) int, c int) float64 {
	var got, want time.Duration
	for i, d := range r.took {
		got += d
		want += m(c, tokens(i), i)
	}
	return float64(got) / float64(want)
}

func TestTunerQuiet(t *testing.T) {
	const steps = 10000
	tests := []struct {
		name   string
		max    int
		tokens func(int) int
		m      stepModel
	}{
		{"2 threads", 2, one, quiet},
		{"4 threads", 4, one, quiet},
		{"8 threads", 8, one, quiet},
		{"16 threads", 16, one, quiet},
		{"64 threads", 64, one, quiet},
		{"8 threads, 8-token batches", 8, eight, quiet},
		{"8 threads, alternating sizes", 8, alternate, quiet},
		{"8 threads, mixed sizes", 8, mixedSizes, quiet},
		{"4 threads, 20% noise", 4, one, noisy(quiet, 0.2, 1)},
		{"16 threads, 20% noise per count", 16, mixedSizes, independentNoise(quiet, 0.2, 2)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := simulate(tt.max, steps, tt.tokens, tt.m)
			off := r.off(0, steps, tt.max)
			share := float64(off) / steps
			t.Logf("probes %d, steps off max %d (%.2f%%), switches %d, time ×%.4f of all at max",
				r.tt.probes, off, 100*share, r.tt.switches, r.slowdown(tt.m, tt.tokens, tt.max))
			if r.tt.switches != 0 || r.tt.cur != tt.max {
				t.Errorf("switched %d times, ended at %d; want to stay at %d", r.tt.switches, r.tt.cur, tt.max)
			}
			if share >= 0.01 {
				t.Errorf("%d of %d steps off max (%.2f%%), want under 1%%", off, steps, 100*share)
			}
		})
	}
}

func TestTunerLoadArrives(t *testing.T) {
	const (
		arrive = 1000
		steps  = arrive + 10000
	)
	tests := []struct {
		name     string
		max, k   int
		tokens   func(int) int
		settle   int // steps after arrival to settle at max-k, at most
		slowMost int // steps above max-k after arrival, at most
	}{
		{name: "2 threads, 1 busy", max: 2, k: 1, tokens: one, settle: 5, slowMost: 4},
		{name: "4 threads, 1 busy", max: 4, k: 1, tokens: one, settle: 5, slowMost: 4},
		{name: "16 threads, 1 busy", max: 16, k: 1, tokens: one, settle: 5, slowMost: 4},
		{name: "4 threads, 2 busy", max: 4, k: 2, tokens: one, settle: 6, slowMost: 5},
		{name: "16 threads, 8 busy", max: 16, k: 8, tokens: one, settle: 10, slowMost: 7},
		{name: "16 threads, 5 busy", max: 16, k: 5, tokens: one, settle: 80, slowMost: 7},
		{name: "8 threads, 1 busy, alternating sizes", max: 8, k: 1, tokens: alternate, settle: 5, slowMost: 4},
		{name: "8 threads, 3 busy, mixed sizes", max: 8, k: 3, tokens: mixedSizes, settle: 80, slowMost: 8},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := busy(tt.max, tt.k, arrive, steps)
			r := simulate(tt.max, steps, tt.tokens, m)
			best := tt.max - tt.k
			at := r.settled(arrive, steps, best)
			slow := r.above(arrive, steps, best)
			t.Logf("settled at %d threads %d steps after the load arrived; %d steps above it, alarms %d, probes %d, switches %d, time ×%.3f of all at %d",
				best, at-arrive, slow, r.tt.alarms, r.tt.probes, r.tt.switches, r.slowdown(m, tt.tokens, best), best)
			if at < 0 || at-arrive > tt.settle {
				t.Errorf("settled at step %d, want within %d steps of %d", at, tt.settle, arrive)
			}
			if r.off(0, arrive, tt.max) > arrive/50 {
				t.Errorf("%d steps off max before the load arrived", r.off(0, arrive, tt.max))
			}
			// One step for the alarm and one per count tried on the way
			// down; after that, one per up probe.
			if slow > tt.slowMost {
				t.Errorf("%d steps above %d threads under load, want at most %d", slow, best, tt.slowMost)
			}
		})
	}
}

func TestTunerLoadLeaves(t *testing.T) {
	const (
		arrive = 1000
		steps  = 40000
	)
	// After the load leaves, an up probe is due within tunerMaxWait steps
	// (it is the longest wait), and each further count up takes at most
	// two minimum intervals and a probe.
	tests := []struct {
		name   string
		max, k int
		leave  int
		tokens func(int) int
	}{
		{name: "2 threads, 1 busy, short", max: 2, k: 1, leave: 1500, tokens: one},
		{name: "4 threads, 1 busy", max: 4, k: 1, leave: 6000, tokens: one},
		{name: "4 threads, 1 busy, long", max: 4, k: 1, leave: 25000, tokens: one},
		{name: "16 threads, 4 busy", max: 16, k: 4, leave: 8000, tokens: one},
		{name: "8 threads, 2 busy, mixed sizes", max: 8, k: 2, leave: 5000, tokens: mixedSizes},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := busy(tt.max, tt.k, arrive, tt.leave)
			r := simulate(tt.max, steps, tt.tokens, m)
			at := r.settled(tt.leave, steps, tt.max)
			bound := tunerMaxWait + tunerProbeMax + tt.k*(2*tunerMinInterval+tunerProbeMax)
			t.Logf("back at %d threads %d steps after the load left (bound %d); under load at %d threads from %d steps after it arrived; alarms %d, probes %d, switches %d",
				tt.max, at-tt.leave, bound, tt.max-tt.k, r.settled(arrive, tt.leave, tt.max-tt.k)-arrive, r.tt.alarms, r.tt.probes, r.tt.switches)
			if got := r.cur[tt.leave-1]; got != tt.max-tt.k {
				t.Errorf("at %d threads when the load left, want %d", got, tt.max-tt.k)
			}
			if at < 0 || at-tt.leave > bound {
				t.Errorf("back at max at step %d, want within %d steps of %d", at, bound, tt.leave)
			}
		})
	}
}

func TestTunerValley(t *testing.T) {
	const steps = 10000
	tests := []struct {
		name      string
		max, best int
		tokens    func(int) int
		m         stepModel
		settle    int
	}{
		{name: "8 threads, best 5", max: 8, best: 5, tokens: one, m: valley(5), settle: 150},
		{name: "8 threads, best 1", max: 8, best: 1, tokens: one, m: valley(1), settle: 300},
		{name: "16 threads, best 12, mixed sizes", max: 16, best: 12, tokens: mixedSizes, m: valley(12), settle: 250},
		// Each count nearer the best is 1.2x faster, at the edge of the
		// noise margin under ±20% noise (1 - 2·0.1): a probe wins only
		// when the noise does not work against it, so settling takes a
		// few losing probes, each doubling the interval.
		{name: "8 threads, best 5, 20% noise per count", max: 8, best: 5, tokens: one, m: independentNoise(valley(5), 0.2, 3), settle: 5000},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := simulate(tt.max, steps, tt.tokens, tt.m)
			at := r.settled(0, steps, tt.best)
			if at < 0 || at > tt.settle {
				t.Fatalf("settled at step %d (ended at %d, %d switches), want at %d by step %d", at, r.tt.cur, r.tt.switches, tt.best, tt.settle)
			}
			off := r.off(at, steps, tt.best)
			t.Logf("settled at %d after %d steps; then %d of %d steps off it; probes %d, switches %d",
				tt.best, at, off, steps-at, r.tt.probes, r.tt.switches)
			if off > (steps-at)/100 {
				t.Errorf("%d of %d steps off %d after it settled, want under 1%%", off, steps-at, tt.best)
			}
		})
	}
}

func TestTunerNoFlapping(t *testing.T) {
	const steps = 10000
	tests := []struct {
		name   string
		max    int
		tokens func(int) int
		m      stepModel
		most   int // switches
	}{
		{name: "1 thread under load and noise", max: 1, tokens: mixedSizes, m: noisy(busy(1, 1, 100, 5000), 0.2, 4), most: 0},
		{name: "4 threads, 20% noise", max: 4, tokens: one, m: noisy(quiet, 0.2, 5), most: 0},
		{name: "4 threads, 20% noise per count", max: 4, tokens: one, m: independentNoise(quiet, 0.2, 6), most: 2},
		{name: "16 threads, 20% noise per count", max: 16, tokens: one, m: independentNoise(quiet, 0.2, 7), most: 4},
		{name: "flat, 20% noise per count", max: 8, tokens: one, m: independentNoise(flat, 0.2, 8), most: 10},
		{name: "flat, 20% noise per count, mixed sizes", max: 8, tokens: mixedSizes, m: independentNoise(flat, 0.2, 9), most: 10},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := simulate(tt.max, steps, tt.tokens, tt.m)
			t.Logf("switches %d, probes %d, alarms %d, final %d", r.tt.switches, r.tt.probes, r.tt.alarms, r.tt.cur)
			if r.tt.switches > tt.most {
				t.Errorf("%d switches in %d steps, want at most %d", r.tt.switches, steps, tt.most)
			}
			if tt.max == 1 {
				for i, c := range r.used {
					if c != 1 {
						t.Fatalf("step %d at %d threads", i, c)
					}
				}
			}
		})
	}
}

// TestTunerOutliers checks that lone slow steps and a machine that gets
// slower as a whole leave the tuner at max for all but a few steps.
func TestTunerOutliers(t *testing.T) {
	const steps = 5000
	slower := func(threads, tokens, i int) time.Duration {
		d := quiet(threads, tokens, i)
		if i >= 1000 {
			d *= 10
		}
		return d
	}
	tests := []struct {
		name string
		max  int
		m    stepModel
		most int // steps off max
	}{
		{name: "slow first step", max: 8, m: spike(quiet, 0, 30), most: 40},
		{name: "lone 50× step", max: 8, m: spike(quiet, 700, 50), most: 2*tunerMinInterval + 2*tunerProbeMax + 40},
		{name: "everything 10× slower", max: 8, m: slower, most: 40},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := simulate(tt.max, steps, one, tt.m)
			off := r.off(0, steps, tt.max)
			t.Logf("%d steps off max, alarms %d, probes %d, switches %d", off, r.tt.alarms, r.tt.probes, r.tt.switches)
			if r.tt.cur != tt.max || off > tt.most {
				t.Errorf("ended at %d with %d steps off max, want at %d with at most %d off", r.tt.cur, off, tt.max, tt.most)
			}
		})
	}
}

// TestTunerUntrustedBucket checks that a step whose bucket has no trusted
// baseline neither decides a probe nor lets a probe at a slow count run
// on: a larger trusted bucket bounds it.
func TestTunerUntrustedBucket(t *testing.T) {
	tt := newThreadTuner(4)
	n := tt.threads()
	// Trust bucket 5 (16 tokens) at 4 threads.
	for range tunerFirstProbe {
		n = tt.observe(16, 10*time.Millisecond)
	}
	if n != 4 {
		t.Fatalf("count %d before any probe, want 4", n)
	}
	n = tt.observe(16, 10*time.Millisecond)
	if n != 3 || !tt.probe.active {
		t.Fatalf("count %d after %d steps, want a probe at 3", n, tunerFirstProbe+1)
	}
	// One-token steps (bucket 1, untrusted) faster than anything: no verdict.
	for range tunerProbeMax - 1 {
		if n = tt.observe(1, time.Millisecond); n != 3 {
			t.Fatalf("probe ended after an uncompared step: count %d", n)
		}
	}
	if tt.probe.n != 0 {
		t.Fatalf("%d steps compared, want 0", tt.probe.n)
	}
	if n = tt.observe(1, time.Millisecond); n != 4 || tt.switches != 0 {
		t.Fatalf("after %d uncompared steps: count %d, switches %d; want back at 4 without a switch", tunerProbeMax, n, tt.switches)
	}
	// The next probe is a full interval away and not doubled.
	if tt.wait[tunerDown] != tunerMinInterval || tt.interval[tunerDown] != tunerMinInterval {
		t.Fatalf("wait %d, interval %d; want %d", tt.wait[tunerDown], tt.interval[tunerDown], tunerMinInterval)
	}
	// A one-token step 3× longer than a trusted 16-token one is a clear
	// loss, bucket or not.
	for range tunerMinInterval - 1 {
		n = tt.observe(16, 10*time.Millisecond)
	}
	if n = tt.observe(16, 10*time.Millisecond); n != 3 {
		t.Fatalf("count %d, want a second probe at 3", n)
	}
	if n = tt.observe(1, 30*time.Millisecond); n != 4 || tt.probe.active {
		t.Fatalf("count %d after a 3× step, want the probe aborted", n)
	}
	// And at the current count two such steps in a row raise the alarm;
	// one alone does not.
	if n = tt.observe(1, 50*time.Millisecond); n != 4 || tt.probe.active {
		t.Fatalf("count %d after one 5× step, want no alarm yet", n)
	}
	if n = tt.observe(1, 50*time.Millisecond); n != 3 || !tt.probe.alarm {
		t.Fatalf("count %d after two 5× steps, want an alarm probe at 3", n)
	}
}

// TestTunerSchedule checks the probe intervals of a quiet machine: the
// first probe comes once a baseline is trusted, and then they double from
// tunerMinInterval to tunerMaxInterval.
func TestTunerSchedule(t *testing.T) {
	r := simulate(4, 20000, one, quiet)
	var starts []int
	for i := 1; i < len(r.used); i++ {
		if r.used[i] != 4 && r.used[i-1] == 4 {
			starts = append(starts, i)
		}
	}
	// The first, early probe loses without doubling the interval.
	want := []int{tunerFirstProbe + 1, tunerFirstProbe + 1 + tunerProbeSteps + tunerMinInterval}
	for gap := 2 * tunerMinInterval; want[len(want)-1] < 20000; gap = min(2*gap, tunerMaxInterval) {
		want = append(want, want[len(want)-1]+tunerProbeSteps+gap)
	}
	want = want[:len(want)-1]
	if len(starts) != len(want) {
		t.Fatalf("probes start at %v, want %v", starts, want)
	}
	for i := range want {
		if starts[i] != want[i] {
			t.Fatalf("probes start at %v, want %v", starts, want)
		}
	}
}

func TestTunerDeterministic(t *testing.T) {
	m := independentNoise(busy(8, 3, 500, 3000), 0.2, 10)
	a := simulate(8, 5000, mixedSizes, m)
	b := simulate(8, 5000, mixedSizes, m)
	for i := range a.used {
		if a.used[i] != b.used[i] {
			t.Fatalf("step %d: %d threads, then %d", i, a.used[i], b.used[i])
		}
	}
}

func TestTunerNoAllocs(t *testing.T) {
	tt := newThreadTuner(8)
	m := independentNoise(busy(8, 2, 300, 600), 0.2, 11)
	i := 0
	n := tt.threads()
	// Precompute the times: the model allocates, the tuner must not.
	const steps = 1000
	tok := make([]int, steps)
	for j := range tok {
		tok[j] = mixedSizes(j)
	}
	times := make([][9]time.Duration, steps)
	for j := range times {
		for c := 1; c <= 8; c++ {
			times[j][c] = m(c, tok[j], j)
		}
	}
	allocs := testing.AllocsPerRun(steps-1, func() {
		n = tt.observe(tok[i], times[i][n])
		i++
	})
	if allocs != 0 {
		t.Errorf("observe allocates %v times per call", allocs)
	}
	if tt.alarms == 0 || tt.probes == 0 {
		t.Errorf("alarms %d, probes %d: the run did not exercise them", tt.alarms, tt.probes)
	}
}

// TestTunerMixedBatches checks that batches alternating between buckets
// (decode steps of a few tokens between prefill chunks) still converge.
func TestTunerMixedBatches(t *testing.T) {
	const (
		arrive = 2000
		leave  = 6000
		steps  = 30000
	)
	prefill := func(i int) int { return []int{1, 2, 512, 1, 3, 256}[i%6] }
	tests := []struct {
		name   string
		max    int
		tokens func(int) int
		m      stepModel
		want   [3]int // the count before arrive, before leave, at the end
	}{
		{name: "alternating, 1 busy of 8", max: 8, tokens: alternate, m: busy(8, 1, arrive, leave), want: [3]int{8, 7, 8}},
		{name: "mixed, 3 busy of 8", max: 8, tokens: mixedSizes, m: busy(8, 3, arrive, leave), want: [3]int{8, 5, 8}},
		{name: "prefill chunks, 2 busy of 4", max: 4, tokens: prefill, m: busy(4, 2, arrive, leave), want: [3]int{4, 2, 4}},
		{name: "prefill chunks, valley at 3", max: 8, tokens: prefill, m: valley(3), want: [3]int{3, 3, 3}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := simulate(tt.max, steps, tt.tokens, tt.m)
			got := [3]int{r.cur[arrive-1], r.cur[leave-1], r.cur[steps-1]}
			t.Logf("counts %v; at %d from step %d, at %d from step %d; probes %d, alarms %d, switches %d",
				got, got[1], r.settled(0, leave, got[1]), got[2], r.settled(0, steps, got[2]), r.tt.probes, r.tt.alarms, r.tt.switches)
			if got != tt.want {
				t.Errorf("counts %v, want %v", got, tt.want)
			}
		})
	}
}

func TestTunerSetMax(t *testing.T) {
	tests := []struct {
		name       string
		max        int
		probe      bool // set it during a probe
		to         int
		next, last int // the count setMax returns, and after 2000 quiet steps
	}{
		{name: "lower", max: 8, to: 4, next: 4, last: 4},
		{name: "lower during a probe", max: 8, probe: true, to: 4, next: 4, last: 4},
		{name: "raise", max: 4, to: 8, next: 4, last: 8},
		{name: "raise during a probe", max: 4, probe: true, to: 6, next: 4, last: 6},
		{name: "same", max: 4, to: 4, next: 4, last: 4},
		{name: "to 1", max: 4, to: 1, next: 1, last: 1},
		{name: "to 0", max: 4, to: 0, next: 1, last: 1},
		{name: "from 1", max: 1, to: 3, next: 1, last: 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tu := newThreadTuner(tt.max)
			n := tu.threads()
			for i := 0; i < 200 || (tt.probe && !tu.probe.active && tt.max > 1); i++ {
				n = tu.observe(1, quiet(n, 1, i))
			}
			if tt.probe && tt.max > 1 && !tu.probe.active {
				t.Fatal("no probe")
			}
			if n = tu.setMax(tt.to); n != tt.next || n != tu.threads() {
				t.Fatalf("setMax(%d) = %d, threads %d; want %d", tt.to, n, tu.threads(), tt.next)
			}
			for i := range 2000 {
				if n = tu.observe(1, quiet(n, 1, i)); n > max(tt.to, 1) {
					t.Fatalf("step %d at %d threads, above %d", i, n, tt.to)
				}
			}
			if tu.cur != tt.last {
				t.Errorf("at %d threads after 2000 steps, want %d", tu.cur, tt.last)
			}
		})
	}
}

// BenchmarkTunerObserve measures observe on a machine whose load comes
// and goes.
func BenchmarkTunerObserve(b *testing.B) {
	const steps = 4096
	var times [steps][9]time.Duration
	m := busy(8, 2, 1000, 3000)
	for i := range times {
		for c := 1; c <= 8; c++ {
			times[i][c] = m(c, mixedSizes(i), i)
		}
	}
	tu := newThreadTuner(8)
	n := tu.threads()
	b.ReportAllocs()
	for i := range b.N {
		n = tu.observe(mixedSizes(i%steps), times[i%steps][n])
	}
}

func TestMedian(t *testing.T) {
	for _, tt := range []struct {
		v    [tunerProbeSteps]float64
		want float64
	}{
		{[3]float64{1, 2, 3}, 2}, {[3]float64{3, 2, 1}, 2}, {[3]float64{2, 3, 1}, 2},
		{[3]float64{1, 1, 5}, 1}, {[3]float64{5, 0.5, 5}, 5},
	} {
		if got := median(tt.v); got != tt.want {
			t.Errorf("median(%v) = %v, want %v", tt.v, got, tt.want)
		}
	}
}
