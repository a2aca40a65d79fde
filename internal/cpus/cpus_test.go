package cpus

import (
	"errors"
	"os"
	"runtime"
	"strings"
	"testing"
	"testing/fstest"
)

func TestParseCPUList(t *testing.T) {
	tests := []struct {
		in      string
		want    int
		wantErr bool
	}{
		{in: "0-3,8,10-11", want: 7},
		{in: "0-3,8,10-11\n", want: 7},
		{in: "0", want: 1},
		{in: "5", want: 1},
		{in: "0-1023", want: 1024},
		{in: "0,2,4,6", want: 4},
		{in: "3-3", want: 1},
		{in: "", want: 0},
		{in: "\n", want: 0},
		{in: "a", wantErr: true},
		{in: "3-1", wantErr: true},
		{in: "1-", wantErr: true},
		{in: "-1", wantErr: true},
		{in: "1,,2", wantErr: true},
		{in: "0-3,2", wantErr: true},
		{in: "4,1", wantErr: true},
		{in: "1,1", wantErr: true},
		{in: "0-3 ,5", wantErr: true},
		{in: "0-1-2", wantErr: true},
	}
	for _, tt := range tests {
		got, err := ParseCPUList(tt.in)
		if tt.wantErr {
			if !errors.Is(err, ErrMalformed) {
				t.Errorf("ParseCPUList(%q) = %d, %v; want ErrMalformed", tt.in, got, err)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("ParseCPUList(%q) = %d, %v; want %d", tt.in, got, err, tt.want)
		}
	}
}

func TestDefaultThreads(t *testing.T) {
	for _, tt := range []struct{ available, want int }{
		{-1, 1}, {0, 1}, {1, 1}, {2, 2}, {3, 2}, {4, 3}, {8, 7}, {16, 15}, {192, 191},
	} {
		if got := DefaultThreads(tt.available); got != tt.want {
			t.Errorf("DefaultThreads(%d) = %d, want %d", tt.available, got, tt.want)
		}
	}
}

func TestAvailable(t *testing.T) {
	sched := func(n int) func() (int, error) {
		return func() (int, error) { return n, nil }
	}
	noSched := func() (int, error) { return 0, errors.New("EINVAL") }
	v2 := func(cpuMax string) fstest.MapFS {
		return fstest.MapFS{
			"proc/self/cgroup":         file("0::/kv\n"),
			"proc/self/mountinfo":      file(miRoot + miV2),
			"proc/self/status":         file("Name:\tkvgate\nCpus_allowed:\tff\nCpus_allowed_list:\t0-7\nMems_allowed_list:\t0\n"),
			"sys/fs/cgroup/kv/cpu.max": file(cpuMax),
		}
	}
	tests := []struct {
		name     string
		fsys     fstest.MapFS
		sched    func() (int, error)
		cpus     int
		affinity int
		source   string
		byCgroup bool
		cgErr    bool
		str      string // a substring of String
	}{
		{name: "affinity decides", fsys: v2("max 100000\n"), sched: sched(16), cpus: 16, affinity: 16, source: "sched_getaffinity", str: "16 CPUs (affinity 16 from sched_getaffinity; no cgroup CPU limit)"},
		{name: "quota rounds up", fsys: v2("150000 100000\n"), sched: sched(16), cpus: 2, affinity: 16, source: "sched_getaffinity", byCgroup: true,
			str: "2 CPUs (cgroup v2 /sys/fs/cgroup/kv cpu.max 150000/100000 = 1.5 CPUs; affinity 16 from sched_getaffinity)"},
		{name: "quota below one CPU", fsys: v2("20000 100000\n"), sched: sched(4), cpus: 1, affinity: 4, source: "sched_getaffinity", byCgroup: true, str: "= 0.2 CPUs"},
		{name: "quota above affinity", fsys: v2("800000 100000\n"), sched: sched(2), cpus: 2, affinity: 2, source: "sched_getaffinity",
			str: "2 CPUs (affinity 2 from sched_getaffinity; cgroup v2 /sys/fs/cgroup/kv cpu.max 800000/100000 = 8 CPUs)"},
		{name: "quota equal to affinity", fsys: v2("400000 100000\n"), sched: sched(4), cpus: 4, affinity: 4, source: "sched_getaffinity"},
		{name: "Cpus_allowed_list fallback", fsys: v2("max 100000\n"), sched: noSched, cpus: 8, affinity: 8, source: "Cpus_allowed_list"},
		{name: "runtime.NumCPU fallback", fsys: fstest.MapFS{}, sched: noSched, cpus: runtime.NumCPU(), affinity: runtime.NumCPU(), source: "runtime.NumCPU"},
		{name: "zero affinity falls back", fsys: fstest.MapFS{}, sched: sched(0), cpus: runtime.NumCPU(), affinity: runtime.NumCPU(), source: "runtime.NumCPU"},
		{name: "malformed cpu.max is ignored", fsys: v2("lots\n"), sched: sched(6), cpus: 6, affinity: 6, source: "sched_getaffinity", cgErr: true, str: "cgroup limit unread: "},
		{name: "no cgroup is no error", fsys: fstest.MapFS{}, sched: sched(3), cpus: 3, affinity: 3, source: "sched_getaffinity", str: "no cgroup CPU limit)"},
		{name: "v1", sched: sched(8), cpus: 3, affinity: 8, source: "sched_getaffinity", byCgroup: true, fsys: fstest.MapFS{
			"proc/self/cgroup":                            file("1:cpu,cpuacct:/\n"),
			"proc/self/mountinfo":                         file(miV1Tmpfs + miV1Cpu),
			"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us":  file("250000\n"),
			"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": file("100000\n"),
		}, str: "cgroup v1 /sys/fs/cgroup/cpu,cpuacct cpu.cfs_quota_us/cpu.cfs_period_us 250000/100000 = 2.5 CPUs"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			i := available(tt.fsys, tt.sched)
			if i.CPUs != tt.cpus || i.Affinity != tt.affinity || i.AffinitySource != tt.source || i.ByCgroup() != tt.byCgroup || (i.CgroupErr != nil) != tt.cgErr {
				t.Errorf("available = %+v (ByCgroup %v); want CPUs %d, affinity %d from %s, ByCgroup %v, cgroup error %v",
					i, i.ByCgroup(), tt.cpus, tt.affinity, tt.source, tt.byCgroup, tt.cgErr)
			}
			if s := i.String(); !strings.Contains(s, tt.str) {
				t.Errorf("String() = %q, want it to contain %q", s, tt.str)
			}
		})
	}
}

// TestAvailableHere reads the machine the test runs on. Go's runtime
// sizes GOMAXPROCS from the same mask and the leaf cgroup's limit,
// rounding up to at least 2, so Available can only be as large.
func TestAvailableHere(t *testing.T) {
	i := Available()
	t.Logf("Available: %v", i)
	if i.CPUs < 1 || i.CPUs > i.Affinity {
		t.Errorf("Available().CPUs = %d, want 1 to Affinity %d", i.CPUs, i.Affinity)
	}
	if i.CgroupErr != nil {
		t.Errorf("cgroup limit: %v", i.CgroupErr)
	}
	if os.Getenv("GOMAXPROCS") == "" && !strings.Contains(os.Getenv("GODEBUG"), "containermaxprocs") {
		if p := runtime.GOMAXPROCS(0); i.CPUs > p {
			t.Errorf("Available().CPUs = %d above GOMAXPROCS %d", i.CPUs, p)
		}
	}
}
