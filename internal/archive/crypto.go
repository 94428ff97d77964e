package archive

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"

	"golang.org/x/crypto/scrypt"
)

// Default scrypt parameters: about 32 MiB and 0.1 s per derivation.
const (
	scryptN      = 1 << 15
	scryptR      = 8
	scryptP      = 1
	saltBytes    = 16
	secretsAAD   = "cascata-archive/1/secrets.enc"
	cipherAESGCM = "AES-256-GCM"
	kdfScrypt    = "scrypt"
	minScryptN   = 1 << 10
	maxScryptN   = 1 << 20
	maxScryptR   = 32
	maxScryptP   = 16
	// A hostile manifest may set each parameter within its bound and still
	// ask for 4 GiB and minutes of CPU: scrypt takes 128·N·r bytes and time
	// in N·r·p. These keep a derivation within 256 MiB and 16 times the
	// default's work (about 3 s here).
	maxScryptMem  = 256 << 20
	maxScryptWork = 16 * scryptN * scryptR * scryptP
	minSaltBytes  = 16
	maxSaltBytes  = 64
	derivedKeyLen = 64 // 32 bytes AES key, 32 bytes HMAC key
)

// Secrets is what secrets.enc seals: the project's JWT verification keys.
type Secrets struct {
	// HMACSecrets are the HS256/384/512 secrets, first one first.
	HMACSecrets [][]byte `json:"hmac_secrets,omitempty"`
	// JWKS is the content of the project's jwks_file (a JWK Set), byte for
	// byte, or nil.
	JWKS []byte `json:"jwks,omitempty"`
}

// keys are the two keys derived from a passphrase.
type keys struct {
	enc []byte
	mac []byte
}

// newSealInfo returns fresh parameters with a random salt.
func newSealInfo() (SealInfo, error) {
	salt := make([]byte, saltBytes)
	if _, err := rand.Read(salt); err != nil {
		return SealInfo{}, fmt.Errorf("random salt: %w", err)
	}
	return SealInfo{Cipher: cipherAESGCM, KDF: kdfScrypt, N: scryptN, R: scryptR, P: scryptP, Salt: salt}, nil
}

// deriveKeys runs scrypt with the manifest's parameters after bounding them
// (a hostile manifest must not make us allocate gigabytes).
func deriveKeys(passphrase []byte, si SealInfo) (keys, error) {
	if len(passphrase) == 0 {
		return keys{}, ErrNoPassphrase
	}
	if si.Cipher != cipherAESGCM || si.KDF != kdfScrypt {
		return keys{}, fmt.Errorf("%w: secrets sealed with %s/%s; only %s/%s is known", ErrCorrupt, si.Cipher, si.KDF, cipherAESGCM, kdfScrypt)
	}
	if err := checkScrypt(si); err != nil {
		return keys{}, err
	}
	k, err := scrypt.Key(passphrase, si.Salt, si.N, si.R, si.P, derivedKeyLen)
	if err != nil {
		return keys{}, fmt.Errorf("derive key: %w", err)
	}
	return keys{enc: k[:32], mac: k[32:]}, nil
}

// checkScrypt refuses scrypt parameters out of bounds.
func checkScrypt(si SealInfo) error {
	if si.N < minScryptN || si.N > maxScryptN || si.N&(si.N-1) != 0 || si.R < 1 || si.R > maxScryptR || si.P < 1 || si.P > maxScryptP ||
		128*si.N*si.R > maxScryptMem || si.N*si.R*si.P > maxScryptWork ||
		len(si.Salt) < minSaltBytes || len(si.Salt) > maxSaltBytes {
		return fmt.Errorf("%w: scrypt parameters out of range (N=%d r=%d p=%d salt=%d bytes)", ErrCorrupt, si.N, si.R, si.P, len(si.Salt))
	}
	return nil
}

// seal encrypts the secrets: 12-byte nonce followed by the GCM ciphertext.
func seal(k keys, s Secrets) ([]byte, error) {
	plain, err := json.Marshal(s)
	if err != nil {
		return nil, fmt.Errorf("encode secrets: %w", err)
	}
	aead, err := newGCM(k.enc)
	if err != nil {
		return nil, err
	}
	nonce := make([]byte, aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return nil, fmt.Errorf("random nonce: %w", err)
	}
	return aead.Seal(nonce, nonce, plain, []byte(secretsAAD)), nil
}

// open decrypts secrets.enc; a failure means the passphrase is wrong (the
// member's SHA-256 has been checked against the manifest before).
func open(k keys, sealed []byte) (Secrets, error) {
	aead, err := newGCM(k.enc)
	if err != nil {
		return Secrets{}, err
	}
	if len(sealed) < aead.NonceSize()+aead.Overhead() {
		return Secrets{}, fmt.Errorf("%w: secrets.enc is too short", ErrCorrupt)
	}
	plain, err := aead.Open(nil, sealed[:aead.NonceSize()], sealed[aead.NonceSize():], []byte(secretsAAD))
	if err != nil {
		return Secrets{}, fmt.Errorf("%w: secrets.enc cannot be decrypted with this passphrase", ErrWrongPassphrase)
	}
	var s Secrets
	if err := json.Unmarshal(plain, &s); err != nil {
		return Secrets{}, fmt.Errorf("%w: secrets.enc content: %v", ErrCorrupt, err)
	}
	return s, nil
}

func newGCM(key []byte) (cipher.AEAD, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("aes: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("gcm: %w", err)
	}
	return aead, nil
}

// signManifest returns manifest.sig for the manifest bytes.
func signManifest(k keys, manifest []byte) ([]byte, error) {
	sum := sha256.Sum256(manifest)
	mac := hmac.New(sha256.New, k.mac)
	mac.Write(manifest)
	b, err := json.MarshalIndent(sigFile{ManifestSHA256: hex.EncodeToString(sum[:]), ManifestHMAC: hex.EncodeToString(mac.Sum(nil))}, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encode manifest.sig: %w", err)
	}
	return append(b, '\n'), nil
}

// checkManifestSum decodes manifest.sig and checks the manifest's SHA-256.
func checkManifestSum(sigRaw, manifest []byte) (sigFile, error) {
	var sig sigFile
	if err := json.Unmarshal(sigRaw, &sig); err != nil {
		return sig, fmt.Errorf("%w: manifest.sig: %v", ErrCorrupt, err)
	}
	sum := sha256.Sum256(manifest)
	want, err := hex.DecodeString(sig.ManifestSHA256)
	if err != nil || !hmac.Equal(want, sum[:]) {
		return sig, fmt.Errorf("%w: manifest.json does not match the SHA-256 in manifest.sig", ErrCorrupt)
	}
	return sig, nil
}

// checkManifestHMAC verifies that the manifest was written by someone who
// knew the passphrase.
func checkManifestHMAC(k keys, sig sigFile, manifest []byte) error {
	want, err := hex.DecodeString(sig.ManifestHMAC)
	if err != nil {
		return fmt.Errorf("%w: manifest.sig: bad HMAC encoding", ErrCorrupt)
	}
	mac := hmac.New(sha256.New, k.mac)
	mac.Write(manifest)
	if !hmac.Equal(want, mac.Sum(nil)) {
		return fmt.Errorf("%w: manifest.json was altered (its HMAC does not match the passphrase)", ErrCorrupt)
	}
	return nil
}
