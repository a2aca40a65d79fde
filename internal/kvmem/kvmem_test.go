package kvmem

import (
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kvgate/kvgate/internal/mkmodel"
)

func TestShapeOf(t *testing.T) {
	base := func(extra ...mkmodel.KV) []mkmodel.KV {
		return append([]mkmodel.KV{
			{Key: "general.architecture", Value: "llama"},
			{Key: "llama.block_count", Value: uint32(5)},
			{Key: "llama.embedding_length", Value: uint32(64)},
			{Key: "llama.context_length", Value: uint32(2048)},
		}, extra...)
	}
	tests := []struct {
		name    string
		kvs     []mkmodel.KV
		want    Shape
		wantErr bool
	}{
		{"grouped-query heads", base(mkmodel.KV{Key: "llama.attention.head_count", Value: uint32(8)}, mkmodel.KV{Key: "llama.attention.head_count_kv", Value: uint32(4)}),
			Shape{Arch: "llama", Layers: 5, KVDims: 5 * 4 * (8 + 8), Heads: 8, TrainingContext: 2048}, false},
		{"kv heads default to heads", base(mkmodel.KV{Key: "llama.attention.head_count", Value: uint32(8)}),
			Shape{Arch: "llama", Layers: 5, KVDims: 5 * 8 * 16, Heads: 8, TrainingContext: 2048}, false},
		{"explicit key and value lengths", base(mkmodel.KV{Key: "llama.attention.head_count", Value: uint32(8)},
			mkmodel.KV{Key: "llama.attention.key_length", Value: uint32(32)}, mkmodel.KV{Key: "llama.attention.value_length", Value: uint32(16)}),
			Shape{Arch: "llama", Layers: 5, KVDims: 5 * 8 * 48, Heads: 8, TrainingContext: 2048}, false},
		{"per-layer kv heads", base(mkmodel.KV{Key: "llama.attention.head_count", Value: uint32(8)},
			mkmodel.KV{Key: "llama.attention.head_count_kv", Value: []int32{1, 2, 3, 4, 0}}),
			Shape{Arch: "llama", Layers: 5, KVDims: (1 + 2 + 3 + 4) * 16, Heads: 8, TrainingContext: 2048}, false},
		{"per-layer array of the wrong length", base(mkmodel.KV{Key: "llama.attention.head_count", Value: []int32{8, 8}}), Shape{}, true},
		{"no heads", base(), Shape{}, true},
		{"no architecture", []mkmodel.KV{{Key: "llama.block_count", Value: uint32(1)}}, Shape{}, true},
		{"absurd layers", []mkmodel.KV{{Key: "general.architecture", Value: "x"}, {Key: "x.block_count", Value: uint64(1 << 40)}}, Shape{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ShapeOf(tt.kvs)
			if tt.wantErr {
				if !errors.Is(err, ErrShape) {
					t.Fatalf("ShapeOf = %+v, %v; want ErrShape", got, err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("ShapeOf = %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}

func TestEstimate(t *testing.T) {
	s := Shape{Layers: 5, KVDims: 320}
	tests := []struct {
		cells, ubatch int
		typ           string
		wantCells     int64
		wantKV        uint64
		wantMask      uint64
	}{
		{256, 512, "f16", 256, 256 * 320 * 2, 256 * 512 * 4},
		{257, 512, "f32", 512, 512 * 320 * 4, 512 * 512 * 4},
		{10_000_000, 512, "f16", 10_000_128, 10_000_128 * 320 * 2, 10_000_128 * 512 * 4},
	}
	for _, tt := range tests {
		e := s.Estimate(tt.cells, tt.ubatch, tt.typ)
		if e.Cells != tt.wantCells || e.KVBytes != tt.wantKV || e.MaskBytes != tt.wantMask || e.Total() != tt.wantKV+tt.wantMask {
			t.Errorf("Estimate(%d, %d, %s) = %+v", tt.cells, tt.ubatch, tt.typ, e)
		}
	}
	huge := Shape{KVDims: math.MaxInt64}.Estimate(math.MaxInt32, 512, "f32")
	if huge.KVBytes != math.MaxUint64 {
		t.Errorf("overflow not saturated: %+v", huge)
	}
}

// TestAvailable reads fake /proc and /sys trees.
func TestAvailable(t *testing.T) {
	tests := []struct {
		name     string
		files    map[string]string
		want     uint64
		wantFrom string
		wantErr  bool
	}{
		{"meminfo only", map[string]string{"proc/meminfo": "MemTotal: 100 kB\nMemAvailable:  2048 kB\n"}, 2048 * 1024, "MemAvailable", false},
		{"cgroup v2 tighter", map[string]string{
			"proc/meminfo":                        "MemAvailable: 4096 kB\n",
			"proc/self/cgroup":                    "0::/kvgate\n",
			"sys/fs/cgroup/kvgate/memory.max":     "3000000\n",
			"sys/fs/cgroup/kvgate/memory.current": "1000000\n",
		}, 2000000, "cgroup limit", false},
		{"cgroup v2 unlimited", map[string]string{
			"proc/meminfo":             "MemAvailable: 4096 kB\n",
			"sys/fs/cgroup/memory.max": "max\n",
		}, 4096 * 1024, "MemAvailable", false},
		{"cgroup v1", map[string]string{
			"proc/meminfo": "MemAvailable: 4096 kB\n",
			"sys/fs/cgroup/memory/memory.limit_in_bytes": "1000000\n",
			"sys/fs/cgroup/memory/memory.usage_in_bytes": "1500000\n",
		}, 0, "cgroup limit", false},
		{"nothing readable", map[string]string{}, 0, "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			for p, c := range tt.files {
				if err := os.MkdirAll(filepath.Dir(filepath.Join(root, p)), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(root, p), []byte(c), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			got, from, err := available(root)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("available = %d, %q; want an error", got, from)
				}
				return
			}
			if err != nil || got != tt.want || !strings.HasPrefix(from, tt.wantFrom) {
				t.Fatalf("available = %d, %q, %v; want %d, %q", got, from, err, tt.want, tt.wantFrom)
			}
		})
	}
}

func TestBytes(t *testing.T) {
	for n, want := range map[uint64]string{0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 6_400_081_920: "6.0 GiB", math.MaxUint64: "16.0 EiB"} {
		if got := Bytes(n); got != want {
			t.Errorf("Bytes(%d) = %q, want %q", n, got, want)
		}
	}
}
