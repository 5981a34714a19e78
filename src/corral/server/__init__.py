"""The socket API (daemon side) and its client (CLI side). Imports nothing here on purpose."""
