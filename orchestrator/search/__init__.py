"""The driver's side of a search: the teacher, the Tune experiment, its summary, comparisons of methods."""
