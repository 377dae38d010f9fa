"""Why the model decides as it does.

    gradcam.py     Grad-CAM and friends, as overlays
    features.py    a run's penultimate-layer features, training neighbours, outliers
    neighbours.py  nearest neighbours and similar pairs by cosine similarity
    leakage.py     near-duplicates of a run by hash and features, and the ones that straddle its split
    embedding.py   the embedding map (PCA, t-SNE, UMAP)
    cam_audit.py   where the model looks, over the whole test part
"""
