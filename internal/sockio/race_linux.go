//go:build race

package sockio

import (
	"runtime"
	"unsafe"
)

// The race detector learns of data passed through sockets from the read and
// write calls of package syscall; the raw calls tell it the same.

// ioSync orders a socket write before the read that gets its bytes.
var ioSync int64

func raceReadDone(p []byte, n int) {
	if n > 0 {
		runtime.RaceWriteRange(unsafe.Pointer(&p[0]), n)
	}
	runtime.RaceAcquire(unsafe.Pointer(&ioSync))
}

func raceWriteStart(p []byte) {
	runtime.RaceReleaseMerge(unsafe.Pointer(&ioSync))
	runtime.RaceReadRange(unsafe.Pointer(&p[0]), len(p))
}
