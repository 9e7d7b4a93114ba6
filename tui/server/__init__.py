"""`ikctl serve`: an OpenAI- and llama-server-compatible HTTP API over a loaded model, with continuous batching."""
