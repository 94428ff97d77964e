package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"cascata/admin"
	"cascata/internal/catalog"
	"cascata/internal/config"
	"cascata/internal/projectdb"
)

// planeProvisioner creates new projects on [provision] for POST
// /v1/projects without a database_url: the database <ref> on
// [provision].owner_url's server, the login and project roles, and the
// storage dir [provision].storage_root/<ref>.
//
// Like the archiver, it reads [provision] when the admin handler is built:
// a SIGHUP reload does not change where new projects go (restart for that).
type planeProvisioner struct {
	cfg  *config.Config // for validating a project before creating anything
	prov config.Provision
	log  *slog.Logger
	mu   sync.Mutex // one provisioning at a time (storage dir checks and rollback)
}

func newProvisioner(p *adminPlane) *planeProvisioner {
	return &planeProvisioner{cfg: p.a.cfg, prov: p.a.cfg.Provision, log: p.a.log}
}

// loginPassword is the password of [provision].login_user
// (login_password_env wins when its variable is set).
func (pv *planeProvisioner) loginPassword() string {
	if pv.prov.LoginPasswordEnv != "" {
		if v := os.Getenv(pv.prov.LoginPasswordEnv); v != "" {
			return v
		}
	}
	return pv.prov.LoginPassword
}

// Provision validates p (with placeholder URLs), then creates its storage
// dir and database and fills DatabaseURL, OwnerURL and StorageDir.
func (pv *planeProvisioner) Provision(ctx context.Context, p config.Project) (config.Project, error) {
	if pv.prov.OwnerURL == "" {
		return p, fmt.Errorf("%w: provisioning a new database is not configured: set [provision].owner_url (a role that may CREATE DATABASE and CREATE ROLE on the server that will hold new projects), or give database_url", admin.ErrConflict)
	}
	password := pv.loginPassword()
	if password == "" && !pv.prov.LoginPerProject {
		return p, fmt.Errorf("%w: provisioning a new database is not configured: set [provision].login_password_env (or login_password), the password of %s in the new project's database_url", admin.ErrConflict, pv.prov.LoginUser)
	}
	// Validate everything but the URLs before creating anything.
	check := p
	check.DatabaseURL, check.OwnerURL = pv.prov.OwnerURL, pv.prov.OwnerURL
	np, err := catalog.Normalize(pv.cfg, check)
	if err != nil {
		return p, err
	}
	for _, role := range np.Roles {
		if role == pv.prov.LoginUser {
			return p, fmt.Errorf("%w: roles: %q is [provision].login_user, the login role; it cannot be a role a JWT claims", admin.ErrBadRequest, role)
		}
		if strings.HasPrefix(role, "pg_") {
			return p, fmt.Errorf("%w: roles: %q: names starting with pg_ are reserved by PostgreSQL", admin.ErrBadRequest, role)
		}
	}
	if p.StorageDir == "" && p.StorageURL == "" && pv.prov.StorageURL != "" {
		// [provision].storage_url: the project's files go to <that>/<ref>.
		t, err := storageTarget(&config.Config{Provision: pv.prov}, p.Ref)
		if err != nil {
			return p, fmt.Errorf("%w: [provision].storage_url: %w", admin.ErrConflict, err)
		}
		t.S3.ApplyTo(&p)
		p.S3AccessKeyEnv, p.S3SecretKeyEnv = t.AccessKeyEnv, t.SecretKeyEnv
	}
	if p.StorageDir == "" && p.StorageURL == "" {
		p.StorageDir = filepath.Join(pv.prov.StorageRoot, p.Ref)
	}

	pv.mu.Lock()
	defer pv.mu.Unlock()
	createdDir := false
	if p.StorageURL == "" {
		entries, err := os.ReadDir(p.StorageDir)
		switch {
		case err == nil && len(entries) > 0:
			return p, fmt.Errorf("%w: storage dir %s is not empty (left by an earlier project?); move it away or give another storage_dir", admin.ErrConflict, p.StorageDir)
		case err != nil && !errors.Is(err, fs.ErrNotExist):
			return p, fmt.Errorf("storage dir: %w", err)
		}
		createdDir = errors.Is(err, fs.ErrNotExist)
		if err := os.MkdirAll(p.StorageDir, 0o700); err != nil {
			return p, fmt.Errorf("create storage dir: %w", err)
		}
	}
	dbURL, ownerURL, err := projectdb.Provision(ctx, pv.prov.OwnerURL, projectdb.ProvisionSpec{
		Database: p.Ref, LoginUser: pv.prov.LoginUser, LoginPassword: password, Roles: np.Roles,
		LoginPerProject: pv.prov.LoginPerProject,
	})
	if err != nil {
		if createdDir {
			_ = os.Remove(p.StorageDir)
		}
		if errors.Is(err, projectdb.ErrDatabaseExists) || errors.Is(err, projectdb.ErrLoginFailed) {
			return p, fmt.Errorf("%w: %w", admin.ErrConflict, err)
		}
		return p, err
	}
	p.DatabaseURL, p.OwnerURL = dbURL, ownerURL
	return p, nil
}

// Drop drops the provisioned database and removes the storage dir when
// it is still empty.
func (pv *planeProvisioner) Drop(ctx context.Context, p config.Project) error {
	pv.mu.Lock()
	defer pv.mu.Unlock()
	err := projectdb.Drop(ctx, pv.prov.OwnerURL, p.Ref)
	if p.StorageDir != "" {
		if entries, rerr := os.ReadDir(p.StorageDir); rerr == nil && len(entries) == 0 {
			_ = os.Remove(p.StorageDir)
		}
	}
	if err == nil {
		pv.log.Warn("provisioned project could not be registered; its database was dropped", "project", p.Ref)
	}
	return err
}
