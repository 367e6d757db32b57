"""Prefect flows: one per user-facing job. They orchestrate; jobs compute."""
