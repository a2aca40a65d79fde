package allocator

import "container/list"

// anonymous is the token id of cells charged without a token id (Charge).
// Prompt ids are never negative, so such cells never match a prefix.
const anonymous int32 = -1

// node is a run of tokens held in KV cells exactly once. The tokens of an
// entry are the concatenation of the nodes on its path from the root; two
// entries whose paths share a node share those cells (llama.cpp tags the
// cells with both sequence ids).
type node struct {
	parent   *node
	tokens   []int32
	children []*node
	// users counts the entries whose path passes through or ends at the
	// node; the node's cells are freed when it drops to 0.
	users int
	// hold counts the users that are running or pinned: a node with hold 0
	// holds only evictable cache.
	hold int
	// running counts the running users.
	running int
}

// partition names the part of the prefix cache a request may share: one
// per (Request.Tenant, Request.CacheSalt). Entries of different partitions
// never share a node, so a request can only ever hit on prefixes that
// requests of its own partition left behind.
type partition struct {
	tenant, salt string
}

// entry is one llama.cpp sequence id's content: a running sequence, or a
// finished one kept as cache.
type entry struct {
	seq   int
	part  partition
	path  []*node // the partition root's children first; the entry covers each node fully
	depth int     // tokens on the path
	lease *Lease  // nil once cached
	pins  int     // new sequences that will copy from this entry
	lru   *list.Element
}

// tree is the prefix index over every entry's tokens and the owner of the
// count of used cells. It has one root per partition, created when the
// partition's first node is added and dropped when its last node goes, so
// that a match never leaves its partition.
type tree struct {
	roots map[partition]*node
	cells int // cells in all nodes, of every partition: the used cells
	// evictable is the number of cells in nodes with hold 0.
	evictable int
}

func commonPrefix(a, b []int32) int {
	n := min(len(a), len(b))
	for i := range n {
		if a[i] != b[i] || a[i] == anonymous {
			return i
		}
	}
	return n
}

// match returns the deepest point of partition part's tree that prompt
// follows: the nodes fully matched and, in the next node, how many tokens
// match.
func (t *tree) match(part partition, prompt []int32) (path []*node, partial *node, k int, depth int) {
	n := t.roots[part]
	for n != nil && depth < len(prompt) {
		var best *node
		bestK := 0
		for _, c := range n.children {
			if kk := commonPrefix(c.tokens, prompt[depth:]); kk > bestK {
				best, bestK = c, kk
			}
		}
		if best == nil {
			return path, nil, 0, depth
		}
		if bestK < len(best.tokens) {
			return path, best, bestK, depth + bestK
		}
		path = append(path, best)
		depth += bestK
		n = best
	}
	return path, nil, 0, depth
}

// split cuts n after k tokens and returns the new upper node. Every user of
// n is a user of both halves, so counts are copied.
func (t *tree) split(n *node, k int) *node {
	up := &node{parent: n.parent, tokens: n.tokens[:k:k], users: n.users, hold: n.hold, running: n.running}
	for i, c := range n.parent.children {
		if c == n {
			n.parent.children[i] = up
			break
		}
	}
	rest := make([]int32, len(n.tokens)-k)
	copy(rest, n.tokens[k:])
	n.tokens, n.parent = rest, up
	up.children = []*node{n}
	return up
}

// fixPaths replaces, in every entry path through lower, the node lower by
// upper followed by lower. It is called after split.
func fixPath(path []*node, upper, lower *node) []*node {
	for i, n := range path {
		if n == lower {
			path = append(path, nil)
			copy(path[i+1:], path[i:])
			path[i] = upper
			return path
		}
	}
	return path
}

// addUser accounts for one more entry through the nodes of path.
func (t *tree) addUser(path []*node, held, running bool) {
	for _, n := range path {
		n.users++
		if held {
			t.hold(n, 1)
		}
		if running {
			n.running++
		}
	}
}

// hold changes n.hold by d and keeps the evictable count.
func (t *tree) hold(n *node, d int) {
	was := n.hold
	n.hold += d
	switch {
	case was == 0 && n.hold > 0:
		t.evictable -= len(n.tokens)
	case was > 0 && n.hold == 0:
		t.evictable += len(n.tokens)
	}
}

// holdPath changes hold along path by d.
func (t *tree) holdPath(path []*node, d int) {
	for _, n := range path {
		t.hold(n, d)
	}
}

// removeUser drops the use of path by an entry of partition part and frees
// the nodes nobody uses any more, and the partition's root once it is
// empty. It returns the cells freed.
func (t *tree) removeUser(part partition, path []*node, held, running bool) int {
	freed := 0
	for i := len(path) - 1; i >= 0; i-- {
		n := path[i]
		n.users--
		if held {
			t.hold(n, -1)
		}
		if running {
			n.running--
		}
		if n.users == 0 {
			freed += len(n.tokens)
			t.cells -= len(n.tokens)
			if n.hold == 0 {
				t.evictable -= len(n.tokens)
			}
			p := n.parent
			for j, c := range p.children {
				if c == n {
					p.children = append(p.children[:j], p.children[j+1:]...)
					break
				}
			}
		}
	}
	if r := t.roots[part]; r != nil && len(r.children) == 0 {
		delete(t.roots, part)
	}
	return freed
}

// appendTokens adds tokens to the end of e's path. The entry is running, so
// the new cells are held.
func (t *tree) appendTokens(e *entry, tokens []int32) {
	if len(tokens) == 0 {
		return
	}
	var last *node
	if len(e.path) > 0 {
		last = e.path[len(e.path)-1]
	}
	if last != nil && last.users == 1 && len(last.children) == 0 {
		last.tokens = append(last.tokens, tokens...)
	} else {
		parent := last
		if parent == nil {
			parent = t.rootFor(e.part)
		}
		n := &node{parent: parent, tokens: append(make([]int32, 0, max(len(tokens), 16)), tokens...), users: 1, hold: 1, running: 1}
		parent.children = append(parent.children, n)
		e.path = append(e.path, n)
	}
	t.cells += len(tokens)
	e.depth += len(tokens)
}

// rootFor returns partition part's root, creating it if need be.
func (t *tree) rootFor(part partition) *node {
	r := t.roots[part]
	if r == nil {
		if t.roots == nil {
			t.roots = make(map[partition]*node)
		}
		r = &node{}
		t.roots[part] = r
	}
	return r
}

// stats walks every partition's tree and returns the cells held only by
// cached entries and the cells shared by two or more entries.
func (t *tree) stats() (cached, shared int) {
	var walk func(n *node)
	walk = func(n *node) {
		for _, c := range n.children {
			if c.running == 0 {
				cached += len(c.tokens)
			}
			if c.users >= 2 {
				shared += len(c.tokens)
			}
			walk(c)
		}
	}
	for _, r := range t.roots {
		walk(r)
	}
	return cached, shared
}
