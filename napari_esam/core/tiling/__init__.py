"""Tiling: the tile grid, tile embeddings and their store, the seam merge, the tiled predictor."""
