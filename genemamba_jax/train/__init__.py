"""Training: objectives, pathway and co-expression losses, optimizer, sharding, checkpoints and the loop."""
