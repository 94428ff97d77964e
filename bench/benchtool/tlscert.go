package main

import (
	"errors"
	"flag"
	"os"
	"path/filepath"

	"cascata/internal/pgcluster"
)

// cmdTLSCert writes a server certificate for 127.0.0.1 and localhost and
// its key (PEM, the key 0600), signed by a throwaway CA whose certificate
// goes to ca.pem beside them (pgcluster.NewCA): the one certificate every
// proxy serves in the bench's TLS rounds.
func cmdTLSCert(args []string) error {
	fs := flag.NewFlagSet("tlscert", flag.ContinueOnError)
	certFile := fs.String("cert", "", "certificate file to write")
	keyFile := fs.String("key", "", "key file to write")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *certFile == "" || *keyFile == "" {
		return errors.New("-cert and -key are required")
	}
	cert, _, err := pgcluster.NewCA(filepath.Dir(*certFile))
	if err != nil {
		return err
	}
	certPEM, keyPEM, err := pgcluster.CertPEM(cert)
	if err != nil {
		return err
	}
	if err := os.WriteFile(*certFile, certPEM, 0o644); err != nil {
		return err
	}
	return os.WriteFile(*keyFile, keyPEM, 0o600)
}
