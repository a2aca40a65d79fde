package server

import (
	"context"
	"net"
	"sync"

	"github.com/kvgate/kvgate/internal/obs"
	"github.com/kvgate/kvgate/service"
)

// tenantPolicy resolves a tenant's limits: those its token-file lines set,
// else the server-wide settings. Without an auth token file every call
// belongs to obs.DefaultTenant.
type tenantPolicy struct {
	tokens      *obs.Tokens // nil without Config.AuthTokens
	maxPriority int32
	maxShare    float64
	maxQueued   int
}

// tenant returns the named tenant as the token file defines it, with the
// server-wide defaults filled in.
func (p tenantPolicy) tenant(name string) obs.Tenant {
	t := obs.Tenant{Name: name}
	if p.tokens != nil {
		if got, ok := p.tokens.Tenant(name); ok {
			t = got
		}
	}
	if t.Weight == 0 {
		t.Weight = 1
	}
	if t.MaxShare == 0 {
		t.MaxShare = p.maxShare
	}
	if t.MaxQueued == 0 {
		t.MaxQueued = p.maxQueued
	}
	if t.MaxPriority == nil {
		mp := p.maxPriority
		t.MaxPriority = &mp
	}
	return t
}

// of returns the service's view of the caller's tenant.
func (p tenantPolicy) of(ctx context.Context) service.Tenant {
	t := p.tenant(obs.TenantFromContext(ctx))
	return service.Tenant{Name: t.Name, MaxPriority: *t.MaxPriority}
}

// limitListener accepts at most n connections at once. A connection past
// the limit is closed as soon as it is accepted, so that it costs nothing
// but the accept, and its client sees UNAVAILABLE and backs off, instead
// of waiting unseen in the kernel's backlog.
type limitListener struct {
	net.Listener
	slots   chan struct{}
	metrics *obs.Metrics // nil without Config.MetricsListen
}

func newLimitListener(l net.Listener, n int, m *obs.Metrics) *limitListener {
	return &limitListener{Listener: l, slots: make(chan struct{}, n), metrics: m}
}

// Accept returns the next connection within the limit.
func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		select {
		case l.slots <- struct{}{}:
			if l.metrics != nil {
				l.metrics.ConnectionOpened()
			}
			return &limitConn{Conn: c, l: l}, nil
		default:
			_ = c.Close()
			if l.metrics != nil {
				l.metrics.ConnectionRefused()
			}
		}
	}
}

// limitConn gives its slot back when closed.
type limitConn struct {
	net.Conn
	l    *limitListener
	once sync.Once
}

// Close closes the connection and frees its slot.
func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() {
		<-c.l.slots
		if c.l.metrics != nil {
			c.l.metrics.ConnectionClosed()
		}
	})
	return err
}
