// Package cli is what the example commands share: the server and token flags' defaults,
// the connection (bearer token on every call, TLS or plaintext, and calls that wait out
// a busy server with package retry), and the one-line error they print.
package cli

import (
	"context"
	"crypto/tls"
	"os"
	"strings"

	"github.com/CCI-MOC/bmi/clients/go/retry"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
)

// DefaultServer is where the commands connect without -server or $BMI_SERVER.
const DefaultServer = "127.0.0.1:50051"

// EnvOr is the environment variable name, or fallback if it is unset or empty.
func EnvOr(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

// BearerToken sends "authorization: Bearer <token>" with every call.
type BearerToken struct {
	Token  string
	Secure bool
}

// GetRequestMetadata is the call's authorization header.
func (b BearerToken) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.Token}, nil
}

// RequireTransportSecurity is false unless -tls is given: bmi-server serves plain gRPC
// unless it is configured with a TLS certificate (tls_cert_file).
func (b BearerToken) RequireTransportSecurity() bool { return b.Secure }

// Dial connects to server with token on every call, over TLS (system trust roots) if
// useTLS. A busy server answers RESOURCE_EXHAUSTED with a retry hint: unary calls wait
// and try again (package retry).
func Dial(server, token string, useTLS bool) (*grpc.ClientConn, error) {
	opts := []grpc.DialOption{
		grpc.WithPerRPCCredentials(BearerToken{Token: token, Secure: useTLS}),
		grpc.WithUnaryInterceptor(retry.UnaryClientInterceptor()),
	}
	if useTLS {
		opts = append(opts, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{})))
	} else {
		opts = append(opts, grpc.WithInsecure())
	}
	return grpc.Dial(server, opts...)
}

// ErrorLine is how the commands report a failed call: "error: CODE: message".
func ErrorLine(err error) string {
	st := status.Convert(err)
	return "error: " + CodeName(st.Code().String()) + ": " + st.Message()
}

// CodeName turns grpc-go's "FailedPrecondition" into "FAILED_PRECONDITION", the spelling
// the bmi CLI and the gRPC spec use.
func CodeName(camel string) string {
	var b strings.Builder
	prevLower := false
	for _, r := range camel {
		upper := r >= 'A' && r <= 'Z'
		if upper && prevLower {
			b.WriteByte('_')
		}
		b.WriteRune(r)
		prevLower = !upper
	}
	return strings.ToUpper(b.String())
}
