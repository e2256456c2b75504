"""Many data-parallel api_servers behind one OpenAI-compatible endpoint: registration, health, routing, pass-through."""
