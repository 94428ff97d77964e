// Package router decides, for one SQL text as received from a client, whether
// Cascata refuses it (the identity-escalation guard) and where it may run
// (the primary, or any replica), plus the facts the proxy needs to keep its
// transaction and session bookkeeping right.
//
// The package knows nothing about the wire protocol. The proxy calls
// [Classifier.Classify] with the text of a simple-protocol Query message or
// of an extended-protocol Parse message, and the [Policy] of the connected
// JWT role, and acts on the returned [Decision]:
//
//   - Decision.Refusal non-nil: answer with that error (SQLSTATE and
//     message) and do not forward anything of the text.
//   - Decision.RouteHint SessionPrimary/SessionAuto: the text was exactly
//     `SET cascata.route = 'primary'|'auto'`; the proxy consumes it (answers
//     CommandComplete "SET" itself) and never forwards it.
//   - Decision.Statements == 0: the text is empty (whitespace, comments,
//     semicolons); the proxy answers EmptyQueryResponse itself or forwards it
//     anywhere.
//   - otherwise run it on Decision.Target, record Decision.Tx/TxLast and
//     Decision.PinSession, and, if Decision.UnknownFunctions is non-empty,
//     look their volatility up (pg_proc.provolatile) so that the
//     per-project [FunctionClassifier] knows them next time.
//
// # Parsing
//
// Texts are parsed with libpg_query (github.com/pganalyze/pg_query_go/v5,
// the PostgreSQL 16 raw parser); the parse tree is walked generically with
// protobuf reflection, so no node type can be forgotten by the walk: every
// function call, SET, DML node and locking clause anywhere in the tree (CTEs,
// subqueries, EXPLAIN, PREPARE bodies, CREATE TABLE AS, rules, views,
// defaults, ...) is seen. A text libpg_query cannot parse is refused with
// SQLSTATE 42601: Cascata never forwards text it could not inspect.
//
// # Caching
//
// Analysis results are policy-independent facts, cached in two bounded,
// sharded LRU caches; the [Policy] is applied to the facts on every call,
// which is cheap. The first cache is keyed by the exact text. The second is
// keyed by the text with its plain numeric and string literals replaced by
// markers (a Go-side lexer, see normalizeKey) and holds only analyses that
// provably do not depend on any literal: texts made only of SELECT, INSERT,
// UPDATE, DELETE and MERGE statements that call neither set_config nor
// SQL-executing functions, and whose every replaced literal is an A_Const
// node of the parse tree. Simple-protocol clients that inline literals
// therefore hit the second cache after the first execution of a query
// shape; a text served by it twice is admitted to the exact cache. Cache
// keys never use pg_query.Fingerprint, which conflates `BEGIN READ ONLY`
// with `BEGIN READ WRITE` and set_config('role', 'anon') with
// set_config('role', 'service_role').
//
// # Escalation guard
//
// The guard is applied to every statement of a multi-statement text and to
// everything nested in it. It refuses (SQLSTATE 42501 unless noted):
//
//   - SET/RESET ROLE, SET/RESET SESSION AUTHORIZATION, RESET ALL,
//     DISCARD ALL; SET [LOCAL]/RESET of role, session_authorization,
//     any name starting with request.jwt (request.jwt, request.jwt.claims,
//     request.jwt.claim.role ...; any case, quoted or not), also inside
//     ALTER FUNCTION/PROCEDURE ... SET; SET of any cascata.* name except the
//     exact route hint;
//   - SET/set_config of standard_conforming_strings to anything but on, and
//     of client_encoding to anything but UTF8: both would make the server
//     lex text differently from libpg_query, which would let a statement
//     hidden in a string literal slip past the guard;
//   - set_config(...) under any schema qualification, case or quoting whose
//     setting name is one of the names above or is not a string constant
//     (a concatenation, a $n parameter, a column, a subquery ...);
//   - SQL-executing built-ins (query_to_xml, query_to_xmlschema,
//     query_to_xml_and_xmlschema, ts_stat, two-argument ts_rewrite) whose
//     query argument is not a string constant; a constant one is parsed and
//     guarded recursively;
//   - UPDATE/INSERT/DELETE/MERGE on pg_settings (its rule calls set_config)
//     and CREATE VIEW/RULE over pg_settings (an updatable view on it would
//     do the same);
//   - in DDL, any mention of set_config or of a SQL-executing built-in
//     (CREATE AGGREGATE ... (sfunc = set_config) would call it with
//     attacker-chosen arguments);
//   - DO and CREATE [OR REPLACE] FUNCTION/PROCEDURE unless
//     Policy.TrustedRole;
//   - CREATE/ALTER/DROP ROLE (USER, GROUP), ALTER ROLE ... RENAME,
//     ALTER ROLE/DATABASE ... SET, GRANT/REVOKE role membership,
//     REASSIGN OWNED, ALTER SYSTEM, COPY ... PROGRAM, LOAD;
//   - text with invalid UTF-8 or NUL bytes (22021), unparsable text (42601).
//
// EXPLAIN without ANALYZE does not execute its statement, but the guard
// still refuses escalation inside it: refusing is the safer choice and no
// legitimate client needs it. CREATE EXTENSION, DISCARD PLANS/SEQUENCES/TEMP
// and SET SESSION CHARACTERISTICS are allowed.
//
// # What the proxy must do itself
//
//   - Force client_encoding=UTF8 and standard_conforming_strings=on and
//     refuse role, session_authorization, request.jwt* and -c options in
//     the StartupMessage: the guard only sees SQL text.
//   - Classify every Parse text; Bind/Execute inherit the Decision of their
//     statement.
//   - Apply the JWT role and claims so that client transaction control
//     cannot shed them: see Decision.StatementsAfterTxEnd and
//     TxCommitAndChain.
//
// # Limits
//
// The router sees text only, never the catalog: a view, a user-defined
// operator, a cast or a function resolved through a custom search_path that
// calls a volatile function is classified by what the text shows. Misrouting
// such a statement to a replica makes it fail there with "cannot execute ...
// in a read-only transaction"; it cannot bypass the guard, which is about
// what the text itself asks the server to do. Functions created before
// Cascata (e.g. SECURITY DEFINER ones, or ones executing dynamic SQL) are
// the database owner's responsibility.
package router
