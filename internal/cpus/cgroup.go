package cpus

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"path"
	"strconv"
	"strings"
)

// ErrNoCgroup reports that the process is in no CPU cgroup, or that the
// cgroup's file system is not mounted where the process can see it. It is
// not a failure: the process then has no cgroup CPU limit.
var ErrNoCgroup = errors.New("not in a CPU cgroup")

// ErrMalformed reports a cgroup or proc file whose contents do not follow
// the kernel's format.
var ErrMalformed = errors.New("malformed file")

// Version is a cgroup hierarchy's version.
type Version int

// The cgroup versions. Version 1 has one hierarchy per controller set, and
// the CPU bandwidth limit is in cpu.cfs_quota_us and cpu.cfs_period_us;
// version 2 has one unified hierarchy, and the limit is in cpu.max.
const (
	VersionUnknown Version = iota
	V1
	V2
)

// String returns "v1", "v2", or "unknown".
func (v Version) String() string {
	switch v {
	case V1:
		return "v1"
	case V2:
		return "v2"
	default:
		return "unknown"
	}
}

// Quota is a CFS bandwidth limit: the cgroup's threads together may run
// for Quota microseconds in each Period microseconds. The zero Quota is no
// limit.
type Quota struct {
	Quota, Period int64
}

// Limited reports whether q limits anything.
func (q Quota) Limited() bool { return q.Period > 0 }

// CPUs returns the limit as an average number of CPUs, Quota/Period, or
// +Inf for no limit.
func (q Quota) CPUs() float64 {
	if !q.Limited() {
		return math.Inf(1)
	}
	return float64(q.Quota) / float64(q.Period)
}

// Ceil returns the limit rounded up to whole CPUs, at least 1, or 0 for no
// limit. A fractional CPU rounds up, as Go's runtime does for GOMAXPROCS
// (without its floor of 2): 1.5 CPUs of quota can keep two threads busy
// three quarters of the time.
func (q Quota) Ceil() int {
	if !q.Limited() {
		return 0
	}
	// Quota ≤ 2^44 µs and Period ≤ 1 s (the kernel's bounds), so the sum
	// cannot overflow; the division is exact, unlike in float64.
	n := (q.Quota + q.Period - 1) / q.Period
	if n < 1 {
		return 1
	}
	if n > math.MaxInt32 {
		return math.MaxInt32
	}
	return int(n)
}

// String returns "quota/period" in microseconds, or "max" for no limit.
func (q Quota) String() string {
	if !q.Limited() {
		return "max"
	}
	return strconv.FormatInt(q.Quota, 10) + "/" + strconv.FormatInt(q.Period, 10)
}

// ParseCPUMax parses cgroup v2's cpu.max: "$MAX $PERIOD", where $MAX is a
// quota in microseconds or "max" for no limit, and a trailing newline is
// optional. It returns the zero Quota for "max". A quota or period that is
// not a positive integer is malformed.
func ParseCPUMax(b []byte) (Quota, error) {
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return Quota{}, fmt.Errorf("cpu.max %q: want two fields: %w", b, ErrMalformed)
	}
	period, err := parsePositive(f[1])
	if err != nil {
		return Quota{}, fmt.Errorf("cpu.max period: %w", err)
	}
	if f[0] == "max" {
		return Quota{}, nil
	}
	quota, err := parsePositive(f[0])
	if err != nil {
		return Quota{}, fmt.Errorf("cpu.max quota: %w", err)
	}
	return Quota{Quota: quota, Period: period}, nil
}

// ParseCFS parses cgroup v1's cpu.cfs_quota_us and cpu.cfs_period_us, each
// one integer with an optional trailing newline. A negative quota (the
// kernel writes -1) is no limit, and the period is then not read: it
// returns the zero Quota. A zero quota or a period that is not positive is
// malformed.
func ParseCFS(quota, period []byte) (Quota, error) {
	q, err := strconv.ParseInt(string(bytes.TrimSpace(quota)), 10, 64)
	if err != nil {
		return Quota{}, fmt.Errorf("cpu.cfs_quota_us %q: %w", quota, ErrMalformed)
	}
	if q < 0 {
		return Quota{}, nil
	}
	if q == 0 {
		return Quota{}, fmt.Errorf("cpu.cfs_quota_us is 0: %w", ErrMalformed)
	}
	p, err := parsePositive(string(bytes.TrimSpace(period)))
	if err != nil {
		return Quota{}, fmt.Errorf("cpu.cfs_period_us: %w", err)
	}
	return Quota{Quota: q, Period: p}, nil
}

// parsePositive parses a positive decimal int64.
func parsePositive(s string) (int64, error) {
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("%q is not a positive integer: %w", s, ErrMalformed)
	}
	return n, nil
}

// ParseCgroup finds the process's CPU cgroup in /proc/self/cgroup, whose
// lines are "hierarchy-ID:controller-list:cgroup-path". A v1 hierarchy
// whose comma-separated controllers include "cpu" is the CPU cgroup;
// otherwise the v2 hierarchy, ID 0 with an empty controller list, is (a
// controller is never in both). It returns the cgroup's path, relative to
// the hierarchy's root and starting with "/", and the version, or
// ErrNoCgroup when neither line is there. Any line that is not three fields
// with a path starting with "/" is malformed.
func ParseCgroup(b []byte) (string, Version, error) {
	v2 := ""
	found := false
	for line := range strings.Lines(string(b)) {
		line = strings.TrimSuffix(line, "\n")
		if line == "" {
			continue
		}
		id, rest, ok1 := strings.Cut(line, ":")
		controllers, p, ok2 := strings.Cut(rest, ":")
		if !ok1 || !ok2 || !strings.HasPrefix(p, "/") {
			return "", VersionUnknown, fmt.Errorf("cgroup line %q: %w", line, ErrMalformed)
		}
		if id == "0" {
			v2, found = p, true
			continue
		}
		if hasCPU(controllers) {
			return p, V1, nil
		}
	}
	if !found {
		return "", VersionUnknown, ErrNoCgroup
	}
	return v2, V2, nil
}

// hasCPU reports whether the comma-separated list s holds "cpu".
func hasCPU(s string) bool {
	for c := range strings.SplitSeq(s, ",") {
		if c == "cpu" {
			return true
		}
	}
	return false
}

// FindMount finds in /proc/self/mountinfo where the cgroup at cgroupPath
// (as ParseCgroup returns it) of version v can be read. Each line is
//
//	ID parentID major:minor root mount-point options [optional...] - fstype source super-options
//
// and the first line that matches wins: the file system type is "cgroup2"
// for v2, or "cgroup" with "cpu" among the super options for v1, and root
// (the mount's root within the hierarchy) is cgroupPath or one of its
// ancestors. It returns the mount point and the cgroup's path below it
// ("" when the cgroup is the mount's root). Paths in mountinfo escape
// space, tab, newline and backslash as octal "\040"; FindMount unescapes
// them. A cgroup path with "/.." in front lies outside the process's cgroup
// namespace, above any mount it can see, and matches nothing. It returns
// ErrNoCgroup when no line matches, and ErrMalformed for a line that does
// not parse.
func FindMount(mountinfo []byte, cgroupPath string, v Version) (mount, rel string, err error) {
	if v != V1 && v != V2 {
		return "", "", fmt.Errorf("cgroup version %d: %w", v, ErrNoCgroup)
	}
	for line := range strings.Lines(string(mountinfo)) {
		line = strings.TrimSuffix(line, "\n")
		if line == "" {
			continue
		}
		pre, post, ok := strings.Cut(line, " - ")
		f := strings.Fields(pre)
		g := strings.Fields(post)
		if !ok || len(f) < 6 || len(g) < 2 {
			return "", "", fmt.Errorf("mountinfo line %q: %w", line, ErrMalformed)
		}
		root, mnt, fstype := f[3], f[4], g[0]
		switch {
		case v == V2 && fstype == "cgroup2":
		case v == V1 && fstype == "cgroup" && len(g) >= 3 && hasCPU(g[2]):
		default:
			continue
		}
		root, err := unescape(root)
		if err != nil || !strings.HasPrefix(root, "/") {
			return "", "", fmt.Errorf("mountinfo root %q: %w", f[3], ErrMalformed)
		}
		mnt, err = unescape(mnt)
		if err != nil {
			return "", "", fmt.Errorf("mountinfo mount point %q: %w", f[4], ErrMalformed)
		}
		if !hasPathPrefix(cgroupPath, root) {
			continue
		}
		r := cgroupPath
		if root != "/" {
			r = cgroupPath[len(root):]
		} else if r == "/" {
			r = ""
		}
		if hasPathPrefix(r, "/..") {
			continue
		}
		return mnt, r, nil
	}
	return "", "", ErrNoCgroup
}

// hasPathPrefix reports whether prefix is p or one of its ancestors.
func hasPathPrefix(p, prefix string) bool {
	if prefix == "/" {
		return true
	}
	if !strings.HasPrefix(p, prefix) {
		return false
	}
	return len(p) == len(prefix) || p[len(prefix)] == '/'
}

// unescape undoes the kernel's octal escapes ("\040") in a mountinfo path.
func unescape(s string) (string, error) {
	if !strings.Contains(s, `\`) {
		return s, nil
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '\\' {
			b.WriteByte(s[i])
			continue
		}
		if i+4 > len(s) {
			return "", fmt.Errorf("short escape in %q: %w", s, ErrMalformed)
		}
		n, err := strconv.ParseUint(s[i+1:i+4], 8, 8)
		if err != nil {
			return "", fmt.Errorf("escape %q in %q: %w", s[i:i+4], s, ErrMalformed)
		}
		b.WriteByte(byte(n))
		i += 3
	}
	return b.String(), nil
}

// Limit is the tightest CPU bandwidth limit on a cgroup and its ancestors.
type Limit struct {
	Quota
	// Version is the cgroup's version.
	Version Version
	// Dir is the directory, in the file system read, of the cgroup whose
	// limit is Quota: the process's own or an ancestor's. It is empty when
	// nothing is limited.
	Dir string
}

// CgroupLimit reads the CPU bandwidth limit of the process's cgroup from
// fsys, a view of the root file system (os.DirFS("/")): it finds the cgroup
// in proc/self/cgroup and its mount in proc/self/mountinfo, then reads the
// limit files of the cgroup and of each ancestor up to the mount's root,
// since a parent's limit binds its children too, and returns the smallest
// (Go's runtime reads the leaf's only). A cgroup without the files (the
// root, or one whose parent does not delegate the cpu controller) adds no
// limit. A process in no CPU cgroup gets ErrNoCgroup.
func CgroupLimit(fsys fs.FS) (Limit, error) {
	b, err := fs.ReadFile(fsys, "proc/self/cgroup")
	if errors.Is(err, fs.ErrNotExist) {
		return Limit{}, ErrNoCgroup
	}
	if err != nil {
		return Limit{}, fmt.Errorf("read /proc/self/cgroup: %w", err)
	}
	cg, v, err := ParseCgroup(b)
	if err != nil {
		return Limit{}, fmt.Errorf("/proc/self/cgroup: %w", err)
	}
	b, err = fs.ReadFile(fsys, "proc/self/mountinfo")
	if errors.Is(err, fs.ErrNotExist) {
		return Limit{}, ErrNoCgroup
	}
	if err != nil {
		return Limit{}, fmt.Errorf("read /proc/self/mountinfo: %w", err)
	}
	mnt, rel, err := FindMount(b, cg, v)
	if err != nil {
		return Limit{}, fmt.Errorf("cgroup %s %s: /proc/self/mountinfo: %w", v, cg, err)
	}
	best := Limit{Version: v}
	for {
		dir := path.Join(mnt, rel)
		q, err := readQuota(fsys, dir, v)
		if err != nil {
			return Limit{}, err
		}
		if q.Limited() && (!best.Limited() || q.CPUs() < best.CPUs()) {
			best.Quota, best.Dir = q, dir
		}
		if rel == "" || rel == "/" {
			return best, nil
		}
		rel = path.Dir(rel)
	}
}

// readQuota reads the limit files of the cgroup directory dir, an
// absolute path. Missing files are no limit.
func readQuota(fsys fs.FS, dir string, v Version) (Quota, error) {
	read := func(name string) ([]byte, bool, error) {
		p := strings.TrimPrefix(path.Join(dir, name), "/")
		b, err := fs.ReadFile(fsys, p)
		if errors.Is(err, fs.ErrNotExist) {
			return nil, false, nil
		}
		if err != nil {
			return nil, false, fmt.Errorf("read %s: %w", "/"+p, err)
		}
		return b, true, nil
	}
	if v == V2 {
		b, ok, err := read("cpu.max")
		if !ok || err != nil {
			return Quota{}, err
		}
		q, err := ParseCPUMax(b)
		if err != nil {
			return Quota{}, fmt.Errorf("%s: %w", path.Join(dir, "cpu.max"), err)
		}
		return q, nil
	}
	qb, ok, err := read("cpu.cfs_quota_us")
	if !ok || err != nil {
		return Quota{}, err
	}
	pb, ok, err := read("cpu.cfs_period_us")
	if err != nil {
		return Quota{}, err
	}
	if !ok {
		pb = nil // ParseCFS rejects it unless the quota is unlimited.
	}
	q, err := ParseCFS(qb, pb)
	if err != nil {
		return Quota{}, fmt.Errorf("%s: %w", dir, err)
	}
	return q, nil
}
