"""The gRPC service ``mixserve.v1.Generation``: a GenerateRequest as the HTTP request it stands for, and the calls."""
