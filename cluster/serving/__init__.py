"""The HTTP server (``seg-rt serve``): ``config`` (settings, limits), ``request`` (the HTTP request model
→ ``GenerationParams``), ``core`` (the Ray-free ServingCore), ``http`` (error shapes, auth, middleware,
the FastAPI app), the API mappings ``openai_api`` / ``a1111_api`` (importing only ``request``),
``metrics``, the playground page, and ``deployment`` (the thin Ray Serve deployment).

Nothing is imported here: import the module you use.
"""
