"""Built-in tool backends: the code that runs when the registry invokes a tool.

Each tool is a plain class with a published contract (`definition`) and an
async `run`; the registry validates arguments and results around it, so a
tool only ever sees arguments that match its schema.
"""
