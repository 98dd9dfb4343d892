"""Stage 5 of the pipeline: what the user asked for (objects, a model's memory, a file)."""
