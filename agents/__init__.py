"""The agent runtime: one AgentRunner loop, many configured agents.

Every agent process runs the same code with a different `AgentSpec`
(its name, instructions and the tools it may use); what makes agents
different is configuration, not code.
"""
