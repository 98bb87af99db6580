"""Training: objectives, pathway loss, optimizer, sharding, checkpoints and the loop."""
