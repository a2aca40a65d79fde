package mkmodel

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
)

// GGUF value types, as numbered in ggml's gguf.h.
const (
	typeUint8   uint32 = 0
	typeInt8    uint32 = 1
	typeUint16  uint32 = 2
	typeInt16   uint32 = 3
	typeUint32  uint32 = 4
	typeInt32   uint32 = 5
	typeFloat32 uint32 = 6
	typeBool    uint32 = 7
	typeString  uint32 = 8
	typeArray   uint32 = 9
	typeUint64  uint32 = 10
	typeInt64   uint32 = 11
	typeFloat64 uint32 = 12
)

const (
	ggufMagic   = "GGUF"
	ggufVersion = 3
	// Alignment is the alignment of the tensor data section and of every
	// tensor in it, written as general.alignment.
	Alignment = 32
)

// ErrFormat reports a file that is not a well-formed GGUF file.
var ErrFormat = errors.New("malformed GGUF file")

// KV is one GGUF metadata entry. Value holds the Go type that matches the
// GGUF value type exactly, so that a read entry is written back with the
// same type: uint8, int8, uint16, int16, uint32, int32, uint64, int64,
// float32, float64, bool or string, or a slice of one of those for an
// array. Nested arrays are not supported.
type KV struct {
	Key   string
	Value any
}

// TensorInfo describes one tensor of a GGUF file.
type TensorInfo struct {
	// Name is the tensor's name, such as "blk.0.attn_q.weight".
	Name string
	// Dims are the tensor's extents, fastest-varying first (ggml's ne).
	Dims []int64
	// Type is the ggml type of the tensor's elements.
	Type GGMLType
	// Offset is the tensor's byte offset from the start of the data section.
	Offset uint64
}

// Elements returns the number of elements of the tensor.
func (t TensorInfo) Elements() int64 {
	n := int64(1)
	for _, d := range t.Dims {
		n *= d
	}
	return n
}

// Bytes returns the size of the tensor's data, without alignment padding.
func (t TensorInfo) Bytes() int64 {
	return t.Type.rowBytes(t.Elements())
}

// File is the header of a GGUF file: its metadata and tensor directory.
type File struct {
	Version uint32
	KVs     []KV
	Tensors []TensorInfo
	// DataOffset is the file offset of the tensor data section.
	DataOffset int64
}

// Lookup returns the value of key, or nil when the file has no such key.
func (f *File) Lookup(key string) any {
	for _, kv := range f.KVs {
		if kv.Key == key {
			return kv.Value
		}
	}
	return nil
}

// ReadKVs returns the metadata entries of the GGUF file at path, in file
// order and with their value types preserved.
func ReadKVs(path string) ([]KV, error) {
	f, err := ReadFile(path)
	if err != nil {
		return nil, err
	}
	return f.KVs, nil
}

// ReadFile reads the header of the GGUF file at path: its metadata and
// tensor directory, but not the tensor data.
func ReadFile(path string) (*File, error) {
	fh, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read gguf: %w", err)
	}
	defer fh.Close()
	st, err := fh.Stat()
	if err != nil {
		return nil, fmt.Errorf("read gguf: %w", err)
	}
	f, err := Read(bufio.NewReaderSize(fh, 1<<16), st.Size())
	if err != nil {
		return nil, fmt.Errorf("read gguf %s: %w", path, err)
	}
	return f, nil
}

// Read reads a GGUF header from r. size, when positive, is the size of the
// whole file; it bounds the lengths the header may claim, so that a
// corrupt file fails cleanly instead of asking for huge allocations.
func Read(r io.Reader, size int64) (*File, error) {
	if size <= 0 {
		size = math.MaxInt64
	}
	rd := &reader{r: r, limit: size}
	var magic [4]byte
	rd.bytes(magic[:])
	if rd.err == nil && string(magic[:]) != ggufMagic {
		return nil, fmt.Errorf("%w: magic %q", ErrFormat, magic[:])
	}
	f := &File{Version: rd.u32()}
	if rd.err == nil && (f.Version < 2 || f.Version > 3) {
		return nil, fmt.Errorf("%w: unsupported version %d", ErrFormat, f.Version)
	}
	nTensors := rd.count(24) // a tensor info takes at least 24 bytes
	nKV := rd.count(12)
	for i := int64(0); i < nKV && rd.err == nil; i++ {
		key := rd.str()
		typ := rd.u32()
		v := rd.value(typ, true)
		f.KVs = append(f.KVs, KV{Key: key, Value: v})
	}
	for i := int64(0); i < nTensors && rd.err == nil; i++ {
		t := TensorInfo{Name: rd.str()}
		nd := rd.u32()
		if rd.err == nil && nd > 4 {
			return nil, fmt.Errorf("%w: tensor %q has %d dimensions", ErrFormat, t.Name, nd)
		}
		for range nd {
			t.Dims = append(t.Dims, int64(rd.u64()))
		}
		t.Type = GGMLType(rd.u32())
		t.Offset = rd.u64()
		f.Tensors = append(f.Tensors, t)
	}
	if rd.err != nil {
		return nil, rd.err
	}
	align := int64(Alignment)
	if v, ok := f.Lookup("general.alignment").(uint32); ok {
		if v == 0 || v&(v-1) != 0 {
			return nil, fmt.Errorf("%w: general.alignment %d is not a power of two", ErrFormat, v)
		}
		align = int64(v)
	}
	f.DataOffset = pad(rd.n, align)
	return f, nil
}

// reader decodes little-endian GGUF primitives, keeping the first error.
type reader struct {
	r     io.Reader
	n     int64 // bytes consumed
	limit int64 // file size
	err   error
	buf   [8]byte
}

func (r *reader) bytes(b []byte) {
	if r.err != nil {
		return
	}
	n, err := io.ReadFull(r.r, b)
	r.n += int64(n)
	if err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			err = fmt.Errorf("%w: truncated at byte %d", ErrFormat, r.n)
		}
		r.err = err
	}
}

func (r *reader) u8() uint8 {
	r.bytes(r.buf[:1])
	return r.buf[0]
}

func (r *reader) u16() uint16 {
	r.bytes(r.buf[:2])
	return binary.LittleEndian.Uint16(r.buf[:2])
}

func (r *reader) u32() uint32 {
	r.bytes(r.buf[:4])
	return binary.LittleEndian.Uint32(r.buf[:4])
}

func (r *reader) u64() uint64 {
	r.bytes(r.buf[:8])
	return binary.LittleEndian.Uint64(r.buf[:8])
}

// count reads a 64-bit element count and checks that that many elements
// of at least minSize bytes each can fit in the rest of the file.
func (r *reader) count(minSize int64) int64 {
	n := r.u64()
	if r.err != nil {
		return 0
	}
	if n > uint64(math.MaxInt64) || int64(n) > (r.limit-r.n)/minSize {
		r.err = fmt.Errorf("%w: count %d at byte %d exceeds the file size", ErrFormat, n, r.n-8)
		return 0
	}
	return int64(n)
}

func (r *reader) str() string {
	n := r.count(1)
	if r.err != nil {
		return ""
	}
	b := make([]byte, n)
	r.bytes(b)
	return string(b)
}

// elemSize is the smallest encoded size of a value of type typ.
func elemSize(typ uint32) int64 {
	switch typ {
	case typeUint8, typeInt8, typeBool:
		return 1
	case typeUint16, typeInt16:
		return 2
	case typeUint32, typeInt32, typeFloat32:
		return 4
	default:
		return 8
	}
}

func (r *reader) value(typ uint32, arrayOK bool) any {
	switch typ {
	case typeUint8:
		return r.u8()
	case typeInt8:
		return int8(r.u8())
	case typeUint16:
		return r.u16()
	case typeInt16:
		return int16(r.u16())
	case typeUint32:
		return r.u32()
	case typeInt32:
		return int32(r.u32())
	case typeFloat32:
		return math.Float32frombits(r.u32())
	case typeBool:
		return r.u8() != 0
	case typeString:
		return r.str()
	case typeUint64:
		return r.u64()
	case typeInt64:
		return int64(r.u64())
	case typeFloat64:
		return math.Float64frombits(r.u64())
	case typeArray:
		if arrayOK {
			return r.array()
		}
	}
	if r.err == nil {
		r.err = fmt.Errorf("%w: unsupported value type %d at byte %d", ErrFormat, typ, r.n)
	}
	return nil
}

func (r *reader) array() any {
	typ := r.u32()
	if r.err != nil {
		return nil
	}
	n := r.count(elemSize(typ))
	if r.err != nil {
		return nil
	}
	switch typ {
	case typeUint8:
		return readArray(r, n, r.u8)
	case typeInt8:
		return readArray(r, n, func() int8 { return int8(r.u8()) })
	case typeUint16:
		return readArray(r, n, r.u16)
	case typeInt16:
		return readArray(r, n, func() int16 { return int16(r.u16()) })
	case typeUint32:
		return readArray(r, n, r.u32)
	case typeInt32:
		return readArray(r, n, func() int32 { return int32(r.u32()) })
	case typeFloat32:
		return readArray(r, n, func() float32 { return math.Float32frombits(r.u32()) })
	case typeBool:
		return readArray(r, n, func() bool { return r.u8() != 0 })
	case typeString:
		return readArray(r, n, r.str)
	case typeUint64:
		return readArray(r, n, r.u64)
	case typeInt64:
		return readArray(r, n, func() int64 { return int64(r.u64()) })
	case typeFloat64:
		return readArray(r, n, func() float64 { return math.Float64frombits(r.u64()) })
	}
	r.err = fmt.Errorf("%w: unsupported array element type %d at byte %d", ErrFormat, typ, r.n)
	return nil
}

func readArray[T any](r *reader, n int64, next func() T) []T {
	out := make([]T, 0, n)
	for i := int64(0); i < n && r.err == nil; i++ {
		out = append(out, next())
	}
	return out
}

// writer encodes little-endian GGUF primitives, counting the bytes written
// and keeping the first error.
type writer struct {
	w   *bufio.Writer
	n   int64
	err error
	buf [8]byte
}

func (w *writer) bytes(b []byte) {
	if w.err != nil {
		return
	}
	n, err := w.w.Write(b)
	w.n += int64(n)
	w.err = err
}

func (w *writer) u8(v uint8) {
	w.buf[0] = v
	w.bytes(w.buf[:1])
}

func (w *writer) u16(v uint16) {
	binary.LittleEndian.PutUint16(w.buf[:2], v)
	w.bytes(w.buf[:2])
}

func (w *writer) u32(v uint32) {
	binary.LittleEndian.PutUint32(w.buf[:4], v)
	w.bytes(w.buf[:4])
}

func (w *writer) u64(v uint64) {
	binary.LittleEndian.PutUint64(w.buf[:8], v)
	w.bytes(w.buf[:8])
}

func (w *writer) str(s string) {
	w.u64(uint64(len(s)))
	if w.err == nil {
		n, err := w.w.WriteString(s)
		w.n += int64(n)
		w.err = err
	}
}

// pad writes zero bytes up to the next multiple of align.
func (w *writer) pad(align int64) {
	var zero [Alignment]byte
	for w.err == nil && w.n%align != 0 {
		w.bytes(zero[:min(align-w.n%align, int64(len(zero)))])
	}
}

// kv writes one metadata entry.
func (w *writer) kv(kv KV) error {
	w.str(kv.Key)
	switch v := kv.Value.(type) {
	case uint8:
		w.u32(typeUint8)
		w.u8(v)
	case int8:
		w.u32(typeInt8)
		w.u8(uint8(v))
	case uint16:
		w.u32(typeUint16)
		w.u16(v)
	case int16:
		w.u32(typeInt16)
		w.u16(uint16(v))
	case uint32:
		w.u32(typeUint32)
		w.u32(v)
	case int32:
		w.u32(typeInt32)
		w.u32(uint32(v))
	case float32:
		w.u32(typeFloat32)
		w.u32(math.Float32bits(v))
	case bool:
		w.u32(typeBool)
		w.u8(boolByte(v))
	case string:
		w.u32(typeString)
		w.str(v)
	case uint64:
		w.u32(typeUint64)
		w.u64(v)
	case int64:
		w.u32(typeInt64)
		w.u64(uint64(v))
	case float64:
		w.u32(typeFloat64)
		w.u64(math.Float64bits(v))
	case []uint8:
		writeArray(w, typeUint8, v, w.u8)
	case []int8:
		writeArray(w, typeInt8, v, func(x int8) { w.u8(uint8(x)) })
	case []uint16:
		writeArray(w, typeUint16, v, w.u16)
	case []int16:
		writeArray(w, typeInt16, v, func(x int16) { w.u16(uint16(x)) })
	case []uint32:
		writeArray(w, typeUint32, v, w.u32)
	case []int32:
		writeArray(w, typeInt32, v, func(x int32) { w.u32(uint32(x)) })
	case []float32:
		writeArray(w, typeFloat32, v, func(x float32) { w.u32(math.Float32bits(x)) })
	case []bool:
		writeArray(w, typeBool, v, func(x bool) { w.u8(boolByte(x)) })
	case []string:
		writeArray(w, typeString, v, w.str)
	case []uint64:
		writeArray(w, typeUint64, v, w.u64)
	case []int64:
		writeArray(w, typeInt64, v, func(x int64) { w.u64(uint64(x)) })
	case []float64:
		writeArray(w, typeFloat64, v, func(x float64) { w.u64(math.Float64bits(x)) })
	default:
		return fmt.Errorf("gguf key %s: unsupported value type %T", kv.Key, kv.Value)
	}
	return w.err
}

func writeArray[T any](w *writer, typ uint32, v []T, put func(T)) {
	w.u32(typeArray)
	w.u32(typ)
	w.u64(uint64(len(v)))
	for _, x := range v {
		put(x)
	}
}

func boolByte(b bool) uint8 {
	if b {
		return 1
	}
	return 0
}

// pad rounds n up to a multiple of align.
func pad(n, align int64) int64 {
	return (n + align - 1) / align * align
}
