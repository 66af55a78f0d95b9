"""The ingress side of serving: the Ingress deployment (HTTP routes and gRPC methods), request bodies, auth, CORS,
the error table, /health, /metrics and the streams to the frontend deployment."""
