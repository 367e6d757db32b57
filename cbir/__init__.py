"""cbir core: what every layer shares. Imports nothing else of the project (and no Spark, Prefect or TensorFlow).

settings    the one settings object: a profile, --conf, CBIR_* variables, --set; validated
errors      bad usage (exit 2) and a failed run (exit 1)
uris        s3://, file:// and local paths, parsed in one place
storage     a filesystem for a URI (local or S3), files written once and atomically
lake        content-addressed images and the Delta Lake tables, committed a run at a time
parts       a run's Parquet parts as the Delta tables store them, with their statistics
schemas     the Arrow schemas of the lake's tables
images      image checks: a full decode, or the reason an image is refused
samples     the sample corpus that pip installs (skimage photos, Twemoji emoji)
reader      a SOURCE (folder, s3:// prefix, image, manifest file) -> the entries to ingest
stats       per-task tallies, summed on the driver for a run's summary
stderr      standard error with the notices no setting stops dropped
cluster     a standalone Spark cluster on this machine, from the installed pyspark
text        caption text -> words: the normalisation the tokenizer, the index and BLEU share
bleu        nltk-exact sentence BLEU from an image's clipped n-gram matches
references  an image's references (captions, labels, neighbours' texts, title, tags), each with its kind
engine      the BLEU top-k engine: exact top-k over many captions, with pruning, no per-pair loop
"""
