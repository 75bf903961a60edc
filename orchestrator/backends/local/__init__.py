"""The local backend: workers as supervised processes on this host."""
