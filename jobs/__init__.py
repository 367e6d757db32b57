"""Spark jobs: plain functions of (spark, lake, settings, inputs). No Prefect here.

Stages (one module each): ingest (and the crawl's downloads), embed, index, train, image_queries, captions,
search, query, evaluate, maintenance; the crawl's Spark-free stages in crawl/ (flickr, download, pacing).
Helpers: lakeio (parts and commits), spark (the session), progress. Searching itself is search/'s.
"""
