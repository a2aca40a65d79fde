package cpus

import (
	"errors"
	"io/fs"
	"math"
	"testing"
	"testing/fstest"
)

func TestParseCPUMax(t *testing.T) {
	tests := []struct {
		in      string
		want    Quota
		wantErr bool
	}{
		{in: "max 100000\n", want: Quota{}},
		{in: "max 100000", want: Quota{}},
		{in: "150000 100000\n", want: Quota{150000, 100000}},
		{in: "150000 100000", want: Quota{150000, 100000}},
		{in: "1000 1000000\n", want: Quota{1000, 1000000}},
		{in: "", wantErr: true},
		{in: "\n", wantErr: true},
		{in: "max\n", wantErr: true},
		{in: "150000\n", wantErr: true},
		{in: "150000 100000 7\n", wantErr: true},
		{in: "abc 100000\n", wantErr: true},
		{in: "150000 abc\n", wantErr: true},
		{in: "0 100000\n", wantErr: true},
		{in: "-1 100000\n", wantErr: true},
		{in: "150000 0\n", wantErr: true},
		{in: "max 0\n", wantErr: true},
		{in: "max -100000\n", wantErr: true},
		{in: "99999999999999999999 100000\n", wantErr: true},
	}
	for _, tt := range tests {
		got, err := ParseCPUMax([]byte(tt.in))
		if tt.wantErr {
			if !errors.Is(err, ErrMalformed) {
				t.Errorf("ParseCPUMax(%q) = %v, %v; want ErrMalformed", tt.in, got, err)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("ParseCPUMax(%q) = %v, %v; want %v", tt.in, got, err, tt.want)
		}
	}
}

func TestParseCFS(t *testing.T) {
	tests := []struct {
		name          string
		quota, period string
		noPeriod      bool
		want          Quota
		wantErr       bool
	}{
		{name: "unlimited", quota: "-1\n", period: "100000\n", want: Quota{}},
		{name: "unlimited without period file", quota: "-1\n", noPeriod: true, want: Quota{}},
		{name: "half CPU", quota: "50000\n", period: "100000\n", want: Quota{50000, 100000}},
		{name: "no newlines", quota: "250000", period: "100000", want: Quota{250000, 100000}},
		{name: "quota not a number", quota: "fifty\n", period: "100000\n", wantErr: true},
		{name: "empty quota", quota: "", period: "100000\n", wantErr: true},
		{name: "zero quota", quota: "0\n", period: "100000\n", wantErr: true},
		{name: "zero period", quota: "50000\n", period: "0\n", wantErr: true},
		{name: "negative period", quota: "50000\n", period: "-1\n", wantErr: true},
		{name: "period not a number", quota: "50000\n", period: "x\n", wantErr: true},
		{name: "limited without period file", quota: "50000\n", noPeriod: true, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var period []byte
			if !tt.noPeriod {
				period = []byte(tt.period)
			}
			got, err := ParseCFS([]byte(tt.quota), period)
			if tt.wantErr {
				if !errors.Is(err, ErrMalformed) {
					t.Fatalf("ParseCFS = %v, %v; want ErrMalformed", got, err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("ParseCFS = %v, %v; want %v", got, err, tt.want)
			}
		})
	}
}

func TestQuota(t *testing.T) {
	tests := []struct {
		q       Quota
		limited bool
		cpus    float64
		ceil    int
		str     string
	}{
		{q: Quota{}, cpus: 0, ceil: 0, str: "max"},
		{q: Quota{150000, 100000}, limited: true, cpus: 1.5, ceil: 2, str: "150000/100000"},
		{q: Quota{100000, 100000}, limited: true, cpus: 1, ceil: 1, str: "100000/100000"},
		{q: Quota{1000, 100000}, limited: true, cpus: 0.01, ceil: 1, str: "1000/100000"},
		{q: Quota{400000, 100000}, limited: true, cpus: 4, ceil: 4, str: "400000/100000"},
		{q: Quota{400001, 100000}, limited: true, cpus: 4.00001, ceil: 5, str: "400001/100000"},
		{q: Quota{1 << 44, 1000}, limited: true, cpus: float64(1<<44) / 1000, ceil: math.MaxInt32, str: "17592186044416/1000"},
	}
	for _, tt := range tests {
		if got := tt.q.Limited(); got != tt.limited {
			t.Errorf("%v.Limited() = %v, want %v", tt.q, got, tt.limited)
		}
		if got := tt.q.CPUs(); tt.limited && got != tt.cpus {
			t.Errorf("%v.CPUs() = %v, want %v", tt.q, got, tt.cpus)
		}
		if got := tt.q.Ceil(); got != tt.ceil {
			t.Errorf("%v.Ceil() = %v, want %v", tt.q, got, tt.ceil)
		}
		if got := tt.q.String(); got != tt.str {
			t.Errorf("String() = %q, want %q", got, tt.str)
		}
	}
}

func TestParseCgroup(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		path    string
		v       Version
		wantErr error
	}{
		{name: "v2", in: "0::/user.slice/user-1000.slice/session-2.scope\n", path: "/user.slice/user-1000.slice/session-2.scope", v: V2},
		{name: "v2 root", in: "0::/\n", path: "/", v: V2},
		{name: "v2 no trailing newline", in: "0::/kv", path: "/kv", v: V2},
		{name: "v1 cpu,cpuacct", in: "12:pids:/docker/abc\n11:cpu,cpuacct:/docker/abc\n10:cpuset:/docker/abc\n", path: "/docker/abc", v: V1},
		{name: "v1 cpu alone", in: "2:cpuacct:/a\n1:cpu:/b\n", path: "/b", v: V1},
		{name: "hybrid: v1 cpu wins over v2", in: "0::/unified\n3:cpu,cpuacct:/v1\n", path: "/v1", v: V1},
		{name: "hybrid: v2 when v1 lacks cpu", in: "4:memory:/m\n3:cpuset:/s\n2:cpuacct:/a\n1:name=systemd:/init.scope\n0::/init.scope\n", path: "/init.scope", v: V2},
		{name: "namespace outside", in: "0::/../../other\n", path: "/../../other", v: V2},
		{name: "path with colon", in: "0::/a:b\n", path: "/a:b", v: V2},
		{name: "empty", in: "", wantErr: ErrNoCgroup},
		{name: "v1 without cpu", in: "1:memory:/m\n", wantErr: ErrNoCgroup},
		{name: "one field", in: "garbage\n", wantErr: ErrMalformed},
		{name: "two fields", in: "0:/x\n", wantErr: ErrMalformed},
		{name: "relative path", in: "0::x\n", wantErr: ErrMalformed},
		{name: "empty path", in: "0::\n", wantErr: ErrMalformed},
		{name: "malformed after v2", in: "0::/x\nbad\n", wantErr: ErrMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, v, err := ParseCgroup([]byte(tt.in))
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("ParseCgroup = %q, %v, %v; want %v", p, v, err, tt.wantErr)
				}
				return
			}
			if err != nil || p != tt.path || v != tt.v {
				t.Fatalf("ParseCgroup = %q, %v, %v; want %q, %v", p, v, err, tt.path, tt.v)
			}
		})
	}
}

// Lines of /proc/self/mountinfo.
const (
	miRoot      = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
	miV2        = "30 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"
	miV2NoOpt   = "30 22 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
	miV2Pod     = "1195 1190 0:26 /kubepods/pod1/c1 /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw\n"
	miV2Escaped = "31 22 0:26 / /mnt/my\\040cgroup\\134x rw - cgroup2 cgroup2 rw\n"
	miV1Tmpfs   = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
	miV1Cpu     = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct\n"
	miV1Cpuset  = "34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset\n"
	miV1Docker  = "40 31 0:29 /docker/abc /sys/fs/cgroup/cpu ro - cgroup cgroup rw,cpuacct,cpu\n"
	miUnified   = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
)

func TestFindMount(t *testing.T) {
	tests := []struct {
		name      string
		mountinfo string
		cgroup    string
		v         Version
		mount     string
		rel       string
		wantErr   error
	}{
		{name: "v2 host", mountinfo: miRoot + miV2, cgroup: "/user.slice/session-2.scope", v: V2, mount: "/sys/fs/cgroup", rel: "/user.slice/session-2.scope"},
		{name: "v2 container at root", mountinfo: miRoot + miV2NoOpt, cgroup: "/", v: V2, mount: "/sys/fs/cgroup", rel: ""},
		{name: "v2 pod root is the cgroup", mountinfo: miV2Pod, cgroup: "/kubepods/pod1/c1", v: V2, mount: "/sys/fs/cgroup", rel: ""},
		{name: "v2 pod root is an ancestor", mountinfo: miV2Pod, cgroup: "/kubepods/pod1/c1/sub", v: V2, mount: "/sys/fs/cgroup", rel: "/sub"},
		{name: "v2 root not at a path boundary", mountinfo: miV2Pod, cgroup: "/kubepods/pod1/c10", v: V2, wantErr: ErrNoCgroup},
		{name: "v2 cgroup outside the mount's root", mountinfo: miV2Pod, cgroup: "/kubepods/pod2", v: V2, wantErr: ErrNoCgroup},
		{name: "v2 outside the namespace", mountinfo: miV2, cgroup: "/../init", v: V2, wantErr: ErrNoCgroup},
		{name: "v2 escaped mount point", mountinfo: miV2Escaped, cgroup: "/a", v: V2, mount: `/mnt/my cgroup\x`, rel: "/a"},
		{name: "v2 first match wins", mountinfo: miV2 + miV2Escaped, cgroup: "/a", v: V2, mount: "/sys/fs/cgroup", rel: "/a"},
		{name: "v2 skips v1 mounts", mountinfo: miV1Tmpfs + miV1Cpu + miUnified, cgroup: "/x", v: V2, mount: "/sys/fs/cgroup/unified", rel: "/x"},
		{name: "v2 none", mountinfo: miRoot + miV1Cpu, cgroup: "/", v: V2, wantErr: ErrNoCgroup},
		{name: "v1 cpu,cpuacct", mountinfo: miV1Tmpfs + miV1Cpuset + miV1Cpu + miUnified, cgroup: "/system.slice/kv.service", v: V1, mount: "/sys/fs/cgroup/cpu,cpuacct", rel: "/system.slice/kv.service"},
		{name: "v1 docker", mountinfo: miV1Tmpfs + miV1Docker, cgroup: "/docker/abc", v: V1, mount: "/sys/fs/cgroup/cpu", rel: ""},
		{name: "v1 skips cgroup2 and cpuset", mountinfo: miV2 + miV1Cpuset, cgroup: "/", v: V1, wantErr: ErrNoCgroup},
		{name: "unknown version", mountinfo: miV2, cgroup: "/", v: VersionUnknown, wantErr: ErrNoCgroup},
		{name: "empty", mountinfo: "", cgroup: "/", v: V2, wantErr: ErrNoCgroup},
		{name: "no separator", mountinfo: "30 22 0:26 / /sys/fs/cgroup rw cgroup2 cgroup2 rw\n", cgroup: "/", v: V2, wantErr: ErrMalformed},
		{name: "too few fields", mountinfo: "30 22 / - cgroup2 cgroup2 rw\n", cgroup: "/", v: V2, wantErr: ErrMalformed},
		{name: "no fstype", mountinfo: "30 22 0:26 / /sys/fs/cgroup rw - \n", cgroup: "/", v: V2, wantErr: ErrMalformed},
		{name: "malformed before the match", mountinfo: "garbage\n" + miV2, cgroup: "/", v: V2, wantErr: ErrMalformed},
		{name: "relative root", mountinfo: "30 22 0:26 x /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n", cgroup: "/", v: V2, wantErr: ErrMalformed},
		{name: "bad escape", mountinfo: "30 22 0:26 / /sys/fs/c\\09x rw - cgroup2 cgroup2 rw\n", cgroup: "/", v: V2, wantErr: ErrMalformed},
		{name: "short escape", mountinfo: "30 22 0:26 / /sys/fs/c\\04 rw - cgroup2 cgroup2 rw\n", cgroup: "/", v: V2, wantErr: ErrMalformed},
		{name: "escape above a byte", mountinfo: "30 22 0:26 / /sys/fs/c\\400 rw - cgroup2 cgroup2 rw\n", cgroup: "/", v: V2, wantErr: ErrMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mount, rel, err := FindMount([]byte(tt.mountinfo), tt.cgroup, tt.v)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("FindMount = %q, %q, %v; want %v", mount, rel, err, tt.wantErr)
				}
				return
			}
			if err != nil || mount != tt.mount || rel != tt.rel {
				t.Fatalf("FindMount = %q, %q, %v; want %q, %q", mount, rel, err, tt.mount, tt.rel)
			}
		})
	}
}

// file returns a MapFS file holding s.
func file(s string) *fstest.MapFile { return &fstest.MapFile{Data: []byte(s)} }

func TestCgroupLimit(t *testing.T) {
	v2 := func(cgroup string, files map[string]string) fstest.MapFS {
		m := fstest.MapFS{
			"proc/self/cgroup":    file("0::" + cgroup + "\n"),
			"proc/self/mountinfo": file(miRoot + miV2),
		}
		for k, v := range files {
			m[k] = file(v)
		}
		return m
	}
	const slice = "sys/fs/cgroup/kv.slice/"
	tests := []struct {
		name    string
		fsys    fstest.MapFS
		want    Limit
		wantErr error
	}{
		{
			name: "v2 leaf only",
			fsys: v2("/kv.slice/kv.service", map[string]string{slice + "kv.service/cpu.max": "150000 100000\n"}),
			want: Limit{Quota: Quota{150000, 100000}, Version: V2, Dir: "/sys/fs/cgroup/kv.slice/kv.service"},
		},
		{
			name: "v2 parent tighter",
			fsys: v2("/kv.slice/kv.service", map[string]string{
				slice + "kv.service/cpu.max": "400000 100000\n",
				slice + "cpu.max":            "50000 50000\n",
			}),
			want: Limit{Quota: Quota{50000, 50000}, Version: V2, Dir: "/sys/fs/cgroup/kv.slice"},
		},
		{
			name: "v2 leaf tighter, parent unlimited",
			fsys: v2("/kv.slice/kv.service", map[string]string{
				slice + "kv.service/cpu.max": "100000 100000\n",
				slice + "cpu.max":            "max 100000\n",
				"sys/fs/cgroup/cpu.max":      "800000 100000\n",
			}),
			want: Limit{Quota: Quota{100000, 100000}, Version: V2, Dir: "/sys/fs/cgroup/kv.slice/kv.service"},
		},
		{
			name: "v2 leaf without cpu.max, grandparent limited",
			fsys: v2("/a/b/c", map[string]string{
				"sys/fs/cgroup/a/b/cpu.max": "max 100000\n",
				"sys/fs/cgroup/a/cpu.max":   "300000 100000\n",
			}),
			want: Limit{Quota: Quota{300000, 100000}, Version: V2, Dir: "/sys/fs/cgroup/a"},
		},
		{
			name: "v2 unlimited everywhere",
			fsys: v2("/a", map[string]string{"sys/fs/cgroup/a/cpu.max": "max 100000\n"}),
			want: Limit{Version: V2},
		},
		{
			name: "v2 root cgroup",
			fsys: v2("/", map[string]string{"sys/fs/cgroup/cpu.max": "200000 100000\n"}),
			want: Limit{Quota: Quota{200000, 100000}, Version: V2, Dir: "/sys/fs/cgroup"},
		},
		{
			name: "v2 walk stops at the mount",
			fsys: fstest.MapFS{
				"proc/self/cgroup":                    file("0::/kubepods/pod1/c1\n"),
				"proc/self/mountinfo":                 file(miV2Pod),
				"sys/fs/cgroup/cpu.max":               file("250000 100000\n"),
				"sys/fs/cpu.max":                      file("10000 100000\n"),
				"sys/fs/cgroup/kubepods/cpu.max":      file("10000 100000\n"),
				"sys/fs/cgroup/kubepods/pod1/cpu.max": file("10000 100000\n"),
			},
			want: Limit{Quota: Quota{250000, 100000}, Version: V2, Dir: "/sys/fs/cgroup"},
		},
		{
			name: "v1 hierarchy",
			fsys: fstest.MapFS{
				"proc/self/cgroup":    file("3:cpuset:/\n2:cpu,cpuacct:/docker/abc\n1:name=systemd:/\n0::/\n"),
				"proc/self/mountinfo": file(miV1Tmpfs + miV1Cpuset + miV1Cpu + miUnified),
				"sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us":  file("-1\n"),
				"sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": file("100000\n"),
				"sys/fs/cgroup/cpu,cpuacct/docker/cpu.cfs_quota_us":      file("75000\n"),
				"sys/fs/cgroup/cpu,cpuacct/docker/cpu.cfs_period_us":     file("100000\n"),
				"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us":             file("-1\n"),
				"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us":            file("100000\n"),
				"sys/fs/cgroup/unified/cpu.max":                          file("10000 100000\n"),
			},
			want: Limit{Quota: Quota{75000, 100000}, Version: V1, Dir: "/sys/fs/cgroup/cpu,cpuacct/docker"},
		},
		{
			name: "v1 container sees its cgroup at the mount root",
			fsys: fstest.MapFS{
				"proc/self/cgroup":                    file("5:cpu,cpuacct:/docker/abc\n"),
				"proc/self/mountinfo":                 file(miV1Tmpfs + miV1Docker),
				"sys/fs/cgroup/cpu/cpu.cfs_quota_us":  file("200000\n"),
				"sys/fs/cgroup/cpu/cpu.cfs_period_us": file("100000\n"),
			},
			want: Limit{Quota: Quota{200000, 100000}, Version: V1, Dir: "/sys/fs/cgroup/cpu"},
		},
		{
			name:    "no proc",
			fsys:    fstest.MapFS{},
			wantErr: ErrNoCgroup,
		},
		{
			name:    "no mountinfo",
			fsys:    fstest.MapFS{"proc/self/cgroup": file("0::/\n")},
			wantErr: ErrNoCgroup,
		},
		{
			name:    "not mounted",
			fsys:    fstest.MapFS{"proc/self/cgroup": file("0::/\n"), "proc/self/mountinfo": file(miRoot)},
			wantErr: ErrNoCgroup,
		},
		{
			name:    "malformed cgroup",
			fsys:    fstest.MapFS{"proc/self/cgroup": file("junk\n"), "proc/self/mountinfo": file(miV2)},
			wantErr: ErrMalformed,
		},
		{
			name:    "malformed cpu.max in a parent",
			fsys:    v2("/a/b", map[string]string{"sys/fs/cgroup/a/b/cpu.max": "100000 100000\n", "sys/fs/cgroup/a/cpu.max": "lots\n"}),
			wantErr: ErrMalformed,
		},
		{
			name: "v1 quota without period",
			fsys: fstest.MapFS{
				"proc/self/cgroup":    file("1:cpu:/\n"),
				"proc/self/mountinfo": file("32 31 0:29 / /cg rw - cgroup cgroup rw,cpu\n"),
				"cg/cpu.cfs_quota_us": file("50000\n"),
			},
			wantErr: ErrMalformed,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := CgroupLimit(tt.fsys)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("CgroupLimit = %+v, %v; want %v", got, err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("CgroupLimit = %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}

// TestCgroupLimitReadError checks that a limit file that exists but cannot
// be read fails the read, with the file system's error wrapped.
func TestCgroupLimitReadError(t *testing.T) {
	fsys := fstest.MapFS{
		"proc/self/cgroup":    file("0::/a\n"),
		"proc/self/mountinfo": file(miV2),
		// A directory named cpu.max: reading it fails, not with ErrNotExist.
		"sys/fs/cgroup/a/cpu.max/x": file(""),
	}
	_, err := CgroupLimit(fsys)
	if err == nil || errors.Is(err, fs.ErrNotExist) || errors.Is(err, ErrNoCgroup) {
		t.Fatalf("CgroupLimit = %v, want a read error", err)
	}
}
