package archive

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"cascata/internal/pgtest"
)

// memWatch samples the Go heap while a phase runs and reads the process's
// peak RSS (VmHWM, reset first) and the largest child (pg_dump/pg_restore).
type memWatch struct {
	stop     chan struct{}
	wg       sync.WaitGroup
	peakHeap uint64
	peakSys  uint64
}

func watchMemory() *memWatch {
	_ = os.WriteFile("/proc/self/clear_refs", []byte("5"), 0) // reset VmHWM
	w := &memWatch{stop: make(chan struct{})}
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		var ms runtime.MemStats
		for {
			runtime.ReadMemStats(&ms)
			w.peakHeap = max(w.peakHeap, ms.HeapInuse)
			w.peakSys = max(w.peakSys, ms.Sys)
			select {
			case <-w.stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	return w
}

// done returns peak heap, peak Go memory from the OS, peak RSS and the
// largest child RSS (bytes).
func (w *memWatch) done() (heap, sys, rss, child uint64) {
	close(w.stop)
	w.wg.Wait()
	if f, err := os.Open("/proc/self/status"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if v, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
				kb, _ := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
				rss = kb << 10
			}
		}
		f.Close()
	}
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_CHILDREN, &ru) == nil {
		child = uint64(ru.Maxrss) << 10
	}
	return w.peakHeap, w.peakSys, rss, child
}

// phaseTimer records when each progress phase starts.
type phaseTimer struct {
	start  time.Time
	last   string
	phases []string
}

func (pt *phaseTimer) progress(phase string, _, _ int64) {
	if phase != pt.last {
		pt.phases = append(pt.phases, fmt.Sprintf("%s@%.1fs", phase, time.Since(pt.start).Seconds()))
		pt.last = phase
	}
}

// BenchmarkArchive1GB exports and imports a project of about 1 GB (a
// 5,000,000-row table, its index, and 256 MiB of storage files) once, and
// reports throughput and memory. Run it alone:
//
//	go test ./internal/archive -run '^$' -bench Archive1GB -benchtime 1x
func BenchmarkArchive1GB(b *testing.B) {
	ctx := b.Context()
	start := time.Now()
	p := testProject(b, "huge", "CREATE TABLE events (id bigint PRIMARY KEY, payload text NOT NULL, amount numeric NOT NULL)")
	for i := range 10 {
		pgtest.Exec(b, p.OwnerURL, "INSERT INTO events SELECT g, repeat(md5(g::text), 3), g * 0.25 FROM generate_series($1::int, $2::int) g",
			i*500000+1, (i+1)*500000)
	}
	pgtest.Exec(b, p.OwnerURL, "VACUUM ANALYZE events")
	rng := rand.NewChaCha8([32]byte{9})
	for i := range 32 {
		writeFile(b, filepath.Join(p.StorageDir, fmt.Sprintf("dir%d", i%4), fmt.Sprintf("file%02d.bin", i)), 8<<20, 0o644, rng)
	}
	var storageBytes int64 = 32 * 8 << 20
	dbBytes, _ := strconv.ParseInt(pgtest.QueryValue(b, p.OwnerURL, "SELECT pg_database_size(current_database())"), 10, 64)
	total := float64(dbBytes + storageBytes)
	b.Logf("fixture in %v: database %d MiB + storage %d MiB", time.Since(start).Round(time.Second), dbBytes>>20, storageBytes>>20)
	runtime.GC()
	b.ResetTimer()
	for range b.N {
		for _, comp := range []Compression{CompressionZstd, CompressionNone} {
			secrets, _ := SecretsFromProject(&p)
			path := filepath.Join(b.TempDir(), "huge.caf")
			f, err := os.Create(path)
			if err != nil {
				b.Fatal(err)
			}
			w := watchMemory()
			t0 := time.Now()
			pt := &phaseTimer{start: t0}
			_, err = Export(ctx, ExportOptions{Project: p, Secrets: secrets, Passphrase: []byte(testPassphrase), Compression: comp, TempDir: b.TempDir()}, f, pt.progress)
			exportTime := time.Since(t0)
			heap, sys, rss, child := w.done()
			f.Close()
			if err != nil {
				b.Fatal(err)
			}
			fi, _ := os.Stat(path)
			b.Logf("export %s: %v, %.0f MB/s of project, archive %d MiB; peak Go heap %d MiB, Go sys %d MiB, RSS %d MiB, largest child RSS %d MiB; %v",
				comp, exportTime.Round(time.Millisecond), total/1e6/exportTime.Seconds(), fi.Size()>>20, heap>>20, sys>>20, rss>>20, child>>20, pt.phases)

			tg := newTarget(b)
			opts := tg.options(path)
			opts.Ref = "huge_" + string(comp)
			w = watchMemory()
			t0 = time.Now()
			pt = &phaseTimer{start: t0}
			_, err = Import(ctx, opts, pt.progress)
			importTime := time.Since(t0)
			heap, sys, rss, child = w.done()
			if err != nil {
				b.Fatal(err)
			}
			b.Logf("import %s: %v, %.0f MB/s of project; peak Go heap %d MiB, Go sys %d MiB, RSS %d MiB, largest child RSS %d MiB; %v",
				comp, importTime.Round(time.Millisecond), total/1e6/importTime.Seconds(), heap>>20, sys>>20, rss>>20, child>>20, pt.phases)
			b.ReportMetric(total/1e6/exportTime.Seconds(), "export-MB/s-"+string(comp))
			b.ReportMetric(total/1e6/importTime.Seconds(), "import-MB/s-"+string(comp))
			pgtest.Exec(b, dst.Primary.SuperuserURL("postgres"), "DROP DATABASE "+ident(opts.Ref)+" WITH (FORCE)")
		}
	}
}
