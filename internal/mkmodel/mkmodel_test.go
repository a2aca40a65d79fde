package mkmodel

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"unicode/utf8"
)

func TestF32ToF16(t *testing.T) {
	tests := []struct {
		in   float32
		want uint16
	}{
		{0, 0x0000},
		{float32(math.Copysign(0, -1)), 0x8000},
		{1, 0x3c00},
		{-2, 0xc000},
		{0.5, 0x3800},
		{0.1, 0x2e66},
		{1.0 / 3, 0x3555},
		{65504, 0x7bff},                            // largest finite half
		{65519.99, 0x7bff},                         // below the midpoint to infinity
		{65520, 0x7c00},                            // the midpoint rounds to even: infinity
		{1e6, 0x7c00},                              // overflow
		{float32(math.Inf(-1)), 0xfc00},            // infinity
		{6.103515625e-05, 0x0400},                  // smallest normal, 2^-14
		{5.960464477539063e-08, 0x0001},            // smallest subnormal, 2^-24
		{2.9802322387695312e-08, 0x0000},           // 2^-25: a tie, to even (zero)
		{math.Nextafter32(1.0/(1<<25), 1), 0x0001}, // just above 2^-25
		{8.940696716308594e-08, 0x0002},            // 3·2^-25: a tie, to even (2)
		{6.097555160522461e-05, 0x03ff},            // largest subnormal
		{1 + 1.0/2048, 0x3c00},                     // tie between 0x3c00 and 0x3c01: even
		{1 + 3.0/2048, 0x3c02},                     // tie between 0x3c01 and 0x3c02: even
		{1 + 1.0/2048 + 1.0/65536, 0x3c01},         // above the tie
		{-(1 + 3.0/2048 - 1.0/65536), 0xbc01},      // below the tie
		{1e-10, 0x0000},                            // underflow
	}
	for _, tt := range tests {
		if got := F32ToF16(tt.in); got != tt.want {
			t.Errorf("F32ToF16(%g) = %#04x, want %#04x", tt.in, got, tt.want)
		}
	}
	if h := F32ToF16(float32(math.NaN())); h&0x7c00 != 0x7c00 || h&0x3ff == 0 {
		t.Errorf("F32ToF16(NaN) = %#04x, not a NaN", h)
	}
}

// TestF16Exhaustive checks every half value: the conversion to float32 and
// back is the identity, and midpoints between neighbours round to even.
func TestF16Exhaustive(t *testing.T) {
	for i := range 1 << 16 {
		h := uint16(i)
		f := F16ToF32(h)
		if h&0x7c00 == 0x7c00 && h&0x3ff != 0 {
			if !math.IsNaN(float64(f)) {
				t.Fatalf("F16ToF32(%#04x) = %g, want NaN", h, f)
			}
			continue
		}
		if got := F32ToF16(f); got != h {
			t.Fatalf("F32ToF16(F16ToF32(%#04x) = %g) = %#04x", h, f, got)
		}
		next := h + 1
		if h&0x7fff >= 0x7bff { // the next one is infinity or beyond
			continue
		}
		// The midpoint of two halves has at most 12 significant bits:
		// float32 holds it exactly.
		mid := float32((float64(f) + float64(F16ToF32(next))) / 2)
		want := h
		if h&1 == 1 {
			want = next
		}
		if got := F32ToF16(mid); got != want {
			t.Fatalf("F32ToF16(midpoint %g of %#04x, %#04x) = %#04x, want %#04x", mid, h, next, got, want)
		}
		dir := float32(math.Inf(1))
		if f < 0 || h == 0x8000 {
			dir = float32(math.Inf(-1))
		}
		if got := F32ToF16(math.Nextafter32(mid, -dir)); got != h {
			t.Fatalf("F32ToF16(just below midpoint after %#04x) = %#04x", h, got)
		}
		if got := F32ToF16(math.Nextafter32(mid, dir)); got != next {
			t.Fatalf("F32ToF16(just above midpoint after %#04x) = %#04x, want %#04x", h, got, next)
		}
	}
}

func TestQ8_0Block(t *testing.T) {
	r := &rng{s: 42}
	ramp := make([]float32, 32)
	for i := range ramp {
		ramp[i] = float32(i-16) / 7
	}
	spike := make([]float32, 32)
	spike[5] = -3e4
	spike[6] = 1e-3
	random := make([]float32, 32)
	r.fill(random, 0.05)
	tiny := make([]float32, 32)
	r.fill(tiny, 1e-6)
	tests := []struct {
		name string
		in   []float32
	}{
		{"zeros", make([]float32, 32)},
		{"ramp", ramp},
		{"spike", spike},
		{"random", random},
		{"tiny", tiny},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var blk [q8BlockBytes]byte
			QuantizeQ8_0Block(blk[:], tt.in)
			out := make([]float32, 32)
			DequantizeQ8_0Block(out, blk[:])
			var amax float64
			for _, x := range tt.in {
				amax = max(amax, math.Abs(float64(x)))
			}
			d := amax / 127
			// Rounding to the grid costs d/2; storing d as f16 moves each
			// of up to 127 steps by a relative 2^-11 (more for
			// subnormal scales).
			bound := d * (0.5 + 127.0/2048*1.01)
			if d < 6.2e-5 {
				bound = d/2 + 127*math.Pow(2, -25)
			}
			for i, x := range tt.in {
				if err := math.Abs(float64(out[i]) - float64(x)); err > bound {
					t.Errorf("x[%d] = %g decoded as %g: error %g above %g", i, x, out[i], err, bound)
				}
				if q := int8(blk[2+i]); q < -127 {
					t.Errorf("q[%d] = %d outside [-127, 127]", i, q)
				}
			}
		})
	}
}

func TestQ8_0Known(t *testing.T) {
	in := make([]float32, 32)
	for i := range in {
		in[i] = float32(i) - 15.5 // max |x| = 15.5, d = 15.5/127
	}
	var blk [q8BlockBytes]byte
	QuantizeQ8_0Block(blk[:], in)
	if got, want := binary.LittleEndian.Uint16(blk[:]), F32ToF16(15.5/127); got != want {
		t.Errorf("scale %#04x, want %#04x", got, want)
	}
	if q0, q31, q15, q16 := int8(blk[2]), int8(blk[33]), int8(blk[2+15]), int8(blk[2+16]); q0 != -127 || q31 != 127 || q15 != -4 || q16 != 4 {
		t.Errorf("q[0], q[31], q[15], q[16] = %d, %d, %d, %d; want -127, 127, -4, 4", q0, q31, q15, q16)
	}
}

func TestGGUFRoundTrip(t *testing.T) {
	kvs := []KV{
		{"u8", uint8(200)}, {"i8", int8(-100)}, {"u16", uint16(60000)}, {"i16", int16(-30000)},
		{"u32", uint32(4000000000)}, {"i32", int32(-2000000000)}, {"f32", float32(1e-5)},
		{"bool", true}, {"str", "héllo\x00world"}, {"empty", ""},
		{"u64", uint64(1) << 60}, {"i64", int64(-1) << 60}, {"f64", math.Pi},
		{"a.u8", []uint8{1, 2, 3}}, {"a.i8", []int8{-1, 2}}, {"a.u16", []uint16{7}}, {"a.i16", []int16{-7}},
		{"a.u32", []uint32{1, 1 << 31}}, {"a.i32", []int32{6, 6, -3}}, {"a.f32", []float32{0, -1000, 0.25}},
		{"a.bool", []bool{true, false}}, {"a.str", []string{"<unk>", "", "\u2581the"}},
		{"a.u64", []uint64{}}, {"a.i64", []int64{-5}}, {"a.f64", []float64{2.5}},
	}
	tensors := []tensor{
		{TensorInfo: TensorInfo{Name: "a", Dims: []int64{64, 3}, Type: TypeQ8_0, Offset: 0}},
		{TensorInfo: TensorInfo{Name: "b", Dims: []int64{5}, Type: TypeF32, Offset: 192}},
	}
	var buf bytes.Buffer
	bw := bufio.NewWriter(&buf)
	w := &writer{w: bw}
	if err := writeHeader(w, kvs, tensors); err != nil {
		t.Fatal(err)
	}
	bw.Flush()
	if int64(buf.Len()) != w.n || w.n%Alignment != 0 {
		t.Fatalf("wrote %d bytes, counted %d", buf.Len(), w.n)
	}
	f, err := Read(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(f.KVs, kvs) {
		for i := range kvs {
			if i >= len(f.KVs) || !reflect.DeepEqual(f.KVs[i], kvs[i]) {
				t.Errorf("kv %d: read %#v, wrote %#v", i, f.KVs[min(i, len(f.KVs)-1)], kvs[i])
			}
		}
	}
	if len(f.Tensors) != 2 || !reflect.DeepEqual(f.Tensors[0], tensors[0].TensorInfo) || !reflect.DeepEqual(f.Tensors[1], tensors[1].TensorInfo) {
		t.Errorf("tensors %+v", f.Tensors)
	}
	if f.DataOffset != w.n {
		t.Errorf("data offset %d, want %d", f.DataOffset, w.n)
	}
	if got := tensors[0].Bytes(); got != 6*34 {
		t.Errorf("q8_0 [64 3] takes %d bytes, want %d", got, 6*34)
	}

	// Every truncation fails with ErrFormat instead of panicking or
	// allocating wildly.
	// Only the trailing padding may be cut.
	firstOK := -1
	for n := 0; n <= buf.Len(); n++ {
		_, err := Read(bytes.NewReader(buf.Bytes()[:n]), int64(n))
		switch {
		case err == nil && firstOK < 0:
			firstOK = n
		case err != nil && (firstOK >= 0 || !errors.Is(err, ErrFormat)):
			t.Fatalf("truncated at %d: err %v, want ErrFormat", n, err)
		}
	}
	if firstOK <= buf.Len()-Alignment {
		t.Errorf("a header truncated at %d of %d bytes reads", firstOK, buf.Len())
	}
	bad := bytes.Clone(buf.Bytes())
	copy(bad, "GGUX")
	if _, err := Read(bytes.NewReader(bad), int64(len(bad))); !errors.Is(err, ErrFormat) {
		t.Errorf("bad magic: err %v", err)
	}
	if err := (&writer{w: bufio.NewWriter(&buf)}).kv(KV{"x", []any{1}}); err == nil {
		t.Error("writing a []any value did not fail")
	}
}

func TestPresetParameterCounts(t *testing.T) {
	tests := []struct {
		preset       string
		params       int64
		vocab, embed int
	}{
		{"tiny", 918_656, 512, 128},
		{"15m", 15_191_712, 32000, 288},
		{"110m", 109_529_856, 32000, 768},
	}
	for _, tt := range tests {
		t.Run(tt.preset, func(t *testing.T) {
			s, err := Preset(tt.preset)
			if err != nil {
				t.Fatal(err)
			}
			if err := s.Validate(); err != nil {
				t.Fatal(err)
			}
			if got := s.ParameterCount(); got != tt.params {
				t.Errorf("ParameterCount() = %d, want %d", got, tt.params)
			}
			// Independently: embeddings, final norm, then per layer two
			// norms, Q and O, K and V, and three FFN matrices.
			e, ff, kv := int64(s.Embedding), int64(s.FeedForward), int64(s.HeadSize()*s.withDefaults().HeadsKV)
			formula := int64(s.NVocab())*e + e + int64(s.Layers)*(2*e+2*e*e+2*e*kv+3*e*ff)
			if formula != tt.params || s.NVocab() != tt.vocab || s.Embedding != tt.embed {
				t.Errorf("formula %d, vocab %d, embedding %d", formula, s.NVocab(), s.Embedding)
			}
			s.TiedEmbeddings = false
			if got := s.ParameterCount(); got != tt.params+int64(tt.vocab*tt.embed) {
				t.Errorf("untied ParameterCount() = %d, want %d", got, tt.params+int64(tt.vocab*tt.embed))
			}
			for _, typ := range WeightTypes {
				s.TiedEmbeddings = true
				s.Type = typ
				size, err := s.FileSize()
				if err != nil {
					t.Fatal(err)
				}
				t.Logf("%s %s: %d parameters, %d bytes", tt.preset, typ, s.ParameterCount(), size)
			}
		})
	}
	if _, err := Preset("huge"); err == nil {
		t.Error("Preset(huge) did not fail")
	}
}

func TestValidate(t *testing.T) {
	good, _ := Preset("tiny")
	tests := []struct {
		name string
		edit func(*Spec)
	}{
		{"zero layers", func(s *Spec) { s.Layers = 0 }},
		{"heads do not divide", func(s *Spec) { s.Heads = 3 }},
		{"odd head size", func(s *Spec) { s.Embedding, s.Heads = 126, 2 }},
		{"kv heads do not divide", func(s *Spec) { s.HeadsKV = 3 }},
		{"q8_0 ffn", func(s *Spec) { s.Type, s.FeedForward = TypeQ8_0, 172 }},
		{"unknown type", func(s *Spec) { s.Type = 2 }},
		{"vocab too small", func(s *Spec) { s.VocabSize = 100 }},
		{"too many layers", func(s *Spec) { s.Layers = 513 }},
	}
	for _, tt := range tests {
		s := good
		tt.edit(&s)
		if err := s.Validate(); !errors.Is(err, ErrSpec) {
			t.Errorf("%s: Validate() = %v, want ErrSpec", tt.name, err)
		}
	}
	ok := good
	ok.FeedForward = 172 // fine for f16
	ok.HeadsKV = 2
	if err := ok.Validate(); err != nil {
		t.Errorf("FFN 172, 2 kv heads, f16: %v", err)
	}
}

func TestBuiltinVocab(t *testing.T) {
	minimum := BuiltinVocabMinSize()
	if minimum > 512 {
		t.Fatalf("minimum built-in vocabulary %d is over 512", minimum)
	}
	for _, size := range []int{0, minimum, 512, 32000} {
		v, err := BuiltinVocab(size)
		if err != nil {
			t.Fatal(err)
		}
		want := size
		if size == 0 {
			want = minimum
		}
		var toks []string
		var types []int32
		var scores []float32
		for _, kv := range v.KVs() {
			switch kv.Key {
			case "tokenizer.ggml.tokens":
				toks = kv.Value.([]string)
			case "tokenizer.ggml.token_type":
				types = kv.Value.([]int32)
			case "tokenizer.ggml.scores":
				scores = kv.Value.([]float32)
			}
		}
		if v.Size() != want || len(toks) != want || len(types) != want || len(scores) != want {
			t.Fatalf("size %d: Size %d, %d tokens, %d types, %d scores", size, v.Size(), len(toks), len(types), len(scores))
		}
		seen := map[string]bool{}
		for i, tok := range toks {
			if tok == "" || seen[tok] {
				t.Fatalf("token %d %q is empty or repeated", i, tok)
			}
			seen[tok] = true
		}
		for b := range 256 {
			if toks[3+b] != fmt.Sprintf("<0x%02X>", b) || types[3+b] != tokenByte {
				t.Fatalf("byte token %d is %q type %d", b, toks[3+b], types[3+b])
			}
		}
		if toks[0] != "<unk>" || toks[1] != "<s>" || toks[2] != "</s>" || types[0] != tokenUnknown || types[1] != tokenControl {
			t.Fatalf("special tokens %q %v", toks[:3], types[:3])
		}
		if size == 32000 {
			t.Logf("last tokens: %q", toks[len(toks)-3:])
		}
	}
	if _, err := BuiltinVocab(minimum - 1); err == nil {
		t.Error("a vocabulary below the minimum did not fail")
	}
}

func TestWriteReadBack(t *testing.T) {
	s, _ := Preset("tiny")
	s.Layers = 2
	s.HeadsKV = 2
	s.TiedEmbeddings = false
	dir := t.TempDir()
	for _, typ := range WeightTypes {
		s.Type = typ
		path := filepath.Join(dir, typ.String()+".gguf")
		n, err := WriteFile(context.Background(), path, s)
		if err != nil {
			t.Fatal(err)
		}
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		want, err := s.FileSize()
		if err != nil {
			t.Fatal(err)
		}
		if n != st.Size() || n != want {
			t.Errorf("%s: wrote %d, file %d, FileSize %d", typ, n, st.Size(), want)
		}
		f, err := ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		checks := map[string]any{
			"general.architecture":                   "llama",
			"general.alignment":                      uint32(32),
			"general.file_type":                      typ.fileType(),
			"llama.context_length":                   uint32(16384),
			"llama.embedding_length":                 uint32(128),
			"llama.block_count":                      uint32(2),
			"llama.feed_forward_length":              uint32(384),
			"llama.attention.head_count":             uint32(4),
			"llama.attention.head_count_kv":          uint32(2),
			"llama.rope.dimension_count":             uint32(32),
			"llama.attention.layer_norm_rms_epsilon": float32(1e-5),
			"llama.vocab_size":                       uint32(512),
			"tokenizer.ggml.model":                   "llama",
			"tokenizer.ggml.bos_token_id":            uint32(1),
		}
		for k, v := range checks {
			if got := f.Lookup(k); got != v {
				t.Errorf("%s: %s = %#v, want %#v", typ, k, got, v)
			}
		}
		if len(f.Tensors) != 3+2*9 {
			t.Fatalf("%d tensors", len(f.Tensors))
		}
		var off uint64
		var params int64
		for _, ti := range f.Tensors {
			if ti.Offset != off {
				t.Errorf("%s at offset %d, want %d", ti.Name, ti.Offset, off)
			}
			off += uint64(pad(ti.Bytes(), Alignment))
			params += ti.Elements()
			wantType := typ
			if len(ti.Dims) == 1 {
				wantType = TypeF32
			}
			if ti.Type != wantType {
				t.Errorf("%s has type %s, want %s", ti.Name, ti.Type, wantType)
			}
		}
		if f.DataOffset+int64(off) != st.Size() || params != s.ParameterCount() {
			t.Errorf("data %d + %d != file size %d, or %d parameters", f.DataOffset, off, st.Size(), params)
		}
		// Spot-check the data: a norm holds ones, a matrix small values.
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		for _, ti := range f.Tensors {
			at := data[f.DataOffset+int64(ti.Offset):]
			switch ti.Name {
			case "blk.1.ffn_norm.weight":
				for i := range ti.Elements() {
					if x := math.Float32frombits(binary.LittleEndian.Uint32(at[4*i:])); x != 1 {
						t.Fatalf("%s[%d] = %g", ti.Name, i, x)
					}
				}
			case "blk.0.ffn_down.weight":
				vals := decode(ti.Type, at, 384*4)
				limit := math.Sqrt(3.0/384) * 1.001
				var sum2 float64
				for _, x := range vals {
					sum2 += float64(x) * float64(x)
					if math.Abs(float64(x)) > limit {
						t.Fatalf("%s: value %g beyond ±%g", ti.Name, x, limit)
					}
				}
				if rms := math.Sqrt(sum2 / float64(len(vals))); math.Abs(rms*math.Sqrt(384)-1) > 0.05 {
					t.Errorf("%s: rms %g, want about 1/sqrt(384)", ti.Name, rms)
				}
			}
		}
	}
}

// decode returns the first n values of data of type typ.
func decode(typ GGMLType, data []byte, n int) []float32 {
	out := make([]float32, n)
	switch typ {
	case TypeF32:
		for i := range out {
			out[i] = math.Float32frombits(binary.LittleEndian.Uint32(data[4*i:]))
		}
	case TypeF16:
		for i := range out {
			out[i] = F16ToF32(binary.LittleEndian.Uint16(data[2*i:]))
		}
	case TypeQ8_0:
		for i := 0; i < n; i += q8BlockSize {
			DequantizeQ8_0Block(out[i:], data[i/q8BlockSize*q8BlockBytes:])
		}
	}
	return out
}

func TestWriteDeterministic(t *testing.T) {
	s, _ := Preset("tiny")
	s.Layers = 1
	sum := func(s Spec) [32]byte {
		var buf bytes.Buffer
		if _, err := Write(context.Background(), &buf, s); err != nil {
			t.Fatal(err)
		}
		return sha256.Sum256(buf.Bytes())
	}
	a, b := sum(s), sum(s)
	s.Seed = 1
	c := sum(s)
	if a != b || a == c {
		t.Errorf("same seed: equal %v; different seed: equal %v", a == b, a == c)
	}
}

func TestWriteCancelled(t *testing.T) {
	s, _ := Preset("tiny")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	path := filepath.Join(t.TempDir(), "m.gguf")
	if _, err := WriteFile(ctx, path, s); !errors.Is(err, context.Canceled) {
		t.Fatalf("err %v, want context.Canceled", err)
	}
	if ents, _ := os.ReadDir(filepath.Dir(path)); len(ents) != 0 {
		t.Errorf("left %d files behind", len(ents))
	}
}

// TestLoadVocabCopiesKVs reads the tokenizer of models and vocabulary-only
// files that mkmodel wrote, of both built-in kinds, and checks that a model
// written with it carries every tokenizer entry verbatim.
func TestLoadVocabCopiesKVs(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	tests := []struct {
		name  string
		write func(path string) error
		model string
		size  int
	}{
		{"model/spm", func(path string) error {
			s, _ := Preset("tiny")
			s.Layers, s.VocabSize = 1, 600
			_, err := WriteFile(ctx, path, s)
			return err
		}, "llama", 600},
		{"model/bpe", func(path string) error {
			s, _ := Preset("tiny")
			s.Layers = 1
			v, err := BuiltinBPEVocab(700)
			if err != nil {
				return err
			}
			s.Vocab = v
			_, err = WriteFile(ctx, path, s)
			return err
		}, "gpt2", 700},
		{"vocab-only/spm", func(path string) error {
			v, err := BuiltinVocab(32000)
			if err != nil {
				return err
			}
			_, err = WriteVocabFile(ctx, path, v)
			return err
		}, "llama", 32000},
		{"vocab-only/bpe", func(path string) error {
			v, err := BuiltinBPEVocab(50257)
			if err != nil {
				return err
			}
			_, err = WriteVocabFile(ctx, path, v)
			return err
		}, "gpt2", 50257},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(dir, fmt.Sprintf("src%d.gguf", i))
			if err := tt.write(path); err != nil {
				t.Fatal(err)
			}
			v, err := LoadVocab(path)
			if err != nil {
				t.Fatal(err)
			}
			if v.Size() != tt.size || v.Model() != tt.model || v.Source() != path {
				t.Errorf("size %d, model %q, source %q", v.Size(), v.Model(), v.Source())
			}
			src, err := ReadKVs(path)
			if err != nil {
				t.Fatal(err)
			}
			s, _ := Preset("tiny")
			s.Layers = 1
			s.Vocab = v
			out := filepath.Join(dir, fmt.Sprintf("out%d.gguf", i))
			if _, err := WriteFile(ctx, out, s); err != nil {
				t.Fatal(err)
			}
			f, err := ReadFile(out)
			if err != nil {
				t.Fatal(err)
			}
			n := 0
			for _, kv := range src {
				if !strings.HasPrefix(kv.Key, "tokenizer.") {
					continue
				}
				n++
				if got := f.Lookup(kv.Key); !reflect.DeepEqual(got, kv.Value) {
					t.Errorf("%s not copied verbatim (%T vs %T)", kv.Key, got, kv.Value)
				}
			}
			if n < 5 || f.Lookup("llama.vocab_size") != uint32(tt.size) || f.Tensors[0].Dims[1] != int64(tt.size) {
				t.Errorf("%d tokenizer keys, vocab_size %v, token_embd %v", n, f.Lookup("llama.vocab_size"), f.Tensors[0].Dims)
			}
		})
	}
}

// TestLoadVocabRefuses checks that LoadVocab refuses files without a
// usable tokenizer with ErrFormat.
func TestLoadVocabRefuses(t *testing.T) {
	dir := t.TempDir()
	header := func(kvs ...KV) []byte {
		var buf bytes.Buffer
		bw := bufio.NewWriter(&buf)
		if err := writeHeader(&writer{w: bw}, kvs, nil); err != nil {
			t.Fatal(err)
		}
		bw.Flush()
		return buf.Bytes()
	}
	tests := []struct {
		name string
		data []byte
	}{
		{"text", []byte("# Models\n\nThis folder holds test models.\n")},
		{"no tokenizer", header(KV{"general.architecture", "llama"})},
		{"no tokens", header(KV{"tokenizer.ggml.model", "llama"})},
		{"no model", header(KV{"tokenizer.ggml.tokens", []string{"a", "b"}})},
		{"tokens not strings", header(KV{"tokenizer.ggml.model", "llama"}, KV{"tokenizer.ggml.tokens", []int32{1, 2}})},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(dir, fmt.Sprintf("f%d.gguf", i))
			if err := os.WriteFile(path, tt.data, 0o644); err != nil {
				t.Fatal(err)
			}
			v, err := LoadVocab(path)
			if err == nil {
				t.Fatalf("LoadVocab succeeded: %d tokens, model %q", v.Size(), v.Model())
			}
			if !errors.Is(err, ErrFormat) {
				t.Errorf("err %v, want ErrFormat", err)
			}
		})
	}
}

// TestGPT2Bytes checks the byte-to-unicode mapping against GPT-2's
// encoder.py: known characters, and a bijection onto 256 distinct
// one-character strings.
func TestGPT2Bytes(t *testing.T) {
	order, char := gpt2Bytes()
	for _, tt := range []struct {
		b    byte
		want string
	}{
		{'!', "!"}, {'a', "a"}, {'~', "~"}, {0xA1, "¡"}, {0xFF, "ÿ"},
		{0x00, "\u0100"}, {'\t', "ĉ"}, {'\n', "Ċ"}, {' ', "Ġ"}, {0x7F, "ġ"}, {0xA0, "ł"}, {0xAD, "Ń"},
	} {
		if char[tt.b] != tt.want {
			t.Errorf("byte %#02x is %q, want %q", tt.b, char[tt.b], tt.want)
		}
	}
	// GPT-2's vocabulary starts "!", '"', ... and has "Ġ" as token 220.
	if order[0] != '!' || order[1] != '"' || order[220] != ' ' || order[255] != 0xAD {
		t.Errorf("token order %q %q ... 220 %q ... 255 %#02x", order[0], order[1], order[220], order[255])
	}
	seen := map[string]bool{}
	seenByte := map[byte]bool{}
	for i, b := range order {
		c := char[b]
		if utf8.RuneCountInString(c) != 1 || seen[c] || seenByte[b] {
			t.Fatalf("token %d: byte %#02x as %q, a duplicate or not one character", i, b, c)
		}
		seen[c], seenByte[b] = true, true
	}
}

// TestBuiltinBPEVocab checks the built-in BPE vocabulary's structure: its
// sizes, unique tokens, byte tokens, token types, special ids, and merges
// that make every word it learnt one token, by llama.cpp's algorithm.
func TestBuiltinBPEVocab(t *testing.T) {
	minSize := BuiltinBPEVocabMinSize()
	if minSize <= 257 || minSize > 512 {
		t.Fatalf("BuiltinBPEVocabMinSize() = %d, want in (257, 512] so the tiny preset fits", minSize)
	}
	tests := []struct {
		size, want int
		ok         bool
	}{
		{0, minSize, true},
		{minSize, minSize, true},
		{512, 512, true},
		{50257, 50257, true},
		{minSize - 1, 0, false},
		{-1, 0, false},
		{1<<24 + 1, 0, false},
	}
	_, char := gpt2Bytes()
	byteOf := map[string]byte{}
	for b := range 256 {
		byteOf[char[b]] = byte(b)
	}
	for _, tt := range tests {
		t.Run(fmt.Sprint(tt.size), func(t *testing.T) {
			v, err := BuiltinBPEVocab(tt.size)
			if !tt.ok {
				if err == nil {
					t.Fatalf("BuiltinBPEVocab(%d) succeeded", tt.size)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if v.Size() != tt.want || v.Model() != "gpt2" || v.Source() != "built-in" {
				t.Fatalf("size %d, model %q, source %q", v.Size(), v.Model(), v.Source())
			}
			kv := map[string]any{}
			for _, e := range v.KVs() {
				kv[e.Key] = e.Value
			}
			toks, _ := kv["tokenizer.ggml.tokens"].([]string)
			types, _ := kv["tokenizer.ggml.token_type"].([]int32)
			merges, _ := kv["tokenizer.ggml.merges"].([]string)
			if len(toks) != tt.want || len(types) != tt.want || len(merges) == 0 {
				t.Fatalf("%d tokens, %d types, %d merges", len(toks), len(types), len(merges))
			}
			if kv["tokenizer.ggml.pre"] != "gpt-2" || kv["tokenizer.ggml.add_bos_token"] != false {
				t.Errorf("pre %v, add_bos %v", kv["tokenizer.ggml.pre"], kv["tokenizer.ggml.add_bos_token"])
			}
			eot := uint32(tt.want - 1)
			if toks[eot] != "<|endoftext|>" || types[eot] != tokenControl ||
				kv["tokenizer.ggml.bos_token_id"] != eot || kv["tokenizer.ggml.eos_token_id"] != eot {
				t.Errorf("last token %q type %d; bos %v, eos %v", toks[eot], types[eot],
					kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"])
			}
			id := map[string]int{}
			for i, tok := range toks {
				if _, dup := id[tok]; dup {
					t.Fatalf("token %d %q is a duplicate (llama.cpp asserts unique tokens)", i, tok)
				}
				id[tok] = i
				if i == int(eot) {
					continue
				}
				if types[i] != tokenNormal {
					t.Errorf("token %d %q has type %d, want normal", i, tok, types[i])
				}
				// llama.cpp decodes every character of a normal token
				// through the byte map.
				for _, r := range tok {
					if _, ok := byteOf[string(r)]; !ok {
						t.Fatalf("token %d %q has %q, outside the byte map", i, tok, r)
					}
				}
				if i < 256 && utf8.RuneCountInString(tok) != 1 {
					t.Errorf("byte token %d is %q", i, tok)
				}
			}
			// Every merge joins two tokens that exist before it (bytes, or
			// made by earlier merges) into a token.
			made := map[string]bool{}
			for _, tok := range toks[:256] {
				made[tok] = true
			}
			ranks := map[[2]string]int{}
			for r, m := range merges {
				a, b, ok := strings.Cut(m, " ")
				if !ok || a == "" || b == "" || strings.Contains(b, " ") {
					t.Fatalf("merge %d %q is not two tokens", r, m)
				}
				if !made[a] || !made[b] {
					t.Errorf("merge %d %q: a side is not made by an earlier merge", r, m)
				}
				if _, ok := id[a+b]; !ok {
					t.Errorf("merge %d %q makes %q, not a token", r, m, a+b)
				}
				made[a+b] = true
				ranks[[2]string{a, b}] = r
			}
			for _, w := range bpeWords() {
				if got := bpeEncode(w, ranks); len(got) != 1 {
					t.Errorf("%q encodes as %q, not one token", w, got)
				}
			}
			for i := 256; i < int(eot); i++ {
				if !made[toks[i]] && !strings.HasPrefix(toks[i], bpeSpace) {
					t.Errorf("filler token %d %q does not start with %q", i, toks[i], bpeSpace)
				}
			}
		})
	}
}

// TestWriteVocabFile checks the vocabulary-only file: llama metadata, the
// tokenizer entries verbatim and in order, no tensors, and nothing written
// on failure.
func TestWriteVocabFile(t *testing.T) {
	spm, err := BuiltinVocab(0)
	if err != nil {
		t.Fatal(err)
	}
	bpe, err := BuiltinBPEVocab(0)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, v := range []*Vocab{spm, bpe} {
		t.Run(v.Model(), func(t *testing.T) {
			path := filepath.Join(dir, v.Model()+".gguf")
			n, err := WriteVocabFile(context.Background(), path, v)
			if err != nil {
				t.Fatal(err)
			}
			st, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			f, err := ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if n != st.Size() || f.DataOffset != st.Size() || len(f.Tensors) != 0 {
				t.Errorf("returned %d, file %d bytes, data at %d, %d tensors", n, st.Size(), f.DataOffset, len(f.Tensors))
			}
			for key, want := range map[string]any{
				"general.architecture":       "llama",
				"llama.vocab_size":           uint32(v.Size()),
				"llama.block_count":          uint32(vocabSpec.Layers),
				"llama.embedding_length":     uint32(vocabSpec.Embedding),
				"llama.attention.head_count": uint32(vocabSpec.Heads),
				"llama.context_length":       uint32(vocabSpec.ContextLength),
			} {
				if got := f.Lookup(key); got != want {
					t.Errorf("%s = %v (%T), want %v (%T)", key, got, got, want, want)
				}
			}
			if d, _ := f.Lookup("general.description").(string); !strings.Contains(d, "vocabulary only") {
				t.Errorf("general.description %q", d)
			}
			var tok []KV
			for _, kv := range f.KVs {
				if strings.HasPrefix(kv.Key, "tokenizer.") {
					tok = append(tok, kv)
				}
			}
			if !reflect.DeepEqual(tok, v.KVs()) {
				t.Errorf("tokenizer entries differ: %d read, %d written", len(tok), len(v.KVs()))
			}
			back, err := LoadVocab(path)
			if err != nil || back.Size() != v.Size() || back.Model() != v.Model() {
				t.Errorf("LoadVocab: %v", err)
			}
		})
	}

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	fails := filepath.Join(t.TempDir(), "v.gguf")
	if _, err := WriteVocabFile(ctx, fails, spm); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled: err %v, want context.Canceled", err)
	}
	if _, err := WriteVocabFile(context.Background(), fails, nil); !errors.Is(err, ErrSpec) {
		t.Errorf("nil vocabulary: err %v, want ErrSpec", err)
	}
	if ents, _ := os.ReadDir(filepath.Dir(fails)); len(ents) != 0 {
		t.Errorf("failed writes left %d files behind", len(ents))
	}
}
