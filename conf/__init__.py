"""Settings profiles (local, s3, cluster, offline) and the Spark log configuration, shipped as package data."""
