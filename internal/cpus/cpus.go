// Package cpus finds how many CPUs the process can use, the way Go's
// runtime sizes GOMAXPROCS since Go 1.25: the smaller of the CPUs in its
// affinity mask and its cgroup's CPU bandwidth limit rounded up, and picks
// the default number of llama.cpp threads from it.
//
// Using more threads than that is not merely wasteful with llama.cpp:
// ggml's CPU threadpool waits at barriers by spinning, so a decode step
// runs at the pace of its slowest thread, and a thread without a core of
// its own (descheduled for another process, or throttled by the cgroup's
// quota) stalls all the others. On 2 CPUs with two busy loops beside it,
// 2 threads took 15–30 s for 64 tokens where 1 thread took 25 ms.
//
// Two things differ from Go's runtime. It reads the limit of the
// process's own cgroup only; Available also reads its ancestors' up to the
// mount's root, since a parent's limit binds its children, and takes the
// smallest. And it rounds a limit below 2 CPUs up to 2; Available keeps 1,
// since a second spinning thread under a quota of one CPU would have the
// whole cgroup throttled for half of each period.
//
// The parsers take bytes or an fs.FS, so that they can be tested on
// synthetic files; only Available reads the running system.
package cpus

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"runtime"
	"strings"
)

// Info is how many CPUs the process can use, and what decided it.
type Info struct {
	// CPUs is the usable CPU count: the smaller of Affinity and the cgroup
	// limit rounded up (Limit.Ceil), and never below 1.
	CPUs int
	// Affinity is the number of CPUs the process may run on.
	Affinity int
	// AffinitySource is where Affinity came from: "sched_getaffinity",
	// "Cpus_allowed_list" of /proc/self/status (where the mask is too large
	// for sched_getaffinity's 1024 CPUs), or "runtime.NumCPU".
	AffinitySource string
	// Limit is the tightest CPU bandwidth limit of the process's cgroup and
	// its ancestors; it is not Limited when there is none.
	Limit Limit
	// CgroupErr is why the cgroup limit could not be read, then ignored,
	// or nil. A process in no CPU cgroup has no error.
	CgroupErr error
}

// ByCgroup reports whether the cgroup limit, rather than the affinity
// mask, decided CPUs.
func (i Info) ByCgroup() bool {
	return i.Limit.Limited() && i.Limit.Ceil() < i.Affinity
}

// String describes i for a log line, for example "2 CPUs (cgroup v2
// /sys/fs/cgroup/kv cpu.max 150000/100000 = 1.5 CPUs; affinity 16 from
// sched_getaffinity)".
func (i Info) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d CPUs (", i.CPUs)
	aff := fmt.Sprintf("affinity %d from %s", i.Affinity, i.AffinitySource)
	switch {
	case i.ByCgroup():
		fmt.Fprintf(&b, "cgroup %s %s %s = %.3g CPUs; %s", i.Limit.Version, i.Limit.Dir, i.Limit.file(), i.Limit.CPUs(), aff)
	case i.Limit.Limited():
		fmt.Fprintf(&b, "%s; cgroup %s %s %s = %.3g CPUs", aff, i.Limit.Version, i.Limit.Dir, i.Limit.file(), i.Limit.CPUs())
	default:
		b.WriteString(aff + "; no cgroup CPU limit")
	}
	if i.CgroupErr != nil {
		fmt.Fprintf(&b, "; cgroup limit unread: %v", i.CgroupErr)
	}
	b.WriteByte(')')
	return b.String()
}

// file names the limit's files and values, as in "cpu.max 150000/100000".
func (l Limit) file() string {
	if l.Version == V1 {
		return "cpu.cfs_quota_us/cpu.cfs_period_us " + l.Quota.String()
	}
	return "cpu.max " + l.Quota.String()
}

// Available returns the CPUs this process can use now, read from the
// running system: its affinity mask and its cgroup's limit. Both can
// change while the process runs (a container's limit is updated, taskset
// is run on it), so it reads them afresh at each call; a call reads a few
// small files.
func Available() Info {
	return available(os.DirFS("/"), schedAffinity)
}

// available is Available on the root file system fsys, with sched in
// place of sched_getaffinity.
func available(fsys fs.FS, sched func() (int, error)) Info {
	var i Info
	if n, err := sched(); err == nil && n > 0 {
		i.Affinity, i.AffinitySource = n, "sched_getaffinity"
	} else if b, err := fs.ReadFile(fsys, "proc/self/status"); err == nil {
		if s, ok := allowedList(b); ok {
			if n, err := ParseCPUList(s); err == nil && n > 0 {
				i.Affinity, i.AffinitySource = n, "Cpus_allowed_list"
			}
		}
	}
	if i.Affinity == 0 {
		i.Affinity, i.AffinitySource = runtime.NumCPU(), "runtime.NumCPU"
	}
	lim, err := CgroupLimit(fsys)
	if err != nil && !errors.Is(err, ErrNoCgroup) {
		i.CgroupErr = err
	}
	if err == nil {
		i.Limit = lim
	}
	i.CPUs = i.Affinity
	if i.ByCgroup() {
		i.CPUs = i.Limit.Ceil()
	}
	i.CPUs = max(i.CPUs, 1)
	return i
}

// DefaultThreads returns how many threads llama.cpp should decode with
// when available CPUs are usable: all of them up to 2, and one less above
// (3 → 2, 4 → 3, 16 → 15), never below 1.
//
// The spare CPU is for the Go side (gRPC, tokenization, streaming tokens
// out, and the garbage collector, which takes a quarter of GOMAXPROCS
// while it marks): with every CPU spinning in ggml's barriers, any of that
// work deschedules a decode thread and stalls the whole step. Leaving one
// CPU costs at most a quarter of the decode throughput from 4 CPUs on (a
// third at 3), a fair price for steps that never wait on a descheduled
// thread. At 1 or 2 CPUs it would cost all or half of it, a sure loss
// against an occasional stall, so those keep every CPU, and the decode
// worker's measurements lower the count at run time if the stalls come.
func DefaultThreads(available int) int {
	if available <= 2 {
		return max(available, 1)
	}
	return available - 1
}
