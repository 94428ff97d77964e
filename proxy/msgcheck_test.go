package proxy

import (
	"encoding/binary"
	"testing"
)

// PostgreSQL reads message counts as unsigned: a Bind of 65,535
// parameters is valid, and a count past the body is not.
func TestCheckFrontendMsgCounts(t *testing.T) {
	bind := []byte("\x00\x00\x00\x00")
	bind = binary.BigEndian.AppendUint16(bind, 65535)
	for range 65535 {
		bind = binary.BigEndian.AppendUint32(bind, 1)
		bind = append(bind, '1')
	}
	bind = append(bind, 0, 0)
	if err := checkFrontendMsg('B', bind); err != nil {
		t.Fatalf("Bind of 65,535 parameters: %v", err)
	}
	if err := checkFrontendMsg('B', bind[:len(bind)-3]); err == nil {
		t.Fatal("a Bind cut short passed")
	}
	parse := append([]byte("\x00SELECT 1\x00"), 0xff, 0xff)
	if err := checkFrontendMsg('P', parse); err == nil {
		t.Fatal("a Parse naming 65,535 parameter types it does not carry passed")
	}
}
