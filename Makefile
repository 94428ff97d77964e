# Cascata — `make help` lists the targets.
GO      ?= go
BIN     := bin/cascata
PKGS    := ./...
export PATH := /usr/local/go/bin:$(PATH)

.PHONY: help build run test lint fuzz bench bench-scale compat compat-suites pg clean

help: ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | sort

build: ## build bin/cascata
	$(GO) build -o $(BIN) ./cmd/cascata

pg: ## make sure the PostgreSQL server binaries are installed (installs them as root)
	@scripts/install-postgres.sh

run: build pg ## the embedded default: a local primary + replica, a demo project, the proxy
	./$(BIN) demo

test: pg build ## all tests against real PostgreSQL (race detector on), then the psql/pgbench end-to-end script
	$(GO) vet $(PKGS)
	$(GO) test -race -count=1 -timeout 9m $(PKGS)
	scripts/e2e.sh

compat: pg build ## client matrix: drivers and ORMs through the proxy in transaction mode (installs its clients)
	scripts/compat/run.sh

compat-suites: pg ## pgx's and lib/pq's own test suites: direct, through cascata in session and transaction mode; writes scripts/compat-suites/RESULTS.md (COMPAT_SUITES_STRICT=1: fail on undocumented failures)
	scripts/compat-suites/run.sh

lint: ## go vet, gofmt, and golangci-lint where installed
	$(GO) vet $(PKGS)
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); exit 1; }
	@if command -v golangci-lint >/dev/null; then golangci-lint run; fi

fuzz: ## run each fuzz target for 30 s
	$(GO) test ./proxy -run '^$$' -fuzz FuzzReadStartup -fuzztime 30s
	$(GO) test ./proxy -run '^$$' -fuzz FuzzMsgReader -fuzztime 30s
	$(GO) test ./proxy -run '^$$' -fuzz FuzzDecodeExtMsg -fuzztime 30s
	$(GO) test ./proxy -run '^$$' -fuzz FuzzPostLogin -fuzztime 30s -parallel 1
	$(GO) test ./router -run '^$$' -fuzz FuzzClassify -fuzztime 30s
	$(GO) test ./auth -run '^$$' -fuzz FuzzParseJSONObject -fuzztime 30s
	$(GO) test ./internal/archive -run '^$$' -fuzz FuzzVerifyReader -fuzztime 30s

bench: build pg ## pgbench through cascata, PgBouncer and direct; writes bench/RESULTS.md
	bench/run.sh

bench-scale: build pg ## one cascata, 1,000 projects, 1k–10k clients: RSS, goroutines, fds, backends, newly-active latency; section of bench/RESULTS.md, bench/scale-plot.svg
	$(GO) build -o bin/cascata-scale ./bench/scale
	ulimit -n 65536 2>/dev/null || ulimit -n "$$(ulimit -Hn)"; ./bin/cascata-scale -cascata $(BIN)

clean: ## remove build output and demo state
	rm -rf bin .cascata
