// Choosing llama.cpp's thread count at run time.
//
// ggml's CPU threadpool waits at barriers by spinning, so a decode step
// runs at the pace of its slowest thread: with more threads than free
// cores (another process busy on the machine, a cgroup quota below the
// core count), a step waits for descheduled threads and can take 100 to
// 1000 times as long as with one thread less. The count that was right at
// startup (internal/cpus.DefaultThreads) stops being right when load
// arrives, and again when it leaves.
//
// The worker is meant to use a threadTuner like this: create it with
// newThreadTuner(n), n being the count the context was created with; after
// each llama_decode, call observe with the batch's token count and the
// decode's duration (time.Since a monotonic time.Now taken just before the
// call, sampling excluded); and when the count it returns differs from
// the context's, call llama_set_n_threads with it (n_threads and
// n_threads_batch alike) before the next llama_decode. observe does not
// allocate and costs well under a microsecond, so it can run every step.
// When the CPUs the process may use change (cpus.Available, read now and
// then), setMax with the new default moves the ceiling the same way.

package native

import (
	"math"
	"math/bits"
	"time"
)

// The tuner's constants. Step times are compared as ratios to a baseline,
// so none of them depends on the model or the machine.
const (
	// tunerAlpha is the weight of a new step in its bucket's baseline.
	tunerAlpha = 1.0 / 8
	// tunerMinSamples is how many steps a bucket needs at the current
	// count before its baseline is trusted.
	tunerMinSamples = 4
	// tunerClamp bounds a trusted baseline's update: a step counts as at
	// most tunerClamp times (at least 1/tunerClamp of) the baseline, so a
	// lone outlier moves it by at most (tunerClamp-1)·tunerAlpha.
	tunerClamp = 4.0
	// tunerProbeSteps is how many compared steps decide a probe.
	tunerProbeSteps = 3
	// tunerProbeMax is how many steps a probe may run at one count in
	// all, compared or not, before it gives up without a verdict.
	tunerProbeMax = 2 * tunerProbeSteps
	// tunerMinInterval and tunerMaxInterval bound the steps between two
	// probes in one direction: the interval starts at the minimum, doubles
	// after each probe that loses, and returns to the minimum after a
	// switch.
	tunerMinInterval = 32
	// tunerFirstProbe is when the first down probe is due: as soon as a
	// baseline is trusted, so that a process started on a busy machine
	// does not spend tunerMinInterval steps at a count that stalls every
	// one. Being early, it must win by tunerFirstWin, a margin no noise
	// of a machine that is not oversubscribed reaches.
	tunerFirstProbe  = tunerMinSamples
	tunerFirstWin    = 0.5
	tunerMaxInterval = 2048
	// tunerBudget is the share of step time that a losing probe may cost:
	// after a probe that cost the time of x baseline steps more than
	// staying would have, the next probe in its direction waits at least
	// x/tunerBudget steps, up to tunerMaxWait.
	tunerBudget  = 0.01
	tunerMaxWait = 8 * tunerMaxInterval
	// tunerWin is the largest probe median, as a ratio to the reference,
	// that wins: 10% faster. An up probe wins at tunerUpWin, not slower:
	// max is the count the tuner was given, so it moves away from it on
	// clear evidence only and comes back on any. This lets it climb back
	// through counts that differ by less than 10% (12 to 16 threads)
	// when load leaves.
	tunerWin   = 0.9
	tunerUpWin = 1.0
	// tunerNoise widens the margin of a down probe on a noisy machine: it
	// wins at 1 - tunerNoise·noise when that is lower than tunerWin, noise
	// being the mean absolute deviation of trusted steps from their
	// baselines (tunerAlpha-weighted). With a few percent of jitter it
	// changes nothing. With ±20% uniform jitter (a deviation of 0.1) it
	// asks for 20% rather than 10%: noise alone makes the median of three
	// steps at an equal count 10% faster in one probe in six, and 20%
	// faster almost never.
	tunerNoise = 2.0
	// tunerAbort ends a probe at once after a step more than tunerAbort
	// times the reference: a clear loss.
	tunerAbort = 2.0
	// tunerDownAbort ends a regular down probe after a step more than
	// tunerDownAbort times its baseline: on a quiet machine a thread less
	// is that much slower, and the probe's other steps would only add to
	// its cost (short benchmark rounds and restarts pay the first probes
	// in full). A down probe wins only at a median of tunerWin or less.
	tunerDownAbort = 1.25
	// tunerAlarm is the ratio to the baseline of a step at the current
	// count that means load arrived.
	tunerAlarm = 4.0
	// tunerAlarmSteps is how many alarming steps in a row raise the alarm.
	tunerAlarmSteps = 2
	// tunerBuckets is the number of batch-size buckets, one per value of
	// bits.Len.
	tunerBuckets = bits.UintSize + 1
)

// Probe directions, also indices of threadTuner's schedules.
const (
	tunerDown = 0
	tunerUp   = 1
)

// threadTuner picks llama.cpp's thread count for each decode step from
// the durations of the steps before. It is deterministic: the same
// sequence of (tokens, duration) gives the same counts.
//
// Steps are compared like with like: a step's bucket is
// bits.Len(uint(tokens)), and each bucket keeps a baseline of step time
// at the current count, trusted after tunerMinSamples steps: the smallest
// of the first steps (the first decode of a context is often slow), then
// an exponentially weighted mean (tunerAlpha) of steps clamped to within
// tunerClamp of it. A step is compared with its bucket's baseline as a
// ratio; a step whose bucket is not trusted decides nothing, but the
// baseline of a larger trusted bucket bounds it from below, which is
// enough to see that it is slow.
//
// The tuner moves by probes, which run a few steps at another count:
//
//   - Periodic probes. Each direction (down to cur-1 while cur > 1, up to
//     cur+1 while cur < max) has its own schedule: a probe every interval
//     steps at the current count, starting at tunerMinInterval and
//     doubling after each probe in that direction that loses, up to
//     tunerMaxInterval; both return to tunerMinInterval after a switch,
//     the direction just taken first and the other tunerMinInterval steps
//     later. Separate schedules bound the time to notice that load has
//     left (an up probe) whatever the down probes find. A probe starts
//     after a step whose bucket is trusted, and runs until
//     tunerProbeSteps trusted steps (tunerProbeMax steps in all, or it
//     ends without a verdict). A down probe wins when their median is at
//     most tunerWin (10% faster), or less on a noisy machine (tunerNoise);
//     an up probe wins at tunerUpWin, not slower, since max is the count
//     the tuner was given: it leaves it on clear evidence and comes back
//     on any, which lets it climb back through counts that differ by less
//     than 10% (12 to 16 threads) when load leaves. A probe ends as a loss
//     at once after a step more than tunerAbort times its baseline, so a
//     probe at a count that has become 100× slow costs one such step. A
//     losing probe also delays the next one in its direction so that
//     probing costs at most tunerBudget of the step time, up to
//     tunerMaxWait steps: every 2048 steps, a probe that costs one 1000×
//     step would waste a third of the time.
//   - Alarms. tunerAlarmSteps steps in a row at the current count, each
//     more than tunerAlarm times its baseline, mean load arrived. When
//     cur > 1 the tuner descends at once, one step per count tried:
//     cur-1, then 2, 4, 8... below the last count tried while its step is
//     slow (no better than tunerWin of the alarming level), then bisecting
//     between the highest count found not slow and the lowest found slow.
//     It switches to the highest count not slow when tunerProbeSteps
//     steps there have a median at most tunerWin of the alarming level. A
//     descent that finds nothing better returns to the current count and
//     relearns its baselines: the whole machine got slower. A lone slow
//     step (a page fault storm, a pause of the process) raises no alarm:
//     measured on a quiet 2-CPU machine, such steps sent the count down
//     several times in 128 steps, at a quarter of one stream's throughput
//     until the next up probe, while waiting for a second slow step costs
//     real load one step.
//
// On a switch the baselines carry over to the new count scaled by the
// winning probe's median ratio, so that they stay trusted.
//
// The tuner only picks among 1 to max threads; it cannot tell that more
// threads than the machine's cores would help, nor descend a gentle slope
// (each thread less under 10% faster, as past the physical cores with SMT
// siblings): max should be a good count on a quiet machine, as
// cpus.DefaultThreads gives.
type threadTuner struct {
	max, cur int
	buckets  [tunerBuckets]tunerBucket
	// interval is each direction's probe interval, wait its steps left.
	interval, wait [2]int
	// last is the direction of the last switch, tried first.
	last int
	// noise is the mean absolute deviation of trusted steps' ratios from
	// 1 (see tunerNoise).
	noise float64
	probe tunerProbe
	// Counts, for tests and logs.
	probes, alarms, switches int
	// alarmRun counts the alarming steps in a row so far, alarmRef is the
	// ratio of the last of them.
	alarmRun int
	alarmRef float64
}

// tunerBucket is the baseline of one batch-size bucket at the current
// count.
type tunerBucket struct {
	mean float64 // nanoseconds
	n    int     // samples, up to tunerMinSamples
}

// tunerProbe is a probe in progress.
type tunerProbe struct {
	active bool
	alarm  bool
	dir    int
	count  int
	// ref is the ratio to beat: 1, or the alarming level of a descent;
	// the median of the probe's steps must be at most win·ref.
	ref, win float64
	// A descent's search: lo is the highest count found not slow (0 for
	// none yet), hi the lowest found slow, and stride the next gallop.
	lo, hi, stride int
	// ratios are the compared steps at count, n of them; steps counts
	// every step at count.
	ratios [tunerProbeSteps]float64
	n      int
	steps  int
	// excess is the probe's cost so far, in baseline steps beyond ref.
	excess float64
}

// newThreadTuner returns a tuner that starts at, and never goes above, n
// threads (at least 1).
func newThreadTuner(n int) *threadTuner {
	n = max(n, 1)
	t := &threadTuner{max: n, cur: n, last: tunerDown}
	t.interval = [2]int{tunerMinInterval, tunerMinInterval}
	// The first down probe comes as soon as a baseline is trusted: a
	// process that starts on a busy machine would otherwise spend its
	// first tunerMinInterval steps at a count that may stall every one.
	t.wait = [2]int{tunerFirstProbe, 2 * tunerMinInterval}
	return t
}

// setMax changes the largest count to n (at least 1), for when the CPUs
// the process may use change (see cpus.Available), and returns the count
// for the next decode. A current count above n drops to n and relearns
// its baselines; a probe in progress ends; the probes start over at
// tunerMinInterval, so that a larger max is tried soon.
func (t *threadTuner) setMax(n int) int {
	n = max(n, 1)
	if n == t.max {
		return t.threads()
	}
	t.max = n
	t.probe.active = false
	if t.cur > n {
		t.cur = n
		for i := range t.buckets {
			t.buckets[i].n = 0
		}
	}
	t.interval = [2]int{tunerMinInterval, tunerMinInterval}
	t.wait = [2]int{tunerMinInterval, tunerMinInterval}
	return t.cur
}

// threads returns the count for the next decode: what observe last
// returned, or max before the first call.
func (t *threadTuner) threads() int {
	if t.probe.active {
		return t.probe.count
	}
	return t.cur
}

// observe records that a decode of tokens tokens took d with the count
// that the last call returned (max at first), and returns the count for
// the next decode.
func (t *threadTuner) observe(tokens int, d time.Duration) int {
	if t.max == 1 {
		return 1
	}
	ns := float64(max(d, 1))
	b := bits.Len(uint(max(tokens, 0)))
	if t.probe.active {
		t.probeStep(b, ns)
		return t.threads()
	}
	r, exact, ok := t.ratio(b, ns)
	if ok && r > tunerAlarm && t.cur > 1 {
		// Load that arrived slows every step; a lone slow step (a page
		// fault, a pause of the process) must not send the count down,
		// where the probe would beat the slow step and stay.
		t.alarmRun++
		if t.alarmRun < tunerAlarmSteps {
			t.alarmRef = r
			return t.threads()
		}
		ref := math.Min(r, t.alarmRef)
		t.alarmRun = 0
		t.alarms++
		t.probe = tunerProbe{active: true, alarm: true, dir: tunerDown, count: t.cur - 1, ref: ref, win: tunerWin, hi: t.cur, stride: 2}
		return t.threads()
	}
	t.alarmRun = 0
	if exact {
		// A step past 1.5× (an outlier, or load below the alarm) counts
		// as 0.5, so that one does not stall the down probes for long.
		t.noise += tunerAlpha * (math.Min(math.Abs(r-1), 0.5) - t.noise)
	}
	t.learn(b, ns)
	for dir := range t.wait {
		if t.can(dir) {
			t.wait[dir]--
		}
	}
	if exact {
		if dir, ok := t.due(); ok {
			t.probes++
			t.probe = tunerProbe{active: true, dir: dir, count: t.cur + 2*dir - 1, ref: 1,
				win: math.Min(tunerWin, 1-tunerNoise*t.noise)}
			switch {
			case dir == tunerUp:
				t.probe.win = tunerUpWin
			case t.probes == 1:
				// The first probe comes before the noise is known.
				t.probe.win = tunerFirstWin
			}
		}
	}
	return t.threads()
}

// ratio returns ns over the baseline of bucket b, with exact true, when
// that baseline is trusted. Otherwise it returns ns over the baseline of
// the smallest larger bucket that is trusted, a lower bound of the ratio
// since larger batches take longer, with exact false; ok is false when
// there is none.
func (t *threadTuner) ratio(b int, ns float64) (r float64, exact, ok bool) {
	for i := b; i < tunerBuckets; i++ {
		if k := &t.buckets[i]; k.n >= tunerMinSamples {
			return ns / k.mean, i == b, true
		}
	}
	return 0, false, false
}

// learn adds a step of ns at the current count to bucket b's baseline.
func (t *threadTuner) learn(b int, ns float64) {
	k := &t.buckets[b]
	switch {
	case k.n == 0:
		k.mean = ns
	case k.n < tunerMinSamples:
		k.mean = math.Min(k.mean, ns)
	default:
		x := math.Min(math.Max(ns, k.mean/tunerClamp), k.mean*tunerClamp)
		k.mean += tunerAlpha * (x - k.mean)
	}
	if k.n < tunerMinSamples {
		k.n++
	}
}

// can reports whether a probe in direction dir is possible from cur.
func (t *threadTuner) can(dir int) bool {
	if dir == tunerDown {
		return t.cur > 1
	}
	return t.cur < t.max
}

// due returns the direction whose probe is due, the last switch's first.
func (t *threadTuner) due() (int, bool) {
	for _, dir := range [2]int{t.last, 1 - t.last} {
		if t.can(dir) && t.wait[dir] <= 0 {
			return dir, true
		}
	}
	return 0, false
}

// probeStep records a step of ns in bucket b at the probe's count.
func (t *threadTuner) probeStep(b int, ns float64) {
	p := &t.probe
	p.steps++
	r, exact, ok := t.ratio(b, ns)
	if ok {
		p.excess += math.Max(r-p.ref, 0)
	}
	if p.alarm && !p.confirming() {
		t.search(r, exact, ok)
		return
	}
	switch {
	case ok && r > tunerAbort*p.ref, ok && p.dir == tunerDown && !p.alarm && r > tunerDownAbort*p.ref:
		t.lose()
		return
	case exact:
		p.ratios[p.n] = r
		p.n++
		if p.n == tunerProbeSteps {
			if m := median(p.ratios); m <= p.win*p.ref {
				t.win(m)
			} else {
				t.lose()
			}
			return
		}
	}
	if p.steps >= tunerProbeMax {
		if p.alarm {
			t.lose()
			return
		}
		// No verdict: try again after a full interval.
		t.wait[p.dir] = t.interval[p.dir]
		p.active = false
	}
}

// search takes a step of a descent, with ratio r (see ratio), before it
// has found the count to confirm: the highest below cur whose step is not
// slow, no better than the alarming level. It gallops down (cur-1, then
// 2, 4, 8... below the last slow count) to a count that is not slow, then
// bisects between it and the lowest slow count.
func (t *threadTuner) search(r float64, exact, ok bool) {
	p := &t.probe
	switch {
	case ok && r > tunerWin*p.ref:
		p.hi = p.count
		p.ref = math.Min(p.ref, r)
	case exact:
		p.lo = p.count
		p.ratios[0], p.n = r, 1
	default:
		// No comparison: try the count again.
		if p.steps >= tunerProbeMax {
			t.lose()
		}
		return
	}
	var next int
	switch {
	case p.lo == 0 && p.hi == 1:
		t.lose()
		return
	case p.lo == 0:
		next = max(p.hi-p.stride, 1)
		p.stride *= 2
	case p.hi-p.lo > 1:
		next = (p.lo + p.hi) / 2
	default:
		next = p.lo
	}
	if next != p.count {
		p.count, p.n, p.steps = next, 0, 0
	}
}

// confirming reports whether a descent has found its count and runs the
// steps that decide it.
func (p *tunerProbe) confirming() bool {
	return p.lo > 0 && p.hi == p.lo+1 && p.count == p.lo
}

// win switches to the probe's count, whose steps took m times the old
// count's baselines.
func (t *threadTuner) win(m float64) {
	p := &t.probe
	for i := range t.buckets {
		t.buckets[i].mean *= m
	}
	t.cur, t.last = p.count, p.dir
	if p.alarm {
		// Check first that the alarm was not a lone slow step.
		t.last = tunerUp
	}
	t.interval = [2]int{tunerMinInterval, tunerMinInterval}
	t.wait[t.last], t.wait[1-t.last] = tunerMinInterval, 2*tunerMinInterval
	t.switches++
	p.active = false
}

// lose ends the probe and goes back to the current count.
func (t *threadTuner) lose() {
	p := &t.probe
	d := p.dir
	p.active = false
	if p.alarm {
		// No count below is faster: the whole machine got slower.
		// Relearn, and probe down again soon in case that was noise.
		for i := range t.buckets {
			t.buckets[i].n = 0
		}
		t.wait[d] = tunerMinInterval
		return
	}
	if p.win == tunerFirstWin && d == tunerDown {
		// The early first probe lost: the regular schedule starts as if
		// it had not run.
		t.wait[d] = tunerMinInterval
		return
	}
	t.interval[d] = min(2*t.interval[d], tunerMaxInterval)
	t.wait[d] = max(t.interval[d], int(math.Min(math.Ceil(p.excess/tunerBudget), tunerMaxWait)))
}

// median returns the median of a probe's ratios.
func median(v [tunerProbeSteps]float64) float64 {
	for i := 1; i < len(v); i++ {
		for j := i; j > 0 && v[j] < v[j-1]; j-- {
			v[j], v[j-1] = v[j-1], v[j]
		}
	}
	return v[len(v)/2]
}
