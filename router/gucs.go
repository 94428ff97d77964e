package router

import "strings"

// gucRule is what the guard does with a setting name.
type gucRule uint8

const (
	// gucAllowed: any value.
	gucAllowed gucRule = iota
	// gucIdentity: role, session_authorization, request.jwt* and
	// cascata.* other than cascata.route: never settable by clients.
	gucIdentity
	// gucRoute: cascata.route, the session route hint.
	gucRoute
	// gucMustBeOn: standard_conforming_strings; off would make the server
	// lex backslashes in '...' differently from libpg_query.
	gucMustBeOn
	// gucMustBeUTF8: client_encoding; multi-byte client encodings whose
	// trailing bytes can be 0x5c (SJIS, BIG5, GBK ...) would make the
	// server lex E'...' strings differently from libpg_query.
	gucMustBeUTF8
)

// normGUC folds a setting name as PostgreSQL compares them (case
// insensitively); surrounding spaces are dropped too, which only makes the
// guard broader.
func normGUC(name string) string {
	return strings.ToLower(strings.TrimSpace(name))
}

// classifyGUC returns the rule for a normalized setting name.
func classifyGUC(n string) gucRule {
	switch {
	case n == "role", n == "session_authorization", strings.HasPrefix(n, "request.jwt"):
		return gucIdentity
	case n == "cascata.route":
		return gucRoute
	case strings.HasPrefix(n, "cascata."):
		return gucIdentity
	case n == "standard_conforming_strings":
		return gucMustBeOn
	case n == "client_encoding":
		return gucMustBeUTF8
	}
	return gucAllowed
}

// isOnValue reports the spellings of boolean true accepted here. PostgreSQL
// accepts more (prefixes such as "tr"); refusing those is only stricter.
func isOnValue(v string) bool {
	switch strings.ToLower(v) {
	case "on", "true", "yes", "1":
		return true
	}
	return false
}

// isOffValue reports the spellings of boolean false accepted here.
func isOffValue(v string) bool {
	switch strings.ToLower(v) {
	case "off", "false", "no", "0":
		return true
	}
	return false
}

// isUTF8Name reports encoding names that PostgreSQL maps to UTF8 (it
// ignores case and non-alphanumeric characters).
func isUTF8Name(v string) bool {
	var b strings.Builder
	for i := 0; i < len(v); i++ {
		c := v[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
			b.WriteByte(c)
		case c >= 'A' && c <= 'Z':
			b.WriteByte(c + 'a' - 'A')
		}
	}
	s := b.String()
	return s == "utf8" || s == "unicode"
}

// trivialGUCs are settings whose session-level change does not alter query
// results (timeouts, logging, planner and resource knobs): changing them
// does not pin the session. Any other session-level SET/RESET pins it,
// because a replica would not see it (search_path, TimeZone, DateStyle,
// extra_float_digits, bytea_output, row_security ...).
var trivialGUCs = func() map[string]bool {
	m := map[string]bool{}
	for _, n := range strings.Fields(`
application_name statement_timeout lock_timeout idle_in_transaction_session_timeout
idle_session_timeout transaction_timeout client_min_messages log_min_messages
log_min_duration_statement log_statement log_duration log_parameter_max_length
log_parameter_max_length_on_error trace_notify work_mem maintenance_work_mem
hash_mem_multiplier temp_buffers random_page_cost seq_page_cost cpu_tuple_cost
cpu_index_tuple_cost cpu_operator_cost parallel_setup_cost parallel_tuple_cost
effective_cache_size effective_io_concurrency maintenance_io_concurrency
max_parallel_workers_per_gather max_parallel_maintenance_workers
min_parallel_table_scan_size min_parallel_index_scan_size jit jit_above_cost
jit_inline_above_cost jit_optimize_above_cost plan_cache_mode geqo
geqo_threshold geqo_effort from_collapse_limit join_collapse_limit
cursor_tuple_fraction constraint_exclusion default_statistics_target
enable_async_append enable_bitmapscan enable_gathermerge enable_hashagg
enable_hashjoin enable_incremental_sort enable_indexscan enable_indexonlyscan
enable_material enable_memoize enable_mergejoin enable_nestloop
enable_parallel_append enable_parallel_hash enable_partition_pruning
enable_partitionwise_join enable_partitionwise_aggregate enable_presorted_aggregate
enable_seqscan enable_sort enable_tidscan track_io_timing
statement_mem vacuum_cost_delay vacuum_cost_limit
`) {
		m[n] = true
	}
	return m
}()

// sessionCharacteristicsGUC maps the DefElem names of SET SESSION
// CHARACTERISTICS AS TRANSACTION to the settings they change.
func sessionCharacteristicsGUC(defname string) string {
	switch defname {
	case "transaction_isolation":
		return "default_transaction_isolation"
	case "transaction_read_only":
		return "default_transaction_read_only"
	case "transaction_deferrable":
		return "default_transaction_deferrable"
	}
	return defname
}
