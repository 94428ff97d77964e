package proxy

import (
	"encoding/binary"
	"testing"
)

// PostgreSQL reads message counts as unsigned: a Bind of 65,535
// parameters is valid, and a count past the body is not.
func TestDecodeExtMsgCounts(t *testing.T) {
	bind := []byte("\x00\x00\x00\x00")
	bind = binary.BigEndian.AppendUint16(bind, 65535)
	for range 65535 {
		bind = binary.BigEndian.AppendUint32(bind, 1)
		bind = append(bind, '1')
	}
	bind = append(bind, 0, 0)
	if _, err := decodeExtMsg('B', bind); err != nil {
		t.Fatalf("Bind of 65,535 parameters: %v", err)
	}
	if _, err := decodeExtMsg('B', bind[:len(bind)-3]); err == nil {
		t.Fatal("a Bind cut short passed")
	}
	parse := append([]byte("\x00SELECT 1\x00"), 0xff, 0xff)
	if _, err := decodeExtMsg('P', parse); err == nil {
		t.Fatal("a Parse naming 65,535 parameter types it does not carry passed")
	}
}

func TestDecodeExtMsgFields(t *testing.T) {
	bindRest := []byte{0, 1, 0, 0, 0, 1, 0, 0, 0, 1, '7', 0, 0}
	cases := []struct {
		typ                 byte
		body                []byte
		name, portal, query string
		kind                byte
		rest                []byte
	}{
		{typ: 'P', body: []byte("s1\x00SELECT $1\x00\x00\x01\x00\x00\x00\x17"), name: "s1", query: "SELECT $1", rest: []byte("SELECT $1\x00\x00\x01\x00\x00\x00\x17")},
		{typ: 'P', body: []byte("\x00SELECT 1\x00\x00\x00"), query: "SELECT 1", rest: []byte("SELECT 1\x00\x00\x00")},
		{typ: 'B', body: append([]byte("p1\x00s1\x00"), bindRest...), name: "s1", portal: "p1", rest: bindRest},
		{typ: 'D', body: []byte("Ss1\x00"), name: "s1", kind: 'S'},
		{typ: 'D', body: []byte("P\x00"), kind: 'P'},
		{typ: 'C', body: []byte("Ss1\x00"), name: "s1", kind: 'S'},
		{typ: 'E', body: []byte("p1\x00\x00\x00\x00\x00"), portal: "p1"},
	}
	for _, c := range cases {
		m, err := decodeExtMsg(c.typ, c.body)
		if err != nil {
			t.Fatalf("%c %q: %v", c.typ, c.body, err)
		}
		if m.typ != c.typ || m.name != c.name || m.portal != c.portal || m.query != c.query || m.kind != c.kind || string(m.rest) != string(c.rest) || string(m.body) != string(c.body) {
			t.Errorf("%c %q: got %+v", c.typ, c.body, m)
		}
	}
	bad := []struct {
		typ  byte
		body string
	}{
		{'P', "s1"},                                               // name not terminated
		{'P', "s1\x00SELECT 1\x00\x00"},                           // half a count
		{'P', "s1\x00SELECT 1\x00\x00\x00x"},                      // bytes after the end
		{'B', "\x00\x00\x00\x00\x00\x01\xff\xff\xff\xfe\x00\x00"}, // parameter length -2
		{'D', "X\x00"},                                            // neither statement nor portal
		{'C', ""},                                                 // no subtype
		{'E', "p1\x00\x00\x00"},                                   // row limit cut short
		{'S', ""},                                                 // not an extended-protocol message with fields
	}
	for _, b := range bad {
		if m, err := decodeExtMsg(b.typ, []byte(b.body)); err == nil {
			t.Errorf("%c %q decoded: %+v", b.typ, b.body, m)
		}
	}
}

// FuzzDecodeExtMsg: any bytes are refused or split into fields that put
// back together are the body again.
func FuzzDecodeExtMsg(f *testing.F) {
	for _, s := range []string{"Ps1\x00SELECT 1\x00\x00\x00", "B\x00s1\x00\x00\x00\x00\x01\x00\x00\x00\x011\x00\x00", "DSs1\x00", "CP\x00", "E\x00\x00\x00\x00\x00", "P\x00\x00\xff\xff"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) == 0 {
			return
		}
		m, err := decodeExtMsg(in[0], in[1:])
		if err != nil {
			return
		}
		var back []byte
		switch m.typ {
		case 'P':
			back = append(appendCString(nil, m.name), m.rest...)
		case 'B':
			back = append(appendCString(appendCString(nil, m.portal), m.name), m.rest...)
		case 'D', 'C':
			back = appendCString([]byte{m.kind}, m.name)
		case 'E':
			back = append(appendCString(nil, m.portal), m.body[len(m.portal)+1:]...)
		default:
			t.Fatalf("decoded a message of type %q", m.typ)
		}
		if string(back) != string(in[1:]) {
			t.Fatalf("fields %+v do not make the body %q", m, in[1:])
		}
	})
}
