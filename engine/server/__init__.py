"""OpenAI-compatible HTTP server over `AsyncLLMEngine` (`orca serve`)."""
