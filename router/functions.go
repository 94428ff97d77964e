package router

import "strings"

// fnClass is the router's built-in knowledge of a function.
type fnClass uint8

const (
	// fnUnknown: not in the tables; ask Policy.Functions.
	fnUnknown fnClass = iota
	// fnSafe: immutable or stable, or volatile without side effects
	// (random, clock_timestamp, gen_random_uuid, pg_sleep ...): fit for a replica.
	fnSafe
	// fnPrimary: has side effects or needs the primary (xid assignment,
	// locks held for the transaction, notifications, server administration,
	// session state created on the primary such as currval).
	fnPrimary
	// fnPin: has side effects that outlive the statement in the session or
	// write data: primary, and the session must stay there.
	fnPin
	// fnSetConfig: set_config (guarded, then fnPin).
	fnSetConfig
	// fnSQLExec: executes the SQL text given as an argument (guarded
	// recursively, then fnPrimary).
	fnSQLExec
)

// builtinFunctions maps unqualified names of pg_catalog (and of the most
// common extension) functions to their class. It is built at init and
// read-only afterwards. The lookup applies only to unqualified calls and to
// calls qualified with pg_catalog.
var builtinFunctions = buildFunctionTable()

// safeFunctions are immutable/stable built-ins, plus volatile built-ins
// whose only effect is their result.
const safeFunctions = `
count sum avg min max array_agg string_agg json_agg jsonb_agg json_agg_strict
jsonb_agg_strict json_object_agg jsonb_object_agg json_object_agg_strict
jsonb_object_agg_strict json_object_agg_unique jsonb_object_agg_unique
json_object_agg_unique_strict jsonb_object_agg_unique_strict bool_and bool_or
every bit_and bit_or bit_xor stddev stddev_pop stddev_samp variance var_pop
var_samp corr covar_pop covar_samp regr_avgx regr_avgy regr_count
regr_intercept regr_r2 regr_slope regr_sxx regr_sxy regr_syy percentile_cont
percentile_disc mode rank dense_rank percent_rank cume_dist row_number ntile
lag lead first_value last_value nth_value xmlagg range_agg range_intersect_agg
any_value grouping

lower upper initcap length char_length character_length octet_length
bit_length substr substring left right lpad rpad ltrim rtrim btrim trim
replace translate position strpos split_part concat concat_ws format repeat
reverse ascii chr md5 sha224 sha256 sha384 sha512 encode decode quote_ident
quote_literal quote_nullable regexp_replace regexp_match regexp_matches
regexp_split_to_array regexp_split_to_table regexp_count regexp_instr
regexp_like regexp_substr starts_with string_to_array string_to_table
array_to_string to_hex to_ascii overlay unistr normalize is_normalized
similar_to_escape similar_escape like_escape parse_ident to_char to_date
to_number to_timestamp convert_from convert_to convert crc32 crc32c
text_pattern_ops textlen textcat bpchar varchar text bool int2 int4 int8
float4 float8 numeric date time timetz timestamp timestamptz interval
get_bit get_byte set_bit set_byte bit_count string_to_table

abs ceil ceiling floor round trunc sign sqrt cbrt exp ln log log10 power pow
mod div degrees radians pi sin cos tan cot asin acos atan atan2 sind cosd tand
cotd asind acosd atand atan2d sinh cosh tanh asinh acosh atanh gcd lcm
factorial width_bucket scale min_scale trim_scale erf erfc random
random_normal

now current_timestamp transaction_timestamp statement_timestamp
clock_timestamp timeofday date_trunc date_part extract date_bin date_add
date_subtract age make_date make_time make_timestamp make_timestamptz
make_interval justify_days justify_hours justify_interval isfinite timezone
overlaps

to_json to_jsonb row_to_json array_to_json json_build_object
jsonb_build_object json_build_array jsonb_build_array json_object
jsonb_object json_array_length jsonb_array_length json_each jsonb_each
json_each_text jsonb_each_text json_extract_path jsonb_extract_path
json_extract_path_text jsonb_extract_path_text json_object_keys
jsonb_object_keys json_populate_record jsonb_populate_record
json_populate_recordset jsonb_populate_recordset json_to_record
jsonb_to_record json_to_recordset jsonb_to_recordset json_array_elements
jsonb_array_elements json_array_elements_text jsonb_array_elements_text
json_typeof jsonb_typeof json_strip_nulls jsonb_strip_nulls jsonb_set
jsonb_set_lax jsonb_insert jsonb_pretty jsonb_path_exists jsonb_path_match
jsonb_path_query jsonb_path_query_array jsonb_path_query_first
jsonb_path_exists_tz jsonb_path_match_tz jsonb_path_query_tz
jsonb_path_query_array_tz jsonb_path_query_first_tz jsonb_concat
jsonb_delete jsonb_delete_path jsonb_exists jsonb_exists_any jsonb_exists_all
jsonb_contains jsonb_contained json_scalar json_serialize

array_length array_lower array_upper array_ndims array_dims array_position
array_positions array_append array_prepend array_cat array_remove
array_replace array_fill cardinality unnest generate_series
generate_subscripts trim_array array_sample array_shuffle

current_setting current_database current_schema current_schemas
current_user current_role session_user user system_user current_catalog
pg_backend_pid version inet_client_addr inet_client_port inet_server_addr
inet_server_port pg_postmaster_start_time pg_conf_load_time pg_typeof
pg_column_size pg_size_pretty pg_size_bytes pg_relation_size
pg_total_relation_size pg_table_size pg_indexes_size pg_database_size
pg_tablespace_size has_table_privilege has_column_privilege
has_any_column_privilege has_schema_privilege has_function_privilege
has_database_privilege has_sequence_privilege has_type_privilege
has_foreign_data_wrapper_privilege has_server_privilege
has_tablespace_privilege has_language_privilege has_parameter_privilege
pg_has_role row_security_active pg_get_viewdef pg_get_functiondef
pg_get_function_arguments pg_get_function_result
pg_get_function_identity_arguments pg_get_constraintdef pg_get_indexdef
pg_get_triggerdef pg_get_ruledef pg_get_statisticsobjdef pg_get_expr
pg_get_userbyid pg_get_serial_sequence pg_get_keywords pg_get_partkeydef
format_type obj_description col_description shobj_description to_regclass
to_regtype to_regtypemod to_regproc to_regprocedure to_regoper
to_regoperator to_regnamespace to_regrole to_regcollation
pg_table_is_visible pg_function_is_visible pg_type_is_visible
pg_collation_for pg_current_snapshot pg_snapshot_xmin pg_snapshot_xmax
pg_snapshot_xip pg_visible_in_snapshot txid_current_snapshot
txid_snapshot_xmin txid_snapshot_xmax txid_snapshot_xip
txid_visible_in_snapshot pg_is_in_recovery pg_last_wal_receive_lsn
pg_last_wal_replay_lsn pg_last_xact_replay_timestamp pg_is_wal_replay_paused
pg_get_wal_replay_pause_state pg_encoding_to_char pg_char_to_encoding
pg_client_encoding pg_jit_available pg_trigger_depth pg_blocking_pids
pg_safe_snapshot_blocking_pids pg_input_is_valid pg_input_error_info
pg_xact_status pg_xact_commit_timestamp pg_describe_object
pg_identify_object pg_identify_object_as_address pg_get_object_address
pg_options_to_table pg_settings_get_flags pg_relation_filenode
pg_relation_filepath pg_filenode_relation pg_partition_tree
pg_partition_ancestors pg_partition_root pg_index_column_has_property
pg_index_has_property pg_indexam_has_property pg_tablespace_location
pg_get_catalog_foreign_keys pg_stat_get_activity pg_stat_file pg_ls_dir
pg_read_file pg_read_binary_file pg_current_logfile pg_notification_queue_usage
pg_listening_channels pg_sleep pg_sleep_for pg_sleep_until num_nulls
num_nonnulls gen_random_uuid uuid_generate_v1 uuid_generate_v1mc
uuid_generate_v3 uuid_generate_v4 uuid_generate_v5 uuid_nil uuid_ns_dns
uuid_ns_url uuid_ns_oid uuid_ns_x500 table_to_xml table_to_xmlschema
table_to_xml_and_xmlschema cursor_to_xml cursor_to_xmlschema schema_to_xml
schema_to_xmlschema schema_to_xml_and_xmlschema database_to_xml
database_to_xmlschema database_to_xml_and_xmlschema xmlcomment xmlconcat
xmlelement xmlforest xmlpi xmlroot xmlexists xpath xpath_exists
xml_is_well_formed xml_is_well_formed_document xml_is_well_formed_content
xmltext

to_tsvector to_tsquery plainto_tsquery phraseto_tsquery websearch_to_tsquery
ts_rank ts_rank_cd ts_headline setweight strip numnode querytree
tsvector_to_array array_to_tsvector ts_delete ts_filter ts_lexize ts_parse
ts_token_type ts_debug get_current_ts_config json_to_tsvector
jsonb_to_tsvector tsquery_phrase

lower_inc upper_inc isempty lower_inf upper_inf range_merge int4range
int8range numrange tsrange tstzrange daterange int4multirange
int8multirange nummultirange tsmultirange tstzmultirange datemultirange
multirange

host hostmask masklen netmask network broadcast family abbrev inet_merge
inet_same_family set_masklen trunc macaddr8_set7bit

area center diameter height width radius isclosed isopen npoints pclose
popen box circle line lseg path point polygon bound_box

hashtext hashtextextended hash_array hash_record

crypt gen_salt digest hmac encrypt decrypt encrypt_iv decrypt_iv
pgp_sym_encrypt pgp_sym_decrypt pgp_sym_encrypt_bytea pgp_sym_decrypt_bytea
pgp_pub_encrypt pgp_pub_decrypt pgp_pub_encrypt_bytea pgp_pub_decrypt_bytea
pgp_key_id armor dearmor pgp_armor_headers gen_random_bytes

similarity word_similarity strict_word_similarity show_trgm unaccent
levenshtein levenshtein_less_equal soundex difference metaphone dmetaphone
dmetaphone_alt
`

// pinFunctions have effects that outlive the statement in the session, or
// write data: the text goes to the primary and pins the session.
const pinFunctions = `
nextval setval setseed pg_advisory_lock pg_advisory_lock_shared
pg_try_advisory_lock pg_try_advisory_lock_shared lo_create lo_creat
lo_import lo_unlink lo_open lo_write lowrite lo_put lo_from_bytea
lo_truncate lo_truncate64 lo_close lo_lseek lo_lseek64 lo_tell lo_tell64
loread lo_get lo_export
`

// primaryFunctions have side effects or need the primary but leave no
// session state behind.
const primaryFunctions = `
currval lastval pg_advisory_xact_lock pg_advisory_xact_lock_shared
pg_try_advisory_xact_lock pg_try_advisory_xact_lock_shared
pg_advisory_unlock pg_advisory_unlock_shared pg_advisory_unlock_all
pg_notify txid_current pg_current_xact_id txid_current_if_assigned
pg_current_xact_id_if_assigned pg_switch_wal pg_create_restore_point
pg_backup_start pg_backup_stop pg_start_backup pg_stop_backup
pg_cancel_backend pg_terminate_backend pg_reload_conf pg_rotate_logfile
pg_export_snapshot pg_logical_emit_message
pg_create_physical_replication_slot pg_create_logical_replication_slot
pg_drop_replication_slot pg_copy_physical_replication_slot
pg_copy_logical_replication_slot pg_replication_slot_advance
pg_logical_slot_get_changes pg_logical_slot_get_binary_changes
pg_logical_slot_peek_changes pg_logical_slot_peek_binary_changes
pg_replication_origin_create pg_replication_origin_drop
pg_replication_origin_session_setup pg_replication_origin_session_reset
pg_replication_origin_advance pg_replication_origin_xact_setup
pg_replication_origin_xact_reset pg_stat_reset pg_stat_reset_shared
pg_stat_reset_single_table_counters pg_stat_reset_single_function_counters
pg_stat_reset_slru pg_stat_reset_replication_slot
pg_stat_reset_subscription_stats pg_stat_clear_snapshot pg_promote
pg_wal_replay_pause pg_wal_replay_resume pg_import_system_collations
pg_log_backend_memory_contexts pg_current_wal_lsn pg_current_wal_insert_lsn
pg_current_wal_flush_lsn pg_walfile_name pg_walfile_name_offset
pg_sequence_last_value
`

// sqlExecFunctions are the built-ins that execute the SQL text of one of
// their arguments, with the index of that argument.
var sqlExecFunctions = [...]struct {
	name string
	arg  int
}{
	{"query_to_xml", 0},
	{"query_to_xmlschema", 0},
	{"query_to_xml_and_xmlschema", 0},
	{"ts_stat", 0},
	{"ts_rewrite", 1}, // only the two-argument form executes its second argument
}

// sqlExecArgIndex returns the index of the SQL argument of a SQL-executing
// built-in named name (any case).
func sqlExecArgIndex(name string) (int, bool) {
	for _, f := range sqlExecFunctions {
		if strings.EqualFold(name, f.name) {
			return f.arg, true
		}
	}
	return 0, false
}

func buildFunctionTable() map[string]fnClass {
	m := make(map[string]fnClass, 800)
	for _, n := range strings.Fields(safeFunctions) {
		m[n] = fnSafe
	}
	for _, n := range strings.Fields(primaryFunctions) {
		m[n] = fnPrimary
	}
	for _, n := range strings.Fields(pinFunctions) {
		m[n] = fnPin
	}
	for _, f := range sqlExecFunctions {
		m[f.name] = fnSQLExec
	}
	m["set_config"] = fnSetConfig
	return m
}

// isDangerousFunctionName reports names that the guard never lets DDL
// mention (any case): set_config and the SQL-executing built-ins.
func isDangerousFunctionName(name string) bool {
	_, exec := sqlExecArgIndex(name)
	return exec || strings.EqualFold(name, "set_config")
}

// lookupFunction classifies a call given its name parts as written.
func lookupFunction(schema, name string) fnClass {
	// The guard is deliberately broader than resolution: any schema, any case.
	if strings.EqualFold(name, "set_config") {
		return fnSetConfig
	}
	if _, ok := sqlExecArgIndex(name); ok {
		return fnSQLExec
	}
	if schema != "" && schema != "pg_catalog" {
		return fnUnknown
	}
	return builtinFunctions[name]
}

// isSessionAdvisoryLock reports whether a built-in takes a session-level
// advisory lock, which lasts until it is unlocked or the session ends.
func isSessionAdvisoryLock(name string) bool {
	switch strings.ToLower(name) {
	case "pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared":
		return true
	}
	return false
}
