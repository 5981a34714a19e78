"""Loopback servers that speak real peer protocols, scriptable per test."""
