package pgtest

import (
	"crypto/tls"
	"testing"

	"cascata/internal/pgcluster"
)

// TestCA writes a fresh CA certificate to dir/ca.pem and returns a server
// certificate for 127.0.0.1, ::1 and localhost signed by it, and the path
// of the CA file (for sslrootcert); see pgcluster.NewCA.
func TestCA(t testing.TB, dir string) (tls.Certificate, string) {
	t.Helper()
	cert, caPath, err := pgcluster.NewCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	return cert, caPath
}

// CertPEM returns cert's leaf certificate and its private key in PEM, as
// PostgreSQL's ssl_cert_file and ssl_key_file hold them.
func CertPEM(t testing.TB, cert tls.Certificate) (certPEM, keyPEM []byte) {
	t.Helper()
	certPEM, keyPEM, err := pgcluster.CertPEM(cert)
	if err != nil {
		t.Fatal(err)
	}
	return certPEM, keyPEM
}
