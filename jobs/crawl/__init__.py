"""The crawl's stages, Spark-free: flickr (a Flickr search -> entries, paged and paced), download (a URL ->
checked bytes, behind the private-address guard and the sites' opt-outs), pacing (requests per second, per
host). The crawl job itself is jobs/ingest.py's, which downloads in Spark tasks."""
