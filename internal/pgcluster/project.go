package pgcluster

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// ProjectSpec describes the roles and database of a cascata project.
type ProjectSpec struct {
	// Database is the project database; "" means "postgres".
	Database string
	// LoginUser is the login role clients authenticate as; "" means
	// "authenticator". It is created LOGIN NOINHERIT.
	LoginUser string
	// LoginPassword is LoginUser's password, stored as a SCRAM verifier.
	// It is required.
	LoginPassword string
	// Roles are the NOLOGIN roles LoginUser may SET ROLE to; nil means
	// anon, authenticated and service_role.
	Roles []string
	// BypassRLSRoles lists the members of Roles given BYPASSRLS; nil means
	// service_role.
	BypassRLSRoles []string
}

// DefaultRoles are the NOLOGIN roles a ProjectSpec gets when Roles is nil.
func DefaultRoles() []string { return []string{"anon", "authenticated", "service_role"} }

// SQLSTATEs tolerated while creating objects that may already exist.
const (
	codeDuplicateObject   = "42710" // role exists
	codeDuplicateDatabase = "42P04"
	codeUniqueViolation   = "23505" // concurrent creation of the same object
	codeObjectInUse       = "55006" // template1 busy during CREATE DATABASE
)

// SetupProject idempotently creates, in the cluster of owner, the roles of
// spec (NOLOGIN roles, the BYPASSRLS ones among them, and the LOGIN
// NOINHERIT login role with a SCRAM password, member of every role), the
// database (owned by postgres) and, inside it, the pgcrypto extension and
// USAGE on schema public for the roles. Running it again updates the
// password and attributes and succeeds.
func SetupProject(ctx context.Context, owner *Server, spec ProjectSpec) error {
	if spec.Database == "" {
		spec.Database = "postgres"
	}
	if spec.LoginUser == "" {
		spec.LoginUser = "authenticator"
	}
	if spec.Roles == nil {
		spec.Roles = DefaultRoles()
	}
	if spec.BypassRLSRoles == nil {
		spec.BypassRLSRoles = []string{"service_role"}
	}
	if spec.LoginPassword == "" {
		return errors.New("setup project: login password is required")
	}

	conn, err := connect(ctx, owner.SuperuserURL("postgres"))
	if err != nil {
		return fmt.Errorf("setup project: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))

	for _, role := range spec.Roles {
		attrs := "NOLOGIN NOBYPASSRLS"
		if slices.Contains(spec.BypassRLSRoles, role) {
			attrs = "NOLOGIN BYPASSRLS"
		}
		if err := ensureRole(ctx, conn, role, attrs); err != nil {
			return fmt.Errorf("setup project: %w", err)
		}
	}
	if err := ensureRole(ctx, conn, spec.LoginUser, "LOGIN NOINHERIT"); err != nil {
		return fmt.Errorf("setup project: %w", err)
	}
	// format() quotes the password literal on the server side.
	var alter string
	if err := conn.QueryRow(ctx, "SELECT format('ALTER ROLE %I PASSWORD %L', $1::text, $2::text)",
		spec.LoginUser, spec.LoginPassword).Scan(&alter); err != nil {
		return fmt.Errorf("setup project: password statement: %w", err)
	}
	if _, err := conn.Exec(ctx, "SET password_encryption = 'scram-sha-256'"); err != nil {
		return fmt.Errorf("setup project: %w", err)
	}
	if _, err := conn.Exec(ctx, alter); err != nil {
		return fmt.Errorf("setup project: set password of %s: %w", spec.LoginUser, err)
	}
	login := ident(spec.LoginUser)
	for _, role := range spec.Roles {
		if _, err := conn.Exec(ctx, "GRANT "+ident(role)+" TO "+login); err != nil {
			return fmt.Errorf("setup project: grant %s: %w", role, err)
		}
	}

	if err := ensureDatabase(ctx, conn, spec.Database); err != nil {
		return fmt.Errorf("setup project: %w", err)
	}
	db, err := connect(ctx, owner.SuperuserURL(spec.Database))
	if err != nil {
		return fmt.Errorf("setup project: %w", err)
	}
	defer db.Close(context.WithoutCancel(ctx))
	if _, err := db.Exec(ctx, "CREATE EXTENSION IF NOT EXISTS pgcrypto"); err != nil && !hasCode(err, codeUniqueViolation, codeDuplicateObject) {
		return fmt.Errorf("setup project: create pgcrypto: %w", err)
	}
	grantees := make([]string, len(spec.Roles))
	for i, role := range spec.Roles {
		grantees[i] = ident(role)
	}
	if len(grantees) > 0 {
		if _, err := db.Exec(ctx, "GRANT USAGE ON SCHEMA public TO "+strings.Join(grantees, ", ")); err != nil {
			return fmt.Errorf("setup project: grant schema usage: %w", err)
		}
	}
	return nil
}

// ensureRole creates role if missing, then applies attrs.
func ensureRole(ctx context.Context, conn *pgx.Conn, role, attrs string) error {
	var exists bool
	if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)", role).Scan(&exists); err != nil {
		return fmt.Errorf("look up role %s: %w", role, err)
	}
	if !exists {
		if _, err := conn.Exec(ctx, "CREATE ROLE "+ident(role)+" "+attrs); err != nil && !hasCode(err, codeDuplicateObject, codeUniqueViolation) {
			return fmt.Errorf("create role %s: %w", role, err)
		}
	}
	if _, err := conn.Exec(ctx, "ALTER ROLE "+ident(role)+" "+attrs); err != nil {
		return fmt.Errorf("alter role %s: %w", role, err)
	}
	return nil
}

// ensureDatabase creates database db owned by postgres if it is missing,
// retrying while template1 is busy with a concurrent CREATE DATABASE.
func ensureDatabase(ctx context.Context, conn *pgx.Conn, db string) error {
	for {
		var exists bool
		if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)", db).Scan(&exists); err != nil {
			return fmt.Errorf("look up database %s: %w", db, err)
		}
		if exists {
			return nil
		}
		_, err := conn.Exec(ctx, "CREATE DATABASE "+ident(db)+" OWNER postgres")
		switch {
		case err == nil, hasCode(err, codeDuplicateDatabase, codeUniqueViolation):
			return nil
		case !hasCode(err, codeObjectInUse):
			return fmt.Errorf("create database %s: %w", db, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("create database %s: %w", db, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func ident(name string) string { return pgx.Identifier{name}.Sanitize() }

func hasCode(err error, codes ...string) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && slices.Contains(codes, pgErr.Code)
}
