"""Storage: canonical weight layout, Parquet shards, the ledger, and the one fsspec entry point."""
