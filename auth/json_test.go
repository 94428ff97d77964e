package auth

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestParseJSONObject(t *testing.T) {
	good := []string{
		`{}`, ` { } `, `{"a":1}`, `{"a":-0.5e+10,"b":[],"c":{},"d":[1,"x",true,false,null,{"e":[{}]}]}`,
		`{"s":"\"\\\/\b\f\n\r\t\u00e9\ud83c\udf89"}`, "{\"u\":\"日本語\"}", `{"a":{"x":1},"b":{"x":1}}`,
		`{"a":0,"b":10,"c":1.0E5,"d":-1e-3}`,
	}
	for _, in := range good {
		m, err := parseJSONObject([]byte(in))
		if err != nil {
			t.Errorf("parseJSONObject(%s): %v", in, err)
			continue
		}
		var ref map[string]json.RawMessage
		if err := json.Unmarshal([]byte(in), &ref); err != nil || len(ref) != len(m) {
			t.Errorf("%s: encoding/json disagrees: %v", in, err)
		}
		for k, v := range ref {
			if strings.TrimSpace(string(v)) != string(m[k]) {
				t.Errorf("%s: member %q = %s, want %s", in, k, m[k], v)
			}
		}
	}
	bad := []string{
		``, ` `, `[]`, `"x"`, `1`, `null`, `{`, `{"a"}`, `{"a":}`, `{"a":1,}`, `{,}`, `{"a":1}}`, `{"a":1} x`,
		`{'a':1}`, `{a:1}`, `{"a":01}`, `{"a":1.}`, `{"a":.5}`, `{"a":-}`, `{"a":1e}`, `{"a":+1}`, `{"a":0x10}`,
		`{"a":tru}`, `{"a":nul}`, `{"a":NaN}`, `{"a":"\x"}`, `{"a":"\u12"}`, `{"a":"\u12g4"}`, "{\"a\":\"\t\"}",
		`{"a":"x}`, `{"a":[1,2}`, `{"a":[1,]}`, `{"a":1,"a":2}`, `{"a":1,"\u0061":2}`, `{"o":{"k":1,"k":1}}`,
		`{"a":"\u0000"}`, `{"a":"\ud800"}`, `{"a":"\udc00\ud800"}`, `{"a":"\ud800\u0041"}`, "{\"a\":\"\xc3\"}",
		`{"a":` + strings.Repeat("[", maxJSONDepth+1) + strings.Repeat("]", maxJSONDepth+1) + `}`,
	}
	for _, in := range bad {
		if m, err := parseJSONObject([]byte(in)); err == nil {
			t.Errorf("parseJSONObject(%q) = %v, want error", in, m)
		}
	}
}

// FuzzParseJSONObject: whatever parseJSONObject accepts, encoding/json
// accepts as an object with the same members.
func FuzzParseJSONObject(f *testing.F) {
	for _, s := range []string{`{}`, `{"a":[1,{"b":"\u00e9"}],"c":-1.5e3}`, `{"a":1,"a":2}`, `{"s":"\ud83c\udf89"}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := parseJSONObject(data)
		if err != nil {
			return
		}
		var ref map[string]json.RawMessage
		if err := json.Unmarshal(data, &ref); err != nil {
			t.Fatalf("accepted %q, encoding/json refuses: %v", data, err)
		}
		if len(ref) != len(m) {
			t.Fatalf("%q: %d members, encoding/json sees %d", data, len(m), len(ref))
		}
	})
}
