"""The Memory service: conversation history kept outside the agents, in Redis.

Agents are stateless; everything they need to remember between requests
lives here, scoped per agent per session, bounded in size and age.
"""
