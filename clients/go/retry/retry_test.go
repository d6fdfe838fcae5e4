package retry

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// answers plays a server: each call takes the next error, with the hint if set.
func answers(errs []error, hints []string, calls *int) grpc.UnaryInvoker {
	return func(ctx context.Context, method string, req, reply interface{},
		cc *grpc.ClientConn, opts ...grpc.CallOption) error {
		i := *calls
		*calls++
		for _, o := range opts {
			if t, ok := o.(grpc.TrailerCallOption); ok && hints[i] != "" {
				*t.TrailerAddr = metadata.Pairs(MetadataKey, hints[i])
			}
		}
		return errs[i]
	}
}

func TestRetriesAfterTheHintThenAnswers(t *testing.T) {
	busy := status.Error(codes.ResourceExhausted, "the server is busy")
	calls := 0
	invoke := answers([]error{busy, busy, nil}, []string{"20", "20", ""}, &calls)
	started := time.Now()
	err := UnaryClientInterceptor()(context.Background(), "/m", nil, nil, nil, invoke)
	if err != nil || calls != 3 {
		t.Fatalf("err %v after %d calls", err, calls)
	}
	if elapsed := time.Since(started); elapsed < 40*time.Millisecond {
		t.Fatalf("did not wait: %v", elapsed)
	}
}

func TestAQuotaRefusalIsFinal(t *testing.T) {
	quota := status.Error(codes.ResourceExhausted, "quota exceeded")
	calls := 0
	invoke := answers([]error{quota, nil}, []string{"", ""}, &calls)
	err := UnaryClientInterceptor()(context.Background(), "/m", nil, nil, nil, invoke)
	if status.Code(err) != codes.ResourceExhausted || calls != 1 {
		t.Fatalf("err %v after %d calls", err, calls)
	}
}

func TestNoRetryPastTheDeadline(t *testing.T) {
	busy := status.Error(codes.ResourceExhausted, "the server is busy")
	calls := 0
	invoke := answers([]error{busy, nil}, []string{"5000", ""}, &calls)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	err := UnaryClientInterceptor()(ctx, "/m", nil, nil, nil, invoke)
	if status.Code(err) != codes.ResourceExhausted || calls != 1 {
		t.Fatalf("err %v after %d calls", err, calls)
	}
}
