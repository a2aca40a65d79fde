// Package cellmap mirrors where llama.cpp's unified KV cache keeps each
// token, for the decode worker's deterministic mode.
package cellmap

// Sequences is llama.cpp's LLAMA_MAX_SEQ, as native.Sequences.
const Sequences = 256

// Map mirrors where llama.cpp's unified KV cache (one stream, no sliding
// window) keeps each token, so that the engine can see, before a decode,
// which cell every token of the batch will take. It follows the vendored
// llama.cpp (llama-kv-cache.cpp): find_slot takes the first free cells from
// the head, starting over from cell 0 when the head lies more than twice the
// ubatch above the used count and wrapping at the end; apply_ubatch moves
// the head past the ubatch's last cell; seq_rm lowers the head to the first
// cell it frees. TestCellMapMatchesLlama checks it against llama.cpp.
//
// Flash attention visits a sequence's cells in cell order. A sequence whose
// cells are in position order is therefore computed exactly as if it were
// alone; MaxCell tells whether a new token keeps that order.
type Map struct {
	pos     []int32  // position held by each cell; -1 when empty
	seqs    []SeqSet // sequences in each cell
	head    int
	used    int
	ubatch  int
	MaxCell [Sequences]int32 // highest cell of each sequence, -1 for none

	// journal records the cells that apply changed, so that a decode that
	// fails can be undone; see Mark and Rollback.
	journal    []int32
	savedHead  int
	savedUsed  int
	savedMaxes [Sequences]int32
}

func New(cells, ubatch int) *Map {
	m := &Map{
		pos:     make([]int32, cells),
		seqs:    make([]SeqSet, cells),
		ubatch:  ubatch,
		journal: make([]int32, 0, ubatch*4),
	}
	for i := range m.pos {
		m.pos[i] = -1
	}
	for i := range m.MaxCell {
		m.MaxCell[i] = -1
	}
	return m
}

// FindSlot returns the cells find_slot would choose for a ubatch of n
// tokens, appended to dst, or false when there is no room.
func (m *Map) FindSlot(n int, dst []int32) ([]int32, bool) {
	size := len(m.pos)
	if n > size {
		return dst, false
	}
	head := m.head
	if head > m.used+2*n {
		head = 0
	}
	start := len(dst)
	tested := 0
	for {
		if head+1 > size {
			tested += size - head
			head = 0
			continue
		}
		idx := head
		head++
		tested++
		if m.pos[idx] < 0 {
			dst = append(dst, int32(idx))
		}
		if len(dst)-start == n {
			return dst, true
		}
		if tested >= size {
			return dst[:start], false
		}
	}
}

// Mark starts a journal: until the next Mark, Rollback undoes apply.
func (m *Map) Mark() {
	m.journal = m.journal[:0]
	m.savedHead, m.savedUsed, m.savedMaxes = m.head, m.used, m.MaxCell
}

// Rollback undoes every apply since Mark.
func (m *Map) Rollback() {
	for _, c := range m.journal {
		m.pos[c] = -1
		m.seqs[c] = SeqSet{}
	}
	m.journal = m.journal[:0]
	m.head, m.used, m.MaxCell = m.savedHead, m.savedUsed, m.savedMaxes
}

// SeqSet is a set of sequence ids.
type SeqSet [Sequences / 64]uint64

func (s *SeqSet) Add(seq int32)    { s[seq/64] |= 1 << (seq % 64) }
func (s *SeqSet) Del(seq int)      { s[seq/64] &^= 1 << (seq % 64) }
func (s *SeqSet) Has(seq int) bool { return s[seq/64]&(1<<(seq%64)) != 0 }

// Place puts a batch (token i of sequence seqs[i] at position pos[i]) into
// the map the way llama_decode does, one ubatch of at most m.ubatch tokens
// after another, and appends each token's cell to cells. It returns false
// when llama.cpp would find no slot; the map is then as apply left it, and
// the caller rolls back. Sequences, other than exempt, that get a cell
// below one they already hold are added to broken.
func (m *Map) Place(seqs, pos []int32, cells []int32, exempt int32, broken *SeqSet) ([]int32, bool) {
	for at := 0; at < len(seqs); at += m.ubatch {
		end := min(len(seqs), at+m.ubatch)
		from := len(cells)
		var ok bool
		if cells, ok = m.FindSlot(end-at, cells); !ok {
			return cells, false
		}
		for i, c := range cells[from:] {
			s := seqs[at+i]
			m.journal = append(m.journal, c)
			m.pos[c] = pos[at+i]
			m.seqs[c].Add(s)
			m.used++
			if c <= m.MaxCell[s] && s != exempt {
				broken.Add(s)
			}
			m.MaxCell[s] = max(m.MaxCell[s], c)
		}
		m.head = int(cells[len(cells)-1]) + 1
	}
	return cells, true
}

// Remove mirrors llama_memory_seq_rm(seq, -1, -1): seq leaves every cell,
// and a cell it leaves empty is freed.
func (m *Map) Remove(seq int) {
	if m.MaxCell[seq] < 0 {
		return
	}
	newHead := len(m.pos)
	for i := 0; i <= int(m.MaxCell[seq]); i++ {
		if !m.seqs[i].Has(seq) {
			continue
		}
		m.seqs[i].Del(seq)
		if m.seqs[i] == (SeqSet{}) {
			m.pos[i] = -1
			m.used--
			newHead = min(newHead, i)
		}
	}
	m.MaxCell[seq] = -1
	if newHead < m.head {
		m.head = newHead
	}
}

// CopyPrefix mirrors llama_memory_seq_cp(src, dst, 0, n): dst joins the
// cells of src with positions below n.
func (m *Map) CopyPrefix(src, dst, n int) {
	for i := 0; i <= int(m.MaxCell[src]); i++ {
		if m.seqs[i].Has(src) && int(m.pos[i]) < n {
			m.seqs[i].Add(int32(dst))
			m.MaxCell[dst] = max(m.MaxCell[dst], int32(i))
		}
	}
}

// Ordered returns the positions of seq's cells in cell order: what flash
// attention visits.
func (m *Map) Ordered(seq int) []int32 {
	var out []int32
	for i := 0; i <= int(m.MaxCell[seq]); i++ {
		if m.seqs[i].Has(seq) {
			out = append(out, m.pos[i])
		}
	}
	return out
}
