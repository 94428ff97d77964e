package router

import (
	"encoding/json"
	"math/rand/v2"
	"strings"
	"testing"

	pg_query "github.com/pganalyze/pg_query_go/v5"
)

// --- an independent oracle over pg_query's JSON parse tree ---

// jsonNode is a decoded JSON value of arbitrary shape (the parse tree).
type jsonNode = any

// treeFacts is what the oracle finds in a parse tree.
type treeFacts struct {
	modifies   bool // InsertStmt/UpdateStmt/DeleteStmt/MergeStmt, a locking clause or SELECT INTO, executed
	escalation bool // SET/RESET of an identity setting, RESET ALL, or set_config of one / of a non-constant name
}

// oracle parses sql with pg_query.ParseToJSON and inspects the tree. ok is
// false when sql does not parse.
func oracle(sql string) (tf treeFacts, ok bool) {
	js, err := pg_query.ParseToJSON(sql)
	if err != nil {
		return tf, false
	}
	var root jsonNode
	if err := json.Unmarshal([]byte(js), &root); err != nil {
		return tf, false
	}
	oracleWalk(root, true, &tf)
	return tf, true
}

func oracleWalk(v jsonNode, executed bool, tf *treeFacts) {
	switch x := v.(type) {
	case []jsonNode:
		for _, e := range x {
			oracleWalk(e, executed, tf)
		}
	case map[string]jsonNode:
		for k, child := range x {
			switch k {
			case "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt":
				if executed {
					tf.modifies = true
				}
			case "lockingClause", "intoClause":
				if executed {
					tf.modifies = true
				}
			case "ExplainStmt":
				if m, ok := child.(map[string]jsonNode); ok {
					oracleWalk(m, executed && explainAnalyzes(m), tf)
					continue
				}
			case "VariableSetStmt":
				if m, ok := child.(map[string]jsonNode); ok {
					name, _ := m["name"].(string)
					n := strings.ToLower(name)
					if n == "role" || n == "session_authorization" || strings.HasPrefix(n, "request.jwt") || m["kind"] == "VAR_RESET_ALL" {
						tf.escalation = true
					}
				}
			case "FuncCall":
				if m, ok := child.(map[string]jsonNode); ok && oracleSetConfigEscalates(m) {
					tf.escalation = true
				}
			}
			oracleWalk(child, executed, tf)
		}
	}
}

func explainAnalyzes(m map[string]jsonNode) bool {
	opts, _ := m["options"].([]jsonNode)
	for _, o := range opts {
		d, _ := o.(map[string]jsonNode)["DefElem"].(map[string]jsonNode)
		if d == nil || d["defname"] != "analyze" {
			continue
		}
		arg, _ := d["arg"].(map[string]jsonNode)
		if arg == nil {
			return true
		}
		if s, ok := arg["String"].(map[string]jsonNode); ok {
			v, _ := s["sval"].(string)
			return !isOffValue(v)
		}
		if i, ok := arg["Integer"].(map[string]jsonNode); ok {
			v, _ := i["ival"].(float64) // omitted when 0
			return v != 0
		}
		return true
	}
	return false
}

func oracleSetConfigEscalates(m map[string]jsonNode) bool {
	parts, _ := m["funcname"].([]jsonNode)
	if len(parts) == 0 {
		return false
	}
	last, _ := parts[len(parts)-1].(map[string]jsonNode)["String"].(map[string]jsonNode)
	if name, _ := last["sval"].(string); !strings.EqualFold(name, "set_config") {
		return false
	}
	args, _ := m["args"].([]jsonNode)
	if len(args) == 0 {
		return true
	}
	first, _ := args[0].(map[string]jsonNode)
	for _, a := range args {
		if na, ok := a.(map[string]jsonNode)["NamedArgExpr"].(map[string]jsonNode); ok {
			if name, _ := na["name"].(string); strings.EqualFold(name, "setting_name") {
				first, _ = na["arg"].(map[string]jsonNode)
			}
		}
	}
	if tc, ok := first["TypeCast"].(map[string]jsonNode); ok {
		// The router accepts casts of a constant to text types.
		tn, _ := tc["typeName"].(map[string]jsonNode)
		names, _ := tn["names"].([]jsonNode)
		if len(names) > 0 && tn["arrayBounds"] == nil {
			last, _ := names[len(names)-1].(map[string]jsonNode)["String"].(map[string]jsonNode)
			switch last["sval"] {
			case "text", "varchar", "bpchar", "name":
				first, _ = tc["arg"].(map[string]jsonNode)
			}
		}
	}
	c, _ := first["A_Const"].(map[string]jsonNode)
	sv, _ := c["sval"].(map[string]jsonNode)
	if sv == nil {
		return true
	}
	v, _ := sv["sval"].(string)
	n := strings.ToLower(strings.TrimSpace(v))
	return n == "role" || n == "session_authorization" || strings.HasPrefix(n, "request.jwt")
}

// --- literal variants for the fast-path agreement check ---

var (
	intPool     = []string{"0", "7", "42", "999999999", "00012", "1"}
	decimalPool = []string{"1.5", "0.0", "3e10", "2.5E-3", "1.", "99999999999.9"}
	stringPool  = []string{"''", "'role'", "'set_config'", "'x''y'", "'primary'", "'request.jwt.claims'", "'off'",
		"'SELECT set_config(''role'',''x'',false)'", "'SJIS'", "'serializable'", "'on'", "'analyze'", "'search_path'",
		"'pg_settings'", "'ü'", "'--'", "'/*'", "';SET ROLE postgres;'", "'0'", "'auto'", "'session_authorization'"}
)

// literalVariant rewrites every literal that normalizeKey replaces with a
// value of the same kind taken from the pools, using pick to choose.
func literalVariant(sql string, pick func(n int) int) (string, bool) {
	var spans []int32
	if _, n, ok := normalizeKey(sql, &spans); !ok || n == 0 {
		return "", false
	}
	var b strings.Builder
	last := 0
	for _, s := range spans {
		start := int(s)
		end, kind := literalEnd(sql, start)
		b.WriteString(sql[last:start])
		switch kind {
		case markString:
			b.WriteString(stringPool[pick(len(stringPool))])
		case markInteger:
			b.WriteString(intPool[pick(len(intPool))])
		default:
			b.WriteString(decimalPool[pick(len(decimalPool))])
		}
		last = end
	}
	b.WriteString(sql[last:])
	return b.String(), true
}

// literalEnd returns the end and kind of the literal normalizeKey replaced at start.
func literalEnd(sql string, start int) (int, byte) {
	if sql[start] == '\'' {
		j := start + 1
		for {
			if sql[j] == '\'' {
				if j+1 < len(sql) && sql[j+1] == '\'' {
					j += 2
					continue
				}
				return j + 1, markString
			}
			j++
		}
	}
	j := start
	kind := byte(markInteger)
	for j < len(sql) && isDigit(sql[j]) {
		j++
	}
	if j < len(sql) && sql[j] == '.' {
		kind = markDecimal
		j++
		for j < len(sql) && isDigit(sql[j]) {
			j++
		}
	}
	if j < len(sql) && (sql[j] == 'e' || sql[j] == 'E') {
		kind = markDecimal
		j++
		if sql[j] == '+' || sql[j] == '-' {
			j++
		}
		for j < len(sql) && isDigit(sql[j]) {
			j++
		}
	}
	return j, kind
}

var testPolicies = []Policy{
	{},
	{TrustedRole: true},
	{Functions: testFunctions},
	{TrustedRole: true, Functions: testFunctions},
}

// uncachedFacts analyses sql without any cache (the reference).
func uncachedFacts(sql string) *facts {
	if f := checkText(sql); f != nil {
		return f
	}
	return analyze(sql, nil)
}

// checkInvariants verifies the properties for one text and its literal
// variants. It reports whether the text is normalizable (served by the
// normalized cache).
func checkInvariants(t testing.TB, sql string, variants []string) bool {
	t.Helper()
	c := NewClassifier(Options{CacheSize: 64})
	ref := uncachedFacts(sql)
	tf, parsed := oracle(sql)
	for _, p := range testPolicies {
		d, u := c.Classify(sql, p), ref.apply(p)
		if !decisionsEqual(d, u) {
			t.Fatalf("%q: cached %+v != uncached %+v", sql, d, u)
		}
		if d2 := c.Classify(sql, p); !decisionsEqual(d, d2) {
			t.Fatalf("%q: second call %+v != first %+v", sql, d2, d)
		}
		switch {
		case !parsed || checkText(sql) != nil:
			if d.Refusal == nil {
				t.Fatalf("%q: unparsable text not refused: %+v", sql, d)
			}
		case tf.modifies && d.Target == Replica:
			t.Fatalf("%q: modifies data but routed to a replica: %+v", sql, d)
		case tf.escalation && d.Refusal == nil && d.Reset == ResetNone:
			// A lone RESET ALL or DISCARD ALL is emulated by the proxy,
			// never forwarded (Decision.Reset).
			t.Fatalf("%q: escalation not refused: %+v", sql, d)
		}
	}
	// Fast path: after sql is cached, texts differing only in literal
	// values must get exactly the uncached decision.
	for _, v := range variants {
		vref := uncachedFacts(v)
		for _, p := range testPolicies {
			if d, u := c.Classify(v, p), vref.apply(p); !decisionsEqual(d, u) {
				t.Fatalf("variant %q of %q: cached %+v != uncached %+v", v, sql, d, u)
			}
		}
	}
	if checkText(sql) != nil {
		return false
	}
	var spans []int32
	if _, n, ok := normalizeKey(sql, &spans); !ok || n == 0 {
		return false
	}
	return analyze(sql, spans).normalizable
}

// --- a generator of SQL from fragments ---

type sqlGen struct{ r *rand.Rand }

func (g sqlGen) pick(xs ...string) string { return xs[g.r.IntN(len(xs))] }

func (g sqlGen) lit() string {
	return g.pick("1", "4711", "'abc'", "1.5", "-7", "'x''y'", "1e3", "'2020-01-01'", "$1", "123456789012", "true", "NULL")
}

func (g sqlGen) expr(depth int) string {
	if depth > 2 {
		return g.pick("id", "name", g.lit())
	}
	switch g.r.IntN(14) {
	case 0:
		return g.pick("lower(name)", "count(*)", "now()", "random()", "coalesce(a, 'x')", "interval '1 day'",
			"'2020-01-01'::date", "now()::timestamp(3)", "array[1, 2, 3]", "'{\"a\":1}'::jsonb ->> 'a'",
			"current_setting('request.jwt.claims', true)", "extract(year from now())")
	case 1:
		return g.pick("nextval('s')", "set_config('search_path', 'x', false)", "pg_advisory_lock(42)",
			"txid_current()", "query_to_xml('SELECT 1', true, false, '')", "currval('s')")
	case 2:
		return g.pick("set_config('role', 'x', false)", "set_config($1, 'x', false)", "pg_catalog.set_config('request.jwt.claims', '{}', true)",
			"\"set_config\"('ROLE', 'postgres', false)", "set_config('ro' || 'le', 'x', false)")
	case 3:
		return g.pick("my_stable("+g.lit()+")", "my_func("+g.lit()+")", "public.my_stable(1)", "my_volatile()")
	case 4:
		return "(" + g.sel(depth+1) + ")"
	case 5:
		return "CASE WHEN " + g.expr(depth+1) + " > " + g.lit() + " THEN " + g.expr(depth+1) + " ELSE " + g.lit() + " END"
	case 6:
		return g.expr(depth+1) + " " + g.pick("+", "-", "||", "=", "<>", "AND", "OR") + " " + g.expr(depth+1)
	case 7:
		return "EXISTS (" + g.sel(depth+1) + ")"
	default:
		return g.pick("id", "name", "t.a", "\"Weird Col\"", g.lit())
	}
}

func (g sqlGen) sel(depth int) string {
	if depth > 3 {
		return "SELECT " + g.lit()
	}
	switch g.r.IntN(9) {
	case 0:
		return "SELECT " + g.expr(depth)
	case 1:
		return "VALUES (" + g.expr(depth) + ")"
	case 2:
		return "WITH c AS (" + g.stmt(depth+1) + ") SELECT * FROM c"
	case 3:
		return "SELECT * FROM (" + g.sel(depth+1) + ") s"
	case 4:
		return "SELECT * FROM t WHERE id IN (" + g.sel(depth+1) + ")"
	default:
		return "SELECT " + g.expr(depth) + ", " + g.expr(depth) + " FROM t WHERE id = " + g.lit() +
			g.pick("", "", "", " FOR UPDATE", " FOR SHARE", " FOR NO KEY UPDATE SKIP LOCKED", " FOR KEY SHARE", " LIMIT 5", " ORDER BY 1")
	}
}

func (g sqlGen) write(depth int) string {
	switch g.r.IntN(5) {
	case 0:
		return "INSERT INTO t VALUES (" + g.expr(depth) + ") RETURNING id"
	case 1:
		return "UPDATE " + g.pick("t", "pg_settings") + " SET a = " + g.expr(depth) + " WHERE id = " + g.lit()
	case 2:
		return "DELETE FROM t WHERE id = " + g.lit()
	case 3:
		return "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = " + g.expr(depth)
	default:
		return "SELECT " + g.expr(depth) + " INTO t2"
	}
}

func (g sqlGen) stmt(depth int) string {
	if depth > 3 {
		return g.sel(depth)
	}
	switch g.r.IntN(16) {
	case 0, 1, 2, 3:
		return g.sel(depth)
	case 4, 5:
		return g.write(depth)
	case 6:
		return g.pick("EXPLAIN ", "EXPLAIN ANALYZE ", "EXPLAIN (ANALYZE false) ", "EXPLAIN (ANALYZE, BUFFERS) ") + g.pick(g.sel(depth+1), g.write(depth+1))
	case 7:
		return g.pick("PREPARE p AS ", "DECLARE c CURSOR FOR ", "DECLARE c CURSOR WITH HOLD FOR ", "CREATE TABLE x AS ", "CREATE VIEW v AS ") + g.sel(depth+1)
	case 8:
		return "COPY (" + g.pick(g.sel(depth+1), g.write(depth+1)) + ") TO STDOUT"
	case 9:
		return g.pick("SET ROLE postgres", "SET search_path = 'a'", "BEGIN READ ONLY", "BEGIN", "COMMIT", "SET LOCAL statement_timeout = 5",
			"SHOW role", "LISTEN c", "FETCH 5 FROM c", "SET cascata.route = 'primary'", "TRUNCATE t", "RESET ALL",
			"SET request.jwt.claims = '{}'", "DISCARD ALL", "DISCARD PLANS", "SET TRANSACTION READ ONLY", "DO $$ BEGIN END $$",
			"CALL p(1)", "LOCK TABLE t", "VACUUM t", "COPY t FROM STDIN", "COPY t TO STDOUT", "EXECUTE p(1)", "SET ROLE NONE")
	default:
		return g.sel(depth)
	}
}

func (g sqlGen) text() string {
	n := 1 + g.r.IntN(3)
	parts := make([]string, n)
	for i := range parts {
		parts[i] = g.stmt(0)
	}
	s := strings.Join(parts, g.pick("; ", ";\n", " ; /* c */ "))
	switch g.r.IntN(6) {
	case 0:
		s = "/* cascata:primary */ " + s
	case 1:
		s = "-- leading comment\n" + s + ";"
	case 2:
		s = randomCase(g.r, s)
	}
	return s
}

func randomCase(r *rand.Rand, s string) string {
	b := []byte(s)
	for i, c := range b {
		if r.IntN(2) == 0 {
			switch {
			case c >= 'a' && c <= 'z':
				b[i] = c - 32
			case c >= 'A' && c <= 'Z':
				b[i] = c + 32
			}
		}
	}
	return string(b)
}

func TestPropertyGenerated(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	g := sqlGen{r}
	n := 2000
	if testing.Short() {
		n = 300
	}
	normalizable, modifying, escalating := 0, 0, 0
	for i := 0; i < n; i++ {
		sql := g.text()
		var variants []string
		for k := 0; k < 3; k++ {
			if v, ok := literalVariant(sql, r.IntN); ok {
				variants = append(variants, v)
			}
		}
		if checkInvariants(t, sql, variants) {
			normalizable++
		}
		if tf, ok := oracle(sql); ok {
			if tf.modifies {
				modifying++
			}
			if tf.escalation {
				escalating++
			}
		}
	}
	t.Logf("%d texts: %d normalizable, %d modifying, %d escalating", n, normalizable, modifying, escalating)
	if normalizable < n/10 || modifying < n/10 || escalating < n/20 {
		t.Fatalf("generator coverage too low: %d normalizable, %d modifying, %d escalating of %d", normalizable, modifying, escalating, n)
	}
}

func TestPropertyTableVariants(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for _, tc := range classifyCases {
		var variants []string
		for k := 0; k < 8; k++ {
			if v, ok := literalVariant(tc.sql, r.IntN); ok {
				variants = append(variants, v)
			}
		}
		checkInvariants(t, tc.sql, variants)
	}
}

// TestFastPathCornerCases pins literal swaps that change what the grammar
// accepts or what the guard sees.
func TestFastPathCornerCases(t *testing.T) {
	for _, tc := range [][]string{
		{"SELECT now()::timestamp(3)", "SELECT now()::timestamp(999999999)", "SELECT now()::timestamp(1.5)"},
		{"SELECT interval '1' second(3)", "SELECT interval '1' second(0)"},
		{"SELECT * FROM t LIMIT 1", "SELECT * FROM t LIMIT 1.5", "SELECT * FROM t LIMIT 12345678901"},
		{"SELECT * FROM t WHERE a = 'x'", "SELECT * FROM t WHERE a = 'role'", "SELECT * FROM t WHERE a = ''"},
		{"SELECT -1", "SELECT -2.5", "SELECT - 3"},
		{"SELECT 'a'\n'b'", "SELECT 'role'\n'x'"},
		{"SELECT set_config('search_path', 'a', false)", "SELECT set_config('role', 'a', false)"},
		{"SELECT query_to_xml('SELECT 1', true, false, '')", "SELECT query_to_xml('SET ROLE x', true, false, '')"},
		{"EXPLAIN (ANALYZE 0) DELETE FROM t", "EXPLAIN (ANALYZE 1) DELETE FROM t"},
		{"EXPLAIN (ANALYZE 'off') DELETE FROM t", "EXPLAIN (ANALYZE 'on') DELETE FROM t"},
		{"SET cascata.route = 'auto'", "SET cascata.route = 'primary'", "SET cascata.route = 'x'"},
		{"SET standard_conforming_strings = 'on'", "SET standard_conforming_strings = 'off'"},
		{"CREATE AGGREGATE a(text, bool) (sfunc = 'f', stype = text)", "CREATE AGGREGATE a(text, bool) (sfunc = 'set_config', stype = text)"},
		{"SELECT 1 FROM t WHERE a = 1 FOR UPDATE", "SELECT 1 FROM t WHERE a = 2 FOR UPDATE"},
		{"FETCH 5 FROM c", "FETCH 5.5 FROM c"},
		{"BEGIN ISOLATION LEVEL READ COMMITTED", "BEGIN ISOLATION LEVEL SERIALIZABLE"},
		{"SELECT my_stable(1)", "SELECT my_stable('x')", "SELECT my_stable(2.5)"},
		{"UPDATE pg_settings SET setting = 'a' WHERE name = 'work_mem'", "UPDATE pg_settings SET setting = 'b' WHERE name = 'role'"},
	} {
		checkInvariants(t, tc[0], tc[1:])
	}
}
