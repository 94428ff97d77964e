package main

import "testing"

func TestThousands(t *testing.T) {
	for n, want := range map[int]string{0: "0", 999: "999", 1000: "1,000", 2500: "2,500", 10000: "10,000", 1234567: "1,234,567", -1000: "-1,000"} {
		if got := thousands(n); got != want {
			t.Errorf("thousands(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestSpliceSection(t *testing.T) {
	sec := "## Scale: 1,000 projects\n\nnew\n"
	cases := []struct{ name, text, want string }{
		{"appended", "# R\n\n## A\n\na\n", "# R\n\n## A\n\na\n\n" + sec},
		{"replaced at the end", "# R\n\n## Scale: 1,000 projects\n\nold\n", "# R\n\n" + sec},
		{"replaced in the middle", "# R\n\n## Scale: 1,000 projects\n\nold\n### sub\n\n## B\n\nb\n", "# R\n\n" + sec + "\n## B\n\nb\n"},
	}
	for _, c := range cases {
		if got := spliceSection(c.text, sec); got != c.want {
			t.Errorf("%s: got\n%q\nwant\n%q", c.name, got, c.want)
		}
	}
}

func TestClientsFor(t *testing.T) {
	got := clientsFor(25, 10, 4)
	want := []int{10, 10, 5, 0}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("clientsFor(25, 10, 4) = %v, want %v", got, want)
		}
	}
}
