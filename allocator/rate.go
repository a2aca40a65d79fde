package allocator

import (
	"math"
	"time"
)

// rateWindowSeconds is the length of the sliding window over which
// DrainCellsPerSecond is measured.
const rateWindowSeconds = 10

// drainWindow counts released cells in per-second buckets, a ring indexed by
// Unix second, covering the last rateWindowSeconds seconds.
type drainWindow struct {
	buckets [rateWindowSeconds]struct {
		sec   int64
		cells int64
	}
}

// add records cells released at now.
func (d *drainWindow) add(now time.Time, cells int) {
	sec := now.Unix()
	b := &d.buckets[bucketIndex(sec)]
	if b.sec != sec {
		b.sec, b.cells = sec, 0
	}
	b.cells += int64(cells)
}

// rate returns the cells released per second over the window ending at now,
// which starts rateWindowSeconds-1 whole seconds before now's second, or at
// start if that is later; a window shorter than one second counts as one
// second. It returns 0 when nothing was released in the window.
func (d *drainWindow) rate(start, now time.Time) float64 {
	sec := now.Unix()
	var sum int64
	for _, b := range d.buckets {
		if b.sec > sec-rateWindowSeconds && b.sec <= sec {
			sum += b.cells
		}
	}
	if sum <= 0 {
		return 0
	}
	from := time.Unix(sec-rateWindowSeconds+1, 0)
	if start.After(from) {
		from = start
	}
	span := max(now.Sub(from), time.Second)
	return float64(sum) / span.Seconds()
}

func bucketIndex(sec int64) int {
	i := sec % rateWindowSeconds
	if i < 0 {
		i += rateWindowSeconds
	}
	return int(i)
}

// secondsToDuration converts seconds to a Duration, saturating instead of
// overflowing.
func secondsToDuration(s float64) time.Duration {
	ns := s * float64(time.Second)
	if ns >= math.MaxInt64 || math.IsNaN(ns) {
		return math.MaxInt64
	}
	return time.Duration(ns)
}
