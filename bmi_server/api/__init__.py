"""gRPC edge: protobuf <-> domain translation and error mapping. No decisions here."""
