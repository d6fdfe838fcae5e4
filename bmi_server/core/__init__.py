"""Domain core: decides and orchestrates; knows nothing of gRPC, rbd, tgtadm, HTTP or SQL."""
