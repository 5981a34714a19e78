"""HTTP client for OpenAI-compatible chat servers (no pool, no database)."""

from corral.llm.client import ChatRequest, ChatResponse, Client, Message

__all__ = ["ChatRequest", "ChatResponse", "Client", "Message"]
