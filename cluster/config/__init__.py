"""Configuration, with no torch and no Ray: the model's own (``config.json`` / ``params.json``), the cluster's
(engine, cache, parallel and loading parts, composed), the Serve application's, the transport registry and the
command-line flags generated from them."""
