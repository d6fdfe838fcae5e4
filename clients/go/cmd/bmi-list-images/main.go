// Command bmi-list-images lists the BMI images the caller may see: an example of calling
// the bmi.v1 API from Go with the generated stubs.
//
//	bmi-list-images -server bmi.example.org:50051 -token "$BMI_TOKEN" [-project ops]
//
// The server address and token default to $BMI_SERVER and $BMI_TOKEN. Every call carries
// the metadata "authorization: Bearer <token>", as the server requires. Errors print one
// line, "error: CODE: message", and exit with status 1.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	bmiv1 "github.com/CCI-MOC/bmi/clients/go/bmi/v1"
	"github.com/CCI-MOC/bmi/clients/go/cli"
)

// listImages writes every image the caller may see to out as a table, fetching the
// pages one by one.
func listImages(ctx context.Context, client bmiv1.ImageServiceClient, project string,
	pageSize int32, out io.Writer) error {
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "ID\tNAME\tPROJECT\tVISIBILITY\tKIND\tSTATE\tSIZE")
	req := &bmiv1.ListImagesRequest{Project: project, PageSize: pageSize}
	for {
		resp, err := client.ListImages(ctx, req)
		if err != nil {
			return err
		}
		for _, img := range resp.GetImages() {
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", img.GetId(), img.GetName(),
				img.GetProject(),
				enumName(img.GetVisibility().String(), "VISIBILITY_"),
				enumName(img.GetKind().String(), "IMAGE_KIND_"),
				enumName(img.GetState().String(), "RESOURCE_STATE_"),
				humanBytes(img.GetSizeBytes()))
		}
		if resp.GetNextPageToken() == "" {
			return w.Flush()
		}
		req.PageToken = resp.GetNextPageToken()
	}
}

// enumName turns "VISIBILITY_PUBLIC" into "public".
func enumName(name, prefix string) string {
	return strings.ToLower(strings.TrimPrefix(name, prefix))
}

// humanBytes formats a size in binary units, e.g. "4.0 MiB".
func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 5; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func main() {
	server := flag.String("server", cli.EnvOr("BMI_SERVER", cli.DefaultServer),
		"BMI server host:port (env BMI_SERVER)")
	token := flag.String("token", os.Getenv("BMI_TOKEN"), "bearer token (env BMI_TOKEN)")
	project := flag.String("project", "", "only this project's images")
	pageSize := flag.Int("page-size", 0, "images per call (0: the server's default)")
	timeout := flag.Duration("timeout", 30*time.Second, "deadline of the whole listing")
	useTLS := flag.Bool("tls", false, "connect with TLS (system trust roots)")
	flag.Parse()
	if *token == "" || flag.NArg() != 0 {
		fmt.Fprintln(os.Stderr, "usage: bmi-list-images [-server HOST:PORT] -token TOKEN "+
			"[-project NAME] [-page-size N] [-timeout D] [-tls]  (or set BMI_TOKEN)")
		os.Exit(2)
	}

	conn, err := cli.Dial(*server, *token, *useTLS)
	if err != nil {
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
		os.Exit(1)
	}
	defer conn.Close()

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	err = listImages(ctx, bmiv1.NewImageServiceClient(conn), *project, int32(*pageSize), os.Stdout)
	if err != nil {
		fmt.Fprintln(os.Stderr, cli.ErrorLine(err))
		cancel()
		conn.Close()
		os.Exit(1)
	}
}
