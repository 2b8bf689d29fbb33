"""What training writes and serving reads: the batch outputs' formats (embeddings, neighbour lists),
the FAISS retrieval index (built, tuned, saved and searched by the same class), the content model for
products newer than a version, the ranker booster's loading and scoring, and the MLflow registry that
keeps the versions. batch/ trains and registers; agents/ download, load and search; neither imports
the other."""
