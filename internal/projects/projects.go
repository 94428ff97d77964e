// Package projects puts configured projects in force: each project's keys
// and token policy in the JWT verifier, and the whole set of pools and
// routes in the proxy.
package projects

import (
	"fmt"

	"cascata/auth"
	"cascata/internal/config"
	"cascata/proxy"
)

// Project is one project of cascata.toml as the verifier and the proxy
// need it. ClaimsMAC (signed claims) is left for the caller, which owns
// the keys.
type Project struct {
	Keys   auth.KeyConfig
	Policy auth.Policy
	Proxy  proxy.ProjectConfig
}

// ProjectOf maps a configured project to the verifier's and the proxy's
// settings; the JWT secrets are resolved (env, file) here.
func ProjectOf(p *config.Project) (Project, error) {
	secrets, err := p.JWTSecrets()
	if err != nil {
		return Project{}, fmt.Errorf("project %s: %w", p.Ref, err)
	}
	return Project{
		Keys: auth.KeyConfig{Secrets: secrets, JWKSFile: p.JWKSFile, JWKSURL: p.JWKSURL},
		Policy: auth.Policy{
			Roles: p.Roles, RoleClaim: p.RoleClaim, AnonRole: p.AnonRole,
			Issuer: p.JWTIssuer, Audience: p.JWTAudience, AllowNoExp: p.JWTAllowNoExp, Leeway: p.JWTLeeway.Duration,
		},
		Proxy: proxy.ProjectConfig{
			Ref: p.Ref, DatabaseURL: p.DatabaseURL, ReplicaURLs: p.ReplicaURLs,
			PoolSize: p.PoolSize, MaxPinned: p.MaxPinned, SessionMode: p.PoolMode == config.PoolModeSession,
			TrustedRoles: p.TrustedRoles, MaxReplicaLag: p.MaxReplicaLag.Duration, Consistency: p.Consistency,
			RoleURLs: p.RoleLogins, LegacyClaimGUCs: p.LegacyClaimGUCs,
		},
	}, nil
}

// Apply puts projects in force in a verifier and a proxy server: the keys
// of each, then the whole set of pools and routes. each, when not nil, may
// complete a project's proxy settings (signed claims) before they apply.
func Apply(ver *auth.Verifier, srv *proxy.Server, projects []config.Project, each func(*config.Project, *proxy.ProjectConfig)) error {
	cfgs := make([]proxy.ProjectConfig, 0, len(projects))
	for i := range projects {
		p := &projects[i]
		gp, err := ProjectOf(p)
		if err != nil {
			return err
		}
		if err := ver.SetProject(p.Ref, gp.Keys, gp.Policy); err != nil {
			return fmt.Errorf("project %s: %w", p.Ref, err)
		}
		if each != nil {
			each(p, &gp.Proxy)
		}
		cfgs = append(cfgs, gp.Proxy)
	}
	return srv.SetProjects(cfgs)
}
