"""The service runtime every agentplex process shares.

Settings, the domain-error → gRPC status table, telemetry, metrics and the
`ServiceHost` that gives every server health, reflection, graceful shutdown and
a metrics endpoint, so each service module only contains its own logic.
"""
