// Package retry makes calls to a BMI server wait out its admission control. A call the
// server refuses for lack of capacity ends with RESOURCE_EXHAUSTED and the trailing
// metadata "retry-after-ms": nothing was done with it, so it is sent again after that
// long (plus up to half as much again, so clients refused together do not return
// together), as long as the call's deadline allows. A quota refusal is RESOURCE_EXHAUSTED
// too, without the hint, and is final.
//
//	conn, err := grpc.Dial(server, grpc.WithUnaryInterceptor(retry.UnaryClientInterceptor()), ...)
package retry

import (
	"context"
	"math/rand"
	"strconv"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// MetadataKey names the server's hint, in milliseconds, in a refusal's trailing metadata.
const MetadataKey = "retry-after-ms"

// maxWait bounds a hint, whatever the server says.
const maxWait = time.Minute

// After is how long the server asked the caller to wait before trying again, given a
// call's error and trailing metadata; false if it did not ask (any other answer).
func After(err error, trailer metadata.MD) (time.Duration, bool) {
	if status.Code(err) != codes.ResourceExhausted {
		return 0, false
	}
	values := trailer.Get(MetadataKey)
	if len(values) == 0 {
		return 0, false
	}
	ms, perr := strconv.Atoi(values[0])
	if perr != nil || ms < 0 {
		return 0, false
	}
	wait := time.Duration(ms) * time.Millisecond
	if wait > maxWait {
		wait = maxWait
	}
	return wait, true
}

// jittered is wait plus a random part of up to half of it.
func jittered(wait time.Duration) time.Duration {
	return wait + time.Duration(rand.Int63n(int64(wait)/2+1))
}

// UnaryClientInterceptor retries unary calls the server refused with a hint, within
// their deadline; every other answer is returned as it came.
func UnaryClientInterceptor() grpc.UnaryClientInterceptor {
	return func(ctx context.Context, method string, req, reply interface{},
		cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		for {
			var trailer metadata.MD
			callOpts := make([]grpc.CallOption, 0, len(opts)+1)
			callOpts = append(append(callOpts, opts...), grpc.Trailer(&trailer))
			err := invoker(ctx, method, req, reply, cc, callOpts...)
			wait, ok := After(err, trailer)
			if !ok {
				return err
			}
			wait = jittered(wait)
			if deadline, has := ctx.Deadline(); has && time.Until(deadline) <= wait {
				return err // no time left for another try: this answer stands
			}
			timer := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				timer.Stop()
				return err
			case <-timer.C:
			}
		}
	}
}
