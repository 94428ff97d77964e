package proxy

import (
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"cascata/router"

	"github.com/jackc/pgx/v5/pgproto3"
)

// The translator on its own: client messages in, backend messages out,
// and a scripted backend's replies through the same reply bookkeeping the
// relay uses (replyTo, answered, renameError, lost).

// parseMsg, bindMsg, ... build decoded client messages.
func parseMsg(t *testing.T, name, sql string) extMsg {
	return mustDecode(t, msgTypeParse, append(appendCString(appendCString(nil, name), sql), 0, 0))
}

func bindMsg(t *testing.T, name string) extMsg {
	return mustDecode(t, msgTypeBind, append(appendCString([]byte{0}, name), 0, 0, 0, 0, 0, 0))
}

func closeStmtMsg(t *testing.T, name string) extMsg {
	return mustDecode(t, msgTypeClose, appendCString([]byte{kindStatement}, name))
}

func executeMsg(t *testing.T) extMsg {
	return mustDecode(t, msgTypeExecute, []byte{0, 0, 0, 0, 0})
}

func mustDecode(t *testing.T, typ byte, body []byte) extMsg {
	t.Helper()
	m, err := decodeExtMsg(typ, body)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// sendBatch translates msgs and a Sync for the backend with table bt, as
// a held batch is after its Sync claimed a backend, and returns what the
// backend gets, one line per message ("P cs_…", "B cs_…", "C S name", "E", "S").
func sendBatch(t *testing.T, tr *translator, bt *stmtTable, msgs ...extMsg) []string {
	t.Helper()
	tr.out = tr.out[:0]
	tr.syncSeq++
	tr.syncCounted = true
	for i := range msgs {
		var w want
		tr.translateNames(bt, &msgs[i], w, router.ResetNone)
	}
	tr.syncCounted = false
	tr.appendMsg(msgTypeSync)
	return msgLines(t, tr.out)
}

// backendReplies plays a backend's replies through the translator and
// returns what the client is sent, one line per reply: ParseComplete and
// CloseComplete as their actions say, errors with the client's names.
func backendReplies(tr *translator, bt *stmtTable, replies ...pgproto3.BackendMessage) []string {
	var client []string
	for _, r := range replies {
		switch r := r.(type) {
		case *pgproto3.ParseComplete, *pgproto3.CloseComplete:
			typ := byte(msgTypeParseComplete)
			if _, ok := r.(*pgproto3.CloseComplete); ok {
				typ = msgTypeCloseComplete
			}
			switch tr.replyTo(typ) {
			case replyPass:
				client = append(client, string(typ))
			case replyAsParseComplete:
				client = append(client, string(msgTypeParseComplete))
			}
		case *pgproto3.ErrorResponse:
			body, _ := r.Encode(nil)
			var er pgproto3.ErrorResponse
			if err := er.Decode(tr.renameError(body[5:])); err != nil {
				panic(err)
			}
			client = append(client, "E "+er.Code+" "+er.Message)
		case *pgproto3.ReadyForQuery:
			tr.answered(bt)
			client = append(client, "Z")
		default:
			client = append(client, "other")
		}
	}
	return client
}

func expectLines(t *testing.T, what string, got []string, want ...string) {
	t.Helper()
	if !slices.Equal(got, want) {
		t.Fatalf("%s:\n got  %q\n want %q", what, got, want)
	}
}

func TestTranslatorStatementsShareABackend(t *testing.T) {
	var schema atomic.Uint64
	a, b := newTranslator(2, &schema), newTranslator(2, &schema)
	var bt stmtTable
	one := statementName([]byte("SELECT 1\x00\x00\x00"))

	// Client a prepares s1: the backend gets it under the proxy's name.
	expectLines(t, "a's first batch", sendBatch(t, &a, &bt, parseMsg(t, "s1", "SELECT 1"), bindMsg(t, "s1"), executeMsg(t)),
		"P "+one+"|SELECT 1", "B "+one, "E", "S")
	expectLines(t, "a's replies", backendReplies(&a, &bt, &pgproto3.ParseComplete{}, &pgproto3.BindComplete{}, &pgproto3.CommandComplete{}, &pgproto3.ReadyForQuery{TxStatus: 'I'}),
		"1", "other", "other", "Z")

	// Client b prepares the same text under its own name: the backend has
	// it, so the Parse becomes a Close of a name that does not exist, and
	// its CloseComplete reaches b as ParseComplete.
	expectLines(t, "b's batch", sendBatch(t, &b, &bt, parseMsg(t, "mine", "SELECT 1"), bindMsg(t, "mine"), executeMsg(t)),
		"C S "+noopStmtName, "B "+one, "E", "S")
	expectLines(t, "b's replies", backendReplies(&b, &bt, &pgproto3.CloseComplete{}, &pgproto3.BindComplete{}, &pgproto3.CommandComplete{}, &pgproto3.ReadyForQuery{TxStatus: 'I'}),
		"1", "other", "other", "Z")

	// b's names are its own: s1 is unknown to b, reported under b's name.
	expectLines(t, "b binds a's name", sendBatch(t, &b, &bt, bindMsg(t, "s1"), executeMsg(t)),
		"B "+missingStmtName, "E", "S")
	expectLines(t, "b's error", backendReplies(&b, &bt,
		&pgproto3.ErrorResponse{Severity: "ERROR", Code: "26000", Message: `prepared statement "` + missingStmtName + `" does not exist`},
		&pgproto3.ReadyForQuery{TxStatus: 'I'}),
		`E 26000 prepared statement "s1" does not exist`, "Z")

	// A third text on a backend that keeps two: the least recently used
	// goes first, its CloseComplete dropped.
	two, three := statementName([]byte("SELECT 2\x00\x00\x00")), statementName([]byte("SELECT 3\x00\x00\x00"))
	sendBatch(t, &a, &bt, parseMsg(t, "s2", "SELECT 2"))
	backendReplies(&a, &bt, &pgproto3.ParseComplete{}, &pgproto3.ReadyForQuery{TxStatus: 'I'})
	expectLines(t, "a's third statement", sendBatch(t, &a, &bt, parseMsg(t, "s3", "SELECT 3")),
		"C S "+one, "P "+three+"|SELECT 3", "S")
	expectLines(t, "eviction replies", backendReplies(&a, &bt, &pgproto3.CloseComplete{}, &pgproto3.ParseComplete{}, &pgproto3.ReadyForQuery{TxStatus: 'I'}),
		"1", "Z")
	if bt.stmts[one] != nil || bt.stmts[two] == nil || bt.stmts[three] == nil {
		t.Fatalf("backend statements after the eviction: %v", bt.stmts)
	}

	// On another backend a's s1 is prepared first, its ParseComplete dropped.
	var bt2 stmtTable
	expectLines(t, "a on a second backend", sendBatch(t, &a, &bt2, bindMsg(t, "s1"), executeMsg(t)),
		"P "+one+"|SELECT 1", "B "+one, "E", "S")
	expectLines(t, "its replies", backendReplies(&a, &bt2, &pgproto3.ParseComplete{}, &pgproto3.BindComplete{}, &pgproto3.CommandComplete{}, &pgproto3.ReadyForQuery{TxStatus: 'I'}),
		"other", "other", "Z")
}

// A Parse that PostgreSQL skipped (an error earlier in its batch) leaves
// the client without that name and the backend's statement unsure.
func TestTranslatorSkippedParse(t *testing.T) {
	var schema atomic.Uint64
	tr := newTranslator(10, &schema)
	var bt stmtTable
	four := statementName([]byte("SELECT 4\x00\x00\x00"))
	sendBatch(t, &tr, &bt, bindMsg(t, "nosuch"), parseMsg(t, "s4", "SELECT 4"))
	expectLines(t, "replies", backendReplies(&tr, &bt,
		&pgproto3.ErrorResponse{Severity: "ERROR", Code: "26000", Message: `prepared statement "` + missingStmtName + `" does not exist`},
		&pgproto3.ReadyForQuery{TxStatus: 'I'}),
		`E 26000 prepared statement "nosuch" does not exist`, "Z")
	if len(tr.lostParses) != 1 || tr.lostParses[0].name != "s4" || !tr.parsesLost.Load() {
		t.Fatalf("lost parses: %+v", tr.lostParses)
	}
	if bs := bt.stmts[four]; bs == nil || !bs.unsure {
		t.Fatalf("the skipped statement on the backend: %+v", bs)
	}
	if len(tr.parseQ)+len(tr.closeQ)+len(tr.renames) != 0 {
		t.Fatalf("queues left: %d %d %d", len(tr.parseQ), len(tr.closeQ), len(tr.renames))
	}
	// Parsed again (the client goroutine forgets the lost names first),
	// the unsure statement is closed and parsed anew.
	tr.forgetLost()
	expectLines(t, "the next use", sendBatch(t, &tr, &bt, parseMsg(t, "s4", "SELECT 4")),
		"C S "+four, "P "+four+"|SELECT 4", "S")
}

// A backend lost with batches in flight: they are over, and the next
// batch's replies are translated (its rename applies, nothing stale is
// popped for it).
func TestTranslatorBackendLost(t *testing.T) {
	var schema atomic.Uint64
	tr := newTranslator(10, &schema)
	var bt stmtTable
	sendBatch(t, &tr, &bt, parseMsg(t, "s5", "SELECT 5"), bindMsg(t, "gone"))
	sendBatch(t, &tr, &bt, closeStmtMsg(t, "s5"))
	tr.lost(&bt)
	if tr.rfqSeq != tr.syncSeq || len(tr.parseQ)+len(tr.closeQ)+len(tr.renames) != 0 {
		t.Fatalf("after the loss: rfq %d sync %d, queues %d %d %d", tr.rfqSeq, tr.syncSeq, len(tr.parseQ), len(tr.closeQ), len(tr.renames))
	}
	if len(tr.lostParses) != 1 || tr.lostParses[0].name != "s5" {
		t.Fatalf("lost parses: %+v", tr.lostParses)
	}
	var bt2 stmtTable
	sendBatch(t, &tr, &bt2, bindMsg(t, "other"))
	got := backendReplies(&tr, &bt2,
		&pgproto3.ErrorResponse{Severity: "ERROR", Code: "26000", Message: `prepared statement "` + missingStmtName + `" does not exist`},
		&pgproto3.ReadyForQuery{TxStatus: 'I'})
	if !strings.Contains(got[0], `"other"`) {
		t.Fatalf("the next batch's error: %q", got)
	}
}

// A message claimed for a backend that was lost before it was translated:
// what it queued is stale when the next unit starts on another backend,
// and a Parse among it is not the client's.
func TestTranslatorDiscardStale(t *testing.T) {
	var schema atomic.Uint64
	tr := newTranslator(10, &schema)
	var bt stmtTable
	tr.lost(&bt) // the backend died before the batch went out
	sendBatch(t, &tr, &bt, parseMsg(t, "s6", "SELECT 6"), bindMsg(t, "nosuch"))
	tr.discardStale() // the next unit starts
	if len(tr.parseQ)+len(tr.closeQ)+len(tr.renames) != 0 {
		t.Fatalf("stale entries left: %d %d %d", len(tr.parseQ), len(tr.closeQ), len(tr.renames))
	}
	tr.forgetLost()
	if _, ok := tr.stmts["s6"]; ok {
		t.Fatal("a Parse that never ran left its name to the client")
	}
	var bt2 stmtTable
	six := statementName([]byte("SELECT 6\x00\x00\x00"))
	expectLines(t, "the next unit", sendBatch(t, &tr, &bt2, parseMsg(t, "s6", "SELECT 6")), "P "+six+"|SELECT 6", "S")
	expectLines(t, "its replies", backendReplies(&tr, &bt2, &pgproto3.ParseComplete{}, &pgproto3.ReadyForQuery{TxStatus: 'I'}), "1", "Z")
}

// TestTranslatorUnnamedOnAnotherBackend: the client's unnamed statement
// keeps one buffer for its text, used again by its next Parse. Bound in
// a later transaction on another backend, it is parsed there again from
// that buffer: the text of the last Parse, whole, whatever was longer
// before it.
func TestTranslatorUnnamedOnAnotherBackend(t *testing.T) {
	var schema atomic.Uint64
	tr := newTranslator(4, &schema)
	var bt, bt2, bt3 stmtTable
	long := "SELECT a, b, c, d FROM a_table_with_a_long_name WHERE x = $1"
	expectLines(t, "the long text", sendBatch(t, &tr, &bt, parseMsg(t, "", long), bindMsg(t, ""), executeMsg(t)),
		"P |"+long, "B ", "E", "S")
	backendReplies(&tr, &bt, &pgproto3.ParseComplete{}, &pgproto3.BindComplete{}, &pgproto3.CommandComplete{}, &pgproto3.ReadyForQuery{TxStatus: 'I'})
	expectLines(t, "the short text", sendBatch(t, &tr, &bt, parseMsg(t, "", "SELECT 2")),
		"P |SELECT 2", "S")
	backendReplies(&tr, &bt, &pgproto3.ParseComplete{}, &pgproto3.ReadyForQuery{TxStatus: 'I'})

	tr.unnamedOnBackend = false // a new attachment, on another backend
	expectLines(t, "bound on another backend", sendBatch(t, &tr, &bt2, bindMsg(t, ""), executeMsg(t)),
		"P |SELECT 2", "B ", "E", "S")
	backendReplies(&tr, &bt2, &pgproto3.ParseComplete{}, &pgproto3.BindComplete{}, &pgproto3.CommandComplete{}, &pgproto3.ReadyForQuery{TxStatus: 'I'})

	// A text longer than the buffer kept: the next one gets its own.
	huge := "SELECT '" + strings.Repeat("x", maxUnnamedKeep) + "'"
	sendBatch(t, &tr, &bt2, parseMsg(t, "", huge))
	backendReplies(&tr, &bt2, &pgproto3.ParseComplete{}, &pgproto3.ReadyForQuery{TxStatus: 'I'})
	sendBatch(t, &tr, &bt2, parseMsg(t, "", "SELECT 3"))
	backendReplies(&tr, &bt2, &pgproto3.ParseComplete{}, &pgproto3.ReadyForQuery{TxStatus: 'I'})
	if c := cap(tr.unnamedStmt.rest); c > maxUnnamedKeep {
		t.Fatalf("the unnamed statement keeps a %d-byte buffer after a short text", c)
	}
	tr.unnamedOnBackend = false
	expectLines(t, "after the huge text", sendBatch(t, &tr, &bt3, bindMsg(t, ""), executeMsg(t)),
		"P |SELECT 3", "B ", "E", "S")
}
