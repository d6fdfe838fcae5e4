package main

import "testing"

func TestExpectedDigest(t *testing.T) {
	if got, err := expectedDigest("AB", ""); err != nil || got != "sha256:ab" {
		t.Fatalf("sha256: %q %v", got, err)
	}
	if got, err := expectedDigest("", "cd"); err != nil || got != "sha512:cd" {
		t.Fatalf("sha512: %q %v", got, err)
	}
	for _, pair := range [][2]string{{"", ""}, {"a", "b"}} {
		if _, err := expectedDigest(pair[0], pair[1]); err == nil {
			t.Fatalf("accepted %v", pair)
		}
	}
}

func TestFormatOf(t *testing.T) {
	if _, err := formatOf("vmdk"); err == nil {
		t.Fatal("accepted vmdk")
	}
	if f, err := formatOf("qcow2"); err != nil || f.String() != "IMAGE_FORMAT_QCOW2" {
		t.Fatalf("qcow2: %v %v", f, err)
	}
}
