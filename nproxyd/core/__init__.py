"""I/O-free core: errors, clock, configuration, messages, ports and pure rules."""
