package cpus

import (
	"fmt"
	"strconv"
	"strings"
)

// ParseCPUList counts the CPUs in a kernel CPU list such as "0-3,8,10-11"
// (7 CPUs), the format of /sys/devices/system/cpu/online and of
// Cpus_allowed_list in /proc/self/status. Surrounding space is ignored and
// an empty list is 0 CPUs. The kernel writes the ranges in increasing
// order without overlaps; a list that does not is malformed.
func ParseCPUList(s string) (int, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, nil
	}
	n, next := 0, 0
	for r := range strings.SplitSeq(s, ",") {
		lo, hi, isRange := strings.Cut(r, "-")
		a, err := parseCPU(lo)
		if err != nil {
			return 0, fmt.Errorf("cpu list %q: %w", s, err)
		}
		b := a
		if isRange {
			if b, err = parseCPU(hi); err != nil {
				return 0, fmt.Errorf("cpu list %q: %w", s, err)
			}
		}
		if a < next || b < a {
			return 0, fmt.Errorf("cpu list %q: range %q out of order: %w", s, r, ErrMalformed)
		}
		n += b - a + 1
		next = b + 1
	}
	return n, nil
}

// parseCPU parses a CPU number of a CPU list.
func parseCPU(s string) (int, error) {
	n, err := strconv.ParseUint(s, 10, 31)
	if err != nil {
		return 0, fmt.Errorf("cpu %q: %w", s, ErrMalformed)
	}
	return int(n), nil
}

// allowedList returns the Cpus_allowed_list value of /proc/self/status.
func allowedList(status []byte) (string, bool) {
	for line := range strings.Lines(string(status)) {
		if v, ok := strings.CutPrefix(line, "Cpus_allowed_list:"); ok {
			return strings.TrimSpace(v), true
		}
	}
	return "", false
}
