"""Generated bmi.v1 protobuf and gRPC stubs (built by `make proto`; do not edit)."""
