package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"cascata/auth"
	"cascata/internal/config"
)

// cmdToken mints a JWT signed with a project's HMAC secret.
func cmdToken(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("token", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "cascata.toml", "config file")
	ref := fs.String("project", "", "project ref")
	role := fs.String("role", "", "role claim")
	sub := fs.String("sub", "", "sub claim")
	ttl := fs.Duration("ttl", time.Hour, "lifetime")
	extra := fs.String("claims", "", "extra claims as a JSON object")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *ref == "" || *role == "" {
		return errors.New("-project and -role are required")
	}
	cfg, err := config.Load(*path)
	if err != nil {
		return err
	}
	p := cfg.ProjectByRef(*ref)
	if p == nil {
		return fmt.Errorf("no project %q in %s", *ref, *path)
	}
	if !slices.Contains(p.Roles, *role) {
		return fmt.Errorf("role %q is not in the project's roles %v", *role, p.Roles)
	}
	tok, err := mintToken(p, *role, *sub, *extra, *ttl)
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, tok)
	return nil
}

// mintToken signs claims for a project with its first HMAC secret.
func mintToken(p *config.Project, role, sub, extraJSON string, ttl time.Duration) (string, error) {
	secrets, err := p.JWTSecrets()
	if err != nil {
		return "", err
	}
	if len(secrets) == 0 {
		return "", fmt.Errorf("project %s has no HMAC secret (jwks keys are public: mint with the private key's owner)", p.Ref)
	}
	claims := map[string]any{}
	if extraJSON != "" {
		if err := json.Unmarshal([]byte(extraJSON), &claims); err != nil {
			return "", fmt.Errorf("-claims: %w", err)
		}
	}
	setClaimPath(claims, p.RoleClaim, role)
	claims["ref"] = p.Ref
	if sub != "" {
		claims["sub"] = sub
	}
	return auth.Mint(auth.MintKey{Secret: secrets[0]}, claims, ttl)
}

// setClaimPath sets a dotted claim path ("app_metadata.role"), creating
// nested objects on the way.
func setClaimPath(claims map[string]any, path, value string) {
	parts := strings.Split(path, ".")
	m := claims
	for _, k := range parts[:len(parts)-1] {
		next, ok := m[k].(map[string]any)
		if !ok {
			next = map[string]any{}
			m[k] = next
		}
		m = next
	}
	m[parts[len(parts)-1]] = value
}
