//go:build !linux

package parking

// Lot is not available on this system.
type Lot struct{}

// New reports ErrUnsupported.
func New() (*Lot, error) { return nil, ErrUnsupported }

// Park reports ErrUnsupported.
func (*Lot) Park(int, func()) error { return ErrUnsupported }

// Unpark reports false.
func (*Lot) Unpark(int) bool { return false }

// Len is 0.
func (*Lot) Len() int { return 0 }

// Close does nothing.
func (*Lot) Close() error { return nil }
