package main

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"cascata/internal/config"
	"cascata/internal/pgtest"

	"github.com/jackc/pgx/v5"
)

// TestInstallClaimsManyProjects: the cascata schema of every project with
// an owner URL is installed at start-up, several at once, each database
// with a key of its own that claimsMAC then uses without installing again.
func TestInstallClaimsManyProjects(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	cl := startClusters(t, ctx, 1)[0]
	const dbs = 2*claimsInstallers + 1 // more than one round of installers
	var projects []config.Project
	for i := range dbs {
		db := fmt.Sprintf("claims_%d", i)
		pgtest.Exec(t, cl.Primary.SuperuserURL("postgres"), "CREATE DATABASE "+db)
		projects = append(projects, config.Project{Ref: db, OwnerURL: cl.Primary.SuperuserURL(db)})
	}
	// Two refs on one database share its key; a project without an owner
	// URL installs nothing.
	projects = append(projects,
		config.Project{Ref: "claims_0_again", OwnerURL: cl.Primary.SuperuserURL("claims_0")},
		config.Project{Ref: "no_owner"})

	var logs bytes.Buffer
	a := &app{log: slog.New(slog.NewTextHandler(&logs, nil))}
	a.installClaims(projects)
	if len(a.claimKeys) != dbs+1 {
		t.Fatalf("%d keys installed, want %d\n%s", len(a.claimKeys), dbs+1, logs.String())
	}
	for _, p := range projects[:dbs+1] {
		var key []byte
		conn, err := pgx.Connect(ctx, p.OwnerURL)
		if err != nil {
			t.Fatal(err)
		}
		err = conn.QueryRow(ctx, "SELECT claims_key FROM cascata.keys").Scan(&key)
		conn.Close(ctx)
		if err != nil {
			t.Fatalf("%s: %v", p.Ref, err)
		}
		if !bytes.Equal(a.claimKeys[claimsKeyOf(&p)], key) {
			t.Fatalf("%s: the key kept is not its database's", p.Ref)
		}
		if a.claimsMAC(&p) == nil {
			t.Fatalf("%s: no claims signer", p.Ref)
		}
	}
	if a.claimsMAC(&projects[len(projects)-1]) != nil {
		t.Fatal("a project without owner_url signs claims")
	}
	if len(a.claimKeys) != dbs+1 {
		t.Fatalf("claimsMAC installed again: %d keys", len(a.claimKeys))
	}
}
