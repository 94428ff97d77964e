// Package archive writes and reads Cascata archives (.caf): one project —
// its database, its storage files and its JWT keys — in a single verifiable
// file that can be restored on another Cascata instance, where tokens minted
// before the export still verify. The format is specified in docs/caf.md.
//
// An archive is a tar stream (optionally gzip- or zstd-compressed as a whole)
// whose members are, in this order:
//
//	secrets.enc       the JWT secrets/JWKS, AES-256-GCM under a scrypt key
//	storage/...       the project's storage_dir, directories and regular files
//	vectors/...       an optional vector-store snapshot directory
//	db/...            pg_dump --format=directory output of one snapshot
//	manifest.json     format version, settings, PostgreSQL facts, checksums
//	manifest.sig      SHA-256 and passphrase HMAC of manifest.json
//
// [Export] streams an archive to an io.Writer: nothing is buffered whole
// (pg_dump writes into a scratch directory, every other member is streamed).
// Per-table data checksums are computed in the very snapshot pg_dump dumps.
//
// [Verify] checks an archive without touching anything: member names and
// types, every member's size and SHA-256, the manifest's own checksum and
// HMAC, the format version and the passphrase.
//
// [Import] verifies while it unpacks into private scratch space, and only
// then creates roles, restores the database under a temporary name, checks
// every table checksum again in the restored database, and finally renames
// the database and moves the storage files into place. Any failure drops
// what the import created. The caller registers the returned project.
//
// Import treats an archive as untrusted even when its passphrase matches
// (its author chose the passphrase): it refuses roles beyond ordinary
// project roles, restores the dump logged in as a fresh role that owns only
// the new database, and creates the extensions itself from an allowlist
// (restore.go). PostgreSQL programs run through internal/pgtools, with no
// environment but their own connection's.
//
// All functions take a context that bounds every blocking call (database
// queries, pg_dump/pg_restore processes, file I/O loops) and a progress
// callback that may be nil. Nothing in the package holds global mutable
// state.
package archive
