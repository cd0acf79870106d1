"""The OpenAI-compatible HTTP server:
`python -m octavo.entrypoints.openai.api_server --model MODEL`."""
