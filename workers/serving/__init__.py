"""Serving: ``protocol`` (the OpenAI API's shapes and validation), ``engine`` (continuous batching
in one replica) and ``app`` (the HTTP app, its guard, and the Ray Serve deployment)."""
