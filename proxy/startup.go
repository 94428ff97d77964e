package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"time"

	"cascata/auth"
	"cascata/internal/sockio"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
)

// Startup packet codes (the first int32 after the length).
const (
	codeSSLRequest    = 80877103
	codeGSSENCRequest = 80877104
	codeCancelRequest = 80877102
	maxStartupPacket  = 10000 // MAX_STARTUP_PACKET_LENGTH in PostgreSQL
)

// startup is what a client said in its startup packet.
type startup struct {
	user, database string
	params         map[string]string
	minorAsked     uint32
	unknownOpts    []string
}

// handle runs one client connection from its first byte to its close, or
// until its session parks (session.run): the session then owns what the
// accepted client holds (clientGone) and releases it when it ends.
func (s *Server) handle(c net.Conn) {
	c = sockio.New(c) // raw socket calls, under TLS too
	n := s.clients.Add(1)
	parked := false
	defer func() {
		s.logPanic(recover(), "remote", c.RemoteAddr().String())
		if !parked {
			s.clientGone(c)
		}
	}()
	if n > int64(s.opts.MaxClientConn) {
		s.metrics.login("too_many_clients")
		_ = c.SetDeadline(time.Now().Add(s.opts.ClientLoginTimeout))
		// Read the startup packet so that the client sees the error rather than a reset.
		if _, st, err := s.readStartup(c, nil); err == nil && st != nil {
			s.sendFatal(c, fatalError(CodeTooManyConnections, "too many client connections (max_client_conn = %d)", s.opts.MaxClientConn))
		}
		return
	}
	deadline := time.Now().Add(s.opts.ClientLoginTimeout)
	_ = c.SetDeadline(deadline)

	conn, st, err := s.readStartup(c, s.opts.TLS)
	if err != nil {
		s.log.Debug("startup failed", "remote", c.RemoteAddr().String(), "error", err)
		var pe *Error
		if errors.As(err, &pe) {
			s.sendFatal(conn, pe)
		}
		return
	}
	if st == nil {
		return // cancel request, handled
	}
	ss, err := s.login(conn, st)
	if err != nil {
		s.metrics.login(loginResult(err))
		s.log.Debug("login refused", "remote", c.RemoteAddr().String(), "user", st.user, "database", st.database, "error", err)
		s.sendFatal(conn, err)
		return
	}
	s.metrics.login("ok")
	_ = conn.SetDeadline(time.Time{})
	parked = ss.run()
}

// clientGone releases what an accepted client holds: its connection, its
// count in clients and its entry in wg. The accepting goroutine calls it,
// or, once the session has parked, the goroutine that ends the session.
func (s *Server) clientGone(c net.Conn) {
	_ = c.Close()
	s.clients.Add(-1)
	s.wg.Done()
}

// logPanic logs what a client's goroutine recovered, if anything.
func (s *Server) logPanic(r any, attrs ...any) {
	if r != nil {
		s.log.Error("client handler panic", append([]any{"panic", r}, attrs...)...)
	}
}

// readStartup reads startup packets until a StartupMessage (negotiating TLS on
// the way) or a CancelRequest. It returns the connection to use from then on
// (TLS-wrapped or not) and nil startup for a cancel request.
func (s *Server) readStartup(c net.Conn, tlsConf *tls.Config) (net.Conn, *startup, error) {
	encrypted := false
	for {
		var hdr [8]byte
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return c, nil, fmt.Errorf("read startup packet: %w", err)
		}
		n := int(int32(binary.BigEndian.Uint32(hdr[:4])))
		code := binary.BigEndian.Uint32(hdr[4:])
		if n < 8 || n > maxStartupPacket {
			return c, nil, fatalError(CodeProtocolViolation, "invalid startup packet length %d", n)
		}
		body := make([]byte, n-4)
		copy(body, hdr[4:])
		if _, err := io.ReadFull(c, body[4:]); err != nil {
			return c, nil, fmt.Errorf("read startup packet: %w", err)
		}
		switch {
		case code == codeSSLRequest:
			if encrypted || n != 8 {
				return c, nil, fatalError(CodeProtocolViolation, "unexpected SSL request")
			}
			if tlsConf == nil {
				if _, err := c.Write([]byte{encryptionNo}); err != nil {
					return c, nil, err
				}
				continue
			}
			if _, err := c.Write([]byte{encryptionYes}); err != nil {
				return c, nil, err
			}
			tc := tls.Server(c, tlsConf)
			if err := tc.Handshake(); err != nil {
				return c, nil, fmt.Errorf("tls handshake: %w", err)
			}
			c, encrypted = tc, true
		case code == codeGSSENCRequest:
			if _, err := c.Write([]byte{encryptionNo}); err != nil {
				return c, nil, err
			}
		case code == codeCancelRequest:
			var cr pgproto3.CancelRequest
			if err := cr.Decode(body); err != nil {
				return c, nil, fmt.Errorf("decode cancel request: %w", err)
			}
			s.cancelRequest(cr.ProcessID, cr.SecretKey)
			return c, nil, nil
		case code>>16 == 3:
			st := &startup{minorAsked: code & 0xffff}
			// Decode as 3.0: a newer minor version is negotiated down below.
			binary.BigEndian.PutUint32(body[:4], pgproto3.ProtocolVersion30)
			var sm pgproto3.StartupMessage
			if err := sm.Decode(body); err != nil {
				return c, nil, fatalError(CodeProtocolViolation, "invalid startup packet: %v", err)
			}
			st.params = map[string]string{}
			for k, v := range sm.Parameters {
				switch {
				case k == "user":
					st.user = v
				case k == "database":
					st.database = v
				case strings.HasPrefix(k, "_pq_."):
					st.unknownOpts = append(st.unknownOpts, k)
				default:
					st.params[k] = v
				}
			}
			if st.user == "" {
				return c, nil, fatalError(CodeInvalidAuthSpec, "no PostgreSQL user name specified in startup packet")
			}
			if st.database == "" {
				st.database = st.user
			}
			if st.params["replication"] != "" && st.params["replication"] != "false" && st.params["replication"] != "off" {
				return c, nil, fatalError(CodeFeatureNotSupported, "replication connections are not supported through cascata")
			}
			return c, st, nil
		default:
			return c, nil, fatalError(CodeFeatureNotSupported, "unsupported frontend protocol %d.%d: cascata supports protocol 3.0", code>>16, code&0xffff)
		}
	}
}

// sendFatal writes one ErrorResponse and flushes; used before closing.
func (s *Server) sendFatal(c net.Conn, err error) {
	buf, e := toErrorResponse(err, true).Encode(nil)
	if e != nil {
		return
	}
	_ = c.SetWriteDeadline(time.Now().Add(time.Second))
	_, _ = c.Write(buf)
}

// splitUser finds project and role: database name is the ref, or the user
// name is "role.ref" (for tools that cannot pick a database name).
func splitUser(user, database string) (role, ref string, err error) {
	if i := strings.LastIndexByte(user, '.'); i > 0 && i < len(user)-1 {
		role, ref = user[:i], user[i+1:]
		if database != user && database != ref && database != "postgres" {
			return "", "", fatalError(CodeInvalidAuthSpec, "user name %q names project %q but the database name is %q", user, ref, database)
		}
		return role, ref, nil
	}
	return user, database, nil
}

// login authenticates the client and sends the rest of the startup reply.
func (s *Server) login(c net.Conn, st *startup) (*session, error) {
	if s.opts.Cleartext != "always" {
		_, encrypted := c.(*tls.Conn)
		if !encrypted && (s.opts.Cleartext == "never" || !isLoopback(c.RemoteAddr())) {
			return nil, &Error{Code: CodeInvalidAuthSpec, Fatal: true,
				Message: "cleartext password (JWT) refused on an unencrypted connection: connect with TLS (sslmode=require)",
				Hint:    "connect with TLS (sslmode=require)"}
		}
	}
	role, ref, err := splitUser(st.user, st.database)
	if err != nil {
		return nil, err
	}
	bw := bufio.NewWriterSize(c, 1024)
	if st.minorAsked > 0 || len(st.unknownOpts) > 0 {
		if _, err := encodeTo(bw, &pgproto3.NegotiateProtocolVersion{NewestMinorProtocol: 0, UnrecognizedOptions: st.unknownOpts}, nil); err != nil {
			return nil, err
		}
	}
	if _, err := encodeTo(bw, &pgproto3.AuthenticationCleartextPassword{}, nil); err != nil {
		return nil, err
	}
	if err := bw.Flush(); err != nil {
		return nil, fmt.Errorf("ask for password: %w", err)
	}
	r := s.readers.get() // the session's reader, given back while it idles
	r.Reset(c)
	rd := &msgReader{r: r, maxBody: maxPasswordMessage, taken: true}
	typ, _, err := rd.next()
	if err != nil {
		var tooLarge *errMessageTooLarge
		if errors.As(err, &tooLarge) {
			return nil, passwordTooLong(rd, tooLarge)
		}
		return nil, fmt.Errorf("read password: %w", err)
	}
	if typ != msgTypePassword {
		return nil, fatalError(CodeProtocolViolation, "expected password message, got %q", typ)
	}
	body, err := rd.body()
	if err != nil {
		return nil, fmt.Errorf("read password: %w", err)
	}
	password, _, ok := cstring(body)
	if !ok {
		return nil, fatalError(CodeProtocolViolation, "invalid password message")
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.opts.ClientLoginTimeout)
	defer cancel()
	id, err := s.opts.Auth.Verify(ctx, ref, role, password)
	if err != nil {
		return nil, loginError(err)
	}
	proj := s.project(ref)
	if proj == nil {
		return nil, fatalError(CodeInvalidCatalog, "project %q does not exist", ref)
	}
	// The client counts for its project from here, so that a backend
	// dialled for its login is not closed as one nobody uses (evictIdle);
	// the session gives the count back when it ends (serve).
	proj.run.clients.Add(1)
	refused := func(err error) (*session, error) {
		proj.run.clients.Add(-1)
		return nil, err
	}
	if err := s.checkStartupSettings(ctx, proj, ref, st.params); err != nil {
		return refused(err)
	}
	ss := newSession(s, c, rd, proj, ref, id, st.params)
	if err := s.register(ss); err != nil {
		return refused(err)
	}
	if err := ss.greet(ctx); err != nil {
		s.unregister(ss)
		return refused(err)
	}
	return ss, nil
}

// maxPasswordMessage bounds the password message: a JWT is refused over
// 8 KiB anyway (auth.DefaultMaxTokenBytes), so twice that is plenty.
const maxPasswordMessage = 16 * 1024

// maxPasswordDrain bounds what is read and dropped of a password message
// that is too long, so that the client reads the error instead of a
// connection reset (closing a socket with unread data resets it).
const maxPasswordDrain = 1 << 20

// passwordTooLong is the error for a password message over
// maxPasswordMessage, after dropping its body when that is not too much.
func passwordTooLong(rd *msgReader, e *errMessageTooLarge) error {
	if e.n <= maxPasswordDrain {
		_, _ = rd.r.Discard(5 + e.n) // the header was only peeked
	}
	return &Error{Code: CodeProtocolViolation, Fatal: true, Reason: "bad_token",
		Message: fmt.Sprintf("password message of %d bytes is too long (at most %d)", e.n, maxPasswordMessage),
		Hint:    "The password must be a JWT signed for the project.", Err: e}
}

// checkStartupSettings refuses the login, as PostgreSQL would, when a
// startup parameter (or an options -c pair) names no setting of the
// project's server, or one no client can set at connection start. Each
// unit puts a client's settings in force on a shared backend; a name the
// server refuses would otherwise fail every statement of the session.
func (s *Server) checkStartupSettings(ctx context.Context, proj *project, ref string, params map[string]string) error {
	want := startupSettings(params)
	if len(want) == 0 {
		return nil
	}
	names := make([]string, 0, len(want))
	for name := range want {
		names = append(names, name)
	}
	slices.Sort(names) // the same error for the same packet
	var known map[string]string
	for _, name := range names {
		if strings.Contains(name, ".") {
			// A custom setting: PostgreSQL makes a placeholder for any valid name.
			if !validCustomSettingName(name) {
				return &Error{Code: CodeInvalidName, Fatal: true, Reason: "bad_parameter",
					Message: fmt.Sprintf("invalid configuration parameter name %q", name),
					Detail:  "Custom parameter names must be two or more simple identifiers separated by dots."}
			}
			continue
		}
		if known == nil {
			var err error
			if known, err = s.serverSettings(ctx, proj, ref); err != nil {
				return err
			}
		}
		if err := startupSettingAllowed(name, known); err != nil {
			return err
		}
	}
	return nil
}

// CodeInvalidName and the others below are PostgreSQL's answers to
// startup parameters it refuses.
const (
	CodeInvalidName           = "42602"
	CodeUndefinedObject       = "42704"
	CodeCantChangeRuntimeParm = "55P02"
)

// hiddenSetting returns the context of a setting pg_settings does not list
// (GUC_NO_SHOW_ALL) or of an old name PostgreSQL maps to a current one.
// Settings hidden from the login role because they are superuser-only are
// not here: PostgreSQL refuses them at a non-superuser's login (42501 or
// 55P02), cascata as unrecognized (42704).
func hiddenSetting(name string) (context string, ok bool) {
	switch name {
	case "role", "session_authorization", "default_with_oids", "ssl_renegotiation_limit",
		"sort_mem", "vacuum_mem": // work_mem, maintenance_work_mem
		return "user", true
	case "is_superuser":
		return "internal", true
	}
	return "", false
}

// startupSettingAllowed mirrors what PostgreSQL does with a startup
// setting of a non-superuser, given the server's settings and contexts.
func startupSettingAllowed(name string, known map[string]string) error {
	sctx, ok := known[name]
	if !ok {
		sctx, ok = hiddenSetting(name)
	}
	refuse := func(code, format string) error {
		return &Error{Code: code, Fatal: true, Reason: "bad_parameter", Message: fmt.Sprintf(format, name)}
	}
	switch {
	case !ok:
		return refuse(CodeUndefinedObject, "unrecognized configuration parameter %q")
	case sctx == "internal":
		return refuse(CodeCantChangeRuntimeParm, "parameter %q cannot be changed")
	case sctx == "postmaster":
		return refuse(CodeCantChangeRuntimeParm, "parameter %q cannot be changed without restarting the server")
	case sctx == "sighup":
		return refuse(CodeCantChangeRuntimeParm, "parameter %q cannot be changed now")
	case sctx == "superuser-backend":
		return refuse(CodeInsufficientPrivs, "permission denied to set parameter %q")
	case sctx == "backend":
		// PostgreSQL takes it at connection start only; cascata's server
		// connections are shared and opened before the client came.
		e := refuse(CodeFeatureNotSupported, "parameter %q can only be set when a server connection starts, and cascata shares server connections").(*Error)
		e.Hint = "Set it in the project's database_url instead."
		return e
	}
	return nil
}

// validCustomSettingName is PostgreSQL's valid_custom_variable_name: two or
// more simple identifiers separated by dots.
func validCustomSettingName(name string) bool {
	sawSep, nameStart := false, true
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c == '.':
			if nameStart {
				return false
			}
			sawSep, nameStart = true, true
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c == '_', c >= 0x80:
			nameStart = false
		case !nameStart && (c >= '0' && c <= '9' || c == '$'):
		default:
			return false
		}
	}
	return !nameStart && sawSep
}

// serverSettings returns the settings of the project's primary that the
// login role sees in pg_settings (lower-case name to context), loaded
// once per pool over a connection of its own.
func (s *Server) serverSettings(ctx context.Context, proj *project, ref string) (map[string]string, error) {
	pl, err := s.pools.get(proj, proj.cfg.DatabaseURL, proj.primary)
	if err != nil {
		return nil, err
	}
	if m := pl.settings.Load(); m != nil {
		return *m, nil
	}
	pl.settingsMu.Lock()
	defer pl.settingsMu.Unlock()
	if m := pl.settings.Load(); m != nil {
		return *m, nil
	}
	m, err := loadSettings(ctx, proj.primary)
	if err != nil {
		return nil, &Error{Code: CodeConnectionFailure, Fatal: true, Message: "could not connect to the project's database", Err: err}
	}
	pl.settings.Store(&m)
	return m, nil
}

func loadSettings(ctx context.Context, cfg *pgconn.Config) (map[string]string, error) {
	c, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to read pg_settings: %w", err)
	}
	defer func() { _ = c.Close(context.Background()) }()
	res := c.ExecParams(ctx, "SELECT lower(name), context FROM pg_catalog.pg_settings", nil, nil, nil, nil).Read()
	if res.Err != nil {
		return nil, fmt.Errorf("read pg_settings: %w", res.Err)
	}
	m := make(map[string]string, len(res.Rows))
	for _, row := range res.Rows {
		if len(row) == 2 {
			m[string(row[0])] = string(row[1])
		}
	}
	if len(m) == 0 {
		return nil, errors.New("pg_settings is empty")
	}
	return m, nil
}

func isLoopback(a net.Addr) bool {
	switch v := a.(type) {
	case *net.TCPAddr:
		return v.IP.IsLoopback()
	case *net.UnixAddr:
		return true
	}
	return false
}

// loginError is what a client whose password was refused is told: the
// verifier's SQLSTATE and words, or 28P01.
func loginError(err error) error {
	var ae *auth.Error
	if errors.As(err, &ae) {
		return &Error{Code: ae.SQLState, Message: ae.Message, Fatal: true, Err: err, Reason: ae.Reason.String()}
	}
	var ss sqlStater
	if !errors.As(err, &ss) {
		return &Error{Code: CodeInvalidPassword, Message: "password authentication failed", Err: err}
	}
	return err
}

func loginResult(err error) string {
	var pe *Error
	if errors.As(err, &pe) && pe.Reason != "" {
		return pe.Reason
	}
	var ss sqlStater
	if errors.As(err, &ss) {
		switch ss.SQLState() {
		case CodeInvalidPassword:
			return "bad_token"
		case CodeInvalidAuthSpec:
			return "refused"
		case CodeInvalidCatalog:
			return "unknown_project"
		case CodeTooManyConnections:
			return "too_many_clients"
		}
	}
	return "error"
}
