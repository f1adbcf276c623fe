"""What a curious server can learn from the smashed data: the model-inversion attack (``attack``), its
decoder (``decoder``) and image-similarity metrics (``metrics``)."""
