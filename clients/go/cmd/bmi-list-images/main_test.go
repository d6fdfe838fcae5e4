package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	bmiv1 "github.com/CCI-MOC/bmi/clients/go/bmi/v1"
	"github.com/CCI-MOC/bmi/clients/go/cli"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"
)

// fakeImages serves three images, two per page, to callers presenting "Bearer good".
type fakeImages struct {
	bmiv1.UnimplementedImageServiceServer
	calls []string // page tokens asked for
}

func (f *fakeImages) ListImages(ctx context.Context, req *bmiv1.ListImagesRequest) (
	*bmiv1.ListImagesResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	if got := md.Get("authorization"); len(got) != 1 || got[0] != "Bearer good" {
		return nil, status.Errorf(codes.Unauthenticated, "bad token %q", got)
	}
	f.calls = append(f.calls, req.GetPageToken())
	all := []*bmiv1.Image{
		{Id: "img-1", Name: "debian-12", Project: "ops", Visibility: bmiv1.Visibility_VISIBILITY_PUBLIC,
			Kind: bmiv1.ImageKind_IMAGE_KIND_GOLDEN, State: bmiv1.ResourceState_RESOURCE_STATE_READY,
			SizeBytes: 4 << 20},
		{Id: "img-2", Name: "tuned", Project: "alice", Visibility: bmiv1.Visibility_VISIBILITY_PRIVATE,
			Kind: bmiv1.ImageKind_IMAGE_KIND_SNAPSHOT, State: bmiv1.ResourceState_RESOURCE_STATE_READY,
			SizeBytes: 10 << 30},
		{Id: "img-3", Name: "copy", Project: "alice", Kind: bmiv1.ImageKind_IMAGE_KIND_COPY,
			State: bmiv1.ResourceState_RESOURCE_STATE_CREATING, SizeBytes: 512},
	}
	if req.GetPageToken() == "" {
		return &bmiv1.ListImagesResponse{Images: all[:2], NextPageToken: "p2"}, nil
	}
	return &bmiv1.ListImagesResponse{Images: all[2:]}, nil
}

func dialFake(t *testing.T, token string) (bmiv1.ImageServiceClient, *fakeImages) {
	t.Helper()
	listener := bufconn.Listen(1 << 20)
	server := grpc.NewServer()
	fake := &fakeImages{}
	bmiv1.RegisterImageServiceServer(server, fake)
	go server.Serve(listener)
	t.Cleanup(server.Stop)
	conn, err := grpc.Dial("bufnet",
		grpc.WithContextDialer(func(context.Context, string) (net.Conn, error) {
			return listener.Dial()
		}),
		grpc.WithInsecure(),
		grpc.WithPerRPCCredentials(cli.BearerToken{Token: token}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return bmiv1.NewImageServiceClient(conn), fake
}

func TestListImagesFollowsPagesAndSendsToken(t *testing.T) {
	client, fake := dialFake(t, "good")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var out bytes.Buffer
	if err := listImages(ctx, client, "", 0, &out); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(fake.calls) != "[ p2]" {
		t.Errorf("page tokens asked for: %q", fake.calls)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 4 {
		t.Fatalf("want a header and 3 rows, got:\n%s", out.String())
	}
	for i, want := range [][]string{
		{"ID", "NAME", "PROJECT", "VISIBILITY", "KIND", "STATE", "SIZE"},
		{"img-1", "debian-12", "ops", "public", "golden", "ready", "4.0", "MiB"},
		{"img-2", "tuned", "alice", "private", "snapshot", "ready", "10.0", "GiB"},
		{"img-3", "copy", "alice", "unspecified", "copy", "creating", "512", "B"},
	} {
		if got := strings.Fields(lines[i]); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("line %d: got %q, want %q", i, got, want)
		}
	}
}

func TestListImagesReportsTheStatus(t *testing.T) {
	client, _ := dialFake(t, "wrong")
	err := listImages(context.Background(), client, "", 0, &bytes.Buffer{})
	if status.Code(err) != codes.Unauthenticated {
		t.Fatalf("want UNAUTHENTICATED, got %v", err)
	}
}
