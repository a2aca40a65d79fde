// Package obs holds what makes kvgate operable in production, apart from
// the service itself: the gRPC interceptor chain (per-call logging through
// log/slog, Prometheus metrics, bearer-token authentication, panic
// recovery), kvgate's own Prometheus metrics and their HTTP endpoint, ORCA
// load reports for weighted_round_robin clients, and TLS helpers.
//
// The package is pure Go: it knows the service only through the
// GetCacheStats snapshot it is given and through function hooks, so its
// tests build without cgo.
package obs
