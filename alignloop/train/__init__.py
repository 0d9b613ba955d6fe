"""One module per algorithm, each a readable `train(cfg)`."""
