"""Ray Serve application: OpenAI-compatible HTTP, gRPC, health and metrics in front of the sharded engine."""
