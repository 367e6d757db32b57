"""Searching, without Spark: what every front door (the query job's tasks, cbir search, cbir eval, cbir
web) holds to answer a query.

    searcher   Searcher: an index, its pictures and the rules, built once; one query's top k
    index      the captions searched (one row per image, with its references) and their BLEU index
    cache      the index saved under the state folder and opened again while the lake is unchanged
    ranking    the one ranking: BLEU, blended with likeness to the query's picture
    pictures   a picture for a query: borrowed from the captioner's memory for words, an image's own
    captioning an image query captioned as the index job captions
    rules      the checks every query meets (its words, its length)
    queries    a query file -> queries and error rows
    gallery    results as an HTML gallery, and thumbnails
"""
