"""The serving layer: the OpenAI-compatible HTTP API (FastAPI + uvicorn) over the runtime's slot scheduler."""
