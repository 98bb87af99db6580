"""Cell type annotation: a classifier head on GeneMamba's cell representation, and its fine-tuning."""
