// Package server runs a kvgate server inside a Go program: what
// "kvgate serve" runs, without its flags and signal handling (which stay in
// cmd/kvgate, as etcd's etcdmain stays beside its embed package).
//
// Start binds the ports and serves at once, with health NOT_SERVING, while
// the model loads in the background; Ready is closed once it serves, and
// Done if the load (or a listener) fails:
//
//	cfg := server.DefaultConfig()
//	cfg.Listen = "127.0.0.1:0"
//	cfg.Model = "model.gguf"
//	s, err := server.Start(ctx, cfg)
//	if err != nil {
//		return err // a bad setting, an unreadable credential, a port in use
//	}
//	defer s.Close()
//	select {
//	case <-s.Ready():
//	case <-s.Done():
//		return s.Err() // the model did not load
//	}
//	conn, err := grpc.NewClient(s.Addr().String(), ...)
//
// To stop, Drain lets running streams finish (at most Config.DrainTimeout)
// while new calls get UNAVAILABLE, and Close stops everything and waits for
// it. Close alone ends running streams at once. Reload rereads the auth
// token file and the TLS key pair, as SIGHUP does for kvgate serve.
//
// The model, the engine, the allocator and the service on them are built
// in one place, build.go; the rest of the package knows only the service
// and the gRPC side.
package server
