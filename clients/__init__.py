"""Clients of the remote services: the chat model (OpenAI or the local model), Telegram, and the HTTP under them.

Entry points build them from settings; activities receive them."""
