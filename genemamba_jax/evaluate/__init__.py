"""Evaluations of GeneMamba embeddings: integration, reconstruction, gene pairs."""
