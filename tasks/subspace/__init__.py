"""Subspace stage: a dataset's committed rows in; a PCA subspace (components, mean, std) out.

``pca`` is the streaming randomized PCA (block Krylov, q + 2 reads of the shards); ``w2w`` samples,
edits, inverts and projects models in a fitted subspace (weights2weights), writing new LoRAs.
"""
