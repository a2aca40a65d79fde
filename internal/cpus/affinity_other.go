//go:build !linux

package cpus

import "errors"

// schedAffinity has no affinity mask to read outside Linux: Available
// falls back on runtime.NumCPU.
func schedAffinity() (int, error) {
	return 0, errors.New("sched_getaffinity: not on Linux")
}
