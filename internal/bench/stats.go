package bench

import (
	"math"
	"math/rand/v2"
	"slices"
	"time"
)

// Percentile returns the p-th percentile (0 <= p <= 100) of sorted, an
// ascending slice, interpolating linearly between the two nearest ranks
// (the method numpy uses by default, "type 7"): rank p/100*(n-1), counted
// from 0. It returns 0 for an empty slice.
func Percentile(sorted []float64, p float64) float64 {
	n := len(sorted)
	switch {
	case n == 0:
		return 0
	case p <= 0:
		return sorted[0]
	case p >= 100:
		return sorted[n-1]
	}
	rank := p / 100 * float64(n-1)
	lo := int(math.Floor(rank))
	if lo >= n-1 {
		return sorted[n-1]
	}
	frac := rank - float64(lo)
	return sorted[lo] + frac*(sorted[lo+1]-sorted[lo])
}

// Summary describes a set of samples. Every field is 0 when there are no
// samples.
type Summary struct {
	// Count is the number of samples.
	Count int `json:"count"`
	// Mean is their arithmetic mean.
	Mean float64 `json:"mean"`
	// P50 is the median.
	P50 float64 `json:"p50"`
	// P90 is the 90th percentile.
	P90 float64 `json:"p90"`
	// P99 is the 99th percentile.
	P99 float64 `json:"p99"`
	// Max is the largest sample.
	Max float64 `json:"max"`
}

// Summarize returns the summary of samples, which it sorts in place.
// Samples that are NaN or infinite are ignored.
func Summarize(samples []float64) Summary {
	s := samples[:0]
	for _, x := range samples {
		if !math.IsNaN(x) && !math.IsInf(x, 0) {
			s = append(s, x)
		}
	}
	if len(s) == 0 {
		return Summary{}
	}
	slices.Sort(s)
	var sum float64
	for _, x := range s {
		sum += x
	}
	return Summary{
		Count: len(s),
		Mean:  sum / float64(len(s)),
		P50:   Percentile(s, 50),
		P90:   Percentile(s, 90),
		P99:   Percentile(s, 99),
		Max:   s[len(s)-1],
	}
}

// Arrivals is a Poisson arrival process: the gaps between arrivals are
// independent and exponentially distributed with mean 1/rate, so the count
// of arrivals in any window of t seconds is Poisson with mean rate*t. It is
// not safe for concurrent use.
type Arrivals struct {
	rate float64
	rng  *rand.Rand
	at   float64 // seconds since the start
}

// NewArrivals returns a Poisson process of rate arrivals per second, seeded
// by seed. rate must be positive.
func NewArrivals(rate float64, seed uint64) *Arrivals {
	return &Arrivals{rate: rate, rng: rand.New(rand.NewPCG(seed, 0x617272697665))}
}

// Next returns the time of the next arrival, measured from the start of
// the process. Scheduling arrivals at absolute offsets keeps a late sender
// from drifting the rate.
func (a *Arrivals) Next() time.Duration {
	a.at += a.rng.ExpFloat64() / a.rate
	return time.Duration(a.at * float64(time.Second))
}

// ms converts a duration to milliseconds.
func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// perSecond returns n per second over d, or 0 when d is not positive.
func perSecond(n float64, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return n / d.Seconds()
}
