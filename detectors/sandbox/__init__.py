"""Agent sandboxes: which processes are an agent's tool calls, and what their GPU work is."""
