package cli

import (
	"context"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestCodeName(t *testing.T) {
	for camel, want := range map[string]string{
		"FailedPrecondition": "FAILED_PRECONDITION",
		"Unauthenticated":    "UNAUTHENTICATED",
		"OK":                 "OK",
	} {
		if got := CodeName(camel); got != want {
			t.Errorf("CodeName(%q) = %q, want %q", camel, got, want)
		}
	}
}

func TestErrorLine(t *testing.T) {
	err := status.Error(codes.FailedPrecondition, "importing from a URL is off")
	if got := ErrorLine(err); got != "error: FAILED_PRECONDITION: importing from a URL is off" {
		t.Fatal(got)
	}
}

func TestEnvOr(t *testing.T) {
	t.Setenv("BMI_CLI_TEST", "")
	if got := EnvOr("BMI_CLI_TEST", "x"); got != "x" {
		t.Fatal(got)
	}
	t.Setenv("BMI_CLI_TEST", "y")
	if got := EnvOr("BMI_CLI_TEST", "x"); got != "y" {
		t.Fatal(got)
	}
}

func TestBearerToken(t *testing.T) {
	md, err := BearerToken{Token: "t"}.GetRequestMetadata(context.Background())
	if err != nil || md["authorization"] != "Bearer t" {
		t.Fatalf("%v %v", md, err)
	}
	if (BearerToken{}).RequireTransportSecurity() || !(BearerToken{Secure: true}).RequireTransportSecurity() {
		t.Fatal("transport security follows -tls")
	}
}
