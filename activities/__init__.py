"""Side effects: activity classes with injected clients (database, vector store, LLM, bot)."""
