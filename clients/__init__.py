"""Clients of the mesh's services, for any part that calls them.

A service is reached only through its generated stubs or its client here;
a client speaks the contract and maps a received status back into the
domain error it stands for, so no caller needs the service's code.
"""
