"""The protocol pieces every service shares, beyond the generated messages.

What a caller and a server must agree on and cannot express in `.proto`:
the limits a task is held to, how a task request is validated and
defaulted, where a sub-task sits in a delegation tree, the `agent.<name>`
tool contract, which events end a stream, and the catalog of `ErrorInfo`
reasons. Any service may import this package; it imports only the runtime
and the generated code, so no service learns another's internals through it.
"""
