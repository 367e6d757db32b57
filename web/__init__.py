"""cbir web: the search page and its JSON API (web.app builds the FastAPI application)."""
