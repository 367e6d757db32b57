"""cbir core: settings, the lake, image checks. Imports nothing else of the project."""
