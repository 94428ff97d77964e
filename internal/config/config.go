// Package config loads and validates cascata.toml.
//
// One struct mirrors the file; Load decodes it with BurntSushi/toml, rejects
// unknown keys by their path, fills documented defaults and runs every check,
// returning all problems at once so that `cascata check` can print them.
package config

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
)

// Duration is a time.Duration written in the file as a Go duration string ("30s").
type Duration struct{ time.Duration }

// UnmarshalText parses a Go duration string.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("not a duration (e.g. \"30s\"): %q", string(b))
	}
	d.Duration = v
	return nil
}

// MarshalText writes the duration back as a Go duration string.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// Pool modes.
const (
	PoolModeTransaction = "transaction"
	PoolModeSession     = "session"
)

// Config is the whole of cascata.toml.
type Config struct {
	Proxy     Proxy     `toml:"proxy"`
	Admin     Admin     `toml:"admin"`
	State     State     `toml:"state"`
	Catalog   Catalog   `toml:"catalog"`
	Provision Provision `toml:"provision"`
	Projects  []Project `toml:"projects"`
}

// Proxy is the [proxy] table: the client-facing listener and the shared pools.
type Proxy struct {
	// Listen is the client address. Default "127.0.0.1:6432".
	Listen string `toml:"listen"`
	// PoolMode is the default pool mode of projects: "transaction" (default) or "session".
	PoolMode string `toml:"pool_mode"`
	// MaxClientConn caps client connections over all projects. Default 10000.
	MaxClientConn int `toml:"max_client_conn"`
	// MaxServerConnPerHost caps backend connections to one host:port over all projects. Default 90.
	MaxServerConnPerHost int `toml:"max_server_conn_per_host"`
	// ClientLoginTimeout bounds startup and authentication. Default 10s.
	ClientLoginTimeout Duration `toml:"client_login_timeout"`
	// QueryWaitTimeout bounds the wait for a backend; past it the client gets 53300. Default 30s.
	QueryWaitTimeout Duration `toml:"query_wait_timeout"`
	// ServerIdleTimeout closes idle backends and drops empty pools. Default 60s.
	ServerIdleTimeout Duration `toml:"server_idle_timeout"`
	// ServerConnectTimeout bounds dialing a backend. Default 5s.
	ServerConnectTimeout Duration `toml:"server_connect_timeout"`
	// ShutdownTimeout is how long SIGTERM waits for running transactions. Default 30s.
	ShutdownTimeout Duration `toml:"shutdown_timeout"`
	// MaxMessageBytes caps one protocol message from a client. Default 1 GiB (PostgreSQL's own limit).
	MaxMessageBytes int `toml:"max_message_bytes"`
	// MaxPreparedStatements bounds the statements kept prepared on one backend in transaction mode. Default 200.
	MaxPreparedStatements int `toml:"max_prepared_statements"`
	// TLSCertFile and TLSKeyFile enable client-side TLS (both or neither).
	TLSCertFile string `toml:"tls_cert_file"`
	TLSKeyFile  string `toml:"tls_key_file"`
	// AllowCleartextWithoutTLS says where a JWT may travel unencrypted: "never", "loopback" (default) or "always".
	AllowCleartextWithoutTLS string `toml:"allow_cleartext_without_tls"`
}

// Admin is the [admin] table: the HTTP plane.
type Admin struct {
	// Listen is the admin HTTP address. Default "127.0.0.1:8080"; "" disables the plane.
	Listen string `toml:"listen"`
	// TokenEnv names the environment variable that holds the bearer token. Default "CASCATA_ADMIN_TOKEN".
	TokenEnv string `toml:"token_env"`
	// CORSOrigins lists exact origins allowed to call the plane from a browser. Default none.
	CORSOrigins []string `toml:"cors_origins"`
	// EjectAllowedHosts, when not empty, lists the only hosts ("host" or
	// "host:port") that ejections and archive imports may write to; any
	// other target is refused (403) before a connection is made. Default none (any host).
	EjectAllowedHosts []string `toml:"eject_allowed_hosts"`
}

// State is the [state] table.
type State struct {
	// Dir holds run-time changes (ejections, imports). Default ".cascata/state".
	Dir string `toml:"dir"`
}

// Catalog is the [catalog] table.
type Catalog struct {
	// URL of a shared control database; "" keeps the catalog in [state].dir (one instance).
	URL string `toml:"url"`
	// InstanceTimeout: an instance whose heartbeat is older is left out of
	// fleet-wide pauses, cutovers and cap shares. Default 10s.
	InstanceTimeout Duration `toml:"instance_timeout"`
	// InstanceID names this instance in the fleet; default host name plus a
	// random suffix, new at each start.
	InstanceID string `toml:"instance_id"`
}

// Provision is the [provision] table: where new projects are created.
type Provision struct {
	OwnerURL         string `toml:"owner_url"`
	LoginUser        string `toml:"login_user"`
	LoginPassword    string `toml:"login_password"`
	LoginPasswordEnv string `toml:"login_password_env"`
	// LoginPerProject gives each new project a login role of its own,
	// <login_user>_<ref> with a random password, the only role besides the
	// owner that may connect to its database.
	LoginPerProject bool   `toml:"login_per_project"`
	StorageRoot     string `toml:"storage_root"`
	// StorageURL, "s3://bucket/prefix", gives imported projects their files
	// under <storage_url>/<ref> instead of storage_root (the store's
	// endpoint, region and credentials as the s3_* keys of a project).
	StorageURL     string `toml:"storage_url"`
	S3Endpoint     string `toml:"s3_endpoint"`
	S3Region       string `toml:"s3_region"`
	S3AccessKeyEnv string `toml:"s3_access_key_env"`
	S3SecretKeyEnv string `toml:"s3_secret_key_env"`
	// Extensions is the allowlist of extensions provisioning creates in an
	// imported project's database (the dump never creates one itself).
	// Empty: pgcrypto and the archive's extensions the server marks trusted.
	Extensions []string `toml:"extensions"`
}

// Project is one [[projects]] entry: a tenant.
type Project struct {
	// Ref is the tenant id, [a-z0-9_]{1,63}; clients use it as the database name.
	Ref string `toml:"ref"`
	// DatabaseURL is the write primary, as the proxy's login role.
	DatabaseURL string `toml:"database_url"`
	// OwnerURL has owner rights; defaults to [provision].owner_url with this project's database.
	OwnerURL string `toml:"owner_url"`
	// ReplicaURLs are read replicas (zero or more).
	ReplicaURLs []string `toml:"replica_urls"`
	// JWT keys: one of jwt_secret, jwt_secret_env, jwt_secret_file, jwks_file, jwks_url.
	JWTSecret     string `toml:"jwt_secret"`
	JWTSecretEnv  string `toml:"jwt_secret_env"`
	JWTSecretFile string `toml:"jwt_secret_file"`
	JWKSFile      string `toml:"jwks_file"`
	JWKSURL       string `toml:"jwks_url"`
	// JWTIssuer and JWTAudience are checked when set.
	JWTIssuer   string `toml:"jwt_issuer"`
	JWTAudience string `toml:"jwt_audience"`
	// JWTAllowNoExp accepts tokens without exp. Default false.
	JWTAllowNoExp bool `toml:"jwt_allow_no_exp"`
	// JWTLeeway is the clock skew allowed on exp/nbf/iat. Default 30s.
	JWTLeeway Duration `toml:"jwt_leeway"`
	// Roles a JWT may claim. Default ["anon", "authenticated", "service_role"].
	Roles []string `toml:"roles"`
	// RoleClaim is the claim (dotted path for nested claims) that holds the role. Default "role".
	RoleClaim string `toml:"role_claim"`
	// AnonRole is used when a token has no role claim; "" refuses such tokens.
	AnonRole string `toml:"anon_role"`
	// TrustedRoles may run DO blocks and CREATE FUNCTION. Default none.
	TrustedRoles []string `toml:"trusted_roles"`
	// RoleLogins gives roles their own login URL: backends of such clients
	// log in as the role (no SET ROLE into it, no membership needed), in
	// pools of their own, on the primary. Default none.
	RoleLogins map[string]string `toml:"role_logins"`
	// PoolMode overrides [proxy].pool_mode for this project.
	PoolMode string `toml:"pool_mode"`
	// PoolSize is the number of backend connections of this project per host. Default 20.
	PoolSize int `toml:"pool_size"`
	// MaxPinned bounds the backends clients of this project may keep in
	// transaction mode while they hold session state (temporary tables,
	// LISTEN, WITH HOLD cursors, session advisory locks). Default
	// pool_size/4, at least 1.
	MaxPinned int `toml:"max_pinned"`
	// MaxReplicaLag: a replica further behind is not used. Default 1s.
	MaxReplicaLag Duration `toml:"max_replica_lag"`
	// LegacyClaimGUCs also sets request.jwt.claim.<name> per top-level claim. Default false.
	LegacyClaimGUCs bool `toml:"legacy_claim_gucs"`
	// Consistency of reads: "read_your_writes" (default), "eventual" or "primary_only".
	Consistency string `toml:"consistency"`
	// ReadOnlyFunctions and WriteFunctions override what pg_proc says of the
	// project's functions for routing ("name" or "schema.name"). Default none.
	ReadOnlyFunctions []string `toml:"read_only_functions"`
	WriteFunctions    []string `toml:"write_functions"`
	// StorageDir holds the project's files. Default [provision].storage_root/<ref>
	// (none when StorageURL is set).
	StorageDir string `toml:"storage_dir"`
	// StorageURL, "s3://bucket/prefix", keeps the project's files in an
	// S3-compatible object store instead of StorageDir.
	StorageURL string `toml:"storage_url"`
	// S3Endpoint is the store's path-style endpoint ("http://127.0.0.1:9000"); "" = AWS.
	S3Endpoint string `toml:"s3_endpoint"`
	// S3Region is the bucket's region. Default "us-east-1".
	S3Region string `toml:"s3_region"`
	// S3AccessKeyEnv and S3SecretKeyEnv name the environment variables
	// holding the store's credentials.
	S3AccessKeyEnv string `toml:"s3_access_key_env"`
	S3SecretKeyEnv string `toml:"s3_secret_key_env"`
}

var refPattern = regexp.MustCompile(`^[a-z0-9_]{1,63}$`)

// Problem is one configuration error at a key path.
type Problem struct {
	Path    string
	Message string
}

func (p Problem) String() string { return p.Path + ": " + p.Message }

// Problems is every problem found in a configuration.
type Problems []Problem

func (ps Problems) Error() string {
	lines := make([]string, len(ps))
	for i, p := range ps {
		lines[i] = p.String()
	}
	return strings.Join(lines, "\n")
}

// Load reads, decodes and validates a configuration file. A validation failure
// returns Problems (use errors.As) listing every problem.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return Parse(data)
}

// Parse decodes and validates configuration text.
func Parse(data []byte) (*Config, error) {
	var c Config
	md, err := toml.Decode(string(data), &c)
	if err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			return nil, Problems{{Path: fmt.Sprintf("line %d", pe.Position.Line), Message: pe.Message}}
		}
		return nil, Problems{{Path: "(file)", Message: err.Error()}}
	}
	var ps Problems
	for _, k := range md.Undecoded() {
		ps = append(ps, Problem{Path: keyPath(k), Message: "unknown key"})
	}
	c.applyDefaults()
	ps = append(ps, c.validate()...)
	if len(ps) > 0 {
		return nil, ps
	}
	return &c, nil
}

// keyPath renders a toml key, turning array-of-table indexes into projects[N].
func keyPath(k toml.Key) string {
	return k.String()
}

func (c *Config) applyDefaults() {
	p := &c.Proxy
	setString(&p.Listen, "127.0.0.1:6432")
	setString(&p.PoolMode, PoolModeTransaction)
	setInt(&p.MaxClientConn, 10000)
	setInt(&p.MaxServerConnPerHost, 90)
	setDuration(&p.ClientLoginTimeout, 10*time.Second)
	setDuration(&p.QueryWaitTimeout, 30*time.Second)
	setDuration(&p.ServerIdleTimeout, 60*time.Second)
	setDuration(&p.ServerConnectTimeout, 5*time.Second)
	setDuration(&p.ShutdownTimeout, 30*time.Second)
	setInt(&p.MaxMessageBytes, 1<<30)
	setInt(&p.MaxPreparedStatements, 200)
	setString(&p.AllowCleartextWithoutTLS, "loopback")
	setString(&c.Admin.TokenEnv, "CASCATA_ADMIN_TOKEN")
	setString(&c.State.Dir, ".cascata/state")
	setDuration(&c.Catalog.InstanceTimeout, 10*time.Second)
	setString(&c.Provision.LoginUser, "authenticator")
	setString(&c.Provision.StorageRoot, ".cascata/storage")
	for i := range c.Projects {
		c.Projects[i].applyDefaults(c)
	}
}

func (pr *Project) applyDefaults(c *Config) {
	if len(pr.Roles) == 0 {
		pr.Roles = []string{"anon", "authenticated", "service_role"}
	}
	setString(&pr.RoleClaim, "role")
	setString(&pr.PoolMode, c.Proxy.PoolMode)
	setInt(&pr.PoolSize, 20)
	setInt(&pr.MaxPinned, max(1, pr.PoolSize/4))
	setDuration(&pr.MaxReplicaLag, time.Second)
	setString(&pr.Consistency, "read_your_writes")
	setDuration(&pr.JWTLeeway, 30*time.Second)
	if pr.StorageDir == "" && pr.StorageURL == "" && pr.Ref != "" {
		pr.StorageDir = c.Provision.StorageRoot + "/" + pr.Ref
	}
	if pr.StorageURL != "" {
		setString(&pr.S3Region, "us-east-1")
	}
	if pr.OwnerURL == "" && c.Provision.OwnerURL != "" && pr.DatabaseURL != "" {
		if u, err := url.Parse(c.Provision.OwnerURL); err == nil {
			if du, err := url.Parse(pr.DatabaseURL); err == nil {
				u.Path = du.Path
				pr.OwnerURL = u.String()
			}
		}
	}
}

func (c *Config) validate() Problems {
	var ps Problems
	add := func(path, format string, args ...any) {
		ps = append(ps, Problem{Path: path, Message: fmt.Sprintf(format, args...)})
	}
	p := c.Proxy
	if _, _, err := net.SplitHostPort(p.Listen); err != nil {
		add("proxy.listen", "not host:port: %q", p.Listen)
	}
	if p.PoolMode != PoolModeTransaction && p.PoolMode != PoolModeSession {
		add("proxy.pool_mode", "must be \"transaction\" or \"session\", not %q", p.PoolMode)
	}
	positive := map[string]int{
		"proxy.max_client_conn":          p.MaxClientConn,
		"proxy.max_server_conn_per_host": p.MaxServerConnPerHost,
		"proxy.max_message_bytes":        p.MaxMessageBytes,
		"proxy.max_prepared_statements":  p.MaxPreparedStatements,
	}
	for _, k := range sortedKeys(positive) {
		if positive[k] <= 0 {
			add(k, "must be positive")
		}
	}
	durations := map[string]Duration{
		"proxy.client_login_timeout":   p.ClientLoginTimeout,
		"proxy.query_wait_timeout":     p.QueryWaitTimeout,
		"proxy.server_idle_timeout":    p.ServerIdleTimeout,
		"proxy.server_connect_timeout": p.ServerConnectTimeout,
		"proxy.shutdown_timeout":       p.ShutdownTimeout,
		"catalog.instance_timeout":     c.Catalog.InstanceTimeout,
	}
	for _, k := range sortedKeys(durations) {
		if durations[k].Duration <= 0 {
			add(k, "must be a positive duration")
		}
	}
	if (p.TLSCertFile == "") != (p.TLSKeyFile == "") {
		add("proxy.tls_cert_file", "tls_cert_file and tls_key_file go together")
	}
	for _, f := range []struct{ key, path string }{{"proxy.tls_cert_file", p.TLSCertFile}, {"proxy.tls_key_file", p.TLSKeyFile}} {
		if f.path != "" {
			if _, err := os.Stat(f.path); err != nil {
				add(f.key, "cannot read: %v", err)
			}
		}
	}
	switch p.AllowCleartextWithoutTLS {
	case "never", "loopback", "always":
	default:
		add("proxy.allow_cleartext_without_tls", "must be \"never\", \"loopback\" or \"always\", not %q", p.AllowCleartextWithoutTLS)
	}
	if c.Admin.Listen != "" {
		if _, _, err := net.SplitHostPort(c.Admin.Listen); err != nil {
			add("admin.listen", "not host:port: %q", c.Admin.Listen)
		}
	}
	for i, o := range c.Admin.CORSOrigins {
		if o == "*" || !strings.Contains(o, "://") {
			add(fmt.Sprintf("admin.cors_origins[%d]", i), "must be an exact origin like https://app.example.com, not %q", o)
		}
	}
	for i, h := range c.Admin.EjectAllowedHosts {
		if h == "" || strings.ContainsAny(h, "/@ ") {
			add(fmt.Sprintf("admin.eject_allowed_hosts[%d]", i), "must be a host name or host:port, not %q", h)
		}
	}
	for i, e := range c.Provision.Extensions {
		if e == "" || len(e) > 63 {
			add(fmt.Sprintf("provision.extensions[%d]", i), "must be an extension name of 1 to 63 bytes")
		}
	}
	if c.Catalog.URL != "" {
		if err := checkPostgresURL(c.Catalog.URL); err != nil {
			add("catalog.url", "%v", err)
		}
	}
	if id := c.Catalog.InstanceID; id != "" && (len(id) > 63 || strings.ContainsAny(id, " \t\n/")) {
		add("catalog.instance_id", "must be 1 to 63 characters without spaces or slashes")
	}
	if c.Provision.OwnerURL != "" {
		if err := checkPostgresURL(c.Provision.OwnerURL); err != nil {
			add("provision.owner_url", "%v", err)
		}
	}
	seen := map[string]int{}
	for i := range c.Projects {
		pr := &c.Projects[i]
		base := fmt.Sprintf("projects[%d]", i)
		if pr.Ref != "" {
			base = fmt.Sprintf("projects[%d] (%s)", i, pr.Ref)
		}
		for _, pb := range pr.Validate() {
			add(base+"."+pb.Path, "%s", pb.Message)
		}
		if j, dup := seen[pr.Ref]; dup && pr.Ref != "" {
			add(base+".ref", "duplicate of projects[%d]", j)
		}
		seen[pr.Ref] = i
	}
	return ps
}

// Validate checks one project on its own; paths are relative to the project.
func (pr *Project) Validate() Problems {
	var ps Problems
	add := func(path, format string, args ...any) {
		ps = append(ps, Problem{Path: path, Message: fmt.Sprintf(format, args...)})
	}
	if !refPattern.MatchString(pr.Ref) {
		add("ref", "must match [a-z0-9_]{1,63}, not %q", pr.Ref)
	}
	if pr.DatabaseURL == "" {
		add("database_url", "required")
	} else if err := checkPostgresURL(pr.DatabaseURL); err != nil {
		add("database_url", "%v", err)
	}
	if pr.OwnerURL != "" {
		if err := checkPostgresURL(pr.OwnerURL); err != nil {
			add("owner_url", "%v", err)
		}
	}
	for i, r := range pr.ReplicaURLs {
		if err := checkPostgresURL(r); err != nil {
			add(fmt.Sprintf("replica_urls[%d]", i), "%v", err)
		}
	}
	keys := 0
	for _, s := range []string{pr.JWTSecret, pr.JWTSecretEnv, pr.JWTSecretFile, pr.JWKSFile, pr.JWKSURL} {
		if s != "" {
			keys++
		}
	}
	if keys == 0 {
		add("jwt_secret_env", "one of jwt_secret, jwt_secret_env, jwt_secret_file, jwks_file, jwks_url is required")
	}
	if pr.JWTSecretEnv != "" && os.Getenv(pr.JWTSecretEnv) == "" {
		add("jwt_secret_env", "environment variable %s is empty or unset", pr.JWTSecretEnv)
	}
	if pr.JWTSecretFile != "" {
		if _, err := os.Stat(pr.JWTSecretFile); err != nil {
			add("jwt_secret_file", "cannot read: %v", err)
		}
	}
	if pr.JWKSFile != "" {
		if _, err := os.Stat(pr.JWKSFile); err != nil {
			add("jwks_file", "cannot read: %v", err)
		}
	}
	if pr.JWKSURL != "" {
		if u, err := url.Parse(pr.JWKSURL); err != nil || (u.Scheme != "https" && u.Scheme != "http") {
			add("jwks_url", "must be an http(s) URL")
		}
	}
	for i, r := range pr.Roles {
		if r == "" || len(r) > 63 {
			add(fmt.Sprintf("roles[%d]", i), "must be a role name of 1 to 63 bytes")
		}
	}
	if pr.AnonRole != "" && !slices.Contains(pr.Roles, pr.AnonRole) {
		add("anon_role", "%q is not in roles", pr.AnonRole)
	}
	for role, u := range pr.RoleLogins {
		if !slices.Contains(pr.Roles, role) {
			add("role_logins."+role, "%q is not in roles", role)
		}
		if err := checkPostgresURL(u); err != nil {
			add("role_logins."+role, "%v", err)
		}
	}
	for i, r := range pr.TrustedRoles {
		if !slices.Contains(pr.Roles, r) {
			add(fmt.Sprintf("trusted_roles[%d]", i), "%q is not in roles", r)
		}
	}
	if pr.PoolMode != PoolModeTransaction && pr.PoolMode != PoolModeSession {
		add("pool_mode", "must be \"transaction\" or \"session\", not %q", pr.PoolMode)
	}
	if pr.PoolSize <= 0 {
		add("pool_size", "must be positive")
	}
	if pr.MaxPinned < 0 || pr.MaxPinned > pr.PoolSize {
		add("max_pinned", "must be between 1 and pool_size (%d), not %d", pr.PoolSize, pr.MaxPinned)
	}
	switch pr.Consistency {
	case "read_your_writes", "eventual", "primary_only":
	default:
		add("consistency", "must be \"read_your_writes\", \"eventual\" or \"primary_only\", not %q", pr.Consistency)
	}
	if pr.MaxReplicaLag.Duration <= 0 {
		add("max_replica_lag", "must be a positive duration")
	}
	if pr.JWTLeeway.Duration < 0 {
		add("jwt_leeway", "must not be negative")
	}
	if pr.StorageURL != "" {
		if u, err := url.Parse(pr.StorageURL); err != nil || u.Scheme != "s3" || u.Host == "" {
			add("storage_url", "must be s3://bucket/prefix")
		}
		if pr.StorageDir != "" {
			add("storage_dir", "storage_dir and storage_url exclude each other")
		}
		if pr.S3Endpoint != "" {
			if u, err := url.Parse(pr.S3Endpoint); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
				add("s3_endpoint", "must be an http(s):// URL")
			}
		}
		for _, e := range []struct{ key, env string }{{"s3_access_key_env", pr.S3AccessKeyEnv}, {"s3_secret_key_env", pr.S3SecretKeyEnv}} {
			if e.env != "" && os.Getenv(e.env) == "" {
				add(e.key, "environment variable %s is empty or unset", e.env)
			}
		}
	}
	return ps
}

// checkPostgresURL accepts postgres:// and postgresql:// URLs with a host and a user.
func checkPostgresURL(s string) error {
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("not a URL: %s", redactURLError(err))
	}
	if u.Scheme != "postgres" && u.Scheme != "postgresql" {
		return fmt.Errorf("must start with postgres://")
	}
	if u.Host == "" {
		return fmt.Errorf("needs a host")
	}
	if u.User == nil || u.User.Username() == "" {
		return fmt.Errorf("needs a user name")
	}
	return nil
}

// redactURLError drops the URL text (it may hold a password) from a parse error.
func redactURLError(err error) string {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err.Error()
	}
	return "invalid"
}

// RedactURL returns the URL with its password replaced, for logs, the admin
// plane and archives; "" stays "".
func RedactURL(s string) string {
	if s == "" {
		return ""
	}
	u, err := url.Parse(s)
	if err != nil {
		return "(invalid url)"
	}
	if _, has := u.User.Password(); has {
		u.User = url.UserPassword(u.User.Username(), "xxxxx")
	}
	return u.String()
}

// ProjectByRef returns the project with that ref, or nil.
func (c *Config) ProjectByRef(ref string) *Project {
	for i := range c.Projects {
		if c.Projects[i].Ref == ref {
			return &c.Projects[i]
		}
	}
	return nil
}

// JWTSecrets resolves the project's HMAC secret from jwt_secret, jwt_secret_env or jwt_secret_file.
// It returns nil when the project uses only a JWKS.
func (pr *Project) JWTSecrets() ([][]byte, error) {
	var out [][]byte
	if pr.JWTSecret != "" {
		out = append(out, []byte(pr.JWTSecret))
	}
	if pr.JWTSecretEnv != "" {
		v := os.Getenv(pr.JWTSecretEnv)
		if v == "" {
			return nil, fmt.Errorf("project %s: environment variable %s is empty", pr.Ref, pr.JWTSecretEnv)
		}
		out = append(out, []byte(v))
	}
	if pr.JWTSecretFile != "" {
		b, err := os.ReadFile(pr.JWTSecretFile)
		if err != nil {
			return nil, fmt.Errorf("project %s: read jwt_secret_file: %w", pr.Ref, err)
		}
		out = append(out, []byte(strings.TrimRight(string(b), "\r\n")))
	}
	return out, nil
}

// AdminToken resolves the admin bearer token from token_env.
func (a Admin) AdminToken() string { return os.Getenv(a.TokenEnv) }

func setString(p *string, v string) {
	if *p == "" {
		*p = v
	}
}

func setInt(p *int, v int) {
	if *p == 0 {
		*p = v
	}
}

func setDuration(p *Duration, v time.Duration) {
	if p.Duration == 0 {
		p.Duration = v
	}
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
