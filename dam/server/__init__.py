"""`dam serve`: an OpenAI-compatible chat-completions server for a DAM, with dynamic batching.

    dam serve --model path/to/dam --port 8000 --max-batch 32 --ui

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    reply = client.chat.completions.create(model="dam", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},  # RGBA: alpha = mask
        {"type": "text", "text": "Describe the masked region in detail."}]}])

Generation (`ServerSettings.generation`, `dam serve --generation`): "fast" is continuous
batching on dam.generation (a request that arrives while others decode joins at the next free
slot; a row that ends frees its slot at once), "plain" one transformers `generate` per batch,
"auto" (default) fast wherever the engine supports the model (CPU included: it measured at
least as fast there). Both give the same texts for the same requests.

Modules: `messages` (request bodies -> regions, the mask rule, 400 errors), `batching` (queue
and worker thread), `continuous` (the fast path's continuous batching), `rows` (per-row
sampling, stopping and streaming on either path), `jobs` (what crosses between the worker and
the event loop), `app` (routes), `ui` (the demo page), `runner` (uvicorn). Needs
``pip install 'describe-anything-toolkit[demo]'``.
"""

from dam.server.app import ServerSettings, create_app
from dam.server.messages import RequestError
from dam.server.runner import BackgroundServer, run_server

__all__ = ["BackgroundServer", "RequestError", "ServerSettings", "create_app", "run_server"]
