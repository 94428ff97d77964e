package projectdb

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// ProvisionSpec describes a new project database on a shared server.
type ProvisionSpec struct {
	// Database is the new database's name (the project ref). Required.
	Database string
	// LoginUser is the NOINHERIT login role of the project's database_url.
	// It is created LOGIN NOINHERIT when missing; an existing role is left
	// as it is (its password must then be LoginPassword). Required.
	LoginUser string
	// LoginPassword is LoginUser's password. Required unless LoginPerProject.
	LoginPassword string
	// LoginPerProject: the project gets a login role of its own,
	// LoginName(LoginUser, Database), with a random password, and it is the
	// only role besides the owner that may connect to the database. A
	// client that escaped its JWT role would reach that login role only:
	// it sees no other project's sessions in pg_stat_activity, and no other
	// project's login role can connect to this database.
	LoginPerProject bool
	// Roles are the NOLOGIN roles a JWT may claim; missing ones are created
	// (service_role with BYPASSRLS when the owner is a superuser) and each
	// is granted to LoginUser. Required.
	Roles []string
}

// Errors of Provision a caller may turn into a status.
var (
	// ErrDatabaseExists: the database is already on the server; nothing was changed.
	ErrDatabaseExists = errors.New("database exists")
	// ErrLoginFailed: the login role could not log in to the new database
	// (it existed with another password, or without LOGIN); the database
	// was dropped again.
	ErrLoginFailed = errors.New("login role cannot log in")
)

// Provision creates database spec.Database on the server of ownerURL (a
// role that may CREATE DATABASE and CREATE ROLE), makes sure the login role
// and the project roles exist and the roles are granted to the login role,
// grants USAGE on schema public to the roles (and, to service_role when it
// is one of them, default privileges on what the owner creates in public),
// and checks that the login role logs in. It returns the database URL as
// the login role and ownerURL with the new database.
//
// On failure the database is dropped again; roles it created stay (they
// are shared by the projects of the server and harmless without grants).
func Provision(ctx context.Context, ownerURL string, spec ProvisionSpec) (databaseURL, ownerDBURL string, err error) {
	switch {
	case spec.Database == "":
		return "", "", errors.New("provision: database name is required")
	case spec.LoginUser == "":
		return "", "", errors.New("provision: login user is required")
	case spec.LoginPassword == "" && !spec.LoginPerProject:
		return "", "", errors.New("provision: login password is required")
	case len(spec.Roles) == 0:
		return "", "", errors.New("provision: roles are required")
	case slices.Contains(spec.Roles, spec.LoginUser):
		return "", "", fmt.Errorf("provision: the login role %s cannot be one of the project roles", spec.LoginUser)
	}
	if spec.LoginPerProject {
		spec.LoginUser = LoginName(spec.LoginUser, spec.Database)
		var pw [24]byte
		if _, err := rand.Read(pw[:]); err != nil {
			return "", "", fmt.Errorf("provision: login password: %w", err)
		}
		spec.LoginPassword = hex.EncodeToString(pw[:])
		if slices.Contains(spec.Roles, spec.LoginUser) {
			return "", "", fmt.Errorf("provision: the login role %s cannot be one of the project roles", spec.LoginUser)
		}
	}
	if databaseURL, err = withUserDatabase(ownerURL, url.UserPassword(spec.LoginUser, spec.LoginPassword), spec.Database); err != nil {
		return "", "", err
	}
	if ownerDBURL, err = withUserDatabase(ownerURL, nil, spec.Database); err != nil {
		return "", "", err
	}

	conn, err := connectURL(ctx, ownerURL)
	if err != nil {
		return "", "", fmt.Errorf("provision: connect as [provision] owner: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))

	// The database first: its creation decides, atomically, that this
	// request owns the name.
	if err := createDatabase(ctx, conn, spec.Database); err != nil {
		return "", "", err
	}
	defer func() {
		if err != nil {
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			defer cancel()
			if derr := dropDatabase(dctx, conn, spec.Database); derr != nil {
				err = fmt.Errorf("%w (and dropping database %s again failed: %v)", err, spec.Database, derr)
			}
		}
	}()

	if err = ensureRoles(ctx, conn, spec); err != nil {
		return "", "", fmt.Errorf("provision: %w", err)
	}
	if err = grantInDatabase(ctx, ownerDBURL, spec.Roles); err != nil {
		return "", "", fmt.Errorf("provision: %w", err)
	}
	if spec.LoginPerProject {
		// Only this project's login role (and the owner) may connect.
		db, login := ident(spec.Database), ident(spec.LoginUser)
		if _, err = conn.Exec(ctx, "REVOKE CONNECT, TEMPORARY ON DATABASE "+db+" FROM PUBLIC; GRANT CONNECT, TEMPORARY ON DATABASE "+db+" TO "+login); err != nil {
			return "", "", fmt.Errorf("provision: connect privilege: %w", err)
		}
	}
	if err = checkLogin(ctx, databaseURL); err != nil {
		return "", "", err
	}
	return databaseURL, ownerDBURL, nil
}

// Drop drops database (forcing its connections closed) on the server of
// ownerURL; a missing database is not an error.
func Drop(ctx context.Context, ownerURL, database string) error {
	conn, err := connectURL(ctx, ownerURL)
	if err != nil {
		return fmt.Errorf("drop database %s: connect as owner: %w", database, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	return dropDatabase(ctx, conn, database)
}

func createDatabase(ctx context.Context, conn *pgx.Conn, name string) error {
	for {
		_, err := conn.Exec(ctx, "CREATE DATABASE "+ident(name))
		switch {
		case err == nil:
			return nil
		case hasCode(err, "42P04", "23505"): // duplicate_database, concurrent creation
			return fmt.Errorf("%w: database %q is already on the [provision] server", ErrDatabaseExists, name)
		case !hasCode(err, "55006"): // template1 busy with a concurrent CREATE DATABASE: retry
			return fmt.Errorf("provision: create database %s: %w", name, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("provision: create database %s: %w", name, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func dropDatabase(ctx context.Context, conn *pgx.Conn, name string) error {
	if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+ident(name)+" WITH (FORCE)"); err != nil {
		return fmt.Errorf("drop database %s: %w", name, err)
	}
	return nil
}

// ensureRoles creates the missing roles and grants the project roles to
// the login role. Existing roles keep their attributes and password.
func ensureRoles(ctx context.Context, conn *pgx.Conn, spec ProvisionSpec) error {
	var super bool
	if err := conn.QueryRow(ctx, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user").Scan(&super); err != nil {
		return fmt.Errorf("look up the owner role: %w", err)
	}
	var pw string
	if err := conn.QueryRow(ctx, "SELECT format('PASSWORD %L', $1::text)", spec.LoginPassword).Scan(&pw); err != nil {
		return fmt.Errorf("login role: %w", err)
	}
	if _, err := conn.Exec(ctx, "SET password_encryption = 'scram-sha-256'"); err != nil {
		return err
	}
	if err := ensureRole(ctx, conn, spec.LoginUser, "LOGIN NOINHERIT "+pw); err != nil {
		return err
	}
	if spec.LoginPerProject {
		// A role of that name left by an earlier project of the same ref
		// gets this project's password and no attribute beyond LOGIN.
		if _, err := conn.Exec(ctx, "ALTER ROLE "+ident(spec.LoginUser)+" WITH LOGIN NOINHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS "+pw); err != nil {
			return fmt.Errorf("login role %s: %w", spec.LoginUser, err)
		}
	}
	for _, role := range spec.Roles {
		attrs := "NOLOGIN"
		if role == "service_role" && super {
			attrs += " BYPASSRLS"
		}
		if err := ensureRole(ctx, conn, role, attrs); err != nil {
			return err
		}
		var member bool
		err := conn.QueryRow(ctx, `
SELECT EXISTS (SELECT FROM pg_auth_members a JOIN pg_roles r ON r.oid = a.roleid JOIN pg_roles m ON m.oid = a.member
               WHERE r.rolname = $1 AND m.rolname = $2)`, role, spec.LoginUser).Scan(&member)
		if err != nil {
			return fmt.Errorf("look up membership: %w", err)
		}
		if !member {
			if _, err := conn.Exec(ctx, "GRANT "+ident(role)+" TO "+ident(spec.LoginUser)); err != nil {
				return fmt.Errorf("grant %s to %s: %w", role, spec.LoginUser, err)
			}
		}
	}
	return nil
}

// ensureRole creates role with attrs unless it exists.
func ensureRole(ctx context.Context, conn *pgx.Conn, role, attrs string) error {
	var exists bool
	if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)", role).Scan(&exists); err != nil {
		return fmt.Errorf("look up role %s: %w", role, err)
	}
	if exists {
		return nil
	}
	if _, err := conn.Exec(ctx, "CREATE ROLE "+ident(role)+" "+attrs); err != nil && !hasCode(err, "42710", "23505") {
		return fmt.Errorf("create role %s: %w", role, err)
	}
	return nil
}

// grantInDatabase grants, inside the new database, USAGE on schema public
// to the roles, and to service_role (when a role) the default privileges
// on what the owner will create there.
func grantInDatabase(ctx context.Context, ownerDBURL string, roles []string) error {
	db, err := connectURL(ctx, ownerDBURL)
	if err != nil {
		return fmt.Errorf("connect to the new database as owner: %w", err)
	}
	defer db.Close(context.WithoutCancel(ctx))
	grantees := make([]string, len(roles))
	for i, r := range roles {
		grantees[i] = ident(r)
	}
	stmts := []string{"GRANT USAGE ON SCHEMA public TO " + strings.Join(grantees, ", ")}
	if slices.Contains(roles, "service_role") {
		for _, kind := range []string{"TABLES", "SEQUENCES", "FUNCTIONS"} {
			stmts = append(stmts, "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON "+kind+" TO service_role")
		}
	}
	for _, s := range stmts {
		if _, err := db.Exec(ctx, s); err != nil {
			return fmt.Errorf("%s: %w", s, err)
		}
	}
	return nil
}

// checkLogin logs in as the login role to the new database.
func checkLogin(ctx context.Context, databaseURL string) error {
	c, err := connectURL(ctx, databaseURL)
	if err == nil {
		err = c.Ping(ctx)
		c.Close(context.WithoutCancel(ctx))
	}
	if err != nil {
		return fmt.Errorf("%w: the login role cannot log in to the new database with [provision]'s password (does it exist with another password, or without LOGIN?): %v", ErrLoginFailed, err)
	}
	return nil
}

// withUserDatabase is rawURL with its database replaced and, when user is
// not nil, its user info.
func withUserDatabase(rawURL string, user *url.Userinfo, database string) (string, error) {
	u, err := url.Parse(rawURL)
	if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		return "", errors.New("provision: [provision].owner_url is not a postgres:// URL")
	}
	if user != nil {
		u.User = user
	}
	u.Path = "/" + database
	u.RawPath = ""
	return u.String(), nil
}

// connectURL connects with a bounded connect timeout; the error never
// shows the URL (it may hold a password).
func connectURL(ctx context.Context, connURL string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(connURL)
	if err != nil {
		return nil, errors.New("invalid postgres URL")
	}
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 10 * time.Second
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to %s/%s as %s: %w", cfg.Host, cfg.Database, cfg.User, err)
	}
	return conn, nil
}

func ident(name string) string { return pgx.Identifier{name}.Sanitize() }

func hasCode(err error, codes ...string) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && slices.Contains(codes, pe.Code)
}

// CreateOwnerRole creates the role that owns one project's database and
// nothing else: LOGIN with a random password, no superuser, CREATEDB,
// CREATEROLE or REPLICATION, a member of no role (INHERIT only for the
// implicit pg_database_owner, which owns schema public; BYPASSRLS when conn is a
// superuser's, so that it sees every row of its own tables, as an owner
// does without FORCE ROW LEVEL SECURITY). Restoring an archive logged in as
// it keeps whatever SQL the archive holds inside that database. Its name is
// "<ref>_owner_<8 hex digits>".
func CreateOwnerRole(ctx context.Context, conn *pgx.Conn, ref string) (name, password string, err error) {
	suffix := "_owner_" + randomHex(4)
	if len(ref)+len(suffix) > 63 {
		ref = ref[:63-len(suffix)]
	}
	name = ref + suffix
	password = randomHex(24)
	var super bool
	if err := conn.QueryRow(ctx, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user").Scan(&super); err != nil {
		return "", "", fmt.Errorf("look up the provisioning role: %w", err)
	}
	var pw string
	if err := conn.QueryRow(ctx, "SELECT format('PASSWORD %L', $1::text)", password).Scan(&pw); err != nil {
		return "", "", fmt.Errorf("owner role: %w", err)
	}
	if _, err := conn.Exec(ctx, "SET password_encryption = 'scram-sha-256'"); err != nil {
		return "", "", fmt.Errorf("owner role: %w", err)
	}
	attrs := "LOGIN INHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION"
	if super {
		attrs += " BYPASSRLS"
	}
	if _, err := conn.Exec(ctx, "CREATE ROLE "+ident(name)+" "+attrs+" "+pw); err != nil {
		return "", "", fmt.Errorf("create owner role %s: %w", name, err)
	}
	return name, password, nil
}

// GrantDefaults gives the project roles, in the database at ownerDBURL,
// what Provision gives a new project: USAGE on schema public, and to
// service_role (when one of them) the default privileges on what the
// connected role creates in public.
func GrantDefaults(ctx context.Context, ownerDBURL string, roles []string) error {
	return grantInDatabase(ctx, ownerDBURL, roles)
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// LoginName is the login role of a project provisioned with
// LoginPerProject: <loginUser>_<database>, or, where that would pass
// PostgreSQL's 63-byte limit (and be cut, so that two projects could share
// it), a prefix of it and a hash of the whole.
func LoginName(loginUser, database string) string {
	name := loginUser + "_" + database
	if len(name) <= 63 {
		return name
	}
	sum := sha256.Sum256([]byte(name))
	return name[:46] + "_" + hex.EncodeToString(sum[:8])
}
