"""Small models trained on scikit-learn's 8x8 digits with pydl's kernels (see README.md)."""
