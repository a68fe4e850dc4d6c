"""An OpenAI-compatible HTTP server for every family, in eager mode or on exported graphs (run_server.py).

messages.py (OpenAI messages -> ChatRequest, images) -> service.py (the loaded model; requests -> Jobs)
-> batcher.py (queue, batches, per-row streaming and cancelling) ; app.py (FastAPI routes, errors, SSE,
the web page in static/) ; errors.py (OpenAI's error shape). The package's command line is cli/serve.py.
"""
