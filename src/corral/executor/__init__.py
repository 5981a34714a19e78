"""Agents and the pool that runs them."""
