// Command bmi-import-url has a BMI server import an image from an http(s) URL, checked
// against the file's published digest, and prints the image; or, with -verify, has the
// server read an image back and compare it with the SHA-256 it recorded.
//
//	bmi-import-url -token "$BMI_TOKEN" -url https://mirror.example.org/os.raw -sha256 HEX NAME
//	bmi-import-url -token "$BMI_TOKEN" -verify NAME
//
// The server address and token default to $BMI_SERVER and $BMI_TOKEN. While the server
// fetches the file, the bytes it has fetched are printed to stderr every second (read
// from the image record, state CREATING). Errors print one line, "error: CODE: message",
// and exit with status 1; a verification that finds a difference exits with status 1 too.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	bmiv1 "github.com/CCI-MOC/bmi/clients/go/bmi/v1"
	"github.com/CCI-MOC/bmi/clients/go/cli"
)

// expectedDigest turns the -sha256 / -sha512 flags into the API's "<algorithm>:<hex>";
// exactly one must be set.
func expectedDigest(sha256, sha512 string) (string, error) {
	switch {
	case sha256 != "" && sha512 != "":
		return "", errors.New("give -sha256 or -sha512, not both")
	case sha256 != "":
		return "sha256:" + strings.ToLower(sha256), nil
	case sha512 != "":
		return "sha512:" + strings.ToLower(sha512), nil
	}
	return "", errors.New("-url needs the file's digest: -sha256 HEX or -sha512 HEX")
}

// formatOf maps -format to the API's enum ("" lets the server tell by the file's header).
func formatOf(name string) (bmiv1.ImageFormat, error) {
	switch name {
	case "":
		return bmiv1.ImageFormat_IMAGE_FORMAT_UNSPECIFIED, nil
	case "raw":
		return bmiv1.ImageFormat_IMAGE_FORMAT_RAW, nil
	case "qcow2":
		return bmiv1.ImageFormat_IMAGE_FORMAT_QCOW2, nil
	}
	return 0, fmt.Errorf("-format must be raw or qcow2, not %q", name)
}

// watchProgress prints the bytes the server fetched for image name until done closes.
func watchProgress(ctx context.Context, images bmiv1.ImageServiceClient, name string,
	done <-chan struct{}) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-done:
			return
		case <-tick.C:
			img, err := images.GetImage(ctx, &bmiv1.GetImageRequest{Image: name})
			if err != nil || img.GetState() != bmiv1.ResourceState_RESOURCE_STATE_CREATING {
				continue
			}
			total := "?"
			if img.GetFetchTotalBytes() > 0 {
				total = fmt.Sprint(img.GetFetchTotalBytes())
			}
			fmt.Fprintf(os.Stderr, "fetched %d of %s bytes\n", img.GetFetchedBytes(), total)
		}
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, cli.ErrorLine(err))
	os.Exit(1)
}

func main() {
	server := flag.String("server", cli.EnvOr("BMI_SERVER", cli.DefaultServer),
		"BMI server host:port (env BMI_SERVER)")
	token := flag.String("token", os.Getenv("BMI_TOKEN"), "bearer token (env BMI_TOKEN)")
	url := flag.String("url", "", "http(s) URL the server fetches the image from")
	sha256 := flag.String("sha256", "", "expected SHA-256 of the file (hex)")
	sha512 := flag.String("sha512", "", "expected SHA-512 of the file (hex)")
	format := flag.String("format", "", "raw or qcow2 (default: told by the file's header)")
	project := flag.String("project", "", "owning project (default: the caller's)")
	verify := flag.Bool("verify", false, "verify image NAME instead of importing")
	timeout := flag.Duration("timeout", 6*time.Hour, "deadline of the import or verification")
	useTLS := flag.Bool("tls", false, "connect with TLS (system trust roots)")
	flag.Parse()
	if *token == "" || flag.NArg() != 1 || (*url == "") == !*verify {
		fmt.Fprintln(os.Stderr, "usage: bmi-import-url [-server HOST:PORT] -token TOKEN "+
			"(-url URL (-sha256|-sha512) HEX [-format raw|qcow2] [-project P] | -verify) "+
			"[-timeout D] [-tls] NAME")
		os.Exit(2)
	}
	name := flag.Arg(0)

	conn, err := cli.Dial(*server, *token, *useTLS)
	if err != nil {
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
		os.Exit(1)
	}
	defer conn.Close()
	images := bmiv1.NewImageServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()

	if *verify {
		result, err := images.VerifyImage(ctx, &bmiv1.VerifyImageRequest{Image: name})
		if err != nil {
			fail(err)
		}
		fmt.Printf("recorded sha256: %s\ncomputed sha256: %s\n", result.GetRecordedSha256(),
			result.GetComputedSha256())
		if !result.GetMatches() {
			fmt.Printf("MISMATCH: %s\n", result.GetDetail())
			os.Exit(1)
		}
		fmt.Println("ok: the content is as recorded")
		return
	}
	digest, err := expectedDigest(*sha256, *sha512)
	if err == nil {
		var fmtEnum bmiv1.ImageFormat
		if fmtEnum, err = formatOf(*format); err == nil {
			done := make(chan struct{})
			go watchProgress(ctx, images, name, done)
			var img *bmiv1.Image
			img, err = images.ImportImage(ctx, &bmiv1.ImportImageRequest{
				Name: name, Project: *project, SourceUrl: *url, ExpectedDigest: digest,
				Format: fmtEnum, RequestId: fmt.Sprintf("go-%d", time.Now().UnixNano()),
			})
			close(done)
			if err != nil {
				fail(err)
			}
			fmt.Printf("%s %s %s sha256:%s\n", img.GetId(), img.GetName(),
				strings.ToLower(strings.TrimPrefix(img.GetState().String(), "RESOURCE_STATE_")),
				img.GetContentSha256())
			return
		}
	}
	fmt.Fprintf(os.Stderr, "error: %v\n", err)
	os.Exit(2)
}
