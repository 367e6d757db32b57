"""Spark jobs: plain functions of (spark, lake, settings, inputs). No Prefect here.

Stages (one module each): ingest, embed, index, train, queries, image_queries, captions, search, query,
evaluate, gallery. I/O helpers: reader, datasets, download, flickr, lakeio, spark, progress. Without Spark, for
the jobs' tasks and for cbir web and cbir search alike: encoding (the encoder and captioner in a
process) and searcher (the search itself).
"""
