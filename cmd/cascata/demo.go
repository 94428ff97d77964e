package main

import (
	"errors"
	"io"
)

func cmdDemo(args []string, stdout, stderr io.Writer) error {
	return errors.New("demo: coming in the next commit")
}
