package router

import (
	"encoding/json"
	"strings"

	pg_query "github.com/pganalyze/pg_query_go/v5"
)

// Bodies of DO blocks and of functions and procedures a role creates.
//
// The guard cannot see what an existing function does, so by default only
// trusted roles may run DO or create functions. A body in LANGUAGE sql or
// plpgsql can be seen whole, though: every statement and expression in it
// is guarded like a query of its own (pg_query parses plpgsql too), and
// dynamic SQL (EXECUTE) is allowed only as a string constant, which is
// guarded the same way. Such a body is allowed for every role; a body the
// guard cannot see whole, or one with anything it refuses, stays reserved
// to trusted roles, with the reason in the refusal.

// bodyReason returns why the guard cannot allow a DO block or a CREATE
// FUNCTION/PROCEDURE (text is the statement's own text) for an untrusted
// role, or "" when it saw the whole body and refused nothing in it.
func (a *analyzer) bodyReason(lang, body string, atomic bool, text string) string {
	if a.depth >= maxSQLExecDepth {
		return "nested too deeply"
	}
	switch strings.ToLower(lang) {
	case "sql":
		if atomic {
			return "a BEGIN ATOMIC body is not checked"
		}
		return a.subReason(body)
	case "plpgsql":
		if body == "" || atomic {
			// pg_query's plpgsql compiler asserts there is a body string:
			// without one (no AS, or a SQL-standard body) it aborts the
			// whole process. PostgreSQL refuses such a statement anyway.
			return "it has no body to check"
		}
		js, err := pg_query.ParsePlPgSqlToJSON(text)
		if err != nil {
			return "its plpgsql does not parse: " + err.Error()
		}
		var tree any
		if err := json.Unmarshal([]byte(js), &tree); err != nil {
			return "its plpgsql could not be read"
		}
		return a.plpgsqlReason(tree, false)
	}
	return "LANGUAGE " + lang + " is not checked"
}

// subReason guards one SQL text found in a body as a query of its own.
func (a *analyzer) subReason(q string) string {
	if checkText(q) != nil {
		return "it has an invalid query"
	}
	sub := &analyzer{sql: q, f: &facts{}, depth: a.depth + 1}
	sub.run()
	switch {
	case sub.f.refusal != nil && sub.f.refusalReason == ReasonUnparsable:
		return "it has a query that does not parse: " + sub.f.refusal.Message
	case sub.f.refusal != nil:
		return sub.f.refusal.Message
	case sub.f.untrusted != nil:
		return sub.f.untrusted.Message
	case sub.f.hint == SessionPrimary || sub.f.hint == SessionAuto:
		return "it changes cascata.route"
	case sub.f.preparedUses > 0:
		// Prepared statements made in a body would bypass the proxy's
		// names for them.
		return "it uses PREPARE, EXECUTE or DEALLOCATE"
	case sub.f.backendState:
		return "it reads pg_prepared_statements or pg_cursors"
	case sub.f.reset != ResetNone:
		return "it resets the session"
	}
	return ""
}

// plpgsqlReason walks pg_query's JSON of a plpgsql body and guards every
// expression and statement in it (PLpgSQL_expr); under dynamic SQL (EXECUTE,
// FOR ... IN EXECUTE, OPEN ... FOR EXECUTE, RETURN QUERY EXECUTE) the query
// must be a string constant.
func (a *analyzer) plpgsqlReason(v any, dynamic bool) string {
	switch x := v.(type) {
	case map[string]any:
		for k, c := range x {
			var r string
			switch k {
			case "PLpgSQL_expr":
				r = a.plpgsqlExprReason(c, dynamic)
			case "dynquery":
				r = a.plpgsqlReason(c, true)
			case "PLpgSQL_stmt_dynexecute", "PLpgSQL_stmt_dynfors":
				m, _ := c.(map[string]any)
				for k2, c2 := range m {
					if r = a.plpgsqlReason(c2, k2 == "query"); r != "" {
						break
					}
				}
			default:
				r = a.plpgsqlReason(c, false)
			}
			if r != "" {
				return r
			}
		}
	case []any:
		for _, c := range x {
			if r := a.plpgsqlReason(c, dynamic); r != "" {
				return r
			}
		}
	}
	return ""
}

// plpgsqlExprReason guards one PLpgSQL_expr: a statement (parse mode 0),
// an expression, or an assignment "target := expression" (its subscripts
// included), or, under dynamic SQL, the string constant it must be.
func (a *analyzer) plpgsqlExprReason(v any, dynamic bool) string {
	m, _ := v.(map[string]any)
	q, ok := m["query"].(string)
	if !ok {
		return "it has an expression the guard cannot read"
	}
	mode, _ := m["parseMode"].(float64)
	if dynamic {
		tree, err := pg_query.Parse("SELECT " + q)
		if err != nil || len(tree.GetStmts()) != 1 {
			return "it has dynamic SQL that is not a string constant"
		}
		sel := tree.GetStmts()[0].GetStmt().GetSelectStmt()
		if sel == nil || len(sel.GetTargetList()) != 1 || sel.GetFromClause() != nil {
			return "it has dynamic SQL that is not a string constant"
		}
		text, ok := constText(sel.GetTargetList()[0].GetResTarget().GetVal())
		if !ok {
			return "it has dynamic SQL that is not a string constant"
		}
		return a.subReason(text)
	}
	if mode == 0 {
		return a.subReason(q)
	}
	// An assignment's target may hold expressions in its subscripts: as a
	// select list, target and value are both guarded.
	if target, value, ok := strings.Cut(q, ":="); ok {
		q = target + "," + value
	}
	return a.subReason("SELECT " + q)
}

// functionBody returns the language, the body and whether it is a
// BEGIN ATOMIC body of CREATE FUNCTION/PROCEDURE.
func functionBody(n *pg_query.CreateFunctionStmt) (lang, body string, atomic bool) {
	for _, o := range n.GetOptions() {
		d := o.GetDefElem()
		switch strings.ToLower(d.GetDefname()) {
		case "language":
			lang = d.GetArg().GetString_().GetSval()
		case "as":
			if l := d.GetArg().GetList(); l != nil && len(l.GetItems()) > 0 {
				body = l.GetItems()[0].GetString_().GetSval()
			}
		}
	}
	if n.GetSqlBody() != nil {
		atomic = true
		if lang == "" {
			lang = "sql"
		}
	}
	return lang, body, atomic
}

// doBody returns the language (plpgsql unless given) and the body of DO.
func doBody(n *pg_query.DoStmt) (lang, body string) {
	lang = "plpgsql"
	for _, o := range n.GetArgs() {
		d := o.GetDefElem()
		switch strings.ToLower(d.GetDefname()) {
		case "language":
			lang = d.GetArg().GetString_().GetSval()
		case "as":
			body = d.GetArg().GetString_().GetSval()
		}
	}
	return lang, body
}
