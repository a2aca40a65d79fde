package main

import (
	"context"
	"errors"

	"github.com/kvgate/kvgate/allocator"
	"github.com/kvgate/kvgate/native"
	"github.com/kvgate/kvgate/service"
)

// engineAdapter adapts the allocator and the worker to service.Engine.
type engineAdapter struct {
	alloc      *allocator.Allocator
	eng        *native.Engine
	optimistic bool
}

type stream struct {
	*native.Stream
	cached int
}

func (s stream) CachedTokens() int { return s.cached }

func (e engineAdapter) Submit(ctx context.Context, r native.Request) (service.Stream, error) {
	lease, err := e.alloc.Admit(ctx, allocator.Request{
		Prompt: r.Prompt, NoCache: r.NoCache, MaxTokens: r.MaxTokens, Priority: r.Priority,
		QueueTimeout: r.QueueTimeout, Tenant: r.Tenant, CacheSalt: r.CacheSalt,
	})
	if err != nil {
		return nil, err
	}
	r.SeqID = lease.SeqID()
	if e.optimistic {
		r.Ledger = ledger{lease}
	} else {
		r.Ledger = reserveLedger{lease}
	}
	out, err := e.eng.Start(r)
	if err != nil {
		return nil, err
	}
	return stream{out, lease.CachedTokens()}, nil
}

func (e engineAdapter) Stats() service.Stats {
	return service.Stats{Allocator: e.alloc.Stats(), Engine: e.eng.Stats()}
}

type reserveLedger struct{ *allocator.Lease }

type ledger struct{ *allocator.Lease }

func (l ledger) Grow(n int) (bool, error) {
	err := l.Lease.Grow(n)
	if errors.Is(err, allocator.ErrNoCells) {
		return false, nil
	}
	return err == nil, err
}
