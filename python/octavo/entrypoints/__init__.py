"""Ways to run octavo as a service: the OpenAI-compatible HTTP server (entrypoints.openai)."""
