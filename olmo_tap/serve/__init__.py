"""The chat service: an OpenAI-compatible HTTP API (FastAPI) and a web page, both carrying trust signals.

- ``config``: the server's settings (CLI flags and environment variables);
- ``schemas``: request and response bodies (pydantic), in the OpenAI chat-completions format plus ``trust``;
- ``errors``: errors in the OpenAI format, and the middleware that bounds request bodies;
- ``engine``: the bounded queue and the one worker thread: a batch of answers decoded together, other work
  between its steps;
- ``trust``: the ``trust`` objects built from PoE's TokenEvents and PoEOutput;
- ``app``: the FastAPI application; ``cli``: ``olmo-tap serve``; ``static/``: the page.

Nothing here is imported by ``olmo_tap`` itself: FastAPI and uvicorn are needed only to serve.
"""
