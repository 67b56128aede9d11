"""A world you can see: procedural subjects, a tiny text-to-image base pretrained on them, identities in it."""
