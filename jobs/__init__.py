"""Spark jobs: plain functions of (spark, lake, settings, inputs). No Prefect here."""
