// Package kvmem estimates, before a model is loaded, how much memory a
// llama.cpp context of a given size will take, and how much memory the
// process may use, so that the server can refuse an impossible --ctx at
// once instead of growing for a minute and failing to allocate.
package kvmem

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/kvgate/kvgate/internal/mkmodel"
)

// Shape is what the estimate needs of a model, read from its GGUF header.
type Shape struct {
	// Arch is general.architecture.
	Arch string
	// Layers is ARCH.block_count.
	Layers int
	// KVDims is the sum over layers of the key and value widths of one
	// cell: (head_count_kv × (key_length + value_length)) per layer.
	KVDims int64
	// Heads is ARCH.attention.head_count (the largest, when per layer).
	Heads int
	// TrainingContext is ARCH.context_length.
	TrainingContext int
}

// ErrShape reports a GGUF header without the dimensions the estimate needs.
var ErrShape = errors.New("model header lacks the attention dimensions")

// ReadShape reads the shape of the GGUF model at path from its header,
// without reading its tensors.
func ReadShape(path string) (Shape, error) {
	kvs, err := mkmodel.ReadKVs(path)
	if err != nil {
		return Shape{}, err
	}
	return ShapeOf(kvs)
}

// ShapeOf computes the shape from GGUF metadata entries.
func ShapeOf(kvs []mkmodel.KV) (Shape, error) {
	m := make(map[string]any, len(kvs))
	for _, kv := range kvs {
		m[kv.Key] = kv.Value
	}
	var s Shape
	s.Arch, _ = m["general.architecture"].(string)
	if s.Arch == "" {
		return Shape{}, fmt.Errorf("%w: no general.architecture", ErrShape)
	}
	key := func(k string) string { return s.Arch + "." + k }
	layers, ok := scalar(m[key("block_count")])
	if !ok || layers < 1 || layers > 1<<16 {
		return Shape{}, fmt.Errorf("%w: %s", ErrShape, key("block_count"))
	}
	s.Layers = int(layers)
	embd, _ := scalar(m[key("embedding_length")])
	if ctx, ok := scalar(m[key("context_length")]); ok && ctx <= math.MaxInt32 {
		s.TrainingContext = int(ctx)
	}
	heads := perLayer(m[key("attention.head_count")], s.Layers)
	if heads == nil {
		return Shape{}, fmt.Errorf("%w: %s", ErrShape, key("attention.head_count"))
	}
	kvHeads := perLayer(m[key("attention.head_count_kv")], s.Layers)
	if kvHeads == nil {
		kvHeads = heads
	}
	for i := range s.Layers {
		if heads[i] > int64(s.Heads) {
			s.Heads = int(heads[i])
		}
		kLen, okK := scalar(m[key("attention.key_length")])
		vLen, okV := scalar(m[key("attention.value_length")])
		if (!okK || !okV) && heads[i] > 0 {
			if embd <= 0 {
				return Shape{}, fmt.Errorf("%w: %s", ErrShape, key("embedding_length"))
			}
			if !okK {
				kLen = embd / heads[i]
			}
			if !okV {
				vLen = embd / heads[i]
			}
		}
		if kLen < 0 || vLen < 0 || kLen > 1<<20 || vLen > 1<<20 || kvHeads[i] < 0 || kvHeads[i] > 1<<20 {
			return Shape{}, fmt.Errorf("%w: implausible head sizes", ErrShape)
		}
		s.KVDims += kvHeads[i] * (kLen + vLen)
	}
	return s, nil
}

// scalar returns an integer metadata value as int64.
func scalar(v any) (int64, bool) {
	switch x := v.(type) {
	case uint8:
		return int64(x), true
	case int8:
		return int64(x), true
	case uint16:
		return int64(x), true
	case int16:
		return int64(x), true
	case uint32:
		return int64(x), true
	case int32:
		return int64(x), true
	case uint64:
		if x > math.MaxInt64 {
			return 0, false
		}
		return int64(x), true
	case int64:
		return x, true
	}
	return 0, false
}

// perLayer returns a value that is either one integer for every layer or
// an array of one per layer, as n values; nil when absent or malformed.
func perLayer(v any, n int) []int64 {
	if x, ok := scalar(v); ok {
		out := make([]int64, n)
		for i := range out {
			out[i] = x
		}
		return out
	}
	var out []int64
	switch a := v.(type) {
	case []int32:
		for _, x := range a {
			out = append(out, int64(x))
		}
	case []uint32:
		for _, x := range a {
			out = append(out, int64(x))
		}
	default:
		return nil
	}
	if len(out) != n {
		return nil
	}
	return out
}

// Estimate is what a context of a given size needs, at least.
type Estimate struct {
	// Cells is the KV cell count after llama.cpp's padding to 256.
	Cells int64
	// KVBytes is the KV cache: cells × Shape.KVDims × element size.
	KVBytes uint64
	// MaskBytes is the attention mask of one micro-batch: cells × ubatch
	// × 4 bytes, allocated in the compute buffer.
	MaskBytes uint64
}

// Total returns the bytes of the estimate.
func (e Estimate) Total() uint64 { return e.KVBytes + e.MaskBytes }

// ElementSize returns the bytes of one KV element of type typ ("f16" or
// "f32"), or 0 for an unknown type.
func ElementSize(typ string) int {
	switch typ {
	case "", "f16":
		return 2
	case "f32":
		return 4
	}
	return 0
}

// Estimate returns the memory a context of cells KV cells, micro-batches
// of ubatch tokens and KV elements of kvType needs at least. It is a lower
// bound: llama.cpp's compute buffers hold more, depending on the graph.
func (s Shape) Estimate(cells, ubatch int, kvType string) Estimate {
	padded := (int64(cells) + 255) / 256 * 256
	elem := uint64(ElementSize(kvType))
	return Estimate{
		Cells:     padded,
		KVBytes:   mulSat(mulSat(uint64(padded), uint64(s.KVDims)), elem),
		MaskBytes: mulSat(mulSat(uint64(padded), uint64(max(ubatch, 1))), 4),
	}
}

// mulSat multiplies without overflow, saturating at the largest uint64.
func mulSat(a, b uint64) uint64 {
	if a != 0 && b > math.MaxUint64/a {
		return math.MaxUint64
	}
	return a * b
}

// Available returns the memory this process may still allocate: the
// smaller of MemAvailable in /proc/meminfo and what the process's cgroup
// limit leaves (cgroup v2 memory.max − memory.current, or v1's
// memory.limit_in_bytes − memory.usage_in_bytes), with a description of
// which one it is.
func Available() (uint64, string, error) {
	return available("/")
}

// available is Available with the file system rooted at root, for tests.
func available(root string) (uint64, string, error) {
	avail, source := uint64(math.MaxUint64), ""
	if b, err := os.ReadFile(filepath.Join(root, "proc/meminfo")); err == nil {
		if v, ok := meminfo(b, "MemAvailable"); ok {
			avail, source = v, "MemAvailable"
		}
	}
	if limit, used, ok := cgroupLimit(root); ok {
		left := uint64(0)
		if limit > used {
			left = limit - used
		}
		if left < avail {
			avail, source = left, fmt.Sprintf("cgroup limit %s, %s in use", Bytes(limit), Bytes(used))
		}
	}
	if source == "" {
		return 0, "", errors.New("neither /proc/meminfo nor a cgroup limit is readable")
	}
	return avail, source, nil
}

// meminfo returns a /proc/meminfo field in bytes.
func meminfo(b []byte, field string) (uint64, bool) {
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		name, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok || name != field {
			continue
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			return 0, false
		}
		v, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil {
			return 0, false
		}
		if len(f) > 1 && f[1] == "kB" {
			v = mulSat(v, 1024)
		}
		return v, true
	}
	return 0, false
}

// cgroupLimit returns the memory limit and usage of the process's cgroup,
// when it has a limit.
func cgroupLimit(root string) (limit, used uint64, ok bool) {
	read := func(p string) (uint64, bool) {
		b, err := os.ReadFile(filepath.Join(root, p))
		if err != nil {
			return 0, false
		}
		s := strings.TrimSpace(string(b))
		if s == "max" {
			return 0, false
		}
		v, err := strconv.ParseUint(s, 10, 64)
		return v, err == nil
	}
	// The process's own cgroup, from /proc/self/cgroup ("0::/path" on v2).
	dir := ""
	if b, err := os.ReadFile(filepath.Join(root, "proc/self/cgroup")); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if p, ok := strings.CutPrefix(line, "0::"); ok {
				dir = p
			}
		}
	}
	for _, d := range []string{filepath.Join("sys/fs/cgroup", dir), "sys/fs/cgroup"} {
		if l, ok := read(filepath.Join(d, "memory.max")); ok {
			u, _ := read(filepath.Join(d, "memory.current"))
			return l, u, true
		}
	}
	if l, ok := read("sys/fs/cgroup/memory/memory.limit_in_bytes"); ok && l < 1<<62 {
		u, _ := read("sys/fs/cgroup/memory/memory.usage_in_bytes")
		return l, u, true
	}
	return 0, 0, false
}

// Bytes formats a byte count for people: "6.4 GiB".
func Bytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit && exp < 5; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
