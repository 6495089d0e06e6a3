"""The runtime that executes dataflows, and the pool of local agent processes."""
