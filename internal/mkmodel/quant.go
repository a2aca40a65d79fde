package mkmodel

import (
	"encoding/binary"
	"fmt"
	"math"
	"strings"
)

// GGMLType is a ggml tensor element type, numbered as in ggml.h.
type GGMLType uint32

// The ggml types mkmodel writes.
const (
	TypeF32  GGMLType = 0
	TypeF16  GGMLType = 1
	TypeQ8_0 GGMLType = 8
)

// q8_0 blocks: 32 weights share one f16 scale.
const (
	q8BlockSize  = 32
	q8BlockBytes = 2 + q8BlockSize
)

// WeightTypes lists the types Write accepts for weight matrices.
var WeightTypes = []GGMLType{TypeF32, TypeF16, TypeQ8_0}

// ParseType returns the weight type named s: "f32", "f16" or "q8_0".
func ParseType(s string) (GGMLType, error) {
	for _, t := range WeightTypes {
		if strings.EqualFold(s, t.String()) {
			return t, nil
		}
	}
	return 0, fmt.Errorf("unknown weight type %q (want f32, f16 or q8_0)", s)
}

// String returns the type's name as ggml writes it, such as "q8_0".
func (t GGMLType) String() string {
	switch t {
	case TypeF32:
		return "f32"
	case TypeF16:
		return "f16"
	case TypeQ8_0:
		return "q8_0"
	}
	return fmt.Sprintf("ggml_type(%d)", uint32(t))
}

// fileType returns the general.file_type value (llama_ftype) of a model
// whose weight matrices have type t.
func (t GGMLType) fileType() uint32 {
	switch t {
	case TypeF16:
		return 1 // LLAMA_FTYPE_MOSTLY_F16
	case TypeQ8_0:
		return 7 // LLAMA_FTYPE_MOSTLY_Q8_0
	}
	return 0 // LLAMA_FTYPE_ALL_F32
}

// blockSize returns how many elements one block of t holds.
func (t GGMLType) blockSize() int64 {
	if t == TypeQ8_0 {
		return q8BlockSize
	}
	return 1
}

// rowBytes returns the encoded size of n elements of type t; n must be a
// multiple of the block size.
func (t GGMLType) rowBytes(n int64) int64 {
	switch t {
	case TypeF32:
		return 4 * n
	case TypeF16:
		return 2 * n
	case TypeQ8_0:
		return n / q8BlockSize * q8BlockBytes
	}
	return 0
}

// encode writes src into dst in type t. len(src) must be a multiple of
// the block size and dst must hold t.rowBytes(len(src)) bytes.
func (t GGMLType) encode(dst []byte, src []float32) {
	switch t {
	case TypeF32:
		for i, x := range src {
			binary.LittleEndian.PutUint32(dst[4*i:], math.Float32bits(x))
		}
	case TypeF16:
		for i, x := range src {
			binary.LittleEndian.PutUint16(dst[2*i:], F32ToF16(x))
		}
	case TypeQ8_0:
		for i := 0; i+q8BlockSize <= len(src); i += q8BlockSize {
			QuantizeQ8_0Block(dst[i/q8BlockSize*q8BlockBytes:], src[i:i+q8BlockSize])
		}
	}
}

// F32ToF16 converts f to IEEE 754 half precision, rounding to nearest with
// ties to even, as the hardware conversion ggml uses does. Values beyond
// the half range become infinities, tiny values become subnormals or
// zeros, and NaNs stay (quiet) NaNs.
func F32ToF16(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int32(b>>23) & 0xff
	man := b & 0x7fffff
	if exp == 0xff {
		if man != 0 {
			return sign | 0x7e00 | uint16(man>>13)
		}
		return sign | 0x7c00
	}
	e := exp - 127 + 15 // the half-precision biased exponent
	if e >= 0x1f {
		return sign | 0x7c00
	}
	if e <= 0 {
		// Subnormal half (or zero): the value is m * 2^(e-14) units of
		// the smallest subnormal, 2^-24.
		if e < -10 {
			return sign // below half the smallest subnormal
		}
		m := man | 0x800000
		shift := uint32(14 - e)
		h := m >> shift
		rem := m & (1<<shift - 1)
		half := uint32(1) << (shift - 1)
		if rem > half || (rem == half && h&1 == 1) {
			h++
		}
		return sign | uint16(h)
	}
	h := uint32(e)<<10 | man>>13
	rem := man & 0x1fff
	if rem > 0x1000 || (rem == 0x1000 && h&1 == 1) {
		h++ // a carry into the exponent is still correct, up to infinity
	}
	return sign | uint16(h)
}

// F16ToF32 converts an IEEE 754 half-precision value to float32 exactly.
func F16ToF32(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	man := uint32(h & 0x3ff)
	switch {
	case exp == 0x1f:
		return math.Float32frombits(sign | 0x7f800000 | man<<13)
	case exp != 0:
		return math.Float32frombits(sign | (exp+127-15)<<23 | man<<13)
	case man == 0:
		return math.Float32frombits(sign)
	}
	// Subnormal half: normalise it.
	e := uint32(127 - 15 + 1)
	for man&0x400 == 0 {
		man <<= 1
		e--
	}
	return math.Float32frombits(sign | e<<23 | (man&0x3ff)<<13)
}

// QuantizeQ8_0Block encodes 32 values as one ggml q8_0 block in dst (34
// bytes): the f16 scale d = max|x|/127, then 32 int8 values round(x/d).
// It follows ggml's quantize_row_q8_0_ref, so the bytes match what
// llama.cpp's quantizer writes.
func QuantizeQ8_0Block(dst []byte, src []float32) {
	var amax float32
	for _, x := range src[:q8BlockSize] {
		amax = max(amax, float32(math.Abs(float64(x))))
	}
	d := amax / 127
	var id float32
	if d != 0 {
		id = 1 / d
	}
	binary.LittleEndian.PutUint16(dst, F32ToF16(d))
	for j, x := range src[:q8BlockSize] {
		dst[2+j] = byte(int8(math.Round(float64(x * id))))
	}
}

// DequantizeQ8_0Block decodes one q8_0 block from src into dst[:32].
func DequantizeQ8_0Block(dst []float32, src []byte) {
	d := F16ToF32(binary.LittleEndian.Uint16(src))
	for j := range q8BlockSize {
		dst[j] = float32(int8(src[2+j])) * d
	}
}
