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
	"strings"
	"time"

	"cascata/internal/sockio"

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

// handle runs one client connection from its first byte to its close.
func (s *Server) handle(c net.Conn) {
	c = sockio.New(c) // raw socket calls, under TLS too
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("client handler panic", "panic", r, "remote", c.RemoteAddr().String())
		}
		_ = c.Close()
	}()
	if n := s.clients.Add(1); n > int64(s.opts.MaxClientConn) {
		defer s.clients.Add(-1)
		s.metrics.login("too_many_clients")
		_ = c.SetDeadline(time.Now().Add(s.opts.ClientLoginTimeout))
		// Read the startup packet so that the client sees the error rather than a reset.
		if _, st, err := s.readStartup(c, nil); err == nil && st != nil {
			s.sendFatal(c, fatalError(CodeTooManyConnections, "too many client connections (max_client_conn = %d)", s.opts.MaxClientConn))
		}
		return
	}
	defer s.clients.Add(-1)
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
	ss.run()
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
				if _, err := c.Write([]byte{'N'}); err != nil {
					return c, nil, err
				}
				continue
			}
			if _, err := c.Write([]byte{'S'}); err != nil {
				return c, nil, err
			}
			tc := tls.Server(c, tlsConf)
			if err := tc.Handshake(); err != nil {
				return c, nil, fmt.Errorf("tls handshake: %w", err)
			}
			c, encrypted = tc, true
		case code == codeGSSENCRequest:
			if _, err := c.Write([]byte{'N'}); err != nil {
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
	rd := newMsgReader(c, 16*1024)
	typ, _, err := rd.next()
	if err != nil {
		return nil, fmt.Errorf("read password: %w", err)
	}
	if typ != 'p' {
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
	id, err := s.opts.Auth.Authenticate(ctx, ref, role, password)
	if err != nil {
		var ss sqlStater
		if !errors.As(err, &ss) {
			err = &Error{Code: CodeInvalidPassword, Message: "password authentication failed", Err: err}
		}
		return nil, err
	}
	proj := s.project(ref)
	if proj == nil {
		return nil, fatalError(CodeInvalidCatalog, "project %q does not exist", ref)
	}
	ss := newSession(s, c, rd, proj, ref, id, st.params)
	if err := s.register(ss); err != nil {
		return nil, err
	}
	if err := ss.greet(ctx); err != nil {
		s.unregister(ss)
		return nil, err
	}
	return ss, nil
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
