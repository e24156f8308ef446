"""Reading and writing data: corpora, soft-label Parquet, Ray Data edges, storage paths."""
