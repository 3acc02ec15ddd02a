"""An OpenAI-compatible HTTP server over the one unmasking engine, with a live playground page
(optional extra `serve`: starlette + uvicorn)."""
