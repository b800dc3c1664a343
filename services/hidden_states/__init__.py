"""The hidden-state service: a gRPC server that runs the verifier and streams its hidden states."""
