"""Units of work: plain functions of explicit inputs (with thin Prefect task wrappers where flows need them)."""
