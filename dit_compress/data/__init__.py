"""Training and evaluation data: digits, latent dirs and shards, image folders, the VAE, batch drawing."""
