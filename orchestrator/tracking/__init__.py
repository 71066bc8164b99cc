"""MLflow runs and their write queue, trial records, result tables, plots, importances, statistics."""
