"""The mesh in other ecosystems' protocols, through their own SDKs: MCP tool servers
as versioned tools in the registry, and the registry's tools and the agents served to
MCP clients. A part like the services: it meets them only through their contracts."""
