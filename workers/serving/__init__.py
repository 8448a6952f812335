"""Serving: the OpenAI protocol (and, with the serve kind, the engine and HTTP app)."""
