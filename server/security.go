package server

import (
	"errors"
	"fmt"
	"log/slog"

	"github.com/kvgate/kvgate/internal/obs"
)

// security is what Config.AuthTokens and Config.TLSCert configure. Both
// parts are optional and reread by Server.Reload.
type security struct {
	tokens *obs.Tokens       // nil without AuthTokens
	certs  *obs.CertReloader // nil without TLSCert
}

// loadSecurity reads the token file and the server's key pair.
func loadSecurity(c *Config) (*security, error) {
	var sec security
	var err error
	if c.AuthTokens != "" {
		if sec.tokens, err = obs.LoadTokens(c.AuthTokens); err != nil {
			return nil, fmt.Errorf("--auth-tokens: %w", err)
		}
	}
	if c.TLSCert != "" {
		if sec.certs, err = obs.NewCertReloader(c.TLSCert, c.TLSKey); err != nil {
			return nil, fmt.Errorf("--tls-cert: %w", err)
		}
	}
	return &sec, nil
}

// reload rereads the token file and the key pair, keeping the old ones
// where a file cannot be read, and returns the errors of those that could
// not be.
func (s *security) reload(log *slog.Logger) error {
	var errs []error
	if s.tokens != nil {
		if n, err := s.tokens.Reload(); err != nil {
			log.Error("auth tokens not reloaded; the previous ones stay in force", "err", err)
			errs = append(errs, fmt.Errorf("auth tokens: %w", err))
		} else {
			log.Info("auth tokens reloaded", "tokens", n)
			if n == 0 {
				log.Warn("the auth token file holds no token: every authenticated call will be refused")
			}
		}
	}
	if s.certs != nil {
		if err := s.certs.Reload(); err != nil {
			log.Error("TLS certificate not reloaded; the previous one stays in use", "err", err)
			errs = append(errs, fmt.Errorf("TLS certificate: %w", err))
		} else {
			log.Info("TLS certificate reloaded")
		}
	}
	return errors.Join(errs...)
}
