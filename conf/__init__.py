"""Settings profiles (local, s3, cluster) and the Spark log configuration, shipped as package data."""
