"""Datasets: read into memory and held out, streamed through Ray Data, written as Parquet shards."""
