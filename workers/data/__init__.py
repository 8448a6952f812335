"""Data: corpus reading, tokenizers, token shards, prompt/response records, chat templates."""
