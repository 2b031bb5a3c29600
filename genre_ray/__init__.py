"""genre-ray: tune music-genre classifiers on GTZAN with Ray Tune."""
