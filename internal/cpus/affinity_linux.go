package cpus

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// schedAffinity counts the CPUs in the calling thread's affinity mask. Go
// starts every thread with the process's mask, and nothing in kvgate sets
// one, so this is the process's.
func schedAffinity() (int, error) {
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		return 0, fmt.Errorf("sched_getaffinity: %w", err)
	}
	return set.Count(), nil
}
